"""A bounds-checked little-endian cursor over bytes, shared by the pure parsers.

Every read either returns exactly the bytes asked for or raises
:class:`~foundation.errors.MalformedEvidence` naming the format, the field and the offset, so a
parser built on it cannot fail with ``IndexError``/``struct.error`` on truncated input.
"""

from __future__ import annotations

from foundation.errors import MalformedEvidence

__all__ = ["Reader"]


class Reader:
    """Read fields in order from ``data``, with the format name ``what`` in every error."""

    __slots__ = ("_data", "_what", "offset")

    def __init__(self, data: bytes, what: str, *, offset: int = 0) -> None:
        self._data = data
        self._what = what
        self.offset = offset

    @property
    def remaining(self) -> int:
        """Return how many bytes are left after the cursor."""
        return len(self._data) - self.offset

    def take(self, size: int, field: str) -> bytes:
        """Return the next ``size`` bytes as ``field``.

        Raises:
            MalformedEvidence: fewer than ``size`` bytes are left.
        """
        if size < 0 or self.offset + size > len(self._data):
            raise MalformedEvidence(
                f"{self._what}: truncated at {field} (needs {size} bytes at offset {self.offset}, "
                f"{max(self.remaining, 0)} left)"
            )
        out = self._data[self.offset : self.offset + size]
        self.offset += size
        return bytes(out)

    def uint(self, size: int, field: str) -> int:
        """Return the next ``size``-byte little-endian unsigned integer as ``field``.

        Raises:
            MalformedEvidence: fewer than ``size`` bytes are left.
        """
        return int.from_bytes(self.take(size, field), "little")

    def u8(self, field: str) -> int:
        """Return the next byte."""
        return self.uint(1, field)

    def u16(self, field: str) -> int:
        """Return the next little-endian u16."""
        return self.uint(2, field)

    def u32(self, field: str) -> int:
        """Return the next little-endian u32."""
        return self.uint(4, field)

    def u64(self, field: str) -> int:
        """Return the next little-endian u64."""
        return self.uint(8, field)

    def skip(self, size: int, field: str) -> None:
        """Skip ``size`` reserved bytes (they must exist, their value is not checked)."""
        self.take(size, field)
