"""The Trustee KBS client: RCAR 0.4.0 handshake, then resources decrypted with the TEE key.

Protocol (reference §1; ``guest-components:attestation-agent/kbs_protocol/src/client/rcar_client.rs``):

1. ``POST /kbs/v0/auth`` ``{"version": "0.4.0", "tee", "extra-params": {"supported-hash-algorithms"}}``
   → challenge ``{nonce, extra-params}`` and a ``kbs-session-id`` cookie.
2. Hash = ``extra-params["selected-hash-algorithm"]`` or sha384.
3. Device evidence over ``H(JCS({nonce, tee-pubkey}))``; ``additional_evidence`` = its JSON string.
4. Primary evidence over ``H(JCS({additional-evidence, nonce, tee-pubkey}))`` (attesters pad).
5. ``POST /kbs/v0/attest`` → ``{"token"}``; the token is reused for every resource, sent as the
   session cookie or as ``Authorization: Bearer``.
6. ``GET /kbs/v0/resource/<repo>/<type>/<tag>`` → flattened JWE, decrypted with the TEE key.

Network faults (connection errors, timeouts, 5xx, 429) are retried with backoff within one
deadline per operation; a whole failed handshake is retried from step 1 (a fresh nonce).
Answers given on purpose (401, 404, version mismatch, malformed bodies, undecryptable JWE) are
final and raise with what the operator should do.

Never logged, never put in an exception: the token, the session cookie, the resource bytes.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, TypeVar

import httpx

from attest.binding import HashAlgorithm
from attest.evidence import Evidence, additional_evidence_string
from attest.kbs.http import error_information, make_http_client, normalize_base_url
from attest.kbs.retry import Deadline, RetryPolicy, TransientFault, call_with_retries
from attest.kbs.teekey import TeeKeyKind, TeeKeyPair
from attest.kbs.token import TokenClaims, peek_claims
from attest.kbs.wire import (
    ATTEST_PATH,
    AUTH_PATH,
    PROTOCOL_VERSION,
    SESSION_COOKIE,
    SUPPORTED_HASH_ALGORITHMS_KEY,
    Attestation,
    AttestationResponse,
    Challenge,
    CompositeEvidence,
    ErrorType,
    InitData,
    JweResponse,
    Request,
    RuntimeData,
    WireFormatError,
    WireModel,
)
from attest.tee.attester import Attester, DeviceAttester
from foundation.errors import (
    KeyAccessDenied,
    KeyBrokerProtocolError,
    ResourceNotFound,
)
from foundation.resource import ResourceUri
from foundation.secret import SecretBytes

__all__ = ["KbsAttestation", "KbsClient", "TokenTransport"]

logger = logging.getLogger(__name__)

TokenTransport = Literal["cookie", "bearer"]
_M = TypeVar("_M", bound=WireModel)


@dataclass(frozen=True, slots=True, kw_only=True)
class KbsAttestation:
    """What one successful RCAR handshake established, minus the token itself.

    ``claims`` are the token's claims read **without** signature verification (the enclave
    has no trust anchor for the attestation service); they describe what the KBS asserted.
    """

    kbs_url: str
    tee: str
    devices: tuple[str, ...]
    hash_algorithm: HashAlgorithm
    token_sha256: str
    tee_pubkey_thumbprint: str
    claims: TokenClaims | None


@dataclass(slots=True)
class _Token:
    value: str
    session_id: str

    def __repr__(self) -> str:
        return "<token redacted>"


class _SessionRejected(Exception):
    """The KBS no longer accepts our session or token (expired, restarted): attest again."""


class KbsClient:
    """Attest to a Trustee KBS once, then fetch several resources with the same token.

    ``attester`` produces the primary evidence and ``devices`` the additional (GPU) evidence.
    ``tee_key`` is ``"ec"`` (P-256, ``ECDH-ES+A256KW``, the default), ``"rsa"``
    (``RSA-OAEP-256``) or a ready :class:`TeeKeyPair`. ``clock``/``sleep`` drive deadlines and
    backoff. Pass ``http_client`` to supply the transport (then ``cacert`` must be None).
    ``init_data`` is the exact CoCo init-data TOML this TEE was launched with: sent with every
    ``/attest`` as ``{"format": "toml", "body": ...}``, as CoCo's attestation agent does, so the
    KBS can check its digest against the evidence and read its claims.

    .. warning::
       With an ``http://`` URL the token and session cookie travel in clear (resources stay
       encrypted to the TEE key). Use HTTPS with ``cacert`` outside development.
    """

    def __init__(
        self,
        *,
        url: str,
        attester: Attester,
        devices: Sequence[DeviceAttester] = (),
        cacert: Path | None = None,
        tee_key: TeeKeyKind | TeeKeyPair = "ec",
        token_transport: TokenTransport = "cookie",
        deadline_s: float = 60.0,
        retry: RetryPolicy | None = None,
        http_client: httpx.Client | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        init_data: bytes | None = None,
    ) -> None:
        self.url = normalize_base_url(url, what="KBS")
        self._init_data = init_data
        if http_client is not None and cacert is not None:
            raise ValueError("pass cacert or http_client, not both (configure TLS on the client you pass)")
        if token_transport not in ("cookie", "bearer"):
            raise ValueError("token_transport is 'cookie' or 'bearer'")
        self._attester = attester
        self._devices = tuple(devices)
        self._key = tee_key if isinstance(tee_key, TeeKeyPair) else TeeKeyPair.generate(tee_key)
        self._transport: TokenTransport = token_transport
        self._deadline_s = deadline_s
        self._retry = retry or RetryPolicy()
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else make_http_client(cacert=cacert)
        self._clock = clock
        self._sleep = sleep
        self._token: _Token | None = None
        self._attestation: KbsAttestation | None = None
        if self.url.startswith("http://"):
            logger.warning(
                "KBS %s is plain HTTP: the attestation token travels in clear (resources stay "
                "encrypted to the TEE key); use https with a pinned CA outside development",
                self.url,
            )

    # -- lifecycle --------------------------------------------------------------------------------
    def close(self) -> None:
        """Forget the token and close the HTTP client if this object created it."""
        self._token = None
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> KbsClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def attestation(self) -> KbsAttestation | None:
        """Return what the last successful handshake established, if any."""
        return self._attestation

    @property
    def tee_key(self) -> TeeKeyPair:
        """Return the TEE key pair resources are encrypted to."""
        return self._key

    def deadline(self) -> Deadline:
        """Return a fresh deadline of this client's ``deadline_s``."""
        return Deadline(self._deadline_s, clock=self._clock)

    # -- RCAR -----------------------------------------------------------------------------------
    def attest(self, *, deadline: Deadline | None = None) -> KbsAttestation:
        """Run the RCAR handshake (retrying whole handshakes on network faults).

        Raises:
            KeyBrokerUnreachable: no successful handshake within the deadline.
            KeyBrokerProtocolError: version mismatch, or an answer outside the protocol.
            KeyAccessDenied: the KBS refused the evidence.
            foundation.errors.AttestationError: the local TEE failed to produce evidence.
        """
        deadline = deadline or self.deadline()
        return call_with_retries(
            lambda _timeout: self._handshake(deadline),
            what=f"attestation to the KBS at {self.url}",
            deadline=deadline,
            policy=self._retry,
            sleep=self._sleep,
        )

    def _timeout(self, deadline: Deadline) -> httpx.Timeout:
        return httpx.Timeout(max(0.001, min(self._retry.request_timeout_s, deadline.remaining())))

    def _handshake(self, deadline: Deadline) -> KbsAttestation:
        # (1) /auth
        request = Request(
            version=PROTOCOL_VERSION,
            tee=self._attester.tee.value,
            extra_params={SUPPORTED_HASH_ALGORITHMS_KEY: [h.value for h in HashAlgorithm]},
        )
        response = self._http.post(
            self.url + AUTH_PATH,
            content=request.to_bytes(),
            headers={"content-type": "application/json"},
            timeout=self._timeout(deadline),
        )
        self._check(response, stage="auth")
        session_id = response.cookies.get(SESSION_COOKIE)
        if not session_id:
            raise KeyBrokerProtocolError(
                f"the KBS at {self.url} answered /auth without a {SESSION_COOKIE} cookie"
            )
        challenge = self._parse(Challenge, response, stage="auth")
        # (2) hash algorithm
        try:
            hash_alg = challenge.hash_algorithm()
        except WireFormatError as exc:
            raise KeyBrokerProtocolError(f"the KBS at {self.url}: {exc}") from None
        # (3) device evidence, (4) primary evidence
        runtime = RuntimeData(nonce=challenge.nonce, tee_pubkey=self._key.public_key)
        device_digest = runtime.device_digest(hash_alg)
        device_evidence: list[Evidence] = [device.collect(device_digest) for device in self._devices]
        additional = additional_evidence_string(device_evidence)
        primary = self._attester.collect(runtime.primary_digest(additional, hash_alg))
        attestation = Attestation(
            init_data=None
            if self._init_data is None
            else InitData(format="toml", body=self._init_data.decode("utf-8")),
            runtime_data=runtime,
            tee_evidence=CompositeEvidence(
                primary_evidence=primary.to_json(), additional_evidence=additional
            ),
        )
        # (5) /attest
        response = self._http.post(
            self.url + ATTEST_PATH,
            content=attestation.to_bytes(),
            headers={"content-type": "application/json", "cookie": f"{SESSION_COOKIE}={session_id}"},
            timeout=self._timeout(deadline),
        )
        self._check(response, stage="attest")
        token = self._parse(AttestationResponse, response, stage="attest").token
        claims = peek_claims(token)
        self._check_token_key(claims)
        self._token = _Token(value=token, session_id=response.cookies.get(SESSION_COOKIE) or session_id)
        self._attestation = KbsAttestation(
            kbs_url=self.url,
            tee=self._attester.tee.value,
            devices=tuple(e.tee.value for e in device_evidence),
            hash_algorithm=hash_alg,
            token_sha256=hashlib.sha256(token.encode()).hexdigest(),
            tee_pubkey_thumbprint=self._key.thumbprint(),
            claims=claims,
        )
        logger.info(
            "attested to the KBS at %s as %s%s (token sha256 %s…)",
            self.url,
            self._attestation.tee,
            "".join(f" + {d}" for d in self._attestation.devices),
            self._attestation.token_sha256[:16],
        )
        return self._attestation

    def _check_token_key(self, claims: TokenClaims | None) -> None:
        if claims is None:
            return
        try:
            key = claims.tee_pubkey()
        except WireFormatError:
            key = None
        if key is not None and key != self._key.public_key:
            raise KeyBrokerProtocolError(
                f"the KBS at {self.url} issued a token for another TEE key; refusing to continue"
            )

    # -- resources ------------------------------------------------------------------------------
    def get_resource(self, resource: ResourceUri | str, *, deadline: Deadline | None = None) -> SecretBytes:
        """Return the plaintext of ``resource``, attesting first if needed.

        The token from the last handshake is reused; if the KBS no longer accepts it (session or
        token expired, KBS restarted) the client attests once more and retries.

        Raises:
            KeyBrokerUnreachable: network faults until the deadline.
            KeyAccessDenied: the resource policy (or the attestation) refused us.
            ResourceNotFound: the KBS has no such resource.
            KeyBrokerProtocolError: an answer outside the protocol.
            KeyUnwrapError: the JWE does not decrypt with our TEE key (fail closed).
        """
        uri = resource if isinstance(resource, ResourceUri) else ResourceUri.parse(resource)
        deadline = deadline or self.deadline()
        if self._token is None:
            self.attest(deadline=deadline)
        try:
            jwe = self._fetch(uri, deadline)
        except _SessionRejected:
            logger.info("the KBS no longer accepts our session; attesting again")
            self.attest(deadline=deadline)
            try:
                jwe = self._fetch(uri, deadline)
            except _SessionRejected as exc:
                raise KeyAccessDenied(
                    f"the KBS at {self.url} refused a fresh token for {uri}: {exc}. Check its token "
                    "verifier configuration (trusted certs / insecure_header_jwk)."
                ) from None
        secret = self._key.decrypt(jwe)
        logger.info("fetched %s from the KBS at %s (%d bytes)", uri, self.url, len(secret))
        return secret

    def _fetch(self, uri: ResourceUri, deadline: Deadline) -> JweResponse:
        def attempt(_timeout: float) -> JweResponse:
            token = self._token
            assert token is not None
            headers = (
                {"cookie": f"{SESSION_COOKIE}={token.session_id}"}
                if self._transport == "cookie"
                else {"authorization": f"Bearer {token.value}"}
            )
            response = self._http.get(
                self.url + uri.kbs_path, headers=headers, timeout=self._timeout(deadline)
            )
            self._check(response, stage="resource", resource=uri)
            return self._parse(JweResponse, response, stage="resource")

        return call_with_retries(
            attempt,
            what=f"fetching {uri} from the KBS at {self.url}",
            deadline=deadline,
            policy=self._retry,
            sleep=self._sleep,
        )

    # -- answers ---------------------------------------------------------------------------------
    def _parse(self, model: type[_M], response: httpx.Response, *, stage: str) -> _M:
        try:
            return model.from_json(response.content)
        except WireFormatError as exc:
            raise KeyBrokerProtocolError(
                f"the KBS at {self.url} answered /{stage} with a body outside the protocol ({exc}); "
                "is the URL that of a Trustee KBS speaking protocol 0.4.0?"
            ) from None

    def _check(self, response: httpx.Response, *, stage: str, resource: ResourceUri | None = None) -> None:
        status = response.status_code
        if status == 200:
            return
        if status >= 500 or status == 429:
            raise TransientFault(f"HTTP {status} from /{stage}")
        info = error_information(response)
        detail = info.detail if info is not None else f"HTTP {status} without an RFC 7807 error body"
        kind = info.short_type if info is not None else ""
        where = f"the KBS at {self.url}"
        if stage == "auth":
            if "Version Mismatch" in detail or "parse KBS version" in detail:
                raise KeyBrokerProtocolError(
                    f"{where} does not speak KBS protocol {PROTOCOL_VERSION} ({detail}); use a Trustee "
                    "KBS v0.14.0 or later"
                )
            raise KeyBrokerProtocolError(f"{where} refused /auth (HTTP {status}): {detail}")
        if stage == "attest":
            if status == 401:
                raise KeyAccessDenied(
                    f"{where} refused our attestation evidence: {detail}. Check the KBS attestation "
                    "policy and reference values for this TEE."
                )
            raise KeyBrokerProtocolError(f"{where} answered /attest with HTTP {status}: {detail}")
        assert resource is not None
        if status == 404 or kind == ErrorType.RESOURCE_NOT_FOUND.value:
            raise ResourceNotFound(
                f"{where} has no resource {resource} ({detail}); upload it, e.g. `enclave-serve kbs "
                f"set-resource --path {resource.path}` or `kbs-client ... set-resource --path "
                f"{resource.path}`"
            )
        if kind == ErrorType.POLICY_DENY.value:
            raise KeyAccessDenied(
                f"{where} refused {resource} by its resource policy: {detail}. Check the resource "
                "policy (and, for sample evidence, whether the KBS allows it)."
            )
        if (
            kind in (ErrorType.TOKEN_NOT_FOUND.value, ErrorType.TOKEN_VERIFIER.value)
            and self._token is not None
        ):
            raise _SessionRejected(detail)
        if kind == ErrorType.PLUGIN_INTERNAL.value:
            raise ResourceNotFound(
                f"{where} failed to serve {resource} ({detail}); a Trustee KBS answers this way when "
                f"the resource does not exist: check `kbs-client ... set-resource --path {resource.path}`"
            )
        raise KeyAccessDenied(f"{where} refused {resource} (HTTP {status}, {kind or 'no type'}): {detail}")
