"""Build the DPO demonstration's preference pairs from the quickstart's orders.

    python recipes/data/make_order_preferences.py   # orders-prefs-train.jsonl, orders-prefs-eval.jsonl

Each pair shares the customer's message; the chosen answer is the order as one JSON object
(what the instruction asks for), the rejected one the same facts as a chatty sentence, the kind of
answer SmolLM2-135M-Instruct gives on its own. Whole conversations, UltraFeedback style:

    {"chosen": [user, assistant JSON], "rejected": [user, assistant prose]}

The eval split is built from orders-eval.jsonl (names and cities never seen in training).
Deterministic: the prose templates are picked by a seeded generator.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROSE = [
    "Sure! {name} would like {quantity} {item} delivered to {city} on {day}. "
    "Let me know if you need anything else!",
    "Of course. Here is the order: {quantity} {item} for {name}, going to {city}, "
    "delivery on {day}. I hope this helps!",
    "The customer, {name}, has ordered {quantity} {item}. It should arrive in {city} on {day}.",
    "Great question! This order is from {name}: {quantity} {item}, shipped to {city} by {day}.",
]


def pairs(source: Path, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for line in source.read_text().splitlines():
        user, answer = json.loads(line)["messages"][-2:]
        fields = json.loads(answer["content"])
        prose = rng.choice(PROSE).format(**fields)
        out.append(
            {
                "chosen": [user, answer],
                "rejected": [user, {"role": "assistant", "content": prose}],
            }
        )
    return out


def main() -> None:
    for split, seed in (("train", 0), ("eval", 1)):
        rows = pairs(HERE / f"orders-{split}.jsonl", seed)
        target = HERE / f"orders-prefs-{split}.jsonl"
        target.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{target.name}: {len(rows)} pairs")


if __name__ == "__main__":
    main()
