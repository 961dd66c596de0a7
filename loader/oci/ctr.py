"""AES-256-CTR at any offset of a layer, on all decrypt threads at once.

ocicrypt's layer cipher is AES-256-CTR with a 128-bit big-endian counter, so byte ``offset`` of a
layer is decrypted with the counter block ``nonce + offset // 16``, dropping ``offset % 16``
keystream bytes. pyca/cryptography's ``update_into`` holds the GIL while it runs (its AEADs'
``decrypt_into`` does not), which serialises the engine's decrypt threads. This module therefore
calls OpenSSL's EVP interface in the system ``libcrypto`` (the one Python's ``hashlib`` and
``ssl`` already use) through :mod:`ctypes`, which releases the GIL for the call; where that
library cannot be loaded, it falls back to pyca/cryptography (correct, only serialised).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["ctr_xor", "native_ctr_available"]


@functools.cache
def _libcrypto() -> Any | None:
    for name in ("libcrypto.so.3", ctypes.util.find_library("crypto")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            lib.EVP_CIPHER_CTX_new.restype = ctypes.c_void_p
            lib.EVP_CIPHER_CTX_free.argtypes = [ctypes.c_void_p]
            lib.EVP_aes_256_ctr.restype = ctypes.c_void_p
            lib.EVP_DecryptInit_ex.argtypes = [
                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
            ]  # fmt: skip
            lib.EVP_DecryptUpdate.argtypes = [
                ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int), ctypes.c_void_p, ctypes.c_int,
            ]  # fmt: skip
            if lib.EVP_aes_256_ctr():
                return lib
        except (OSError, AttributeError):
            continue
    return None


def native_ctr_available() -> bool:
    """Whether the GIL-free OpenSSL path is in use."""
    return _libcrypto() is not None


def _address(buf: Any, n: int, *, writable: bool) -> int:
    """The address of a contiguous buffer of at least ``n`` bytes (bytes, bytearray, numpy…)."""
    array = np.frombuffer(buf, dtype=np.uint8)
    if array.size < n or (writable and not array.flags.writeable):
        raise ValueError("a contiguous buffer of the right size (and writable, for the output) is needed")
    return int(array.ctypes.data)


_MAX_CALL = 1 << 30  # EVP lengths are ints


def ctr_xor(key: bytes, nonce: bytes, offset: int, data: Any, out: Any) -> None:
    """Decrypt (or encrypt) ``data`` (a writable buffer), the bytes at ``offset`` of a CTR stream
    under ``key`` and initial counter block ``nonce``, into ``out`` (exactly ``len(data)`` bytes)."""
    n = memoryview(data).nbytes
    if n == 0:
        return
    counter = ((int.from_bytes(nonce, "big") + offset // 16) % (1 << 128)).to_bytes(16, "big")
    skip = offset % 16
    lib = _libcrypto()
    if lib is None:
        dec = Cipher(algorithms.AES(key), modes.CTR(counter)).decryptor()
        if skip:
            dec.update(bytes(skip))
        memoryview(out).cast("B")[:n] = dec.update(bytes(memoryview(data).cast("B")))
        return
    src, dst = _address(data, n, writable=False), _address(out, n, writable=True)
    ctx = lib.EVP_CIPHER_CTX_new()
    if not ctx:
        raise MemoryError("EVP_CIPHER_CTX_new failed")
    key_buf = ctypes.create_string_buffer(key, len(key))
    try:
        if lib.EVP_DecryptInit_ex(ctx, lib.EVP_aes_256_ctr(), None, key_buf, counter) != 1:
            raise ValueError("EVP_DecryptInit_ex failed")
        outl = ctypes.c_int(0)
        if skip:
            pad = ctypes.create_string_buffer(16)
            if lib.EVP_DecryptUpdate(ctx, pad, ctypes.byref(outl), pad, skip) != 1:
                raise ValueError("EVP_DecryptUpdate failed")
        done = 0
        while done < n:
            step = min(_MAX_CALL, n - done)
            if lib.EVP_DecryptUpdate(ctx, dst + done, ctypes.byref(outl), src + done, step) != 1:
                raise ValueError("EVP_DecryptUpdate failed")
            done += step
    finally:
        lib.EVP_CIPHER_CTX_free(ctx)
        ctypes.memset(key_buf, 0, len(key))
