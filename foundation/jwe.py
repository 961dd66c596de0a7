"""Decrypt a JWE (RFC 7516) under the caller's allow-lists: the one JWE unwrap of enclave-serve.

Two callers, each with its own lists: the KBS client (:meth:`attest.kbs.teekey.TeeKeyPair.decrypt`:
the TEE key's algorithm with ``A256GCM``, what Trustee sends) and ocicrypt layers
(:func:`loader.oci.ocicrypt.unwrap_layer_key`: what skopeo/ocicrypt write). :func:`unwrap_jwe`
reads the compact or the JSON serialisation (flattened or general), refuses before decrypting any
JWE that is compressed or has no recipient within the lists, then decrypts with the JOSE library
(jwcrypto) restricted to those lists. jwcrypto is imported when called: a client-only install
has none, and never calls this.
"""

from __future__ import annotations

from collections.abc import Collection
from enum import StrEnum
from typing import Any

from foundation.errors import Error

__all__ = ["JweError", "JweFailure", "unwrap_jwe"]


class JweFailure(StrEnum):
    """Why a JWE was refused (for the caller's message; decryption failures say no more)."""

    #: Not a JWE in the compact or JSON serialisation.
    MALFORMED = "malformed"
    #: A ``zip`` header (RFC 7516 §4.1.3): refused before anything is opened.
    COMPRESSED = "compressed"
    #: No recipient whose ``alg`` and ``enc`` are both in the caller's lists.
    ALGORITHM = "algorithm"
    #: The key unwraps no recipient, or the content does not authenticate (deliberately opaque).
    UNDECRYPTABLE = "undecryptable"


class JweError(Error):
    """A JWE that :func:`unwrap_jwe` refused or could not decrypt; :attr:`failure` says which.

    Callers translate it into their own error (the KBS client: ``KeyUnwrapError``; the OCI
    loader: ``ModelDecryptionError``) with their own message.
    """

    def __init__(self, failure: JweFailure, message: str) -> None:
        super().__init__(message)
        self.failure = failure


def unwrap_jwe(token: str | bytes, key: Any, *, algs: Collection[str], encs: Collection[str]) -> bytes:
    """Decrypt ``token`` with ``key`` (a jwcrypto ``JWK``) and return the plaintext.

    Verified: ``token`` parses as a compact or JSON JWE; no header of it (protected, shared
    unprotected, or a recipient's) has ``zip``; some recipient's ``alg`` is in ``algs`` and its
    ``enc`` in ``encs``; ``key`` unwraps such a recipient and the content authenticates (its tag
    covers the ciphertext and the protected header). Recipients outside the lists are never tried.
    Not verified: who encrypted it (JWE has no sender authentication; what makes only the
    intended party able to target ``key`` is the caller's business).

    .. warning::
       The lists are the caller's security decision: pass exactly the algorithms its peer uses,
       never a library's defaults.

    Raises:
        JweError: :class:`JweFailure` ``MALFORMED``, ``COMPRESSED``, ``ALGORITHM`` (refused before
            decrypting) or ``UNDECRYPTABLE`` (opaque: never says which check failed).
    """
    from jwcrypto import jwe

    parsed = jwe.JWE(algs=[*algs, *encs])
    try:
        parsed.deserialize(token.decode() if isinstance(token, bytes) else token)
        found = parsed.jose_header
    except Exception as exc:  # outside bytes: whatever the parser trips on, it is not a JWE
        raise JweError(JweFailure.MALFORMED, "not a JWE in the compact or JSON serialisation") from exc
    headers = found if isinstance(found, list) else [found]
    if any(not isinstance(h, dict) for h in headers):
        raise JweError(JweFailure.MALFORMED, "a JWE header is not a JSON object")
    if any("zip" in h for h in headers):
        # A compressed payload is only ever a decompression bomb (jwcrypto CVE-2024-28102) or an
        # oracle: none of our peers compresses. Refused before anything is opened.
        raise JweError(JweFailure.COMPRESSED, "the JWE is compressed ('zip')")
    if not any(h.get("alg") in algs and h.get("enc") in encs for h in headers):
        raise JweError(
            JweFailure.ALGORITHM,
            f"the JWE has no recipient with alg {' or '.join(algs)} and enc {' or '.join(encs)}",
        )
    try:
        parsed.decrypt(key)
        plaintext = parsed.payload
    except Exception as exc:  # opaque on purpose: which check failed is not said
        raise JweError(JweFailure.UNDECRYPTABLE, "the JWE does not decrypt with this key") from exc
    if not isinstance(plaintext, bytes):
        raise JweError(JweFailure.UNDECRYPTABLE, "the JWE does not decrypt with this key")
    return plaintext
