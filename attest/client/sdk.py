"""An OpenAI client that talks only to verified replicas of an attested deployment.

:func:`attested_openai` builds a :class:`~attest.client.verifier.Verifier` (the workload policy and
the other options, once), verifies one replica at ``base_url`` before returning (so a wrong
policy or URL fails here, not at the first prompt), and returns an :class:`AttestedOpenAI` (an
``openai.OpenAI``) whose HTTP client is a :class:`~attest.client.transport.VerifyingTransport`:
every new connection is verified over itself before any request goes over it, so replicas behind
a load balancer, each with its own enclave-born TLS key, are each verified once and used; one
that does not verify is never sent a prompt.

A policy is required (:class:`attest.verify.workload.WorkloadPolicy`, or the path of a policy
file): without one, which software runs is unchecked, and the function raises unless the loudly
named ``allow_unpinned_software=True`` is given.

Errors at request time: the OpenAI SDK wraps a transport's exceptions in
``openai.APIConnectionError`` (after its own retries); ``exc.__cause__`` is the
:class:`~attest.client.verifier.NoVerifiedReplica` or
:class:`~foundation.errors.VerificationUnavailable` that stopped the request.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from os import PathLike
from typing import Any

import openai

from attest.client.remote import VerifiedServer
from attest.client.transport import verified_async_client, verified_client, verify_first
from attest.client.verifier import Verifier
from attest.evidence import TeeKind
from attest.verify.workload import WorkloadPolicy
from foundation.errors import PolicyViolation

__all__ = [
    "AttestedAsyncOpenAI",
    "AttestedOpenAI",
    "attested_async_openai",
    "attested_openai",
    "pinned_ssl_context",
]


def pinned_ssl_context(verified: VerifiedServer) -> ssl.SSLContext:
    """Return an SSL context that trusts only the attested server certificate (one replica).

    Raises:
        PolicyViolation: the server was verified without TLS, so there is nothing to pin.
    """
    if verified.tls_certificate_pem is None:
        raise PolicyViolation("the server does not use TLS; an attested client needs a TLS key to pin")
    ctx = ssl.create_default_context(cadata=verified.tls_certificate_pem.decode())
    # The attested key is the identity; the certificate's names are whatever the enclave chose.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class AttestedOpenAI(openai.OpenAI):
    """An ``openai.OpenAI`` whose every connection goes to a verified replica.

    ``verifier`` holds the verified set; ``verified`` is the replica verified on construction.
    """

    verifier: Verifier
    verified: VerifiedServer

    def copy(self, *args: Any, **kwargs: Any) -> AttestedOpenAI:
        """``openai.OpenAI.copy`` (and ``with_options``), keeping the verifier."""
        copied = super().copy(*args, **kwargs)
        assert isinstance(copied, AttestedOpenAI)
        copied.verifier, copied.verified = self.verifier, self.verified
        return copied

    with_options = copy


class AttestedAsyncOpenAI(openai.AsyncOpenAI):
    """The async :class:`AttestedOpenAI`."""

    verifier: Verifier
    verified: VerifiedServer

    def copy(self, *args: Any, **kwargs: Any) -> AttestedAsyncOpenAI:
        """``openai.AsyncOpenAI.copy`` (and ``with_options``), keeping the verifier."""
        copied = super().copy(*args, **kwargs)
        assert isinstance(copied, AttestedAsyncOpenAI)
        copied.verifier, copied.verified = self.verifier, self.verified
        return copied

    with_options = copy


def _verifier(
    policy: WorkloadPolicy | str | PathLike[str] | None,
    verifier: Verifier | None,
    **options: Any,
) -> Verifier:
    if verifier is not None:
        return verifier
    return Verifier(policy=policy, **options)


def attested_openai(
    base_url: str,
    *,
    policy: WorkloadPolicy | str | PathLike[str] | None,
    allow_unpinned_software: bool = False,
    allow_insecure: bool = False,
    expected_model_digest: str | None = None,
    expected_config_sha256: str | None = None,
    collateral: Mapping[TeeKind, object] | None = None,
    verifier: Verifier | None = None,
    api_key: str = "EMPTY",
    timeout: float = 600.0,
    **openai_kwargs: Any,
) -> AttestedOpenAI:
    """Verify a replica at ``base_url`` (no ``/v1``), then return a client that verifies every connection.

    Give either the options (``policy``, ...) or a ready ``verifier`` (then ``policy`` is ignored
    and may be None). The returned client's ``verifier`` holds the verified set, its ``verified``
    the replica verified here.

    Raises:
        ServerRefused: every replica reached was refused (a
            :class:`~attest.client.verifier.NoVerifiedReplica`; ``exc.verdict`` lists the steps),
            including for a missing policy without ``allow_unpinned_software``.
        VerificationUnavailable: no replica could be reached or asked.
        PolicyFileError: ``policy`` names a file that is not a valid policy.
    """
    checker = _verifier(
        policy,
        verifier,
        allow_unpinned_software=allow_unpinned_software,
        allow_insecure=allow_insecure,
        expected_model_digest=expected_model_digest,
        expected_config_sha256=expected_config_sha256,
        collateral=collateral,
    )
    verified = verify_first(checker, base_url)
    client = AttestedOpenAI(
        base_url=base_url.rstrip("/") + "/v1",
        api_key=api_key,
        # The SDK accepts httpx clients as well as its own httpx2 fork (its stubs list only httpx2).
        http_client=verified_client(checker, timeout=timeout),  # type: ignore[arg-type]
        **openai_kwargs,
    )
    client.verifier, client.verified = checker, verified
    return client


async def attested_async_openai(
    base_url: str,
    *,
    policy: WorkloadPolicy | str | PathLike[str] | None,
    allow_unpinned_software: bool = False,
    allow_insecure: bool = False,
    expected_model_digest: str | None = None,
    expected_config_sha256: str | None = None,
    collateral: Mapping[TeeKind, object] | None = None,
    verifier: Verifier | None = None,
    api_key: str = "EMPTY",
    timeout: float = 600.0,
    **openai_kwargs: Any,
) -> AttestedAsyncOpenAI:
    """The async form of :func:`attested_openai`: an ``openai.AsyncOpenAI`` that verifies every connection.

    Raises: as :func:`attested_openai`.
    """
    checker = _verifier(
        policy,
        verifier,
        allow_unpinned_software=allow_unpinned_software,
        allow_insecure=allow_insecure,
        expected_model_digest=expected_model_digest,
        expected_config_sha256=expected_config_sha256,
        collateral=collateral,
    )
    verified = await asyncio.to_thread(verify_first, checker, base_url)
    client = AttestedAsyncOpenAI(
        base_url=base_url.rstrip("/") + "/v1",
        api_key=api_key,
        http_client=verified_async_client(checker, timeout=timeout),  # type: ignore[arg-type]
        **openai_kwargs,
    )
    client.verifier, client.verified = checker, verified
    return client
