"""``enclave-serve policy``: write, explain and export workload policies (docs/policy.md).

* ``policy record URL -o FILE``: verify a deployment you trust (hardware and binding) and write the
  policy that pins what it runs, for review; a deployment launched without init-data (a zero
  register) is refused: launch it with ``enclave-serve initdata`` output first;
* ``policy show FILE``: explain a policy rule by rule (exit 1 if it is not a valid policy);
* ``policy trustee FILE -o DIR``: export it for a real Trustee KBS (resource policy in rego, the
  reference values and the kbs-client commands that register them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("policy", help="record, show or export a workload policy (docs/policy.md)")
    actions = p.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    record = actions.add_parser("record", help="write the policy of a deployment you trust")
    record.add_argument("url", help="server base URL")
    record.add_argument("-o", "--output", type=Path, required=True, help="policy file to write")
    record.add_argument(
        "--allow-insecure-sample-tee",
        action="store_true",
        help="DEVELOPMENT ONLY: record from the sample TEE (the policy says insecure_development = true)",
    )
    record.add_argument("--tdx-collateral", type=Path, metavar="FILE", help="DCAP collateral for TDX")
    record.add_argument("--force", action="store_true", help="overwrite the output file")
    show = actions.add_parser("show", help="explain a policy rule by rule")
    show.add_argument("file", type=Path)
    trustee = actions.add_parser("trustee", help="export a policy for a real Trustee KBS")
    trustee.add_argument("file", type=Path)
    trustee.add_argument("-o", "--output", type=Path, required=True, help="directory to write into")
    trustee.add_argument("--kbs-url", default="https://kbs:8080", help="KBS URL for the printed commands")
    p.set_defaults(func=run)


def _record(args: argparse.Namespace) -> int:
    from attest.client.record import record_policy
    from attest.client.remote import fetch_bundle
    from attest.client.verdict import verify_document
    from attest.errors import ConfigError, VerificationUnavailable
    from attest.evidence import TeeKind
    from attest.verify import TdxCollateral
    from runtime.commands.verify import EXIT_UNAVAILABLE, print_verdict

    if args.output.exists() and not args.force:
        raise ConfigError(f"{args.output} exists; pass --force to overwrite it")
    collateral: dict[TeeKind, object] = {}
    if args.tdx_collateral is not None:
        collateral[TeeKind.TDX] = TdxCollateral.from_json(args.tdx_collateral.read_text())
    try:
        bundle = fetch_bundle(args.url)
    except VerificationUnavailable as exc:
        print(f"could not check {args.url}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    verdict = verify_document(
        bundle.document,
        bundle.config,
        nonce=bundle.nonce,
        observed_tls_spki_sha256=bundle.tls_spki_sha256,
        policy=None,
        allow_unpinned_software=True,
        allow_insecure=args.allow_insecure_sample_tee,
        collateral=collateral,
    )
    if not verdict.ok:
        print_verdict(verdict, url=args.url)
        print("enclave-serve policy record: the server does not verify; nothing recorded", file=sys.stderr)
        return 1
    try:
        recorded = record_policy(verdict)
    except ValueError as exc:  # NoInitData, or a policy the constructor refuses
        print(f"enclave-serve policy record: {exc}; nothing recorded", file=sys.stderr)
        return 1
    args.output.write_text(recorded.policy.to_toml())
    print(f"recorded the policy of {args.url} into {args.output}; review it before use:")
    for line in recorded.policy.explain():
        print(f"  {line}")
    for note in recorded.notes:
        print(f"  NOTE {note}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from attest.verify.workload import PolicyFileError, WorkloadPolicy

    try:
        policy = WorkloadPolicy.load(args.file)
    except PolicyFileError as exc:
        print(f"{args.file}: not a valid policy: {exc}", file=sys.stderr)
        return 1
    print(f"{args.file}: a valid policy; a server passes only if ALL of these hold:")
    for line in policy.explain():
        print(f"  - {line}")
    return 0


def _trustee(args: argparse.Namespace) -> int:
    from attest.errors import ConfigError
    from attest.verify.trustee import reference_value_commands, reference_values, resource_policy_rego
    from attest.verify.workload import PolicyFileError, WorkloadPolicy

    try:
        policy = WorkloadPolicy.load(args.file)
    except PolicyFileError as exc:
        raise ConfigError(f"{args.file}: {exc}") from exc
    if policy.insecure_development:
        raise ConfigError("an insecure_development policy (sample TEE) cannot be exported for Trustee")
    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    (out / "resource-policy.rego").write_text(resource_policy_rego(policy))
    (out / "reference-values.json").write_text(json.dumps(reference_values(policy), indent=2) + "\n")
    commands = reference_value_commands(policy, kbs_url=args.kbs_url)
    script = ["#!/bin/sh", "# Register the reference values Trustee's default CPU attestation policy reads.",
              "set -e", *commands,
              f"kbs-client --url {args.kbs_url} config --admin-token-file admin.jwt set-resource-policy "
              "--policy-file resource-policy.rego"]  # fmt: skip
    (out / "kbs-client.sh").write_text("\n".join(script) + "\n")
    print(f"wrote {out}/resource-policy.rego, reference-values.json and kbs-client.sh")
    print("Trustee's default attestation policy (default_cpu) reads these reference values; the resource")
    print("policy also requires cpu0 (and every gpuN) affirming and the pinned init-data (docs/kbs.md).")
    return 0


def run(args: argparse.Namespace) -> int:
    return {"record": _record, "show": _show, "trustee": _trustee}[args.policy_command](args)
