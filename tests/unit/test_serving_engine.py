"""The serving engine's admission and cancellation, on a stand-in for the model (no weights)."""

from __future__ import annotations

import threading

import pytest

from peftkit.adapters.generation import Completion, SamplingOptions
from peftkit.serving.engine import Engine, EngineBusy, Request, RequestTooLarge


class _HeldModel:
    """Stands in for an AdapterSet: each batch waits until the test releases it."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.running = threading.Event()
        self.prompts: list[list[int]] = []

    def stop_ids(self, adapter):
        return {0}

    def generate_rows(self, rows):
        self.running.set()
        assert self.release.wait(10)
        self.prompts += [r.input_ids for r in rows]
        return [Completion("x", [1], len(r.input_ids), "length") for r in rows]


def _request(prompt: int, answers: list) -> Request:
    return Request([prompt], None, SamplingOptions(), lambda kind, value: answers.append(kind))


@pytest.fixture
def held():
    model = _HeldModel()
    engine = Engine(model, max_queue=3, max_batch=1, batch_wait_s=0)
    yield model, engine
    model.release.set()
    engine.close(10)


def test_a_request_is_admitted_whole_or_not_at_all(held):
    model, engine = held
    answers: list[str] = []
    engine.submit(_request(1, answers))
    assert model.running.wait(10)  # prompt 1 generates; the queue (3 places) is empty
    engine.submit(_request(2, answers), _request(3, answers))
    with pytest.raises(EngineBusy, match="2 of 3 queue places taken, this request needs 2"):
        engine.submit(_request(4, answers), _request(5, answers))
    with pytest.raises(
        RequestTooLarge, match="4 prompts in one request; this server queues at most 3"
    ):
        engine.submit(*(_request(9, answers) for _ in range(4)))
    model.release.set()
    engine.close(10)
    assert model.prompts == [[1], [2], [3]]  # nothing of a refused request ran
    assert answers == ["done"] * 3


def test_a_cancelled_request_is_dropped_from_the_queue(held):
    model, engine = held
    answers: list[str] = []
    engine.submit(_request(1, answers))
    assert model.running.wait(10)
    gone = _request(2, answers)
    engine.submit(gone, _request(3, answers))
    gone.cancel()
    model.release.set()
    engine.close(10)
    assert model.prompts == [[1], [3]] and engine.stats.cancelled == 1
