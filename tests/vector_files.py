"""The one way tests read test vectors: the files under ``tests/vectors/``.

Each folder there is a copy of what a test needs from ``../shared/vectors/`` (or from the
upstream project it names), with its PROVENANCE.md saying where each file comes from and what
is asserted against it. Tests never read ``../shared/vectors/`` directly: a checkout without
the shared folder (CI, a user's clone) runs the same suite.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["VECTORS", "vector", "vector_path"]

#: The committed vectors (``tests/vectors/<source>/`` with PROVENANCE.md).
VECTORS = Path(__file__).resolve().parent / "vectors"


def vector_path(*parts: str) -> Path:
    """Return the path of ``tests/vectors/<parts...>`` (e.g. ``vector_path("tdx", "tdx_quote")``).

    Raises FileNotFoundError naming the missing file and where vectors come from.
    """
    path = VECTORS.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(
            f"test vector {path.relative_to(VECTORS.parent.parent)} is missing: copy it from "
            "../shared/vectors/ with its PROVENANCE.md entry"
        )
    return path


def vector(*parts: str) -> bytes:
    """Return the bytes of ``tests/vectors/<parts...>`` (``vector("tdx/tdx_quote")`` also works).

    Raises FileNotFoundError as :func:`vector_path` does.
    """
    return vector_path(*parts).read_bytes()
