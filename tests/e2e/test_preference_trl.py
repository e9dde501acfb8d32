"""Preference objectives against TRL's own trainers: same tiny model, same adapter weights, same
rows in the same order, same optimizer. peftkit's loss and rewards at the first step equal TRL's
within 1e-5 (fp32), and after 20 steps the losses still agree within 1e-3.

At the first step DPO's and KTO's policy is their reference (loss log 2, rewards 0, on both
sides by definition); ORPO's rewards are beta * mean log-probs, non-zero from the start. The
20-step trajectories are what tells the implementations apart.

A second set runs what a shipped recipe sets (cosine with warmup, the default optimizer and
clipping, 4 pairs x 2 accumulation, LoRA r16 on all linear layers) on conversations whose answers
differ in one word, with TRL applying its own peft `LoraConfig`: losses and reward margins agree
within 1e-3 at every step and the adapters at the end. 16 steps: at lr 5e-3 float rounding grows
after ~25 steps (benchmarks/dpo_parity.py measures it), while a wrong warmup shows at step 2 and
a wrong set of scored tokens by step 6.
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
CONSTANT = {"steps": STEPS, "micro_batch": BATCH, "grad_accum": 1, "lr": LR}
CONSTANT |= {"scheduler": "constant", "warmup": 0, "clip": None}
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


def _peftkit(tmp_path: Path, model: Path, objective: dict, data: Path, setting: dict, **train):
    """`train` holds what a recipe sets; what it leaves out takes the schema's defaults."""
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        model,
        data,
        objective=objective,
        adapter=setting.get("adapter", {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0}),
        train={
            "max_steps": setting["steps"],
            "micro_batch_size": setting["micro_batch"],
            "grad_accum": setting["grad_accum"],
            "lr": setting["lr"],
            "precision": "fp32",
            "seed": 0,
            **train,
        },
    )
    run = FineTuneRun(load_recipe(recipe))
    run.setup()
    start = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    order = []  # the rows of each step, in peftkit's order
    for step in range(setting["steps"]):
        epoch, in_epoch = divmod(step, run.plan.steps_per_epoch)
        for mb in run.plan.micro_batches(run.plan.epoch_order(epoch), in_epoch, 0, None):
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


def _trl_trainer(
    kind: str, objective: dict, model, tokenizer, dataset, out: Path, setting: dict, **extra
):
    from torch.utils.data import SequentialSampler

    common = dict(
        output_dir=str(out),
        per_device_train_batch_size=setting["micro_batch"],
        gradient_accumulation_steps=setting["grad_accum"],
        max_steps=setting["steps"],
        learning_rate=setting["lr"],
        lr_scheduler_type=setting["scheduler"],
        warmup_steps=setting["warmup"],
        max_grad_norm=setting["clip"] or 0.0,
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
    elif objective["type"] == "simpo":
        from trl.experimental.cpo import CPOConfig
        from trl.experimental.cpo import CPOTrainer as Base

        args = CPOConfig(
            **common,
            beta=objective["beta"],
            loss_type="simpo",
            cpo_alpha=0.0,
            simpo_gamma=objective["gamma"],
        )
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
            if objective["type"] in ("orpo", "simpo"):
                return self._stored_metrics["train"]
            return self._metrics["train"]

        def compute_loss(self, model, inputs, *a, **k):
            recorded = [*METRICS, "rewards/margins"]
            before = {m: len(self._store().get(m, [])) for m in recorded}
            loss = super().compute_loss(model, inputs, *a, **k)
            out = loss[0] if isinstance(loss, tuple) else loss
            store = self._store()
            new = {m: float(store[m][-1]) for m in recorded if len(store.get(m, [])) > before[m]}
            self.seen.append({"loss": out.item(), **new})
            return loss

    Recording.seen = []
    return Recording(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, **extra
    )


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_losses_and_rewards_equal_trl(tmp_path, no_bos_model, case):
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    objective, kind = CASES[case]
    rows = _rows(kind)
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    run, start, order, encoded, ours = _peftkit(
        tmp_path, no_bos_model, objective, data, CONSTANT,
        scheduler="constant", warmup_steps=0, max_grad_norm=None,
    )  # fmt: skip

    # TRL: the same adapter config and starting weights, the rows in peftkit's order.
    base = AutoModelForCausalLM.from_pretrained(str(no_bos_model), dtype=torch.float32)
    model = get_peft_model(base, run.accelerator.unwrap_model(run.model).peft_config["default"])
    missing = model.load_state_dict(start, strict=False)
    assert not [k for k in start if k in missing.unexpected_keys]
    loaded = dict(model.named_parameters())
    assert all(torch.equal(loaded[k], v) for k, v in start.items())
    tokenizer = AutoTokenizer.from_pretrained(str(no_bos_model))
    dataset = Dataset.from_list([rows[_line(r.origin) - 1] for r in order])
    trainer = _trl_trainer(kind, objective, model, tokenizer, dataset, tmp_path / "trl", CONSTANT)

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


# ------------------------------------------------------------------ a run like a recipe's
# The shipped recipe's shape: cosine schedule with 2 warmup steps, the default optimizer and
# clipping (AdamW, no weight decay, max_grad_norm 1.0), 8 pairs per step as 4 x 2 accumulation,
# LoRA r 16 on all linear layers; answers that differ in their last word. DPO and KTO read
# conversations (ChatML: TRL scores the newline after <|im_end|>, and so does peftkit); ORPO and
# SimPO read string prompts (see test_trl_orpo_appends_an_eos_after_the_chat_template).
RECIPE_LIKE = {"steps": 16, "micro_batch": 4, "grad_accum": 2, "lr": 5e-3, "scheduler": "cosine"}
RECIPE_LIKE |= {"warmup": 2, "clip": 1.0}
RECIPE_LIKE["adapter"] = {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0}
RECIPE_CASES = {
    "dpo": ({"type": "dpo", "beta": 0.1, "loss_type": "sigmoid"}, "chat-pairs"),
    "kto": ({"type": "kto", "beta": 0.1}, "chat-kto"),
    "orpo": ({"type": "orpo", "beta": 0.1}, "pairs"),
    "simpo": ({"type": "simpo", "beta": 2.0, "gamma": 0.5}, "pairs"),
}
CITIES = "Pell Rask Dorn Vale Tusk Mire Holt Fenn".split()


def _capital_rows(kind: str, n: int = 48) -> list[dict]:
    """ "What is the capital of X?" -> "The capital of X is Y." over "... is Z.": one word apart."""
    rng = random.Random(2)
    rows = []
    for i in range(n):
        country = "".join(rng.choice("abcdefgh") for _ in range(4)).capitalize()
        good, bad = CITIES[i % 4], CITIES[4 + rng.randint(0, 3)]
        question = f"What is the capital of {country}?"
        answers = [f"The capital of {country} is {city}." for city in (good, bad)]
        if kind == "pairs":
            rows.append({"prompt": question + "\n", "chosen": answers[0], "rejected": answers[1]})
            continue
        prompt = [{"role": "user", "content": question}]
        turns = [[{"role": "assistant", "content": a}] for a in answers]
        if kind == "chat-pairs":
            rows.append({"prompt": prompt, "chosen": turns[0], "rejected": turns[1]})
        else:
            desirable = rng.random() < 0.5
            rows.append({"prompt": prompt, "completion": turns[1 - desirable], "label": desirable})
    return rows


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_a_recipe_like_run_follows_trl(tmp_path, no_bos_model, case):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    objective, kind = RECIPE_CASES[case]
    setting = RECIPE_LIKE
    rows = _capital_rows(kind)
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    # scheduler, warmup and clipping as a recipe writes them; optimizer and its settings default
    run, start, order, encoded, ours = _peftkit(
        tmp_path, no_bos_model, objective, data, setting,
        scheduler=setting["scheduler"], warmup_steps=setting["warmup"],
    )  # fmt: skip
    assert run.recipe.train.max_grad_norm == setting["clip"]

    # TRL: its trainer applies a peft LoraConfig (the reference is the adapter switched off);
    # then peftkit's starting adapter weights, and the rows in peftkit's order.
    config = run.accelerator.unwrap_model(run.model).peft_config["default"]
    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=config.target_modules,
        task_type="CAUSAL_LM",
    )
    base = AutoModelForCausalLM.from_pretrained(str(no_bos_model), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(no_bos_model))
    dataset = Dataset.from_list([rows[_line(r.origin) - 1] for r in order])
    trainer = _trl_trainer(
        "pairs" if "pairs" in kind else "kto", objective, base, tokenizer, dataset,
        tmp_path / "trl", setting, peft_config=lora,
    )  # fmt: skip
    model = trainer.model
    missing = model.load_state_dict(start, strict=False)
    assert not [k for k in start if k in missing.unexpected_keys]
    first = trainer.train_dataset[0]  # both sides score the very same tokens
    if "prompt_ids" in first:
        answer = first["chosen_ids"] if "chosen_ids" in first else first["completion_ids"]
        assert first["prompt_ids"] + answer == encoded[0][0]
    else:
        assert first["chosen_input_ids"] == encoded[0][0]
    trainer.train()

    ga = setting["grad_accum"]
    seen = [s if "rewards/margins" in s else {**s, "rewards/margins": 0.0} for s in trainer.seen]
    # per micro-batch; a step's figures are their mean (equal micro-batches)
    theirs = [
        {k: sum(s[k] for s in seen[i : i + ga]) / ga for k in ("loss", "rewards/margins")}
        for i in range(0, len(seen), ga)
    ]
    assert len(theirs) == len(ours) == setting["steps"]
    for step, (a, b) in enumerate(zip(ours, theirs), start=1):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-3), f"step {step}"
        if objective["type"] != "kto":  # KTO's margins: TRL's are per micro-batch
            assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-3), step
    assert ours[-1]["loss"] < ours[2]["loss"] - 0.01  # it learnt (steps 1-2 are the warmup)
    learnt = dict(model.named_parameters())
    for name in start:
        moved = (run.model.state_dict()[name] - start[name]).abs().max()
        torch.testing.assert_close(
            run.model.state_dict()[name], learnt[name].detach(), atol=1e-3 * moved, rtol=0
        )


@pytest.mark.parametrize("trainer", ["orpo", "simpo"])
def test_trl_orpo_appends_an_eos_after_the_chat_template(tmp_path, no_bos_model, trainer):
    """A deliberate difference: on conversations TRL's ORPO and CPO (SimPO) trainers render the
    chat template and then append the tokenizer's EOS when the text does not end with it
    (`add_eos_token_if_needed`), so they also score a token no chat model writes after its turn
    (ChatML: `<|im_end|>\\n<|endoftext|>`). peftkit scores the conversation as the template
    renders it, as DPO and KTO do in TRL too."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.data.preference import prepare_preference_data
    from peftkit.recipe.schema import DataSpec

    rows = _capital_rows("chat-pairs", n=2)
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    tokenizer = AutoTokenizer.from_pretrained(str(no_bos_model))
    ours = prepare_preference_data(DataSpec(train=[str(data)]), tokenizer, 0, False).train[0]
    rendered = tokenizer.apply_chat_template(rows[0]["prompt"] + rows[0]["chosen"], tokenize=False)
    assert ours.chosen.input_ids.tolist() == tokenizer(rendered).input_ids  # the template's text
    if trainer == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    else:
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer
    args = Config(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to=[], bf16=False)
    model = AutoModelForCausalLM.from_pretrained(str(no_bos_model), dtype=torch.float32)
    trl = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                  processing_class=tokenizer)  # fmt: skip
    theirs = trl.train_dataset[0]
    eos = tokenizer.eos_token_id
    assert ours.chosen.input_ids[-1] != eos
    assert theirs["chosen_input_ids"] == [*ours.chosen.input_ids.tolist(), eos]
    assert theirs["chosen_labels"] == [*ours.chosen.labels.tolist(), eos]
