"""An OpenAI client that refuses to talk to an unattested server.

:func:`attested_openai` first runs :func:`attest.client.remote.verify_server`; only if every check
passes does it return an ``openai.OpenAI`` (or ``AsyncOpenAI``) whose HTTP client trusts
exactly the certificate whose public key the enclave attested, and nothing else. A prompt can
therefore only ever reach the TLS endpoint inside the verified enclave: a different server
(or an interceptor) fails the TLS handshake before any request byte is sent.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

import httpx

from attest.client.remote import VerifiedServer, verify_server
from attest.errors import PolicyViolation
from attest.evidence import TeeKind
from attest.verify import Policy

__all__ = ["attested_openai", "pinned_ssl_context"]


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


def attested_openai(
    base_url: str,
    *,
    expected_model_digest: str | None = None,
    expected_config_sha256: str | None = None,
    allow_insecure: bool = False,
    policy: Policy | None = None,
    device_policy: Policy | None = None,
    collateral: Mapping[TeeKind, object] | None = None,
    api_key: str = "EMPTY",
    asynchronous: bool = False,
    timeout: float = 600.0,
    **openai_kwargs: Any,
) -> Any:
    """Verify the server at ``base_url`` (no ``/v1``), then return a pinned OpenAI client.

    The returned client has a ``verified`` attribute holding the :class:`VerifiedServer`.

    Raises:
        VerificationError, PolicyViolation, MalformedEvidence: the server is not trustworthy.
    """
    import openai

    verified = verify_server(
        base_url,
        expected_model_digest=expected_model_digest,
        expected_config_sha256=expected_config_sha256,
        allow_insecure=allow_insecure,
        policy=policy,
        device_policy=device_policy,
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
