"""Fixtures for the command tests: three real TLS replicas (one with another configuration)
behind a round-robin balancer."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.attest.replicas import ReplicaServer, RoundRobin, three_replicas


@pytest.fixture
def replicas() -> Iterator[tuple[ReplicaServer, ReplicaServer, ReplicaServer]]:
    with three_replicas() as servers:
        yield servers


@pytest.fixture
def balancer(replicas: tuple[ReplicaServer, ...]) -> Iterator[RoundRobin]:
    lb = RoundRobin(list(replicas))
    yield lb
    lb.close()
