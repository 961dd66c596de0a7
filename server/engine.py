"""vLLM's engine and its OpenAI API, started from already-checked arguments.

The runtime hands :class:`VllmEngine` the namespace that :mod:`runtime.vllm_args` parsed and
checked; this module only drives vLLM's own launcher functions: start the engine (which spawns
the engine core and workers, which load the weights), build vLLM's FastAPI app with our routes
added, and serve it on the socket the runtime bound at the first second of the boot. vLLM is
imported here, not at module import.
"""

from __future__ import annotations

import argparse
import logging
import socket
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, FastAPI

__all__ = ["VllmEngine"]

logger = logging.getLogger(__name__)


class VllmEngine:
    """One vLLM engine: :meth:`start`, :meth:`build_app`, :meth:`serve`, then :meth:`stop`.

    .. warning::
       :meth:`log_arguments` must run before secrets (the key handoff capabilities) are put
       into the namespace: vLLM's "non-default args" line prints every option.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._cm: Any = None
        self._client: Any = None

    def log_arguments(self) -> None:
        """Log vLLM's non-default arguments, as ``vllm serve`` does."""
        from vllm.entrypoints.serve.utils.api_utils import log_non_default_args

        log_non_default_args(self.args)

    async def start(self) -> None:
        """Start the engine; returns once the workers have loaded the weights.

        Raises whatever vLLM raises when the engine fails to start (the caller turns it into a
        boot failure with the workers' own load reports).
        """
        from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client

        cm = build_async_engine_client(self.args)
        self._client = await cm.__aenter__()
        self._cm = cm

    @property
    def started(self) -> bool:
        """Whether :meth:`start` completed."""
        return self._client is not None

    async def healthy(self) -> bool:
        """Whether the engine is alive (False once its core died)."""
        return self._client is not None and not self._client.errored

    async def build_app(self, routers: Sequence[APIRouter] = ()) -> FastAPI:
        """Build vLLM's OpenAI app for the running engine and add ``routers`` to it."""
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app

        assert self._client is not None, "start() the engine first"
        supported_tasks = await self._client.get_supported_tasks()
        app: FastAPI = build_app(self.args, supported_tasks, self._client.model_config)
        await init_app_state(self._client, app.state, self.args, supported_tasks)
        for router in routers:
            app.include_router(router)
        return app

    async def serve(self, app: FastAPI, sock: socket.socket) -> None:
        """Serve ``app`` on ``sock`` (already bound and listening) until uvicorn shuts down."""
        import vllm.envs as envs
        from vllm.entrypoints.launchers.launcher import serve_http

        args = self.args
        shutdown = await serve_http(
            app,
            sock=sock,
            host=args.host,
            port=args.port,
            log_level=args.uvicorn_log_level,
            access_log=not args.disable_uvicorn_access_log,
            timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
            ssl_keyfile=args.ssl_keyfile,
            ssl_certfile=args.ssl_certfile,
            h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
            h11_max_header_count=args.h11_max_header_count,
        )
        await shutdown

    async def stop(self) -> None:
        """Shut the engine down (idempotent)."""
        cm, self._cm, self._client = self._cm, None, None
        if cm is not None:
            await cm.__aexit__(None, None, None)
