"""Claims of sample / sampledevice evidence. They prove nothing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["SampleClaims"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SampleClaims:
    """Claims of sample / sampledevice evidence. They prove nothing."""

    svn: int
    report_data: bytes
    init_data: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        """Return ``{"svn", "report_data", "init_data"}``."""
        return {
            "svn": self.svn,
            "report_data": self.report_data.hex(),
            "init_data": None if self.init_data is None else self.init_data.hex(),
        }
