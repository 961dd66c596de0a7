"""``enclave-serve verify URL``: check a running server's attestation before trusting it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "verify",
        help="verify a running server: fresh evidence, TLS key binding, model identity",
        description="Fetch a fresh attestation document with a random nonce and verify it step by step.",
    )
    p.add_argument("url", help="server base URL, e.g. https://127.0.0.1:8000")
    p.add_argument(
        "--expect-model", metavar="DIGEST", help="required model identity (sha256:... manifest digest)"
    )
    p.add_argument(
        "--expect-config",
        metavar="DIGEST",
        help="required run configuration (sha256:... of /.well-known/enclave-serve/config; "
        "'enclave-serve run ... --print-config' computes it)",
    )
    p.add_argument(
        "--allow-insecure-sample-tee",
        action="store_true",
        help="DEVELOPMENT ONLY: accept the sample TEE (its evidence proves nothing)",
    )
    p.add_argument(
        "--allow-no-tls",
        action="store_true",
        help="DEVELOPMENT ONLY: accept a plain-HTTP server (attestation not bound to TLS)",
    )
    p.add_argument(
        "--reference-values",
        type=Path,
        metavar="FILE",
        help="reference measurements / GPU versions (JSON, the kbs-dev format of docs/kbs.md); "
        "without it, which software runs is not checked",
    )
    p.add_argument(
        "--tdx-collateral", type=Path, metavar="FILE", help="DCAP collateral (dcap-qvl JSON) for TDX"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from attest.client.remote import verify_server
    from attest.errors import ConfigError, Error
    from attest.evidence import TeeKind
    from attest.verify import TdxCollateral
    from attest.verify.reference import ReferenceValues

    cpu_policy = device_policy = None
    collateral: dict[TeeKind, object] = {}
    try:
        if args.reference_values is not None:
            reference = ReferenceValues.from_json(args.reference_values.read_bytes())
            cpu_policy, device_policy = reference.cpu, reference.device
        if args.tdx_collateral is not None:
            collateral[TeeKind.TDX] = TdxCollateral.from_json(args.tdx_collateral.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot use the reference values or collateral: {exc}") from exc
    expected_config = args.expect_config
    if expected_config is not None:
        expected_config = expected_config.removeprefix("sha256:")
        if len(expected_config) != 64 or expected_config.strip("0123456789abcdef"):
            raise ConfigError("--expect-config must be sha256: followed by 64 lowercase hex digits")
    try:
        verified = verify_server(
            args.url,
            expected_model_digest=args.expect_model,
            expected_config_sha256=expected_config,
            allow_insecure=args.allow_insecure_sample_tee,
            allow_no_tls=args.allow_no_tls,
            policy=cpu_policy,
            device_policy=device_policy,
            collateral=collateral,
        )
    except Error as exc:
        if args.json:
            print(json.dumps({"url": args.url, "verified": False, "error": f"{type(exc).__name__}: {exc}"}))
            return 1
        raise
    if args.json:
        print(json.dumps(verified.to_json(), indent=2))
        return 0
    claims = verified.document.claims
    print(f"verified {args.url}")
    for check in verified.checks:
        print(f"  ok  {check.name:<16} {check.detail}")
    print(f"  model        {claims.model_digest}")
    print(f"  config       sha256:{claims.config_sha256}")
    print(f"  tee          {claims.tee.value}{' (INSECURE: development only)' if claims.insecure else ''}")
    if verified.tls_spki_sha256:
        print(f"  pin TLS key  sha256 SPKI {verified.tls_spki_sha256}")
    for warning in verified.warnings:
        print(f"  WARNING      {warning}")
    return 0
