"""``enclave-serve verify URL --policy FILE``: check a running server before trusting it.

Prints every step with ✓ or ✗ and its reason (``--json``: one object) and exits

* 0: verified;
* 1: not verified (a step failed, or no policy was given);
* 2: could not check (the server is unreachable or answers an error, unusable collateral or
  policy file).

``--save FILE`` keeps what was fetched; ``--offline FILE`` verifies a saved bundle again (the
nonce is the one used when it was fetched, so it proves freshness only as of then).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["EXIT_NOT_VERIFIED", "EXIT_UNAVAILABLE", "add_parser", "print_verdict", "run"]

EXIT_NOT_VERIFIED = 1
EXIT_UNAVAILABLE = 2


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "verify",
        help="verify a running server against a policy: hardware, TLS binding, software, model",
        description="Fetch a fresh attestation document with a random nonce and verify it step by step "
        "against a workload policy (docs/policy.md). Exit 0 verified, 1 not verified, 2 could not check.",
    )
    p.add_argument("url", nargs="?", help="server base URL, e.g. https://127.0.0.1:8000")
    p.add_argument("--policy", type=Path, metavar="FILE", help="the workload policy (TOML) to verify against")
    p.add_argument(
        "--allow-unpinned-software",
        action="store_true",
        help="INSECURE: verify without a policy (proves only that genuine hardware runs SOME software)",
    )
    p.add_argument(
        "--allow-insecure-sample-tee",
        action="store_true",
        help="DEVELOPMENT ONLY: accept the sample TEE (its evidence proves nothing); the policy must "
        "also say insecure_development = true",
    )
    p.add_argument(
        "--allow-no-tls",
        action="store_true",
        help="DEVELOPMENT ONLY: accept a plain-HTTP server (attestation not bound to TLS)",
    )
    p.add_argument("--expect-model", metavar="DIGEST", help="also require this model (sha256:...)")
    p.add_argument(
        "--expect-config", metavar="DIGEST", help="also require this run configuration (sha256:...)"
    )
    p.add_argument(
        "--tdx-collateral", type=Path, metavar="FILE", help="DCAP collateral (dcap-qvl JSON) for TDX"
    )
    p.add_argument("--save", type=Path, metavar="FILE", help="save what was fetched, for --offline")
    p.add_argument("--offline", type=Path, metavar="FILE", help="verify a bundle saved with --save")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def print_verdict(verdict: object, *, url: str, out: object = None) -> None:
    """Print a :class:`~attest.client.verdict.Verdict` as ✓/✗ lines."""
    from attest.client.verdict import Verdict

    assert isinstance(verdict, Verdict)
    stream = out if out is not None else sys.stdout
    width = max((len(s.name) for s in verdict.steps), default=8)
    print(f"{'verified' if verdict.ok else 'NOT VERIFIED'}: {url}", file=stream)  # type: ignore[arg-type]
    for step in verdict.steps:
        mark = "✓" if step.ok else "✗"
        print(f"  {mark} {step.name:<{width}}  {step.detail}", file=stream)  # type: ignore[arg-type]
    for warning in verdict.warnings:
        print(f"  WARNING {warning}", file=stream)  # type: ignore[arg-type]
    if verdict.document is not None and verdict.ok:
        claims = verdict.document.claims
        print(f"  model   {claims.model_digest}", file=stream)  # type: ignore[arg-type]
        print(f"  config  sha256:{claims.config_sha256}", file=stream)  # type: ignore[arg-type]
        if claims.tls_spki_sha256:
            print(f"  pin TLS key: SPKI sha256 {claims.tls_spki_sha256}", file=stream)  # type: ignore[arg-type]


def _digest(value: str | None, flag: str) -> str | None:
    from attest.errors import ConfigError

    if value is None:
        return None
    hexpart = value.removeprefix("sha256:")
    if len(hexpart) != 64 or hexpart.strip("0123456789abcdef"):
        raise ConfigError(f"{flag} must be sha256: followed by 64 lowercase hex digits")
    return hexpart


def run(args: argparse.Namespace) -> int:
    from attest.client.remote import VerificationBundle, fetch_bundle, verify_bundle
    from attest.client.verdict import ServerRefused
    from attest.errors import ConfigError, Error, MalformedEvidence, VerificationUnavailable
    from attest.evidence import TeeKind
    from attest.verify import TdxCollateral
    from attest.verify.workload import PolicyFileError, WorkloadPolicy

    def unavailable(message: str) -> int:
        if args.json:
            print(json.dumps({"url": args.url, "verified": False, "unavailable": True, "error": message}))
        else:
            print(f"could not check {args.url or args.offline}: {message}", file=sys.stderr)
        return EXIT_UNAVAILABLE

    if (args.url is None) == (args.offline is None):
        raise ConfigError("give a server URL, or --offline FILE (one of them)")
    try:
        policy = None if args.policy is None else WorkloadPolicy.load(args.policy)
        collateral: dict[TeeKind, object] = {}
        if args.tdx_collateral is not None:
            collateral[TeeKind.TDX] = TdxCollateral.from_json(args.tdx_collateral.read_text())
        expect_model = args.expect_model
        expect_config = _digest(args.expect_config, "--expect-config")
    except (OSError, ValueError, PolicyFileError, ConfigError) as exc:
        return unavailable(f"cannot use the policy or collateral: {exc}")
    try:
        if args.offline is not None:
            bundle = VerificationBundle.from_json(json.loads(args.offline.read_text()))
        else:
            bundle = fetch_bundle(args.url)
            if args.save is not None:
                args.save.write_text(json.dumps(bundle.to_json(), indent=2) + "\n")
    except (VerificationUnavailable, OSError, ValueError) as exc:
        return unavailable(str(exc))
    except MalformedEvidence as exc:
        return unavailable(f"the server's answer is malformed: {exc}")
    url = bundle.url
    try:
        verified = verify_bundle(
            bundle,
            policy=policy,
            allow_unpinned_software=args.allow_unpinned_software,
            allow_insecure=args.allow_insecure_sample_tee,
            allow_no_tls=args.allow_no_tls,
            expected_model_digest=expect_model,
            expected_config_sha256=expect_config,
            collateral=collateral,
        )
    except ServerRefused as exc:
        if args.json:
            print(json.dumps({"url": url, **exc.verdict.to_json()}, indent=2))
        else:
            print_verdict(exc.verdict, url=url)
            print(f"enclave-serve verify: {exc}", file=sys.stderr)
        return EXIT_NOT_VERIFIED
    except Error as exc:
        return unavailable(str(exc))
    if args.json:
        print(json.dumps(verified.to_json(), indent=2))
    else:
        print_verdict(verified.verdict, url=url)
    return 0
