"""``enclave-serve verify URL``: check a running server's attestation before trusting it."""

from __future__ import annotations

import argparse
import json

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
        "--allow-insecure-sample-tee",
        action="store_true",
        help="DEVELOPMENT ONLY: accept the sample TEE (its evidence proves nothing)",
    )
    p.add_argument(
        "--allow-no-tls",
        action="store_true",
        help="DEVELOPMENT ONLY: accept a plain-HTTP server (attestation not bound to TLS)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from attest.errors import Error
    from attest.remote import verify_server

    try:
        verified = verify_server(
            args.url,
            expected_model_digest=args.expect_model,
            allow_insecure=args.allow_insecure_sample_tee,
            allow_no_tls=args.allow_no_tls,
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
    print(f"  tee          {claims.tee.value}{' (INSECURE: development only)' if claims.insecure else ''}")
    if verified.tls_spki_sha256:
        print(f"  pin TLS key  sha256 SPKI {verified.tls_spki_sha256}")
    return 0
