"""Validation helpers that decide which positions count."""
from costopt.evaluation.reference import shared_prefix_len


class CharTokenizer:
    """One token per character: enough to test prefix logic without a model."""

    def __call__(self, text):
        return {"input_ids": [ord(c) for c in text]}


def test_shared_prefix_is_the_common_template_block():
    texts = ["<sys>be nice</sys>Hello", "<sys>be nice</sys>Howdy", "<sys>be nice</sys>Hi there"]
    assert shared_prefix_len(CharTokenizer(), texts) == len("<sys>be nice</sys>H"), \
        "positions up to the first differing token are shared"


def test_no_shared_prefix():
    assert shared_prefix_len(CharTokenizer(), ["abc", "xbc"]) == 0, "different first tokens share nothing"


def test_identical_texts_share_everything():
    assert shared_prefix_len(CharTokenizer(), ["same", "same"]) == 4, "whole text shared"
