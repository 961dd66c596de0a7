"""``--collateral TEE=FILE``: one option for every TEE whose verifier takes collateral.

The TEEs and what each file holds come from the registry (:mod:`attest.tee`): ``tdx=FILE`` is DCAP
collateral (dcap-qvl JSON), ``snp=FILE`` a VCEK or VLEK (DER or PEM). ``run``, ``verify`` and
``policy record`` take it; ``--tdx-collateral FILE`` stays as an alias of ``--collateral tdx=FILE``
(and ``run --snp-vcek FILE`` of ``--collateral snp=FILE``). A collateral file is never trusted as
given: its verifier checks it against its own signatures when it uses it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from pathlib import Path

from attest.evidence import TeeKind
from attest.tee import BACKENDS, kinds
from foundation.errors import ConfigError, MalformedEvidence

__all__ = [
    "COLLATERAL_HELP",
    "add_collateral_arguments",
    "collateral_files",
    "collateral_json",
    "parse_collateral",
    "typed_collateral",
]

#: ``--collateral``'s help, from the backends that take collateral.
COLLATERAL_HELP = (
    "collateral for a TEE's verifier, TEE=FILE; repeat for each TEE ("
    + "; ".join(f"{b.name}: {b.collateral.what}" for b in BACKENDS.values() if b.collateral is not None)
    + ")"
)


def parse_collateral(text: str) -> tuple[TeeKind, Path]:
    """Parse one ``TEE=FILE``.

    Raises:
        ConfigError: no ``=``, or a TEE whose verifier takes no collateral.
    """
    name, sep, path = text.partition("=")
    choices = kinds(collateral=True)
    if not sep or not path:
        raise ConfigError(f"--collateral {text!r}: expected TEE=FILE with TEE one of {', '.join(choices)}")
    if name not in choices:
        raise ConfigError(f"--collateral {text!r}: {name!r} is not one of {', '.join(choices)}")
    return TeeKind(name), Path(path)


def _argparse_type(text: str) -> tuple[TeeKind, Path]:
    try:
        return parse_collateral(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_collateral_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add ``--collateral TEE=FILE`` (repeatable) and its alias ``--tdx-collateral FILE``."""
    parser.add_argument(
        "--collateral",
        type=_argparse_type,
        action="append",
        default=[],
        metavar="TEE=FILE",
        help=COLLATERAL_HELP,
    )
    parser.add_argument(
        "--tdx-collateral",
        type=Path,
        metavar="FILE",
        help="DCAP collateral (dcap-qvl JSON) for TDX; the same as --collateral tdx=FILE",
    )


def collateral_files(
    given: Iterable[tuple[TeeKind, Path]], aliases: Mapping[TeeKind, Path | None] | None = None
) -> dict[TeeKind, Path]:
    """Merge ``--collateral`` items with the alias options (``--tdx-collateral``, ``--snp-vcek``).

    Raises:
        ConfigError: one TEE is given two files.
    """
    files: dict[TeeKind, Path] = {}
    for tee, path in [*given, *((t, p) for t, p in (aliases or {}).items() if p is not None)]:
        if tee in files and files[tee] != path:
            raise ConfigError(f"two collateral files for {tee.value}: {files[tee]} and {path}")
        files[tee] = path
    return files


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the collateral file: {exc}") from None


def typed_collateral(files: Mapping[TeeKind, Path]) -> dict[TeeKind, object]:
    """Read every file and type it for its TEE's verifier.

    Raises:
        ConfigError: a file cannot be read or is not its TEE's collateral.
    """
    typed: dict[TeeKind, object] = {}
    for tee, path in files.items():
        try:
            typed[tee] = BACKENDS[tee].typed_collateral(_read(path), source=path)
        except MalformedEvidence as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    return typed


def collateral_json(files: Mapping[TeeKind, Path]) -> dict[str, object]:
    """Read every file as the JSON item an attestation document carries under ``collateral``.

    Raises:
        ConfigError: a file cannot be read or is not its TEE's collateral.
    """
    out: dict[str, object] = {}
    for tee, path in files.items():
        collateral = BACKENDS[tee].collateral
        assert collateral is not None  # parse_collateral admits only TEEs that take collateral
        try:
            out[tee.value] = collateral.file_to_json(_read(path))
        except MalformedEvidence as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    return out
