"""The command line's surface: --version, help texts, and errors shown with the right usage."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from runtime.cli import build_parser, main, version


def _parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ("enclave-serve",)
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"enclave-serve {version()}"
    assert version() != "unknown"  # the test suite runs an installed enclave-serve


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["run", "--bogus"], "usage: enclave-serve run "),
        (["policy", "show", "policy.toml", "--bogus"], "usage: enclave-serve policy show "),
        (["demo-model", "./tiny", "--bogus"], "usage: enclave-serve demo-model "),
    ],
)
def test_unknown_flag_of_a_subcommand_shows_that_subcommands_usage(
    argv: list[str], usage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage), err
    assert "usage: enclave-serve [-h]" not in err
    assert f"{' '.join(usage.split()[1:])}: error: unrecognized arguments: --bogus" in err


@pytest.mark.parametrize("argv", [["--bogus"], ["--bogus", "run"], ["--bogus", "policy", "show", "p.toml"]])
def test_unknown_top_level_flag_shows_the_top_level_usage(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: enclave-serve [-h]"), err
    assert "enclave-serve: error: " in err


def test_every_command_has_a_description_and_every_argument_help() -> None:
    missing = []
    for path, parser in _parsers(build_parser()):
        if not parser.description:
            missing.append(f"{' '.join(path)}: no description")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
                continue
            if not action.help:
                missing.append(f"{' '.join(path)} {action.option_strings or action.dest}: no help")
    assert missing == []


def test_help_texts_carry_no_rest_markup(capsys: pytest.CaptureFixture[str]) -> None:
    for path, parser in _parsers(build_parser()):
        parser.print_help()
        shown = capsys.readouterr().out
        assert "``" not in shown, f"{' '.join(path)}:\n{shown}"
    evidence = dict(_parsers(build_parser()))[("enclave-serve", "evidence")]
    assert "Without '--nonce' it lists" in (evidence.description or "")
