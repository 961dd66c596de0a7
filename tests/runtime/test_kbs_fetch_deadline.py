"""One KBS deadline default: ``kbs fetch --deadline`` and the boot's ``--kbs-deadline`` agree."""

from __future__ import annotations

from runtime.cli import build_parser
from runtime.commands.kbs import fetch_spec
from runtime.config import KBS_DEADLINE_S, RunConfig


def _fetch_args(*extra: str) -> list[str]:
    return ["kbs", "fetch", "kbs:///default/llama/key", "--url", "http://127.0.0.1:1", *extra]


def test_kbs_fetch_defaults_to_the_boots_key_release_deadline() -> None:
    args = build_parser().parse_args(_fetch_args())
    assert args.deadline == RunConfig().kbs_deadline_s == KBS_DEADLINE_S
    assert fetch_spec(args).deadline_s == KBS_DEADLINE_S


def test_kbs_fetch_deadline_can_still_be_given() -> None:
    assert fetch_spec(build_parser().parse_args(_fetch_args("--deadline", "7"))).deadline_s == 7.0
