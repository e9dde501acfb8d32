"""peftkit's preference training beside TRL's trainers, step by step, on one small workload.

    OMP_NUM_THREADS=1 python benchmarks/dpo_parity.py                 # DPO, 60 steps x 8 pairs
    OMP_NUM_THREADS=1 python benchmarks/dpo_parity.py --micro-batch 8 --grad-accum 1

Workload (built here, offline, deterministic): a 3-layer Qwen2-architecture model with random
weights (hidden 64, MLP 128, 4 heads, 2 KV heads) and a byte-level BPE tokenizer trained on the
data, with a ChatML template; 300 training and 60 held-out conversational pairs, prompt "What is
the capital of Orsk?", chosen "The capital of Orsk is Pell.", rejected "The capital of Orsk is
Rask." The answers differ in their last word only: chosen capitals come from one pool of made-up
names, rejected ones from another, and held-out countries are new, so held-out preference
accuracy measures whether the preference was learnt.

Both sides: LoRA r 16, alpha 32, all-linear, dropout 0; the same starting adapter weights and the
same rows in the same order (TRL gets peftkit's order as its data order); lr 5e-3, cosine, 2
warm-up steps, clipping at 1.0, AdamW; beta 0.1; fp32. peftkit runs from a recipe
(`FineTuneRun`), TRL's `DPOTrainer` gets a peft `LoraConfig` (reference = adapter off).

Per step the table shows both losses and reward margins and their differences; at the end, the
largest difference of the adapter weights, and the held-out preference accuracy of the base and
of both adapters, computed here, outside both tools: the share of held-out pairs with
log p(chosen answer) > log p(rejected answer), each summed over the answer's tokens.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SYLLABLES = (
    "ba be bo da de do ka ke ko la le lo ma me mo na ne no ra re ro sa se so ta te to".split()
)


# ----------------------------------------------------------------------------- workload
def _names(rng: random.Random, n: int, taken: set[str], ends: list[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        name = (rng.choice(SYLLABLES) + rng.choice(SYLLABLES) + rng.choice(ends)).capitalize()
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def make_pairs(
    n_train: int, n_eval: int, capitals: int, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Conversational pairs whose answers differ in the last word (the capital's name): chosen
    names end in -ll/-lle, rejected ones in -sk/-x, `capitals` names of each kind (0: a new
    name for every pair)."""
    rng = random.Random(seed)
    taken: set[str] = set()
    countries = _names(rng, n_train + n_eval, taken, ["sk", "nia", "ria", "stan"])
    pool = capitals or n_train + n_eval
    good = _names(rng, pool, taken, ["ll", "lle"])
    bad = _names(rng, pool, taken, ["sk", "x"])
    rows = []
    for country in countries:
        prompt = [{"role": "user", "content": f"What is the capital of {country}?"}]

        def answer(city: str, country: str = country) -> list[dict]:
            return [{"role": "assistant", "content": f"The capital of {country} is {city}."}]

        rows.append(
            {
                "prompt": prompt,
                "chosen": answer(rng.choice(good)),
                "rejected": answer(rng.choice(bad)),
            }
        )
    return rows[:n_train], rows[n_train:]


def build_workload(
    out: Path, capitals: int, n_train: int = 300, n_eval: int = 60
) -> dict[str, Path]:
    """Model folder (tokenizer included) and the train / eval files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    train, evals = make_pairs(n_train, n_eval, capitals)
    corpus = [
        m["content"]
        for row in train + evals
        for k in ("prompt", "chosen", "rejected")
        for m in row[k]
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([*corpus, "user", "assistant", "system"], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    model_dir = out / "model"
    fast.save_pretrained(str(model_dir))
    config = Qwen2Config(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.02,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(str(model_dir))
    paths = {"model": model_dir, "train": out / "train.jsonl", "eval": out / "eval.jsonl"}
    for name, rows in (("train", train), ("eval", evals)):
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


# ----------------------------------------------------------------------------- peftkit
def run_peftkit(paths: dict[str, Path], out: Path, a: argparse.Namespace) -> dict[str, Any]:
    """Train with peftkit; returns per-step records, start and end adapter weights, row order."""
    from peftkit.recipe.load import validate_recipe
    from peftkit.training.loop import FineTuneRun

    train: dict[str, Any] = {
        "max_steps": a.steps,
        "micro_batch_size": a.micro_batch,
        "grad_accum": a.grad_accum,
        "lr": a.lr,
        "scheduler": a.scheduler,
        "warmup_steps": a.warmup,
        "precision": "fp32",
        "seed": 0,
    }
    raw = {
        "name": "parity",
        "model": {"name": str(paths["model"])},
        "adapter": {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
        "objective": {"type": "dpo", "beta": a.beta, "loss_type": "sigmoid"},
        "data": {"train": str(paths["train"]), "eval": str(paths["eval"]), "max_length": 256},
        "train": train,
        "output": {"dir": str(out / "run"), "overwrite": True, "plot": False},
    }
    for item in a.set:
        key, value = item.split("=", 1)
        *path, last = key.split(".")
        node = raw
        for part in path:
            node = node.setdefault(part, {})
        node[last] = json.loads(value)
    recipe = validate_recipe(raw)
    run = FineTuneRun(recipe)
    run.setup()
    trainable = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    order = []  # the rows of each step, in peftkit's order
    for step in range(a.steps):
        epoch, in_epoch = divmod(step, run.plan.steps_per_epoch)
        for mb in run.plan.micro_batches(run.plan.epoch_order(epoch), in_epoch, 0, None):
            order += [int(run.data.train[i].origin.rsplit(" ", 1)[-1]) - 1 for i in mb]
    run.train()
    summary = run.finish()
    records = [json.loads(x) for x in run.run.metrics.read_text().splitlines()]
    end = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    return {
        "steps": [r for r in records if "loss" in r],
        "start": trainable,
        "end": end,
        "order": order,
        "peft_config": run.accelerator.unwrap_model(run.model).peft_config["default"],
        "adapter_dir": run.run.path / "adapter",
        "summary": summary,
    }


# ----------------------------------------------------------------------------- TRL
def run_trl(
    paths: dict[str, Path],
    out: Path,
    a: argparse.Namespace,
    ours: dict[str, Any],
    perturb: float = 0.0,
) -> dict[str, Any]:
    """TRL's DPOTrainer with a peft LoraConfig, peftkit's starting adapter and row order;
    `perturb` scales each starting weight by (1 + perturb * N(0, 1)) (the float noise floor)."""
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(x) for x in paths["train"].read_text().splitlines()]
    dataset = Dataset.from_list([rows[i] for i in ours["order"]])
    args = DPOConfig(
        output_dir=str(out / "trl"),
        per_device_train_batch_size=a.micro_batch,
        gradient_accumulation_steps=a.grad_accum,
        max_steps=a.steps,
        learning_rate=a.lr,
        lr_scheduler_type=a.scheduler,
        warmup_steps=a.warmup,
        max_grad_norm=1.0,
        weight_decay=0.0,
        optim="adamw_torch",
        beta=a.beta,
        loss_type=["sigmoid"],
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        seed=0,
        max_length=256,
        dataloader_num_workers=0,
    )

    class Recording(DPOTrainer):
        seen: list[dict] = []

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)  # peftkit's order, as the data order

        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            margins = self._metrics["train"]["rewards/margins"][-1]
            self.seen.append({"loss": float(loss.detach()), "margin": float(margins)})
            return loss

    model = AutoModelForCausalLM.from_pretrained(str(paths["model"]), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(paths["model"]))
    trainer = Recording(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=ours["peft_config"],
    )
    g = torch.Generator().manual_seed(1)
    start = {
        k: v * (1 + perturb * torch.randn(v.shape, generator=g)) for k, v in ours["start"].items()
    }
    from transformers.trainer_callback import ProgressCallback

    trainer.remove_callback(ProgressCallback)  # no per-step log lines on stdout
    missing = trainer.model.load_state_dict(start, strict=False)
    assert not [k for k in ours["start"] if k in missing.unexpected_keys]
    Recording.seen = []
    trainer.train()
    ga = a.grad_accum
    seen = Recording.seen
    steps = [
        {
            "loss": sum(s["loss"] for s in seen[i : i + ga]) / ga,
            "margin": sum(s["margin"] for s in seen[i : i + ga]) / ga,
        }
        for i in range(0, len(seen), ga)
    ]
    end = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    adapter_dir = out / ("trl-adapter" if not perturb else "trl-adapter-perturbed")
    trainer.save_model(str(adapter_dir))
    return {"steps": steps, "end": end, "adapter_dir": adapter_dir}


# ----------------------------------------------------------------------------- scoring
@torch.no_grad()
def preference_accuracy(model_dir: Path, adapter_dir: Path | None, eval_file: Path) -> float:
    """Share of pairs whose chosen answer has the higher summed log-prob (tokens after the
    prompt, as the chat template renders them), with plain transformers (+ peft)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    right = 0
    rows = [json.loads(x) for x in eval_file.read_text().splitlines()]
    for row in rows:
        prompt = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        scores = []
        for key in ("chosen", "rejected"):
            text = tok.apply_chat_template(row["prompt"] + row[key], tokenize=False)
            ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
            start = len(tok(prompt, add_special_tokens=False).input_ids)
            logps = model(ids).logits[0, :-1].log_softmax(-1)
            target = ids[0, 1:]
            token_logps = logps.gather(-1, target[:, None])[:, 0]
            scores.append(float(token_logps[start - 1 :].sum()))
        right += scores[0] > scores[1]
    return right / len(rows)


# ----------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--scheduler", default="cosine", choices=["cosine", "linear", "constant"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--capitals", type=int, default=48, help="names per side; 0 = new per pair")
    p.add_argument(
        "--floor", action="store_true",
        help="also run TRL from starting weights perturbed by 1e-7: the float noise floor",
    )  # fmt: skip
    p.add_argument("--set", action="append", default=[], help="peftkit recipe key=json")
    p.add_argument("--workdir", type=Path, default=None, help="keep the files here")
    a = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = a.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        paths = build_workload(work, a.capitals)
        ours = run_peftkit(paths, work, a)
        theirs = run_trl(paths, work, a, ours)
        floor = run_trl(paths, work, a, ours, perturb=1e-7)["steps"] if a.floor else None
        print("| step | peftkit loss | TRL loss | diff | peftkit margin | TRL margin | diff |")
        print("|---|---|---|---|---|---|---|")
        worst = 0.0
        for i, (x, y) in enumerate(zip(ours["steps"], theirs["steps"]), start=1):
            d = x["loss"] - y["loss"]
            worst = max(worst, abs(d))
            m = x.get("rewards/margins", float("nan"))
            print(
                f"| {i} | {x['loss']:.4f} | {y['loss']:.4f} | {d:+.1e} | {m:+.4f} | "
                f"{y['margin']:+.4f} | {m - y['margin']:+.1e} |"
            )
        weights = max(float((ours["end"][k] - theirs["end"][k]).abs().max()) for k in ours["end"])
        base = preference_accuracy(paths["model"], None, paths["eval"])
        acc_ours = preference_accuracy(paths["model"], ours["adapter_dir"], paths["eval"])
        acc_theirs = preference_accuracy(paths["model"], theirs["adapter_dir"], paths["eval"])
        print(f"\nlargest loss difference per step: {worst:.1e}")
        if floor is not None:
            noise = max(abs(x["loss"] - y["loss"]) for x, y in zip(theirs["steps"], floor))
            print(f"float noise floor (TRL against TRL from 1e-7-perturbed weights): {noise:.1e}")
        print(f"largest adapter weight difference at the end: {weights:.1e}")
        print(
            f"held-out preference accuracy: base {base:.3f}, peftkit {acc_ours:.3f}, "
            f"TRL {acc_theirs:.3f}"
        )
        p = ours["summary"].get("preference", {})
        print(
            f"peftkit summary: eval reward accuracy {p['eval_accuracies_before']:.3f} -> "
            f"{p['eval_accuracies_after']:.3f}, margin {p['eval_margins_before']:+.4f} -> "
            f"{p['eval_margins_after']:+.4f}"
        )


if __name__ == "__main__":
    sys.exit(main())
