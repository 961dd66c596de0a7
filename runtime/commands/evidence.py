"""``enclave-serve evidence``: what this machine can attest, or fresh evidence for a nonce.

Without ``--nonce`` it lists the CPU TEEs detected, the GPUs and their confidential-computing
state. With ``--nonce HEX`` it collects evidence whose report data is those bytes (GPUs get the
first 32) and prints it as Trustee-shaped JSON.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from attest.tee import BACKENDS
from attest.tee.select import detect_devices, detected_tees, select_attester
from foundation.errors import ConfigError

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register the ``evidence`` subcommand."""
    p = subparsers.add_parser(
        "evidence",
        help="show what this machine can attest, or dump fresh evidence for a nonce",
        description=__doc__,
    )
    p.add_argument("--tee", default="auto", help="auto (default), tdx, snp, or sample")
    p.add_argument("--gpus", default="auto", help="auto (default), none, nvidia, or sample")
    p.add_argument(
        "--allow-insecure-sample-tee",
        action="store_true",
        help="allow the insecure sample TEE/device (development only)",
    )
    p.add_argument("--nonce", metavar="HEX", help="collect evidence over these bytes (at most 64)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _status(args: argparse.Namespace) -> dict[str, Any]:
    tees: dict[str, Any] = {name: {"detected": found} for name, found in detected_tees().items()}
    tees["sample"] = {"detected": False, "note": "never detected: --tee sample --allow-insecure-sample-tee"}
    devices: list[dict[str, object]] = []
    try:
        for dev in detect_devices(gpus=args.gpus, allow_insecure=args.allow_insecure_sample_tee):
            devices.append(dev.describe())
    except Exception as exc:  # a status listing reports problems, it never fails
        devices.append({"error": str(exc)})
    return {"tees": tees, "devices": devices}


def _collect(args: argparse.Namespace) -> dict[str, Any]:
    try:
        nonce = bytes.fromhex(args.nonce)
    except ValueError:
        raise ConfigError("--nonce must be hex") from None
    if len(nonce) > 64:
        raise ConfigError(f"--nonce is {len(nonce)} bytes; the report data field holds 64")
    attester = select_attester(args.tee, allow_insecure=args.allow_insecure_sample_tee)
    primary = attester.collect(nonce)
    additional: dict[str, Any] = {}
    for device in detect_devices(gpus=args.gpus, allow_insecure=args.allow_insecure_sample_tee):
        additional[device.tee.value] = device.collect(nonce).to_json()
    return {
        "tee": primary.tee.value,
        "insecure": BACKENDS[primary.tee].insecure,
        "report_data": nonce.hex(),
        "evidence": primary.to_json(),
        "additional_evidence": additional,
    }


def run(args: argparse.Namespace) -> int:
    """Print the status or the evidence; return 0.

    Raises:
        ConfigError: bad flags.
        AttestationError: collection failed.
    """
    out = _collect(args) if args.nonce is not None else _status(args)
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return 0
    if args.nonce is None:
        for name, info in out["tees"].items():
            print(
                f"tee     {name:7} {'detected' if info['detected'] else 'not found'}  {info.get('note', '')}"
            )
        if not out["devices"]:
            print("gpus    none found")
        for dev in out["devices"]:
            print(f"device  {json.dumps(dev, sort_keys=True)}")
        return 0
    if out["insecure"]:
        print(f"WARNING: {out['tee']} evidence is insecure; it proves nothing")
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0
