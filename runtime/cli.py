"""The ``enclave-serve`` command line: thin, it turns an :class:`foundation.errors.Error` into its
message and an exit code. Each subcommand lives in ``runtime/commands/<name>.py`` and exposes
``add_parser(subparsers)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import re
import signal
import sys
from collections.abc import Sequence

from foundation.errors import Error
from foundation.logs import configure_logging
from foundation.secret import protect_process_memory

__all__ = ["build_parser", "main", "version"]

# A process spawned by vLLM (its engine core and workers: multiprocessing's spawn runs
# ``python -c 'from multiprocessing.spawn import spawn_main; ...' --multiprocessing-fork``) imports
# the parent's main module, and so this one, *before* it unpickles its process object, which
# carries the key handoff capabilities: become non-dumpable first. (The loader plugin does it
# again later; that is too late for the unpickling.)
# Ctrl-C in a terminal signals the whole process group: the runtime stops the boot and kills
# vLLM's processes itself (runtime.boot), so a child still importing ignores SIGINT instead of
# printing a KeyboardInterrupt traceback (vLLM's engine core installs its own handler later).
if "--multiprocessing-fork" in sys.orig_argv:  # sys.argv is the parent's by then
    protect_process_memory()
    signal.signal(signal.SIGINT, signal.SIG_IGN)

#: Subcommand modules, in the order ``--help`` lists them.
COMMANDS = (
    "run",
    "demo_model",
    "pack",
    "kbs_dev",
    "kbs",
    "verify",
    "proxy",
    "policy",
    "initdata",
    "deploy",
    "image_facts",
    "measure",
    "evidence",
    "inspect",
)

EXIT_ERROR = 1
EXIT_USAGE = 2


#: A reST literal (````--nonce````) in a docstring used as help text: shown as ``'--nonce'``.
_REST_LITERAL = re.compile(r"``(.+?)``", re.DOTALL)


def version() -> str:
    """The installed enclave-serve's version (``unknown`` when run from a source tree)."""
    try:
        return importlib.metadata.version("enclave-serve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _plain(text: str | None) -> str | None:
    return None if text is None else _REST_LITERAL.sub(r"'\1'", text)


def _finish(parser: argparse.ArgumentParser, summary: str | None = None) -> None:
    """Walk ``parser`` and its subcommands: plain-text help, a description everywhere, and each
    parser recorded as the one whose usage an error of its arguments shows."""
    parser.description = _plain(parser.description) or (
        summary[:1].upper() + summary[1:] + "." if summary else None
    )
    parser.epilog = _plain(parser.epilog)
    parser.set_defaults(_usage_parser=parser)
    for action in parser._actions:
        if isinstance(action.help, str):
            action.help = _plain(action.help)
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                _finish(sub, helps.get(name))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enclave-serve",
        description="Confidential LLM inference: attest, fetch the model key, decrypt, serve.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"enclave-serve {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"runtime.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"runtime.commands.{name}":
                continue  # command not built yet
            raise
        module.add_parser(sub)
    _finish(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first "--" is passed through untouched (``run`` hands it to vLLM).
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # name them with the usage of the (sub)command they were given to
        usage: argparse.ArgumentParser = getattr(args, "_usage_parser", parser)
        if argv.index(unknown[0]) < argv.index(args.command):  # before the command: the top level's
            usage = parser
        usage.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.passthrough = passthrough
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    configure_logging(verbose=args.verbose, json_lines=getattr(args, "log_format", "text") == "json")
    if not args.verbose:
        # Request lines from the HTTP client library are noise for a command-line user.
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        code: int = args.func(args)
    except Error as exc:
        print(f"enclave-serve {args.command}: {exc.diagnostics()}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into e.g. `head`: not an error; keep Python from complaining at exit.
        sys.stderr.close()
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
