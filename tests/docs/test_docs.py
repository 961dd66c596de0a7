"""The documentation runs as written (tests/docs/runner.py says how each block is run or checked)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sybil import Document

from tests.docs.runner import REPO, BlockParser, Tally, setup, teardown

#: Documents whose blocks boot the enclave with real vLLM (minutes): run with the e2e tests.
SLOW = {"docs/by-hand.md"}
DOCUMENTS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]


def run_document(path: Path, workspace: Path) -> Tally:
    """Run every block of the document at ``path`` in order, in ``workspace``."""
    document = Document.parse(str(path), BlockParser())
    setup(document.namespace, workspace)
    try:
        for example in document:
            example.evaluate()
    finally:
        teardown(document.namespace)
    tally = document.namespace["__tally__"]
    assert isinstance(tally, Tally)
    return tally


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.e2e] if n in SLOW else []) for n in DOCUMENTS]
)
def test_the_document_runs_as_written(name: str, tmp_path: Path) -> None:
    tally = run_document(REPO / name, tmp_path / "workspace")
    print(f"{name}: {len(tally.ran)} block(s) run, {len(tally.parsed)} parse-only")
    for where, reason in tally.parsed:
        print(f"  parse-only {where}: {reason}")


def test_a_wrong_flag_in_a_parse_only_block_fails(tmp_path: Path) -> None:
    """The check behind parse-only blocks: a flag the subcommand lacks is named."""
    doc = tmp_path / "doc.md"
    doc.write_text(
        "<!-- doc-test: parse-only needs a TDX host -->\n"
        "```sh\nenclave-serve verify https://x.example --polcy p.toml   # a typo\n```\n"
    )
    document = Document.parse(str(doc), BlockParser())
    setup(document.namespace, tmp_path / "ws")
    try:
        (example,) = list(document)
        with pytest.raises(Exception, match="has no option --polcy"):
            example.evaluate()
    finally:
        teardown(document.namespace)


def test_a_console_block_checks_the_documented_output_and_exit_status(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("```console\n$ printf 'a\\nb 42 c\\n'\nb … c\n$ false\n$ echo $?\n1\n```\n")
    assert run_document(doc, tmp_path / "ws").ran
    doc.write_text("```console\n$ false\n$ echo $?\n0\n```\n")
    with pytest.raises(Exception, match="documented: 0"):
        run_document(doc, tmp_path / "ws")


def test_blocks_see_a_readers_environment_not_the_test_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's opencv appends to LD_LIBRARY_PATH in the process that imports it; a reader's shell
    has no such thing, and `image-facts` would record it (CI failed on exactly this)."""
    monkeypatch.setenv("LD_LIBRARY_PATH", "/somewhere/cv2/../../lib64:")
    doc = tmp_path / "doc.md"
    doc.write_text(
        '```console\n$ echo "[${LD_LIBRARY_PATH:-}]"\n[]\n$ command -v enclave-serve\n…/.venv/bin/enclave-serve\n```\n'
    )
    assert run_document(doc, tmp_path / "ws").ran
