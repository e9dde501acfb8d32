"""Launch configs: every shipped accelerate config parses into the launch it names, and the
memory planner divides what that launch shards by the number of processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftkit.launch import Launch
from peftkit.planner.counts import ModelCounts
from peftkit.planner.estimate import Workload, estimate

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
EXPECTED = {
    "fsdp2.yaml": ("fsdp", True),
    "fsdp2-qlora.yaml": ("fsdp", True),
    "deepspeed-zero2.yaml": ("deepspeed", False),
    "deepspeed-zero3.yaml": ("deepspeed", True),
}


def test_every_shipped_config_is_known():
    assert {p.name for p in CONFIGS} == set(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_parses_and_says_how_to_launch(path):
    launch = Launch.from_accelerate_config(path)
    assert (launch.kind, launch.shards_weights) == EXPECTED[path.name]
    assert launch.processes == 2 and launch.shards_state
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# accelerate launch --config_file recipes/accelerate/{path.name} ")


def test_planner_divides_sharded_state_by_the_processes():
    counts = ModelCounts(
        base_params=1_000_000,
        quantizable_params=800_000,
        adapter_params=10_000,
        trainable_params=10_000,
        adapter_input_features=256,
        layers=4,
        hidden=64,
        intermediate=128,
        heads=4,
        kv_heads=4,
        vocab=1000,
    )

    def parts(**sharding):
        return estimate(
            counts,
            precision="fp32",
            storage_dtype="float32",
            quant_bits=None,
            full_weights=False,
            optimizer="adamw",
            gradient_checkpointing=False,
            supervised_only=True,
            lora=True,
            work=Workload(256, 64),
            runtime_bytes=0,
            cpu=False,
            **sharding,
        ).parts

    one, zero2, zero3 = parts(), parts(shards=4), parts(shards=4, shard_weights=True)
    for name in ("gradients", "optimizer"):
        assert zero2[name] == zero3[name] == one[name] / 4
    assert zero2["weights"] == one["weights"]
    one_layer = 800_000 * 4 / 4  # gathered one decoder layer at a time
    assert zero3["weights"] == one["weights"] / 4 + one_layer
    assert zero3["activations"] == one["activations"]  # each process its own micro-batch


def test_peftkit_train_leaves_the_process_group_when_done(
    tiny_model, chat_file, tmp_path, monkeypatch
):
    """A process that exits with its gloo group still up can abort in the group's threads at
    interpreter exit; `peftkit train` leaves the group once the run is done."""
    import torch.distributed as dist

    from peftkit.cli import main
    from tests.conftest import free_port, write_recipe

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        recipe = write_recipe(tmp_path / "r.yaml", tiny_model, chat_file, train={"max_steps": 1})
        assert main(["train", str(recipe)]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
