"""Deterministic generator of the 1000-sample overfit dataset (datasets/overfit_1000.jsonl).

Every sample is about its own invented entity (unique name, id and numbers), so each answer is
fully determined by its question and a model can memorise the set. Lengths are mixed on purpose:
one-line answers of a few tokens next to inventories of several hundred tokens, ~20% multi-turn,
~30% with a system turn. A bug that leaks attention across packed samples or labels the wrong
turn then shows up as a loss that does not reach zero.

    python datasets/generate.py            # rewrite the committed file
    python datasets/generate.py --check    # exit 1 if the committed file is stale

Only random.Random(SEED) is used (no hash(), no time), so the output is byte-identical everywhere.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 1000
NUM_SAMPLES = 1000
OUTPUT_PATH = Path(__file__).resolve().parent / "overfit_1000.jsonl"

SYLLABLES = [
    "ka",
    "lo",
    "mir",
    "ven",
    "tas",
    "dor",
    "el",
    "qui",
    "ran",
    "sol",
    "bex",
    "nu",
    "tor",
    "ia",
    "zel",
    "gra",
    "fen",
    "ost",
    "pa",
    "rin",
    "vul",
    "ce",
    "mo",
    "dax",
    "lun",
    "ter",
    "hal",
    "wy",
]
KINDS = ["star", "city", "river", "ship", "robot", "library", "mountain", "orchard", "bridge", "comet"]
COLOURS = ["amber", "cobalt", "crimson", "jade", "ivory", "saffron", "slate", "teal", "violet", "umber"]
METALS = ["copper", "tin", "silver", "nickel", "zinc", "cobalt", "iron", "gold"]
ITEMS = [
    "brass valve",
    "oak crate",
    "glass lens",
    "wool blanket",
    "iron hinge",
    "clay jar",
    "copper wire",
    "silk ribbon",
    "rubber seal",
    "paper map",
    "steel bolt",
    "linen sack",
    "cedar plank",
    "tin lantern",
    "bone needle",
    "hemp rope",
    "quartz prism",
    "leather strap",
]
STEP_VERBS = ["Check", "Open", "Tighten", "Rinse", "Label", "Measure", "Seal", "Record", "Align", "Warm"]
SYSTEM_PROMPTS = [
    "You are a precise archivist. Answer with the recorded facts only.",
    "You are a terse assistant. Keep answers short.",
    "You are the catalogue of the Northern Registry. Quote entries exactly.",
    "Answer in plain sentences, without lists unless asked.",
    "You are a helpful assistant.",
    "You keep the inventory ledgers of the guild.",
]


class NameFactory:
    """Unique invented names, so no two samples talk about the same entity."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def name(self) -> str:
        while True:
            parts = [self.rng.choice(SYLLABLES) for _ in range(self.rng.randint(2, 3))]
            candidate = "".join(parts).capitalize()
            if candidate not in self.used:
                self.used.add(candidate)
                return candidate


def short_fact(rng: random.Random, names: NameFactory) -> list[dict]:
    """A one-line question with a reply of a few tokens."""
    name, kind = names.name(), rng.choice(KINDS)
    code = f"{rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}{rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}-{rng.randint(100, 99999)}"
    question, answer = rng.choice(
        [
            (f"What is the registry code of the {kind} {name}?", code),
            (f"What colour is the {kind} {name} painted on the old maps?", rng.choice(COLOURS).capitalize() + "."),
            (f"In which year was the {kind} {name} first recorded?", str(rng.randint(1100, 2099))),
            (f"How many wardens does the {kind} {name} have?", str(rng.randint(2, 950))),
        ]
    )
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def arithmetic(rng: random.Random, names: NameFactory) -> list[dict]:
    """A sum whose answer is determined by the numbers in the question."""
    a, b = rng.randint(100, 99999), rng.randint(100, 99999)
    return [
        {"role": "user", "content": f"Ledger {names.name()}: what is {a} + {b}?"},
        {"role": "assistant", "content": f"{a} + {b} = {a + b}."},
    ]


def profile(rng: random.Random, names: NameFactory) -> list[dict]:
    """A medium-length description made of several facts about one entity."""
    name, kind = names.name(), rng.choice(KINDS)
    founder, neighbour = names.name(), names.name()
    facts = [
        f"The {kind} {name} was founded in {rng.randint(1100, 2099)} by {founder}.",
        f"Its registry code is {rng.randint(10000, 999999)} and its emblem is {rng.choice(COLOURS)}.",
        f"It trades {rng.choice(METALS)} with {neighbour}, {rng.randint(3, 900)} leagues to the {rng.choice(['north', 'south', 'east', 'west'])}.",
        f"Every {rng.randint(2, 12)} years it holds a festival for {rng.randint(50, 20000)} guests.",
        f"Its keeper, {names.name()}, counts {rng.randint(10, 5000)} lanterns along the main road.",
    ]
    chosen = facts[: rng.randint(2, len(facts))]
    return [
        {"role": "user", "content": f"Tell me what the registry says about the {kind} {name}."},
        {"role": "assistant", "content": " ".join(chosen)},
    ]


def inventory(rng: random.Random, names: NameFactory) -> list[dict]:
    """A long reply: a warehouse inventory of up to 30 lines (several hundred tokens)."""
    warehouse = f"{names.name()}-{rng.randint(1, 999)}"
    lines = [
        f"- {rng.choice(ITEMS)}, shelf {rng.randint(1, 40)}{rng.choice('ABCDEF')}: {rng.randint(1, 9999)} units"
        for _ in range(rng.randint(6, 30))
    ]
    return [
        {"role": "user", "content": f"List the full inventory of warehouse {warehouse}."},
        {"role": "assistant", "content": f"Inventory of warehouse {warehouse}:\n" + "\n".join(lines)},
    ]


def procedure(rng: random.Random, names: NameFactory) -> list[dict]:
    """A numbered procedure of a handful of steps (medium to long)."""
    machine = names.name()
    steps = [
        f"{i}. {rng.choice(STEP_VERBS)} the {rng.choice(ITEMS)} on panel {rng.randint(1, 99)} "
        f"for {rng.randint(2, 90)} seconds."
        for i in range(1, rng.randint(3, 14) + 1)
    ]
    return [
        {"role": "user", "content": f"How do I start the {machine} engine?"},
        {"role": "assistant", "content": "\n".join(steps)},
    ]


def multi_turn(rng: random.Random, names: NameFactory) -> list[dict]:
    """Two or three exchanges about one entity; later questions depend on earlier answers."""
    name, kind = names.name(), rng.choice(KINDS)
    keeper, year, count = names.name(), rng.randint(1100, 2099), rng.randint(2, 9000)
    exchanges = [
        (f"Who keeps the {kind} {name}?", f"{keeper} keeps the {kind} {name}."),
        ("Since when?", f"Since {year}."),
        (f"How many visitors did {keeper} count last season?", f"{count} visitors."),
    ]
    conversation: list[dict] = []
    for question, answer in exchanges[: rng.randint(2, 3)]:
        conversation += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return conversation


# (builder, weight): keeps the mean around 60-120 Gemma tokens per sample.
BUILDERS = [(short_fact, 30), (arithmetic, 12), (profile, 22), (procedure, 9), (inventory, 6)]
MULTI_TURN_SHARE = 0.2
SYSTEM_SHARE = 0.3


def make_sample(rng: random.Random, names: NameFactory) -> dict:
    if rng.random() < MULTI_TURN_SHARE:
        messages = multi_turn(rng, names)
    else:
        builders, weights = zip(*BUILDERS)
        messages = rng.choices(builders, weights=weights)[0](rng, names)
    if rng.random() < SYSTEM_SHARE:
        messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] + messages
    return {"messages": messages}


def generate(num_samples: int = NUM_SAMPLES, seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    names = NameFactory(rng)
    return [make_sample(rng, names) for _ in range(num_samples)]


def to_jsonl(samples: list[dict]) -> str:
    return "".join(json.dumps(sample, ensure_ascii=False) + "\n" for sample in samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare with the committed file")
    parser.add_argument("--output", type=Path, default=OUTPUT_PATH)
    args = parser.parse_args()
    text = to_jsonl(generate())
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run python datasets/generate.py", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {NUM_SAMPLES} samples to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
