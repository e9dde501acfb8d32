"""Regenerate the tool-calling task data: an order written as free text -> a `send_order` call.

    python recipes/data/make_tools.py   # tools-train.jsonl, tools-eval.jsonl

Each row is an agent chat with the function list in its `tools` column: the customer asks for
an order (sometimes after a greeting), the assistant calls

    send_order(name="Priya Natarajan", item="desk lamp", quantity=3, city="Leeds", day="Friday")

the tool's result comes back (an order id), and the assistant confirms the order in one
sentence that quotes the id. The order texts are the quickstart's (make_orders.py); the eval
split uses names and cities that never occur in training, so a model that learned the task
copies unseen strings into the right arguments. Seeded and deterministic.
"""

from __future__ import annotations

import json
import random

from make_orders import CITIES, FIRST, HERE, LAST, TEMPLATES, order_fields, plural, write_jsonl

SEND_ORDER = {
    "type": "function",
    "function": {
        "name": "send_order",
        "description": "Place a delivery order for a customer.",
        "parameters": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "description": "the customer's full name"},
                "item": {"type": "string", "description": "the item, singular"},
                "quantity": {"type": "integer", "description": "how many"},
                "city": {"type": "string", "description": "the delivery city"},
                "day": {"type": "string", "description": "the delivery day of the week"},
            },
            "required": ["name", "item", "quantity", "city", "day"],
        },
    },
}
GREETINGS = [
    ("Hi there!", "Hello! What would you like to order?"),
    ("Good morning.", "Good morning! Tell me the order and I will place it."),
    ("Hello, can you help me with an order?", "Of course. What should I send, and where?"),
]


def chat(rng: random.Random, n: int, firsts: list[str], lasts: list[str], cities: list[str]):
    args = order_fields(rng, firsts, lasts, cities)
    items = plural(args["item"], args["quantity"])
    call_id = f"call_{n:05d}"
    order_id = f"ORD-{rng.randint(10000, 99999)}"
    messages = []
    if rng.random() < 0.3:
        hello, reply = rng.choice(GREETINGS)
        messages += [{"role": "user", "content": hello}, {"role": "assistant", "content": reply}]
    messages += [
        {"role": "user", "content": rng.choice(TEMPLATES).format(**args, items=items)},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "send_order", "arguments": json.dumps(args)},
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": call_id,
            "name": "send_order",
            "content": json.dumps({"order_id": order_id, "status": "confirmed"}),
        },
        {
            "role": "assistant",
            "content": f"Done: order {order_id} sends {args['quantity']} {items} to "
            f"{args['name']} in {args['city']} on {args['day']}.",
        },
    ]
    return {"tools": [SEND_ORDER], "messages": messages}


def main() -> None:
    rng = random.Random(0)
    # Held-out names and cities: eval rows test copying unseen strings into the right argument.
    train = [chat(rng, n, FIRST[:36], LAST[:30], CITIES[:30]) for n in range(600)]
    held_out = [chat(rng, 600 + n, FIRST[36:], LAST[30:], CITIES[30:]) for n in range(60)]
    write_jsonl(HERE / "tools-train.jsonl", train)
    write_jsonl(HERE / "tools-eval.jsonl", held_out)


if __name__ == "__main__":
    main()
