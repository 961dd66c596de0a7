"""One vocabulary for the user side's options: each as the Python argument and as the CLI flag.

Messages are written once. The verification steps (and the docs that show them) name the
command line's flags, the words ``enclave-serve verify`` prints; a Python caller passes keyword
arguments instead, so what the Python API raises is rendered with :func:`for_python`
(``--allow-insecure-sample-tee`` becomes ``allow_insecure=True``). :func:`for_cli` renders the
other way. Both are pure and exact inverses on the vocabulary below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["CLIENT_OPTIONS", "ClientOption", "for_cli", "for_python"]


@dataclass(frozen=True, slots=True)
class ClientOption:
    """One option of the user side: its CLI spelling and its Python spelling."""

    flag: str
    argument: str


#: Longest spelling first, so that ``--policy FILE`` is rendered before ``--policy``.
CLIENT_OPTIONS: tuple[ClientOption, ...] = (
    ClientOption("--allow-insecure-sample-tee", "allow_insecure=True"),
    ClientOption("--allow-unpinned-software", "allow_unpinned_software=True"),
    ClientOption("--allow-no-tls", "allow_no_tls=True"),
    ClientOption("--policy FILE", "policy=WorkloadPolicy.load(FILE)"),
    ClientOption("--collateral tdx=FILE", "collateral={TeeKind.TDX: TdxCollateral}"),
    ClientOption("--collateral snp=FILE", "collateral={TeeKind.SNP: SnpCollateral}"),
    ClientOption("--max-age", "max_age_s"),
    ClientOption("--expect-model", "expected_model_digest"),
    ClientOption("--expect-config", "expected_config_sha256"),
)


def _pattern(words: list[str]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(w) for w in words)
    return re.compile(rf"(?<![\w=-])(?:{alternatives})(?![\w-])")


_TO_PYTHON = {o.flag: o.argument for o in CLIENT_OPTIONS}
_TO_CLI = {o.argument: o.flag for o in CLIENT_OPTIONS}
_FLAGS = _pattern(list(_TO_PYTHON))
_ARGUMENTS = _pattern(sorted(_TO_CLI, key=len, reverse=True))


def for_python(text: str) -> str:
    """Return ``text`` with every CLI flag of the vocabulary replaced by its Python argument."""
    return _FLAGS.sub(lambda m: _TO_PYTHON[m.group(0)], text)


def for_cli(text: str) -> str:
    """Return ``text`` with every Python argument of the vocabulary replaced by its CLI flag."""
    return _ARGUMENTS.sub(lambda m: _TO_CLI[m.group(0)], text)
