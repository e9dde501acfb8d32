"""One function per benchmarked configuration. Each runs in its own process (see run.py), trains
the same LoRA on the same tokens with the same hyperparameters, saves the adapter, and returns
its measurements. Tokens are counted the same way for every configuration: a forward pre-hook
on the input embedding counts the non-pad ids of every training forward pass."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

HP = {
    "r": 16,
    "alpha": 32,
    "lr": 1e-3,
    "micro_batch_size": 4,
    "grad_accum": 4,
    "max_length": 512,
    "seed": 0,
}


@dataclass
class Clock:
    """Token counter and step timestamps shared by all runners."""

    pad_id: int
    tokens: int = 0
    train_start: float = 0.0

    def __post_init__(self) -> None:
        self.steps: list[tuple[float, int]] = []  # (time at step end, tokens so far)
        self.losses: list[float] = []

    def hook(self, module, args) -> None:
        if module.training:
            self.tokens += int((args[0] != self.pad_id).sum())

    def step_done(self, loss: float | None = None) -> None:
        self.steps.append((time.perf_counter(), self.tokens))
        if loss is not None:
            self.losses.append(loss)

    def attach(self, model) -> None:
        model.get_input_embeddings().register_forward_pre_hook(self.hook)


def encoded_rows(workdir: Path, tokenizer):
    """The training rows exactly as peftkit encodes them (chat template, completion-only labels)."""
    from peftkit.data.pipeline import prepare_data
    from peftkit.recipe.schema import DataSpec

    spec = DataSpec(train=[str(workdir / "train.jsonl")], max_length=HP["max_length"])
    return prepare_data(spec, tokenizer, HP["seed"]).train


def _hf_args(out: Path, steps: int, **extra: Any) -> dict[str, Any]:
    return dict(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=HP["micro_batch_size"],
        gradient_accumulation_steps=HP["grad_accum"],
        learning_rate=HP["lr"],
        max_steps=steps,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=HP["seed"],
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        **extra,
    )


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(
        r=HP["r"], lora_alpha=HP["alpha"], lora_dropout=0.0, target_modules="all-linear",
        task_type="CAUSAL_LM",
    )  # fmt: skip


def _base(workdir: Path, qlora: bool = False):
    """The benchmark's base model; `qlora`: NF4 4-bit (bf16 compute) on the GPU, prepared for
    k-bit training as peft's QLoRA recipe does."""
    from transformers import AutoModelForCausalLM

    if not qlora:
        return AutoModelForCausalLM.from_pretrained(str(workdir / "model"))
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(workdir / "model"), quantization_config=quant, device_map={"": 0}, dtype=torch.bfloat16
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _timing_callback(clock: Clock):
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock.train_start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            clock.step_done()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                clock.losses.append(float(logs["loss"]))

    return Timing()


def hf_trainer(
    workdir: Path, out: Path, steps: int, clock: Clock, bf16: bool = False, qlora: bool = False,
    **_: Any,
) -> dict[str, Any]:  # fmt: skip
    """What a user writes with transformers.Trainer + peft: pre-tokenized rows with -100 labels,
    DataCollatorForSeq2Seq padding each micro-batch to its longest row, default precision
    (`bf16`: bf16 autocast; `qlora`: an NF4 base)."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import (
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )  # fmt: skip

    tokenizer = AutoTokenizer.from_pretrained(str(workdir / "model"))
    rows = encoded_rows(workdir, tokenizer)
    dataset = Dataset.from_list(
        [{"input_ids": r.input_ids.tolist(), "labels": r.labels.tolist()} for r in rows]
    )
    model = get_peft_model(_base(workdir, qlora), _lora_config())
    clock.attach(model)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**_hf_args(out, steps, bf16=bf16 or qlora)),
        train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[_timing_callback(clock)],
    )
    trainer.train()
    model.save_pretrained(str(out / "adapter"))
    return {"precision": "bf16" if trainer.args.bf16 else "fp32"}


def trl_sft(
    workdir: Path, out: Path, steps: int, clock: Clock, packing: bool = False,
    padding_free: bool = False, liger: bool = False, qlora: bool = False, **_: Any,
) -> dict[str, Any]:  # fmt: skip
    """TRL's SFTTrainer on the same pre-tokenized rows (assistant_masks = supervised tokens).

    With packing (best-fit decreasing into max_length bins, padding-free), a "row" is a bin, so
    the micro-batch is scaled to keep the tokens per optimizer step close to the others'."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(workdir / "model"))
    rows = encoded_rows(workdir, tokenizer)
    dataset = Dataset.from_list(
        [
            {
                "input_ids": r.input_ids.tolist(),
                "assistant_masks": (r.labels != -100).astype(int).tolist(),
            }
            for r in rows
        ]
    )
    # rows are already cut at max_length; TRL refuses max_length with padding_free alone
    extra: dict[str, Any] = {
        "max_length": None if padding_free else HP["max_length"],
        "packing": packing,
        "padding_free": padding_free,
        "use_liger_kernel": liger,
    }
    if packing:
        mean_len = sum(len(r.input_ids) for r in rows) / len(rows)
        bins = max(1, round(HP["micro_batch_size"] * mean_len / HP["max_length"]))
        extra["per_device_train_batch_size"] = bins
    if not torch.cuda.is_available():
        # SFTConfig turns bf16 on by default; on a CPU without native bf16 instructions that is
        # emulated and several times slower, so TRL gets the precision peftkit's auto picks.
        from peftkit.training.precision import cpu_has_fast_bf16

        extra["bf16"] = cpu_has_fast_bf16()
    args = SFTConfig(**{**_hf_args(out, steps), **extra})
    model = _base(workdir, qlora)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=_lora_config(), callbacks=[_timing_callback(clock)],
    )  # fmt: skip
    clock.attach(trainer.model)
    trainer.train()
    trainer.model.save_pretrained(str(out / "adapter"))
    return {
        "precision": "bf16" if args.bf16 else "fp32",
        "micro_batch": f"{args.per_device_train_batch_size} {'bins' if packing else 'rows'}",
    }


def peftkit_run(
    workdir: Path, out: Path, steps: int, clock: Clock, train: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None, **_: Any,
) -> dict[str, Any]:  # fmt: skip
    """peftkit from a recipe: its defaults, plus the `train` (and `model`) settings of a
    configuration."""
    from peftkit.recipe.load import validate_recipe
    from peftkit.training.loop import FineTuneRun

    recipe = validate_recipe(
        {
            "name": "bench",
            "model": {"name": str(workdir / "model"), **(model or {})},
            "adapter": {"method": "lora", "r": HP["r"], "alpha": HP["alpha"], "dropout": 0.0},
            "data": {"train": str(workdir / "train.jsonl"), "max_length": HP["max_length"]},
            "train": {
                "max_steps": steps,
                "micro_batch_size": HP["micro_batch_size"],
                "grad_accum": HP["grad_accum"],
                "lr": HP["lr"],
                "scheduler": "linear",
                "warmup_steps": 0,
                "max_grad_norm": 1.0,
                "seed": HP["seed"],
                **(train or {}),
            },
            "output": {"dir": str(out / "run"), "overwrite": True, "plot": False},
        }
    )
    run = FineTuneRun(recipe, on_step=lambda step, record: clock.step_done(record["loss"]))
    run.setup()
    clock.attach(run.accelerator.unwrap_model(run.model))
    clock.train_start = time.perf_counter()
    run.train()
    run.finish()
    (out / "adapter").symlink_to(out / "run" / "adapter")
    return {
        "precision": run.precision,
        "micro_batch": f"{recipe.train.micro_batch_size} rows"
        + (
            " packed"
            if getattr(run.objective, "batching", None) and run.objective.batching.packing
            else ""
        ),
    }


CONFIGS = {
    "hf-trainer": (hf_trainer, {}),
    "trl": (trl_sft, {}),
    "trl-padding-free": (trl_sft, {"padding_free": True}),
    "trl-packing": (trl_sft, {"packing": True}),
    "peftkit-fp32": (peftkit_run, {"train": {"precision": "fp32"}}),
    "peftkit": (peftkit_run, {}),
    "peftkit-tuned": (peftkit_run, {"train": {"micro_batch_size": 16, "grad_accum": 1}}),
    "peftkit-tokens": (peftkit_run, {"train": {"micro_batch_tokens": 1024}}),
    "peftkit-checkpointing": (peftkit_run, {"train": {"gradient_checkpointing": True}}),
    # GPU: every library in bf16, then on an NF4 base (benchmarks/gpu/check.py)
    "hf-trainer-bf16": (hf_trainer, {"bf16": True}),
    "trl-liger": (trl_sft, {"padding_free": True, "liger": True}),
    "hf-trainer-qlora": (hf_trainer, {"qlora": True}),
    "trl-qlora": (trl_sft, {"padding_free": True, "qlora": True}),
    "peftkit-qlora": (peftkit_run, {"model": {"quantization": {"bits": 4}}}),
}
BASELINE = "hf-trainer"
