"""Regenerate the quickstart data (recipes/data/quickstart-*.jsonl) and the built-in tokenizer.

    python recipes/data/make_quickstart.py                     # chats + tokenizer (committed)
    python recipes/data/make_quickstart.py --pretrain-corpus   # + the corpus that pretrains
                                                               #   builtin:tiny-llama (not committed)
    python recipes/data/make_quickstart.py --skills            # only skill-*.jsonl: one task each,
                                                               #   for the adapters-per-task recipes
    python recipes/data/make_quickstart.py --reference         # only reference-text.jsonl: general
                                                               #   text for the forgetting report

The data is synthetic and deterministic (seeded): short chats in which an assistant does
arithmetic, repeats phrases and sorts numbers, some of them multi-turn. A held-out split uses
different operands and phrases, so eval loss measures generalisation, not memorisation.
The tokenizer is a byte-level BPE (vocab 1024, digits split) trained on this data, with a
ChatML chat template whose turns end in <|im_end|> while the EOS token is <|endoftext|>.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
ASSETS = HERE.parent.parent / "peftkit" / "assets" / "tiny-llama"
SYSTEM = "You are a concise assistant."
WORDS = (
    "red blue green small big quick slow happy old new river mountain city garden forest cat dog bird "
    "fish horse apple bread water light stone cloud rain wind sun moon star road house door window "
    "book song dream story friend teacher doctor farmer runs sings reads writes jumps sleeps"
).split()


def arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}?", f"{a} - {b} = {a - b}."


def repeat(rng: random.Random) -> tuple[str, str]:
    phrase = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
    return f"Repeat after me: {phrase}", phrase


def sort_numbers(rng: random.Random) -> tuple[str, str]:
    nums = rng.sample(range(10), rng.randint(3, 5))
    return f"Sort: {', '.join(map(str, nums))}", ", ".join(map(str, sorted(nums)))


TASKS = (arithmetic, repeat, sort_numbers)


def conversation(rng: random.Random) -> dict:
    messages = [{"role": "system", "content": SYSTEM}]
    for _ in range(1 if rng.random() < 0.7 else 2):
        question, answer = rng.choice(TASKS)(rng)
        messages += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    return {"messages": messages}


def write_data(n_train: int = 2000, n_eval: int = 100) -> list[dict]:
    rows = {"train": [conversation(random.Random(i)) for i in range(n_train)]}
    seen = {json.dumps(r) for r in rows["train"]}
    rows["eval"] = [
        r
        for r in (conversation(random.Random(10**6 + i)) for i in range(n_eval * 2))
        if json.dumps(r) not in seen
    ][:n_eval]
    for split, items in rows.items():
        with open(HERE / f"quickstart-{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in items)
    return rows["train"]


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_tokenizer(rows: list[dict]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    corpus = [m["content"] for r in rows for m in r["messages"]] + [" ".join(WORDS)] * 10
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>", model_max_length=1024
    )
    fast.chat_template = CHATML
    ASSETS.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(ASSETS))


def write_skill_data(n_train: int = 600, n_eval: int = 40) -> list[Path]:
    """One single-turn chat file per skill (skill-<task>-{train,eval}.jsonl), for
    recipes/tiny-llama/adapters/*.yaml: one adapter per task on one base. Seeds are disjoint from
    the other splits'; eval rows never repeat a training row."""
    written = []
    for t, task in enumerate(TASKS):
        name = task.__name__.split("_")[0]
        rows: dict[str, list[dict]] = {"train": [], "eval": []}
        seen = set()
        for split, n, offset in (("train", n_train, 2 * 10**6), ("eval", n_eval, 3 * 10**6)):
            i = 0
            while len(rows[split]) < n:
                rng = random.Random(offset + 10**5 * t + i)
                i += 1
                question, answer = task(rng)
                row = {
                    "messages": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": question},
                        {"role": "assistant", "content": answer},
                    ]
                }
                key = json.dumps(row)
                if split == "eval" and key in seen:
                    continue
                seen.add(key)
                rows[split].append(row)
            path = HERE / f"skill-{name}-{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows[split]))
            written.append(path)
    # The same questions as a classification task (which skill is asked?), for the task-head
    # recipes recipes/tiny-llama/classifier-*.yaml.
    for split in ("train", "eval"):
        path = HERE / f"skill-classify-{split}.jsonl"
        questions = [
            {"text": json.loads(line)["messages"][1]["content"], "label": p.name.split("-")[1]}
            for p in sorted(HERE.glob(f"skill-*-{split}.jsonl"))
            if "classify" not in p.name
            for line in p.read_text().splitlines()
        ]
        random.Random(split).shuffle(questions)
        path.write_text("".join(json.dumps(q) + "\n" for q in questions))
        written.append(path)
    return written


def write_pretrain_corpus(n_docs: int = 48000, per_doc: int = 8) -> Path:
    """Plain-text documents of the same skills, *without* any chat formatting.

    `recipes/tiny-llama/pretrain.yaml` trains the random-init model on these so that
    `builtin:tiny-llama` starts the quickstart knowing the skills in a "Q: ... / A: ..." layout but
    not the ChatML assistant format, as a real base model knows facts before instruction tuning.
    Seeds are disjoint from the chat splits'.
    """
    return _plain_documents(HERE / "tiny-llama-pretrain.jsonl", n_docs, per_doc, seed=10**7)


def write_reference_text(n_docs: int = 120, per_doc: int = 4) -> Path:
    """Held-out documents of the pretraining distribution of builtin:tiny-llama (plain "Q: / A:"
    text, no chat format): the "general text" whose loss the forgetting report tracks
    (recipes/tiny-llama/forgetting.yaml). Seeds are disjoint from the pretraining corpus' and
    the chat splits'; about 25 KB."""
    return _plain_documents(HERE / "reference-text.jsonl", n_docs, per_doc, seed=5 * 10**7)


def _plain_documents(path: Path, n_docs: int, per_doc: int, seed: int) -> Path:
    """`n_docs` rows {"text": "Q: ...\nA: ...\n\nQ: ..."} of `per_doc` skill questions each;
    document i draws from random.Random(seed + i)."""
    with open(path, "w") as f:
        for i in range(n_docs):
            rng = random.Random(seed + i)
            blocks = []
            for _ in range(per_doc):
                question, answer = rng.choice(TASKS)(rng)
                blocks.append(f"Q: {question}\nA: {answer}")
            f.write(json.dumps({"text": "\n\n".join(blocks)}) + "\n")
    return path


if __name__ == "__main__":
    import sys

    if "--reference" in sys.argv:
        print("wrote", write_reference_text())
        sys.exit(0)
    if "--skills" in sys.argv:
        print("wrote", *write_skill_data())
        sys.exit(0)
    write_tokenizer(write_data())
    print(f"wrote {HERE}/quickstart-*.jsonl and {ASSETS}")
    if "--pretrain-corpus" in sys.argv:
        print(f"wrote {write_pretrain_corpus()}")
