"""The serving request trace: a fixed, versioned list of chat requests that the load generator replays.

`build_trace(n, seed)` is a pure function of (n, seed), and a shorter trace is a prefix of a longer one
with the same seed. Each request is drawn in order from one seeded `random.Random`:
- kind: 65% `fresh`, 20% `repeat` (the exact messages and `max_tokens` of an earlier fresh request, so
  an exact-match cache may answer it), 15% `paraphrase` (an earlier fresh request reworded with the
  same meaning, same system message and `max_tokens`, so only a semantic cache may answer it). Both
  name their source in `source_id`; the first request is always fresh.
- fresh prompts: 70% one prompt from `costopt.evaluation.evaldata.prompt_pool(seed)` taken in order (11 families,
  one to two sentences), 15% two or three pool prompts joined into a numbered list, 15% a 60-120 word
  passage from `costopt.evaluation.evaldata.ppl_passages` with a question about it. Fresh user texts never repeat;
  once the pool is used up, fresh prompts are joined lists. 25% carry a system message.
- `max_tokens`: 40% short (8/16/24), 40% medium (32/48/64), 20% long (80/96).
- `priority` 15% high, 70% normal, 15% low, with `deadline_ms` from `DEADLINE_MS` (generous for low);
  `tenant` one of four names, 40/30/20/10%.
- `offset_s`: arrival time of a Poisson process at `BASE_RATE_REQ_S` (first request at 0); open-loop
  replay at R req/s sends each request at `offset_s * BASE_RATE_REQ_S / R`.

Paraphrases (`paraphrase`) apply one or more meaning-keeping rules, in order: phrase synonyms from
`SYNONYMS`, a reorder (move a trailing "in two sentences" to the front, put a quoted text first, ...),
a politeness wrapper ("Could you ...?", "Please ...", "Quick question: ..."), and a punctuation/case
change. Text inside double quotes (the sentence to rewrite, the review to classify, the passage) is
never touched. Files are JSONL with a header line carrying name, version, seed and the sha256
fingerprint; `read_trace` refuses a file whose version or fingerprint does not match.

    items = build_trace(200, seed=1234)
    write_trace("artifacts/trace/serving.jsonl", items, seed=1234)
    assert read_trace("artifacts/trace/serving.jsonl") == items
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from costopt.evaluation.evaldata import ppl_passages, prompt_pool

TRACE_NAME = "serving-v1"
TRACE_VERSION = 1  # bump whenever any share, table, rule or template below changes: it changes every trace

KIND_SHARES = {"fresh": 0.65, "repeat": 0.20, "paraphrase": 0.15}
PRIORITY_SHARES = {"high": 0.15, "normal": 0.70, "low": 0.15}
DEADLINE_MS = {"high": 5_000, "normal": 20_000, "low": 120_000}  # ms from send to full answer
TENANT_SHARES = {"acme": 0.40, "globex": 0.30, "initech": 0.20, "umbrella": 0.10}
ANSWER_TOKENS = (((8, 16, 24), 0.4), ((32, 48, 64), 0.4), ((80, 96), 0.2))  # (max_tokens choices, share)
SHAPE_SHARES = {"single": 0.70, "joined": 0.15, "passage": 0.15}  # how a fresh prompt is built
SYSTEM_SHARE = 0.25  # fresh prompts that carry a system message
BASE_RATE_REQ_S = 1.0  # mean arrival rate of `offset_s`, requests per second
PASSAGES = 48  # distinct passages the passage prompts draw from

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a concise assistant. Keep your answers short.",
    "You are a friendly tutor who explains things clearly.",
    "You are a careful assistant. If you are not sure, say so.",
)
PASSAGE_TASKS = (
    "Summarize this passage in one sentence.",
    "What is the main topic of this passage?",
    "List two facts from this passage.",
    "Suggest a title for this passage.",
)

KINDS = tuple(KIND_SHARES)
PRIORITIES = tuple(PRIORITY_SHARES)


class TraceError(ValueError):
    """A trace file is malformed, from another trace version, or edited since it was written."""


@dataclass(frozen=True)
class TraceItem:
    id: str
    kind: str  # "fresh" | "repeat" | "paraphrase"
    source_id: str | None  # the fresh request a repeat or paraphrase comes from; None when fresh
    messages: tuple[dict[str, str], ...]  # OpenAI chat messages: optional system, then one user message
    max_tokens: int
    priority: str  # "high" | "normal" | "low"
    tenant: str
    deadline_ms: int  # answer wanted within this many ms of sending
    offset_s: float  # arrival time at BASE_RATE_REQ_S, seconds from the trace start

    @property
    def prompt(self) -> str:
        return "\n".join(m["content"] for m in self.messages if m["role"] == "user")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["messages"] = [dict(m) for m in self.messages]
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "TraceItem":
        """Build and check one item; `where` (file and line) prefixes every error."""
        if not isinstance(d, dict) or set(d) != {f for f in cls.__dataclass_fields__}:
            raise TraceError(f"{where}: expected an object with keys {sorted(cls.__dataclass_fields__)}")
        messages = d["messages"]
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and set(m) == {"role", "content"} for m in messages)):
            raise TraceError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
        if d["kind"] not in KINDS or d["priority"] not in PRIORITIES:
            raise TraceError(f"{where}: kind must be one of {list(KINDS)} and priority one of "
                             f"{list(PRIORITIES)}, got {d['kind']!r} and {d['priority']!r}")
        if (d["kind"] == "fresh") != (d["source_id"] is None):
            raise TraceError(f"{where}: source_id must be set exactly when kind is repeat or paraphrase")
        if not isinstance(d["max_tokens"], int) or d["max_tokens"] < 1:
            raise TraceError(f"{where}: max_tokens must be an integer >= 1, got {d['max_tokens']!r}")
        return cls(**{**d, "messages": tuple(dict(m) for m in messages)})


# ---------------------------------------------------------------- paraphrase rules

# Meaning-keeping rewrites of the pool's templates. Longer phrases come first so that they win a tie.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "Is the sentiment of this review positive or negative?": (
        "Is this review positive or negative?", "Would you call this review positive or negative?"),
    "Does this message sound happy, angry or neutral?": ("Is the tone of this message happy, angry or neutral?",),
    "Rewrite this sentence more formally:": ("Make this sentence more formal:",
                                             "Rephrase this sentence in a formal tone:"),
    "Fix the grammar in this sentence:": ("Correct the grammar in this sentence:",
                                          "Fix the grammar of this sentence:"),
    "What is the difference between": ("What's the difference between", "Can you explain the difference between"),
    "What are common mistakes when": ("What are frequent mistakes when", "What are typical mistakes when"),
    "Write a Python function": ("Create a Python function", "Implement a Python function"),
    "Write a JavaScript function": ("Create a JavaScript function", "Implement a JavaScript function"),
    "How can I get better at": ("How can I improve at", "How do I get better at"),
    "Translate into French:": ("Translate to French:", "Put this into French:"),
    "Summarize in five words:": ("Sum up in five words:", "Give a five-word summary of:"),
    "How many groups are there?": ("How many groups does that make?",),
    "Write a short email to": ("Draft a short email to", "Write a brief email to"),
    "Give three tips for": ("Share three tips for", "Offer three tips for"),
    "Tell a short story": ("Tell a brief story", "Narrate a short story"),
    "Write three facts": ("Give three facts", "State three facts"),
    "Write a short poem": ("Compose a short poem", "Write a brief poem"),
    "Write a short biography": ("Write a brief biography", "Give a short biography"),
    "Show your work.": ("Show your steps.", "Show how you got the answer."),
    "in simple terms": ("in plain language", "in everyday words"),
    "in two sentences": ("using two sentences",),
    "in three sentences": ("using three sentences",),
    "best known for": ("most famous for", "best remembered for"),
    "average speed": ("mean speed",),
    "Solve for x:": ("Find x:", "Find the value of x:"),
    "Suggest some": ("Recommend some", "Propose some"),
    "List five": ("Name five", "Give me five"),
    "Name three": ("List three", "Give three"),
    "What is": ("What's",),
    "buy": ("purchase",),
    "costs": ("is priced at",),
    "two": ("2",), "three": ("3",), "five": ("5",),
}
_SYNONYM_RES = [(re.compile(r"(?<!\w)" + re.escape(p) + r"(?!\w)", re.IGNORECASE), alts)
                for p, alts in SYNONYMS.items()]
_QUOTED = re.compile(r'"[^"]*"')
_IMPERATIVES = {"explain", "describe", "write", "give", "list", "name", "suggest", "compare", "tell",
                "translate", "fix", "rewrite", "summarize", "solve", "create", "implement", "compose",
                "share", "offer", "draft", "make", "sum", "put", "correct", "rephrase", "recommend",
                "propose", "show", "find", "answer", "read", "narrate", "state"}


def _outside_quotes(text: str, fn: Callable[[str], str]) -> str:
    """Apply `fn` to every stretch of `text` outside double quotes; quoted text is kept verbatim."""
    out, last = [], 0
    for m in _QUOTED.finditer(text):
        out += [fn(text[last:m.start()]), m.group()]
        last = m.end()
    return "".join(out + [fn(text[last:])])


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:]


def _upper_first(s: str) -> str:
    return s[:1].upper() + s[1:]


def _synonyms(text: str, rng: random.Random) -> str | None:
    unquoted = _QUOTED.sub('""', text)
    hits = [(rx, alts) for rx, alts in _SYNONYM_RES if rx.search(unquoted)]
    if not hits:
        return None
    for rx, alts in rng.sample(hits, min(len(hits), rng.randint(1, 2))):
        alt = rng.choice(alts)
        swap = (lambda m, alt=alt: _upper_first(alt) if m.group()[0].isupper() else _lower_first(alt))
        text = _outside_quotes(text, lambda s: rx.sub(swap, s))
    return text


_REORDERS: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    # "Explain X in simple terms." -> "In simple terms, explain X."
    (re.compile(r'^(?P<main>[^"\n.?!]+?) (?P<how>(?:in|using) (?:simple terms|plain language|everyday words|'
                r'(?:one|two|three|2|3) sentences?))(?P<end>[.?])$'),
     lambda m: f"{_upper_first(m['how'])}, {_lower_first(m['main'])}{m['end']}"),
    # "What is X? Answer in two sentences." -> "Answer in two sentences: what is X?"
    (re.compile(r'^(?P<q>[^"\n]+\?) (?P<ask>(?:Answer|Show|Explain)[^"\n?]*)\.$'),
     lambda m: f"{m['ask']}: {_lower_first(m['q'])}"),
    # 'Fix the grammar in this sentence: "..."' -> '"..."\nFix the grammar in this sentence.'
    (re.compile(r'^(?P<ask>[^"\n]+?)(?P<sep>[:?]) (?P<quote>"[^"]*")$'),
     lambda m: f"{m['quote']}\n{m['ask']}{'?' if m['sep'] == '?' else '.'}"),
    # "Give three tips for X." -> "For X, give three tips."
    (re.compile(r'^(?P<ask>(?:Give|Share|Offer|List|Name|Suggest|Write|Compose)[^"\n.?!]*?) '
                r'(?P<prep>about|for) (?P<obj>[^"\n.?!]+)\.$'),
     lambda m: f"{_upper_first(m['prep'])} {m['obj']}, {_lower_first(m['ask'])}."),
]


def _reorder(text: str, rng: random.Random) -> str | None:
    options = [(rx, fn) for rx, fn in _REORDERS if rx.match(text)]
    if not options:
        return None
    rx, fn = rng.choice(options)
    return fn(rx.match(text))  # type: ignore[arg-type]


def _politeness(text: str, rng: random.Random) -> str | None:
    first = re.match(r"[A-Za-z']+", text)
    options = [f"Hi! {text}", f"{text}\nThank you."]
    if first and first.group().lower() in _IMPERATIVES:
        options += [f"Please {_lower_first(text)}", f"I'd like you to {_lower_first(text)}",
                    f"Kindly {_lower_first(text)}"]
        if text.endswith(".") and not re.search(r'[.?!]["\s]', text[:-1]):  # one plain sentence
            options.append(f"Could you {_lower_first(text[:-1])}?")
    elif text.rstrip('"').endswith("?"):
        options += [f"Quick question: {_lower_first(text)}", f"I was wondering: {_lower_first(text)}"]
    return rng.choice(options)


def _surface(text: str, rng: random.Random) -> str | None:
    options = [_outside_quotes(text, str.lower), _lower_first(text)]
    if text[-1:] in ".?":
        options.append(text[:-1])
    options = [o for o in options if o != text]
    return rng.choice(options) if options else None


PARAPHRASE_RULES: tuple[tuple[str, Callable[[str, random.Random], str | None]], ...] = (
    ("synonyms", _synonyms), ("reorder", _reorder), ("politeness", _politeness), ("surface", _surface))


def paraphrase(text: str, rng: random.Random, avoid: set[str] | frozenset[str] = frozenset()) -> str:
    """A rewording of `text` with the same meaning, unequal to `text` and to every string in `avoid`.

    Picks a random non-empty subset of `PARAPHRASE_RULES` and applies those that fit, in rule order.
    Raises ValueError if 50 tries give nothing new.
    """
    for _ in range(50):
        picked = [rule for rule in PARAPHRASE_RULES if rng.random() < 0.5] or [rng.choice(PARAPHRASE_RULES)]
        out = text
        for _, rule in picked:
            out = rule(out, rng) or out
        if out != text and out not in avoid:
            return out
    raise ValueError(f"paraphrase: no new wording found for {text!r}")


# ---------------------------------------------------------------- the trace

def _weighted(rng: random.Random, shares: dict[str, float]) -> str:
    return rng.choices(list(shares), weights=list(shares.values()))[0]


def _max_tokens(rng: random.Random) -> int:
    choices = rng.choices([c for c, _ in ANSWER_TOKENS], weights=[w for _, w in ANSWER_TOKENS])[0]
    return rng.choice(choices)


class _FreshPrompts:
    """Fresh user texts in order: pool prompts, joined lists and passage questions, never repeating."""

    def __init__(self, seed: int) -> None:
        self.pool = [text for _, text in prompt_pool(seed)]
        self.next_single: Iterator[str] = iter(self.pool)
        self.passages = [row["text"] for row in ppl_passages(seed, PASSAGES)]

    def _joined(self, rng: random.Random) -> str:
        parts = rng.sample(self.pool, rng.randint(2, 3))
        return "Answer each of the following.\n" + "\n".join(f"{i}. {p}" for i, p in enumerate(parts, 1))

    def _passage(self, rng: random.Random) -> str:
        return f'Read this passage: "{rng.choice(self.passages)}"\n{rng.choice(PASSAGE_TASKS)}'

    def draw(self, rng: random.Random, seen: set[str]) -> str:
        shape = _weighted(rng, SHAPE_SHARES)
        while True:
            if shape == "single":
                text = next(self.next_single, None) or self._joined(rng)
            else:
                text = self._joined(rng) if shape == "joined" else self._passage(rng)
            if text not in seen:
                return text
            shape = "joined"  # a used passage question or single: fall back to the large joined space


def _fresh_messages(text: str, rng: random.Random) -> tuple[dict[str, str], ...]:
    user = {"role": "user", "content": text}
    if rng.random() < SYSTEM_SHARE:
        return ({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}, user)
    return (user,)


def build_trace(n: int, seed: int) -> list[TraceItem]:
    """`n` requests (`r00000`, ...), a pure function of (n, seed); see the module docstring."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"workload.build_trace: n must be an integer >= 0, got {n!r}")
    rng = random.Random(f"costopt.workload.trace:{TRACE_VERSION}:{seed}")
    fresh = _FreshPrompts(seed)
    seen: set[str] = set()  # every user text so far: fresh prompts and paraphrases stay new
    sources: list[TraceItem] = []
    items: list[TraceItem] = []
    offset = 0.0
    for i in range(n):
        kind = _weighted(rng, KIND_SHARES) if sources else "fresh"
        priority, tenant = _weighted(rng, PRIORITY_SHARES), _weighted(rng, TENANT_SHARES)
        if kind == "fresh":
            text = fresh.draw(rng, seen)
            messages, max_tokens, source_id = _fresh_messages(text, rng), _max_tokens(rng), None
        else:
            src = rng.choice(sources)
            messages, max_tokens, source_id = src.messages, src.max_tokens, src.id
            if kind == "paraphrase":
                text = paraphrase(src.prompt, rng, avoid=seen)
                messages = tuple(dict(m, content=text) if m["role"] == "user" else m for m in messages)
        seen.add(messages[-1]["content"])
        item = TraceItem(id=f"r{i:05d}", kind=kind, source_id=source_id, messages=messages,
                         max_tokens=max_tokens, priority=priority, tenant=tenant,
                         deadline_ms=DEADLINE_MS[priority], offset_s=round(offset, 6))
        items.append(item)
        if kind == "fresh":
            sources.append(item)
        offset += rng.expovariate(BASE_RATE_REQ_S)
    return items


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def trace_fingerprint(items: Sequence[TraceItem]) -> str:
    """sha256 of the canonical JSON of every item: equal exactly when the requests are."""
    return hashlib.sha256(_canonical([it.to_dict() for it in items]).encode()).hexdigest()


def trace_meta(items: Sequence[TraceItem]) -> dict[str, Any]:
    """The `serving.trace` block of the run summary."""
    return {"name": TRACE_NAME, "version": TRACE_VERSION, "requests": len(items),
            "fingerprint": trace_fingerprint(items)}


def write_trace(path: str | Path, items: Sequence[TraceItem], seed: int | None = None) -> Path:
    """Write a header line, then one item per line; atomically (a crash leaves no half file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"trace": TRACE_NAME, "version": TRACE_VERSION, "seed": seed, "requests": len(items),
              "fingerprint": trace_fingerprint(items)}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in [header] + [it.to_dict() for it in items]:
            fh.write(_canonical(row) + "\n")
    os.replace(tmp, path)
    return path


def read_trace(path: str | Path) -> list[TraceItem]:
    """Read a file from `write_trace`; TraceError if its version, count or fingerprint does not match."""
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        lines = [line for line in fh if line.strip()]
    rows = []
    for no, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path}:{no}: not valid JSON ({exc.msg})") from None
    if not rows or not isinstance(rows[0], dict) or rows[0].get("trace") != TRACE_NAME:
        raise TraceError(f"{path}: not a {TRACE_NAME} trace file (the first line must be its header)")
    header = rows[0]
    if header.get("version") != TRACE_VERSION:
        raise TraceError(f"{path}: trace version {header.get('version')!r}, this code builds version "
                         f"{TRACE_VERSION}; rebuild the trace with build_trace/write_trace")
    items = [TraceItem.from_dict(row, f"{path}:{no}") for no, row in enumerate(rows[1:], 2)]
    if header.get("requests") != len(items):
        raise TraceError(f"{path}: header says {header.get('requests')!r} requests, the file holds {len(items)}")
    found = trace_fingerprint(items)
    if header.get("fingerprint") != found:
        raise TraceError(f"{path}: fingerprint mismatch (header {header.get('fingerprint')!r}, content "
                         f"{found!r}): the file was edited after it was written; rebuild it")
    return items
