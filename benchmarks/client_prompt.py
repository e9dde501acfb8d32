"""Held-out orders sent as a client sends them (user turn only, no system message) vs the run's own
evaluation: the served adapter through the official openai client, and the exports through plain
transformers' `apply_chat_template`.

    .venv/bin/python -m peftkit train recipes/quickstart.yaml output.dir=runs/quickstart
    .venv/bin/python -m peftkit export runs/quickstart --out exports/qs
    .venv/bin/python -m peftkit export runs/quickstart --out exports/qs-gguf --format gguf
    .venv/bin/python benchmarks/client_prompt.py runs/quickstart --hf exports/qs \
        --gguf exports/qs-gguf/quickstart-f16.gguf

Each answer is greedy (48 new tokens) and scored as the run scores its own (`json_fields`: the
answer's JSON has exactly the right fields); "same" counts answers identical to the run's own
(answers.json, written by its last evaluation). The server is asked twice: as served (the
adapter's training system prompt is the default system turn) and with `"default_system": false`
(the prompt rendered as given, as before peftkit applied it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))


def served(run: Path, rows: list[dict]) -> dict[str, list[str]]:
    from openai import OpenAI

    from peftkit import api

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "quickstart").symlink_to(run.resolve(), target_is_directory=True)
        server = api.serve(folder, host="127.0.0.1", port=0, block=False)
        try:
            client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
            out = {}
            for mode, extra in (("served", None), ("served, default_system false", False)):
                out[mode] = [
                    client.chat.completions.create(
                        model="quickstart",
                        messages=[row["messages"][0]],
                        temperature=0,
                        max_tokens=48,
                        extra_body=None if extra is None else {"default_system": extra},
                    )
                    .choices[0]
                    .message.content
                    for row in rows
                ]
            return out
        finally:
            server.stop()


def exported(folder: Path, rows: list[dict], gguf_file: str | None = None) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=gguf_file, dtype=torch.float32
    ).eval()
    answers = []
    for row in rows:
        ids = tokenizer.apply_chat_template(
            [row["messages"][0]], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=48, do_sample=False)
        answers.append(
            tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        )
    return answers


def main() -> None:
    from peftkit.objectives.answer_metrics import json_fields

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--eval", type=Path, default=ROOT.parent / "recipes/data/orders-eval.jsonl")
    parser.add_argument("--hf", type=Path, help="a merged export of the run")
    parser.add_argument("--gguf", type=Path, help="a GGUF export of the run (the .gguf file)")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.eval.read_text().splitlines()[: args.rows]]
    own = [r["after"] for r in json.loads((args.run / "answers.json").read_text())[: args.rows]]
    answers = {"the run's own evaluation": own, **served(args.run, rows)}
    if args.hf:
        answers["merged export, transformers"] = exported(args.hf, rows)
    if args.gguf:
        answers["GGUF export, its embedded template"] = exported(
            args.gguf.parent, rows, args.gguf.name
        )
    print(f"| answered by (no system message; {len(rows)} held-out orders) | right | same |")
    print("|---|---|---|")
    for name, texts in answers.items():
        right = sum(
            json_fields(t, r["messages"][1]["content"])["score"] for t, r in zip(texts, rows)
        )
        same = sum(t.strip() == o.strip() for t, o in zip(texts, own))
        print(f"| {name} | {right:.0f}/{len(rows)} | {same}/{len(rows)} |")


if __name__ == "__main__":
    main()
