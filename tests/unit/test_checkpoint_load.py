"""Resuming reads every checkpoint tensor onto the CPU (each state tensor then goes to its own
parameter's device as the optimizer loads it), never onto the device it was saved from: under
DDP that was rank 0's GPU, for every rank."""

from __future__ import annotations

import torch

from peftkit.training import checkpoint as ckpt


def test_checkpoint_tensors_load_onto_the_cpu(tmp_path, monkeypatch):
    from accelerate import Accelerator

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ckpt.save_checkpoint(
        tmp_path,
        Accelerator(cpu=True),
        model,
        optimizer,
        scheduler,
        ckpt.TrainerState(step=1),
        ckpt.rng_state(),
        keep_last=1,
    )
    seen = []
    real = torch.load

    def load(file, *args, **kwargs):
        seen.append((file.name, kwargs.get("map_location")))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "load", load)
    saved = ckpt.read_checkpoint(tmp_path / "step-0000001")
    assert {name for name, _ in seen} == {"optimizer.pt", "scheduler.pt", "rng-0.pt"}
    assert all(where == "cpu" for _, where in seen)
    assert saved.optimizer["state"][0]["exp_avg"].device == torch.device("cpu")
