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
import asyncio
import collections
import contextlib
import logging
import os
import re
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

from fastapi import APIRouter, FastAPI
from starlette.types import ASGIApp

from foundation.errors import Error
from server.http import HttpServer

__all__ = [
    "PUBLIC_PATHS",
    "EngineOutput",
    "EngineStartFailed",
    "VllmEngine",
    "assemble_app",
    "engine_client",
    "root_cause",
    "secrets_of",
]

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


#: The longest root-cause line put into a boot reason.
MAX_CAUSE_CHARS = 400
#: A traceback's first line.
_TRACEBACK = "Traceback (most recent call last):"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: vLLM's log header, repeated on every line of a logged traceback:
#: ``(EngineCore_DP0 pid=12) ERROR 12-07 18:00:00 [core.py:1510] ``.
_LOG_HEADER = re.compile(
    r"^[^()]*\([^()]*pid=\d+\)\s(?:[A-Z]+\s+\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?\s+\[[^\]]*\]\s?)?"
)
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:: .*)?$")
#: vLLM's wrappers that point at the real error instead of carrying it.
_GENERIC = re.compile(r"root cause|see stack trace|see the stack trace", re.IGNORECASE)
#: An absolute path (a host path is not for the public reason), not the path of a URL.
_PATH = re.compile(r"(?<![\w:/.~-])/[^\s'\",:;()\[\]]+")
#: A bytes literal with escapes: could be key material, never shown.
_BYTES_LITERAL = re.compile(r"""b['"][^'"]*\\x""")
#: A secret is withheld if any run of this many of its characters appears in the text.
_SECRET_WINDOW = 8


def secrets_of(args: argparse.Namespace) -> tuple[str, ...]:
    """The secret strings in vLLM's namespace: API keys, the key handoff's capabilities, a hub token."""
    found: list[str] = []
    api_keys = getattr(args, "api_key", None)
    if isinstance(api_keys, str):
        found.append(api_keys)
    elif isinstance(api_keys, list | tuple):
        found.extend(k for k in api_keys if isinstance(k, str))
    extra = getattr(args, "model_loader_extra_config", None)
    if isinstance(extra, Mapping):
        capabilities = extra.get("capabilities")
        if isinstance(capabilities, list | tuple):
            found.extend(c for c in capabilities if isinstance(c, str))
    token = getattr(args, "hf_token", None)
    if isinstance(token, str):
        found.append(token)
    return tuple(s for s in found if s)


def _names_a_secret(text: str, secrets: Iterable[str]) -> bool:
    for secret in secrets:
        if len(secret) <= _SECRET_WINDOW:
            if secret in text:
                return True
            continue
        if any(secret[i : i + _SECRET_WINDOW] in text for i in range(len(secret) - _SECRET_WINDOW + 1)):
            return True
    return False


def root_cause(lines: Iterable[str], *, secrets: Iterable[str] = ()) -> str | None:
    """Return the root cause among the engine processes' output: one line, safe to publish.

    The root cause is the first exception line (a traceback's last, unindented line) that is not
    one of vLLM's pointers to it ("See root cause above", "See stack trace"): the engine core's
    or a worker's own error, printed before the wrappers that report it. The line is cut to
    :data:`MAX_CAUSE_CHARS`; absolute paths become ``<path>``. Returns None when there is none,
    and "withheld" text when the line names a secret (any 8 characters of one of ``secrets``)
    or holds a bytes literal with escapes (what key material would look like).
    """
    secrets = tuple(secrets)
    in_traceback = False
    for raw in lines:
        line = _LOG_HEADER.sub("", _ANSI.sub("", raw.rstrip("\r\n")))
        if line.strip() == _TRACEBACK:
            in_traceback = True
            continue
        if not in_traceback or not line or line[0].isspace():
            continue
        in_traceback = False
        if not _EXCEPTION_LINE.match(line) or _GENERIC.search(line):
            continue
        if _names_a_secret(line, secrets) or _BYTES_LITERAL.search(line):
            name = line.partition(":")[0]
            return f"{name} (its message is withheld: it may contain a secret; see the engine log)"
        line = _PATH.sub("<path>", line)
        return line if len(line) <= MAX_CAUSE_CHARS else line[: MAX_CAUSE_CHARS - 1] + "…"
    return None


class EngineStartFailed(Error, RuntimeError):
    """vLLM's engine did not start; the message carries its root cause (one line, safe to publish)."""

    def __init__(self, root_cause: str) -> None:
        super().__init__(f"vLLM's engine failed: {root_cause}")
        #: The engine's own error line (see :func:`root_cause`).
        self.root_cause = root_cause


class EngineOutput:
    """Keep the last lines the engine's processes write to ``fd`` while it starts, to find the cause.

    vLLM's engine core runs in a spawned process; when it fails, the parent only learns "Engine
    core initialization failed. See root cause above": the cause is the traceback the child
    printed to the stderr it inherited (and logged, on stdout, as the workers do). While this
    context is open, file descriptor ``fd`` is a pipe:
    a thread copies every byte to the real stderr unchanged and keeps the last ``max_lines``
    lines. Processes spawned meanwhile inherit the pipe and keep it after the context closes;
    the thread goes on copying until the last of them closes it, so their output is never lost
    (only what arrives while capturing is kept). If stderr cannot be redirected, nothing is
    captured and nothing else changes.

    .. warning::
       Children see a pipe, not a terminal: no colours, no progress-bar redraws.
    """

    def __init__(
        self, fd: int = 2, *, max_lines: int = 400, drain_s: float = 2.0, quiet_s: float = 0.1
    ) -> None:
        self._fd = fd
        self._lines: collections.deque[str] = collections.deque(maxlen=max_lines)
        self._drain_s = drain_s
        self._quiet_s = quiet_s
        self._keeping = threading.Event()
        self._lock = threading.Lock()
        self._partial = b""
        self._reads = 0
        self._original: int | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> EngineOutput:
        try:
            read_end, write_end = os.pipe()
            forward = os.dup(self._fd)
            self._original = os.dup(self._fd)
            os.dup2(write_end, self._fd)
            os.close(write_end)
        except OSError as exc:  # no stderr to redirect: start without the root cause
            logger.info("engine output not watched (%s); a failure will not carry its cause", exc.strerror)
            self._original = None
            return self
        self._keeping.set()
        self._thread = threading.Thread(
            target=self._copy, args=(read_end, forward), name="engine-output", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._restore()
        self._keeping.clear()

    def _restore(self) -> None:
        """Give the descriptor back (once): only the children hold the pipe afterwards."""
        original, self._original = self._original, None
        if original is not None:
            os.dup2(original, self._fd)
            os.close(original)

    def _copy(self, read_end: int, forward: int) -> None:
        try:
            while data := os.read(read_end, 65536):
                view = memoryview(data)
                while view:
                    view = view[os.write(forward, view) :]
                if self._keeping.is_set():
                    self._keep(data)
                self._reads += 1
        except OSError:
            pass
        finally:
            self._keep(b"\n")
            os.close(read_end)
            os.close(forward)

    def _keep(self, data: bytes) -> None:
        with self._lock:
            pieces = (self._partial + data).split(b"\n")
            self._partial = pieces.pop()[-8192:]  # a progress bar's \r-only line stays bounded
            self._lines.extend(p.decode("utf-8", "replace")[-8192:] for p in pieces)

    def lines(self) -> list[str]:
        """The lines kept so far."""
        with self._lock:
            return list(self._lines)

    def failure_lines(self) -> list[str]:
        """Stop capturing and return the lines kept, once the children's last words arrived.

        A failed child writes its traceback just before it exits (which is how vLLM noticed), so
        this waits until the pipe is closed or has been quiet for ``quiet_s``, at most ``drain_s``.
        """
        self._restore()
        thread = self._thread
        if thread is not None:
            waited = 0.0
            seen = -1
            while thread.is_alive() and waited < self._drain_s and seen != self._reads:
                seen = self._reads
                thread.join(timeout=self._quiet_s)
                waited += self._quiet_s
        self._keeping.clear()
        with self._lock:
            if self._partial:
                self._lines.append(self._partial.decode("utf-8", "replace"))
                self._partial = b""
        return self.lines()


@contextlib.asynccontextmanager
async def engine_client(args: argparse.Namespace) -> AsyncIterator[Any]:
    """vLLM's ``build_async_engine_client``, with its blocking part off the event loop.

    vLLM builds the engine client synchronously: ``AsyncLLM.from_vllm_config`` waits for the
    engine core's handshake, which comes after the workers have loaded the weights, so the event
    loop that serves ``/livez`` and ``/readyz`` during boot stood still for the whole load (26 s
    for the tiny model on two cores; many minutes for a large model on a GPU, where a liveness
    probe would restart the pod). Here the configuration and the client are built in a worker
    thread, where vLLM finds no running loop and defers its output tasks; they are started on
    this loop afterwards, as vLLM does when it builds the client inside one. Otherwise the same
    steps as vLLM's launcher: engine arguments from the namespace, the model-cache reset, the
    shutdown on exit.
    """
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    engine_args = AsyncEngineArgs.from_cli_args(args)
    try:
        from vllm.entrypoints.launchers.cli_args import propagate_flash_late_interaction
    except ImportError:  # a vLLM without it
        pass
    else:
        propagate_flash_late_interaction(args, engine_args)
    usage = UsageContext.OPENAI_API_SERVER

    def build() -> tuple[Any, Any]:
        config = engine_args.create_engine_config(usage_context=usage)
        client = AsyncLLM.from_vllm_config(
            vllm_config=config,
            usage_context=usage,
            enable_log_requests=engine_args.enable_log_requests,
            aggregate_engine_logging=engine_args.aggregate_engine_logging,
            disable_log_stats=engine_args.disable_log_stats,
        )
        return config, client

    config, client = await asyncio.to_thread(build)
    try:
        start_output_handler = getattr(client, "_run_output_handler", None)
        if start_output_handler is not None:  # else it starts with the first request
            start_output_handler()
        await client.reset_mm_cache()
        yield client
    finally:
        client.shutdown(timeout=config.shutdown_timeout)


class VllmEngine:
    """One vLLM engine: :meth:`start`, :meth:`build_app`, :meth:`http_server`, then :meth:`stop`.

    .. warning::
       :meth:`log_arguments` must run before secrets (the key handoff capabilities) are put
       into the namespace: vLLM's "non-default args" line prints every option.
    """

    def __init__(
        self, args: argparse.Namespace, *, launcher: Callable[[argparse.Namespace], Any] | None = None
    ) -> None:
        self.args = args
        #: :func:`engine_client` (by default): an async context manager of vLLM's engine client.
        self._launcher = launcher
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

        The engine processes' stderr is watched while they start (:class:`EngineOutput`), so that
        a failure carries the engine core's own error rather than vLLM's "See root cause above".

        Raises:
            EngineStartFailed: the engine did not start and its root cause was found: the message
                is that one line (paths replaced, withheld if it could name a secret); vLLM's
                exception is its ``__cause__``.
            Exception: whatever vLLM raised, when no root cause was found.
        """
        launcher = self._launcher if self._launcher is not None else engine_client
        with EngineOutput(2) as stderr, EngineOutput(1) as stdout:
            try:
                cm = launcher(self.args)
                self._client = await cm.__aenter__()
            except Exception as exc:
                secrets = secrets_of(self.args)
                # The exception that ended the engine core is on stderr; when that is only vLLM's
                # pointer (a worker failed), the worker's logged traceback is on stdout.
                cause = root_cause(stderr.failure_lines(), secrets=secrets) or root_cause(
                    stdout.failure_lines(), secrets=secrets
                )
                if cause is None:
                    raise
                raise EngineStartFailed(cause) from exc
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
