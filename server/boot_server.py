"""Serve the probes on the runtime's port while the enclave boots.

The port is bound once, before anything else, so Kubernetes probes get an answer from the first
second. :class:`BootServer` runs uvicorn on a *duplicate* of the listening socket: stopping it
closes only the duplicate, and connections queued meanwhile wait in the kernel's backlog for
vLLM's server, which takes over the original socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from server.tls import EnclaveTls

__all__ = ["BootServer"]


class _QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the runtime."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class BootServer:
    """uvicorn serving ``app`` on a duplicate of ``sock`` until :meth:`stop`."""

    def __init__(self, app: FastAPI, sock: socket.socket, *, tls: EnclaveTls | None) -> None:
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
            ssl_keyfile=tls.keyfile if tls else None,
            ssl_certfile=tls.certfile if tls else None,
        )
        self._server = _QuietServer(config)
        self._sock = sock.dup()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start serving; return once uvicorn accepts connections."""
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # re-raise the startup error
                raise RuntimeError("the boot server stopped during start-up")
            await asyncio.sleep(0.01)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def stop_accepting(self) -> None:
        """Stop taking connections now; those that come meanwhile wait in the kernel's backlog.

        The next server can take the original socket at once, while :meth:`stop` lets the
        connections already open finish (up to the graceful timeout: a prober's keep-alive
        connection would otherwise hold the port's hand-over for up to 2 s).
        """
        for server in getattr(self._server, "servers", ()):
            server.close()

    async def stop(self) -> None:
        """Stop serving (the original listening socket stays open)."""
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        with contextlib.suppress(OSError):
            self._sock.close()
