"""The HTTP server of the ready enclave: vLLM's app on the runtime's socket, drained on shutdown.

vLLM's own launcher (``serve_http``) installs SIGTERM handlers that abort in-flight requests
(``--shutdown-timeout 0``, its default) and stops on engine death on its own schedule. The
runtime serves the same app with uvicorn itself, so that it decides the order:

* :meth:`HttpServer.drain` — stop accepting (the listening socket closes), let in-flight requests
  and streams finish for up to ``drain_timeout_s``, then cancel what is left; :meth:`serve`
  returns once done.
* :meth:`HttpServer.stop_now` — the same with a short deadline (engine death, watchdog).

Signals are the runtime's (``capture_signals`` does nothing here).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp

__all__ = ["HttpServer"]


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """uvicorn serving ``app`` (through ``asgi``, a wrapper of it, if given) on ``sock`` until
    :meth:`drain` or :meth:`stop_now`."""

    def __init__(
        self,
        app: FastAPI,
        sock: socket.socket,
        *,
        drain_timeout_s: float,
        asgi: ASGIApp | None = None,
        ssl_keyfile: str | None,
        ssl_certfile: str | None,
        log_level: str | None = "info",
        access_log: bool = True,
        timeout_keep_alive: int = 5,
        h11_max_incomplete_event_size: int | None = None,
        h11_max_header_count: int | None = None,
    ) -> None:
        config = uvicorn.Config(
            asgi if asgi is not None else app,
            log_level=log_level,
            access_log=access_log,
            timeout_keep_alive=timeout_keep_alive,
            timeout_graceful_shutdown=max(1, round(drain_timeout_s)),
            ssl_keyfile=ssl_keyfile,
            ssl_certfile=ssl_certfile,
        )
        extra: dict[str, Any] = {
            "h11_max_incomplete_event_size": h11_max_incomplete_event_size,
            "h11_max_header_count": h11_max_header_count,
        }
        for name, value in extra.items():
            if value is not None:
                setattr(config, name, value)
        config.load()
        self._server = _Server(config)
        self._sock = sock
        app.state.server = self._server

    @property
    def in_flight(self) -> int:
        """Open HTTP connections (with a request in progress or kept alive)."""
        return len(self._server.server_state.connections)

    async def serve(self) -> None:
        """Serve until drained or stopped."""
        await self._server.serve(sockets=[self._sock])

    def drain(self) -> None:
        """Stop accepting; in-flight requests get up to the drain deadline."""
        self._server.should_exit = True

    def stop_now(self, deadline_s: int = 2) -> None:
        """Stop accepting; in-flight requests get ``deadline_s`` seconds."""
        self._server.config.timeout_graceful_shutdown = deadline_s
        self._server.should_exit = True
