"""Chat prompts in the styles the template families of `costopt.evaluation.evaldata` do not write.

The template families ("Explain {x} in simple terms.", ...) are one to two polite English sentences,
mostly instructions, one user turn each. Real traffic is wider; a reviewer's 60 short factual
questions moved GPTQ's gain over RTN from 2.29x to 1.78x. These families widen the held-out and
calibration prompts along the axes that moved it:
- `questions`: natural why/how/what questions on topics the templates never touch (history, health,
  money, sport, space, law, work);
- `terse`: lowercase, clipped, typo-ridden queries of three to eight words;
- `format`: instructions with an output constraint (one word, yes/no, JSON, a numbered list, a table,
  an exact sentence count);
- `reading`: a 45-90 word note (a memo, a review, a recipe, an e-mail) followed by a task about it, the
  long prompts;
- `dialog`: a second user turn after an earlier exchange (a follow-up, a correction, a change of
  mind): three-message conversations;
- `multilingual`: requests in Spanish, French, German, Italian and Portuguese.

Each family is a list of conversations (lists of {"role", "content"}), built from word lists written
here: no download, no randomness (the order is set by the caller's seeded interleave). None of the
reading notes is a sentence of the perplexity passages, so calibrating on them leaks nothing into that
held-out set.
"""
from __future__ import annotations

Conversation = list[dict[str, str]]


def _user(text: str) -> Conversation:
    return [{"role": "user", "content": text}]


_QUESTIONS = [
    "Why did the Roman Empire fall?", "How did people tell the time before clocks?",
    "What caused the First World War?", "Why were castles built on hills?",
    "How were the pyramids of Egypt built?", "What was the Silk Road?",
    "Why do we get a fever when we are sick?", "How much water should an adult drink each day?",
    "Is it bad to crack your knuckles?", "Why do muscles feel sore after exercise?",
    "How does caffeine keep people awake?", "Why do we yawn?",
    "How does a credit score work?", "Why do prices go up over time?",
    "What happens to money in a savings account?", "Is it better to rent or to buy a home?",
    "How is the winner of a tennis match decided?", "Why do football players wear shin guards?",
    "How long is a marathon and why?", "What does an offside rule mean in soccer?",
    "How far away is the moon?", "Why does Mars look red?", "How do astronauts sleep in space?",
    "What is a black hole?", "Why is Pluto no longer called a planet?",
    "What does a jury do in a trial?", "Why do countries have different driving sides?",
    "How does a patent protect an invention?", "What is the job of a mayor?",
    "How do I ask my boss for a raise?", "What should I put on a resume with no experience?",
    "Why do some people work better at night?", "How does a plane stay in the air?",
    "Why does bread go stale?", "Why is the sea salty but rivers are not?",
    "How do cats always land on their feet?", "Why do leaves change color in autumn?",
    "What makes a diamond so hard?", "How do noise cancelling headphones work?",
    "Why do onions make you cry?",
]

# (topic, casual forms): clipped, lowercase, sometimes misspelled, as people type into a chat box
_TERSE_TOPICS = ["photosynthesis", "tides", "inflation", "vaccines", "compound interest", "black holes",
                 "solar panels", "jet lag", "sourdough", "credit cards", "earthquakes", "the stock market",
                 "wifi", "blood types", "hiccups", "recycling plastic"]
_TERSE_FORMS = ["eli5 {x}", "{x} how does it work", "quick q: whats {x}", "{x}?? explain pls",
                "tell me abt {x} real quick"]

_FORMAT = [
    ("Answer with one word: what color is {x}?", ["a ripe tomato", "the sky at noon", "fresh snow",
                                                  "a lemon", "grass in spring", "coal"]),
    ("Answer yes or no, then give one reason: {x}", [
        "can penguins fly?", "is a tomato a fruit?", "do fish sleep?", "is glass a liquid?",
        "can you see the Great Wall of China from space?", "is a whale a fish?"]),
    ('Reply only with JSON with the keys "name" and "reason": suggest {x}.', [
        "a name for a coffee shop", "a dog breed for a small flat", "a book for a long flight",
        "a board game for four players", "a city for a weekend trip", "a houseplant for a dark room"]),
    ("Give exactly three bullet points about {x}.", [
        "why sleep matters", "how to stay safe online", "what to pack for a beach day",
        "how to prepare for a job interview", "the benefits of walking", "keeping a kitchen clean"]),
    ("Make a table with two columns that compares {x}.", [
        "cats and dogs as pets", "trains and planes for travel", "paper books and e-books",
        "summer and winter holidays", "tea and coffee", "city life and country life"]),
    ("In exactly two sentences, {x}.", [
        "say why the ocean is blue", "describe how a bill becomes a law", "explain what a calorie is",
        "explain what causes thunder", "describe how to tie a tie", "explain why we have leap years"]),
]

# short everyday notes the `reading` prompts are about (none taken from the perplexity passages)
_NOTES = [
    "Hi team, the quarterly review moves from Tuesday to Thursday at 10 am because the projector in room "
    "B is broken. Please send your slides to Maria by Wednesday noon. Lunch will be provided, so tell "
    "Sam about any allergies. Remote staff can join through the usual video link.",
    "I bought this kettle two months ago. It boils water fast and the handle stays cool, but the lid "
    "started to stick after a few weeks and now it leaks a little when I pour. Customer service "
    "answered quickly and offered a replacement part, which I am still waiting for.",
    "To make a simple tomato soup, soften one chopped onion in olive oil, add two cloves of garlic and "
    "a tin of tomatoes, then pour in half a litre of stock. Simmer for twenty minutes, blend until "
    "smooth, and season with salt, pepper and a little sugar. Serve it with warm bread.",
    "Dear residents, the water supply in blocks C and D will be switched off on Monday from 9 am to 3 "
    "pm while the old pipes are replaced. Please store some water the night before. We are sorry for "
    "the trouble and thank you for your patience.",
    "Our hiking group meets at the north car park at 7:30 on Saturday. The walk is about fourteen "
    "kilometres with one steep climb, so bring good boots, two litres of water and a packed lunch. If it "
    "rains heavily we will take the shorter valley path instead.",
    "The new phone has a bright screen and a camera that takes sharp photos even at night. Battery life "
    "is shorter than the old model, about one day with heavy use. It costs two hundred dollars more "
    "than last year's version, which many buyers think is too much.",
    "Thank you for your order. Your parcel left our warehouse this morning and should arrive within "
    "three working days. You can follow it with the tracking number in this e-mail. If nobody is home, "
    "the driver will leave a card with a pickup address nearby.",
    "The library will close early on Friday for staff training. Books due that day can be returned "
    "on Saturday without a fine. The children's reading club moves to the following week, and the "
    "computer room stays open until five for anyone printing documents.",
    "Last night's match was tight until the final minutes. The home side scored twice after the break, "
    "but a late penalty let the visitors draw level. Fans left talking about the referee's decision, "
    "which both coaches questioned in their interviews afterwards.",
    "Starting next month, employees may work from home on two days each week. Teams should agree on "
    "which days so that meetings can still happen in person. Laptops and headsets are available from "
    "the IT desk, and expenses for home internet will not be covered.",
    "The city council voted to turn the old railway line into a walking and cycling path. Work will "
    "start in spring and take about eighteen months. Some neighbours worry about noise and parking, "
    "while local shops hope the path will bring more visitors.",
    "My grandmother kept bees for forty years. Every August she let me help take the frames out, "
    "wearing a veil that was far too big for me. The kitchen smelled of wax for weeks, and we gave "
    "jars of honey to everyone on our street.",
]
_READING_TASKS = ["Summarize the text above in one sentence.", "What is the main point of this text?",
                  "Write a short reply to this message.", "List the key facts from this text.",
                  "Rewrite this text so a child can understand it."]

# (first question, the earlier answer, follow-ups): the follow-up only makes sense with the exchange;
# each exchange is used once, with one of its follow-ups
_DIALOGS = [
    ("What is a good name for a bakery?", "How about \"The Rising Loaf\"?",
     ["Give me three more options.", "Something shorter, please.", "Can you make it sound French?"]),
    ("How long should I boil an egg?", "About nine minutes for a hard-boiled egg.",
     ["And for a soft one?", "Does that change at high altitude?", "How do I peel it easily?"]),
    ("Suggest a weekend trip from London.", "You could visit Bath, about ninety minutes away by train.",
     ["What can I do there?", "Is it expensive?", "I meant somewhere by the sea."]),
    ("What is 15 percent of 80?", "15 percent of 80 is 12.",
     ["And 20 percent?", "How did you work that out?", "Now add that to 80."]),
    ("Write a title for my essay about climate change.", "\"A Warming World: What We Can Still Change\"",
     ["Make it less dramatic.", "Can it be a question?", "Give me a subtitle too."]),
    ("Which is bigger, a lion or a tiger?", "Tigers are usually larger and heavier than lions.",
     ["How much heavier?", "Which one is faster?", "Are they ever found in the same place?"]),
    ("Translate \"good morning\" into Spanish.", "\"Buenos dias.\"",
     ["And good night?", "How do I say it politely to an older person?", "Now in Italian."]),
    ("What should I cook for dinner tonight?", "A quick vegetable stir-fry with rice is easy and healthy.",
     ["I do not have rice.", "Can you give me the steps?", "Something without vegetables, please."]),
    ("Recommend a book for a teenager.", "\"The Hobbit\" by J.R.R. Tolkien is a great adventure.",
     ["Something more modern?", "Why do you like it?", "Is there a film of it?"]),
    ("How many planets are in the solar system?", "There are eight planets.",
     ["Name them in order.", "Which one is the smallest?", "Why not nine?"]),
]

_MULTILINGUAL = [
    "¿Qué es la fotosíntesis?", "Dame tres consejos para dormir mejor.",
    "Escribe un poema corto sobre el mar.", "¿Cuál es la capital de Australia?",
    "Qu'est-ce que l'inflation ?", "Donne-moi une recette simple de crêpes.",
    "Écris un court message pour remercier un collègue.", "Pourquoi le ciel est-il bleu ?",
    "Was ist der Unterschied zwischen Wetter und Klima?", "Nenne drei gesunde Frühstücksideen.",
    "Schreibe eine kurze E-Mail an meinen Vermieter.", "Wie funktioniert ein Kühlschrank?",
    "Che cos'è un vulcano?", "Scrivi tre consigli per imparare una lingua.",
    "O que é uma vacina?", "Escreva uma frase sobre o outono.",
]


def style_families() -> dict[str, list[Conversation]]:
    """Every conversation of each style family, in a fixed order."""
    return {
        "questions": [_user(q) for q in _QUESTIONS],
        "terse": [_user(form.format(x=x)) for form in _TERSE_FORMS for x in _TERSE_TOPICS],
        "format": [_user(t.format(x=x)) for t, xs in _FORMAT for x in xs],
        # one task per note: a note shared by a held-out and a calibration prompt would leak its text
        "reading": [_user(f"{note}\n\n{_READING_TASKS[i % len(_READING_TASKS)]}") for i, note in enumerate(_NOTES)],
        # one follow-up per exchange, for the same reason
        "dialog": [[{"role": "user", "content": first}, {"role": "assistant", "content": answer},
                    {"role": "user", "content": follows[i % len(follows)]}]
                   for i, (first, answer, follows) in enumerate(_DIALOGS)],
        "multilingual": [_user(t) for t in _MULTILINGUAL],
    }
