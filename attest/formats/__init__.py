"""Pure parsers (``bytes -> frozen dataclass``) for TEE evidence, and the evidence JSON models.

Importing this package registers the TDX, SNP and NVIDIA evidence types with
:func:`attest.evidence.register_evidence_type`, so :func:`attest.evidence.evidence_from_json`
understands them. Every parser raises :class:`attest.errors.MalformedEvidence`, and only that,
on bad input; none does I/O or checks a signature.
"""

from __future__ import annotations

from attest.formats.nvidia_report import (
    NvidiaDeviceEvidence,
    NvidiaEvidence,
    NvidiaReport,
    parse_nvidia_report,
)
from attest.formats.snp_report import (
    SnpCertificate,
    SnpCertType,
    SnpEvidence,
    SnpProduct,
    SnpReport,
    parse_snp_cert_table,
    parse_snp_report,
)
from attest.formats.tdx_quote import TdxEvidence, TdxQuote, parse_tdx_quote

__all__ = [
    "NvidiaDeviceEvidence",
    "NvidiaEvidence",
    "NvidiaReport",
    "SnpCertType",
    "SnpCertificate",
    "SnpEvidence",
    "SnpProduct",
    "SnpReport",
    "TdxEvidence",
    "TdxQuote",
    "parse_nvidia_report",
    "parse_snp_cert_table",
    "parse_snp_report",
    "parse_tdx_quote",
]
