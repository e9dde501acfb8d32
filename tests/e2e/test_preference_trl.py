"""Preference objectives against TRL's own trainers: same tiny model, same adapter weights, same
rows in the same order, same optimizer. peftkit's loss and rewards at the first step equal TRL's
within 1e-5 (fp32), and after 20 steps the losses still agree within 1e-3.

At the first step DPO's and KTO's policy is their reference (loss log 2, rewards 0, on both
sides by definition); ORPO's rewards are beta * mean log-probs, non-zero from the start. The
20-step trajectories are what tells the implementations apart.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from peftkit.recipe.load import load_recipe
from peftkit.training.loop import FineTuneRun
from tests.conftest import write_jsonl, write_recipe

pytestmark = pytest.mark.filterwarnings("ignore")

STEPS, BATCH, LR = 20, 4, 5e-3
CASES = {
    "dpo-sigmoid": ({"type": "dpo", "beta": 0.1, "loss_type": "sigmoid"}, "pairs"),
    "dpo-ipo": ({"type": "dpo", "beta": 0.1, "loss_type": "ipo"}, "pairs"),
    "orpo": ({"type": "orpo", "beta": 0.1}, "pairs"),
    "kto": ({"type": "kto", "beta": 0.1}, "kto"),
}
METRICS = ["rewards/chosen", "rewards/rejected"]


@pytest.fixture(scope="module")
def no_bos_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with a tokenizer that adds no BOS (TRL's ORPO prepends the BOS it knows)."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-no-bos")
    for f in tiny_model.iterdir():
        shutil.copy(f, out / f.name)
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    tok.bos_token = None
    tok.save_pretrained(str(out))
    return out


def _rows(kind: str) -> list[dict]:
    rng = random.Random(1)
    rows = []
    for _ in range(24):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        prompt = f"What is {a} + {b}?\n"
        good, bad = f"It is {a + b}.", f"It is {a + b + rng.randint(1, 3)}."
        if kind == "pairs":
            rows.append({"prompt": prompt, "chosen": good, "rejected": bad})
        else:
            desirable = rng.random() < 0.5
            rows.append(
                {"prompt": prompt, "completion": good if desirable else bad, "label": desirable}
            )
    return rows


def _peftkit(tmp_path: Path, model: Path, objective: dict, data: Path):
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        model,
        data,
        objective=objective,
        adapter={"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        train={
            "max_steps": STEPS,
            "micro_batch_size": BATCH,
            "lr": LR,
            "scheduler": "constant",
            "warmup_steps": 0,
            "max_grad_norm": None,
            "precision": "fp32",
            "seed": 0,
        },
    )
    run = FineTuneRun(load_recipe(recipe))
    run.setup()
    start = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    order = []  # the rows of each step, in peftkit's order
    for step in range(STEPS):
        epoch, in_epoch = divmod(step, run.plan.steps_per_epoch)
        (mb,) = run.plan.micro_batches(run.plan.epoch_order(epoch), in_epoch, 0, None)
        order += [run.data.train[i] for i in mb]
    encoded = [
        [r.chosen.input_ids.tolist(), *([r.rejected.input_ids.tolist()] if r.rejected else [])]
        for r in order
    ]
    run.train()
    run.finish()
    records = [json.loads(x) for x in (run.run.metrics).read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    return run, start, order, encoded, steps


def _line(origin: str) -> int:
    return int(origin.rsplit(" ", 1)[-1])


def _trl_trainer(kind: str, objective: dict, model, tokenizer, dataset, out: Path):
    from torch.utils.data import SequentialSampler

    common = dict(
        output_dir=str(out),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        max_steps=STEPS,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=0.0,
        optim="adamw_torch",
        weight_decay=0.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=0,
        max_length=None,
        dataloader_num_workers=0,
    )
    if objective["type"] == "dpo":
        from trl import DPOConfig
        from trl import DPOTrainer as Base

        args = DPOConfig(**common, beta=objective["beta"], loss_type=[objective["loss_type"]])
    elif objective["type"] == "kto":
        from trl import KTOConfig
        from trl import KTOTrainer as Base

        args = KTOConfig(**common, beta=objective["beta"])
    else:
        from trl.experimental.orpo import ORPOConfig
        from trl.experimental.orpo import ORPOTrainer as Base

        args = ORPOConfig(**common, beta=objective["beta"])

    class Recording(Base):
        """Keeps each step's loss and rewards at full precision (the trainer's logs round)."""

        seen: list[dict] = []

        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)  # peftkit's order, given as data order

        def _store(self) -> dict:
            if objective["type"] == "orpo":
                return self._stored_metrics["train"]
            return self._metrics["train"]

        def compute_loss(self, model, inputs, *a, **k):
            before = {m: len(self._store().get(m, [])) for m in METRICS}
            loss = super().compute_loss(model, inputs, *a, **k)
            out = loss[0] if isinstance(loss, tuple) else loss
            store = self._store()
            new = {m: float(store[m][-1]) for m in METRICS if len(store.get(m, [])) > before[m]}
            self.seen.append({"loss": out.item(), **new})
            return loss

    Recording.seen = []
    return Recording(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_losses_and_rewards_equal_trl(tmp_path, no_bos_model, case):
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    objective, kind = CASES[case]
    rows = _rows(kind)
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    run, start, order, encoded, ours = _peftkit(tmp_path, no_bos_model, objective, data)

    # TRL: the same adapter config and starting weights, the rows in peftkit's order.
    base = AutoModelForCausalLM.from_pretrained(str(no_bos_model), dtype=torch.float32)
    model = get_peft_model(base, run.accelerator.unwrap_model(run.model).peft_config["default"])
    missing = model.load_state_dict(start, strict=False)
    assert not [k for k in start if k in missing.unexpected_keys]
    loaded = dict(model.named_parameters())
    assert all(torch.equal(loaded[k], v) for k, v in start.items())
    tokenizer = AutoTokenizer.from_pretrained(str(no_bos_model))
    dataset = Dataset.from_list([rows[_line(r.origin) - 1] for r in order])
    trainer = _trl_trainer(kind, objective, model, tokenizer, dataset, tmp_path / "trl")

    # Precondition: both sides score the very same token sequences.
    first = trainer.train_dataset[0]
    if "prompt_ids" in first and "chosen_ids" in first:
        assert first["prompt_ids"] + first["chosen_ids"] == encoded[0][0]
        assert first["prompt_ids"] + first["rejected_ids"] == encoded[0][1]
    elif "prompt_ids" in first:
        assert first["prompt_ids"] + first["completion_ids"] == encoded[0][0]
    else:  # ORPO's own tokenizer path
        assert first["chosen_input_ids"] == encoded[0][0]
        assert first["rejected_input_ids"] == encoded[0][1]

    trainer.train()
    theirs = trainer.seen
    assert len(theirs) == STEPS and len(ours) == STEPS

    assert ours[0]["loss"] == pytest.approx(theirs[0]["loss"], abs=1e-5)
    for m in METRICS:
        if m in theirs[0]:
            assert ours[0][m] == pytest.approx(theirs[0][m], abs=1e-5), m
    for step, (a, b) in enumerate(zip(ours, theirs), start=1):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-3), f"step {step}"
    # ... and the adapters learnt: the loss moved
    assert abs(ours[-1]["loss"] - ours[0]["loss"]) > 1e-3
