"""Build KBS resource responses exactly as Trustee does (``trustee:kbs/src/jwe/mod.rs``).

This is the *server* half (used by the dev KBS and by tests as a golden construction). It is
written out by hand, step by step, so the bytes match Trustee's: the protected header is
serde's compact JSON with ``alg``, ``enc`` first and then the flattened, key-sorted extra
members (``epk`` with ``crv``, ``kty``, ``x``, ``y``), the AEAD's associated data is the
base64url of that header, ``aad`` is absent, and ``enc`` is always ``A256GCM``.

The client half (decryption) deliberately uses the JOSE library instead
(:class:`attest.kbs.teekey.TeeKeyPair`), so each side checks the other.

Supported key-management algorithms: ``ECDH-ES+A256KW`` on P-256 and P-521 (Concat KDF with
SHA-256, empty PartyU/PartyV info, RFC 7518 §4.6) and ``RSA-OAEP-256``. Trustee also accepts the
deprecated ``RSA1_5``; this module refuses it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from attest.kbs.wire import (
    A256GCM,
    ECDH_ES_A256KW,
    RSA_OAEP_256,
    EcTeePubKey,
    JweResponse,
    RsaTeePubKey,
    WireFormatError,
    b64url_decode,
    b64url_encode,
)

__all__ = [
    "A256GCM",
    "ECDH_ES_A256KW",
    "RSA_OAEP_256",
    "concat_kdf",
    "protected_header_json",
    "seal",
]


# Curve name -> (cryptography curve, coordinate length in bytes) (``jwe/mod.rs``: 32 / 66).
_CURVES: dict[str, tuple[ec.EllipticCurve, int]] = {
    "P-256": (ec.SECP256R1(), 32),
    "P-521": (ec.SECP521R1(), 66),
}


def concat_kdf(alg: str, z: bytes, *, length: int = 32) -> bytes:
    """Derive the key-wrapping key as ``jwe/mod.rs concat_kdf`` (NIST SP 800-56A, SHA-256).

    OtherInfo = len(alg) || alg || len(apu)=0 || len(apv)=0 || keydatalen in bits.
    """
    other_info = (
        len(alg).to_bytes(4, "big")
        + alg.encode()
        + (0).to_bytes(4, "big")
        + (0).to_bytes(4, "big")
        + (length * 8).to_bytes(4, "big")
    )
    return ConcatKDFHash(algorithm=hashes.SHA256(), length=length, otherinfo=other_info).derive(z)


def protected_header_json(alg: str, *, epk: dict[str, str] | None = None) -> bytes:
    """Return the protected header as serde serialises ``kbs_types::ProtectedHeader``.

    ``alg`` and ``enc`` come first (struct order); flattened extra members follow in key order
    (serde_json's default ``Map`` is a ``BTreeMap``).
    """
    header: dict[str, object] = {"alg": alg, "enc": A256GCM}
    if epk is not None:
        header["epk"] = {k: epk[k] for k in sorted(epk)}
    return json.dumps(header, separators=(",", ":")).encode()


def _encrypt_content(protected: bytes, cek: bytes, iv: bytes, payload: bytes) -> tuple[str, str, str, str]:
    protected_b64 = b64url_encode(protected)
    sealed = AESGCM(cek).encrypt(iv, payload, protected_b64.encode("ascii"))
    return protected_b64, b64url_encode(iv), b64url_encode(sealed[:-16]), b64url_encode(sealed[-16:])


def _seal_ec(key: EcTeePubKey, payload: bytes, random_bytes: Callable[[int], bytes]) -> JweResponse:
    if key.alg != ECDH_ES_A256KW or key.crv not in _CURVES:
        raise ValueError(f"curve {key.crv} and algorithm {key.alg} is not supported")
    curve, size = _CURVES[key.crv]
    x, y = b64url_decode(key.x), b64url_decode(key.y)
    if len(x) != size or len(y) != size:
        raise ValueError("invalid bytes length of EC coordinates")
    peer = ec.EllipticCurvePublicNumbers(
        int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve
    ).public_key()
    # 1. A random CEK.
    cek = random_bytes(32)
    # 2. Ephemeral ECDH, Concat KDF, AES key wrap of the CEK (40 bytes).
    ephemeral = ec.generate_private_key(curve)
    z = ephemeral.exchange(ec.ECDH(), peer)
    encrypted_key = aes_key_wrap(concat_kdf(ECDH_ES_A256KW, z), cek)
    numbers = ephemeral.public_key().public_numbers()
    epk = {
        "crv": key.crv,
        "kty": "EC",
        "x": b64url_encode(numbers.x.to_bytes(size, "big")),
        "y": b64url_encode(numbers.y.to_bytes(size, "big")),
    }
    # 3. Content encryption with the protected header as AAD.
    protected, iv, ciphertext, tag = _encrypt_content(
        protected_header_json(ECDH_ES_A256KW, epk=epk), cek, random_bytes(12), payload
    )
    return JweResponse(
        protected=protected, encrypted_key=b64url_encode(encrypted_key), iv=iv, ciphertext=ciphertext, tag=tag
    )


def _seal_rsa(key: RsaTeePubKey, payload: bytes, random_bytes: Callable[[int], bytes]) -> JweResponse:
    if key.alg != RSA_OAEP_256:
        raise ValueError(f"algorithm {key.alg} is not supported")
    n, e = int.from_bytes(b64url_decode(key.n), "big"), int.from_bytes(b64url_decode(key.e), "big")
    public = rsa.RSAPublicNumbers(e, n).public_key()
    cek = random_bytes(32)
    encrypted_key = public.encrypt(
        cek, padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    )
    protected, iv, ciphertext, tag = _encrypt_content(
        protected_header_json(RSA_OAEP_256), cek, random_bytes(12), payload
    )
    return JweResponse(
        protected=protected, encrypted_key=b64url_encode(encrypted_key), iv=iv, ciphertext=ciphertext, tag=tag
    )


def seal(
    tee_pubkey: EcTeePubKey | RsaTeePubKey,
    payload: bytes,
    *,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> JweResponse:
    """Encrypt ``payload`` to ``tee_pubkey`` as Trustee's ``jwe()`` does.

    ``random_bytes`` supplies the CEK and IV (the ECDH ephemeral key always comes from the OS).

    .. warning::
       ``random_bytes`` must be a cryptographic RNG outside tests: a repeated CEK/IV pair breaks
       AES-GCM.

    Raises:
        ValueError: unsupported key type, curve or algorithm, or a malformed public key.
    """
    try:
        if isinstance(tee_pubkey, EcTeePubKey):
            return _seal_ec(tee_pubkey, payload, random_bytes)
        return _seal_rsa(tee_pubkey, payload, random_bytes)
    except WireFormatError as exc:
        raise ValueError(f"malformed TEE public key: {exc}") from None
