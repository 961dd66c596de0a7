"""``enclave-serve proxy`` against real TLS replicas behind a balancer."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn

from attest.client import Verifier, proxy_app
from attest.client.proxy import REPLICA_HEADER, VERIFIED_PATH
from foundation.errors import ConfigError
from runtime.commands.proxy import parse_listen
from tests.attest.replicas import MODEL, POLICY, ReplicaServer, RoundRobin

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello!"}]}


class Proxy:
    """The proxy app under uvicorn on 127.0.0.1 (plain HTTP), in a thread."""

    def __init__(self, upstream: str) -> None:
        self.verifier = Verifier(policy=POLICY, allow_insecure=True)
        config = uvicorn.Config(
            proxy_app(self.verifier, upstream), host="127.0.0.1", port=0, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def proxy(balancer: RoundRobin) -> Iterator[Proxy]:
    p = Proxy(balancer.url)
    yield p
    p.stop()


def test_a_plain_http_client_reaches_only_verified_replicas(
    replicas: tuple[ReplicaServer, ...], proxy: Proxy
) -> None:
    a, b, c = replicas

    def one(_: int) -> tuple[str, str]:
        r = httpx.post(proxy.url + "/v1/chat/completions", json=CHAT, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"], r.headers[REPLICA_HEADER]

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(one, range(18)))
    assert {name for name, _ in answers} == {"a", "b"}
    assert {key for _, key in answers} == {a.tls.spki_sha256, b.tls.spki_sha256}
    assert c.chats == 0
    listing = httpx.get(proxy.url + VERIFIED_PATH).json()
    assert {r["tls_spki_sha256"] for r in listing["replicas"]} == {a.tls.spki_sha256, b.tls.spki_sha256}
    assert {r["model_digest"] for r in listing["replicas"]} == {MODEL}
    assert all(r["verified"] for r in listing["replicas"])
    assert "policy:workload.config" in listing["refused"][c.tls.spki_sha256]


def test_streaming_passes_through_chunk_by_chunk(replicas: tuple[ReplicaServer, ...], proxy: Proxy) -> None:
    for server in replicas:
        server.chunk_delay_s = 0.25
    arrivals: list[float] = []
    lines: list[str] = []
    with httpx.stream(
        "POST", proxy.url + "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=30
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                arrivals.append(time.monotonic())
                lines.append(line)
    assert lines[-1] == "data: [DONE]" and len(lines) == 4
    # The first event arrived while the replica was still producing the rest.
    assert arrivals[-1] - arrivals[0] > 0.5


def test_no_verifiable_replica_answers_502_and_forwards_nothing(replicas: tuple[ReplicaServer, ...]) -> None:
    c = replicas[2]
    lb = RoundRobin([c])
    p = Proxy(lb.url)
    try:
        r = httpx.post(p.url + "/v1/chat/completions", json=CHAT, timeout=30)
        assert r.status_code == 502 and r.json()["error"]["type"] == "enclave_not_verified"
        assert c.chats == 0
    finally:
        p.stop()
        lb.close()


@pytest.mark.parametrize("listen", ["127.0.0.1:8080", "[::1]:8080", "localhost:1", "127.0.0.2:9"])
def test_loopback_listen_addresses_are_accepted(listen: str) -> None:
    assert parse_listen(listen, allow_non_loopback=False)[1] > 0


@pytest.mark.parametrize("listen", ["0.0.0.0:8080", "192.168.1.2:80", "example.com:80", "[::]:80"])
def test_other_listen_addresses_need_the_insecure_flag(listen: str) -> None:
    with pytest.raises(ConfigError, match="not a loopback address"):
        parse_listen(listen, allow_non_loopback=False)
    assert parse_listen(listen, allow_non_loopback=True)[1] > 0


@pytest.mark.parametrize("listen", ["8080", "127.0.0.1:", "127.0.0.1:http", "127.0.0.1:70000"])
def test_malformed_listen_addresses_are_refused(listen: str) -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_listen(listen, allow_non_loopback=True)
