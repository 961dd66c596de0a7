"""HTTP routes of the enclave: probes, boot stages and the attestation document.

* ``GET /livez`` — liveness: 200 while the process runs (also during boot and after a failed
  boot, so Kubernetes does not restart a pod whose reason an operator should read).
* ``GET /readyz`` — readiness: 200 ``{"ready": true, ...}`` once serving and the engine is
  healthy, else 503 with ``{"ready": false, "status", "stage", "reason"}``.
* ``GET /.well-known/enclave-serve/boot`` — every boot stage with its timing and outcome.
* ``GET /.well-known/enclave-serve/config`` — the exact bytes of the run configuration
  (:mod:`attest.runconfig`) whose SHA-256 every attestation document claims; 503 until the
  ``config`` stage has built it.
* ``GET /.well-known/enclave-serve/attestation?nonce=<64 hex>`` — an attestation document
  (``docs/attestation.md``) whose fresh evidence answers the nonce; without ``nonce``, the
  cached, unchallenged document (its maximum age in its claims); 400 for a malformed nonce, 429
  with ``Retry-After`` beyond the per-client rate or a full queue (:mod:`server.freshness`), 503
  until ready.
* ``GET /v1/aci/attestation?nonce=<64 hex>`` — the same evidence as a draft ACI ``aci/1`` report
  (:mod:`server.aci`); every attestation response carries ``X-ACI-Version`` and
  ``X-ACI-Keyset-Digest``.
* ``GET /metrics`` (boot app only) — the ``enclave_serve_`` metrics while booting; once vLLM is
  up its own ``/metrics`` serves them with vLLM's.

During boot the same router is mounted on a small app whose every other path answers 503 in
the OpenAI error shape; once vLLM is up the router is added to vLLM's own app.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from attest.document import NONCE_SIZE
from attest.runconfig import RunConfiguration
from foundation.errors import Error
from server.aci import ACI_VERSION
from server.freshness import AttestationFrontend, QueueFull, client_group
from server.metrics import Metrics
from server.status import BootStatus

__all__ = ["WELL_KNOWN_PREFIX", "AttestationEndpoints", "EnclaveFront", "boot_app", "enclave_router"]

logger = logging.getLogger(__name__)

WELL_KNOWN_PREFIX = "/.well-known/enclave-serve"

HealthCheck = Callable[[], Awaitable[bool]]
_NONCE_HEX = re.compile(r"[0-9a-f]{64}")


def _not_ready_body(status: BootStatus) -> dict[str, Any]:
    readiness = status.readiness()
    message = f"enclave-serve is not ready ({readiness['status']} at stage '{readiness['stage']}')"
    if readiness["status"] == "failed":
        message += f": {readiness['reason']}"
    return {
        "error": {"message": message, "type": "ServiceUnavailable", "code": 503},
        **readiness,
    }


def _error(code: int, kind: str, message: str, *, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": code}}, status_code=code, headers=headers
    )


class AttestationEndpoints:
    """The attestation answers (fresh, cached, ACI), shared by the routes and the fast path."""

    def __init__(
        self,
        status: BootStatus,
        attestation: Callable[[], AttestationFrontend | None],
        metrics: Metrics | None,
    ) -> None:
        self.status = status
        self.attestation = attestation
        self.metrics = metrics

    @staticmethod
    def _client_key(request: Request) -> str:
        return client_group(request.client.host) if request.client is not None else "unknown"

    @staticmethod
    def _bad_nonce() -> JSONResponse:
        return _error(
            400,
            "invalid_request_error",
            f"nonce must be {NONCE_SIZE} bytes as {2 * NONCE_SIZE} lowercase hex digits",
        )

    def _count(self, kind: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.attestation_requests.labels(kind=kind, outcome=outcome).inc()

    @staticmethod
    def _headers(frontend: AttestationFrontend, **extra: str) -> dict[str, str]:
        headers = {"X-ACI-Version": ACI_VERSION, "X-ACI-Keyset-Digest": frontend.service.keyset_digest}
        if frontend.service.insecure:
            headers["Enclave-Serve-Insecure"] = "sample-tee"
        return {**headers, **extra}

    async def handle(self, request: Request, *, aci: bool) -> Response:
        """Answer ``GET ...?nonce=<hex>`` (or no query: the cached form); the ACI endpoint takes
        no other parameter (400)."""
        params = request.query_params
        if aci and set(params) - {"nonce"}:
            return self._bad_nonce()
        return await self.answer(request, params.get("nonce"), aci=aci)

    async def answer(self, request: Request, nonce: str | None, *, aci: bool) -> Response:
        """Answer one attestation request (``nonce`` None: the cached form)."""
        kind = ("aci-" if aci else "") + ("cached" if nonce is None else "fresh")
        started = time.perf_counter()
        raw = b""
        if nonce is not None:
            raw = bytes.fromhex(nonce) if _NONCE_HEX.fullmatch(nonce) else b""
            if len(raw) != NONCE_SIZE:
                self._count(kind, "bad-request")
                return self._bad_nonce()
        frontend = self.attestation()
        if frontend is None or not self.status.ready:
            self._count(kind, "not-ready")
            return JSONResponse(_not_ready_body(self.status), status_code=503, headers={"Retry-After": "5"})
        if nonce is None:
            entry = frontend.cache.current("aci" if aci else "document")
            if entry is None:
                self._count(kind, "unavailable")
                return _error(503, "ServiceUnavailable", "no unexpired cached attestation yet", retry_after=1)
            age = entry.age(time.monotonic())
            headers = self._headers(
                frontend,
                **{
                    "Cache-Control": f"max-age={max(0, int(entry.remaining(time.monotonic(), time.time())))}",
                    "Age": str(int(age)),
                },
            )
            response: Response = Response(entry.body, media_type="application/json", headers=headers)
        else:
            client = self._client_key(request)
            wait = frontend.limiter.acquire(client)
            if wait > 0:
                self._count(kind, "rate-limited")
                return _error(
                    429,
                    "rate_limit_error",
                    "too many fresh attestation requests from this client; the cached document "
                    "(no nonce) is not rate limited",
                    retry_after=max(1, math.ceil(wait)),
                )
            try:
                if aci:
                    body = await frontend.scheduler.aci_bytes(raw, client=client)
                else:
                    body = await frontend.scheduler.document_bytes(raw, client=client)
            except QueueFull as exc:
                self._count(kind, "queue-full")
                return _error(429, "rate_limit_error", str(exc), retry_after=exc.retry_after_s)
            except Error as exc:
                self._count(kind, "error")
                logger.error("attestation document failed: %s", exc)
                return _error(503, "ServiceUnavailable", f"evidence collection failed: {exc}")
            response = Response(
                body,
                media_type="application/json",
                headers=self._headers(frontend, **{"Cache-Control": "no-store"}),
            )
        self._count(kind, "ok")
        if self.metrics is not None:
            self.metrics.attestation_latency.labels(kind=kind).observe(time.perf_counter() - started)
        return response


def enclave_router(
    *,
    status: BootStatus,
    attestation: Callable[[], AttestationFrontend | None],
    config: Callable[[], RunConfiguration | None] = lambda: None,
    engine_healthy: HealthCheck | None = None,
    metrics: Metrics | None = None,
    endpoints: AttestationEndpoints | None = None,
) -> APIRouter:
    """Return the probes and ``/.well-known`` routes, reading state through the callables.

    ``endpoints`` (default: built from ``status``, ``attestation`` and ``metrics``) lets the
    caller share the attestation answers with :class:`EnclaveFront`.
    """
    router = APIRouter()

    @router.get("/livez", include_in_schema=False)
    async def livez() -> dict[str, Any]:
        return {"alive": True}

    @router.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        body = status.readiness()
        if body["ready"] and engine_healthy is not None and not await engine_healthy():
            body = {
                "ready": False,
                "status": "failed",
                "stage": "serve",
                "reason": "the inference engine is dead",
            }
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @router.get(f"{WELL_KNOWN_PREFIX}/boot")
    async def boot() -> dict[str, Any]:
        return status.to_json()

    @router.get(f"{WELL_KNOWN_PREFIX}/config")
    async def run_configuration() -> Response:
        current = config()
        if current is None:
            return JSONResponse(_not_ready_body(status), status_code=503)
        # The exact canonical bytes: their SHA-256 is the attested claim.
        return Response(current.raw, media_type="application/json", headers={"Cache-Control": "no-cache"})

    endpoints = endpoints or AttestationEndpoints(status, attestation, metrics)

    @router.get(f"{WELL_KNOWN_PREFIX}/attestation")
    async def attestation_document(request: Request) -> Response:
        return await endpoints.handle(request, aci=False)

    @router.get("/v1/aci/attestation")
    async def aci_attestation(request: Request) -> Response:
        return await endpoints.handle(request, aci=True)

    return router


#: Paths still answered once a failure after ready refuses everything else.
ALWAYS_ANSWERED = frozenset({"/livez", "/readyz", "/metrics", f"{WELL_KNOWN_PREFIX}/boot"})


_ATTESTATION_PATHS = {f"{WELL_KNOWN_PREFIX}/attestation": False, "/v1/aci/attestation": True}


class EnclaveFront:
    """The ASGI front of the ready enclave, before the inference app and its middleware.

    * Once a failure is recorded (after ready), 503 everywhere but the probes. Requests already
      running are not interrupted here; the runtime stops the server shortly after.
    * Attestation requests are answered here, without the inference app's middleware stack
      (the routes of :func:`enclave_router` give the same answers; this is the short way in):
      the cached form from memory, the fresh one from the scheduler.
    """

    def __init__(
        self, app: ASGIApp, status: BootStatus, endpoints: AttestationEndpoints | None = None
    ) -> None:
        self.app = app
        self.status = status
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope.get("path")
            if self.status.failed and path not in ALWAYS_ANSWERED:
                response: Response = JSONResponse(_not_ready_body(self.status), status_code=503)
                await response(scope, receive, send)
                return
            aci = _ATTESTATION_PATHS.get(path)  # type: ignore[arg-type]
            if aci is not None and self.endpoints is not None and scope.get("method") == "GET":
                response = await self.endpoints.handle(Request(scope), aci=aci)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def boot_app(status: BootStatus, router: APIRouter, metrics: Metrics | None = None) -> FastAPI:
    """Return the app served while booting (and after a failed boot): probes + 503 elsewhere."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.include_router(router)

    @app.get("/metrics", include_in_schema=False)
    async def boot_metrics() -> Response:
        # Once up, vLLM's app serves /metrics from the same (default) registry.
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

        return Response(
            generate_latest(metrics.registry if metrics is not None else REGISTRY),
            media_type=CONTENT_TYPE_LATEST,
        )

    @app.api_route(
        "/{path:path}",
        methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"],
        include_in_schema=False,
    )
    async def not_ready(request: Request, path: str) -> JSONResponse:
        return JSONResponse(_not_ready_body(status), status_code=503, headers={"Retry-After": "5"})

    return app
