"""``enclave-serve kbs``: check a KBS setup (attest + fetch) and administer a KBS.

* ``kbs fetch RESOURCE_URI --url URL``: attest with this machine's TEE and fetch one resource.
* ``kbs set-resource`` / ``kbs set-resource-policy``: Trustee's ``kbs-client`` admin calls; they
  work against a real Trustee (admin JWT, rego policy) and against kbs-dev (random token, JSON).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from attest.tee.select import device_choices, primary_choices
from foundation.errors import ConfigError
from foundation.secret import SecretBytes
from runtime.config import KBS_DEADLINE_S

if TYPE_CHECKING:  # the key sources import the KBS client (jwcrypto), absent from a client-only install
    from attest.keysource.registry import KeySourceSpec

__all__ = ["add_parser", "fetch_spec", "run"]


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kbs`` and its subcommands."""
    parser = subparsers.add_parser(
        "kbs",
        help="check a Trustee KBS setup (attest and fetch a resource) and administer it",
        description="Talk to a Trustee KBS (or kbs-dev): fetch a resource as the enclave would, or upload "
        "resources and the resource policy with an admin token.",
    )
    sub = parser.add_subparsers(dest="kbs_command", required=True, metavar="SUBCOMMAND")

    fetch = sub.add_parser("fetch", help="attest with this machine's TEE and fetch one resource")
    fetch.add_argument("resource", metavar="RESOURCE_URI", help="e.g. kbs:///default/llama/key")
    _common(fetch)
    fetch.add_argument("--tee", choices=primary_choices(), default="auto", help="primary TEE")
    fetch.add_argument(
        "--allow-insecure-sample-tee",
        action="store_true",
        help="INSECURE: allow --tee sample (development only)",
    )
    fetch.add_argument(
        "--gpus",
        choices=device_choices(),
        default="none",
        help="device evidence to add (default none; 'sample' needs --allow-insecure-sample-tee)",
    )
    fetch.add_argument(
        "--tee-key", choices=["ec", "rsa"], default="ec", help="TEE key type (default ec P-256)"
    )
    fetch.add_argument(
        "--bearer", action="store_true", help="send the token as Authorization: Bearer instead of the cookie"
    )
    fetch.add_argument(
        "--deadline",
        type=float,
        default=KBS_DEADLINE_S,
        help=f"overall deadline in seconds ({KBS_DEADLINE_S:g}, as the boot's --kbs-deadline)",
    )
    fetch.add_argument(
        "-o", "--output", metavar="FILE", help="write the resource to FILE (mode 0600), or '-' for stdout"
    )
    fetch.add_argument(
        "--receipt", type=Path, metavar="FILE", help="write the key-release receipt JSON to FILE"
    )
    fetch.set_defaults(func=run)

    set_resource = sub.add_parser("set-resource", help="upload a resource (kbs-client set-resource)")
    _common(set_resource)
    _admin(set_resource)
    set_resource.add_argument("--path", required=True, help="repository/type/tag")
    set_resource.add_argument(
        "--resource-file", type=Path, required=True, help="file with the resource bytes"
    )
    set_resource.set_defaults(func=run)

    set_policy = sub.add_parser("set-resource-policy", help="replace the resource policy (kbs-client)")
    _common(set_policy)
    _admin(set_policy)
    set_policy.add_argument(
        "--policy-file", type=Path, required=True, help="rego (Trustee) or kbs-dev JSON policy file"
    )
    set_policy.set_defaults(func=run)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="KBS base URL, e.g. https://kbs.example:8080")
    parser.add_argument(
        "--cacert", type=Path, help="PEM CA certificate the KBS's TLS certificate must chain to"
    )


def _admin(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin-token-file", type=Path, required=True, help="file with the admin bearer token"
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc


def run(args: argparse.Namespace) -> int:
    """Dispatch the ``kbs`` subcommand.

    Raises:
        ConfigError: ``--url`` is not an http(s) base URL (named before any connection), or a file
            or resource path cannot be used.
    """
    from attest.kbs.http import check_base_url

    problem = check_base_url(args.url, what="KBS", setting="--url")
    if problem:
        raise ConfigError(problem)
    if args.kbs_command == "fetch":
        return _fetch(args)
    from attest.kbs.admin import KbsAdminClient

    token = SecretBytes(_read(args.admin_token_file, "the admin token file").strip())
    with KbsAdminClient(url=args.url, admin_token=token, cacert=args.cacert) as admin:
        if args.kbs_command == "set-resource":
            try:
                admin.set_resource(args.path, _read(args.resource_file, "the resource file"))
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
            print(f"resource {args.path} set on {admin.url}")
        else:
            admin.set_resource_policy(_read(args.policy_file, "the policy file"))
            print(f"resource policy set on {admin.url}")
    return 0


def fetch_spec(args: argparse.Namespace) -> KeySourceSpec:
    """The key source ``kbs fetch``'s flags name: the one the boot builds from the same settings
    (:func:`runtime.boot.key_source_spec`), by the same factory (:func:`attest.keysource.key_source_for`)."""
    from attest.keysource.registry import KeySourceSpec

    return KeySourceSpec.kbs(
        args.url,
        cacert=args.cacert,
        tee_key="rsa" if args.tee_key == "rsa" else "ec",
        token_transport="bearer" if args.bearer else "cookie",
        deadline_s=args.deadline,
    )


def _fetch(args: argparse.Namespace) -> int:
    from attest.keysource import key_source_for
    from attest.tee.select import detect_devices, select_attester
    from foundation.resource import ResourceUri

    try:
        resource = ResourceUri.parse(args.resource)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    attester = select_attester(args.tee, allow_insecure=args.allow_insecure_sample_tee)
    devices = detect_devices(gpus=args.gpus, allow_insecure=args.allow_insecure_sample_tee)
    source = key_source_for(fetch_spec(args), attester=attester, devices=devices)
    try:
        release = source.fetch(resource)
    finally:
        source.close()
    data = release.secret.reveal()
    if args.output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    elif args.output:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
    receipt = release.to_json()
    if args.receipt is not None:
        args.receipt.write_text(json.dumps(receipt, indent=2) + "\n")
    if args.output != "-":
        # A short fingerprint lets operators compare with what they uploaded; the bytes stay out.
        fingerprint = hashlib.sha256(data).hexdigest()[:16]
        print(
            f"fetched {resource} ({len(data)} bytes, sha256 {fingerprint}…)"
            + (f" -> {args.output}" if args.output else "; use -o FILE to save it")
        )
        print(json.dumps(receipt, indent=2))
    release.secret.wipe()
    return 0
