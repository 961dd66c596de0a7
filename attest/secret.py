"""A container for key material that refuses to be printed.

Python cannot promise that no copy of a secret survives in memory, but it can make the easy
leaks impossible: ``repr``/``str``/``format``, pickling, and comparisons that short-circuit.
"""

from __future__ import annotations

import hmac
from typing import NoReturn

__all__ = ["SecretBytes"]


class SecretBytes:
    """Key bytes that never appear in ``repr``, logs, pickles or exception text.

    The bytes live in a private ``bytearray`` so :meth:`wipe` can overwrite them in place.

    .. warning::
       :meth:`reveal` returns a ``bytes`` copy; keep it in a local variable and never log it.
    """

    __slots__ = ("_buf",)

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._buf = bytearray(data)

    def reveal(self) -> bytes:
        """Return the secret bytes (a copy)."""
        if not self._buf:
            raise ValueError("secret has been wiped")
        return bytes(self._buf)

    def __len__(self) -> int:
        return len(self._buf)

    def wipe(self) -> None:
        """Overwrite the secret with zeros and forget it."""
        for i in range(len(self._buf)):
            self._buf[i] = 0
        self._buf = bytearray()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecretBytes):
            return NotImplemented
        return hmac.compare_digest(self._buf, other._buf)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<SecretBytes len={len(self._buf)} redacted>"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __reduce__(self) -> NoReturn:
        raise TypeError("SecretBytes cannot be pickled")

    def __bytes__(self) -> NoReturn:
        raise TypeError("use SecretBytes.reveal() explicitly")
