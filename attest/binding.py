"""What the 64 bytes of TEE report data commit to, for each consumer.

There are two consumers, and each gets its own, explicit derivation:

**The key broker (Trustee KBS, RCAR protocol 0.4.0).** Exactly as Trustee computes it
(``guest-components:attestation-agent/kbs_protocol/src/client/rcar_client.rs``;
``trustee:kbs/src/attestation/backend.rs``), with ``H`` the hash the KBS selected (sha384 by
default) and ``JCS`` RFC 8785 canonical JSON:

* primary (CPU) TEE::

      H(JCS({"additional-evidence": <additional_evidence string, "" if none>,
             "nonce": <challenge nonce>, "tee-pubkey": <JWK>}))

  zero-padded to 64 bytes by TDX/SNP attesters; the sample attester base64-encodes it unpadded.
* device (GPU) TEEs::

      H(JCS({"nonce": <challenge nonce>, "tee-pubkey": <JWK>}))

  of which NVIDIA GPUs take the first 32 bytes as their SPDM nonce.

Because the primary digest covers the whole additional-evidence string, the GPU evidence is
bound to the CPU quote.

**The end user (``/.well-known/enclave-serve/attestation``).** The same construction over a
typed claims object (:class:`attest.document.AttestationClaims`): the client nonces the
evidence answers (several when concurrent requests share one collection; none for the cached,
unchallenged document), the TLS public key, every GPU evidence digest, the model identity and
the key-release receipt::

    device nonce = SHA-384(JCS({"purpose": DOCUMENT_DEVICE_PURPOSE, "nonces": [<hex>, ...],
                                "enclave_nonce": <hex>}))[:32]
    report data  = SHA-384(JCS(claims))          # claims carry "purpose": DOCUMENT_PURPOSE

The ``purpose`` strings separate the domains, so report data made for one consumer can never be
replayed to the other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

import rfc8785

__all__ = [
    "DOCUMENT_DEVICE_PURPOSE",
    "DOCUMENT_PURPOSE",
    "REPORT_DATA_SIZE",
    "HashAlgorithm",
    "canonical_json",
    "document_device_nonce",
    "document_report_data",
    "kbs_device_runtime_data",
    "kbs_primary_runtime_data",
    "pad_report_data",
]

#: Size of the TDX REPORTDATA / SNP REPORT_DATA field (TDX Module spec; SNP ABI spec table 22).
REPORT_DATA_SIZE = 64

#: Domain separator of the user-facing attestation document.
DOCUMENT_PURPOSE = "enclave-serve/attestation-document/v2"
#: Domain separator of the GPU nonce derived for the user-facing document.
DOCUMENT_DEVICE_PURPOSE = "enclave-serve/attestation-document/device-nonce/v2"


class HashAlgorithm(StrEnum):
    """Hash algorithms a KBS may select (``supported-hash-algorithms``, minus sm3)."""

    SHA256 = "sha256"
    SHA384 = "sha384"
    SHA512 = "sha512"

    def digest(self, data: bytes) -> bytes:
        """Hash ``data`` with this algorithm."""
        return hashlib.new(self.value, data).digest()


def canonical_json(obj: Any) -> bytes:
    """Serialise ``obj`` as RFC 8785 (JCS) canonical JSON."""
    return rfc8785.dumps(obj)


def pad_report_data(data: bytes) -> bytes:
    """Zero-pad ``data`` to the 64-byte report data field, as Trustee's attesters do.

    Raises:
        ValueError: ``data`` is longer than 64 bytes.
    """
    if len(data) > REPORT_DATA_SIZE:
        raise ValueError(f"report data is {len(data)} bytes; the TEE field holds {REPORT_DATA_SIZE}")
    return data.ljust(REPORT_DATA_SIZE, b"\0")


def kbs_primary_runtime_data(
    *, nonce: str, tee_pubkey: Mapping[str, Any], additional_evidence: str, hash_alg: HashAlgorithm
) -> bytes:
    """Return the digest a primary TEE puts in its report data for a KBS ``/attest``."""
    body = {"additional-evidence": additional_evidence, "nonce": nonce, "tee-pubkey": dict(tee_pubkey)}
    return hash_alg.digest(canonical_json(body))


def kbs_device_runtime_data(*, nonce: str, tee_pubkey: Mapping[str, Any], hash_alg: HashAlgorithm) -> bytes:
    """Return the digest a device TEE binds for a KBS ``/attest`` (NVIDIA takes ``[:32]``)."""
    return hash_alg.digest(canonical_json({"nonce": nonce, "tee-pubkey": dict(tee_pubkey)}))


def document_device_nonce(client_nonces: Sequence[bytes], enclave_nonce: bytes) -> bytes:
    """Return the 32-byte GPU nonce for a document answering ``client_nonces`` (in claim order).

    ``enclave_nonce`` is the enclave's own random value for this collection, so that device
    evidence is never collected over a value known in advance, not even for the unchallenged
    (cached) document, which answers no client nonce.
    """
    body = {
        "purpose": DOCUMENT_DEVICE_PURPOSE,
        "nonces": [n.hex() for n in client_nonces],
        "enclave_nonce": enclave_nonce.hex(),
    }
    return HashAlgorithm.SHA384.digest(canonical_json(body))[:32]


def document_report_data(claims_json: Mapping[str, Any]) -> bytes:
    """Return the 48-byte digest of an attestation document's claims (SHA-384 over JCS).

    Raises:
        ValueError: the claims do not carry the document purpose (domain separation).
    """
    if claims_json.get("purpose") != DOCUMENT_PURPOSE:
        raise ValueError("claims must carry the attestation-document purpose")
    return HashAlgorithm.SHA384.digest(canonical_json(dict(claims_json)))
