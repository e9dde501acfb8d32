"""The serving engine: a bounded queue of requests and one worker that runs them in batches.

HTTP handlers `submit` requests; the worker thread takes the first waiting request, waits up to
`batch_wait_s` for more (up to `max_batch`), splits the batch by sampling settings (rows of one
generate call must share them) and runs each part as one batch — rows on different adapters
together, through peft's mixed-adapter path. Results and streamed text go back through each
request's `emit` callback. This is request-level (static) batching: a request that arrives while
a batch runs waits for it to finish; there is no per-token scheduling as in vLLM.

The rows of one HTTP request are admitted together or not at all, before any of them runs. A
request whose client has gone (`Request.cancel`) is dropped from the queue, or stops generating
at the next token if its batch is running.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from peftkit.adapters.adapter_set import AdapterSet
from peftkit.adapters.generation import Completion, Row, SamplingOptions

log = logging.getLogger("peftkit.serve")


class EngineBusy(Exception):
    """The queue is full: the client should retry later."""


class EngineClosed(Exception):
    """The engine is shutting down and takes no new requests."""


class RequestTooLarge(Exception):
    """More rows in one submission than the queue can ever hold: retrying cannot help."""


@dataclass
class Request:
    """One prompt to complete. `emit` receives ("text", str), then ("done", Completion) or ("error", str)."""

    input_ids: list[int]
    adapter: str | None
    options: SamplingOptions
    emit: Callable[[str, Any], None]
    stream: bool = False
    seed: int | None = None
    """Seed for sampling; a seeded request runs in a batch of its own, so it is reproducible."""
    created: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set by `cancel`: nobody waits for the answer any more."""

    def cancel(self) -> None:
        """The client has gone: drop the request if queued, stop its row if generating."""
        self.cancelled.set()


@dataclass
class EngineStats:
    requests: int = 0
    batches: int = 0
    mixed_batches: int = 0
    """Batches whose rows used more than one adapter (or an adapter and the base)."""
    largest_batch: int = 0
    busy_rejections: int = 0
    errors: int = 0
    cancelled: int = 0
    """Requests whose client went away: dropped from the queue or stopped while generating."""
    generated_tokens: int = 0


_STOP = object()


class Engine:
    """Runs generation requests against an `AdapterSet` on one worker thread."""

    def __init__(
        self,
        adapters: AdapterSet,
        max_queue: int,
        max_batch: int,
        batch_wait_s: float,
    ) -> None:
        """The limits are `ServeLimits`' (serving/app.py), whose defaults apply."""
        self.adapters = adapters
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.stats = EngineStats()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._closing = threading.Event()
        self._admission = threading.Lock()  # so the rows of one submission enter together
        self._worker = threading.Thread(target=self._run, name="peftkit-engine", daemon=True)
        self._worker.start()

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, *requests: Request) -> None:
        """Queue the rows of one client request: all of them, or (raising) none.

        Raises:
            RequestTooLarge: more rows than the queue holds at all.
            EngineBusy: not enough room in the queue now.
            EngineClosed: the engine is shutting down.
        """
        capacity = self._queue.maxsize
        with self._admission:  # only the worker takes items out meanwhile: room only grows
            if self._closing.is_set():
                raise EngineClosed("the server is shutting down")
            if len(requests) > capacity:
                raise RequestTooLarge(
                    f"{len(requests)} prompts in one request; this server queues at most "
                    f"{capacity}: send them in smaller requests"
                )
            if capacity - self._queue.qsize() < len(requests):
                self.stats.busy_rejections += 1
                raise EngineBusy(
                    f"server busy: {self._queue.qsize()} of {capacity} queue places taken, "
                    f"this request needs {len(requests)}"
                )
            for request in requests:
                self._queue.put_nowait(request)

    def close(self, timeout: float | None = None) -> None:
        """Take no new requests, finish every queued one, stop the worker."""
        with self._admission:
            self._closing.set()
        self._queue.put(
            _STOP
        )  # blocks only while the queue is full, i.e. until the worker drains it
        self._worker.join(timeout)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop = [first], False
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            for group in _by_sampling(batch):
                self._execute(group)
            if stop:
                self._drain()
                return

    def _drain(self) -> None:
        rest = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not _STOP:
                rest.append(item)
        for i in range(0, len(rest), self.max_batch):
            for group in _by_sampling(rest[i : i + self.max_batch]):
                self._execute(group)

    def _execute(self, group: list[Request]) -> None:
        live = [r for r in group if not r.cancelled.is_set()]
        self.stats.cancelled += len(group) - len(live)
        if not live:
            return
        group = live
        rows = [
            Row(
                r.input_ids,
                r.adapter,
                r.options,
                self.adapters.stop_ids(r.adapter),
                on_text=(lambda text, r=r: r.emit("text", text)) if r.stream else None,
                cancelled=r.cancelled.is_set,
            )
            for r in group
        ]
        if group[0].seed is not None:
            torch.manual_seed(group[0].seed)
        self.stats.requests += len(group)
        self.stats.batches += 1
        self.stats.mixed_batches += len({r.adapter for r in group}) > 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(group))
        try:
            completions: list[Completion] = self.adapters.generate_rows(rows)
        except Exception:  # one bad batch must not take the server down
            self.stats.errors += 1
            ref = uuid.uuid4().hex[:16]
            log.exception("generation failed (error id %s)", ref)
            for r in group:  # the exception's text stays in the server log
                r.emit("error", f"generation failed (error id {ref}; details in the server log)")
            return
        for r, completion in zip(group, completions):
            self.stats.generated_tokens += len(completion.token_ids)
            if completion.finish_reason == "cancelled":
                self.stats.cancelled += 1  # nobody is listening
            else:
                r.emit("done", completion)


def _by_sampling(batch: list[Request]) -> list[list[Request]]:
    groups: dict[tuple, list[Request]] = {}
    for r in batch:
        alone = (id(r),) if r.seed is not None else ()  # batch-mates would change its draws
        groups.setdefault((*r.options.batch_key(), *alone), []).append(r)
    return list(groups.values())
