"""Who may use `peftkit serve`, and what a request may carry: one layer around the app.

- An API key (`--api-key`, `--api-key-file` or `PEFTKIT_API_KEY`), sent as
  `Authorization: Bearer KEY` and compared in constant time, guards every route but `/health`
  (as llama.cpp's server and vLLM do). A non-loopback bind without a key is refused unless
  `--insecure-no-auth` is given.
- POST bodies must be declared `application/json` (415 otherwise): a web page can send a
  `text/plain` POST to localhost without a CORS preflight, never an `application/json` one.
- On a loopback bind, the Host header must name the loopback (`localhost`, `127.0.0.1`, `[::1]`)
  or an `--allowed-host`: a DNS-rebinding page reaches 127.0.0.1 under its own domain name, and
  is refused (400).
- An unexpected error is logged with a request id; the client gets a generic message and the id.
- `/docs`, `/redoc` and `/openapi.json` exist only with `--docs`.
- The template's special tokens (role markers such as `<|im_start|>`) inside message content are
  escaped (tokenized as the plain text they are), refused (400), or allowed, as
  `special_tokens_in_content` says; see `encode_chat`.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, SecretStr
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from peftkit.errors import ServingError
from peftkit.serving import SpecialTokens
from peftkit.serving import protocol as p

log = logging.getLogger("peftkit.serve")

KEY_ENV = "PEFTKIT_API_KEY"
"""The environment variable `peftkit serve` reads its API key from when no flag gives one."""
OPEN_PATHS = frozenset({"/health"})
"""Routes answered without the API key (load balancers' health checks)."""
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class ServeSecurity(BaseModel):
    """How `peftkit serve` guards its routes (built by `security_for`; the CLI's flags)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    api_key: SecretStr | None = None
    """Clients send `Authorization: Bearer KEY`; None: no key asked (loopback only)."""
    allowed_hosts: frozenset[str] | None = None
    """Host header names accepted (any port); None: any (a non-loopback bind)."""
    docs: bool = False
    """Serve the interactive API docs (/docs, /redoc, /openapi.json)."""
    special_tokens_in_content: SpecialTokens = "escape"
    """The template's special tokens inside message content: tokenized as plain text (escape),
    a 400 (refuse), or read as the real tokens (allow: a client can then forge turns)."""


def is_loopback(host: str) -> bool:
    """Whether a bind address reaches this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_api_key(
    api_key: str | None, api_key_file: str | Path | None, env: dict[str, str] | None = None
) -> str | None:
    """The key from the flag, the file (its first line) or `PEFTKIT_API_KEY`, in that order."""
    if api_key is not None and api_key_file is not None:
        raise ServingError("give --api-key or --api-key-file, not both")
    if api_key_file is not None:
        path = Path(api_key_file)
        if not path.is_file():
            raise ServingError(f"--api-key-file: no such file: {path}")
        lines = path.read_text().splitlines()
        api_key = lines[0].strip() if lines else ""
        if not api_key:
            raise ServingError(f"--api-key-file: {path} is empty (the key is its first line)")
    if api_key is None:
        api_key = (os.environ if env is None else env).get(KEY_ENV) or None
    if api_key is not None and not api_key.strip():
        raise ServingError("--api-key: the key is empty")
    return api_key


def security_for(
    host: str,
    api_key: str | None = None,
    insecure_no_auth: bool = False,
    allowed_hosts: tuple[str, ...] = (),
    docs: bool = False,
    special_tokens_in_content: SpecialTokens = "escape",
) -> ServeSecurity:
    """The guard for a server bound to `host`; refuses a non-loopback bind without a key."""
    loopback = is_loopback(host)
    if not loopback and api_key is None and not insecure_no_auth:
        raise ServingError(
            f"refusing to serve on {host} without an API key: anyone who can reach this machine "
            f"could use the server. Give --api-key KEY, --api-key-file FILE or {KEY_ENV}, or "
            "--insecure-no-auth to serve it open anyway"
        )
    names = (
        frozenset(h.lower() for h in (*LOOPBACK_NAMES, host, *allowed_hosts)) if loopback else None
    )
    return ServeSecurity(
        api_key=SecretStr(api_key) if api_key is not None else None,
        allowed_hosts=names,
        docs=docs,
        special_tokens_in_content=special_tokens_in_content,
    )


def docs_routes(security: ServeSecurity) -> dict[str, Any]:
    """FastAPI's docs_url / redoc_url / openapi_url: off unless asked."""
    if security.docs:
        return {}
    return {"docs_url": None, "redoc_url": None, "openapi_url": None}


def _host_name(header: str) -> str:
    """`example.com:8000` -> `example.com`; `[::1]:8000` -> `::1`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _media_type(header: str) -> str:
    return header.split(";", 1)[0].strip().lower()


class SecurityMiddleware:
    """Host allow-list, API key, JSON content type, and no exception text to clients."""

    def __init__(self, app: ASGIApp, security: ServeSecurity) -> None:
        self.app = app
        self.security = security
        key = security.api_key
        self._key = key.get_secret_value().encode() if key is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = uuid.uuid4().hex[:16]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await _answer(send, refusal, rid)
            return
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), _id_header(rid)]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s (%s %s) failed", rid, scope["method"], scope["path"])
            if started:  # a streamed answer broke off: nothing more can be said to the client
                raise
            await _answer(
                send,
                p.ApiError(
                    500,
                    f"internal server error (request id {rid}; the details are in the server log)",
                    "internal_error",
                ),
                rid,
            )

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> p.ApiError | None:
        allowed = self.security.allowed_hosts
        if allowed is not None and _host_name(headers.get("host", "")) not in allowed:
            return p.ApiError(
                400,
                "invalid Host header: this server answers requests to the loopback address only",
                "invalid_request_error",
                "invalid_host",
            )
        if self._key is not None and scope["path"] not in OPEN_PATHS:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            given = token.strip().encode() if scheme.lower() == "bearer" else b""
            if not hmac.compare_digest(given, self._key):
                return p.ApiError(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer KEY'",
                    "invalid_request_error",
                    "invalid_api_key",
                )
        if scope["method"] == "POST" and _media_type(headers.get("content-type", "")) != (
            "application/json"
        ):
            return p.ApiError(
                415,
                "the request body must be sent as Content-Type: application/json",
                "invalid_request_error",
                "unsupported_media_type",
            )
        return None


def _id_header(rid: str) -> tuple[bytes, bytes]:
    return b"x-request-id", rid.encode()


async def _answer(send: Send, error: p.ApiError, rid: str) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), _id_header(rid)]
    if error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------- special tokens in content
def special_tokens(tokenizer: Any) -> list[str]:
    """The tokenizer's special tokens (those its template writes: role and turn markers, EOS)."""
    added = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    found = {t for t in [*tokenizer.all_special_tokens, *added] if t}
    return sorted(found, key=len, reverse=True)


def encode_chat(
    adapters: Any,
    messages: list[dict[str, Any]],
    adapter: str | None,
    mode: str,
    tools: list[dict[str, Any]] | None = None,
):
    """Token ids of chat messages, with special tokens inside their content handled by `mode`.

    `messages` already carry whatever system turn they get (`AdapterSet.with_system`). Content
    without special tokens (and `allow`) goes through `AdapterSet.encode` unchanged.
    `refuse` raises a 400 naming the message and the token. `escape` renders the template with a
    placeholder for each content, then tokenizes the template's text as usual and each content
    with special-token parsing off, so `<|im_start|>` in a message is the characters, never the
    turn marker (the placeholder encoding of vLLM's proposal, llama.cpp's
    `--escape-special-in-input`). Tools and earlier calls (`tools`, `tool_calls`) cannot be
    escaped that way: holding a special token, they are refused unless `mode` is `allow`.
    """
    tokens = special_tokens(adapters.tokenizer)
    structured = json.dumps([tools, [m.get("tool_calls") for m in messages]], ensure_ascii=False)
    forged = next((t for t in tokens if t in structured), None)
    if mode != "allow" and forged is not None:
        raise p.ApiError(
            400,
            f"tools or tool_calls hold the special token {forged!r}, which this server refuses "
            "there (it would be read as a turn marker)",
            "invalid_request_error",
            "special_token_in_content",
        )
    hits = [
        (i, next((t for t in tokens if t in m["content"]), None)) for i, m in enumerate(messages)
    ]
    hits = [(i, t) for i, t in hits if t is not None]
    if mode == "allow" or not hits:
        return adapters.encode(messages, adapter, default_system=False, tools=tools)
    if mode == "refuse":
        i, token = hits[0]
        raise p.ApiError(
            400,
            f"messages.{i}.content: holds the special token {token!r}, which this server refuses "
            "in content (it would be read as a turn marker)",
            "invalid_request_error",
            "special_token_in_content",
        )
    # empty contents (an assistant turn that only calls tools) stay empty: templates test them
    marks = [
        f"\x00peftkit-content-{uuid.uuid4().hex}-{i}\x00" if m["content"] else ""
        for i, m in enumerate(messages)
    ]
    marked = [{**m, "content": mk} if mk else m for m, mk in zip(messages, marks)]
    text = adapters.render(marked, adapter, tools)
    tokenizer = adapters.tokenizer
    ids: list[int] = []
    for mark, message in ((mk, m) for mk, m in zip(marks, messages) if mk):
        before, found, text = text.partition(mark)
        if not found or mark in text:  # the template changed or repeated the content
            raise p.ApiError(
                400,
                "messages: content holding special tokens cannot be escaped with this chat "
                "template; remove the special tokens",
                "invalid_request_error",
                "special_token_in_content",
            )
        ids += tokenizer(before, add_special_tokens=False)["input_ids"] if before else []
        ids += tokenizer(message["content"], add_special_tokens=False, split_special_tokens=True)[
            "input_ids"
        ]
    ids += tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    return ids
