"""Held-out evaluation data, built from word lists in this file: no download, a pure function of a seed.

Five sets, each a list of JSON-ready dicts in the shapes of `docs/artifacts.md`:
- chat prompts (`chat_pool`): templates x topics and the style families of `costopt.evaluation.chatstyles`
  (natural questions, terse queries, format constraints, long reading prompts, follow-up turns, other
  languages), split into a held-out set and a calibration set that share no prompt (`split_prompts`;
  `check_disjoint` raises if they ever do);
- the crosscheck set: short factual questions composed from fact tables (`costopt.evaluation.factual`),
  a second held-out set written unlike the pool the calibration set comes from;
- text passages for perplexity, 60-120 words of ordinary prose composed from a sentence library;
- labeled multiple-choice items in several families, scored by log-likelihood as lm-eval does
  (`costopt.evaluation.taskscore`): the context has no trailing space, every choice starts with one.

Every generator takes a seed and counts and uses its own `random.Random`, so one seed gives
byte-identical files (`to_jsonl`) and nothing touches the global random state.

    sets = build_sets(EvalDataParams(seed=1234))
    sets["tasks"][0]  # {"id": "q0000", "family": "capitals", "context": ..., "choices": [...], "answer": 2}
"""
from __future__ import annotations

import json
import random
import re
from typing import Any, Callable, Iterable

from costopt.evaluation.chatstyles import style_families
from costopt.evaluation.factual import question_families
from costopt.params import EvalDataParams, ParamsError

GENERATOR_VERSION = 3  # 2: calibration prompts carry fp32 answers; 3: style families, the crosscheck set; bump when any list or template changes: it invalidates cached data sets

Row = dict[str, Any]


def _rng(seed: int, name: str) -> random.Random:
    # str seeds hash with sha512 (not PYTHONHASHSEED), so each set's stream is stable across runs
    return random.Random(f"costopt.evaluation.evaldata:{seed}:{name}")


def _words(text: str) -> list[str]:
    return [w.replace("_", " ") for w in text.split()]


def _interleave(pools: dict[str, list[Any]], rng: random.Random) -> list[tuple[str, Any]]:
    """Shuffle each pool, then take one from each family in turn, so any prefix is a balanced mix."""
    queues = {name: rng.sample(pool, len(pool)) for name, pool in sorted(pools.items())}
    order = rng.sample(sorted(queues), len(queues))
    out: list[tuple[str, Any]] = []
    while any(queues.values()):
        for name in order:
            if queues[name]:
                out.append((name, queues[name].pop()))
    return out


# ---------------------------------------------------------------- chat prompts

_PROMPT_FAMILIES: dict[str, tuple[list[str], list[str]]] = {
    "explain": (
        ["Explain {x} in simple terms.", "What is {x}? Answer in two sentences.",
         "Describe {x} to a ten-year-old.", "Write three facts about {x}."],
        ["photosynthesis", "the water cycle", "rainbows", "vaccines", "compound interest", "solar panels",
         "electric motors", "the immune system", "refrigerators", "gravity", "volcanoes", "the internet",
         "batteries", "recycling", "the phases of the moon", "compasses", "inflation", "earthquakes",
         "tides", "bread yeast", "honey bees", "clouds"]),
    "creative": (
        ["Write a short poem about {x}.", "Write a haiku about {x}.", "Tell a short story about {x}.",
         "Describe {x} in three sentences."],
        ["the ocean", "a rainy day", "an old lighthouse", "a lost cat", "autumn leaves", "a busy city",
         "the first snow", "a friendly robot", "a mountain village", "a quiet library", "a summer festival",
         "a broken clock", "a vegetable garden", "the night sky", "a long train journey", "a paper boat"]),
    "advice": (
        ["Give three tips for {x}.", "How can I get better at {x}?", "What are common mistakes when {x}?"],
        ["learning a new language", "saving money", "sleeping well", "cooking rice", "running a marathon",
         "writing an essay", "planting tomatoes", "studying for exams", "staying focused at work",
         "public speaking", "taking photos with a phone", "keeping a houseplant alive", "packing for a trip",
         "making new friends", "learning to swim", "drawing portraits", "managing stress", "baking bread"]),
    "compare": (
        ["What is the difference between {x}?", "Compare {x} in two sentences."],
        ["weather and climate", "a virus and a bacterium", "a lake and a sea", "a cold and the flu",
         "speed and velocity", "a democracy and a monarchy", "RAM and a hard drive", "a frog and a toad",
         "baking soda and baking powder", "an alligator and a crocodile", "a poem and a song",
         "a loan and a grant", "a meteor and a comet", "rent and a mortgage", "a city and a town",
         "tea and coffee", "a violin and a cello", "a hurricane and a tornado", "a stock and a bond",
         "email and a letter"]),
    "coding": (
        ["Write a Python function that {x}.", "Write a JavaScript function that {x}.",
         "Explain how to write code that {x}."],
        ["reverses a string", "checks if a number is prime", "counts the vowels in a word",
         "returns the largest item in a list", "converts Celsius to Fahrenheit",
         "removes duplicates from a list", "computes the factorial of n", "checks if a word is a palindrome",
         "sums the even numbers in a list", "sorts a list of names", "finds the average of a list",
         "counts the words in a sentence", "merges two sorted lists", "capitalizes every word"]),
    "rewrite": (
        ['Rewrite this sentence more formally: "{x}"', 'Fix the grammar in this sentence: "{x}"',
         'Translate into French: "{x}"', 'Summarize in five words: "{x}"'],
        ["the meeting got moved to next week cause the boss is sick", "i cant find my keys anywhere",
         "we goes to the park every sunday", "this phone is way too expensive for what it does",
         "she dont like waiting in long lines", "the pizza was cold but the staff was nice",
         "can you send me the report by friday", "my brother have three dogs and a cat",
         "the train was late again this morning", "thanks a lot for helping me move house",
         "they was happy with the new office", "the kids is playing outside in the snow",
         "our team won the game last night", "please close the window when you leave",
         "he forgot his umbrella at the cafe"]),
    "people": (
        ["Who was {x}?", "What is {x} best known for?", "Write a short biography of {x}."],
        ["Marie Curie", "Isaac Newton", "Ada Lovelace", "Leonardo da Vinci", "Nelson Mandela",
         "Albert Einstein", "Cleopatra", "Charles Darwin", "Frida Kahlo", "Galileo Galilei",
         "Mahatma Gandhi", "William Shakespeare", "Jane Austen", "Nikola Tesla", "Rosa Parks", "Confucius"]),
    "brainstorm": (
        ["List five {x}.", "Name three {x} and describe each in one sentence.", "Suggest some {x}."],
        ["healthy breakfast ideas", "uses for a paper clip", "names for a pet goldfish",
         "board games for families", "ways to reduce plastic waste", "indoor activities for a rainy day",
         "questions to ask in a job interview", "gifts for a teacher", "vegetables that grow in shade",
         "ideas for a birthday party", "habits of good students", "weekend hobbies for beginners",
         "cheap dinner recipes", "ways to save electricity"]),
    "classify": (
        ['Is the sentiment of this review positive or negative? "{x}"',
         'Does this message sound happy, angry or neutral? "{x}"'],
        ["The food was delicious and the waiter was very kind.", "I waited an hour and nobody helped me.",
         "The hotel room was clean, quiet and cheap.", "This blender broke after two days.",
         "Great battery life, I charge it once a week.", "The movie was boring and far too long.",
         "Fast delivery and the shoes fit perfectly.", "The app crashes every time I open it.",
         "Lovely little cafe with friendly staff.", "The package arrived damaged and wet.",
         "Best concert I have been to in years.", "The instructions were confusing and incomplete."]),
    "email": (
        ["Write a short email to {x}."],
        [f"{who} about {what}" for who in ("my manager", "my landlord", "a teacher", "a customer",
                                            "a neighbor")
         for what in ("a late delivery", "a broken heater", "taking a day off", "a schedule change",
                      "a noisy party")]),
}

_MATH_TEMPLATES: list[tuple[str, Callable[[random.Random], dict[str, int]]]] = [
    ("If I have {a} apples and buy {b} more, how many apples do I have?",
     lambda r: {"a": r.randint(2, 40), "b": r.randint(2, 40)}),
    ("A train travels {a} km in {b} hours. What is its average speed?",
     lambda r: {"a": r.randint(6, 60) * 10, "b": r.randint(2, 6)}),
    ("What is {a} times {b}? Show your work.", lambda r: {"a": r.randint(3, 30), "b": r.randint(3, 30)}),
    ("A shirt costs {a} dollars and is {b} percent off. What is the new price?",
     lambda r: {"a": r.randint(10, 90), "b": r.choice([10, 20, 25, 30, 50])}),
    ("Solve for x: x + {a} = {b}.", lambda r: {"a": r.randint(2, 50), "b": r.randint(51, 120)}),
    ("A class has {a} students split into groups of {b}. How many groups are there?",
     lambda r: {"b": (b := r.randint(2, 6)), "a": b * r.randint(3, 9)}),
]
_MATH_PER_TEMPLATE = 30  # distinct numeric fillings per math template


def _math_prompts(seed: int) -> list[str]:
    rng = _rng(seed, "math-prompts")
    out: list[str] = []
    for template, fill in _MATH_TEMPLATES:
        seen: set[str] = set()
        while len(seen) < _MATH_PER_TEMPLATE:
            seen.add(template.format(**fill(rng)))
        out.extend(sorted(seen))
    return out


def prompt_pool(seed: int) -> list[tuple[str, str]]:
    """Every distinct single-turn (family, prompt) of the template families, in a seeded, family-balanced
    order. The serving trace (`costopt.workload.trace`) draws from this pool and its paraphrase rules are
    written for it, so it keeps the template families only; the held-out and calibration sets draw from
    `chat_pool`, which adds the other styles."""
    pools = {fam: [t.format(x=x) for t in templates for x in topics]
             for fam, (templates, topics) in _PROMPT_FAMILIES.items()}
    pools["math"] = _math_prompts(seed)
    return _interleave(pools, _rng(seed, "prompts"))


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def _user_text(row: Row) -> str:
    return " ".join(m["content"] for m in row["messages"] if m["role"] == "user")


def check_disjoint(held_out: Iterable[Row], calibration: Iterable[Row]) -> None:
    """Raise ValueError if any calibration prompt equals a held-out prompt (case and spacing ignored)."""
    seen = {_normalize(_user_text(r)): r["id"] for r in held_out}
    clash = [(r["id"], seen[_normalize(_user_text(r))]) for r in calibration
             if _normalize(_user_text(r)) in seen]
    if clash:
        cal_id, held_id = clash[0]
        raise ValueError(f"evaldata.calibration: {len(clash)} calibration prompt(s) also appear in the "
                         f"held-out prompts (first: {cal_id} = {held_id}); calibration data must be "
                         f"disjoint from evaluation data")


def chat_pool(seed: int) -> list[tuple[str, list[dict[str, str]]]]:
    """Every distinct (family, conversation) for the held-out and calibration prompts, family-balanced:
    the template families of `prompt_pool` and the style families of `costopt.evaluation.chatstyles`
    (questions, terse, format constraints, long reading prompts, follow-up turns, other languages)."""
    pools: dict[str, list[Any]] = {}
    for fam, text in prompt_pool(seed):
        pools.setdefault(fam, []).append([{"role": "user", "content": text}])
    pools.update(style_families())
    return _interleave(pools, _rng(seed, "chat-prompts"))


def split_prompts(seed: int, held_out: int, calibration: int) -> tuple[list[Row], list[Row]]:
    """(held-out prompts `p0000..`, calibration prompts `c0000..`), disjoint, from one seeded pool."""
    pool = chat_pool(seed)
    if held_out + calibration > len(pool):
        raise ParamsError(f"evaldata.prompts + evaldata.calibration = {held_out + calibration} exceeds the "
                          f"{len(pool)} distinct prompts the generator can build; lower one of them")
    # Deal the family-balanced pool to both sides in proportion (whichever side is further behind its
    # count takes the next prompt), so a small family (a dozen reading prompts) lands on both sides
    # instead of being used up by the held-out set.
    held_rows: list[Row] = []
    cal_rows: list[Row] = []
    for fam, messages in pool[:held_out + calibration]:
        side = held_rows if len(held_rows) * calibration <= len(cal_rows) * held_out else cal_rows
        if len(side) == (held_out if side is held_rows else calibration):
            side = cal_rows if side is held_rows else held_rows
        side.append({"family": fam, "messages": messages})
    held = [{"id": f"p{i:04d}", **r} for i, r in enumerate(held_rows)]
    cal = [{"id": f"c{i:04d}", **r} for i, r in enumerate(cal_rows)]
    check_disjoint(held, cal)
    return held, cal


def crosscheck_questions(seed: int, n: int) -> list[Row]:
    """The second held-out set (`costopt.evaluation.factual`): `n` short factual questions `x0000..`,
    written unlike any prompt of `chat_pool`."""
    rng = _rng(seed, "crosscheck")
    pool = _interleave(question_families(rng), rng)
    if n > len(pool):
        raise ParamsError(f"evaldata.crosscheck = {n} exceeds the {len(pool)} distinct questions the "
                          f"crosscheck set can build; lower it")
    return [{"id": f"x{i:04d}", "family": fam, "messages": [{"role": "user", "content": text}]}
            for i, (fam, text) in enumerate(pool[:n])]


# ---------------------------------------------------------------- perplexity passages

_PROSE: dict[str, list[str]] = {
    "rivers": [
        "Most rivers begin as small streams high in the hills, fed by rain and melting snow.",
        "As the water flows downhill, it joins other streams and slowly grows wider and deeper.",
        "Over thousands of years, a river can carve a deep valley through solid rock.",
        "Many early towns were built beside rivers, because the water was used for drinking and farming.",
        "Boats carried grain, wood and stone along the water long before there were roads or railways.",
        "Near the sea, a river often slows down and drops the mud and sand it has carried.",
        "This soft ground forms a delta, which is usually very good land for growing crops.",
        "Today many rivers are protected, since factories and farms once polluted them badly.",
        "Fish such as salmon swim up the river each year to lay their eggs in shallow water.",
        "A single flood can change the shape of a river bank in just a few days."],
    "bread": [
        "Bread is one of the oldest prepared foods, and people have baked it for thousands of years.",
        "The basic recipe needs only flour, water, salt and a little yeast.",
        "Yeast feeds on the sugars in the flour and releases gas, which makes the dough rise.",
        "Kneading the dough stretches the gluten and gives the bread its chewy texture.",
        "After the first rise, the baker shapes the loaf and leaves it to rest again.",
        "A hot oven turns the outside into a brown crust while the inside stays soft.",
        "Some bakers still use a sourdough starter instead of dried yeast from a packet.",
        "A good loaf should sound hollow when you tap the bottom of it.",
        "Fresh bread tastes best on the day it is made, but it also freezes well.",
        "In many countries, bread is shared at almost every meal of the day."],
    "bees": [
        "Honey bees live together in large colonies that can hold tens of thousands of insects.",
        "Each colony has a single queen, whose main job is to lay eggs.",
        "Worker bees collect nectar and pollen from flowers during the warm months.",
        "When a bee finds a rich patch of flowers, it performs a small dance to guide the others.",
        "Back in the hive, the nectar is slowly turned into honey and stored in wax cells.",
        "While visiting flowers, bees carry pollen from one plant to the next.",
        "This helps many fruits and vegetables to grow, so farmers depend on healthy bees.",
        "In winter, the bees cluster together and shiver to keep the hive warm.",
        "A strong colony can make far more honey than it needs to survive the cold season.",
        "Beekeepers wear light clothing and move slowly so that the bees stay calm."],
    "weather": [
        "Weather describes the conditions in the air at one place and one time.",
        "It can change quickly, and a sunny morning may turn into a stormy afternoon.",
        "Clouds form when warm, moist air rises and cools until the water vapor condenses.",
        "When the droplets in a cloud grow heavy enough, they fall to the ground as rain.",
        "Wind is simply air moving from areas of high pressure to areas of low pressure.",
        "Forecasters use satellites, balloons and computer models to predict the next few days.",
        "A forecast is usually quite accurate for tomorrow but much less certain for next week.",
        "Thunder is the sound made by air that is heated suddenly by a flash of lightning.",
        "In cold weather, rain may freeze into snow or small pellets of ice.",
        "Farmers, pilots and sailors all pay close attention to changes in the weather."],
    "libraries": [
        "A public library lends books to anyone who lives in the area, usually for free.",
        "Most libraries also offer newspapers, films, music and access to computers.",
        "Librarians help visitors find information and choose books they might enjoy.",
        "Many libraries run reading groups for children during the school holidays.",
        "Old libraries were often quiet places, but modern ones can be busy and lively.",
        "Some rare books are kept in special rooms where the air is cool and dry.",
        "People who cannot visit in person can often borrow electronic books from home.",
        "A small town library may be one of the few free, warm places to sit and read.",
        "Libraries also keep local records, such as old maps, letters and photographs.",
        "Returning books on time means that other readers can enjoy them as well."],
    "trains": [
        "The first passenger railways opened about two hundred years ago.",
        "Early trains were pulled by steam engines that burned coal to boil water.",
        "Railways made it possible to travel between cities in hours rather than days.",
        "Towns along the new lines grew quickly, while others were left behind.",
        "Modern electric trains are quiet, fast and produce little pollution where they run.",
        "Some high speed trains can travel at more than three hundred kilometers an hour.",
        "Freight trains carry heavy loads such as coal, grain, cars and shipping containers.",
        "A signal system keeps trains apart so that they never share the same section of track.",
        "Many people enjoy long train journeys because they can read or watch the view.",
        "Old railway stations are often grand buildings with high glass roofs."],
    "gardens": [
        "A small garden can produce a surprising amount of food during one summer.",
        "Most vegetables need at least six hours of direct sunlight each day.",
        "Good soil is dark and crumbly, and it holds water without becoming muddy.",
        "Adding compost every spring feeds the soil and helps plants grow strong roots.",
        "Seeds are usually planted in rows so that weeds are easier to spot and remove.",
        "Tomatoes, beans and lettuce are popular choices for a first vegetable garden.",
        "Watering early in the morning gives plants a drink before the heat of the day.",
        "Birds and insects can be helpful, since many of them eat garden pests.",
        "At the end of the season, the old plants can be chopped up and added to the compost.",
        "Gardening is also good exercise and a calm way to spend an afternoon."],
    "sleep": [
        "Adults usually need between seven and nine hours of sleep every night.",
        "During sleep, the body repairs muscles and the brain sorts the events of the day.",
        "Sleep comes in cycles that each last about an hour and a half.",
        "Dreams happen mostly during one stage of sleep, when the eyes move quickly.",
        "Bright screens late in the evening can make it harder to fall asleep.",
        "Going to bed at the same time each night helps the body keep a steady rhythm.",
        "A cool, dark and quiet room is the best place to get a good night's rest.",
        "Too little sleep can make people forgetful, slow and easily annoyed.",
        "Young children and teenagers need more sleep than most adults.",
        "A short nap after lunch can improve attention for the rest of the afternoon."],
    "markets": [
        "Every Saturday morning the town square fills with stalls for the weekly market.",
        "Farmers bring fresh eggs, cheese, fruit and vegetables from the nearby villages.",
        "Prices are often lower than in shops, especially late in the day.",
        "Some stalls sell handmade goods, such as soap, candles, baskets and wooden toys.",
        "The smell of fresh coffee and warm bread drifts across the square.",
        "Many shoppers bring their own bags and baskets to carry what they buy.",
        "Talking with the sellers is part of the fun, and they often share cooking tips.",
        "Markets like this have been held in the same place for hundreds of years.",
        "By early afternoon the stalls are packed away and the square is quiet again.",
        "Buying local food also supports small farms in the region."],
    "oceans": [
        "Oceans cover about seventy percent of the surface of the Earth.",
        "The water is salty because rivers carry minerals from the land into the sea.",
        "Sunlight reaches only the top few hundred meters, so the deep ocean is completely dark.",
        "Strange animals live in the deep water, and many of them make their own light.",
        "Ocean currents carry warm water from the tropics toward the colder regions.",
        "The tides rise and fall twice a day because of the pull of the moon.",
        "Coral reefs are home to a huge variety of colorful fish and other creatures.",
        "Whales are the largest animals on the planet, yet many of them eat tiny shrimp.",
        "Plastic waste is a growing problem, since it breaks into small pieces that never disappear.",
        "Scientists still know more about the surface of the moon than about the deep sea floor."],
    "bicycles": [
        "The bicycle is one of the most efficient ways for a person to travel.",
        "A rider can cover several kilometers in the time it takes to walk just one.",
        "The chain carries power from the pedals to the back wheel.",
        "Gears let the rider pedal comfortably on steep hills and on flat roads.",
        "Many cities have built separate lanes so that cyclists can ride safely.",
        "Cycling to work is cheap, quiet and good for the heart.",
        "A bicycle needs little care beyond air in the tires and oil on the chain.",
        "Riders should wear a helmet and use lights when it gets dark.",
        "Some families go on long cycling holidays, carrying tents and bags on their bikes.",
        "Folding bicycles can be taken on buses and trains and stored under a desk."],
    "mountains": [
        "Mountains form over millions of years as the plates of the Earth push against each other.",
        "The air gets colder and thinner as you climb higher up a mountain.",
        "Near the top of tall peaks, snow can stay on the ground all year round.",
        "Trees stop growing above a certain height, which is called the tree line.",
        "Goats and other sure-footed animals can climb rocky slopes with ease.",
        "Many rivers start as melting snow high in the mountains.",
        "Walkers should carry warm clothes, because the weather can change very quickly.",
        "Mountain villages are often built on sunny slopes that face south.",
        "In winter, some mountains become busy with people who come to ski.",
        "From the summit on a clear day, the view can stretch for a hundred kilometers."],
}
_PASSAGE_WORDS = (60, 120)  # words per perplexity passage, inclusive


def ppl_passages(seed: int, n: int) -> list[Row]:
    """`n` distinct passages (`t0000..`) of 60-120 words, each a few sentences of one topic, in order."""
    rng = _rng(seed, "ppl")
    topics = rng.sample(sorted(_PROSE), len(_PROSE))
    out: list[Row] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ParamsError(f"evaldata.ppl_texts = {n}: the sentence library cannot make that many "
                              f"distinct passages; lower it")
        sentences = _PROSE[topics[len(out) % len(topics)]]
        picks = sorted(rng.sample(range(len(sentences)), rng.randint(5, 8)))
        text = _fit_words([sentences[i] for i in picks])
        if text and text not in seen:
            seen.add(text)
            out.append({"id": f"t{len(out):04d}", "text": text})
    return out


def _fit_words(sentences: list[str]) -> str | None:
    """Join sentences, dropping from the end past the word budget; None if it stays too short."""
    lo, hi = _PASSAGE_WORDS
    while sentences and sum(len(s.split()) for s in sentences) > hi:
        sentences = sentences[:-1]
    return " ".join(sentences) if sum(len(s.split()) for s in sentences) >= lo else None


# ---------------------------------------------------------------- multiple-choice tasks

_CAPITALS = dict(pair.split(":") for pair in _words(
    "France:Paris Germany:Berlin Italy:Rome Spain:Madrid Japan:Tokyo China:Beijing Russia:Moscow "
    "Egypt:Cairo England:London Greece:Athens Portugal:Lisbon Austria:Vienna Ireland:Dublin "
    "Norway:Oslo Sweden:Stockholm Denmark:Copenhagen Finland:Helsinki Poland:Warsaw Hungary:Budapest "
    "Belgium:Brussels Netherlands:Amsterdam Thailand:Bangkok Kenya:Nairobi Peru:Lima Cuba:Havana "
    "Mexico:Mexico_City Argentina:Buenos_Aires Canada:Ottawa Australia:Canberra India:New_Delhi "
    "Turkey:Ankara Iran:Tehran Iraq:Baghdad Israel:Jerusalem Vietnam:Hanoi Indonesia:Jakarta "
    "Chile:Santiago Colombia:Bogota Venezuela:Caracas Ukraine:Kyiv Scotland:Edinburgh Wales:Cardiff "
    "Switzerland:Bern Philippines:Manila Korea:Seoul Nigeria:Abuja Ethiopia:Addis_Ababa "
    "Morocco:Rabat Afghanistan:Kabul Pakistan:Islamabad Lebanon:Beirut Syria:Damascus"))

_ANTONYMS = [tuple(p.split(":")) for p in (
    "hot:cold big:small tall:short fast:slow happy:sad light:dark open:closed early:late full:empty "
    "hard:soft rich:poor old:young wet:dry up:down in:out left:right day:night black:white "
    "strong:weak high:low long:short thick:thin clean:dirty loud:quiet cheap:expensive true:false "
    "win:lose push:pull buy:sell first:last heavy:light north:south east:west good:bad "
    "inside:outside above:below love:hate arrive:leave friend:enemy question:answer "
    "begin:end remember:forget awake:asleep alive:dead sweet:sour wide:narrow deep:shallow "
    "safe:dangerous").split()]
# words close enough in meaning that one must not be a distractor when the other is the answer
_NEAR = [set(g.split()) for g in ("up above high", "down below low", "in inside", "out outside",
                                   "true right good", "false bad", "hard difficult", "end last",
                                   "begin first", "leave lose", "dark black", "light white")]

_CATEGORIES: dict[str, list[str]] = {  # mutually exclusive, so no distractor is also right
    "animal": _words("a_dog a_horse a_cow a_lion a_tiger an_elephant a_rabbit a_monkey a_sheep a_wolf"),
    "fruit": _words("an_apple a_banana an_orange a_pear a_grape a_lemon a_cherry a_peach a_mango a_plum"),
    "vegetable": _words("a_carrot a_potato an_onion a_cabbage a_leek a_turnip a_radish a_cucumber"),
    "vehicle": _words("a_car a_bus a_truck a_bicycle a_train a_motorcycle a_van a_tractor"),
    "tool": _words("a_hammer a_saw a_screwdriver a_wrench a_drill a_shovel a_chisel a_rake"),
    "instrument": _words("a_piano a_guitar a_violin a_drum a_flute a_trumpet a_harp a_cello"),
    "flower": _words("a_rose a_tulip a_daisy a_lily a_sunflower an_orchid a_poppy a_violet"),
    "drink": _words("tea coffee milk juice lemonade cocoa soda"),
}

# (context, answer, three distractors) written by hand: everyday facts a small model should know
_FACTS = [tuple(line.split("|")) for line in """\
The sun rises in the|east|west|north|south
Ice is frozen|water|milk|sand|glass
Cows give us|milk|wool|eggs|honey
Bees make|honey|milk|wool|silk
Hens lay|eggs|milk|wool|honey
A week has seven|days|hours|years|months
A year has twelve|months|days|weeks|hours
We see with our|eyes|ears|hands|feet
We hear with our|ears|eyes|hands|feet
We smell with our|nose|ears|eyes|feet
Fish live in|water|trees|sand|clouds
Birds fly with their|wings|legs|tails|beaks
The color of grass is|green|red|blue|purple
The color of the sky on a clear day is|blue|green|red|brown
The color of snow is|white|black|green|red
The color of a ripe banana is|yellow|blue|black|purple
Rain falls from the|clouds|ground|trees|sea
At night we can see the moon and the|stars|sun|rainbow|clouds
To cut paper we use|scissors|spoons|pillows|shoes
We write on paper with a|pen|fork|spoon|cup
Soup is eaten with a|spoon|knife|hammer|comb
Teeth are cleaned with a|toothbrush|hammer|pillow|spoon
A doctor works in a|hospital|bakery|farm|garage
A teacher works in a|school|hospital|farm|bakery
A pilot flies a|plane|boat|car|train
Books are borrowed from a|library|bank|bakery|garage
Money is kept in a|bank|library|school|park
Bread is baked in the|oven|fridge|bath|box
Food stays cold in the|fridge|oven|sun|fire
We sleep in a|bed|bath|car|box
Fire is very|hot|cold|wet|soft
When it rains we use an|umbrella|oven|pillow|engine
Water boils when it is very|hot|cold|dark|quiet
A baby dog is called a|puppy|kitten|calf|foal
A baby cat is called a|kitten|puppy|calf|chick
A spider has eight|legs|wings|eyes|heads
Summer is warmer than|winter|June|July|August
We use a key to open a|door|book|tree|cloud
The planet we live on is called|Earth|Mars|Venus|Jupiter
A triangle has three|sides|legs|corners|circles
Shoes are worn on the|feet|hands|head|ears
A hat is worn on the|head|feet|hands|knees
Gloves are worn on the|hands|feet|head|ears
Sugar tastes|sweet|sour|salty|bitter
Lemons taste|sour|sweet|salty|soft
A clock tells the|time|weather|news|way
Plants need sunlight and|water|sand|plastic|smoke
Ships sail on the|sea|road|sky|mountain
The sun is a|star|planet|moon|comet""".splitlines()]

_NUMBER_WORDS = _words("one two three four five six seven eight nine ten eleven twelve")
_DAYS = _words("Monday Tuesday Wednesday Thursday Friday Saturday Sunday")
_MONTHS = _words("January February March April May June July August September October November December")


def _item(rng: random.Random, family: str, context: str, answer: str, wrong: list[str]) -> Row:
    """One lm-eval style item: the answer shuffled among the distractors, each choice with a leading space."""
    choices = [answer] + wrong
    if len(set(choices)) != len(choices):
        raise ValueError(f"evaldata.tasks: duplicate choices {choices} for {context!r}")
    rng.shuffle(choices)
    return {"family": family, "context": context, "choices": [f" {c}" for c in choices],
            "answer": choices.index(answer)}


def _arithmetic(rng: random.Random) -> list[Row]:
    items = []
    for a in range(1, 10):
        for b in range(1, 10):
            plus = a + b
            wrong = rng.sample([x for x in range(2, 19) if x != plus], 3)
            items.append(_item(rng, "arithmetic", f"Question: What is {a} plus {b}?\nAnswer:",
                               str(plus), [str(x) for x in wrong]))
    return items


def _capitals(rng: random.Random) -> list[Row]:
    cities = sorted(_CAPITALS.values())
    return [_item(rng, "capitals", f"The capital city of {country} is", city,
                  rng.sample([c for c in cities if c != city], 3))
            for country, city in sorted(_CAPITALS.items())]


def _antonyms(rng: random.Random) -> list[Row]:
    pairs = _ANTONYMS + [(b, a) for a, b in _ANTONYMS]
    vocab = sorted({w for p in pairs for w in p})
    items, seen = [], set()
    for word, opposite in pairs:
        if word in seen:  # "short" has two opposites; keep one item per cue word
            continue
        seen.add(word)
        partners = {b for a, b in pairs if a == word} | {word}
        partners |= {w for group in _NEAR if group & partners for w in group}
        wrong = rng.sample([w for w in vocab if w not in partners], 3)
        items.append(_item(rng, "antonyms", f"The opposite of {word} is", opposite, wrong))
    return items


def _categories(rng: random.Random) -> list[Row]:
    items = []
    for cat, members in sorted(_CATEGORIES.items()):
        others = [c for c in sorted(_CATEGORIES) if c != cat]
        for member in members:
            items.append(_item(rng, "categories", f"{member[0].upper() + member[1:]} is a kind of", cat,
                               rng.sample(others, 3)))
    return items


def _facts(rng: random.Random) -> list[Row]:
    return [_item(rng, "facts", context, answer, list(wrong)) for context, answer, *wrong in _FACTS]


def _sequences(rng: random.Random) -> list[Row]:
    items = []
    for start in range(1, 13):
        for step in (1, 2, 3, 5, 10):
            seq = [start + step * k for k in range(5)]
            nxt = seq[-1] + step
            wrong = sorted({nxt + d for d in (-step - 1, -1, 1, step, step + 1, 2 * step)} - {nxt, seq[-1]})
            items.append(_item(rng, "sequences", ", ".join(map(str, seq)) + ",", str(nxt),
                               [str(x) for x in rng.sample(wrong, 3)]))
    for names, cyclic in ((_NUMBER_WORDS, False), (_DAYS, True), (_MONTHS, True)):
        for i in range(len(names) if cyclic else len(names) - 3):  # days and months wrap around
            shown = [names[(i + k) % len(names)] for k in range(3)]
            nxt = names[(i + 3) % len(names)]
            wrong = rng.sample([w for w in names if w != nxt and w not in shown], 3)
            items.append(_item(rng, "sequences", ", ".join(shown) + ",", nxt, wrong))
    return items


TASK_FAMILIES: dict[str, Callable[[random.Random], list[Row]]] = {
    "arithmetic": _arithmetic, "antonyms": _antonyms, "capitals": _capitals,
    "categories": _categories, "facts": _facts, "sequences": _sequences,
}


def task_items(seed: int, n: int) -> list[Row]:
    """`n` items (`q0000..`) drawn evenly across TASK_FAMILIES until a family runs out."""
    rng = _rng(seed, "tasks")
    pools = {fam: build(rng) for fam, build in TASK_FAMILIES.items()}
    total = sum(len(p) for p in pools.values())
    if n > total:
        raise ParamsError(f"evaldata.task_items = {n} exceeds the {total} distinct items the task "
                          f"families can build; lower it")
    picked = _interleave(pools, rng)[:n]
    return [{"id": f"q{i:04d}", **item} for i, (_, item) in enumerate(picked)]


def build_sets(p: EvalDataParams) -> dict[str, list[Row]]:
    """The five sets of one params section: {"prompts", "crosscheck", "ppl", "calibration", "tasks"},
    without references."""
    held, cal = split_prompts(p.seed, p.prompts, p.calibration)
    cross = crosscheck_questions(p.seed, p.crosscheck)
    check_disjoint(cross, cal)
    return {"prompts": held, "crosscheck": cross, "ppl": ppl_passages(p.seed, p.ppl_texts), "calibration": cal,
            "tasks": task_items(p.seed, p.task_items)}


def to_jsonl(rows: Iterable[Row]) -> bytes:
    """One JSON object a line, keys in the order given, UTF-8: the bytes that are hashed and written."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
