"""Every connection verified: replicas with their own TLS keys behind a round-robin balancer."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from attest.client import (
    AttestedOpenAI,
    NoVerifiedReplica,
    ServerRefused,
    Verifier,
    VerifyingTransport,
    attested_async_openai,
    attested_openai,
    replica_of,
    verified_client,
)
from foundation.errors import PolicyViolation
from tests.attest.replicas import POLICY, ReplicaServer, RoundRobin, three_replicas

MESSAGES = [{"role": "user", "content": "Hello!"}]


@pytest.fixture
def replicas() -> Iterator[tuple[ReplicaServer, ReplicaServer, ReplicaServer]]:
    with three_replicas() as servers:
        yield servers


@pytest.fixture
def balancer(replicas: tuple[ReplicaServer, ...]) -> Iterator[RoundRobin]:
    lb = RoundRobin(list(replicas[:2]))
    yield lb
    lb.close()


def chats(client: AttestedOpenAI, n: int = 12) -> list[str]:
    def one(_: int) -> str:
        reply = client.chat.completions.create(model="tiny", messages=MESSAGES)  # type: ignore[arg-type]
        return str(reply.choices[0].message.content)

    with ThreadPoolExecutor(6) as pool:
        return list(pool.map(one, range(n)))


def assert_verified_before_use(server: ReplicaServer) -> None:
    """The first thing this replica (this TLS key) was ever asked is its attestation, and a
    connection that carries the verification carries nothing before it."""
    assert server.log and server.log[0][1] == "attestation", server.log
    for carried in server.connections().values():
        if "attestation" in carried:
            assert carried[:2] == ["attestation", "config"], carried


def test_two_replicas_are_each_verified_over_their_own_connection_and_share_the_load(
    replicas: tuple[ReplicaServer, ...], balancer: RoundRobin
) -> None:
    a, b, _ = replicas
    client = attested_openai(balancer.url, policy=POLICY, allow_insecure=True)
    assert isinstance(client, AttestedOpenAI)
    assert set(chats(client)) == {"a", "b"}
    assert set(client.verifier.verified) == {a.tls.spki_sha256, b.tls.spki_sha256}
    for server in (a, b):
        assert server.chats > 0
        assert_verified_before_use(server)
    # A replica is asked for a quote per connection that reached it unverified, not per request.
    assert sum(1 for _, what in a.log if what == "attestation") < a.chats


def test_a_replica_of_another_configuration_is_never_sent_a_request(
    replicas: tuple[ReplicaServer, ...], balancer: RoundRobin
) -> None:
    c = replicas[2]
    balancer.backends.append(c)
    client = attested_openai(balancer.url, policy=POLICY, allow_insecure=True)
    assert set(chats(client, 18)) == {"a", "b"}
    # Concurrent connections may each have asked c before the first refusal was recorded.
    assert c.log and c.chats == 0 and {what for _, what in c.log} == {"attestation", "config"}
    refused = client.verifier.refused[c.tls.spki_sha256]
    assert any(step.name == "policy:workload.config" for step in refused.verdict.failures)
    assert c.tls.spki_sha256 not in client.verifier.verified


def test_no_verifiable_replica_is_a_typed_error_and_nothing_is_sent(
    replicas: tuple[ReplicaServer, ...],
) -> None:
    c = replicas[2]
    lb = RoundRobin([c])
    try:
        with pytest.raises(ServerRefused, match=r"policy:workload\.config"):
            attested_openai(lb.url, policy=POLICY, allow_insecure=True)
        verifier = Verifier(policy=POLICY, allow_insecure=True, max_attempts=3)
        with verified_client(verifier, lb.url) as client, pytest.raises(NoVerifiedReplica) as caught:
            client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES})
        assert len(caught.value.replicas) == 3 and caught.value.verdict.failures
        assert c.chats == 0
    finally:
        lb.close()


def test_a_missing_policy_refuses_every_replica(balancer: RoundRobin) -> None:
    with pytest.raises(ServerRefused, match="policy"):
        attested_openai(balancer.url, policy=None, allow_insecure=True)


def test_a_restarted_replica_is_verified_again_before_use(
    replicas: tuple[ReplicaServer, ...], balancer: RoundRobin
) -> None:
    a, b, _ = replicas
    client = attested_openai(balancer.url, policy=POLICY, allow_insecure=True)
    assert set(chats(client)) == {"a", "b"}
    old_key = b.tls.spki_sha256
    b.restart()
    assert b.tls.spki_sha256 != old_key and b.log == []
    assert "b" in chats(client)
    assert {old_key, b.tls.spki_sha256, a.tls.spki_sha256} == set(client.verifier.verified)
    assert_verified_before_use(b)


def test_streaming_sync_and_async_over_verified_connections(
    replicas: tuple[ReplicaServer, ...], balancer: RoundRobin
) -> None:
    a, b, _ = replicas
    client = attested_openai(balancer.url, policy=POLICY, allow_insecure=True)
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text in ("a says hi", "b says hi")

    async def main() -> set[str]:
        aclient = await attested_async_openai(balancer.url, policy=POLICY, allow_insecure=True)

        async def one() -> str:
            s = await aclient.chat.completions.create(model="tiny", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
            return "".join([c.choices[0].delta.content or "" async for c in s if c.choices])

        texts = await asyncio.gather(*(one() for _ in range(8)))
        assert set(aclient.verifier.verified) == {a.tls.spki_sha256, b.tls.spki_sha256}
        await aclient.close()
        return set(texts)

    assert asyncio.run(main()) == {"a says hi", "b says hi"}
    for server in (a, b):
        assert_verified_before_use(server)


def test_each_response_names_the_verified_replica_that_answered(
    replicas: tuple[ReplicaServer, ...], balancer: RoundRobin
) -> None:
    verifier = Verifier(policy=POLICY, allow_insecure=True)
    with verified_client(verifier, balancer.url) as client:
        response = client.get("/v1/models")
    replica = replica_of(response)
    assert replica is not None and replica.tls_spki_sha256 in {s.tls.spki_sha256 for s in replicas[:2]}


def test_plain_http_is_refused_before_anything_is_sent() -> None:
    verifier = Verifier(policy=POLICY, allow_insecure=True)
    with (
        httpx.Client(transport=VerifyingTransport(verifier), trust_env=False) as client,
        pytest.raises(PolicyViolation, match="HTTPS only"),
    ):
        client.get("http://127.0.0.1:9/v1/models")


def test_the_client_imports_without_the_server_side() -> None:
    """What a client-only install lacks (vLLM, torch, the model and metrics libraries) and the
    server's packages are never imported by the client, its OpenAI SDK client or its proxy."""
    import subprocess
    import sys

    blocked = ["vllm", "torch", "safetensors", "numpy", "tokenizers", "pynvml", "prometheus_client"]
    blocked += ["jwcrypto", "server", "loader", "runtime"]
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r}: raise ImportError('client-only: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import attest.client, attest.client.sdk, attest.client.proxy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
