"""Verify a running enclave-serve server before sending it anything.

:func:`verify_server` sends a fresh random nonce to ``/.well-known/enclave-serve/attestation``,
records the TLS public key the connection actually used, fetches the run configuration, and
hands everything to :func:`attest.client.verdict.verify_document` (the numbered steps are
listed there): the hardware evidence, its binding to our nonce and the TLS key, and the
workload policy that pins which software runs.

The server's certificate is not checked against any CA: its trust comes from the binding. A
caller that continues talking to the server must pin :attr:`VerifiedServer.tls_spki_sha256`
(:func:`attest.client.sdk.attested_openai` does).

:func:`fetch_bundle` / :class:`VerificationBundle` save what was fetched, so the same checks can
be run again offline (``enclave-serve verify --offline``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from attest.client.verdict import ServerRefused, Verdict, verify_document
from attest.document import NONCE_SIZE, AttestationDocument, DocumentCheck
from attest.evidence import TeeKind
from attest.runconfig import RunConfiguration
from attest.verify.workload import WorkloadPolicy
from foundation.errors import MalformedEvidence, VerificationUnavailable, connection_failure

__all__ = [
    "ATTESTATION_PATH",
    "BUNDLE_FORMAT",
    "CONFIG_PATH",
    "NotAnEnclave",
    "VerificationBundle",
    "VerifiedServer",
    "fetch_bundle",
    "peer_identity",
    "server_base_url",
    "unverified_tls_context",
    "verify_bundle",
    "verify_server",
]

ATTESTATION_PATH = "/.well-known/enclave-serve/attestation"
CONFIG_PATH = "/.well-known/enclave-serve/config"
#: Format of a saved verification bundle (``verify --save``).
BUNDLE_FORMAT = "enclave-serve/verification-bundle/v1"
#: The OpenAI API's prefix: the URL an OpenAI client is given, not the server's base URL.
OPENAI_PREFIX = "/v1"
#: What a server without enclave-serve's attestation route answers for it.
_NO_SUCH_ROUTE = frozenset({404, 405})


def server_base_url(url: str) -> str:
    """Return the server's base URL: ``url`` without a trailing ``/`` or OpenAI ``/v1`` (``/v1/``).

    ``enclave-serve serve`` prints ``https://host:port/v1`` for OpenAI clients; the attestation
    routes live beside ``/v1``, under ``/.well-known/``.
    """
    base = url.rstrip("/")
    return base.removesuffix(OPENAI_PREFIX) if base.endswith(OPENAI_PREFIX) else base


class NotAnEnclave(ServerRefused):
    """The server answered, but it has no enclave-serve attestation (a plain vLLM, another server).

    A verdict, not an outage: it is refused (``enclave-serve verify`` exits 1). ``verdict`` holds
    one failed ``document`` step that says what answered.
    """

    def __init__(self, url: str, status: int) -> None:
        path = urlsplit(url).path.rstrip("/")
        hint = (
            f"; if it is one, give its base URL (without {path}), e.g. "
            f"{urlsplit(url).scheme}://{urlsplit(url).netloc}"
            if path
            else ""
        )
        detail = (
            f"{url} answered HTTP {status} for {ATTESTATION_PATH}: it is not an enclave-serve server "
            f"(a plain vLLM or other OpenAI server has no attestation), so nothing about it is "
            f"verified{hint}"
        )
        super().__init__(Verdict(steps=(DocumentCheck(name="document", ok=False, detail=detail),)))
        self.status = status


@dataclass(frozen=True, slots=True, kw_only=True)
class VerificationBundle:
    """What a verification fetched: enough to run the same checks again offline."""

    url: str
    nonce: bytes
    tls_spki_sha256: str | None
    tls_certificate_pem: bytes | None
    document: Mapping[str, Any]
    config: bytes

    def to_json(self) -> dict[str, Any]:
        """Return the bundle as JSON (``verify --save``)."""
        return {
            "format": BUNDLE_FORMAT,
            "url": self.url,
            "nonce": self.nonce.hex(),
            "tls_spki_sha256": self.tls_spki_sha256,
            "tls_certificate_pem": None
            if self.tls_certificate_pem is None
            else self.tls_certificate_pem.decode(),
            "document": dict(self.document),
            "config": base64.b64encode(self.config).decode(),
        }

    @classmethod
    def from_json(cls, obj: object) -> VerificationBundle:
        """Parse a saved bundle. Raises MalformedEvidence."""
        try:
            if not isinstance(obj, Mapping) or obj.get("format") != BUNDLE_FORMAT:
                raise MalformedEvidence(f"not a {BUNDLE_FORMAT} file")
            cert = obj.get("tls_certificate_pem")
            return cls(
                url=str(obj["url"]),
                nonce=bytes.fromhex(obj["nonce"]),
                tls_spki_sha256=None if obj.get("tls_spki_sha256") is None else str(obj["tls_spki_sha256"]),
                tls_certificate_pem=None if cert is None else str(cert).encode(),
                document=dict(obj["document"]),
                config=base64.b64decode(obj["config"], validate=True),
            )
        except MalformedEvidence:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedEvidence(f"the verification bundle is malformed ({type(exc).__name__})") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifiedServer:
    """The outcome of a successful :func:`verify_server`."""

    base_url: str
    document: AttestationDocument
    #: The run configuration, checked against the attested digest.
    config: RunConfiguration
    verdict: Verdict
    tls_spki_sha256: str | None = None
    #: The server's certificate (PEM) whose key was attested: pin it as the only trust anchor.
    tls_certificate_pem: bytes | None = None
    bundle: VerificationBundle | None = None

    @property
    def checks(self) -> list[DocumentCheck]:
        """Every step, in order."""
        return list(self.verdict.steps)

    @property
    def warnings(self) -> list[str]:
        """What was *not* checked (for example: no policy, with ``allow_unpinned_software``)."""
        return list(self.verdict.warnings)

    def to_json(self) -> dict[str, Any]:
        """Return the verdict as JSON, with the URL and the TLS key to pin."""
        return {"url": self.base_url, "tls_spki_sha256": self.tls_spki_sha256, **self.verdict.to_json()}


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode()


def unverified_tls_context() -> ssl.SSLContext:
    """Return a TLS context that checks no certificate: trust comes from the attestation binding.

    .. warning::
       Use it only where the connection's SPKI is then checked against an attested document.
    """
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def peer_identity(ssl_object: object) -> tuple[str, bytes] | None:
    """Return the (SPKI sha256 hex, certificate PEM) of a TLS connection's peer; None without TLS.

    ``ssl_object`` is what a network stream's ``get_extra_info("ssl_object")`` returns.
    """
    # An ssl.SSLObject (asyncio, AnyIO) or the _ssl socket object under an ssl.SSLSocket (httpcore sync).
    getpeercert = getattr(ssl_object, "getpeercert", None)
    der = getpeercert(True) if callable(getpeercert) else None
    if not isinstance(der, bytes):
        return None
    cert = x509.load_der_x509_certificate(der)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest(), cert.public_bytes(serialization.Encoding.PEM)


def _peer_identity(response: httpx.Response) -> tuple[str, bytes] | None:
    stream = response.extensions.get("network_stream")
    return None if stream is None else peer_identity(stream.get_extra_info("ssl_object"))


def fetch_bundle(
    base_url: str,
    *,
    nonce: bytes | None = None,
    timeout: float = 60.0,
    http_client: httpx.Client | None = None,
) -> VerificationBundle:
    """Fetch a fresh attestation document (for a new random nonce) and the run configuration.

    ``base_url`` may be the OpenAI URL (``https://host:port/v1``): the ``/v1`` is dropped.

    Raises:
        NotAnEnclave: the server answered, but has no attestation route (404/405): refused.
        VerificationUnavailable: the server is unreachable or answers an error; the message names
            the address and what happened there (refused, timed out, plain HTTP, TLS).
        MalformedEvidence: the document is not JSON.
    """
    nonce = nonce if nonce is not None else secrets.token_bytes(NONCE_SIZE)
    base = server_base_url(base_url)
    client = http_client or httpx.Client(verify=unverified_tls_context(), timeout=timeout)
    try:

        def get(url: str, **kw: Any) -> httpx.Response:
            try:
                response = client.get(url, **kw)
            except httpx.TransportError as exc:
                raise VerificationUnavailable(connection_failure(exc, url=url).text) from exc
            except httpx.HTTPError as exc:
                raise VerificationUnavailable(f"cannot reach {url}: {exc}") from exc
            if response.status_code in _NO_SUCH_ROUTE and url.startswith(base + ATTESTATION_PATH):
                raise NotAnEnclave(base, response.status_code)
            if response.status_code != 200:
                raise VerificationUnavailable(
                    f"the server answered {response.status_code} for {url}: {response.text[:500]}"
                )
            return response

        response = get(base + ATTESTATION_PATH, params={"nonce": nonce.hex()})
        peer = _peer_identity(response)
        try:
            document = json.loads(response.content)
        except ValueError as exc:
            raise MalformedEvidence("the attestation document is not JSON") from exc
        config = get(base + CONFIG_PATH).content
    finally:
        if http_client is None:
            client.close()
    return VerificationBundle(
        url=base,
        nonce=nonce,
        tls_spki_sha256=None if peer is None else peer[0],
        tls_certificate_pem=None if peer is None else peer[1],
        document=document if isinstance(document, dict) else {"not": "an object"},
        config=config,
    )


def verify_bundle(
    bundle: VerificationBundle,
    *,
    policy: WorkloadPolicy | None,
    allow_unpinned_software: bool = False,
    allow_insecure: bool = False,
    allow_no_tls: bool = False,
    expected_model_digest: str | None = None,
    expected_config_sha256: str | None = None,
    collateral: Mapping[TeeKind, object] | None = None,
    now: datetime | None = None,
    max_age_s: int | None = None,
) -> VerifiedServer:
    """Verify a fetched (or saved) bundle; return the server if every step passed.

    For a *saved* bundle give ``max_age_s``: its nonce proved freshness only when it was fetched,
    so the document must have been issued at most that long before ``now``. Nothing binds a saved
    bundle to its ``url`` (anyone can rewrite it) nor its recorded TLS key to a connection: the
    caller must not present ``url`` as verified.

    .. warning::
       ``VerifiedServer.base_url`` of a saved bundle is whatever the file says.

    Raises:
        ServerRefused: a step failed; ``exc.verdict`` holds every step.
    """
    verdict = verify_document(
        bundle.document,
        bundle.config,
        nonce=bundle.nonce,
        observed_tls_spki_sha256=bundle.tls_spki_sha256,
        policy=policy,
        allow_unpinned_software=allow_unpinned_software,
        allow_insecure=allow_insecure,
        allow_no_tls=allow_no_tls,
        expected_model_digest=expected_model_digest,
        expected_config_sha256=expected_config_sha256,
        collateral=collateral,
        now=now,
        max_age_s=max_age_s,
    )
    if not verdict.ok or verdict.document is None or verdict.config is None:
        raise ServerRefused(verdict)
    return VerifiedServer(
        base_url=bundle.url,
        document=verdict.document,
        config=verdict.config,
        verdict=verdict,
        tls_spki_sha256=bundle.tls_spki_sha256,
        tls_certificate_pem=bundle.tls_certificate_pem,
        bundle=bundle,
    )


def verify_server(
    base_url: str,
    *,
    policy: WorkloadPolicy | None,
    allow_unpinned_software: bool = False,
    allow_insecure: bool = False,
    allow_no_tls: bool = False,
    expected_model_digest: str | None = None,
    expected_config_sha256: str | None = None,
    collateral: Mapping[TeeKind, object] | None = None,
    now: datetime | None = None,
    nonce: bytes | None = None,
    timeout: float = 60.0,
    http_client: httpx.Client | None = None,
) -> VerifiedServer:
    """Fetch and verify the attestation of the server at ``base_url`` against ``policy``.

    ``policy`` is required: without one the verification refuses (which software runs would
    be unchecked) unless ``allow_unpinned_software`` is given, for inspection only.

    Raises:
        VerificationUnavailable: the server could not be asked (unreachable, an HTTP error).
        ServerRefused: a step failed (``exc.verdict`` holds every step).
        MalformedEvidence: the document is not JSON.
    """
    bundle = fetch_bundle(base_url, nonce=nonce, timeout=timeout, http_client=http_client)
    return verify_bundle(
        bundle,
        policy=policy,
        allow_unpinned_software=allow_unpinned_software,
        allow_insecure=allow_insecure,
        allow_no_tls=allow_no_tls,
        expected_model_digest=expected_model_digest,
        expected_config_sha256=expected_config_sha256,
        collateral=collateral,
        now=now,
    )
