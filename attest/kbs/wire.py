"""The Trustee KBS wire format (RCAR protocol 0.4.0), shared by the client and the dev server.

Every model mirrors a ``kbs-types`` struct field for field (``kbs-types:src/lib.rs``; the
reference is ``shared/reference/kbs-and-evidence-formats.md`` §1). Unknown fields are ignored,
as serde does by default, and serialisation (``to_json``) gives exactly the JSON Trustee and
guest-components put on the wire. Parsing (``from_json``) never raises anything but
:class:`WireFormatError`.

What is *not* checked here: any cryptography (the JWE is only parsed, never decrypted) and any
protocol state (nonces, sessions). Those belong to the client and the server.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, JsonValue, TypeAdapter, ValidationError, field_validator

from attest.binding import HashAlgorithm, kbs_device_runtime_data, kbs_primary_runtime_data
from foundation.errors import KeyBrokerProtocolError

__all__ = [
    "A256GCM",
    "ATTEST_PATH",
    "AUTH_PATH",
    "DEFAULT_HASH_ALGORITHM",
    "ECDH_ES_A256KW",
    "KBS_PREFIX",
    "KBS_TEES",
    "PROTOCOL_VERSION",
    "RESOURCE_POLICY_PATH",
    "RSA_OAEP_256",
    "SELECTED_HASH_ALGORITHM_KEY",
    "SESSION_COOKIE",
    "SUPPORTED_HASH_ALGORITHMS_KEY",
    "Attestation",
    "AttestationResponse",
    "Challenge",
    "CompositeEvidence",
    "EcTeePubKey",
    "ErrorInformation",
    "ErrorType",
    "InitData",
    "JweResponse",
    "Request",
    "ResourcePolicyUpload",
    "RsaTeePubKey",
    "RuntimeData",
    "TeePubKey",
    "WireFormatError",
    "WireModel",
    "b64url_decode",
    "b64url_encode",
    "parse_tee_pubkey",
]

#: JWE algorithm names (RFC 7518 §4.6, §4.3, §5.3), as the constants of ``trustee:kbs/src/jwe/mod.rs``.
ECDH_ES_A256KW = "ECDH-ES+A256KW"
RSA_OAEP_256 = "RSA-OAEP-256"
A256GCM = "A256GCM"

#: RCAR protocol version; Trustee requires an exact match (``trustee:kbs/src/attestation/backend.rs``
#: ``VERSION_REQ = "=0.4.0"``; guest-components ``KBS_PROTOCOL_VERSION``).
PROTOCOL_VERSION = "0.4.0"
#: Route prefix of every KBS endpoint (``trustee:kbs/src/api_server.rs`` ``KBS_PREFIX``).
KBS_PREFIX = "/kbs/v0"
AUTH_PATH = f"{KBS_PREFIX}/auth"
ATTEST_PATH = f"{KBS_PREFIX}/attest"
RESOURCE_POLICY_PATH = f"{KBS_PREFIX}/resource-policy"
#: Session cookie name (``trustee:kbs/src/attestation/session.rs`` ``KBS_SESSION_ID``).
SESSION_COOKIE = "kbs-session-id"
#: ``extra-params`` keys (guest-components ``rcar_client.rs``).
SUPPORTED_HASH_ALGORITHMS_KEY = "supported-hash-algorithms"
SELECTED_HASH_ALGORITHM_KEY = "selected-hash-algorithm"
#: Hash used when the challenge does not select one (``rcar_client.rs`` ``DEFAULT_HASH_ALGORITHM``).
DEFAULT_HASH_ALGORITHM = HashAlgorithm.SHA384

#: TEE names of ``kbs-types`` ``enum Tee`` (serde names); anything else fails to deserialise there.
KBS_TEES = frozenset(
    {
        "az-snp-vtpm",
        "az-tdx-vtpm",
        "nvidia",
        "sgx",
        "snp",
        "tdx",
        "cca",
        "csv",
        "se",
        "hygondcu",
        "tpm",
        "sample",
        "sampledevice",
    }
)


class WireFormatError(KeyBrokerProtocolError, ValueError):
    """A message does not have the shape the KBS protocol defines.

    Callers translate it at their boundary: the client into
    :class:`foundation.errors.KeyBrokerProtocolError`, the server into a 401 with an RFC 7807 body.
    """


def b64url_encode(data: bytes) -> str:
    """Encode ``data`` as base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode base64url without padding, strictly.

    Raises:
        WireFormatError: ``text`` is not unpadded base64url.
    """
    if not isinstance(text, str) or "=" in text:
        raise WireFormatError("expected unpadded base64url")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise WireFormatError("expected unpadded base64url") from exc


class WireModel(BaseModel):
    """Base of the wire models: frozen, aliases on the wire, unknown fields ignored (as serde)."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    def to_json(self) -> dict[str, Any]:
        """Return the JSON object as it goes on the wire."""
        return self.model_dump(mode="json", by_alias=True)

    def to_bytes(self) -> bytes:
        """Return the compact JSON encoding of :meth:`to_json`."""
        return json.dumps(self.to_json(), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | str | Mapping[str, Any]) -> Self:
        """Parse a JSON document (bytes, text or an already-decoded object).

        Raises:
            WireFormatError: the document is not JSON or does not have this message's shape.
        """
        try:
            if isinstance(data, Mapping):
                return cls.model_validate(data)
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise WireFormatError(_summarise(cls.__name__, exc)) from None


def _summarise(name: str, exc: ValidationError) -> str:
    # Name the fields, never echo the input: it may carry evidence or ciphertext.
    problems = sorted({".".join(str(p) for p in err["loc"]) or "(document)" for err in exc.errors()})
    return f"{name}: invalid or missing {', '.join(problems)}"


class Request(WireModel):
    """``POST /kbs/v0/auth`` body: ``{"version", "tee", "extra-params"}``."""

    version: str
    tee: str
    extra_params: JsonValue = Field(
        default="", validation_alias="extra-params", serialization_alias="extra-params"
    )

    @field_validator("tee")
    @classmethod
    def _known_tee(cls, value: str) -> str:
        if value not in KBS_TEES:
            raise ValueError("unknown TEE")
        return value


class Challenge(WireModel):
    """``/auth`` response: ``{"nonce": base64(32 random bytes), "extra-params": "" | {...}}``."""

    nonce: str
    extra_params: JsonValue = Field(
        default="", validation_alias="extra-params", serialization_alias="extra-params"
    )

    def hash_algorithm(self) -> HashAlgorithm:
        """Return the hash the KBS selected (``selected-hash-algorithm``), sha384 when absent.

        Mirrors guest-components ``get_hash_algorithm``.

        Raises:
            WireFormatError: the selected algorithm is not one this client supports.
        """
        if not isinstance(self.extra_params, dict):
            return DEFAULT_HASH_ALGORITHM
        selected = self.extra_params.get(SELECTED_HASH_ALGORITHM_KEY)
        if selected is None:
            return DEFAULT_HASH_ALGORITHM
        if not isinstance(selected, str):
            raise WireFormatError("selected-hash-algorithm must be a string")
        try:
            return HashAlgorithm(selected.lower())
        except ValueError:
            raise WireFormatError(f"the KBS selected an unsupported hash algorithm {selected!r}") from None


class EcTeePubKey(WireModel):
    """``TeePubKey::EC``: ``{"kty": "EC", "crv", "alg", "x", "y"}`` (base64url coordinates)."""

    kty: Literal["EC"] = "EC"
    crv: str
    alg: str
    x: str
    y: str


class RsaTeePubKey(WireModel):
    """``TeePubKey::RSA``: ``{"kty": "RSA", "alg", "n", "e"}`` (base64url big-endian integers)."""

    kty: Literal["RSA"] = "RSA"
    alg: str
    n: str
    e: str


TeePubKey = Annotated[EcTeePubKey | RsaTeePubKey, Field(discriminator="kty")]
_TEE_PUBKEY: TypeAdapter[EcTeePubKey | RsaTeePubKey] = TypeAdapter(TeePubKey)


def parse_tee_pubkey(obj: object) -> EcTeePubKey | RsaTeePubKey:
    """Parse a ``tee-pubkey`` JWK (as found in ``/attest`` bodies and in token claims).

    Raises:
        WireFormatError: not an EC or RSA TEE public key of the ``kbs-types`` shape.
    """
    try:
        return _TEE_PUBKEY.validate_python(obj)
    except ValidationError as exc:
        raise WireFormatError(_summarise("tee-pubkey", exc)) from None


class RuntimeData(WireModel):
    """``{"nonce": <challenge nonce, verbatim>, "tee-pubkey": <JWK>}``."""

    nonce: str
    tee_pubkey: TeePubKey = Field(validation_alias="tee-pubkey", serialization_alias="tee-pubkey")

    def device_digest(self, hash_alg: HashAlgorithm) -> bytes:
        """Return what device (GPU) evidence binds: ``H(JCS({"nonce", "tee-pubkey"}))``."""
        return kbs_device_runtime_data(
            nonce=self.nonce, tee_pubkey=self.tee_pubkey.to_json(), hash_alg=hash_alg
        )

    def primary_digest(self, additional_evidence: str, hash_alg: HashAlgorithm) -> bytes:
        """Return what the primary TEE's report data binds (unpadded digest).

        ``H(JCS({"additional-evidence", "nonce", "tee-pubkey"}))``, computed as Trustee's
        ``__attest`` does from the *parsed* public key (unknown JWK members are dropped).
        """
        return kbs_primary_runtime_data(
            nonce=self.nonce,
            tee_pubkey=self.tee_pubkey.to_json(),
            additional_evidence=additional_evidence,
            hash_alg=hash_alg,
        )


class CompositeEvidence(WireModel):
    """``tee-evidence``: the primary evidence JSON and the additional evidence *string*."""

    primary_evidence: JsonValue
    additional_evidence: str = ""

    def additional_map(self) -> dict[str, JsonValue]:
        """Parse ``additional_evidence`` (``serde_json::to_string(HashMap<Tee, TeeEvidence>)``).

        Returns an empty map for ``""``.

        Raises:
            WireFormatError: not a JSON object keyed by ``kbs-types`` TEE names.
        """
        if self.additional_evidence == "":
            return {}
        try:
            parsed = json.loads(self.additional_evidence)
        except ValueError:
            raise WireFormatError("additional_evidence is not a JSON string of a map") from None
        if not isinstance(parsed, dict) or not all(k in KBS_TEES for k in parsed):
            raise WireFormatError("additional_evidence must map kbs-types TEE names to evidence")
        return parsed


class InitData(WireModel):
    """``init-data``: ``{"format": "toml", "body": <initdata plaintext>}``."""

    format: str
    body: str


class Attestation(WireModel):
    """``POST /kbs/v0/attest`` body (protocol 0.4.0, kebab-case keys)."""

    init_data: InitData | None = Field(
        default=None, validation_alias="init-data", serialization_alias="init-data"
    )
    runtime_data: RuntimeData = Field(validation_alias="runtime-data", serialization_alias="runtime-data")
    tee_evidence: CompositeEvidence = Field(
        validation_alias="tee-evidence", serialization_alias="tee-evidence"
    )


class AttestationResponse(WireModel):
    """``/attest`` response: ``{"token": <attestation token, a JWT>}``."""

    token: str


def _check_b64url(value: str) -> str:
    try:
        b64url_decode(value)
    except WireFormatError as exc:
        raise ValueError(str(exc)) from None
    return value


class JweResponse(WireModel):
    """A resource response: JWE in flattened JSON serialisation (``kbs-types`` ``Response``).

    Members stay base64url text: the ``protected`` string is the AEAD's associated data
    verbatim, so it must never be re-encoded.
    """

    protected: str
    encrypted_key: str
    aad: str | None = None
    iv: str
    ciphertext: str
    tag: str

    @field_validator("protected", "encrypted_key", "iv", "ciphertext", "tag", "aad")
    @classmethod
    def _base64url(cls, value: str | None) -> str | None:
        return None if value is None else _check_b64url(value)

    def to_json(self) -> dict[str, Any]:
        """Return the JSON object; ``aad`` is omitted when absent, as serde does."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def header(self) -> dict[str, JsonValue]:
        """Return the decoded protected header.

        Raises:
            WireFormatError: the protected header is not base64url JSON.
        """
        try:
            parsed = json.loads(b64url_decode(self.protected))
        except ValueError:
            raise WireFormatError("JWE protected header is not base64url JSON") from None
        if not isinstance(parsed, dict):
            raise WireFormatError("JWE protected header is not a JSON object")
        return parsed


class ErrorType(StrEnum):
    """Error types of ``trustee:kbs/src/error.rs`` (the last segment of RFC 7807 ``type``).

    ``ResourceNotFound`` is not in Trustee's list: kbs-dev uses it with status 404, where
    Trustee answers 401 ``PluginInternalError`` (docs/kbs.md lists the difference).
    """

    ADMIN_AUTH = "AdminAuthAccess"
    ATTESTATION = "AttestationError"
    INVALID_REQUEST_PATH = "InvalidRequestPath"
    JWE = "JweError"
    PARSE_POLICY = "ParsePolicyError"
    PLUGIN_INTERNAL = "PluginInternalError"
    PLUGIN_NOT_FOUND = "PluginNotFound"
    POLICY_DENY = "PolicyDeny"
    RESOURCE_NOT_FOUND = "ResourceNotFound"
    SERDE = "SerdeError"
    TOKEN_NOT_FOUND = "TokenNotFound"
    TOKEN_VERIFIER = "TokenVerifierError"

    #: ``ERROR_TYPE_PREFIX`` in ``trustee:kbs/src/error.rs``.
    @property
    def uri(self) -> str:
        """Return the RFC 7807 ``type`` URI."""
        return f"https://github.com/confidential-containers/kbs/errors/{self.value}"


class ErrorInformation(WireModel):
    """RFC 7807 error body: ``{"type": ".../errors/<Type>", "detail": "..."}``."""

    type: str
    detail: str

    @property
    def short_type(self) -> str:
        """Return the last path segment of ``type`` (e.g. ``PolicyDeny``)."""
        return self.type.rstrip("/").rsplit("/", 1)[-1]


class ResourcePolicyUpload(WireModel):
    """``POST /kbs/v0/resource-policy`` body: ``{"policy": base64url-nopad(policy text)}``."""

    policy: str

    @classmethod
    def of(cls, policy_text: bytes) -> ResourcePolicyUpload:
        """Wrap a policy document the way ``kbs-client set-resource-policy`` does."""
        return cls(policy=b64url_encode(policy_text))

    def decoded(self) -> bytes:
        """Return the policy text.

        Raises:
            WireFormatError: ``policy`` is not unpadded base64url.
        """
        return b64url_decode(self.policy)
