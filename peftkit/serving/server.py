"""Load the adapters of one directory onto a base model and run the HTTP server (uvicorn).

Layout of the adapters directory: one sub-folder per adapter, named as clients will ask for it;
each holds an adapter (adapter_config.json, ...) or is a peftkit run directory (RUN/adapter).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from pathlib import Path
from typing import Any

from peftkit.adapters.adapter_set import NAME_PATTERN, AdapterSet, Quantize, resolve_adapter_dir
from peftkit.errors import ServingError
from peftkit.serving.app import ServeLimits, create_app
from peftkit.serving.security import ServeSecurity

log = logging.getLogger("peftkit.serve")


def adapters_in(directory: str | Path) -> dict[str, Path]:
    """{name: folder} for every sub-folder of `directory` that holds an adapter."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ServingError(f"adapters directory {directory} does not exist")
    found = {}
    for sub in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            adapter = resolve_adapter_dir(sub)
        except ServingError as e:
            log.warning("skipping %s: %s", sub, e)
            continue
        try:
            json.loads((adapter / "adapter_config.json").read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ServingError(
                f"{adapter / 'adapter_config.json'} is damaged (not JSON: {e}); repair or remove "
                f"the folder {sub}"
            ) from None
        if not NAME_PATTERN.match(sub.name):
            raise ServingError(
                f"{sub}: folder names are the served model names; use letters, digits, '.', '_', '-'"
            )
        found[sub.name] = sub
    if not found:
        raise ServingError(f"no adapters in {directory} (expected one sub-folder per adapter)")
    return found


def load_for_serving(
    adapters_dir: str | Path,
    base: str | None,
    dtype: str,
    quantization: Quantize | dict[str, Any] | None,
    allow_mismatch: bool,
    default_system: bool = True,
) -> AdapterSet:
    """Every adapter in `adapters_dir` on one base (see `AdapterSet.from_adapters`)."""
    aset = AdapterSet.from_adapters(
        adapters_in(adapters_dir), base, dtype, quantization, allow_mismatch, default_system
    )
    for warning in aset.warnings:
        log.warning(warning)
    return aset


class Server:
    """uvicorn serving the app on host:port (port 0 = any free port, see `url`)."""

    def __init__(
        self,
        adapters: AdapterSet,
        limits: ServeLimits,
        host: str,
        port: int,
        base_name: str,
        security: ServeSecurity,
    ) -> None:
        import uvicorn

        self.app = create_app(adapters, limits, base_name, security)
        self.socket = socket.socket(
            socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM
        )
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.socket.listen(2048)  # clients may connect at once; uvicorn accepts when it is up
        bound = self.socket.getsockname()
        self.url = f"http://{host}:{bound[1]}"
        config = uvicorn.Config(
            self.app, log_level="warning", timeout_graceful_shutdown=30, access_log=False
        )
        self.uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM; then finish in-flight and queued requests and return."""
        self.uvicorn.run(sockets=[self.socket])

    def start(self) -> Server:
        """Serve from a background thread (notebooks, tests); returns once it accepts requests."""
        self._thread = threading.Thread(target=self.run, name="peftkit-serve", daemon=True)
        self._thread.start()
        while not self.uvicorn.started:
            if not self._thread.is_alive():
                raise ServingError("the server stopped while starting")
            threading.Event().wait(0.02)
        return self

    def stop(self, timeout: float = 60) -> None:
        """Graceful shutdown: stop accepting, finish requests, stop the engine."""
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
