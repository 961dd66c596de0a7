"""Run the documentation: every ``sh``, ``console`` and ``python`` block of README.md and docs/*.md.

Sybil lexes the Markdown (fenced blocks, nested or prefixed, with their line numbers) and runs a
document's blocks in order, sharing one namespace; the evaluators here decide what a block means.
Sybil was chosen over pytest-codeblocks (shell blocks, but no per-document state, no custom block
kinds) and pytest-examples (Python only): it is maintained, typed, and its parsers and evaluators
are small plug-ins, so shell sessions with expected output and "parse only" blocks are ours to
define.

* ``sh``: run with bash (``set -euo pipefail``) in the document's workspace; any failing command
  fails the block. ``cmd &`` starts a background process; it is stopped when the document ends.
* ``console``: ``$ `` lines are commands (``\\`` continues one), run in order in one bash session,
  so ``$?`` is the previous command's status; the lines after a command are what it prints: each
  must match a line of its output, in order (``…`` matches anything, other text literally).
* ``python``: executed in the document's namespace, in its workspace.

A block right after ``<!-- doc-test: parse-only REASON -->`` is not run: it needs what CI has not
(a TDX host, a cluster, a registry, a production KBS), and REASON says what. It is still checked:
every ``enclave-serve`` command line against the CLI's real parser (each ``--flag`` must be an
option of that subcommand; a line without placeholders must parse whole), every ``make`` target
against the Makefile, Python blocks compiled. Blocks in other languages (``text``, ``toml``,
``json``, ``js``) are not code to run.

The workspace of a document is a fresh directory that looks like a clone to its commands: the
repository's top-level entries are linked into it (``tests/vectors/...``, ``bench/...`` and
``.venv`` resolve), files the commands write stay in it, and ``.venv/bin`` leads ``PATH``.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sybil import Document, Example, Region
from sybil.parsers.markdown.lexers import FencedCodeBlockLexer

REPO = Path(__file__).resolve().parents[2]
#: What the runner runs; anything else in a fence is text.
LANGUAGES = ("sh", "console", "python")
#: The directive before a block, in an HTML comment (invisible when rendered).
DIRECTIVE = re.compile(r"<!--\s*doc-test:\s*(?P<kind>parse-only)\s+(?P<reason>.+?)\s*-->\s*\Z", re.DOTALL)
#: Placeholders in documented commands: an elided argument.
PLACEHOLDER = re.compile(r"…|\.\.\.|<[^>]*>|\bDIGEST\b|\$\{?[A-Z_]+")
#: What a reader's shell passes on to the commands (anything else the test process holds is left out).
READER_ENVIRONMENT = frozenset(
    {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "LANG", "TMPDIR", "TZ",
     "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PIP_CERT"}
)  # fmt: skip
#: How long one block may run.
BLOCK_TIMEOUT_S = 600


@dataclass
class Tally:
    """What a document's blocks did: run, or parse-only with the reason."""

    ran: list[str] = field(default_factory=list)
    parsed: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Workspace:
    """A document's working directory, its environment and the process groups its blocks left."""

    path: Path
    env: dict[str, str]
    groups: list[int] = field(default_factory=list)

    @classmethod
    def create(cls, root: Path) -> Workspace:
        root.mkdir(parents=True, exist_ok=True)
        for entry in REPO.iterdir():
            if entry.name not in (".git",) and not (root / entry.name).exists():
                (root / entry.name).symlink_to(entry)
        # A reader's login shell, not this test process's environment: imports in the test
        # process change it (opencv, imported with vLLM, appends to LD_LIBRARY_PATH), and the
        # runtime and `image-facts` read the environment.
        env = {k: v for k, v in os.environ.items() if k in READER_ENVIRONMENT or k.startswith("LC_")}
        env["PATH"] = f"{REPO / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', os.defpath)}"
        return cls(path=root, env=env)

    def close(self) -> None:
        """Stop every process a block left running (``cmd &``): SIGTERM, then SIGKILL."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = []
            for group in self.groups:
                try:
                    os.killpg(group, sig)
                    alive.append(group)
                except ProcessLookupError:
                    pass
            if not alive:
                break
            if sig == signal.SIGTERM:
                import time

                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and any(_group_alive(g) for g in alive):
                    time.sleep(0.2)
        self.groups.clear()

    def bash(self, script: str, *, timeout: float = BLOCK_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """Run ``script`` with bash in its own process group (kept until :meth:`close`)."""
        proc = subprocess.Popen(
            ["bash", "-c", script],
            cwd=self.path,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.groups.append(proc.pid)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            out += f"\n(the block ran longer than {timeout:.0f} s)"
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


# --- parsing -----------------------------------------------------------------------------------


def parse_only(document: Document, region: Region) -> str | None:
    """The reason a block is parse-only, from the directive right before it (None: run it)."""
    before = document.text[: region.start]
    comment = before.rfind("<!--")
    if comment < 0:
        return None
    match = DIRECTIVE.match(before[comment:])
    return match.group("reason") if match else None


class BlockParser:
    """Sybil parser: each fenced ``sh``/``console``/``python`` block, run or parse-only."""

    def __init__(self) -> None:
        self.lexer = FencedCodeBlockLexer(
            language=r".+", mapping={"language": "language", "source": "source"}
        )

    def __call__(self, document: Document) -> Iterable[Region]:
        for region in self.lexer(document):
            language = str(region.lexemes["language"]).strip().split()[0]
            if language not in LANGUAGES:
                continue
            reason = parse_only(document, region)
            region.parsed = (language, str(region.lexemes["source"]), reason)
            region.evaluator = evaluate
            yield region


def evaluate(example: Example) -> str | None:
    """Run (or check) one block; a returned string is the failure Sybil reports."""
    language, source, reason = example.parsed
    namespace = example.namespace
    tally: Tally = namespace["__tally__"]
    where = f"{Path(example.path).name}:{example.line}"
    if reason is not None:
        tally.parsed.append((where, reason))
        return check_only(language, source)
    tally.ran.append(where)
    workspace: Workspace = namespace["__workspace__"]
    if language == "python":
        return run_python(source, namespace, workspace)
    if language == "console":
        return run_console(source, workspace)
    done = workspace.bash("set -euo pipefail\n" + source)
    if done.returncode != 0:
        return f"the block failed (exit {done.returncode}):\n{_tail(done.stdout)}"
    return None


# --- running -----------------------------------------------------------------------------------


def run_python(source: str, namespace: dict[str, object], workspace: Workspace) -> str | None:
    code = compile(source, "<doc block>", "exec")
    cwd = os.getcwd()
    os.chdir(workspace.path)
    try:
        exec(code, namespace)  # the documentation's own example
    finally:
        os.chdir(cwd)
    return None


@dataclass(frozen=True)
class Command:
    text: str
    expected: tuple[str, ...]


def console_commands(source: str) -> list[Command]:
    """``$ `` commands (with ``\\`` continuations) and the output lines documented after each."""
    commands: list[Command] = []
    text: list[str] = []
    expected: list[str] = []
    continued = False
    for line in source.splitlines():
        if continued:
            text.append(line)
            continued = line.endswith("\\")
        elif line.startswith("$ "):
            if text:
                commands.append(Command("\n".join(text), tuple(expected)))
            text, expected = [line[2:]], []
            continued = line.endswith("\\")
        elif line.strip():
            expected.append(line.strip())
    if text:
        commands.append(Command("\n".join(text), tuple(expected)))
    return commands


def _pattern(expected: str) -> re.Pattern[str]:
    parts = [re.escape(p) for p in re.split(r"…", expected)]
    return re.compile(".*".join(parts))


MARK = "@@doc-test-command-{}@@"


def run_console(source: str, workspace: Workspace) -> str | None:
    """Run the session in one bash; check each command's output against the documented lines."""
    commands = console_commands(source)
    script = ["__rc=0"]
    for i, command in enumerate(commands):
        script.append(f"printf '\\n{MARK.format(i)}\\n'; (exit $__rc)")
        script.append(command.text)
        script.append("__rc=$?")
        script.append(f"printf '\\n{MARK.format('rc')}%s\\n' $__rc")
    done = workspace.bash("\n".join(script))
    outputs = re.split(r"\n@@doc-test-command-\d+@@\n", "\n" + done.stdout)[1:]
    statuses = [int(m) for m in re.findall(r"@@doc-test-command-rc@@(\d+)", done.stdout)]
    for i, (command, output) in enumerate(zip(commands, outputs, strict=False)):
        status = statuses[i] if i < len(statuses) else None
        documented = i + 1 < len(commands) and commands[i + 1].text.strip() == "echo $?"
        if status not in (0, None) and not documented:
            return f"$ {command.text}\n  exited {status} (a documented failure is followed by `$ echo $?`):\n{_tail(output)}"
        lines = [line.strip() for line in output.splitlines()]
        at = 0
        for wanted in command.expected:
            pattern = _pattern(wanted)
            while at < len(lines) and not pattern.fullmatch(lines[at]):
                at += 1
            if at == len(lines):
                return f"$ {command.text}\n  documented: {wanted}\n  printed:\n{textwrap.indent(_tail(output), '    ')}"
            at += 1
    return None


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# --- parse-only checks -------------------------------------------------------------------------


def logical_lines(source: str) -> Iterator[str]:
    """Shell lines with ``\\`` continuations joined, comments and ``$ `` prompts dropped."""
    pending = ""
    for raw in source.splitlines():
        line = raw[2:] if raw.startswith("$ ") else raw
        if pending:
            line = pending + " " + line.strip()
        if line.endswith("\\"):
            pending = line[:-1]
            continue
        pending = ""
        code = line[: _comment_at(line)].strip()
        if code:
            yield code
    if pending:
        yield pending


def _comment_at(line: str) -> int:
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return i
    return len(line)


def check_only(language: str, source: str) -> str | None:
    """Check a block that is not run: Python compiles; commands parse as the CLI parses them."""
    if language == "python":
        try:
            compile(source, "<doc block>", "exec")
        except SyntaxError as exc:
            return f"the Python block does not compile: {exc}"
        return None
    problems: list[str] = []
    for line in logical_lines(source):
        for command in re.split(r"\s*(?:&&|\|\||;|\|)\s*|\s+&\s*$", line):
            words = command.split()
            if words and words[0] == "enclave-serve":
                problem = check_enclave_serve(command)
            elif words and words[0] == "make":
                problem = check_make(words[1:])
            else:
                problem = None
            if problem:
                problems.append(f"{command}\n  {problem}")
    return "\n".join(problems) or None


def check_make(targets: list[str]) -> str | None:
    makefile = (REPO / "Makefile").read_text()
    missing = [
        t for t in targets if "=" not in t and not re.search(rf"^{re.escape(t)}:", makefile, re.MULTILINE)
    ]
    return f"no such make target: {', '.join(missing)}" if missing else None


def check_enclave_serve(command: str) -> str | None:
    """Every ``--flag`` is an option of the subcommand; a line without placeholders parses whole."""
    import argparse

    from runtime.cli import build_parser

    try:
        argv = _without_redirections(shlex.split(command))[1:]
    except ValueError as exc:
        return f"not a shell command: {exc}"
    parser = build_parser()
    sub = parser
    path = []
    for word in argv:
        actions = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or word not in actions[0].choices:
            break
        sub = actions[0].choices[word]
        path.append(word)
    head = argv[: argv.index("--")] if "--" in argv else argv
    known = set(sub._option_string_actions)
    unknown = [w.split("=", 1)[0] for w in head if w.startswith("-") and w.split("=", 1)[0] not in known]
    unknown = [w for w in unknown if not PLACEHOLDER.search(w) and w != "-"]
    if unknown:
        return f"`enclave-serve {' '.join(path)}` has no option {', '.join(unknown)}"
    if PLACEHOLDER.search(command):
        return None
    try:
        parser.parse_args(head)  # as runtime.cli.main: what follows "--" goes to vLLM untouched
    except SystemExit as exc:
        return f"the CLI refuses it (exit {exc.code})"
    return None


def _without_redirections(words: list[str]) -> list[str]:
    """``cmd ARGS > out 2>&1`` -> ``cmd ARGS``."""
    kept: list[str] = []
    skip = False
    for word in words:
        if skip:
            skip = False
        elif re.fullmatch(r"\d*(>>?|<)(&\d+)?", word):
            skip = not word.endswith(("&1", "&2"))
        elif not re.match(r"\d*(>>?|<)", word):
            kept.append(word)
    return kept


def setup(namespace: dict[str, object], root: Path) -> None:
    namespace["__workspace__"] = Workspace.create(root)
    namespace["__tally__"] = Tally()


def teardown(namespace: dict[str, object]) -> None:
    workspace = namespace.get("__workspace__")
    if isinstance(workspace, Workspace):
        workspace.close()


__all__ = ["BlockParser", "Tally", "Workspace", "check_only", "setup", "teardown"]
