"""Compute expected launch measurements from the guest's boot artefacts (reference values).

SEV-SNP: :func:`snp_launch_measurement` is the ``MEASUREMENT`` a guest launched from this OVMF,
kernel, initrd and command line must report, computed with AMD's algorithm as implemented by
virtee's ``sev-snp-measure`` (PyPI; install ``enclave-serve[measure]``). Kata's QEMU launches SNP
guests with ``kernel-hashes=on``, so the kernel, initrd and command line are part of it; take the
exact paths, ``-smp`` and ``-append`` from the Kata runtime's ``launching … qemu … with:`` log
line.

TDX has no published offline calculator for Kata's OVMF + direct-kernel boot (docs/policy.md):
record MRTD and RTMR0-2 from a known-good TD (``enclave-serve policy record``).
"""

from __future__ import annotations

from pathlib import Path

from foundation.errors import BackendUnavailable, ConfigError

__all__ = ["snp_launch_measurement"]


def snp_launch_measurement(
    *,
    ovmf: Path,
    kernel: Path | None,
    initrd: Path | None,
    append: str,
    vcpus: int,
    vcpu_type: str,
    guest_features: int = 0x1,
    ovmf_hash: str | None = None,
) -> bytes:
    """Return the 48-byte SNP launch measurement.

    Raises:
        BackendUnavailable: ``sev-snp-measure`` is not installed.
        ConfigError: an unknown vCPU type or an unreadable artefact.
    """
    try:
        from sevsnpmeasure import guest, vcpu_types
        from sevsnpmeasure.sev_mode import SevMode
    except ImportError as exc:
        raise BackendUnavailable(
            "measuring SNP needs sev-snp-measure: pip install 'enclave-serve[measure]'"
        ) from exc
    sig = vcpu_types.CPU_SIGS.get(vcpu_type)
    if sig is None:
        raise ConfigError(f"unknown vCPU type {vcpu_type!r}; e.g. EPYC-v4, EPYC-Milan, EPYC-Genoa")
    try:
        digest: bytes = guest.calc_launch_digest(
            SevMode.SEV_SNP,
            vcpus,
            sig,
            str(ovmf),
            str(kernel) if kernel is not None else None,
            str(initrd) if initrd is not None else None,
            append,
            guest_features,
            snp_ovmf_hash_str=ovmf_hash or "",
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"cannot compute the SNP measurement: {exc}") from exc
    return digest
