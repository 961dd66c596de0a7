"""The Intel TDX attester: a DCAP quote from configfs-tsm, plus the CCEL event log.

The quote is requested from the ``tdx_guest`` configfs-tsm provider (the kernel asks the host's
quoting service); the CCEL ACPI table data, when the firmware exposes it, travels with it as
``cc_eventlog``. Nothing is verified here beyond the quote parsing and carrying the report data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from attest.binding import pad_report_data
from attest.errors import EvidenceCollectionError, MalformedEvidence
from attest.evidence import TeeKind
from attest.formats.tdx_quote import TdxEvidence, parse_tdx_quote
from attest.providers.base import Attester
from attest.providers.tsm import DEFAULT_TSM_REPORT_ROOT, ConfigfsTsm, guest_present

__all__ = ["DEFAULT_CCEL_PATH", "TDX_DEVICE_PATHS", "TDX_TSM_PROVIDER", "TdxAttester"]

logger = logging.getLogger(__name__)

#: configfs-tsm provider name of the TDX guest driver (drivers/virt/coco/tdx-guest).
TDX_TSM_PROVIDER = "tdx_guest"
#: CCEL event log data exported by the ACPI driver (Intel TDX GHCI spec, "CCEL" table).
DEFAULT_CCEL_PATH = Path("/sys/firmware/acpi/tables/data/CCEL")
#: Present in TDX guests (guest-components ``tdx::detect_platform``).
TDX_DEVICE_PATHS = (Path("/dev/tdx_guest"), Path("/sys/devices/virtual/misc/tdx_guest"))


class TdxAttester(Attester):
    """Collect :class:`~attest.formats.tdx_quote.TdxEvidence` through configfs-tsm."""

    tee: ClassVar[TeeKind] = TeeKind.TDX

    def __init__(self, *, tsm: ConfigfsTsm | None = None, ccel_path: Path | None = DEFAULT_CCEL_PATH) -> None:
        self._tsm = tsm if tsm is not None else ConfigfsTsm()
        self._ccel_path = ccel_path

    @classmethod
    def detect(
        cls, *, tsm_root: Path = DEFAULT_TSM_REPORT_ROOT, device_paths: Sequence[Path] = TDX_DEVICE_PATHS
    ) -> bool:
        """Return whether this is a TDX guest with configfs-tsm (checks paths only)."""
        return guest_present(tsm_root, device_paths)

    def collect(self, report_data: bytes) -> TdxEvidence:
        """Return a fresh quote whose REPORTDATA is ``report_data`` zero-padded to 64 bytes.

        Raises:
            ValueError: ``report_data`` is longer than 64 bytes.
            BackendUnavailable: no configfs-tsm TDX provider.
            EvidenceCollectionError: the kernel failed, or returned something that is not a
                quote over our report data.
        """
        padded = pad_report_data(report_data)
        report = self._tsm.report(padded, provider=TDX_TSM_PROVIDER)
        try:
            quote = parse_tdx_quote(report.outblob)
        except MalformedEvidence as exc:
            raise EvidenceCollectionError(f"tdx_guest returned a quote that does not parse: {exc}") from exc
        if quote.body.report_data != padded:
            raise EvidenceCollectionError("tdx_guest returned a quote over other report data; retry")
        return TdxEvidence(quote=report.outblob, cc_eventlog=self._read_ccel())

    def _read_ccel(self) -> bytes | None:
        if self._ccel_path is None:
            return None
        try:
            return self._ccel_path.read_bytes() or None
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("could not read the CCEL event log at %s: %s", self._ccel_path, exc)
            return None

    def describe(self) -> dict[str, object]:
        """Return the TEE, the configfs-tsm root and whether a CCEL event log is present."""
        return {
            "tee": self.tee.value,
            "insecure": self.insecure,
            "tsm_root": str(self._tsm.root),
            "tsm_available": self._tsm.available(),
            "ccel": self._ccel_path is not None and self._ccel_path.exists(),
        }
