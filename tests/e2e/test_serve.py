"""`peftkit serve`: OpenAI-compatible answers per adapter on a loopback port, limits, shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from peftkit import api
from peftkit.serving.app import ServeLimits
from tests.e2e.conftest import PROMPTS, SKILLS, alone_greedy

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def adapters_dir(skill_runs, tmp_path_factory):
    """The layout serve expects: one sub-folder (here a link to the run) per adapter."""
    root = tmp_path_factory.mktemp("served")
    for skill, run in skill_runs.items():
        (root / skill).symlink_to(run, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def alone(skill_runs):
    return {
        (a, p): alone_greedy(skill_runs[a] / "adapter" if a else None, p, MAX_TOKENS)
        for a in (*SKILLS, None)
        for p in PROMPTS.values()
    }


@pytest.fixture(scope="module")
def server(adapters_dir):
    limits = ServeLimits(batch_wait_s=0.3, max_body_bytes=20_000, max_prompt_tokens=200)
    server = api.serve(adapters_dir, port=0, served_base_name="tiny", limits=limits, block=False)
    yield server
    server.stop()


def call(url: str, path: str, body: dict | bytes | None = None) -> tuple[int, dict, str]:
    """(status, headers, body text) of a GET (no body) or POST."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def chat_body(model: str, prompt: str, **extra) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        **extra,
    }


def test_models_lists_the_base_and_every_adapter(server):
    status, _, text = call(server.url, "/v1/models")
    models = json.loads(text)["data"]
    assert status == 200
    assert [m["id"] for m in models] == ["tiny", "arithmetic", "repeat", "sort"]
    assert all(m["parent"] == "tiny" for m in models[1:]) and models[0]["parent"] is None


def test_concurrent_requests_across_adapters_are_batched_and_correct(server, alone):
    jobs = [(a, p) for p in PROMPTS.values() for a in (*SKILLS, None)]  # 12 requests
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(
            pool.map(
                lambda job: call(
                    server.url, "/v1/chat/completions", chat_body(job[0] or "tiny", job[1])
                ),
                jobs,
            )
        )
    for (adapter, prompt), (status, _, text) in zip(jobs, answers):
        body = json.loads(text)
        assert status == 200, text
        assert body["choices"][0]["message"]["content"] == alone[(adapter, prompt)]
        assert body["model"] == (adapter or "tiny")
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    stats = json.loads(call(server.url, "/health")[2])["stats"]
    assert stats["mixed_batches"] >= 1 and stats["largest_batch"] >= 4


def test_completions_endpoint_continues_raw_text(server):
    from peftkit.adapters.adapter_set import AdapterSet
    from peftkit.adapters.generation import SamplingOptions

    prompt = "Q: What is 12 + 30?\nA:"
    status, _, text = call(
        server.url,
        "/v1/completions",
        {"model": "tiny", "prompt": [prompt, prompt], "temperature": 0, "max_tokens": 12},
    )
    options = SamplingOptions(max_new_tokens=12)
    expected = AdapterSet("builtin:tiny-llama").generate([prompt], options=options)[0].text
    choices = json.loads(text)["choices"]
    assert status == 200 and [c["text"] for c in choices] == [expected, expected]
    assert expected.strip()


def test_streaming_sends_the_same_answer_in_pieces(server, alone):
    # an adapter whose answer has some length (the toy adapters' answers change with training)
    skill = max(SKILLS, key=lambda s: len(alone[(s, PROMPTS[s])]))
    assert len(alone[(skill, PROMPTS[skill])]) > 3
    status, headers, text = call(
        server.url,
        "/v1/chat/completions",
        chat_body(skill, PROMPTS[skill], stream=True, stream_options={"include_usage": True}),
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert len([p for p in pieces if p]) > 1  # really streamed, not one piece
    assert "".join(pieces) == alone[(skill, PROMPTS[skill])]
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["usage"]["completion_tokens"] > 0


def test_seeded_sampling_is_reproducible_under_concurrency(server):
    # temperature 2 on the base model: unseeded draws would all differ
    body = chat_body("tiny", PROMPTS["sort"], temperature=2.0, seed=7, max_tokens=16)
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: call(server.url, "/v1/chat/completions", body), range(3)))
    texts = {json.loads(t)["choices"][0]["message"]["content"] for _, _, t in answers}
    assert len(texts) == 1 and texts != {""}


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (chat_body("nope", "hi"), 404, "`nope` does not exist"),
        (chat_body("../sort", "hi"), 404, "does not exist"),  # names only, never paths
        (chat_body("/tmp", "hi"), 404, "does not exist"),
        (chat_body("sort", "x " * 15_000), 413, "request body over 20000 bytes"),
        (chat_body("sort", "seven " * 300), 400, "at most 200"),
        (chat_body("sort", "hi", max_tokens=5000), 400, "above this server's limit"),
        (chat_body("sort", "hi", n=2), 400, "only n=1"),
        ({"model": "sort", "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
        (b"{not json", 400, "not valid JSON"),
        (
            chat_body("sort", [{"type": "image_url", "image_url": {"url": "x"}}]),
            400,
            "content part type 'image_url' is not supported",
        ),
    ],
)
def test_bad_requests_get_clear_errors(server, body, status, needle):
    got, _, text = call(server.url, "/v1/chat/completions", body)
    assert got == status and needle in json.loads(text)["error"]["message"], text


def test_an_empty_prompt_is_a_client_error_even_among_others(server):
    body = {"model": "sort", "prompt": ["Sort: 3, 1", ""], "max_tokens": 4, "temperature": 0}
    got, _, text = call(server.url, "/v1/completions", body)
    assert got == 400 and "prompt: the prompt is empty" in json.loads(text)["error"]["message"]


def test_server_is_healthy_after_everything(server, alone):
    status, _, text = call(
        server.url, "/v1/chat/completions", chat_body("repeat", PROMPTS["repeat"])
    )
    assert status == 200
    assert (
        json.loads(text)["choices"][0]["message"]["content"] == alone[("repeat", PROMPTS["repeat"])]
    )
    health = json.loads(call(server.url, "/health")[2])
    assert health["status"] == "ok" and health["stats"]["errors"] == 0


def test_full_queue_answers_busy_then_recovers(adapters_dir, alone):
    limits = ServeLimits(max_queue=1, max_batch=1, batch_wait_s=0)
    server = api.serve(adapters_dir, port=0, limits=limits, block=False)
    try:
        body = chat_body("sort", PROMPTS["sort"])
        with ThreadPoolExecutor(12) as pool:
            answers = list(
                pool.map(lambda _: call(server.url, "/v1/chat/completions", body), range(12))
            )
        busy = [(h, t) for s, h, t in answers if s == 503]
        done = [t for s, _, t in answers if s == 200]
        assert busy and done and len(busy) + len(done) == 12
        assert json.loads(busy[0][1])["error"]["type"] == "server_busy"
        assert busy[0][0]["retry-after"] == "1"
        expected = alone[("sort", PROMPTS["sort"])]
        assert all(json.loads(t)["choices"][0]["message"]["content"] == expected for t in done)
        status, _, _ = call(server.url, "/v1/chat/completions", body)
        assert status == 200
    finally:
        server.stop()


def test_cli_serve_shuts_down_gracefully_on_sigterm(adapters_dir, alone):
    """`peftkit serve --port 0` in its own process: SIGTERM during a request lets it finish."""
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "peftkit", "serve", "--adapters-dir", str(adapters_dir)),
            *("--port", "0", "--batch-wait-ms", "1500"),  # requests wait 1.5 s in the batch window
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        url = None
        for line in process.stdout:
            if "listening on" in line:
                url = line.split("listening on ")[1].split("/v1")[0]
                break
        assert url, process.stderr.read()
        assert call(url, "/health")[0] == 200  # up, with its signal handlers installed
        result = {}
        request = threading.Thread(
            target=lambda: result.update(
                answer=call(
                    url, "/v1/chat/completions", chat_body("arithmetic", PROMPTS["arithmetic"])
                )
            )
        )
        request.start()
        threading.Event().wait(0.5)  # the request is in the engine's batch window now
        process.send_signal(signal.SIGTERM)
        request.join(60)
        # uvicorn re-raises the signal once it has shut down: "terminated by SIGTERM", as
        # service managers expect of a clean stop
        assert process.wait(60) in (0, -signal.SIGTERM)
        assert "Traceback" not in process.stderr.read()
        status, _, text = result["answer"]
        assert status == 200
        answer = json.loads(text)["choices"][0]["message"]["content"]
        assert answer == alone[("arithmetic", PROMPTS["arithmetic"])]
    finally:
        process.kill()


def test_a_request_larger_than_the_queue_is_refused_before_anything_generates(server):
    before = json.loads(call(server.url, "/health")[2])["stats"]
    body = {"model": "tiny", "prompt": ["Q: 1 + 1?\nA:"] * 65, "max_tokens": 4}
    got, _, text = call(server.url, "/v1/completions", body)
    assert got == 400, text
    assert "65 prompts in one request; this server queues at most 64" in text
    after = json.loads(call(server.url, "/health")[2])["stats"]
    assert after["requests"] == before["requests"]  # none of its prompts ran


def _leave_mid_answer(url: str, body: dict) -> None:
    """Send a request, read the start of the answer (streamed) or nothing, and hang up."""
    import http.client
    from urllib.parse import urlparse

    where = urlparse(url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    connection.request(
        "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
    )
    if body["stream"]:
        response = connection.getresponse()
        while b'"text": ""' in (line := response.fp.readline()) or not line.strip():
            pass  # until the first piece of generated text
    else:
        threading.Event().wait(0.5)
    connection.sock.shutdown(2)
    connection.close()


def test_a_client_that_hangs_up_has_its_row_stopped(adapters_dir, monkeypatch):
    from peftkit.adapters import generation
    from peftkit.adapters.adapter_set import AdapterSet

    # no stop token, ~20 ms a token: uncancelled, each answer runs to its 200 tokens (4 s)
    monkeypatch.setattr(AdapterSet, "stop_ids", lambda self, adapter: set())
    put = generation._RowStreamer.put
    monkeypatch.setattr(
        generation._RowStreamer, "put", lambda self, v: threading.Event().wait(0.02) or put(self, v)
    )
    server = api.serve(adapters_dir, port=0, limits=ServeLimits(batch_wait_s=0), block=False)
    try:
        for cancelled, stream in enumerate([True, False], start=1):
            body = {"model": "sort", "prompt": "Sort: 3, 1", "max_tokens": 200, "stream": stream}
            before = json.loads(call(server.url, "/health")[2])["stats"]
            _leave_mid_answer(server.url, body | {"temperature": 0})
            for _ in range(200):
                stats = json.loads(call(server.url, "/health")[2])["stats"]
                if stats["cancelled"] == cancelled:
                    break
                threading.Event().wait(0.05)
            assert stats["cancelled"] == cancelled, (stream, stats)
            assert stats["generated_tokens"] - before["generated_tokens"] < 100, (stream, stats)
    finally:
        server.stop()
