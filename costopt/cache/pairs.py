"""Labeled prompt pairs for calibrating and measuring the semantic cache: same answer or not.

Written here, from templates whose phrasings mean the same and whose typed slots decide the answer:
- **same answer** (`same=True`): `paraphrase` (another phrasing of the template, same slot values),
  `typo` (two letters of one word swapped), `surface` (case, punctuation, a politeness wrapper);
- **near-misses** (`same=False`), one slot changed, the phrasing often changed too: `number`, `entity`,
  `negation` (a "not" added or dropped), `unit`, `direction` (an opposite direction, or two places
  swapped), `date`, `antonym`, `quantifier`.

`labeled_pairs(seed)` is a pure function of the seed. `split_pairs` splits by template, so the held
split's sentences were never seen when fitting (GPTCache's known failures, "17 times 3" vs "17 times 4"
and polarity flips, are both kinds here).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

SAME_KINDS = ("paraphrase", "typo", "surface")
NEAR_MISS_KINDS = ("number", "entity", "negation", "unit", "direction", "date", "antonym", "quantifier")


@dataclass(frozen=True)
class Pair:
    a: str
    b: str
    same: bool
    kind: str
    template: int  # index of the template both sides come from (the split key)


# slot type -> values; a near-miss swaps a value for another of the same type
_POOLS: dict[str, list[str]] = {
    "number": [str(n) for n in range(2, 60)],
    "year": [str(y) for y in range(1850, 2025, 7)],
    "daynum": [str(d) for d in range(1, 29)],
    "country": ["France", "Japan", "Brazil", "Kenya", "Canada", "Norway", "India", "Mexico", "Egypt", "Spain",
                "Chile", "Vietnam", "Poland", "Turkey", "Peru", "Sweden", "Ghana", "Greece"],
    "city": ["Paris", "Tokyo", "Lagos", "Berlin", "Toronto", "Madrid", "Sydney", "Cairo", "Lima", "Oslo",
             "Seoul", "Dublin", "Rome", "Boston", "Nairobi", "Vienna"],
    "person": ["Marie Curie", "Isaac Newton", "Ada Lovelace", "Charles Darwin", "Frida Kahlo", "Nikola Tesla",
               "Jane Austen", "Louis Pasteur", "Rosalind Franklin", "Alan Turing"],
    "language": ["French", "Spanish", "German", "Japanese", "Swahili", "Portuguese", "Italian", "Korean"],
    "book": ["Pride and Prejudice", "Moby Dick", "War and Peace", "Don Quixote", "Great Expectations",
             "The Odyssey", "Hamlet", "Frankenstein"],
    "food": ["coffee", "chocolate", "rice", "cheese", "eggs", "red meat", "orange juice", "bread", "nuts"],
    "animal": ["owls", "cats", "bats", "foxes", "hamsters", "raccoons"],
    "unit_len": ["kilometers", "miles", "meters", "feet", "yards"],
    "unit_temp": ["Celsius", "Fahrenheit", "Kelvin"],
    "unit_time": ["minutes", "seconds"],
    "unit_mass": ["kilograms", "pounds", "grams", "ounces"],
    "month": ["January", "February", "March", "April", "June", "July", "August", "September", "October",
              "November", "December"],
    "weekday": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "quant": ["all", "most", "some", "few"],
    "quant_no": ["all", "some", "no", "most"],
}
# slot type -> pairs of opposites; a near-miss takes the other one
_OPPOSITES: dict[str, list[tuple[str, str]]] = {
    "compass": [("north", "south"), ("east", "west")],
    "lr": [("left", "right")],
    "ud": [("up", "down")],
    "ba": [("before", "after")],
    "good": [("good", "bad"), ("healthy", "unhealthy")],
    "safe": [("safe", "dangerous")],
    "comparative": [("stronger", "weaker"), ("sweeter", "more bitter"), ("hotter", "colder")],
    "room": [("warmer", "cooler"), ("brighter", "darker"), ("quieter", "louder")],
    "longer": [("longer", "shorter")],
    "cheap": [("cheaper", "more expensive")],
}
_NEG = "neg"  # the "{neg}" slot: "" or "not "
_KIND_OF_SLOT = {"number": "number", "year": "date", "daynum": "date", "month": "date", "weekday": "date",
                 "country": "entity", "city": "entity", "person": "entity", "language": "entity", "book": "entity",
                 "food": "entity", "animal": "entity", "unit_len": "unit", "unit_temp": "unit",
                 "unit_time": "unit", "unit_mass": "unit", "quant": "quantifier", "quant_no": "quantifier",
                 "compass": "direction", "lr": "direction", "ud": "direction", "ba": "direction",
                 "good": "antonym", "safe": "antonym", "comparative": "antonym", "room": "antonym",
                 "longer": "antonym", "cheap": "antonym", _NEG: "negation"}

# Each template: equivalent phrasings with slots {type} or {type2} (a second slot of the same type).
# Phrasings of one template mean the same thing for the same slot values.
_TEMPLATES: list[list[str]] = [
    ["What is {number} times {number2}?", "What's {number} multiplied by {number2}?", "Calculate {number} times {number2}."],
    ["What is {number} plus {number2}?", "How much is {number} plus {number2}?", "Add {number} and {number2}."],
    ["How many {unit_time} are in {number} hours?", "How many {unit_time} are there in {number} hours?"],
    ["Convert {number} {unit_len} to {unit_len2}.", "What is {number} {unit_len} in {unit_len2}?",
     "How many {unit_len2} is {number} {unit_len}?"],
    ["What is {number} degrees {unit_temp} in {unit_temp2}?", "Convert {number} degrees {unit_temp} to {unit_temp2}."],
    ["How many {unit_mass} is {number} {unit_mass2}?", "Convert {number} {unit_mass2} into {unit_mass}."],
    ["What is the capital of {country}?", "Which city is the capital of {country}?",
     "Name the capital city of {country}.", "Tell me the capital of {country}."],
    ["What language do people speak in {country}?", "Which language is spoken in {country}?"],
    ["What is the currency of {country}?", "Which currency is used in {country}?", "What money do they use in {country}?"],
    ["Is {country} {compass} of {country2}?", "Does {country} lie {compass} of {country2}?"],
    ["How long is the flight from {city} to {city2}?", "What is the flight time from {city} to {city2}?"],
    ["What is {person} famous for?", "What is {person} best known for?", "What is {person} known for?"],
    ["When was {person} born?", "When was {person} born exactly?"],
    ["Who wrote {book}?", "Who is the author of {book}?", "Who was {book} written by?"],
    ["How do you say good morning in {language}?", "Translate good morning into {language}."],
    ["Is {food} {neg}{good} for you?", "Is eating {food} {neg}{good} for you?", "Is {food} {neg}{good} for your body?"],
    ["Why do {animal} {neg}sleep at night?", "Why is it that {animal} do {neg}sleep at night?"],
    ["What should I {neg}say in a job interview?", "What should I {neg}say during a job interview?"],
    ["Which plants are {neg}{safe} for cats?", "What plants are {neg}{safe} for cats?"],
    ["What happened on {month} {daynum}, {year}?", "What events took place on {month} {daynum}, {year}?"],
    ["Is the museum open on {weekday}?", "Is the museum open on {weekday}s?", "Does the museum open on {weekday}?"],
    ["What is the weather like in {city} in {month}?", "How is the weather in {city} in {month}?"],
    ["What was the population of {city} in {year}?", "How many people lived in {city} in {year}?"],
    ["Do {quant} birds migrate in winter?", "Do {quant} birds fly south for the winter?"],
    ["Are {quant_no} mushrooms safe to eat?", "Can {quant_no} mushrooms be eaten safely?"],
    ["Do {quant} spiders spin webs?", "Do {quant} spiders make webs?"],
    ["How do I make my coffee {comparative}?", "How can I make my coffee {comparative}?",
     "What can I do to make my coffee {comparative}?"],
    ["How can I make my room {room}?", "What can I do to make my room {room}?", "How do I make my room {room}?"],
    ["How can I make my phone battery last {longer}?", "What makes a phone battery last {longer}?"],
    ["Is it {safe} to swim after eating?", "Is swimming after eating {safe}?"],
    ["Is it legal to turn {lr} on a red light?", "Can you turn {lr} on a red light legally?"],
    ["Why does warm air go {ud}?", "Why does warm air move {ud}?", "Why does hot air go {ud}?"],
    ["What happens to prices {ba} a recession?", "How do prices change {ba} a recession?"],
    ["Why is it {cheap} to fly on a Tuesday?", "Why are flights {cheap} on a Tuesday?"],
    ["Is {number} a prime number?", "Is the number {number} prime?", "Is {number} prime?"],
    ["What is {number} percent of {number2}?", "Calculate {number}% of {number2}.", "How much is {number} percent of {number2}?"],
]

_WRAPPERS = ["Please answer: {x}", "Quick question: {x}", "Could you tell me this: {x}", "Hey, {x}", "{x} Thanks!"]
_SLOT = re.compile(r"\{(\w+?)(2?)\}")


def _slot_types(phrasing: str) -> list[str]:
    return sorted({m.group(1) + m.group(2) for m in _SLOT.finditer(phrasing)})


def _draw(slot: str, rng: random.Random, taken: dict[str, str]) -> str:
    base = slot.rstrip("2")
    if base == _NEG:
        return rng.choice(["", "not "])
    if base in _OPPOSITES:
        return rng.choice(rng.choice(_OPPOSITES[base]))
    options = [v for v in _POOLS[base] if v not in taken.values()]
    return rng.choice(options)


def _opposite(slot: str, value: str, rng: random.Random, taken: dict[str, str]) -> str:
    base = slot.rstrip("2")
    if base == _NEG:
        return "" if value else "not "
    if base in _OPPOSITES:
        for x, y in _OPPOSITES[base]:
            if value in (x, y):
                return y if value == x else x
    if base in ("number", "year", "daynum") and rng.random() < 0.5:  # a close number is the hard case
        near = [str(int(value) + d) for d in (-2, -1, 1, 2) if str(int(value) + d) not in taken.values()]
        if near:
            return rng.choice(near)
    return rng.choice([v for v in _POOLS[base] if v != value and v not in taken.values()])


def _render(phrasing: str, values: dict[str, str]) -> str:
    text = _SLOT.sub(lambda m: values[m.group(1) + m.group(2)], phrasing)
    return text[0].upper() + text[1:]


def _typo(text: str, rng: random.Random, protected: set[str]) -> str | None:
    words = [m for m in re.finditer(r"[A-Za-z]{5,}", text) if m.group() not in protected]
    if not words:
        return None
    m = rng.choice(words)
    w, i = m.group(), rng.randrange(1, len(m.group()) - 2)
    swapped = w[:i] + w[i + 1] + w[i] + w[i + 2:]
    return None if swapped == w else text[:m.start()] + swapped + text[m.end():]


def _surface(text: str, rng: random.Random) -> str:
    choice = rng.randrange(3)
    if choice == 0:
        return text.lower().rstrip("?.!")
    if choice == 1:
        return rng.choice(_WRAPPERS).format(x=text)
    return text.rstrip("?.!") + rng.choice(["??", " ?", "", "!"])


def labeled_pairs(seed: int = 0, per_template: int = 40) -> list[Pair]:
    """About `per_template` pairs from each template, half same-answer, half near-misses."""
    rng = random.Random(f"costopt.cache.pairs:{seed}")
    out: list[Pair] = []
    for index, phrasings in enumerate(_TEMPLATES):
        slots = _slot_types(phrasings[0])
        for k in range(per_template):
            values: dict[str, str] = {}
            for slot in slots:
                values[slot] = _draw(slot, rng, values)
            a_phr = rng.choice(phrasings)
            a = _render(a_phr, values)
            if k % 2 == 0:  # same answer
                kind = SAME_KINDS[(k // 2) % len(SAME_KINDS)]
                if kind == "paraphrase" and len(phrasings) > 1:
                    b = _render(rng.choice([p for p in phrasings if p != a_phr]), values)
                elif kind == "typo":
                    b = _typo(a, rng, protected=set(" ".join(values.values()).split())) or _surface(a, rng)
                else:
                    kind, b = "surface", _surface(a, rng)
                out.append(Pair(a, b, True, kind, index))
            else:  # near miss: one slot changed, and half the time the phrasing too
                slot = rng.choice(slots)
                changed = dict(values)
                if slot.endswith("2") and _KIND_OF_SLOT[slot[:-1]] == "entity" and rng.random() < 0.5:
                    changed[slot], changed[slot[:-1]] = values[slot[:-1]], values[slot]  # two places swapped
                    kind = "direction"
                else:
                    others = {s: v for s, v in values.items() if s != slot}
                    changed[slot] = _opposite(slot, values[slot], rng, others)
                    kind = _KIND_OF_SLOT[slot.rstrip("2")]
                b_phr = rng.choice(phrasings) if rng.random() < 0.5 else a_phr
                b = _render(b_phr, changed)
                if b != a:
                    out.append(Pair(a, b, False, kind, index))
    return out


def templates() -> list[list[str]]:
    """The templates' phrasings (for tests: every phrasing of one template carries the same slots)."""
    return [list(p) for p in _TEMPLATES]


def slot_names(phrasing: str) -> list[str]:
    return _slot_types(phrasing)


def split_pairs(pairs: list[Pair]) -> tuple[list[Pair], list[Pair]]:
    """(fit, held): even templates fit, odd ones are held out."""
    return [p for p in pairs if p.template % 2 == 0], [p for p in pairs if p.template % 2 == 1]

