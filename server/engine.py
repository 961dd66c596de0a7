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

__all__ = ["PUBLIC_PATHS", "VllmEngine", "assemble_app"]

logger = logging.getLogger(__name__)


#: Paths served without the API key: the probes and the attestation documents (users verify the
#: server before they hold any key; Kubernetes probes carry none).
PUBLIC_PATHS = ("/livez", "/readyz", "/health", "/.well-known/")


def assemble_app(args: argparse.Namespace, supported_tasks: tuple[Any, ...], model_config: Any) -> FastAPI:
    """Assemble the OpenAI API app from vLLM's routers, middleware and handlers, and nothing else.

    vLLM's own ``build_app`` ends with the SageMaker standards bootstrap, which imports
    ``/opt/ml/model/model.py`` whenever that file exists (no setting needed) and serves
    ``/invocations`` and ``/ping``; it also attaches every installed endpoint plugin. A host that
    drops a file there would run code in the serving process. This assembly takes vLLM's routers
    one by one instead: the instrumentator's (``/health``, ``/load``, ``/version``,
    ``/metrics``), tokenize, models, the generation APIs (chat, completions, responses and the
    other formats vLLM serves), pooling and speech-to-text when the model supports them. Left out:
    the SageMaker routes and bootstrap, endpoint plugins, runtime LoRA loading, the profiler,
    elastic expert-parallel scaling, scale-out, fault tolerance and the development routes.

    ``--api-key`` guards every route but :data:`PUBLIC_PATHS` (vLLM's own middleware guards only
    ``/v1``).
    """
    from fastapi import FastAPI
    from vllm.entrypoints.launchers.utils.server_utils import lifespan
    from vllm.entrypoints.openai.models.api_router import attach_router as attach_models
    from vllm.entrypoints.serve.exception_handling.register import init_exception_handler
    from vllm.entrypoints.serve.instrumentator import register_instrumentator_api_routers
    from vllm.entrypoints.serve.middleware.register import init_entrypoints_middleware
    from vllm.entrypoints.serve.tokenize.api_router import attach_router as attach_tokenize
    from vllm.tasks import POOLING_TASKS

    if args.disable_fastapi_docs:
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None, lifespan=lifespan)
    elif args.enable_offline_docs:
        app = FastAPI(docs_url=None, redoc_url=None, lifespan=lifespan)
    else:
        app = FastAPI(lifespan=lifespan)
    app.state.args = args
    app.root_path = args.root_path
    register_instrumentator_api_routers(app)
    attach_tokenize(app)
    attach_models(app)
    if "generate" in supported_tasks:
        from vllm.entrypoints.generate.api_router import register_generate_api_routers
        from vllm.entrypoints.generate.structured_decisions.api_router import (
            register_structured_decisions_api_router,
        )

        register_structured_decisions_api_router(app)
        register_generate_api_routers(app)
    if "transcription" in supported_tasks or "realtime" in supported_tasks:
        from vllm.entrypoints.speech_to_text.factories import register_speech_to_text_api_routers

        register_speech_to_text_api_routers(app, supported_tasks)
    if any(task in POOLING_TASKS for task in supported_tasks):
        from vllm.entrypoints.pooling.factories import register_pooling_api_routers

        register_pooling_api_routers(app, supported_tasks, model_config)
    init_exception_handler(app)
    init_entrypoints_middleware(args, app, supported_tasks)
    if args.api_key:
        from server.auth import ApiKeyGuard

        app.add_middleware(ApiKeyGuard, tokens=tuple(args.api_key), public=PUBLIC_PATHS)
    return app


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

    @staticmethod
    def device_family() -> str:
        """The device family the engine runs its model on (``cuda``, ``cpu``...), as vLLM's platform says."""
        from vllm.platforms import current_platform

        return str(current_platform.device_type or "cpu")

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

    async def chat_ids(
        self, app: FastAPI, messages: list[dict[str, str]], sampling: Mapping[str, Any], *, request_id: str
    ) -> tuple[list[int] | None, list[int]]:
        """Run one chat completion through ``app`` in process; return (rendered prompt ids, output ids).

        The request takes the path every client request takes (middleware, API key, the chat
        route, the chat template with its configured arguments, the tokenizer, the engine), over
        an in-process ASGI transport, before the app serves anyone. ``sampling`` holds the
        request's sampling fields (``max_tokens``, ``temperature``, ``top_k``...).

        Raises:
            RuntimeError: the endpoint did not answer 200 with token ids.
        """
        import httpx

        headers = {"X-Request-Id": request_id}
        if self.args.api_key:
            headers["Authorization"] = f"Bearer {self.args.api_key[0]}"
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://canary.enclave-serve") as client:
            models = await client.get("/v1/models", headers=headers)
            if models.status_code != 200:
                raise RuntimeError(f"the models endpoint answered {models.status_code}")
            body = {
                "model": models.json()["data"][0]["id"],
                "messages": messages,
                **sampling,
                "stream": False,
                "return_token_ids": True,
            }
            response = await client.post("/v1/chat/completions", json=body, headers=headers, timeout=None)
        if response.status_code != 200:
            raise RuntimeError(f"the chat completions endpoint answered {response.status_code}")
        data = response.json()
        prompt_ids = data.get("prompt_token_ids")
        token_ids = data["choices"][0].get("token_ids")
        if not isinstance(token_ids, list):
            raise RuntimeError("the chat completion carries no token ids")
        return (
            None if prompt_ids is None else [int(t) for t in prompt_ids],
            [int(t) for t in token_ids],
        )

    async def build_app(self, routers: Sequence[APIRouter] = ()) -> FastAPI:
        """Build the OpenAI app for the running engine (:func:`assemble_app`) and add ``routers``."""
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state

        assert self._client is not None, "start() the engine first"
        supported_tasks = await self._client.get_supported_tasks()
        app = assemble_app(self.args, supported_tasks, self._client.model_config)
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
