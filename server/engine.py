"""vLLM's engine and its OpenAI API, started from already-checked arguments.

The runtime hands :class:`VllmEngine` the namespace that :mod:`runtime.vllm_args` parsed and
checked; this module only drives vLLM's own launcher functions: start the engine (which spawns
the engine core and workers, which load the weights), build vLLM's FastAPI app with our routes
added, and serve it (:mod:`server.http`) on the socket the runtime bound at the first second of
the boot. vLLM is
imported here, not at module import.
"""

from __future__ import annotations

import argparse
import logging
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI
from starlette.types import ASGIApp

from server.http import HttpServer

__all__ = ["VllmEngine"]

logger = logging.getLogger(__name__)


class VllmEngine:
    """One vLLM engine: :meth:`start`, :meth:`build_app`, :meth:`http_server`, then :meth:`stop`.

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

    def warm_model_info_cache(self) -> bool:
        """Fill vLLM's model-class cache in this process, before the engine needs it.

        vLLM inspects the model class in a fresh Python subprocess (about 7 s here: it imports
        torch and vLLM again) unless ``$VLLM_CACHE_ROOT/modelinfos`` has it. The runtime's cache
        directory is private and empty at every boot (a cache on a host volume could be poisoned),
        so without this every boot pays that subprocess. The cache entry is derived from vLLM's
        own code only (keyed by the model module's hash), never from the host.

        Uses vLLM internals: when they differ (another vLLM version), returns False and vLLM takes
        its own, slower path.
        """
        import importlib.util
        import json
        from pathlib import Path

        try:
            from vllm.model_executor.models import registry

            config = json.loads((Path(self.args.model) / "config.json").read_bytes())
            for architecture in config.get("architectures") or []:
                model = registry.ModelRegistry.models.get(architecture)
                if not isinstance(model, registry._LazyRegisteredModel):
                    continue
                spec = importlib.util.find_spec(model.module_name)
                if spec is None or spec.origin is None:
                    continue
                module_hash = model._get_modelinfo_module_hash(Path(spec.origin))
                if model._load_modelinfo_from_cache(module_hash) is None:
                    info = registry._ModelInfo.from_model_cls(model.load_model_cls())
                    model._save_modelinfo_to_cache(info, module_hash)
            return True
        except Exception as exc:  # an optimisation: never a reason to fail the boot
            logger.info(
                "vLLM's model-class cache not prefilled (%s); vLLM inspects it itself", type(exc).__name__
            )
            return False

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

    async def generate_ids(
        self, prompt: str, sampling: Mapping[str, Any], *, request_id: str
    ) -> tuple[list[int] | None, list[int]]:
        """Run one generation through the engine; return (prompt token ids, output token ids).

        ``sampling`` holds vLLM ``SamplingParams`` keyword arguments. Used by the canary before
        ready: the same engine, scheduler and sampler the OpenAI API will use.
        """
        from vllm import SamplingParams

        assert self._client is not None, "start() the engine first"
        final: Any = None
        async for output in self._client.generate(prompt, SamplingParams(**sampling), request_id):
            final = output
        if final is None or not final.outputs:
            return None, []
        prompt_ids = None if final.prompt_token_ids is None else [int(t) for t in final.prompt_token_ids]
        return prompt_ids, [int(t) for t in final.outputs[0].token_ids]

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

    def http_server(
        self,
        app: FastAPI,
        sock: socket.socket,
        *,
        drain_timeout_s: float,
        guard: Callable[[ASGIApp], ASGIApp] | None = None,
    ) -> HttpServer:
        """The server for ``app`` on ``sock`` (bound and listening), with vLLM's HTTP settings.

        ``guard`` wraps the app (the runtime's refusal once a failure after ready is recorded).
        """
        import vllm.envs as envs

        args = self.args
        return HttpServer(
            app,
            sock,
            drain_timeout_s=drain_timeout_s,
            asgi=None if guard is None else guard(app),
            ssl_keyfile=args.ssl_keyfile,
            ssl_certfile=args.ssl_certfile,
            log_level=args.uvicorn_log_level,
            access_log=not args.disable_uvicorn_access_log,
            timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
            h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
            h11_max_header_count=args.h11_max_header_count,
        )

    async def stop(self) -> None:
        """Shut the engine down (idempotent)."""
        cm, self._cm, self._client = self._cm, None, None
        if cm is not None:
            await cm.__aexit__(None, None, None)
