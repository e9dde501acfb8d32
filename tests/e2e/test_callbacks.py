"""A callback from outside the library runs in the training loop at the right steps, reads only
what it declared, and adds its own measurement to the evaluations' metrics records."""

from __future__ import annotations

import json

import torch

from peftkit import api
from peftkit.training.callbacks import Callback, RunInputs
from tests.conftest import chat_rows, write_jsonl, write_recipe


class CountingCallback(Callback):
    """Counts hook calls; at each evaluation adds the norm of the trainable weights."""

    wants_start_eval = True

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model  # its one declared input
        self.calls: list[tuple[str, int | None]] = []

    @classmethod
    def from_run(cls, inputs: RunInputs) -> CountingCallback:
        made.append(cls(inputs.model))
        return made[-1]

    def before_training(self) -> None:
        self.calls.append(("before_training", None))

    def on_step_end(self, step, record) -> None:
        assert record["step"] == step
        self.calls.append(("on_step_end", step))

    def on_eval(self, step, record) -> None:
        norm = sum(p.detach().norm() ** 2 for p in self.model.parameters() if p.requires_grad)
        record["trainable_norm"] = float(norm) ** 0.5
        self.calls.append(("on_eval", step))

    def after_training(self) -> None:
        self.calls.append(("after_training", None))


made: list[CountingCallback] = []


def test_a_callback_from_a_test_runs_at_the_right_steps(tmp_path, tiny_model, chat_file):
    made.clear()
    evals = write_jsonl(tmp_path / "eval.jsonl", chat_rows(4, seed=5))
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_model,
        chat_file,
        data={"train": str(chat_file), "eval": str(evals), "max_length": 128},
        train={"max_steps": 5, "eval_every": 2, "lr": 1e-2},
    )
    summary = api.train(recipe, callbacks=[CountingCallback.from_run])
    (callback,) = made
    steps = [1, 2, 3, 4, 5]
    # step 0 (asked for), 2 and 4 (eval_every), 5 (the final evaluation)
    expected = [("before_training", None), ("on_eval", 0)]
    for step in steps:
        expected.append(("on_step_end", step))
        if step in (2, 4):  # the evaluation of a step runs before its on_step_end
            expected.insert(-1, ("on_eval", step))
    expected += [("on_eval", 5), ("after_training", None)]
    assert callback.calls == expected
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    norms = [(r["step"], r["trainable_norm"]) for r in records if "trainable_norm" in r]
    assert [s for s, _ in norms] == [0, 2, 4, 5]
    assert all("eval_loss" in r for r in records if "trainable_norm" in r)
    assert norms[0][1] != norms[-1][1]  # measured on the model as it trains
    assert summary["steps"] == 5


def test_a_callback_instance_is_run_as_it_is(tmp_path, tiny_model, chat_file):
    class Steps(Callback):
        def __init__(self) -> None:
            self.steps: list[int] = []

        def on_step_end(self, step, record) -> None:
            self.steps.append(step)

    steps = Steps()
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, chat_file, train={"max_steps": 3})
    api.train(recipe, callbacks=[steps])
    assert steps.steps == [1, 2, 3]
