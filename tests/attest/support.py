"""Shared helpers for the attestation tests: vector loading and fixed times.

The facts asserted against these vectors come from tests/vectors/<tee>/PROVENANCE.md.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

VECTORS = Path(__file__).resolve().parent.parent / "vectors"

#: dcap-qvl collateral window of tdx/tdx_quote_collateral.json (PROVENANCE.md, "Verification time").
WINDOW_START = 1750329147
WINDOW_END = 1752919235
WINDOW_MID = 1751624191
#: The time dcap-qvl's own Python example uses: before the TCBInfo issue date (a pitfall).
DCAP_EXAMPLE_TIME = 1750320802
#: The request nonce of nvidia/hopperAttestationReport.txt.
HOPPER_NONCE = bytes.fromhex("931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb")


def vector(name: str) -> bytes:
    """Return the bytes of tests/vectors/<name>."""
    return (VECTORS / name).read_bytes()


def at(seconds: int) -> datetime:
    """Return the UTC datetime of a Unix time."""
    return datetime.fromtimestamp(seconds, UTC)


#: A time when every certificate in the vectors is valid (and inside the TDX collateral window).
NOW = at(WINDOW_MID)
