"""ocicrypt layers: unwrap a layer's key from its JWE annotation, then decrypt the layer stream.

The layer cipher is ``AES_256_CTR_HMAC_SHA256`` (containers/ocicrypt ``blockcipher_aes_ctr.go``):
a random 32-byte key and 16-byte initial counter block, AES-256-CTR over the (compressed) tar,
and HMAC-SHA256 under the same key over the *ciphertext*, whose value travels in the public
options annotation. The key, the counter block and the plaintext layer's digest travel in the
private options, wrapped for each recipient as a JWE (``ECDH-ES+A256KW`` for EC keys,
``RSA-OAEP`` for RSA keys; one base64 JWE JSON per recipient, comma-separated).

Neither the JWE nor the HMAC says who built the layer: anyone holding the public key can make a
valid one. The layer's identity is its blob digest, pinned by the manifest digest, and with it
everything derived from the blob: the unwrapped key and the plaintext are functions of pinned
bytes. :class:`DecryptingReader` checks the HMAC when the stream ends and raises there: bytes
read before that are not yet trustworthy (see :mod:`loader.oci.layers`). The private options'
``digest`` is not checked: skopeo records the digest of the layer it was given, which is the
compressed blob or, when it compressed the layer while copying, the tar inside it, and the
pinned blob digest already fixes both.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from foundation.errors import ModelDecryptionError, ModelFormatError
from foundation.jwe import JweError, unwrap_jwe
from loader.oci.image import ENC_KEYS_JWE, ENC_PUBOPTS, OciLayer, json_object

__all__ = ["CIPHER", "DecryptingReader", "LayerKey", "private_key_from_pem", "unwrap_layer_key"]

CIPHER = "AES_256_CTR_HMAC_SHA256"
#: JWE key-management algorithms skopeo/ocicrypt use (and the only ones accepted). ``RSA-OAEP``
#: (OAEP with SHA-1) is what ocicrypt wraps to RSA recipients with (go-jose ``RSA_OAEP``); it is
#: allowed here for that reason only: OAEP's security does not rest on SHA-1's collision
#: resistance, and the KBS path, whose peer is Trustee, never accepts it.
_JWE_ALGS = ("ECDH-ES+A256KW", "RSA-OAEP", "RSA-OAEP-256")
_JWE_ENCS = ("A256GCM",)


@dataclass(frozen=True, slots=True)
class LayerKey:
    """One layer's symmetric key, initial counter block, and expected digests."""

    symkey: bytes = field(repr=False)
    nonce: bytes = field(repr=False)
    plain_digest: str
    hmac: bytes = field(repr=False)


def _b64(value: object, what: str, layer: OciLayer) -> bytes:
    if not isinstance(value, str):
        raise ModelFormatError(f"{layer.label}: {what} is missing")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ModelFormatError(f"{layer.label}: {what} is not base64") from None


def private_key_from_pem(pem: bytes) -> Any:
    """Return the recipient key (an EC or RSA private key, PEM) as a jwcrypto JWK.

    Raises:
        ModelDecryptionError: the bytes are not a PEM EC or RSA private key (no detail leaks).
    """
    from jwcrypto import jwk

    try:
        key = jwk.JWK.from_pem(pem)
    except Exception:
        raise ModelDecryptionError(
            "the key released for this image is not a PEM EC or RSA private key (the image's recipient key)"
        ) from None
    if not key.has_private or key.get("kty") not in ("EC", "RSA"):
        raise ModelDecryptionError("the key released for this image is not an EC or RSA private key")
    return key


def unwrap_layer_key(layer: OciLayer, key: Any) -> LayerKey:
    """Unwrap ``layer``'s key with the recipient ``key`` (a jwcrypto JWK from :func:`private_key_from_pem`).

    Raises:
        ModelFormatError: the annotations are missing or malformed, or the cipher is not
            ``AES_256_CTR_HMAC_SHA256``.
        ModelDecryptionError: no recipient of the layer can be unwrapped with ``key``.
    """
    pubopts = _json(_b64(layer.annotations.get(ENC_PUBOPTS), "the public cipher options", layer), layer)
    if pubopts.get("cipher") != CIPHER:
        raise ModelFormatError(
            f"{layer.label}: cipher {pubopts.get('cipher')!r} is not supported (only {CIPHER})"
        )
    mac = _b64(pubopts.get("hmac"), "the layer HMAC", layer)
    wrapped = layer.annotations.get(ENC_KEYS_JWE)
    if not wrapped:
        raise ModelFormatError(
            f"{layer.label} has no JWE recipient ({ENC_KEYS_JWE}); other key schemes are not supported"
        )
    payload: bytes | None = None
    for blob in wrapped.split(","):
        try:
            payload = unwrap_jwe(_b64(blob, "a JWE recipient", layer), key, algs=_JWE_ALGS, encs=_JWE_ENCS)
            break
        except JweError:  # another recipient's JWE, or not ours: try the next
            continue
    if payload is None:
        raise ModelDecryptionError(
            f"{layer.label}: the key from the key broker unwraps none of its recipients "
            "(wrong key for this image)"
        )
    private = _json(payload, layer)
    symkey = _b64(private.get("symkey"), "the layer key", layer)
    nonce = _b64((private.get("cipheroptions") or {}).get("nonce"), "the layer nonce", layer)
    digest = private.get("digest")
    if (
        len(symkey) != 32
        or len(nonce) != 16
        or not isinstance(digest, str)
        or not digest.startswith("sha256:")
    ):
        raise ModelFormatError(f"{layer.label}: the unwrapped layer options are malformed")
    return LayerKey(symkey=symkey, nonce=nonce, plain_digest=digest, hmac=mac)


def _json(data: bytes, layer: OciLayer) -> dict[str, Any]:
    return json_object(data, f"{layer.label}: the cipher options")


class DecryptingReader:
    """AES-256-CTR decryption of a ciphertext stream, with its HMAC and plaintext digest checked
    at the end (:class:`ModelDecryptionError` naming the layer, raised by the read that ends it)."""

    def __init__(self, source: Any, key: LayerKey, *, label: str) -> None:
        self._source = source
        self._decryptor = Cipher(algorithms.AES(key.symkey), modes.CTR(key.nonce)).decryptor()
        self._mac = hmac.new(key.symkey, digestmod=hashlib.sha256)
        self._want_mac = key.hmac
        self._label = label
        self._buf = bytearray()
        self._done = False

    def readinto(self, buf: Any) -> int:
        """Decrypt up to ``len(buf)`` bytes into ``buf``; 0 at the (verified) end."""
        if self._done:
            return 0
        view = memoryview(buf).cast("B")
        # update_into needs room for a block beyond the data: read up to 15 bytes less.
        want = len(view) - 15 if len(view) > 15 else len(view)
        if len(self._buf) < want:
            self._buf = bytearray(want)
        ct = memoryview(self._buf)[:want]
        n = int(self._source.readinto(ct))
        if n == 0:
            self._finish()
            return 0
        self._mac.update(ct[:n])
        if len(view) > 15:
            self._decryptor.update_into(ct[:n], view)
        else:
            view[:n] = self._decryptor.update(ct[:n])
        return n

    def read(self, n: int = -1) -> bytes:
        """Read and decrypt up to ``n`` bytes (``n < 0``: to the end)."""
        if n < 0:
            out = bytearray()
            while chunk := self.read(4 << 20):
                out += chunk
            return bytes(out)
        buf = bytearray(n)
        got = self.readinto(buf)
        return bytes(buf[:got])

    def _finish(self) -> None:
        self._decryptor.finalize()
        if not hmac.compare_digest(self._mac.digest(), self._want_mac):
            raise ModelDecryptionError(
                f"{self._label} failed its HMAC: the encrypted layer was modified or truncated; "
                "nothing from it is used"
            )
        self._done = True
