"""The second held-out set ("crosscheck"): short factual questions, built unlike the calibration set.

The calibration prompts and the first held-out set come from one pool (`costopt.evaluation.evaldata.
chat_pool`): chat templates filled with topics, plus the style families. A quantizer calibrated on that
pool can look better on prompts from it than on prompts written another way; a reviewer's 60 short
factual questions cut GPTQ's measured gain over RTN from 2.29x to 1.78x. This set is written another
way: one short question per fact, composed from tables of facts (countries, units, animals, words,
the calendar, elements, planets, people, arithmetic) through question forms that appear nowhere in
the chat pool. `tasks.validate` reports every variant's quality on it next to the first set.

`costopt.evaluation.evaldata.crosscheck_questions(seed, n)` interleaves these families (each shuffled
by a seeded `random.Random`), so any prefix of the set is a balanced mix.
"""
from __future__ import annotations

import random

_CAPITAL_OF = ["France", "Japan", "Kenya", "Peru", "Canada", "Norway", "Egypt", "Chile", "Vietnam",
               "Poland", "Greece", "Mexico", "Turkey", "Ireland", "Thailand", "Argentina"]
_CAPITAL_FORMS = ["What is the capital of {x}?", "Which city is the capital of {x}?",
                  "Name the capital city of {x}."]

_UNITS = [("minutes", "hours"), ("seconds", "minutes"), ("hours", "days"), ("days", "weeks"),
          ("months", "years"), ("centimeters", "meters"), ("meters", "kilometers"), ("grams", "kilograms"),
          ("millimeters", "centimeters"), ("cups", "liters")]
_UNIT_FORMS = ["How many {small} are in {n} {big}?", "Convert {n} {big} to {small}."]

_ANIMALS = ["a spider", "an ant", "a horse", "a chicken", "a snake", "an octopus", "a kangaroo", "a penguin",
            "a bat", "a dolphin", "a camel", "an owl"]
_ANIMAL_FORMS = ["How many legs does {x} have?", "What does {x} eat?", "Where does {x} live?",
                 "Is {x} a mammal?"]

_WORDS = ["happy", "ancient", "generous", "narrow", "brave", "quiet", "smooth", "honest", "cheap", "fragile"]
_NOUNS = ["mouse", "child", "leaf", "tooth", "cactus", "goose", "knife", "person", "fish", "woman"]
_WORD_FORMS = [("What is the opposite of the word \"{x}\"?", _WORDS),
               ("Give a synonym for \"{x}\".", _WORDS),
               ("What is the plural of \"{x}\"?", _NOUNS)]

_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]
_CALENDAR_FORMS = [("What day comes after {x}?", _DAYS), ("Which month comes before {x}?", _MONTHS),
                   ("How many days are there in {x}?", _MONTHS)]

_ELEMENTS = ["gold", "iron", "oxygen", "sodium", "helium", "copper", "silver", "carbon", "lead", "neon"]
_PLANETS = ["Mercury", "Venus", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"]
_SCIENCE_FORMS = [("What is the chemical symbol for {x}?", _ELEMENTS),
                  ("Is {x} a metal or a gas at room temperature?", _ELEMENTS),
                  ("Which planet comes after {x} in order from the sun?", _PLANETS[:-1]),
                  ("Is {x} bigger or smaller than Earth?", _PLANETS)]

_PEOPLE = ["Marie Curie", "Isaac Newton", "Ada Lovelace", "Leonardo da Vinci", "Charles Darwin",
           "Frida Kahlo", "Galileo Galilei", "Nikola Tesla", "Jane Austen", "Confucius"]
_PEOPLE_FORMS = ["In which country was {x} born?", "In which century did {x} live?"]

_ARITHMETIC_FORMS = [("How much is {a} plus {b}?", 2, 99), ("What is {a} minus {b}?", 20, 99),
                     ("What do you get if you multiply {a} by {b}?", 2, 12),
                     ("What is half of {a}?", 10, 200)]
_PER_ARITHMETIC_FORM = 12
_PER_UNIT_FORM = 2


def _arithmetic(rng: random.Random) -> list[str]:
    out: list[str] = []
    for form, lo, hi in _ARITHMETIC_FORMS:
        seen: set[str] = set()
        while len(seen) < _PER_ARITHMETIC_FORM:
            a, b = rng.randint(lo, hi), rng.randint(lo, hi)
            a, b = max(a, b), min(a, b)  # "minus" stays non-negative
            seen.add(form.format(a=a * 2 if "half" in form else a, b=b))
        out.extend(sorted(seen))
    return out


def _units(rng: random.Random) -> list[str]:
    out = []
    for small, big in _UNITS:
        for form in _UNIT_FORMS:
            for n in rng.sample(range(2, 10), _PER_UNIT_FORM):
                out.append(form.format(small=small, big=big, n=n))
    return out


def question_families(rng: random.Random) -> dict[str, list[str]]:
    """Every question of each family; `rng` only picks the numbers of the arithmetic and unit forms."""
    return {
        "capitals": [f.format(x=x) for f in _CAPITAL_FORMS for x in _CAPITAL_OF],
        "units": _units(rng),
        "animals": [f.format(x=x) for f in _ANIMAL_FORMS for x in _ANIMALS],
        "words": [f.format(x=x) for f, xs in _WORD_FORMS for x in xs],
        "calendar": [f.format(x=x) for f, xs in _CALENDAR_FORMS for x in xs],
        "science": [f.format(x=x) for f, xs in _SCIENCE_FORMS for x in xs],
        "people": [f.format(x=x) for f in _PEOPLE_FORMS for x in _PEOPLE],
        "arithmetic": _arithmetic(rng),
    }
