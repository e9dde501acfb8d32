"""Scores of one generated answer against the held-out reference answer, each in [0, 1].

    exact        1 if the answers are equal after stripping surrounding whitespace
    contains     1 if the reference occurs in the answer (case-insensitive)
    json_fields  1 if the answer's first JSON object has exactly the reference's fields and values;
                 `field_accuracy` (share of the reference's fields that are right) is kept beside
    tool_call    1 if the answer's tool calls (parsed in the chat template's call format) have
                 the reference's function names and exactly its arguments; `name_accuracy` and
                 `field_accuracy` (share of the reference's argument keys that are right) beside.
                 Only rows whose reference is a tool call are scored
    python       a user's function `(answer: str, reference: str) -> float | bool`, named in the
                 recipe as `module:function` or `path/to/file.py:function`

Values are compared as JSON values: 3 and "3" differ, as they would for the program that reads
the answer.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftkit.data.agent import one_call
from peftkit.data.tool_calls import UnknownToolFormat, has_reasoning, parse_reply, require_family
from peftkit.errors import RecipeError

Scorer = Callable[[str, str], dict[str, float]]
"""(answer, reference) -> {"score": ..., other per-row figures averaged alongside}."""


def exact(answer: str, reference: str) -> dict[str, float]:
    return {"score": float(answer.strip() == reference.strip())}


def contains(answer: str, reference: str) -> dict[str, float]:
    return {"score": float(reference.strip().lower() in answer.lower())}


def first_json_object(text: str) -> dict[str, Any] | None:
    """The first `{...}` in `text` that parses as a JSON object, else None."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except ValueError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    return None


def json_fields(answer: str, reference: str) -> dict[str, float]:
    expected = json.loads(reference)
    got = first_json_object(answer)
    if got is None:
        return {"score": 0.0, "field_accuracy": 0.0, "json_parsed": 0.0}
    right = sum(1 for k, v in expected.items() if k in got and got[k] == v)
    return {
        "score": float(got == expected),
        "field_accuracy": right / max(len(expected), 1),
        "json_parsed": 1.0,
    }


class ToolCallMetric:
    """`tool_call`: the answer's calls against the reference's, both parsed in the call format
    of the chat template training rendered them with (`peftkit.data.tool_calls`)."""

    def __init__(self, chat_template: str | None, key: str = "eval.metric tool_call") -> None:
        try:
            self.family = require_family(chat_template)
        except UnknownToolFormat as e:
            raise RecipeError(f"{key}: {e}") from None
        self.reasoning = has_reasoning(chat_template)

    def calls(self, text: str) -> list[tuple[str, dict[str, Any]]]:
        reply = parse_reply(text, self.family, self.reasoning)
        return [
            (c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in reply.tool_calls
        ]

    def applies(self, reference: str) -> bool:
        """Whether a held-out row's reference answer is a tool call (only those are scored)."""
        return bool(self.calls(reference))

    @staticmethod
    def structured(reference: Any) -> list[tuple[str, dict[str, Any]]]:
        """Calls given as data: OpenAI `tool_calls` (a list, arguments an object or JSON text)
        or one {"name", "arguments"} object."""
        items = reference if isinstance(reference, list) else [reference]
        calls = [one_call(item, f"tool call {i}") for i, item in enumerate(items)]
        return [(c["function"]["name"], c["function"]["arguments"]) for c in calls]

    def __call__(self, answer: str, reference: Any) -> dict[str, float]:
        """Scores of `answer` against `reference`: a call as the template writes it (text), or
        calls given as data (`structured`)."""
        expected = (
            self.calls(reference) if isinstance(reference, str) else self.structured(reference)
        )
        got = self.calls(answer)
        pairs = list(zip(expected, got))  # the i-th call against the i-th call
        keys = sum(len(args) for _, args in expected)
        right = sum(
            1
            for (_, want), (_, have) in pairs
            for k, v in want.items()
            if k in have and have[k] == v
        )
        if keys:
            fields = right / keys
        else:  # calls without arguments: right when the answer's are empty too
            fields = float(len(got) >= len(expected) and all(w[1] == h[1] for w, h in pairs))
        return {
            "score": float(got == expected),
            "name_accuracy": sum(w[0] == h[0] for w, h in pairs) / max(len(expected), 1),
            "field_accuracy": fields,
            "call_parsed": float(bool(got)),
        }


BUILTIN: dict[str, Scorer] = {"exact": exact, "contains": contains, "json_fields": json_fields}


def _json_reference(reference: str) -> str | None:
    try:
        value = json.loads(reference)
    except ValueError as e:
        return f"it is not JSON ({e}): {reference[:60]!r}"
    return None if isinstance(value, dict) else f"it is JSON but not an object: {reference[:60]!r}"


REFERENCE_CHECKS: dict[str, Callable[[str], str | None]] = {"json_fields": _json_reference}
"""What a built-in metric needs of each reference answer: the problem, or None if it can score it."""


def import_callable(spec: str, base_dir: Path | None, key: str) -> Callable[..., Any]:
    """The user's function `module:function` or `file.py:function` (the file relative to
    `base_dir` first); `key` names the recipe key in every error."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise RecipeError(f"{key} {spec!r}: write module:function or path/to/file.py:function")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
            path = base_dir / path
        if not path.is_file():
            raise RecipeError(f"{key}: no file {target!r}")
        loader = importlib.util.spec_from_file_location(f"peftkit_user_{path.stem}", path)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise RecipeError(f"{key}: cannot import {target!r}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RecipeError(f"{key}: {target!r} has no function {name!r}")
    return fn


def load_function(spec: str, base_dir: Path | None = None) -> Scorer:
    """The user's scorer `module:function` or `file.py:function` (relative to `base_dir` first),
    wrapped so it returns {"score": float}."""
    fn = import_callable(spec, base_dir, "eval.function")

    def scorer(answer: str, reference: str) -> dict[str, float]:
        return {"score": float(fn(answer, reference))}

    return scorer
