"""``enclave-serve verify URL --policy FILE``: check a running server before trusting it.

Prints every step with ✓ or ✗ and its reason (``--json``: one object) and exits

* 0: verified;
* 1: not verified (a step failed, or no policy was given);
* 2: could not check (the server is unreachable or answers an error, unusable collateral or
  policy file).

``--replicas N`` opens up to N fresh connections (a load balancer spreads them over replicas),
verifies every distinct replica (by TLS key) they reach over its own connection, and prints one
line per replica: its TLS key's SPKI sha256 (hex, and base64 for ``curl --pinnedpubkey``), the
verdict, the model and the configuration; exit 1 if any reached replica is not verified.

``--save FILE`` keeps what was fetched; ``--offline FILE`` verifies a saved bundle again. The
nonce is the one used when it was fetched, so it proves freshness only as of then: offline, the
document's age (its ``issued_at``, by the enclave's clock) is printed and a document older than
``--max-age`` (default 300 s, the verifier's bound on an unchallenged document) is refused
(exit 1). Nothing binds a saved bundle to the URL it names, nor its recorded TLS key to a
connection (anyone can rewrite those), so offline output says "URL not verified" and never
"verified: <url>".
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from attest.client.verifier import Replica, Verifier

__all__ = [
    "DEFAULT_OFFLINE_MAX_AGE_S",
    "EXIT_NOT_VERIFIED",
    "EXIT_UNAVAILABLE",
    "add_parser",
    "add_verifier_arguments",
    "parse_duration",
    "print_replicas",
    "print_verdict",
    "run",
    "verifier_from_args",
]

EXIT_NOT_VERIFIED = 1
EXIT_UNAVAILABLE = 2
#: ``--max-age`` by default: the bound the verifier puts on an unchallenged (nonce-less) document
#: (``AttestationDocument.check_binding``), the online path's only age rule.
DEFAULT_OFFLINE_MAX_AGE_S = 300

_DURATION = re.compile(r"(\d+)\s*(s|m|min|h|d)?")
_UNITS = {None: 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "verify",
        help="verify a running server against a policy: hardware, TLS binding, software, model",
        description="Fetch a fresh attestation document with a random nonce and verify it step by step "
        "against a workload policy (docs/policy.md). Exit 0 verified, 1 not verified, 2 could not check.",
    )
    p.add_argument("url", nargs="?", help="server base URL, e.g. https://127.0.0.1:8000")
    add_verifier_arguments(p)
    p.add_argument(
        "--allow-no-tls",
        action="store_true",
        help="DEVELOPMENT ONLY: accept a plain-HTTP server (attestation not bound to TLS)",
    )
    p.add_argument(
        "--replicas",
        type=int,
        metavar="N",
        help="open up to N fresh connections and verify every distinct replica (TLS key) they reach, "
        "one line each; exit 1 if any reached replica is not verified",
    )
    p.add_argument("--save", type=Path, metavar="FILE", help="save what was fetched, for --offline")
    p.add_argument("--offline", type=Path, metavar="FILE", help="verify a bundle saved with --save")
    p.add_argument(
        "--max-age",
        metavar="DURATION",
        help="with --offline: refuse a document issued longer ago than this, by its issued_at (seconds, "
        f"or with s, m, h, d; default {DEFAULT_OFFLINE_MAX_AGE_S} s)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def add_verifier_arguments(p: argparse.ArgumentParser) -> None:
    """Add the options a :class:`~attest.client.verifier.Verifier` is built from (``verify``, ``proxy``)."""
    from runtime.collateral import add_collateral_arguments

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
    p.add_argument("--expect-model", metavar="DIGEST", help="also require this model (sha256:...)")
    p.add_argument(
        "--expect-config", metavar="DIGEST", help="also require this run configuration (sha256:...)"
    )
    add_collateral_arguments(p)


def _verification_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of a verification the options of :func:`add_verifier_arguments` say.

    Raises:
        ConfigError: the policy or collateral file cannot be used, or a digest is malformed.
    """
    from attest.evidence import TeeKind
    from attest.verify.workload import PolicyFileError, WorkloadPolicy
    from foundation.errors import ConfigError
    from runtime.collateral import collateral_files, typed_collateral

    try:
        policy = None if args.policy is None else WorkloadPolicy.load(args.policy)
        files = collateral_files(args.collateral, {TeeKind.TDX: args.tdx_collateral})
        collateral = typed_collateral(files)
        expect_config = _digest(args.expect_config, "--expect-config")
    except (OSError, ValueError, PolicyFileError, ConfigError) as exc:
        raise ConfigError(f"cannot use the policy or collateral: {exc}") from exc
    return {
        "policy": policy,
        "allow_unpinned_software": args.allow_unpinned_software,
        "allow_insecure": args.allow_insecure_sample_tee,
        "expected_model_digest": args.expect_model,
        "expected_config_sha256": expect_config,
        "collateral": collateral,
    }


def verifier_from_args(args: argparse.Namespace) -> Verifier:
    """Build the :class:`~attest.client.verifier.Verifier` the options of :func:`add_verifier_arguments` say.

    Raises:
        ConfigError: the policy or collateral file cannot be used, or a digest is malformed.
    """
    from attest.client.verifier import Verifier

    return Verifier(**_verification_options(args))


def print_verdict(verdict: object, *, url: str, out: object = None, offline: Path | None = None) -> None:
    """Print a :class:`~attest.client.verdict.Verdict` as ✓/✗ lines.

    With ``offline`` (the saved bundle's path) the first line names the file, not ``url``, and
    the second says the URL is not verified.
    """
    from attest.client.verdict import Verdict

    assert isinstance(verdict, Verdict)
    stream = out if out is not None else sys.stdout
    width = max((len(s.name) for s in verdict.steps), default=8)
    outcome = "verified" if verdict.ok else "NOT VERIFIED"
    if offline is None:
        print(f"{outcome}: {url}", file=stream)  # type: ignore[arg-type]
    else:
        print(f"{outcome} offline: {offline}", file=stream)  # type: ignore[arg-type]
        print(
            f"  URL not verified: the bundle names {url}, but nothing binds a saved document to a URL "
            "or to a TLS connection",
            file=stream,  # type: ignore[arg-type]
        )
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


def parse_duration(value: str, flag: str) -> int:
    """Seconds from ``300``, ``300s``, ``5m``, ``12h`` or ``400d``.

    Raises:
        ConfigError: anything else, or zero.
    """
    from foundation.errors import ConfigError

    match = _DURATION.fullmatch(value.strip())
    seconds = 0 if match is None else int(match[1]) * _UNITS[match[2]]
    if seconds <= 0:
        raise ConfigError(f"{flag} must be a positive number of seconds, or one with s, m, h or d (e.g. 30d)")
    return seconds


def _digest(value: str | None, flag: str) -> str | None:
    from foundation.errors import ConfigError

    if value is None:
        return None
    hexpart = value.removeprefix("sha256:")
    if len(hexpart) != 64 or hexpart.strip("0123456789abcdef"):
        raise ConfigError(f"{flag} must be sha256: followed by 64 lowercase hex digits")
    return hexpart


def run(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from attest.client.remote import VerificationBundle, fetch_bundle, server_base_url, verify_bundle
    from attest.client.verdict import ServerRefused, Verdict
    from foundation.errors import ConfigError, Error, MalformedEvidence, VerificationUnavailable

    def unavailable(message: str) -> int:
        if args.json:
            print(json.dumps({"url": args.url, "verified": False, "unavailable": True, "error": message}))
        else:
            print(f"could not check {args.url or args.offline}: {message}", file=sys.stderr)
        return EXIT_UNAVAILABLE

    if args.replicas is not None:
        return _run_replicas(args)
    if (args.url is None) == (args.offline is None):
        raise ConfigError("give a server URL, or --offline FILE (one of them)")
    if args.max_age is not None and args.offline is None:
        raise ConfigError(
            "--max-age applies to --offline only: online, the fresh nonce the verifier sends proves freshness"
        )
    max_age_s = None
    if args.offline is not None:
        max_age_s = DEFAULT_OFFLINE_MAX_AGE_S
        if args.max_age is not None:
            max_age_s = parse_duration(args.max_age, "--max-age")
    now = time.time()
    try:
        options = _verification_options(args)
    except ConfigError as exc:
        return unavailable(str(exc))

    def refused(exc: ServerRefused, url: str) -> int:
        if args.json:
            print(json.dumps({"url": url, **offline_json(exc.verdict), **exc.verdict.to_json()}, indent=2))
        else:
            print_verdict(exc.verdict, url=url, offline=args.offline)
            print(f"enclave-serve verify: {exc.cli_message}", file=sys.stderr)
        return EXIT_NOT_VERIFIED

    def offline_json(verdict: Verdict) -> dict[str, object]:
        # A saved bundle's URL is whatever the file says; its age is the document's own.
        if args.offline is None:
            return {}
        document = verdict.document
        return {
            "offline": str(args.offline),
            "url_verified": False,
            "age_s": None if document is None else int(now - document.claims.issued_at),
            "max_age_s": max_age_s,
        }

    try:
        if args.offline is not None:
            bundle = VerificationBundle.from_json(json.loads(args.offline.read_text()))
        else:
            bundle = fetch_bundle(args.url)
            if args.save is not None:
                args.save.write_text(json.dumps(bundle.to_json(), indent=2) + "\n")
    except ServerRefused as exc:  # reachable, but not an enclave (no attestation route)
        return refused(exc, server_base_url(args.url))
    except (VerificationUnavailable, OSError, ValueError) as exc:
        return unavailable(str(exc))
    except MalformedEvidence as exc:
        return unavailable(f"the server's answer is malformed: {exc}")
    url = bundle.url

    try:
        verified = verify_bundle(
            bundle,
            **options,
            allow_no_tls=args.allow_no_tls,
            now=datetime.fromtimestamp(now, UTC),
            max_age_s=max_age_s,
        )
    except ServerRefused as exc:
        return refused(exc, url)
    except Error as exc:
        return unavailable(str(exc))
    if args.json:
        print(json.dumps({**verified.to_json(), **offline_json(verified.verdict)}, indent=2))
    else:
        print_verdict(verified.verdict, url=url, offline=args.offline)
    return 0


def print_replicas(replicas: list[Replica], *, url: str, connections: int, out: object = None) -> None:
    """Print one line per replica: SPKI sha256 (hex and base64), verdict, model, configuration."""
    import base64

    stream = out if out is not None else sys.stdout
    print(f"replicas behind {url}: {len(replicas)} distinct in {connections} connection(s)", file=stream)  # type: ignore[arg-type]
    for replica in replicas:
        spki = replica.spki_sha256 or "-" * 64
        pin = "-" if replica.spki_sha256 is None else base64.b64encode(bytes.fromhex(spki)).decode()
        verdict = replica.verdict
        claims = None if verdict is None or verdict.document is None else verdict.document.claims
        if replica.ok:
            outcome = "verified"
        elif verdict is not None:
            outcome = "NOT VERIFIED (" + ", ".join(s.name for s in verdict.failures) + ")"
        else:
            outcome = f"COULD NOT CHECK ({_cli_text(replica.error)})"
        model = "-" if claims is None else claims.model_digest
        config = "-" if claims is None else f"sha256:{claims.config_sha256}"
        print(f"{spki}  sha256//{pin}  {outcome}  model {model}  config {config}", file=stream)  # type: ignore[arg-type]
        if not replica.ok and verdict is not None:
            for step in verdict.failures:
                print(f"  ✗ {step.name}  {step.detail}", file=stream)  # type: ignore[arg-type]


def _run_replicas(args: argparse.Namespace) -> int:
    import httpx

    from attest.client.transport import probe
    from attest.client.verdict import ServerRefused
    from foundation.errors import ConfigError, Error

    if args.url is None or args.replicas < 1:
        raise ConfigError("--replicas N needs a server URL and N of at least 1")
    for flag, value in (
        ("--offline", args.offline),
        ("--save", args.save),
        ("--allow-no-tls", args.allow_no_tls),
        ("--max-age", args.max_age),
    ):
        if value:
            raise ConfigError(f"--replicas verifies each TLS connection: {flag} does not apply")
    try:
        verifier = verifier_from_args(args)
    except ConfigError as exc:
        print(f"could not check {args.url}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    seen: dict[str, Replica] = {}
    unreachable: list[str] = []
    for n in range(args.replicas):
        try:
            replica = probe(verifier, args.url)
        except (httpx.TransportError, Error) as exc:
            unreachable.append(str(exc))
            continue
        seen.setdefault(replica.spki_sha256 or f"no-tls-{n}", replica)
    replicas = list(seen.values())
    if args.json:
        print(
            json.dumps(
                {
                    "url": args.url,
                    "connections": args.replicas,
                    "unreachable": unreachable,
                    "replicas": [
                        {
                            "tls_spki_sha256": r.spki_sha256,
                            "verified": r.ok,
                            "error": None if r.error is None else _cli_text(r.error),
                            **({} if r.verdict is None else {"verdict": r.verdict.to_json()}),
                        }
                        for r in replicas
                    ],
                },
                indent=2,
            )
        )
    else:
        print_replicas(replicas, url=args.url, connections=args.replicas)
        for message in dict.fromkeys(unreachable):
            print(f"could not connect: {message}", file=sys.stderr)
    if not replicas:
        return EXIT_UNAVAILABLE
    if any(isinstance(r.error, ServerRefused) for r in replicas):
        return EXIT_NOT_VERIFIED
    return 0 if all(r.ok for r in replicas) else EXIT_UNAVAILABLE


def _cli_text(error: object) -> str:
    """An error's text with the command line's flags (a refusal's ``str()`` names Python's arguments)."""
    cli_message = getattr(error, "cli_message", None)
    return cli_message if isinstance(cli_message, str) else str(error)
