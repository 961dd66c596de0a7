"""``enclave-serve image-facts``: print the software this image runs, as an init-data declares it.

Run inside the image (the image build records the output); give the file to ``enclave-serve
initdata --image-facts FILE`` so the provider's init-data declares exactly what the image runs.
"""

from __future__ import annotations

import argparse
import json

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "image-facts",
        help="print the software this image runs (enclave-serve, vLLM, PyTorch, Python) and the attested "
        "variables its environment sets, for 'initdata --image-facts'",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from runtime.facts import image_environment, runtime_versions

    print(json.dumps({**runtime_versions(), "environment": image_environment()}, indent=2))
    return 0
