"""Pure parsing of tar headers (ustar, pax and GNU): shared by the layer stream and the layer index.

A tar stream is a sequence of 512-byte headers, each followed by its member's data padded to
512 bytes. :func:`parse_header` reads one header block; :func:`pax_records` one pax extended
header's data. Neither reads anything else: callers decide what to read next.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from foundation.errors import ModelFormatError

__all__ = [
    "BLOCK",
    "TarHeader",
    "member_name",
    "member_size",
    "padded",
    "parse_header",
    "pax_records",
    "read_exact",
]

BLOCK = 512
#: Member kinds that carry no data whatever their size field says (links, devices, dirs, fifos).
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")


@dataclass(frozen=True, slots=True)
class TarHeader:
    """One parsed header block: the member's name (prefix joined), size, and type flag."""

    name: str
    size: int
    kind: bytes

    @property
    def regular(self) -> bool:
        """Whether the member is a regular file."""
        return self.kind in (b"0", b"\0", b"7")

    @property
    def extension(self) -> bool:
        """Whether the member is a pax or GNU extension header for the next member (or global)."""
        return self.kind in (b"x", b"g", b"L", b"K")


def padded(size: int) -> int:
    """``size`` rounded up to whole blocks (a member's data as it lies in the stream)."""
    return size + (-size % BLOCK)


def _octal(field: bytes, what: str, label: str) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for large values
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise ModelFormatError(f"{label}: a tar header has a malformed {what}") from None


def parse_header(raw: bytes, label: str) -> TarHeader | None:
    """Parse one 512-byte header block; None for an all-zero block (the end of the archive).

    Raises:
        ModelFormatError: the block fails its checksum or has a malformed field.
    """
    if len(raw) != BLOCK:
        raise ModelFormatError(f"{label}: the tar stream is truncated")
    if not any(raw):
        return None
    checksum = _octal(raw[148:156], "checksum", label)
    if checksum != sum(raw[:148]) + 8 * 32 + sum(raw[156:]):
        raise ModelFormatError(f"{label}: a tar header fails its checksum (not a tar stream?)")
    kind = raw[156:157]
    size = _octal(raw[124:136], "size", label)
    name = raw[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    if raw[257:262] == b"ustar":
        prefix = raw[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
        if prefix:
            name = f"{prefix}/{name}"
    return TarHeader(name, size, kind)


def member_name(header: TarHeader, pax: dict[str, str], long_name: str | None) -> str:
    """The member's name after a GNU long name or a pax ``path``, without ``./`` or ``/``."""
    name = header.name
    if long_name is not None:
        name = long_name
    if "path" in pax:
        name = pax["path"]
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def member_size(header: TarHeader, pax: dict[str, str], label: str) -> int:
    """The member's data size after a pax ``size`` (0 for kinds that carry no data)."""
    if header.kind in _NO_DATA:
        return 0
    if "size" in pax:
        try:
            return int(pax["size"])
        except ValueError:
            raise ModelFormatError(f"{label}: a pax size is malformed") from None
    return header.size


def pax_records(data: bytes, label: str) -> dict[str, str]:
    """Parse a pax extended header's data (``"<len> key=value\\n"`` records)."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            raise ModelFormatError(f"{label}: a pax header is malformed") from None
        if length <= 0:
            raise ModelFormatError(f"{label}: a pax header is malformed")
        record = data[space + 1 : pos + length - 1]
        key, _, value = record.partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return records


def read_exact(source: Any, view: memoryview, what: str) -> None:
    """Fill ``view`` from ``source.readinto``; :class:`ModelFormatError` "``what`` is truncated"."""
    got = 0
    while got < len(view):
        k = source.readinto(view[got:])
        if not k:
            raise ModelFormatError(f"{what} is truncated")
        got += k
