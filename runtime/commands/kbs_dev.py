"""``enclave-serve kbs-dev``: run the development KBS (Trustee's RCAR protocol, in memory)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from attest.binding import HashAlgorithm
from foundation.errors import ConfigError
from foundation.secret import SecretBytes

if TYPE_CHECKING:
    from attest.verify.workload import WorkloadPolicy

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``kbs-dev`` subcommand."""
    parser = subparsers.add_parser(
        "kbs-dev",
        help="run a development Key Broker Service (Trustee RCAR 0.4.0; demos and tests only)",
        description=(
            "A development KBS speaking Trustee's RCAR protocol 0.4.0, with an admin API compatible "
            "with kbs-client. State is in memory. See docs/kbs.md for how it differs from Trustee."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=8080, help="listen port; 0 picks a free one (default 8080)"
    )
    parser.add_argument(
        "--admin-token-file",
        type=Path,
        required=True,
        help="file holding the admin bearer token (>= 16 chars)",
    )
    parser.add_argument(
        "--allow-insecure-sample-evidence",
        action="store_true",
        help="INSECURE: release resources to the sample TEE (evidence signed by nothing)",
    )
    parser.add_argument("--tls-cert", type=Path, help="serve HTTPS with this PEM certificate (chain)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument(
        "--resource",
        action="append",
        default=[],
        metavar="REPO/TYPE/TAG=FILE",
        help="preload a resource from a file (repeatable)",
    )
    parser.add_argument(
        "--policy-file", type=Path, help="initial resource policy (kbs-dev JSON, docs/kbs.md)"
    )
    parser.add_argument(
        "--resource-policy",
        action="append",
        default=[],
        metavar="REPO/TYPE/TAG=POLICY_FILE",
        help="release this resource only to evidence that satisfies the workload policy "
        "(TOML, docs/policy.md: the only way to pin measurements, init-data and software); repeatable",
    )
    parser.add_argument(
        "--session-timeout", type=float, default=300.0, help="session lifetime, seconds (300)"
    )
    parser.add_argument("--token-lifetime", type=float, default=300.0, help="token lifetime, seconds (300)")
    parser.add_argument(
        "--hash-algorithm",
        choices=[h.value for h in HashAlgorithm],
        default=HashAlgorithm.SHA384.value,
        help="runtime-data hash to select (sha384, as Trustee's built-in AS)",
    )
    parser.set_defaults(func=run)


def _read_admin_token(path: Path) -> SecretBytes:
    try:
        token = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the admin token file {path}: {exc.strerror}") from exc
    if len(token) < 16 or b" " in token:
        raise ConfigError(f"the admin token in {path} must be at least 16 characters, without spaces")
    return SecretBytes(token)


def _read_resources(specs: list[str]) -> dict[str, bytes]:
    from foundation.resource import validate_resource_path

    resources: dict[str, bytes] = {}
    for spec in specs:
        path, sep, file = spec.partition("=")
        if not sep or not file:
            raise ConfigError(f"--resource {spec!r}: expected REPO/TYPE/TAG=FILE")
        try:
            validate_resource_path(path)
            resources[path] = Path(file).read_bytes()
        except ValueError as exc:
            raise ConfigError(f"--resource {spec!r}: {exc}") from exc
        except OSError as exc:
            raise ConfigError(f"--resource {spec!r}: cannot read {file}: {exc.strerror}") from exc
    return resources


def _read_workload_policies(specs: list[str]) -> dict[str, WorkloadPolicy]:
    from attest.verify.workload import PolicyFileError, WorkloadPolicy
    from foundation.resource import validate_resource_path

    policies: dict[str, WorkloadPolicy] = {}
    for spec in specs:
        path, sep, file = spec.partition("=")
        if not sep or not file:
            raise ConfigError(f"--resource-policy {spec!r}: expected REPO/TYPE/TAG=POLICY_FILE")
        try:
            validate_resource_path(path)
            policies[path] = WorkloadPolicy.load(Path(file))
        except PolicyFileError as exc:
            raise ConfigError(f"--resource-policy {spec!r}: {exc}") from exc
        except ValueError as exc:
            raise ConfigError(f"--resource-policy {spec!r}: {exc}") from exc
    return policies


def run(args: argparse.Namespace) -> int:
    """Start kbs-dev and serve until interrupted."""
    from attest.kbs.dev.appraisal import EvidenceAppraiser
    from attest.kbs.dev.policy import ResourcePolicy
    from attest.kbs.dev.server import DevKbsConfig, ResourceStore, serve

    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    policy = None
    if args.policy_file is not None:
        try:
            policy = ResourcePolicy.from_json(args.policy_file.read_bytes())
        except OSError as exc:
            raise ConfigError(f"cannot read {args.policy_file}: {exc.strerror}") from exc
        except ValueError as exc:
            raise ConfigError(f"{args.policy_file}: {exc}") from exc
    try:
        config = DevKbsConfig(
            admin_token=_read_admin_token(args.admin_token_file),
            resources=ResourceStore(_read_resources(args.resource)),
            policy=policy,
            allow_insecure_sample_evidence=args.allow_insecure_sample_evidence,
            appraiser=EvidenceAppraiser(),
            hash_algorithm=HashAlgorithm(args.hash_algorithm),
            session_timeout_s=args.session_timeout,
            token_lifetime_s=args.token_lifetime,
            workload_policies=_read_workload_policies(args.resource_policy),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    scheme = "https" if args.tls_cert else "http"
    sample = (
        "sample evidence ALLOWED (insecure)"
        if args.allow_insecure_sample_evidence
        else "sample evidence refused"
    )
    preloaded = len(config.resources.paths())

    def ready(host: str, port: int) -> None:
        shown = f"[{host}]" if ":" in host else host
        print(
            f"kbs-dev ready on {scheme}://{shown}:{port} (protocol 0.4.0; {preloaded} resource(s); {sample})",
            flush=True,
        )

    if args.allow_insecure_sample_evidence:
        print(
            "kbs-dev: WARNING: --allow-insecure-sample-evidence releases keys to unsigned evidence",
            file=sys.stderr,
        )
    stopped_by = serve(
        config, host=args.host, port=args.port, tls_cert=args.tls_cert, tls_key=args.tls_key, on_ready=ready
    )
    if stopped_by is not None:
        print(f"kbs-dev stopped on {stopped_by}", flush=True)
    return 0  # a requested stop
