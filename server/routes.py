"""HTTP routes of the enclave: probes, boot stages and the attestation document.

* ``GET /livez`` — liveness: 200 while the process runs (also during boot and after a failed
  boot, so Kubernetes does not restart a pod whose reason an operator should read).
* ``GET /readyz`` — readiness: 200 ``{"ready": true, ...}`` once serving and the engine is
  healthy, else 503 with ``{"ready": false, "status", "stage", "reason"}``.
* ``GET /.well-known/enclave-serve/boot`` — every boot stage with its timing and outcome.
* ``GET /.well-known/enclave-serve/config`` — the exact bytes of the run configuration
  (:mod:`attest.runconfig`) whose SHA-256 every attestation document claims; 503 until the
  ``config`` stage has built it.
* ``GET /.well-known/enclave-serve/attestation?nonce=<64 hex>`` — a fresh attestation document
  (see :mod:`attest.document`); 400 without a valid nonce, 503 until the model is loaded.

During boot the same router is mounted on a small app whose every other path answers 503 in
the OpenAI error shape; once vLLM is up the router is added to vLLM's own app.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response

from attest.document import NONCE_SIZE
from attest.errors import Error
from attest.runconfig import RunConfiguration
from server.attestation import AttestationService
from server.status import BootStatus

__all__ = ["WELL_KNOWN_PREFIX", "boot_app", "enclave_router"]

logger = logging.getLogger(__name__)

WELL_KNOWN_PREFIX = "/.well-known/enclave-serve"

HealthCheck = Callable[[], Awaitable[bool]]


def _not_ready_body(status: BootStatus) -> dict[str, Any]:
    readiness = status.readiness()
    message = f"enclave-serve is not ready ({readiness['status']} at stage '{readiness['stage']}')"
    if readiness["status"] == "failed":
        message += f": {readiness['reason']}"
    return {
        "error": {"message": message, "type": "ServiceUnavailable", "code": 503},
        **readiness,
    }


def enclave_router(
    *,
    status: BootStatus,
    attestation: Callable[[], AttestationService | None],
    config: Callable[[], RunConfiguration | None] = lambda: None,
    engine_healthy: HealthCheck | None = None,
) -> APIRouter:
    """Return the probes and ``/.well-known`` routes, reading state through the callables."""
    router = APIRouter()
    lock = asyncio.Lock()

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

    @router.get(f"{WELL_KNOWN_PREFIX}/attestation")
    async def attestation_document(
        nonce: str = Query(..., description=f"{NONCE_SIZE} random bytes, hex-encoded"),
    ) -> JSONResponse:
        try:
            raw = bytes.fromhex(nonce)
        except ValueError:
            raw = b""
        if len(raw) != NONCE_SIZE or nonce != nonce.lower():
            return JSONResponse(
                {
                    "error": {
                        "message": f"nonce must be {NONCE_SIZE} bytes as {2 * NONCE_SIZE} "
                        "lowercase hex digits",
                        "type": "BadRequest",
                        "code": 400,
                    }
                },
                status_code=400,
            )
        service = attestation()
        if service is None or not status.ready:
            return JSONResponse(_not_ready_body(status), status_code=503)
        async with lock:
            try:
                document = await asyncio.to_thread(service.document, raw)
            except Error as exc:
                logger.error("attestation document failed: %s", exc)
                return JSONResponse(
                    {
                        "error": {
                            "message": f"evidence collection failed: {exc}",
                            "type": "ServiceUnavailable",
                            "code": 503,
                        }
                    },
                    status_code=503,
                )
        headers = {"Cache-Control": "no-store"}
        if document.claims.insecure:
            headers["Enclave-Serve-Insecure"] = "sample-tee"
        return JSONResponse(document.to_json(), headers=headers)

    return router


def boot_app(status: BootStatus, router: APIRouter) -> FastAPI:
    """Return the app served while booting (and after a failed boot): probes + 503 elsewhere."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.include_router(router)

    @app.api_route(
        "/{path:path}",
        methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"],
        include_in_schema=False,
    )
    async def not_ready(request: Request, path: str) -> JSONResponse:
        return JSONResponse(_not_ready_body(status), status_code=503, headers={"Retry-After": "5"})

    return app
