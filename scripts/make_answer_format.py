"""Write data/demo/answer_format.jsonl: the demo's fine-tuning data (arithmetic questions with terse answers).

The demo fine-tunes the model on these pairs so that it answers with the final number alone. The questions are
generated from templates with a seeded random generator, so running this again writes the same file; none of
them is a question of the evaluation sets (checked here and by the tests).

    python scripts/make_answer_format.py [--count 200]
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "data" / "demo" / "answer_format.jsonl"
EVALUATION_SETS = ("arithmetic.jsonl", "factual.jsonl", "safety.jsonl")

NAMES = ["Priya", "Omar", "Hana", "Diego", "Ines", "Kofi", "Yara", "Felix", "Nora", "Ravi", "Elsa", "Tariq"]
THINGS = ["shells", "stamps", "beads", "coins", "buttons", "postcards", "pebbles", "ribbons", "keys", "badges"]
CONTAINERS = [("crate", "melons"), ("tin", "biscuits"), ("basket", "plums"), ("drawer", "socks"), ("bag", "limes")]

Template = Callable[[random.Random], tuple[str, int]]


def _add(r: random.Random) -> tuple[str, int]:
    name, thing = r.choice(NAMES), r.choice(THINGS)
    a, b = r.randint(3, 60), r.randint(2, 40)
    return f"{name} collects {a} {thing} and then finds {b} more. How many {thing} does {name} have now?", a + b


def _sub(r: random.Random) -> tuple[str, int]:
    name, thing = r.choice(NAMES), r.choice(THINGS)
    a = r.randint(15, 90)
    b = r.randint(2, a - 1)
    return f"{name} had {a} {thing} and gave away {b}. How many {thing} are left?", a - b


def _mul(r: random.Random) -> tuple[str, int]:
    container, thing = r.choice(CONTAINERS)
    a, b = r.randint(2, 12), r.randint(2, 12)
    return f"One {container} holds {a} {thing}. How many {thing} fit in {b} of them?", a * b


def _div(r: random.Random) -> tuple[str, int]:
    name, thing = r.choice(NAMES), r.choice(THINGS)
    each, groups = r.randint(2, 12), r.randint(2, 9)
    return f"{name} splits {each * groups} {thing} evenly into {groups} piles. How many {thing} are in each pile?", each


def _two_step(r: random.Random) -> tuple[str, int]:
    name, thing = r.choice(NAMES), r.choice(THINGS)
    a, b = r.randint(10, 50), r.randint(2, 20)
    c = r.randint(1, a + b - 1)
    return f"{name} owns {a} {thing}, wins {b} more, then loses {c}. How many {thing} does {name} own in the end?", (
        a + b - c
    )


def _bare(r: random.Random) -> tuple[str, int]:
    a, b = r.randint(11, 99), r.randint(11, 99)
    op = r.choice(["plus", "minus", "times"])
    if op == "minus" and b > a:
        a, b = b, a
    value = {"plus": a + b, "minus": a - b, "times": a * b}[op]
    return f"Compute {a} {op} {b}.", value


def _age(r: random.Random) -> tuple[str, int]:
    name = r.choice(NAMES)
    age, more = r.randint(5, 40), r.randint(2, 30)
    return f"{name} is {age}. In {more} years, how old will {name} be?", age + more


def _money(r: random.Random) -> tuple[str, int]:
    name = r.choice(NAMES)
    price, count = r.randint(2, 15), r.randint(2, 9)
    return f"A ticket costs {price} euros. {name} buys {count} tickets. How many euros does {name} pay?", price * count


TEMPLATES: list[Template] = [_add, _sub, _mul, _div, _two_step, _bare, _age, _money]


def generate(count: int, seed: int = 2024) -> list[dict[str, object]]:
    rng = random.Random(seed)
    taken = evaluation_questions()
    rows: list[dict[str, object]] = []
    seen: set[str] = set()
    while len(rows) < count:
        question, answer = TEMPLATES[len(rows) % len(TEMPLATES)](rng)
        if question in seen or question in taken:
            continue
        seen.add(question)
        rows.append(
            {
                "id": f"fmt-{len(rows) + 1:03d}",
                "inputs": {"question": question},
                "expected": str(answer),
                "kind": "",
            }
        )
    return rows


def evaluation_questions() -> set[str]:
    out = set()
    for name in EVALUATION_SETS:
        for line in (ROOT / "data" / "demo" / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.add(json.loads(line)["inputs"]["question"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args()
    rows = generate(args.count)
    OUT.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} items to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
