"""An OpenAI client that refuses to talk to an unattested server.

:func:`attested_openai` first runs :func:`attest.client.remote.verify_server` against a workload
policy; only if every step passes does it return an ``openai.OpenAI`` (or ``AsyncOpenAI``) whose
HTTP client trusts exactly the certificate whose public key the enclave attested, and nothing
else. A prompt can therefore only ever reach the TLS endpoint inside the verified enclave: a
different server (or an interceptor) fails the TLS handshake before any request byte is sent.

A policy is required (:class:`attest.verify.workload.WorkloadPolicy`, or the path of a policy
file): without one, which software runs is unchecked, and the function raises unless the loudly
named ``allow_unpinned_software=True`` is given.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import httpx

from attest.client.remote import VerifiedServer, verify_server
from attest.errors import PolicyViolation
from attest.evidence import TeeKind
from attest.verify.workload import WorkloadPolicy

__all__ = ["attested_async_openai", "attested_openai", "pinned_ssl_context"]


def pinned_ssl_context(verified: VerifiedServer) -> ssl.SSLContext:
    """Return an SSL context that trusts only the attested server certificate.

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


def _policy(policy: WorkloadPolicy | str | PathLike[str] | None) -> WorkloadPolicy | None:
    if policy is None or isinstance(policy, WorkloadPolicy):
        return policy
    return WorkloadPolicy.load(Path(policy))


def attested_openai(
    base_url: str,
    *,
    policy: WorkloadPolicy | str | PathLike[str] | None,
    allow_unpinned_software: bool = False,
    allow_insecure: bool = False,
    expected_model_digest: str | None = None,
    expected_config_sha256: str | None = None,
    collateral: Mapping[TeeKind, object] | None = None,
    api_key: str = "EMPTY",
    asynchronous: bool = False,
    timeout: float = 600.0,
    **openai_kwargs: Any,
) -> Any:
    """Verify the server at ``base_url`` (no ``/v1``) against ``policy``, then return a pinned client.

    The returned client has a ``verified`` attribute holding the :class:`VerifiedServer`.

    Raises:
        ServerRefused: a step failed (``exc.verdict`` lists every step), including a missing
            policy without ``allow_unpinned_software``.
        VerificationUnavailable: the server could not be reached.
        PolicyFileError: ``policy`` names a file that is not a valid policy.
    """
    import openai

    verified = verify_server(
        base_url,
        policy=_policy(policy),
        allow_unpinned_software=allow_unpinned_software,
        allow_insecure=allow_insecure,
        expected_model_digest=expected_model_digest,
        expected_config_sha256=expected_config_sha256,
        collateral=collateral,
    )
    ctx = pinned_ssl_context(verified)
    api_base = base_url.rstrip("/") + "/v1"
    client: Any
    if asynchronous:
        client = openai.AsyncOpenAI(
            base_url=api_base,
            api_key=api_key,
            # The SDK accepts httpx clients as well as its own httpx2 fork (its stubs list only httpx2).
            http_client=httpx.AsyncClient(verify=ctx, timeout=timeout),  # type: ignore[arg-type]
            **openai_kwargs,
        )
    else:
        client = openai.OpenAI(
            base_url=api_base,
            api_key=api_key,
            http_client=httpx.Client(verify=ctx, timeout=timeout),  # type: ignore[arg-type]
            **openai_kwargs,
        )
    client.verified = verified
    return client


async def attested_async_openai(base_url: str, **kwargs: Any) -> Any:
    """The async form: verify in a worker thread, return a pinned ``openai.AsyncOpenAI``.

    Takes the arguments of :func:`attested_openai` (``policy`` is required the same way).
    """
    return await asyncio.to_thread(attested_openai, base_url, asynchronous=True, **kwargs)
