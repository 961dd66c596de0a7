"""End to end: the attested server in full — canary, watchdog, engine death, drain, attestation
under load, the cached document, ACI and metrics — with the real OpenAI SDK over TLS."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import secrets
import signal
import ssl
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from attest.document import AttestationDocument
from tests.e2e.conftest import (
    ES,
    Enclave,
    Launcher,
    Proc,
    Workspace,
    assert_nothing_served,
    child_env,
    wait_ready,
)
from tests.server.test_attestation_routes import aci_report_data

pytestmark = pytest.mark.e2e

ATTESTATION = "/.well-known/enclave-serve/attestation"


def _observed_spki(url: str) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    host, port = url.removeprefix("https://").split(":")
    pem = ssl.get_server_certificate((host, int(port)))
    key = x509.load_pem_x509_certificate(pem.encode()).public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _children(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rfind(")") + 2 :].split()[1]) == parent:
                found.append(int(entry))
                frontier.append(int(entry))
    return found


def _exit_code(proc: Proc, timeout: float) -> int:
    try:
        return proc.popen.wait(timeout=timeout)
    except Exception as exc:
        raise AssertionError(f"{proc.name} did not exit:\n{proc.text()[-3000:]}") from exc


def _first_not_ready(url: str, proc: Proc, timeout: float = 60) -> dict:
    """Poll ``/readyz`` until it first answers 503 (before the process exits); return its body,
    with ``completion_status``: what a completion request got at that moment."""
    deadline = time.monotonic() + timeout
    with httpx.Client(verify=False, base_url=url, timeout=5) as client:
        while time.monotonic() < deadline and proc.popen.poll() is None:
            try:
                r = client.get("/readyz")
            except httpx.HTTPError:
                break
            if r.status_code == 503:
                body = {"prompt": "hi", "model": "tiny", "max_tokens": 2}
                return {
                    **r.json(),
                    "completion_status": client.post("/v1/completions", json=body).status_code,
                }
            time.sleep(0.1)
    return {}


# -- the shared enclave ----------------------------------------------------------------------


def test_a_burst_is_rate_limited_while_a_verifier_from_elsewhere_gets_its_document(enclave: Enclave) -> None:
    async def burst() -> tuple[list[int], httpx.Response, float]:
        # The burst comes from 127.0.0.3 (so other tests' 127.0.0.1 keeps its budget), the
        # verifier from 127.0.0.2: the limit is per client address.
        noisy_transport = httpx.AsyncHTTPTransport(verify=False, local_address="127.0.0.3")
        async with httpx.AsyncClient(transport=noisy_transport, base_url=enclave.url, timeout=30) as noisy:
            requests = [noisy.get(ATTESTATION, params={"nonce": secrets.token_hex(32)}) for _ in range(120)]
            transport = httpx.AsyncHTTPTransport(verify=False, local_address="127.0.0.2")
            async with httpx.AsyncClient(transport=transport, base_url=enclave.url, timeout=30) as verifier:
                nonce = secrets.token_hex(32)
                started = time.monotonic()
                answers, mine = await asyncio.gather(
                    asyncio.gather(*requests), verifier.get(ATTESTATION, params={"nonce": nonce})
                )
                return [r.status_code for r in answers], mine, time.monotonic() - started

    codes, mine, seconds = asyncio.run(burst())
    assert set(codes) <= {200, 429} and codes.count(429) >= 80, codes  # burst 32, then 8/s
    assert codes.count(200) >= 32
    assert mine.status_code == 200, mine.text
    assert len(mine.json()["claims"]["nonces"]) >= 1
    assert seconds < 20
    metrics = httpx.get(enclave.url + "/metrics", verify=False).text
    assert 'enclave_serve_attestation_requests_total{kind="fresh",outcome="rate-limited"}' in metrics


def test_the_cached_document_verifies_with_its_stated_age(enclave: Enclave) -> None:
    with httpx.Client(verify=False, base_url=enclave.url) as client:
        first, second = client.get(ATTESTATION), client.get(ATTESTATION)
    assert first.status_code == 200 and first.content == second.content  # served from memory
    document = AttestationDocument.from_json(first.json())
    claims = document.claims
    assert claims.nonces == () and claims.max_age_s == 60
    assert abs(time.time() - claims.issued_at) < 60 and int(first.headers["age"]) <= 60
    checks = document.check_binding(
        nonce=None,
        observed_tls_spki_sha256=_observed_spki(enclave.url),
        expected_model_digest=enclave.ws.manifest_digest,
        allow_insecure=True,
    )
    assert "unchallenged" in checks[0].detail
    assert claims.canary is not None and claims.canary["status"] == "passed"


def test_the_aci_endpoint_binds_keyset_nonce_model_and_config(enclave: Enclave) -> None:
    nonce = secrets.token_hex(32)
    with httpx.Client(verify=False, base_url=enclave.url) as client:
        r = client.get("/v1/aci/attestation", params={"nonce": nonce})
        config = client.get("/.well-known/enclave-serve/config").content
        bad = client.get("/v1/aci/attestation", params={"nonce": nonce.upper()})
    assert r.status_code == 200 and bad.status_code == 400
    body = r.json()
    keyset = body["attestation"]["workload_keyset"]
    digest, report_data = aci_report_data(keyset, nonce)  # an independent reading of aci/1
    assert body["workload_keyset_digest"] == digest == r.headers["x-aci-keyset-digest"]
    assert r.headers["x-aci-version"] == "aci/1"
    evidence = body["attestation"]["evidence"]["primary"]["evidence"]
    assert base64.b64decode(evidence["report_data"]) == report_data + bytes(32)
    assert keyset["tls_public_keys"] == [{"spki_sha256": _observed_spki(enclave.url)}]
    assert keyset["enclave_serve"]["model"] == enclave.ws.manifest_digest
    assert keyset["enclave_serve"]["config_sha256"] == "sha256:" + hashlib.sha256(config).hexdigest()
    assert keyset["enclave_serve"]["canary"] == "passed"


def test_metrics_sit_beside_vllms(enclave: Enclave) -> None:
    text = httpx.get(enclave.url + "/metrics", verify=False).text
    for line in (
        'enclave_serve_boot_stage_seconds{stage="load"}',
        'enclave_serve_boot_stage_seconds{stage="canary"}',
        'enclave_serve_canary{outcome="passed"} 1.0',
        "enclave_serve_ready 1.0",
        "enclave_serve_load_bytes ",
        "enclave_serve_watchdog_checks_total",
        "vllm:",
    ):
        assert line in text, line
    assert "INJECTED" not in text and "secret" not in text.lower()


# -- runtimes of their own -------------------------------------------------------------------


def test_a_weight_corrupted_after_authentication_fails_the_canary(
    workspace: Workspace, launcher: Launcher
) -> None:
    kbs = launcher.kbs("kbs-canary", workspace.key_file)
    url, proc = launcher.runtime(
        "runtime-canary", workspace.encrypted, kbs, double="corrupt-weight=model.norm.weight"
    )
    body = wait_ready(url, proc, want_failure=True)
    assert body["stage"] == "canary", body
    assert "different tokens from the packer's reference" in body["reason"]
    assert "TEST HOOK: negated model.norm.weight" in proc.text()
    assert_nothing_served(url)
    metrics = httpx.get(url + "/metrics", verify=False).text
    assert 'enclave_serve_canary{outcome="failed"} 1.0' in metrics


def test_the_watchdog_flips_readiness_and_exits_when_a_device_stops_attesting(
    workspace: Workspace, launcher: Launcher
) -> None:
    kbs = launcher.kbs("kbs-watchdog", workspace.key_file)
    url, proc = launcher.runtime(
        "runtime-watchdog", workspace.encrypted, kbs, "--gpus", "sample", "--watchdog-interval", "1",
        double="failing-device-after=2",
    )  # fmt: skip
    wait_ready(url, proc)
    seen = _first_not_ready(url, proc)
    assert seen.get("stage") == "watchdog", seen
    assert seen["completion_status"] == 503  # nothing else is served any more
    assert "no longer answers with valid evidence" in seen["reason"]
    assert _exit_code(proc, 30) == 5


def test_engine_death_after_ready_flips_readiness_and_exits(workspace: Workspace, launcher: Launcher) -> None:
    kbs = launcher.kbs("kbs-death", workspace.key_file)
    url, proc = launcher.runtime("runtime-death", workspace.encrypted, kbs, "--watchdog-interval", "0")
    wait_ready(url, proc)
    cores = [
        pid
        for pid in _children(proc.popen.pid)
        if "EngineCore" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    ]
    assert cores, "no EngineCore process found"
    os.kill(cores[0], signal.SIGKILL)
    seen = _first_not_ready(url, proc)
    assert "engine" in seen.get("reason", ""), seen
    assert _exit_code(proc, 30) == 4


def test_sigterm_during_a_stream_lets_it_finish_then_exits_zero(
    workspace: Workspace, launcher: Launcher
) -> None:
    kbs = launcher.kbs("kbs-drain", workspace.key_file)
    url, proc = launcher.runtime("runtime-drain", workspace.encrypted, kbs)
    wait_ready(url, proc)
    # Booted from flags (no init-data): it says so, and a policy cannot be recorded from it.
    document = httpx.get(url + ATTESTATION, params={"nonce": "44" * 32}, verify=False, timeout=30).json()
    assert (
        "configuration not pinned by init-data (set from the command line)"
        in document["claims"]["insecure_modes"]
    )
    record = subprocess.run(
        [ES, "policy", "record", url, "-o", str(workspace.root / "recorded-from-flags.toml"),
         "--allow-insecure-sample-tee"],
        capture_output=True, text=True, env=child_env(), timeout=120,
    )  # fmt: skip
    assert record.returncode == 1 and "init-data" in record.stderr, record.stderr
    assert not (workspace.root / "recorded-from-flags.toml").exists()
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", http_client=httpx.Client(verify=False))
    stream = client.completions.create(
        model="tiny", prompt="Drain me", max_tokens=480, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks, finish = [], None
    check: dict[str, bool] = {}

    def new_connection_is_refused() -> None:
        time.sleep(0.2)
        try:
            httpx.get(url + "/readyz", verify=False, timeout=3)
            check["refused"] = False
        except httpx.HTTPError:
            check["refused"] = True
        check["alive"] = proc.popen.poll() is None

    checker = threading.Thread(target=new_connection_is_refused, daemon=True)
    for chunk in stream:
        if not chunks:
            proc.popen.send_signal(signal.SIGTERM)
            checker.start()
        chunks.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "length" and len(chunks) >= 480 - 5  # the whole stream, after SIGTERM
    checker.join(timeout=10)
    assert check == {"refused": True, "alive": True}  # no new connections while draining
    assert _exit_code(proc, 60) == 0
    assert "SIGTERM: draining 1 open connection(s)" in proc.text()
