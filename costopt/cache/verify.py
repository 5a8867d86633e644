"""The verification step: may a cached answer to prompt A serve prompt B?

Embeddings alone cannot tell near-misses from paraphrases: all-MiniLM-L6-v2 scores "Is coffee good for
you?" / "Is coffee bad for you?" at 0.936 but "How do I bake bread?" / "What is the way to make bread?"
at 0.836, and "What is 17 times 3?" / "... 4?" at 0.84 (measured here; GPTCache's fixed 0.8 threshold
serves all three). So a cache hit needs both a close embedding and this check, which compares what
decides an answer:
- **hard tokens**, which must be the same: numbers (digits and number words, "two" = "2") and names
  (words capitalized inside a sentence, on either side) in the same order; negations, quantifiers,
  directions and relations, operators ("add" = "plus"), units, dates and times, and wh-words
  (why / when / where / who / which) as a multiset;
- **content words** (what is left after stop words), lightly stemmed: any that one side has and the
  other lacks must be matched, as a phrase, by a close one on the other side: the phrase similarity
  `phrase_sim` (the embedder's cosine of the two differing phrases) must reach `min_phrase_sim`, so
  "simple terms" / "plain language" can pass where "hot" / "cold" cannot; more than three such words on
  either side is another question, refused without the embedder (which also keeps a miss cheap). An extra content word with
  nothing against it fails ("Explain X" / "Explain X to a child"); a word with a negating prefix of the
  other ("healthy" / "unhealthy") fails; two adjacent letters swapped is a typo, the same word.

The word lists are closed-class English (no list of the test pairs' words); the rule is conservative:
when in doubt it refuses, which costs a hit, never an answer. Its thresholds are calibrated with the
embedding threshold by `costopt.cache.calibrate` on the labeled pairs of `costopt.cache.pairs`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

PhraseSim = Callable[[str, str], float]
MAX_DIFFERING_WORDS = 3  # more content words than this on either side only: refused without asking the embedder

_CONTRACTIONS = [(re.compile(p, re.IGNORECASE), r) for p, r in (
    (r"\bwon't\b", "will not"), (r"\bcan't\b", "can not"), (r"\bcannot\b", "can not"), (r"n't\b", " not"),
    (r"'re\b", " are"), (r"'m\b", " am"), (r"'ll\b", " will"), (r"'ve\b", " have"), (r"'d\b", " would"),
    (r"\b(what|where|who|how|that|there|it|he|she)'s\b", r"\1 is"), (r"'s\b", ""))]

_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_NUMBER_WORDS.update({"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70",
                      "eighty": "80", "ninety": "90", "hundred": "100", "thousand": "1000",
                      "million": "1000000", "billion": "1000000000", "dozen": "12", "half": "0.5",
                      "twice": "2x", "double": "2x", "triple": "3x", "once": "1x"})
_ORDINALS = {w: f"#{i}" for i, w in enumerate(
    "zeroth first second third fourth fifth sixth seventh eighth ninth tenth".split())}

# closed classes whose words decide an answer; all of them are hard tokens. Units and calendar words,
# like numbers and names, must also come in the same order
_UNIT_AND_DATE_TEXT = """
today tomorrow yesterday tonight morning afternoon evening night noon midnight weekend weekday
spring summer autumn winter season century decade year month week day hour minute second
january february march april june july august september october november december
monday tuesday wednesday thursday friday saturday sunday
km kilometer kilometre mile meter metre cm centimeter centimetre mm millimeter inch foot feet yard
kg kilogram gram pound ounce ton tonne lb oz liter litre gallon ml milliliter pint cup
celsius fahrenheit kelvin degree percent dollar euro pound yen cent calorie watt volt byte kb mb gb tb
mph kph km/h
"""
_HARD_WORDS = set(_UNIT_AND_DATE_TEXT.split()) | set("""
not no never none nobody nothing nowhere neither nor without
all every each some any many few most least more less fewer several both either only always sometimes
often rarely usually seldom ever half whole entire
north south east west northern southern eastern western up down left right above below over under
before after behind ahead inside outside top bottom front back forward backward upward downward
higher lower upper high low increase decrease rise fall raise drop gain lose add subtract plus minus times
divided multiply divide more less than toward towards between against
start end begin finish first last next previous earlier later early late past future ago since until
why when where who whom whose
male female
""".split())
# hard words that say the same thing: compared as one
_CANONICAL = {"add": "plus", "sum": "plus", "multiplied": "times", "multiply": "times", "product": "times",
              "subtract": "minus", "subtracted": "minus", "divide": "divided", "metre": "meter",
              "kilometre": "kilometer", "centimetre": "centimeter", "litre": "liter", "tonne": "ton",
              "kilometer": "kilometer", "km": "kilometer", "kg": "kilogram", "lb": "pound", "oz": "ounce",
              "cm": "centimeter", "mm": "millimeter", "ml": "milliliter", "feet": "foot", "autumn": "fall"}
_UNITS_AND_DATES = {_CANONICAL.get(w, w) for w in _UNIT_AND_DATE_TEXT.split()}
# request verbs and framing words of one meaning (a closed class of prompt phrasing): compared as one
_SAME_WORDS = {w: head for head, words in {
    "write": "compose create draft implement generate produce", "give": "share offer provide state",
    "suggest": "propose recommend", "tell": "narrate", "short": "brief", "rewrite": "rephrase reword",
    "fix": "correct", "summarize": "summarise", "list": "enumerate",
}.items() for w in [head, *words.split()]}
_NEGATING_PREFIXES = ("un", "in", "im", "il", "ir", "dis", "non")
_SYMBOLS = {"%": "percent", "$": "dollar", "€": "euro", "£": "pound", "°": "degree", "+": "plus", "-": "minus",
            "×": "times", "*": "times", "/": "divided", "=": "equals", "<": "less", ">": "more"}

_STOP = set("""
a an the is are was were be been being am do does did doing done have has had having
i me my mine myself you your yours yourself we us our ours he him his she her hers it its they them their
this that these those there here what how of for on at by with about as and or but if so then than
please could would can will shall should might must may let tell know quick question hey hi hello thanks
thank kindly just really very also too like want need get got me show explain describe
in into to from using use via within per
answer wonder wondering curious help much which
""".split())  # note: "what" and "how" only; "why/when/where/who/which" are hard words

_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[A-Za-z]+(?:/[A-Za-z]+)?|[%$€£°+×*/=<>-]")


@dataclass(frozen=True)
class Token:
    text: str  # as written, for phrase similarity
    stem: str  # normalized: lowercase, stemmed, numbers as digits
    capital: bool  # capitalized inside a sentence: a name


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str  # why not, or "agree"
    phrase_sim: float | None = None  # the differing phrases' similarity, when it was asked


def _stem(word: str) -> str:
    w = word.lower()
    if w in _NUMBER_WORDS:
        return _NUMBER_WORDS[w]
    if w in _ORDINALS:
        return _ORDINALS[w]
    if w[0].isdigit():
        return w.replace(",", "")
    if w in _HARD_WORDS or w in _STOP or len(w) <= 3:
        return _canon(w)
    for suffix, keep in (("ies", "y"), ("sses", "ss"), ("ches", "ch"), ("shes", "sh"), ("xes", "x"),
                         ("ing", ""), ("ed", ""), ("s", "")):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3 and not w.endswith("ss"):
            stem = w[: len(w) - len(suffix)] + keep
            if suffix in ("ing", "ed") and len(stem) >= 4 and stem[-1] == stem[-2] and stem[-1] not in "slzf":
                stem = stem[:-1]  # swimming -> swim, stopped -> stop
            return _canon(stem)
    return _canon(w)


def _canon(w: str) -> str:
    return _CANONICAL.get(w) or _SAME_WORDS.get(w, w)


def tokens(text: str) -> list[Token]:
    """The text's words, numbers and meaningful symbols, each with its stem and whether it is a name."""
    for rx, rep in _CONTRACTIONS:
        text = rx.sub(rep, text)
    shouting = not any(c.islower() for c in text)  # ALL CAPS says nothing about names
    out: list[Token] = []
    sentence_start = True
    for m in re.finditer(_TOKEN.pattern + r"|[.?!:;\"]", text):
        word = m.group()
        if word in ".?!:;\"":
            sentence_start = True
            continue
        if word in _SYMBOLS:
            out.append(Token(word, _SYMBOLS[word], False))
            continue
        capital = word[0].isupper() and not sentence_start and not shouting and word != "I"
        out.append(Token(word, _stem(word), capital))
        sentence_start = False
    return out


def _hard(tok: Token, names: set[str]) -> bool:
    s = tok.stem
    return (_ordered(tok, names) or s in _HARD_WORDS or s in _CANONICAL.values()
            or tok.text.lower() in _HARD_WORDS)


def _ordered(tok: Token, names: set[str]) -> bool:
    """Numbers, names, units and calendar words: their order matters too ("17 minus 3", "from Paris to
    Rome", "5 miles to kilometers")."""
    return tok.stem[0].isdigit() or tok.stem[0] == "#" or tok.stem in names or tok.stem in _UNITS_AND_DATES


def _transposed(a: str, b: str) -> bool:
    """One typo: two adjacent letters swapped, in a word of five letters or more, first letter kept."""
    if len(a) != len(b) or len(a) < 5 or a[0] != b[0] or a == b:
        return False
    diff = [i for i in range(len(a)) if a[i] != b[i]]
    return len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]


def _negated(a: str, b: str) -> bool:
    """"unhealthy" / "healthy", "illegal" / "legal": a negating prefix on one side."""
    a, b = a.lower(), b.lower()
    return any(a == p + b or b == p + a for p in _NEGATING_PREFIXES)


def verify(a: str, b: str, phrase_sim: PhraseSim | None, min_phrase_sim: float = 0.75) -> Verdict:
    """May an answer to `a` serve `b`? `phrase_sim` scores two short phrases (cosine); None refuses any
    content-word difference."""
    ta, tb = tokens(a), tokens(b)
    names = {t.stem for t in ta + tb if t.capital}  # a name on either side is a name on both
    order_a = [t.stem for t in ta if _ordered(t, names)]
    order_b = [t.stem for t in tb if _ordered(t, names)]
    if order_a != order_b:
        return Verdict(False, f"numbers or names differ: {' '.join(order_a) or '-'} vs {' '.join(order_b) or '-'}")
    hard_a = sorted(t.stem for t in ta if _hard(t, names) and not _ordered(t, names))
    hard_b = sorted(t.stem for t in tb if _hard(t, names) and not _ordered(t, names))
    if hard_a != hard_b:
        return Verdict(False, f"hard words differ: {' '.join(hard_a) or '-'} vs {' '.join(hard_b) or '-'}")
    content_a = [t for t in ta if not _hard(t, names) and t.stem not in _STOP]
    content_b = [t for t in tb if not _hard(t, names) and t.stem not in _STOP]
    only_a = [t.text for t in content_a if t.stem not in {x.stem for x in content_b}]
    only_b = [t.text for t in content_b if t.stem not in {x.stem for x in content_a}]
    for x in list(only_a):  # a typo is the same word
        twin = next((y for y in only_b if _transposed(x.lower(), y.lower())), None)
        if twin is not None:
            only_a.remove(x)
            only_b.remove(twin)
    if any(_negated(x, y) for x in only_a for y in only_b):
        return Verdict(False, f"negated word: {' '.join(only_a)} vs {' '.join(only_b)}")
    if not only_a and not only_b:
        return Verdict(True, "agree")
    if not only_a or not only_b:
        extra = " ".join(only_a or only_b)
        return Verdict(False, f"content words on one side only: {extra}")
    if phrase_sim is None:
        return Verdict(False, f"content differs: {' '.join(only_a)} vs {' '.join(only_b)}")
    if max(len(only_a), len(only_b)) > MAX_DIFFERING_WORDS:  # a rewording swaps a few words, not a topic
        return Verdict(False, f"content differs in more than {MAX_DIFFERING_WORDS} words: "
                              f"{' '.join(only_a)} vs {' '.join(only_b)}")
    sim = float(phrase_sim(" ".join(only_a), " ".join(only_b)))
    if sim < min_phrase_sim:
        return Verdict(False, f"content differs: {' '.join(only_a)} vs {' '.join(only_b)} "
                              f"({sim:.2f} < {min_phrase_sim:.2f})", sim)
    return Verdict(True, "agree", sim)
