"""The key-source interface and what a key release hands back.

A key source has one method, :meth:`KeySource.fetch`, which turns a resource URI into the key
bytes (in :class:`foundation.secret.SecretBytes`) plus, where there is one, a receipt: what the
user-facing attestation document commits to about *how* the key was released. A receipt never
contains the token, the session or the key; it contains digests and the claims that matter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from attest.tee import insecure_kinds
from foundation.resource import ResourceUri
from foundation.secret import SecretBytes

__all__ = ["KeyRelease", "KeyReleaseReceipt", "KeySource", "KeySourceName"]

KeySourceName = Literal["kbs", "cdh", "file"]

#: TEE names whose evidence proves nothing (the registry's insecure backends).
_INSECURE_TEES = frozenset(kind.value for kind in insecure_kinds())


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyReleaseReceipt:
    """What a KBS key release established, safe to publish.

    ``token_sha256`` commits to the exact attestation token without revealing it. The
    ``token_*`` and ``ear_status`` fields are read from the token **without verifying its
    signature** (``token_claims_verified`` is always False): they record what the KBS asserted.
    """

    kbs_url: str
    resource: str
    protocol_version: str
    tee: str
    devices: tuple[str, ...]
    hash_algorithm: str
    token_sha256: str
    tee_pubkey_thumbprint: str
    token_issuer: str | None = None
    token_issued_at: int | None = None
    token_expires_at: int | None = None
    ear_status: tuple[tuple[str, str], ...] = ()
    token_claims_verified: bool = False

    @property
    def insecure(self) -> bool:
        """Whether the release rested on sample (unsigned) evidence."""
        return self.tee in _INSECURE_TEES or any(d in _INSECURE_TEES for d in self.devices)

    def to_json(self) -> dict[str, Any]:
        """Return the receipt as a JSON object (stable member names)."""
        return {
            "kbs_url": self.kbs_url,
            "resource": self.resource,
            "protocol_version": self.protocol_version,
            "tee": self.tee,
            "devices": list(self.devices),
            "hash_algorithm": self.hash_algorithm,
            "token_sha256": self.token_sha256,
            "tee_pubkey_thumbprint": self.tee_pubkey_thumbprint,
            "token_issuer": self.token_issuer,
            "token_issued_at": self.token_issued_at,
            "token_expires_at": self.token_expires_at,
            "ear_status": dict(self.ear_status),
            "token_claims_verified": self.token_claims_verified,
            "insecure": self.insecure,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyRelease:
    """A released key: the secret, where it came from, and the receipt (KBS only)."""

    secret: SecretBytes
    resource: ResourceUri
    source: KeySourceName
    receipt: KeyReleaseReceipt | None = None

    @property
    def insecure(self) -> bool:
        """Whether this key was obtained without real attestation (file source, sample TEE)."""
        return self.source == "file" or (self.receipt is not None and self.receipt.insecure)

    def to_json(self) -> dict[str, Any]:
        """Return the public description of the release (never the secret)."""
        return {
            "resource": str(self.resource),
            "source": self.source,
            "insecure": self.insecure,
            "receipt": self.receipt.to_json() if self.receipt is not None else None,
        }


class KeySource(ABC):
    """Where model keys come from: the KBS, the CoCo CDH, or (development only) a file."""

    name: ClassVar[KeySourceName]

    @abstractmethod
    def fetch(self, resource: ResourceUri) -> KeyRelease:
        """Return the key stored at ``resource``.

        Raises:
            foundation.errors.KeyRetrievalError: any failure, with a message saying what to do.
            foundation.errors.AttestationError: the local TEE failed to produce evidence.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release network resources (default: nothing)."""
