"""Verification at scale: replicas of one deployment behind a TCP load balancer.

haproxy (Debian) in TCP round-robin mode fronts runtimes of one deployment (one init-data, one
policy; each replica has its own enclave-born TLS key), and, once, a backend of another
configuration. The verified client and ``enclave-serve proxy`` must verify every replica they
reach over the connection they use, and never send a request to a peer that is not verified.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import (
    ES,
    Proc,
    Workspace,
    child_env,
    free_port,
    start,
    start_kbs,
    start_runtime,
    wait_ready,
    write_init_data,
    write_policy,
)

HAPROXY = shutil.which("haproxy")

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(HAPROXY is None, reason="needs haproxy (make tools)")]


def _haproxy_config(port: int, backends: dict[str, int]) -> str:
    servers = "".join(f"  server {name} 127.0.0.1:{p}\n" for name, p in backends.items())
    return (
        "global\n  maxconn 512\n"
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 300s\n  timeout server 300s\n"
        f"frontend enclave\n  bind 127.0.0.1:{port}\n  default_backend replicas\n"
        f"backend replicas\n  balance roundrobin\n{servers}"
    )


@dataclass
class Pool:
    """Runtimes behind one haproxy; the deployment's policy; what a client points at."""

    ws: Workspace
    policy: Path
    port: int
    init_data: Path
    backends: dict[str, tuple[str, Proc]] = field(default_factory=dict)
    balancer: Proc | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def balance(self, *names: str) -> None:
        """(Re)start haproxy in front of ``names``."""
        if self.balancer is not None:
            self.balancer.stop()
        ports = {name: int(self.backends[name][0].rsplit(":", 1)[1]) for name in names}
        config = self.ws.root / "haproxy.cfg"
        config.write_text(_haproxy_config(self.port, ports))
        assert HAPROXY is not None
        self.balancer = start(f"haproxy-{'-'.join(names)}", [HAPROXY, "-db", "-f", str(config)], self.ws.root)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/livez", verify=False, timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"haproxy did not come up: {self.balancer.text()}")


def _spki(url: str) -> str:
    with httpx.Client(verify=False, timeout=30) as client:
        document = client.get(
            url + "/.well-known/enclave-serve/attestation", params={"nonce": "66" * 32}
        ).json()
    return str(document["claims"]["tls"]["spki_sha256"])


def _served_requests(url: str) -> float:
    """Completed chat requests a backend served, from its own vLLM metrics (asked directly)."""
    text = httpx.get(url + "/metrics", verify=False, timeout=30).text
    return sum(
        float(m.group(1)) for m in re.finditer(r"^vllm:request_success_total\{[^}]*\} (\S+)$", text, re.M)
    )


@pytest.fixture(scope="module")
def pool(workspace: Workspace) -> Iterator[Pool]:
    """Replicas a and b of one deployment (pristine model, one init-data, one policy) and c, a
    backend of another configuration (one more vLLM option) with its own, permissive KBS."""
    procs: list[Proc] = []
    kbs_port, other_kbs_port = free_port(), free_port()
    kbs_url, other_kbs_url = f"http://127.0.0.1:{kbs_port}", f"http://127.0.0.1:{other_kbs_port}"
    init, shown = write_init_data(
        workspace, "initdata-replicas", model_dir=workspace.encrypted, model=workspace.manifest_digest,
        kbs_url=kbs_url,
    )  # fmt: skip
    other, _ = write_init_data(
        workspace, "initdata-other", model_dir=workspace.encrypted, model=workspace.manifest_digest,
        kbs_url=other_kbs_url, vllm_extra=("--max-num-seqs", "2"),
    )  # fmt: skip
    policy = write_policy(
        workspace.root / "replicas-policy.toml", model=workspace.manifest_digest,
        config_sha256=shown["config_sha256"].removeprefix("sha256:"), init_data=shown["init_data_digest"],
    )  # fmt: skip
    result = Pool(ws=workspace, policy=policy, port=free_port(), init_data=init)
    try:
        procs.append(start_kbs(workspace, "kbs-replicas", workspace.key_file,
                               "--resource-policy", f"enclave-serve/model-key/tiny={policy}", port=kbs_port)[1])  # fmt: skip
        procs.append(start_kbs(workspace, "kbs-other", workspace.key_file, port=other_kbs_port)[1])
        for name, declaration in (("a", init), ("b", init), ("c", other)):
            result.backends[name] = start_runtime(workspace, f"replica-{name}", "", "", init_data=declaration)
        for url, proc in result.backends.values():
            wait_ready(url, proc)
        yield result
    finally:
        if result.balancer is not None:
            result.balancer.stop()
        for _url, proc in result.backends.values():
            proc.stop()
        for proc in procs:
            proc.stop()


def _chat(client: object, n: int) -> list[str]:
    """``n`` concurrent chats through ``client``; return the replica (SPKI) that answered each."""
    from attest.client import replica_of

    def one(i: int) -> str:
        raw = client.chat.completions.with_raw_response.create(  # type: ignore[attr-defined]
            model="tiny", max_tokens=4, messages=[{"role": "user", "content": f"Hello {i}"}]
        )
        assert raw.parse().choices[0].message.content is not None
        server = replica_of(raw.http_response)  # the verified replica whose connection carried it
        assert server is not None and server.tls_spki_sha256 is not None
        return server.tls_spki_sha256

    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, range(n)))


def test_one_client_verifies_every_replica_and_never_uses_another_configuration(pool: Pool) -> None:
    from attest.client import attested_openai

    spki = {name: _spki(url) for name, (url, _proc) in pool.backends.items()}
    pool.balance("a", "b")
    client = attested_openai(pool.url, policy=pool.policy, allow_insecure=True)
    answered = _chat(client, 8)
    assert set(client.verifier.verified) == {spki["a"], spki["b"]}  # both verified, each over its connection
    assert set(answered) <= {spki["a"], spki["b"]} and len(set(answered)) == 2, answered  # spread over both
    # A backend of another configuration joins the pool: it is reached, refused, and sent nothing.
    before = _served_requests(pool.backends["c"][0])
    pool.balance("a", "b", "c")
    client = attested_openai(pool.url, policy=pool.policy, allow_insecure=True)
    answered = _chat(client, 12)
    assert spki["c"] not in answered and spki["c"] not in client.verifier.verified
    assert spki["c"] in client.verifier.refused, client.verifier.refused
    assert _served_requests(pool.backends["c"][0]) == before
    # verify --replicas names every replica it reaches, the refused one with the failing rule.
    listed = subprocess.run(
        [ES, "verify", pool.url, "--replicas", "6", "--policy", str(pool.policy), "--allow-insecure-sample-tee"],
        capture_output=True, text=True, env=child_env(), timeout=300,
    )  # fmt: skip
    print(listed.stdout)  # the closing note shows it
    assert listed.returncode == 1, listed.stdout + listed.stderr
    refused = [line for line in listed.stdout.splitlines() if "NOT VERIFIED" in line]
    assert "3 distinct" in listed.stdout and len(refused) == 1 and "policy:workload.config" in refused[0]
    assert refused[0].startswith(spki["c"])


def test_the_proxy_forwards_only_to_verified_replicas_and_streams(pool: Pool) -> None:
    pool.balance("a", "b", "c")
    port = free_port()
    proxy = start(
        "proxy",
        [ES, "proxy", pool.url, "--policy", str(pool.policy), "--allow-insecure-sample-tee",
         "--listen", f"127.0.0.1:{port}"],
        pool.ws.root,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/.well-known/enclave-serve/verified", timeout=5).status_code == 200:
                    break
            assert proc_alive(proxy), proxy.text()
            time.sleep(0.2)
        before = _served_requests(pool.backends["c"][0])
        body = json.dumps({"model": "tiny", "max_tokens": 24, "stream": True, "temperature": 0,
                           "messages": [{"role": "user", "content": "Count to ten"}]})  # fmt: skip
        for _ in range(4):
            curl = subprocess.run(
                ["curl", "-sS", "-N", "--fail", "-H", "content-type: application/json", "-d", body,
                 base + "/v1/chat/completions"],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert curl.returncode == 0, curl.stderr
            events = [line for line in curl.stdout.splitlines() if line.startswith("data: ")]
            assert len(events) > 3 and events[-1] == "data: [DONE]", curl.stdout[-500:]
        listed = httpx.get(base + "/.well-known/enclave-serve/verified", timeout=10).json()
        verified = {r["tls_spki_sha256"] for r in listed["replicas"]}
        assert _spki(pool.backends["c"][0]) not in verified
        assert verified <= {_spki(pool.backends[n][0]) for n in ("a", "b")} and verified
        assert _served_requests(pool.backends["c"][0]) == before
    finally:
        proxy.stop()


def proc_alive(proc: Proc) -> bool:
    return proc.popen.poll() is None


def test_a_replica_restarting_with_a_new_key_is_verified_again_before_use(pool: Pool) -> None:
    from attest.client import attested_openai

    pool.balance("a", "b")
    client = attested_openai(pool.url, policy=pool.policy, allow_insecure=True)
    _chat(client, 4)
    old = _spki(pool.backends["b"][0])
    url, proc = pool.backends["b"]
    proc.popen.send_signal(signal.SIGTERM)
    proc.popen.wait(timeout=120)
    port = int(url.rsplit(":", 1)[1])
    pool.backends["b"] = start_runtime(
        pool.ws, "replica-b-again", "", "", init_data=pool.init_data, port=port
    )
    wait_ready(*pool.backends["b"])
    new = _spki(pool.backends["b"][0])
    assert new != old
    answered = _chat(client, 8)
    assert new in client.verifier.verified and old in client.verifier.verified
    assert set(answered) <= set(client.verifier.verified)
