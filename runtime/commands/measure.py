"""``enclave-serve measure snp``: the launch measurement a workload policy should pin."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("measure", help="compute expected launch measurements (reference values)")
    tees = p.add_subparsers(dest="measure_tee", required=True, metavar="TEE")
    snp = tees.add_parser("snp", help="SEV-SNP MEASUREMENT from OVMF, kernel, initrd and command line")
    snp.add_argument("--ovmf", type=Path, required=True, help="the OVMF.fd the guest boots")
    snp.add_argument("--kernel", type=Path, help="the guest kernel (Kata boots it directly)")
    snp.add_argument("--initrd", type=Path, help="the guest initrd")
    snp.add_argument("--append", default="", help="the kernel command line, exactly")
    snp.add_argument("--vcpus", type=int, required=True, help="the number of vCPUs (-smp)")
    snp.add_argument("--vcpu-type", default="EPYC-v4", help="QEMU vCPU model (Kata: EPYC-v4)")
    snp.add_argument("--guest-features", type=lambda v: int(v, 0), default=0x1, help="SEV features (0x1)")
    snp.add_argument("--ovmf-hash", help="precomputed OVMF hash (hex), as sev-snp-measure takes it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from attest.tee import snp_launch_measurement

    digest = snp_launch_measurement(
        ovmf=args.ovmf,
        kernel=args.kernel,
        initrd=args.initrd,
        append=args.append,
        vcpus=args.vcpus,
        vcpu_type=args.vcpu_type,
        guest_features=args.guest_features,
        ovmf_hash=args.ovmf_hash,
    )
    print(digest.hex())
    return 0
