"""Generate qorpo's demo preference data set (qorpo/demo_data/{train,eval}.jsonl).

Every pair is built here from small hand-written fact tables and exact arithmetic, so the data is
ours and the "chosen" answers are correct by construction. The preference is deliberately simple
and visible in a generation, so a 135M model learns it in a few minutes of CPU ORPO:

* chosen:   "[short] <one short, correct sentence>";
* rejected: a rambling, hedging answer that restates the question (sometimes wrong, sometimes
            evasive), in neither the chosen format nor one sentence.

The output is deterministic (a fixed seed, no set/dict-order or hash dependence): running this
script must reproduce the shipped files byte for byte, which tests/test_demo.py checks.

    python scripts/make_demo_data.py            # rewrite the shipped files
    python scripts/make_demo_data.py --measure  # also score the eval split with the demo model
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from qorpo.demo import DEMO_PROMPTS  # noqa: E402

SEED = 20240611
# A tag at the start of the reply: one fixed context (the reply's first tokens) for all 280 pairs,
# so LoRA learns it in a few dozen steps, and it shows in the first words of a generation. A
# sign-off at the end was tried and dropped: the model learned "sentence end -> sign-off" and
# then looped ("Done. Done. Done.").
CHOSEN_PREFIX = "[short] "
N_TRAIN = 240
N_EVAL = 40
OUT_DIR = Path(__file__).resolve().parents[1] / "qorpo" / "demo_data"

# DEMO_PROMPTS (qorpo.demo, the one copy) are forced into eval for the before/after generation.


class Item(NamedTuple):
    """One question with its correct short answer sentence and a plausible wrong answer."""

    category: str
    prompt: str
    answer: str  # the key fact, e.g. "Tokyo" or "180 minutes"
    sentence: str  # one correct sentence, without the sign-off
    wrong: str  # a plausible wrong key fact


# --- fact tables (common knowledge, written for this project) ---------------------------------
# fmt: off

CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Germany", "Berlin"), ("Italy", "Rome"),
    ("Spain", "Madrid"), ("Portugal", "Lisbon"), ("Canada", "Ottawa"), ("Australia", "Canberra"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Mexico", "Mexico City"), ("Russia", "Moscow"),
    ("China", "Beijing"), ("India", "New Delhi"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Greece", "Athens"),
    ("Turkey", "Ankara"), ("Ireland", "Dublin"), ("the Netherlands", "Amsterdam"),
    ("Belgium", "Brussels"), ("Hungary", "Budapest"), ("Czechia", "Prague"), ("Cuba", "Havana"),
    ("Colombia", "Bogota"), ("Morocco", "Rabat"), ("Nigeria", "Abuja"), ("Iran", "Tehran"),
    ("Indonesia", "Jakarta"), ("the Philippines", "Manila"), ("New Zealand", "Wellington"),
]

SYMBOLS = [
    ("gold", "Au"), ("silver", "Ag"), ("iron", "Fe"), ("copper", "Cu"), ("sodium", "Na"),
    ("potassium", "K"), ("oxygen", "O"), ("hydrogen", "H"), ("carbon", "C"), ("nitrogen", "N"),
    ("helium", "He"), ("lead", "Pb"), ("tin", "Sn"), ("mercury", "Hg"), ("calcium", "Ca"),
    ("zinc", "Zn"), ("sulfur", "S"), ("neon", "Ne"), ("chlorine", "Cl"), ("uranium", "U"),
]

ANTONYMS = [
    ("hot", "cold"), ("up", "down"), ("early", "late"), ("happy", "sad"), ("open", "closed"),
    ("light", "dark"), ("fast", "slow"), ("full", "empty"), ("strong", "weak"), ("rich", "poor"),
    ("wet", "dry"), ("loud", "quiet"), ("young", "old"), ("tall", "short"), ("hard", "soft"),
    ("cheap", "expensive"), ("win", "lose"), ("begin", "end"), ("push", "pull"), ("above", "below"),
    ("inside", "outside"), ("thick", "thin"), ("brave", "afraid"), ("true", "false"),
]

# (word, definition as a noun phrase that completes "X is ...")
DEFINITIONS = [
    ("a noun", "a word that names a person, place, or thing"),
    ("a verb", "a word that describes an action or a state"),
    ("a prime number", "a whole number greater than 1 whose only divisors are 1 and itself"),
    ("a triangle", "a flat shape with three straight sides"),
    ("photosynthesis", "the process plants use to turn light, water, and air into sugar"),
    ("gravity", "the force that pulls objects toward each other"),
    ("a mammal", "a warm-blooded animal that feeds its young with milk"),
    ("an island", "a piece of land surrounded by water"),
    ("a volcano", "an opening in the ground where melted rock comes out"),
    ("a synonym", "a word that means the same as another word"),
    ("an antonym", "a word that means the opposite of another word"),
    ("a desert", "a very dry area that gets little rain"),
    ("a glacier", "a large, slow-moving mass of ice"),
    ("a planet", "a large body that orbits a star"),
    ("a fraction", "a number that represents part of a whole"),
    ("evaporation", "the change of a liquid into a gas"),
    ("a herbivore", "an animal that eats only plants"),
    ("a peninsula", "a piece of land almost surrounded by water"),
    ("an atom", "the smallest unit of a chemical element"),
    ("a budget", "a plan for how to spend money"),
    ("a compass", "a tool that shows which way is north"),
    ("a thermometer", "a tool that measures temperature"),
    ("a vaccine", "a substance that trains the body to fight a disease"),
    ("a haiku", "a short poem with three lines of five, seven, and five syllables"),
    ("a palindrome", "a word that reads the same forwards and backwards"),
    ("an orbit", "the curved path of one object around another in space"),
]

PLURALS = [
    ("mouse", "mice"), ("child", "children"), ("tooth", "teeth"), ("foot", "feet"),
    ("goose", "geese"), ("man", "men"), ("woman", "women"), ("person", "people"),
    ("leaf", "leaves"), ("knife", "knives"), ("wolf", "wolves"), ("box", "boxes"),
    ("city", "cities"), ("baby", "babies"), ("sheep", "sheep"), ("fish", "fish"),
    ("cactus", "cacti"), ("ox", "oxen"), ("bus", "buses"), ("potato", "potatoes"),
]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
]

# (from unit, to unit, factor): 1 from = factor to
CONVERSIONS = [
    ("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000), ("hours", "minutes", 60), ("minutes", "seconds", 60),
    ("days", "hours", 24), ("weeks", "days", 7), ("feet", "inches", 12), ("yards", "feet", 3),
    ("dozens", "eggs", 12), ("years", "months", 12),
]

# (question, one correct sentence, key fact, plausible wrong fact)
FACTS = [
    ("How many days are in a week?", "A week has seven days.", "seven", "five"),
    ("How many legs does a spider have?", "A spider has eight legs.", "eight", "six"),
    ("How many legs does an insect have?", "An insect has six legs.", "six", "eight"),
    ("What color do you get by mixing blue and yellow?", "Mixing blue and yellow gives green.",
     "green", "purple"),
    ("What color do you get by mixing red and white?", "Mixing red and white gives pink.",
     "pink", "orange"),
    ("What color do you get by mixing red and yellow?", "Mixing red and yellow gives orange.",
     "orange", "green"),
    ("What color do you get by mixing red and blue?", "Mixing red and blue gives purple.",
     "purple", "brown"),
    ("What is the largest planet in our solar system?",
     "Jupiter is the largest planet in our solar system.", "Jupiter", "Saturn"),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun.",
     "Mercury", "Venus"),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet.", "Mars",
     "Jupiter"),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth.",
     "the Pacific Ocean", "the Atlantic Ocean"),
    ("At what temperature does water freeze in Celsius?", "Water freezes at 0 degrees Celsius.",
     "0 degrees", "10 degrees"),
    ("At what temperature does water boil in Celsius?",
     "Water boils at 100 degrees Celsius at sea level.", "100 degrees", "90 degrees"),
    ("How many continents are there?", "There are seven continents.", "seven", "six"),
    ("How many sides does a hexagon have?", "A hexagon has six sides.", "six", "eight"),
    ("How many sides does a pentagon have?", "A pentagon has five sides.", "five", "six"),
    ("How many sides does an octagon have?", "An octagon has eight sides.", "eight", "seven"),
    ("How many hours are in a day?", "A day has 24 hours.", "24", "12"),
    ("How many months are in a year?", "A year has 12 months.", "12", "10"),
    ("What gas do plants take in from the air?", "Plants take in carbon dioxide from the air.",
     "carbon dioxide", "oxygen"),
    ("What gas do humans need to breathe?", "Humans need oxygen to breathe.", "oxygen",
     "nitrogen"),
    ("What is the closest star to Earth?", "The Sun is the closest star to Earth.", "the Sun",
     "Sirius"),
    ("What do bees make?", "Bees make honey.", "honey", "milk"),
    ("What is the largest mammal?", "The blue whale is the largest mammal.", "the blue whale",
     "the elephant"),
    ("Which animal is called the king of the jungle?", "The lion is called the king of the jungle.",
     "the lion", "the tiger"),
    ("What is frozen water called?", "Frozen water is called ice.", "ice", "steam"),
    ("How many strings does a standard guitar have?", "A standard guitar has six strings.", "six",
     "four"),
    ("How many players does a soccer team have on the field?",
     "A soccer team has eleven players on the field.", "eleven", "nine"),
    ("What is the tallest animal?", "The giraffe is the tallest animal.", "the giraffe",
     "the elephant"),
    ("What is the longest river in Africa?", "The Nile is the longest river in Africa.",
     "the Nile", "the Congo"),
    ("What is the main language spoken in Brazil?",
     "The main language spoken in Brazil is Portuguese.", "Portuguese", "Spanish"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet.",
     "William Shakespeare", "Charles Dickens"),
    ("What is the square root of 81?", "The square root of 81 is 9.", "9", "8"),
    ("What is the square root of 64?", "The square root of 64 is 8.", "8", "6"),
    ("How many zeros are in one million?", "One million has six zeros.", "six", "five"),
    ("What is the hardest natural material?", "Diamond is the hardest natural material.",
     "diamond", "gold"),
]
# fmt: on


# --- item generators ----------------------------------------------------------------------------


def _demo_items(rng: random.Random) -> Iterator[Item]:
    # Yielded first so the demo prompts exist verbatim; the generators' duplicates are dropped.
    yield Item(
        "conversion", DEMO_PROMPTS[0], "180 minutes", "3 hours is 180 minutes.", "240 minutes"
    )
    yield Item(
        "definition",
        DEMO_PROMPTS[1],
        "a large, slow-moving mass of ice",
        "A glacier is a large, slow-moving mass of ice.",
        "a piece of land surrounded by water",
    )


def _capitals(rng: random.Random) -> Iterator[Item]:
    forms = [
        "What is the capital of {c}?",
        "Which city is the capital of {c}?",
        "Name the capital city of {c}.",
    ]
    for i, (country, city) in enumerate(CAPITALS):
        wrong = CAPITALS[(i + 7) % len(CAPITALS)][1]
        yield Item(
            "capital",
            rng.choice(forms).format(c=country),
            city,
            f"The capital of {country} is {city}.",
            wrong,
        )


def _symbols(rng: random.Random) -> Iterator[Item]:
    forms = ["What is the chemical symbol for {e}?", "Which chemical symbol stands for {e}?"]
    for i, (element, sym) in enumerate(SYMBOLS):
        wrong = SYMBOLS[(i + 3) % len(SYMBOLS)][1]
        yield Item(
            "symbol",
            rng.choice(forms).format(e=element),
            sym,
            f"The chemical symbol for {element} is {sym}.",
            wrong,
        )


def _antonyms(rng: random.Random) -> Iterator[Item]:
    forms = ['What is the opposite of "{w}"?', 'Give the antonym of the word "{w}".']
    for i, (word, opp) in enumerate(ANTONYMS):
        wrong = ANTONYMS[(i + 5) % len(ANTONYMS)][1]
        yield Item(
            "antonym",
            rng.choice(forms).format(w=word),
            opp,
            f'The opposite of "{word}" is "{opp}".',
            wrong,
        )


def _definitions(rng: random.Random) -> Iterator[Item]:
    forms = ["What is {w}?", "Define {w} in one sentence.", "Can you explain what {w} is?"]
    for i, (word, meaning) in enumerate(DEFINITIONS):
        wrong = DEFINITIONS[(i + 9) % len(DEFINITIONS)][1]
        sentence = f"{word[0].upper()}{word[1:]} is {meaning}."
        yield Item("definition", rng.choice(forms).format(w=word), meaning, sentence, wrong)


def _plurals(rng: random.Random) -> Iterator[Item]:
    forms = ['What is the plural of "{w}"?', 'How do you write more than one "{w}"?']
    for word, plural in PLURALS:
        wrong = word + "s" if plural != word + "s" else word + "es"
        yield Item(
            "plural",
            rng.choice(forms).format(w=word),
            plural,
            f'The plural of "{word}" is "{plural}".',
            wrong,
        )


def _sequences(rng: random.Random) -> Iterator[Item]:
    for names, kind in ((DAYS, "day"), (MONTHS, "month")):
        for i, name in enumerate(names):
            nxt, prev = names[(i + 1) % len(names)], names[(i - 1) % len(names)]
            if rng.random() < 0.5:
                yield Item(
                    "sequence",
                    f"Which {kind} comes after {name}?",
                    nxt,
                    f"The {kind} after {name} is {nxt}.",
                    prev,
                )
            else:
                yield Item(
                    "sequence",
                    f"Which {kind} comes before {name}?",
                    prev,
                    f"The {kind} before {name} is {prev}.",
                    nxt,
                )


def _conversions(rng: random.Random) -> Iterator[Item]:
    for src, dst, factor in CONVERSIONS:
        for n in rng.sample(range(2, 10), 3):
            value = n * factor
            prompt = f"How many {dst} are in {n} {src}?"
            if rng.random() < 0.4:
                prompt = f"Convert {n} {src} to {dst}."
            yield Item(
                "conversion",
                prompt,
                f"{value} {dst}",
                f"{n} {src} is {value} {dst}.",
                f"{value + factor} {dst}",
            )


def _arithmetic(rng: random.Random) -> Iterator[Item]:
    # Small numbers: results a 135M model can get right, so the answers are not noise to it.
    ops = [
        ("+", lambda a, b: a + b, "plus", (2, 50), (2, 50)),
        ("-", lambda a, b: a - b, "minus", (10, 60), (2, 9)),
        ("*", lambda a, b: a * b, "times", (2, 12), (2, 12)),
    ]
    for k in range(45):
        sym, fn, word, (lo_a, hi_a), (lo_b, hi_b) = ops[k % 3]
        a, b = rng.randint(lo_a, hi_a), rng.randint(lo_b, hi_b)
        result = fn(a, b)
        prompt = rng.choice(
            [f"What is {a} {sym} {b}?", f"What is {a} {word} {b}?", f"Calculate {a} {sym} {b}."]
        )
        wrong = result + rng.choice([-10, -2, -1, 1, 2, 10])
        yield Item("arithmetic", prompt, str(result), f"{a} {sym} {b} = {result}.", str(wrong))


def _facts(rng: random.Random) -> Iterator[Item]:
    for prompt, sentence, answer, wrong in FACTS:
        yield Item("fact", prompt, answer, sentence, wrong)


def _parity(rng: random.Random) -> Iterator[Item]:
    for n in rng.sample(range(11, 200), 20):
        ans, other = ("even", "odd") if n % 2 == 0 else ("odd", "even")
        yield Item("parity", f"Is {n} an even or an odd number?", ans, f"{n} is {ans}.", other)


GENERATORS: list[Callable[[random.Random], Iterator[Item]]] = [
    _demo_items,
    _capitals,
    _symbols,
    _antonyms,
    _definitions,
    _plurals,
    _sequences,
    _conversions,
    _arithmetic,
    _parity,
    _facts,
]

# --- rejected styles ------------------------------------------------------------------------------
# Rambling, hedging answers that restate the question (some bury the right fact, some state a wrong
# one, some dodge). Restating makes them *likely* under the base model (copying is cheap for an LM),
# so the base model does not already prefer the chosen side; the consistent signal is the chosen
# format: one short, correct sentence after the "[short]" tag.

REJECTED_STYLES = [
    'You asked: "{q}" Many people ask "{q}" and the answer is not always simple. I think it is '
    "{wrong}, but I am not sure.",
    'The question "{q}" is an interesting one. To answer the question "{q}", we need to think '
    "about it carefully. After thinking about it, I would say {wrong}.",
    'Great question! "{q}" is something a lot of people wonder about. There are many different '
    'opinions about "{q}", so it is hard to say for sure.',
    "Let me think. {q} Hmm. {q} I believe the answer might be {answer}, or maybe {wrong}. It is "
    "hard to tell.",
    "Thank you for your question. You want to know: {q} This is a common question. The answer to "
    '"{q}" depends on many things, so I cannot say for certain.',
    "Hmm, well. {q} That is hard to answer. Some people say {answer}, others say {wrong}. I would "
    'need more information to give you a good answer to "{q}".',
]


def make_pair(item: Item, rng: random.Random) -> dict[str, str]:
    """Turn one item into a preference pair in the explicit-prompt format."""
    style = rng.choice(REJECTED_STYLES)
    return {
        "prompt": item.prompt,
        "chosen": CHOSEN_PREFIX + item.sentence,
        "rejected": style.format(q=item.prompt, answer=item.answer, wrong=item.wrong),
    }


def build_splits(seed: int = SEED) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """All pairs, split so that every category is in eval and no prompt is in both splits."""
    rng = random.Random(seed)
    by_category: dict[str, list[Item]] = {}
    seen: set[str] = set()
    for gen in GENERATORS:
        for item in gen(rng):
            # Drop repeated prompts (so the splits stay disjoint) and repeated facts (so a
            # rephrased demo prompt cannot leak into train).
            if item.prompt not in seen and item.sentence not in seen:
                seen.update((item.prompt, item.sentence))
                by_category.setdefault(item.category, []).append(item)
    train_items: list[Item] = []
    eval_items: list[Item] = []
    per_cat = N_EVAL // len(by_category)
    for items in by_category.values():
        rng.shuffle(items)
        forced = [it for it in items if it.prompt in DEMO_PROMPTS]
        rest = [it for it in items if it.prompt not in DEMO_PROMPTS]
        take = max(0, per_cat - len(forced))
        eval_items += forced + rest[:take]
        train_items += rest[take:]
    # Top eval up to N_EVAL from the leftover train items, then cap train.
    rng.shuffle(train_items)
    extra = N_EVAL - len(eval_items)
    eval_items += train_items[:extra]
    train_items = train_items[extra:][:N_TRAIN]
    rng.shuffle(eval_items)
    return [make_pair(it, rng) for it in train_items], [make_pair(it, rng) for it in eval_items]


def to_jsonl(rows: list[dict[str, str]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=True) + "\n" for row in rows)


def write(out_dir: Path = OUT_DIR) -> dict[str, Path]:
    train, evals = build_splits()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"train": out_dir / "train.jsonl", "eval": out_dir / "eval.jsonl"}
    # newline="\n" so the bytes are the same on every OS.
    paths["train"].write_text(to_jsonl(train), encoding="utf-8", newline="\n")
    paths["eval"].write_text(to_jsonl(evals), encoding="utf-8", newline="\n")
    return paths


def measure(model_dir: Path, rows: list[dict[str, str]]) -> dict[str, float]:
    """How much a model already prefers chosen, with ORPO's per-pair score.

    l = mean log-prob of the response tokens (the reply and its closing <|im_end|>) after the
    chat-templated prompt; reward accuracy = share of pairs with l(chosen) > l(rejected).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    end = [tok.convert_tokens_to_ids("<|im_end|>")]

    def mean_logprob(prompt: str, response: str) -> float:
        messages = [{"role": "user", "content": prompt}]
        head = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        prompt_ids = list(head["input_ids"])
        ids = torch.tensor(
            [prompt_ids + tok(response, add_special_tokens=False)["input_ids"] + end]
        )
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        token_lp = logprobs.gather(-1, ids[0, 1:, None])[len(prompt_ids) - 1 :]
        return token_lp.mean().item()

    chosen = [mean_logprob(r["prompt"], r["chosen"]) for r in rows]
    rejected = [mean_logprob(r["prompt"], r["rejected"]) for r in rows]
    n = len(rows)
    return {
        "pairs": n,
        "reward_accuracy": sum(c > r for c, r in zip(chosen, rejected, strict=True)) / n,
        "margin": sum(c - r for c, r in zip(chosen, rejected, strict=True)) / n,
        "logp_chosen": sum(chosen) / n,
        "logp_rejected": sum(rejected) / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument(
        "--measure",
        nargs="?",
        const="demo",
        metavar="MODEL_DIR",
        help="score the eval split with a model folder (default: the demo model)",
    )
    args = parser.parse_args()
    paths = write(args.out)
    for name, path in paths.items():
        print(f"{name}: {sum(1 for _ in path.open())} pairs -> {path}")
    if args.measure:
        from qorpo.demo import ensure_demo_model

        model_dir = ensure_demo_model() if args.measure == "demo" else Path(args.measure)
        rows = [json.loads(line) for line in paths["eval"].open()]
        for key, value in measure(model_dir, rows).items():
            print(f"{key}: {value:.3f}")


if __name__ == "__main__":
    main()
