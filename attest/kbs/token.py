"""The attestation token the KBS returns from ``/attest``: an EAR-shaped JWT.

Trustee's built-in attestation service issues an EAR (``eat_profile``
``tag:github.com,2023:veraison/ear``) with one *submodule* per attested TEE (``cpu0``,
``gpu0``, ...); each carries ``ear.status`` and ``ear.veraison.annotated-evidence`` = the
verifier's claims under the TEE name plus ``runtime_data_claims`` (which hold the
``tee-pubkey`` the KBS encrypts resources to, ``trustee:kbs/src/token/mod.rs``
``TOKEN_TEE_PUBKEY_PATH_EAR``).

* :class:`TokenClaims` parses those claims (shared by both sides).
* :func:`peek_claims` reads them **without verifying the signature**: the enclave has no trust
  anchor for the attestation service's key. The client uses them only to build a receipt that
  says what the KBS claimed, never to make a security decision.
* :class:`TokenIssuer` (dev KBS) signs tokens with ES256 under a key generated at start, and
  verifies the tokens it issued (signature, issuer, expiry).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from jwcrypto import jwk, jws
from jwcrypto.common import JWException
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from attest.kbs.wire import EcTeePubKey, RsaTeePubKey, WireFormatError, b64url_decode, parse_tee_pubkey
from foundation.errors import KeyAccessDenied

__all__ = [
    "ANNOTATED_EVIDENCE",
    "EAR_PROFILE",
    "EAR_STATUS",
    "RUNTIME_DATA_CLAIMS",
    "SubmodClaims",
    "TokenClaims",
    "TokenIssuer",
    "TokenRejected",
    "peek_claims",
]

#: EAR profile (draft-fv-rats-ear) used by Trustee's attestation service.
EAR_PROFILE = "tag:github.com,2023:veraison/ear"
EAR_STATUS = "ear.status"
ANNOTATED_EVIDENCE = "ear.veraison.annotated-evidence"
RUNTIME_DATA_CLAIMS = "runtime_data_claims"
_NON_TEE_KEYS = frozenset({RUNTIME_DATA_CLAIMS, "init_data_claims"})


class TokenRejected(KeyAccessDenied, ValueError):
    """A token is not one this KBS issued, or it expired."""


class SubmodClaims(BaseModel):
    """One EAR submodule: the appraisal status and the annotated evidence."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    status: str = Field(default="none", validation_alias=EAR_STATUS, serialization_alias=EAR_STATUS)
    annotated_evidence: dict[str, JsonValue] = Field(
        default_factory=dict, validation_alias=ANNOTATED_EVIDENCE, serialization_alias=ANNOTATED_EVIDENCE
    )

    @property
    def tees(self) -> tuple[str, ...]:
        """Return the TEE names whose claims this submodule carries (e.g. ``("tdx",)``)."""
        return tuple(sorted(k for k in self.annotated_evidence if k not in _NON_TEE_KEYS))

    def tee_claims(self) -> Mapping[str, JsonValue]:
        """Return the claims of the (single) TEE of this submodule, or an empty map."""
        for tee in self.tees:
            value = self.annotated_evidence[tee]
            if isinstance(value, dict):
                return value
        return {}


class TokenClaims(BaseModel):
    """The claims of an EAR attestation token that key release cares about."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    iss: str | None = None
    iat: int | None = None
    exp: int | None = None
    eat_profile: str | None = None
    submods: dict[str, SubmodClaims] = Field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Return the JSON claims (EAR member names)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def tee_pubkey(self) -> EcTeePubKey | RsaTeePubKey | None:
        """Return the ``tee-pubkey`` at ``/submods/cpu0/<annotated-evidence>/runtime_data_claims``.

        Raises:
            WireFormatError: the claim is present but not a TEE public key.
        """
        cpu = self.submods.get("cpu0")
        if cpu is None:
            return None
        runtime = cpu.annotated_evidence.get(RUNTIME_DATA_CLAIMS)
        if not isinstance(runtime, dict) or "tee-pubkey" not in runtime:
            return None
        return parse_tee_pubkey(runtime["tee-pubkey"])

    def statuses(self) -> dict[str, str]:
        """Return ``{submod: ear.status}``."""
        return {name: sub.status for name, sub in sorted(self.submods.items())}


def _parse_claims(payload: bytes) -> TokenClaims:
    try:
        return TokenClaims.model_validate_json(payload)
    except ValidationError:
        raise WireFormatError("the token claims are not EAR-shaped JSON") from None


def peek_claims(token: str) -> TokenClaims | None:
    """Return the token's claims **without verifying its signature**, or None if not a JWT.

    .. warning::
       Unauthenticated data: use it for receipts and diagnostics, never for a security decision.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        return _parse_claims(b64url_decode(parts[1]))
    except WireFormatError:
        return None


class TokenIssuer:
    """Sign and check the dev KBS's attestation tokens (ES256, key generated at construction).

    Trustee's attestation service signs EARs with its own key and puts the public JWK in the
    header (hence Trustee's ``insecure_header_jwk`` test option); this issuer does the same, and
    verifies only tokens signed with its own key.
    """

    ALG = "ES256"

    def __init__(
        self,
        *,
        issuer: str = "enclave-serve-kbs-dev",
        lifetime_s: float = 300.0,
        clock: Callable[[], float] = time.time,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> None:
        self.issuer = issuer
        self.lifetime_s = lifetime_s
        self._clock = clock
        self._key = jwk.JWK.from_pyca(key if key is not None else ec.generate_private_key(ec.SECP256R1()))
        self._public = json.loads(self._key.export_public())

    @property
    def public_jwk(self) -> dict[str, str]:
        """Return the public JWK that verifies this issuer's tokens."""
        return dict(self._public)

    def issue(self, submods: Mapping[str, SubmodClaims]) -> str:
        """Return a signed token carrying ``submods``, issued now, expiring after ``lifetime_s``."""
        now = int(self._clock())
        claims = TokenClaims(
            iss=self.issuer,
            iat=now,
            exp=now + int(self.lifetime_s),
            eat_profile=EAR_PROFILE,
            submods=dict(submods),
        )
        token = jws.JWS(json.dumps(claims.to_json(), separators=(",", ":")).encode())
        header = {"alg": self.ALG, "typ": "JWT", "jwk": self._public}
        token.add_signature(self._key, alg=self.ALG, protected=json.dumps(header))
        compact: str = token.serialize(compact=True)
        return compact

    def verify(self, token: str) -> TokenClaims:
        """Check the signature, issuer and expiry of ``token`` and return its claims.

        Raises:
            TokenRejected: bad signature, another issuer, expired, or not a JWT.
        """
        checker = jws.JWS()
        try:
            checker.deserialize(token, key=self._key, alg=self.ALG)
            payload = checker.payload
        except (JWException, ValueError, TypeError) as exc:
            raise TokenRejected("the token signature does not verify with this KBS's key") from exc
        if not isinstance(payload, bytes):
            raise TokenRejected("the token has no payload")
        try:
            claims = _parse_claims(payload)
        except WireFormatError as exc:
            raise TokenRejected(str(exc)) from None
        if claims.iss != self.issuer:
            raise TokenRejected("the token was issued by another issuer")
        if claims.exp is None or claims.exp <= self._clock():
            raise TokenRejected("the token has expired; attest again")
        return claims
