"""The ephemeral TEE key: generated in the enclave, sent as ``tee-pubkey``, used once to unwrap.

The KBS encrypts every resource to this key (``ECDH-ES+A256KW`` on P-256 by default, as
guest-components ``TeeKeyAlgorithm::default``; ``RSA-OAEP-256`` as an option). The private half
exists only in this object's memory: it is never serialised, logged or written anywhere.
Decryption goes through the one JWE unwrap (:func:`foundation.jwe.unwrap_jwe`), restricted to
exactly the algorithm of this key and ``A256GCM``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwcrypto import jwk

from attest.kbs.wire import (
    A256GCM,
    ECDH_ES_A256KW,
    RSA_OAEP_256,
    EcTeePubKey,
    JweResponse,
    RsaTeePubKey,
    b64url_encode,
)
from foundation.errors import KeyUnwrapError
from foundation.jwe import JweError, JweFailure, unwrap_jwe
from foundation.secret import SecretBytes

__all__ = ["RSA_KEY_BITS", "TeeKeyKind", "TeeKeyPair"]

TeeKeyKind = Literal["ec", "rsa"]

#: RSA modulus size for the ``rsa`` option.
RSA_KEY_BITS = 3072


class TeeKeyPair:
    """An in-memory key pair whose public half goes into ``runtime-data.tee-pubkey``.

    .. warning::
       Create a fresh pair per enclave boot (:meth:`generate`); never export the private key.
    """

    __slots__ = ("_jwk", "_public", "kind")

    def __init__(self, private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
        if isinstance(private_key, ec.EllipticCurvePrivateKey):
            if not isinstance(private_key.curve, ec.SECP256R1):
                raise ValueError("the EC TEE key must be on P-256")
            numbers = private_key.public_key().public_numbers()
            self._public: EcTeePubKey | RsaTeePubKey = EcTeePubKey(
                crv="P-256",
                alg=ECDH_ES_A256KW,
                x=b64url_encode(numbers.x.to_bytes(32, "big")),
                y=b64url_encode(numbers.y.to_bytes(32, "big")),
            )
            self.kind: TeeKeyKind = "ec"
        elif isinstance(private_key, rsa.RSAPrivateKey):
            pub = private_key.public_key().public_numbers()
            self._public = RsaTeePubKey(
                alg=RSA_OAEP_256,
                n=b64url_encode(pub.n.to_bytes((pub.n.bit_length() + 7) // 8, "big")),
                e=b64url_encode(pub.e.to_bytes((pub.e.bit_length() + 7) // 8, "big")),
            )
            self.kind = "rsa"
        else:
            raise TypeError("a TEE key is an EC P-256 or an RSA private key")
        self._jwk = jwk.JWK.from_pyca(private_key)

    @classmethod
    def generate(cls, kind: TeeKeyKind = "ec") -> TeeKeyPair:
        """Generate a fresh key pair (EC P-256, or RSA-3072 for ``"rsa"``).

        Raises:
            ValueError: unknown ``kind``.
        """
        if kind == "ec":
            return cls(ec.generate_private_key(ec.SECP256R1()))
        if kind == "rsa":
            return cls(rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS))
        raise ValueError(f"unknown TEE key kind {kind!r}; choose 'ec' or 'rsa'")

    @property
    def public_key(self) -> EcTeePubKey | RsaTeePubKey:
        """Return the ``tee-pubkey`` JWK the KBS encrypts to."""
        return self._public

    @property
    def alg(self) -> str:
        """Return the JWE key-management algorithm of this key."""
        return self._public.alg

    def thumbprint(self) -> str:
        """Return the RFC 7638 SHA-256 thumbprint (base64url) of the public key."""
        members = (
            {"crv": self._public.crv, "kty": "EC", "x": self._public.x, "y": self._public.y}
            if isinstance(self._public, EcTeePubKey)
            else {"e": self._public.e, "kty": "RSA", "n": self._public.n}
        )
        canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
        return b64url_encode(hashlib.sha256(canonical).digest())

    def decrypt(self, response: JweResponse) -> SecretBytes:
        """Decrypt a KBS resource response and return the plaintext.

        Verified: the JWE is not compressed (no ``zip``), its ``alg`` is this key's algorithm,
        ``enc`` is ``A256GCM``, the key
        unwraps and the GCM tag authenticates the ciphertext and the protected header. Not
        verified: who encrypted it (JWE has no sender authentication; the binding of this key
        to the attestation is what makes only the KBS able to target it).

        Raises:
            KeyUnwrapError: the response does not decrypt with this key (deliberately opaque).
        """
        try:
            plaintext = unwrap_jwe(json.dumps(response.to_json()), self._jwk, algs=[self.alg], encs=[A256GCM])
        except JweError as exc:
            if exc.failure is JweFailure.COMPRESSED:
                # RFC 7516 §4.1.3: Trustee never compresses; a compressed payload is only ever a
                # decompression bomb (jwcrypto CVE-2024-28102) or an oracle. Refused before opening.
                raise KeyUnwrapError(
                    "the KBS response is compressed ('zip'); Trustee never does that"
                ) from None
            if exc.failure is JweFailure.ALGORITHM:
                raise KeyUnwrapError(
                    "the KBS response is not encrypted to this enclave's TEE key "
                    f"(expected alg {self.alg} with {A256GCM})"
                ) from None
            raise KeyUnwrapError(
                "the KBS response does not decrypt with this enclave's TEE key; refusing it"
            ) from exc
        return SecretBytes(plaintext)

    def __repr__(self) -> str:
        return f"<TeeKeyPair {self.alg} thumbprint={self.thumbprint()} private key redacted>"
