"""The ``enclave-serve`` command line: thin, it turns an :class:`attest.errors.Error` into its
message and an exit code. Each subcommand lives in ``runtime/commands/<name>.py`` and exposes
``add_parser(subparsers)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from attest.errors import Error

__all__ = ["main"]

#: Subcommand modules, in the order ``--help`` lists them.
COMMANDS = (
    "run",
    "demo_model",
    "pack",
    "kbs_dev",
    "kbs",
    "verify",
    "evidence",
    "inspect",
)

EXIT_ERROR = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enclave-serve",
        description="Confidential LLM inference: attest, fetch the model key, decrypt, serve.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"runtime.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"runtime.commands.{name}":
                continue  # command not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = args.func(args)
    except Error as exc:
        print(f"enclave-serve {args.command}: {exc.diagnostics()}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
