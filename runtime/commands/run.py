"""``enclave-serve run``: the enclave entrypoint (attest, fetch the key, decrypt, serve).

Its options are derived from :class:`runtime.config.RunConfig`'s declarations
(:mod:`runtime.settings`). In a TDX or SNP guest every attested setting comes from the init-data
(``--init-data``); the command line may only repeat a declared value or set an operational one.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.seams import BootSeams

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from runtime.settings import add_arguments

    p = sub.add_parser(
        "run",
        help="boot the enclave: attest, fetch the model key, decrypt the model, serve the OpenAI API",
        usage="enclave-serve run [MODEL] [--init-data FILE] [options] [-- VLLM_ARGS...]",
        description=(
            "Boot the enclave and serve. With --init-data, every attested setting, the model and the "
            "vLLM options come from the init-data (docs/configuration.md); options may only repeat "
            "them or set operational ones. Arguments after '--' go to vLLM "
            "(e.g. -- --max-model-len 4096 --enforce-eager)."
        ),
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        nargs="?",
        default=None,
        help="encrypted model directory (enclave-serve pack), or an encrypted OCI image pinned by digest: "
        "oci:LAYOUT_DIR@sha256:DIGEST or docker://HOST/REPO@sha256:DIGEST (default: the init-data's)",
    )
    add_arguments(p)
    p.add_argument(
        "--print-config",
        action="store_true",
        help="run only the config stage: print the run configuration this boot would attest "
        "(canonical JSON on stdout, 'config sha256:<hex>' on stderr) and exit",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace, *, seams: BootSeams | None = None) -> int:
    """Boot and serve (or, with ``--print-config``, print the configuration and exit).

    ``seams``: the attester and key-source factories (None: production's; the end-to-end suite's
    runtime double passes its own).
    """
    from runtime.boot import RunRequest, run_blocking
    from runtime.settings import given_settings

    given = given_settings(args)
    if "tls_hostnames" not in given:
        host = given.get("host", "127.0.0.1")
        given["tls_hostnames"] = tuple(dict.fromkeys(("localhost", "127.0.0.1", host)))
    request = RunRequest(given=given)
    if args.print_config:
        from runtime.boot import print_configuration

        configuration = print_configuration(request)
        sys.stdout.buffer.write(configuration.raw + b"\n")
        sys.stdout.flush()
        print(f"config sha256:{configuration.sha256}", file=sys.stderr)
        return 0
    return run_blocking(request, seams=seams)
