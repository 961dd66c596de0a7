"""The attestation routes over ASGI: fresh, cached, ACI, 400/429/503 and the metrics they count."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from server.freshness import AttestationFrontend
from server.metrics import Metrics
from server.routes import AttestationEndpoints, EnclaveFront, enclave_router
from server.status import BootStatus, Stage
from tests.server.test_attestation_document import DIGEST, SPKI, service

PATH = "/.well-known/enclave-serve/attestation"
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def jcs(value: Any) -> str:
    """RFC 8785 for the values a keyset holds (objects, arrays, strings, integers, null, bools),
    written here independently of the implementation the server uses."""
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: kv[0].encode("utf-16-be"))
        return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + jcs(v) for k, v in items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(jcs(v) for v in value) + "]"
    if value is None or isinstance(value, bool | int | str):
        return json.dumps(value, ensure_ascii=False)
    raise TypeError(type(value))


def aci_report_data(keyset: dict[str, Any], nonce: str | None) -> tuple[str, bytes]:
    """dstack's aci/1 §3.1-3.2: keyset digest, statement, report data."""
    digest = "sha256:" + hashlib.sha256(jcs(keyset).encode()).hexdigest()
    statement = (
        '{"keyset_digest":"' + digest + '","nonce":' + ("null" if nonce is None else '"' + nonce + '"')
        + ',"purpose":"aci.report_data.v1"}'
    )  # fmt: skip
    return digest, hashlib.sha256(statement.encode()).digest()


class Env:
    def __init__(self, client: httpx.AsyncClient, status: BootStatus, registry: CollectorRegistry) -> None:
        self.client, self.status, self.registry = client, status, registry

    def count(self, kind: str, outcome: str) -> float:
        value = self.registry.get_sample_value(
            "enclave_serve_attestation_requests_total", {"kind": kind, "outcome": outcome}
        )
        return value or 0.0


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    status = BootStatus(metrics=metrics)
    frontend = AttestationFrontend.create(service(), max_age_s=60, rate=1.0, burst=3, metrics=metrics)
    await frontend.start()
    app = FastAPI()
    endpoints = AttestationEndpoints(status, lambda: frontend, metrics)
    app.include_router(
        enclave_router(status=status, attestation=lambda: frontend, metrics=metrics, endpoints=endpoints)
    )
    status.begin(Stage.SERVE)
    status.set_ready()
    status.end(Stage.SERVE)
    transport = httpx.ASGITransport(app=EnclaveFront(app, status, endpoints), client=("10.0.0.1", 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://enclave") as client:
        yield Env(client, status, registry)
    await frontend.stop()


def other_client(env: Env, host: str) -> httpx.AsyncClient:
    app = env.client._transport.app  # type: ignore[attr-defined]
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=(host, 1)), base_url="http://enclave"
    )


async def test_fresh_documents_answer_the_nonce_and_carry_aci_headers(env: Env) -> None:
    r = await env.client.get(PATH, params={"nonce": "ab" * 32})
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    assert r.json()["claims"]["nonces"] == ["ab" * 32]
    assert r.headers["x-aci-version"] == "aci/1" and r.headers["x-aci-keyset-digest"].startswith("sha256:")
    assert env.count("fresh", "ok") == 1


@pytest.mark.parametrize("nonce", ["AB" * 32, "ab" * 31, "zz" * 32, "", "ab" * 33])
async def test_malformed_nonces_are_400(env: Env, nonce: str) -> None:
    for path in (PATH, "/v1/aci/attestation"):
        r = await env.client.get(path, params={"nonce": nonce})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = await env.client.get("/v1/aci/attestation", params={"nonce": "ab" * 32, "extra": "1"})
    assert r.status_code == 400


async def test_a_client_beyond_its_burst_gets_429_while_another_still_gets_a_document(env: Env) -> None:
    answers = await asyncio.gather(*(env.client.get(PATH, params={"nonce": f"{i:064x}"}) for i in range(10)))
    codes = sorted(r.status_code for r in answers)
    assert codes.count(200) == 3 and codes.count(429) == 7
    limited = next(r for r in answers if r.status_code == 429)
    assert (
        int(limited.headers["retry-after"]) >= 1 and "cached document" in limited.json()["error"]["message"]
    )
    async with other_client(env, "10.0.0.2") as verifier:
        r = await verifier.get(PATH, params={"nonce": "cd" * 32})
        assert r.status_code == 200 and "cd" * 32 in r.json()["claims"]["nonces"]
    # The cached document is not rate limited.
    cached = await asyncio.gather(*(env.client.get(PATH) for _ in range(10)))
    assert {r.status_code for r in cached} == {200}
    assert len({r.content for r in cached}) == 1
    assert env.count("fresh", "rate-limited") == 7 and env.count("cached", "ok") == 10


async def test_the_cached_document_states_its_age(env: Env) -> None:
    r = await env.client.get(PATH)
    claims = r.json()["claims"]
    assert claims["nonces"] == [] and claims["max_age_s"] == 60
    assert int(r.headers["age"]) <= 60 and r.headers["cache-control"].startswith("max-age=")


async def test_the_aci_report_verifies_under_an_independent_reading_of_the_spec(env: Env) -> None:
    nonce = "5e" * 32
    r = await env.client.get("/v1/aci/attestation", params={"nonce": nonce})
    assert r.status_code == 200
    body = r.json()
    assert body["api_version"] == "aci/1" and body["service_capabilities"]["serving"] == "direct"
    keyset = body["attestation"]["workload_keyset"]
    digest, report_data = aci_report_data(keyset, nonce)
    assert body["workload_keyset_digest"] == digest == r.headers["x-aci-keyset-digest"]
    assert body["attestation"]["report_data"] == report_data.hex()
    # The sample TEE's evidence carries the 64-byte field: the digest, zero-padded.
    evidence = body["attestation"]["evidence"]["primary"]["evidence"]
    assert base64.b64decode(evidence["report_data"]) == report_data + bytes(32)
    # What ACI lacks, bound through the keyset digest: model identity and configuration.
    assert keyset["enclave_serve"]["model"] == DIGEST and keyset["enclave_serve"]["config_sha256"].startswith(
        "sha256:"
    )
    assert keyset["tls_public_keys"] == [{"spki_sha256": SPKI}] and keyset["not_after"] > 0
    # The unchallenged form binds the literal null.
    cached = (await env.client.get("/v1/aci/attestation")).json()
    _, cached_data = aci_report_data(cached["attestation"]["workload_keyset"], None)
    assert cached["attestation"]["report_data"] == cached_data.hex()


async def test_not_ready_and_failed_after_ready_are_503(env: Env) -> None:
    env.status.fail(Stage.WATCHDOG, "re-attestation failed: GPU 0 gone")
    r = await env.client.get(PATH, params={"nonce": "ab" * 32})
    assert r.status_code == 503 and r.json()["stage"] == "watchdog"
    r = await env.client.get("/readyz")
    assert r.status_code == 503 and r.json()["reason"] == "re-attestation failed: GPU 0 gone"
    assert (await env.client.get("/v1/models")).status_code == 503  # everything else refused
    assert (await env.client.get("/livez")).status_code == 200
    assert env.registry.get_sample_value("enclave_serve_boot_failed", {"stage": "watchdog"}) == 1
    assert env.registry.get_sample_value("enclave_serve_ready") == 0
