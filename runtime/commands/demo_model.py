"""``enclave-serve demo-model``: build the tiny random-weight Llama offline."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "demo-model",
        help="build a tiny random-weight Llama (plaintext safetensors) for demos and tests",
        description="Build a tiny Llama (head_dim 64, local BPE tokenizer, chat template); no hub access.",
    )
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    p.add_argument("--force", action="store_true", help="replace an existing directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from runtime.demo_model import build_demo_model

    out = build_demo_model(args.out, seed=args.seed, overwrite=args.force)
    print(out)
    return 0
