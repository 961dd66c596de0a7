"""The AMD SEV-SNP attester: a VMPL-0 report and its certificate table from configfs-tsm.

The report is requested from the ``sev_guest`` configfs-tsm provider at ``privlevel`` 0; the
``auxblob`` (the GHCB certificate table the host supplied, usually the VCEK or VLEK, ASK and
ARK) becomes Trustee's ``cert_chain``. Nothing is verified here beyond parsing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from attest.binding import pad_report_data
from attest.evidence import TeeKind
from attest.tee.attester import Attester
from attest.tee.snp.report import SnpEvidence, parse_snp_cert_table, parse_snp_report
from attest.tee.tsm import DEFAULT_TSM_REPORT_ROOT, ConfigfsTsm, guest_present
from foundation.errors import AttestationError, EvidenceCollectionError, MalformedEvidence

__all__ = ["SNP_DEVICE_PATHS", "SNP_PRIVLEVEL", "SNP_TSM_PROVIDER", "SnpAttester", "snp_init_data_register"]

#: configfs-tsm provider name of the SEV guest driver (drivers/virt/coco/sev-guest).
SNP_TSM_PROVIDER = "sev_guest"
#: The VMPL the guest's own report is requested at (the verifier requires 0).
SNP_PRIVLEVEL = 0
#: Present in SEV-SNP guests (guest-components ``snp::detect_platform``).
SNP_DEVICE_PATHS = (Path("/sys/devices/platform/sev-guest"), Path("/dev/sev-guest"))


class SnpAttester(Attester):
    """Collect :class:`~attest.tee.snp.report.SnpEvidence` through configfs-tsm."""

    tee: ClassVar[TeeKind] = TeeKind.SNP

    def __init__(self, *, tsm: ConfigfsTsm | None = None) -> None:
        self._tsm = tsm if tsm is not None else ConfigfsTsm()

    @classmethod
    def detect(
        cls, *, tsm_root: Path = DEFAULT_TSM_REPORT_ROOT, device_paths: Sequence[Path] = SNP_DEVICE_PATHS
    ) -> bool:
        """Return whether this is an SEV-SNP guest with configfs-tsm (checks paths only)."""
        return guest_present(tsm_root, device_paths)

    def collect(self, report_data: bytes) -> SnpEvidence:
        """Return a fresh report whose REPORT_DATA is ``report_data`` zero-padded to 64 bytes.

        Raises:
            ValueError: ``report_data`` is longer than 64 bytes.
            BackendUnavailable: no configfs-tsm SEV provider.
            EvidenceCollectionError: the kernel failed, or returned a report that does not
                parse or is over other report data, or a malformed certificate table.
        """
        padded = pad_report_data(report_data)
        result = self._tsm.report(
            padded, provider=SNP_TSM_PROVIDER, privlevel=SNP_PRIVLEVEL, read_auxblob=True
        )
        try:
            report = parse_snp_report(result.outblob)
            chain = None if result.auxblob is None else parse_snp_cert_table(result.auxblob) or None
        except MalformedEvidence as exc:
            raise EvidenceCollectionError(f"sev_guest returned unusable evidence: {exc}") from exc
        if report.report_data != padded:
            raise EvidenceCollectionError("sev_guest returned a report over other report data; retry")
        return SnpEvidence(report=report.raw, cert_chain=chain)

    def describe(self) -> dict[str, object]:
        """Return the TEE and the configfs-tsm root."""
        return {
            "tee": self.tee.value,
            "insecure": self.insecure,
            "tsm_root": str(self._tsm.root),
            "tsm_available": self._tsm.available(),
        }


def snp_init_data_register(attester: Attester, nonce: bytes) -> bytes:
    """Return HOST_DATA, the SEV-SNP init-data register, from a fresh report over ``nonce``.

    The PSP builds the report and returns it in an SNP guest message encrypted and authenticated
    (AES-GCM) with this guest's VMPCK, a key the PSP placed in the guest's encrypted secrets page
    at launch and the host cannot read; the sev-guest driver checks the tag and the message
    sequence number, so the host can withhold the report but neither forge, alter nor replay it.
    Its signature (VCEK) is therefore not checked here, and the certificates the host supplies in
    ``auxblob`` are not used.

    Raises:
        AttestationError: ``attester`` did not return SNP evidence, or the report does not parse.
        EvidenceCollectionError: no report, or one over other report data (a subclass of the above).
    """
    evidence = attester.collect(nonce)
    if not isinstance(evidence, SnpEvidence):
        raise AttestationError(f"the snp attester returned {type(evidence).__name__}, not SNP evidence")
    report = parse_snp_report(evidence.report)
    if report.report_data != pad_report_data(nonce):
        raise EvidenceCollectionError("sev_guest returned a report over other report data; retry")
    return report.host_data
