"""``enclave-serve policy``: write, explain and export workload policies (docs/policy.md).

* ``policy record URL -o FILE``: verify a deployment you trust (hardware and binding) and write the
  policy that pins what it runs, for review; a deployment launched without init-data (a zero
  register) is refused: launch it with ``enclave-serve initdata`` output first;
* ``policy show FILE``: explain a policy rule by rule (exit 1 if it is not a valid policy);
* ``policy trustee FILE --init-data INITDATA... -o DIR``: export it for a real Trustee KBS (the
  resource policy and the attestation policies in rego, and the kbs-client commands that install
  them); every allowed init-data must declare an allowed model, configuration and runtime
  version, and a rule Trustee cannot enforce refuses the export, naming the rule.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from runtime.collateral import add_collateral_arguments

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
    add_collateral_arguments(record)
    record.add_argument("--force", action="store_true", help="overwrite the output file")
    show = actions.add_parser("show", help="explain a policy rule by rule")
    show.add_argument("file", type=Path, metavar="POLICY", help="the workload policy file (TOML)")
    trustee = actions.add_parser("trustee", help="export a policy for a real Trustee KBS")
    trustee.add_argument(
        "file", type=Path, metavar="POLICY", help="the workload policy file (TOML) to export"
    )
    trustee.add_argument(
        "--init-data",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="an allowed init-data document (TOML or the annotation); repeat for each pinned one",
    )
    trustee.add_argument("-o", "--output", type=Path, required=True, help="directory to write into")
    trustee.add_argument("--kbs-url", default="https://kbs:8080", help="KBS URL for the printed commands")
    trustee.add_argument(
        "--kbs-cacert",
        metavar="FILE",
        help="the KBS's private CA (PEM) as kbs-client.sh should name it (--cert-file FILE); default: the "
        "system's trust store",
    )
    p.set_defaults(func=run)


def _record(args: argparse.Namespace) -> int:
    from attest.client.record import record_policy
    from attest.client.remote import fetch_bundle
    from attest.client.verdict import verify_document
    from attest.evidence import TeeKind
    from foundation.errors import ConfigError, VerificationUnavailable
    from runtime.collateral import collateral_files, typed_collateral
    from runtime.commands.verify import EXIT_UNAVAILABLE, print_verdict

    if args.output.exists() and not args.force:
        raise ConfigError(f"{args.output} exists; pass --force to overwrite it")
    collateral = typed_collateral(collateral_files(args.collateral, {TeeKind.TDX: args.tdx_collateral}))
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
    from attest.initdata import InitData
    from attest.verify.trustee import ExportRefused, export_policy, kbs_client_script
    from attest.verify.workload import PolicyFileError, WorkloadPolicy
    from foundation.errors import ConfigError, MalformedEvidence

    try:
        policy = WorkloadPolicy.load(args.file)
    except PolicyFileError as exc:
        raise ConfigError(f"{args.file}: {exc}") from exc
    documents = []
    for path in args.init_data:
        try:
            documents.append(InitData.load(path.read_bytes()))
        except OSError as exc:
            raise ConfigError(f"cannot read the init-data {path}: {exc.strerror}") from None
        except MalformedEvidence as exc:
            raise ConfigError(f"{path}: {exc}") from None
    try:
        export = export_policy(policy, documents)
    except ExportRefused as exc:
        print(f"enclave-serve policy trustee: refused, nothing written: {exc}", file=sys.stderr)
        return 1
    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    files = export.files()
    files["kbs-client.sh"] = kbs_client_script(export, kbs_url=args.kbs_url, cacert=args.kbs_cacert)
    for name, text in files.items():
        (out / name).write_text(text)
    print(f"wrote {', '.join(sorted(files))} into {out}; every rule is enforced here:")
    for placement in export.placements:
        print(f"  {placement.rule}: {placement.where}")
    return 0


def run(args: argparse.Namespace) -> int:
    return {"record": _record, "show": _show, "trustee": _trustee}[args.policy_command](args)
