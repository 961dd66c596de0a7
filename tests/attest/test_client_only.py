"""The client-only install, as documented: the ``client`` extra's packages and enclave-serve itself.

The test builds that environment from what is installed here: the closure of the ``client``
extra's requirements (each distribution's own files, linked into a fresh directory) plus the
repository, on a Python that sees nothing else (``-S``: no site-packages; ``-E``: no
``PYTHON*`` variables). In it, ``enclave-serve verify --replicas`` checks real TLS replicas and
``enclave-serve proxy`` forwards a chat to a verified one. A package the client needs but the extra
does not list fails here, as it would for a user; so does a server package imported on the way.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.attest.replicas import POLICY_TOML, ReplicaServer, RoundRobin

REPO = Path(__file__).resolve().parents[2]
#: What a client-only environment must never contain (the server's side).
SERVER_ONLY = {"vllm", "torch", "fastapi", "safetensors", "numpy", "tokenizers", "nvidia-ml-py", "jwcrypto"}


def client_closure() -> dict[str, metadata.Distribution]:
    """The installed distributions the ``client`` extra needs, by canonical name, transitively."""
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["client"]
    todo = [Requirement(r) for r in extra]
    found: dict[str, metadata.Distribution] = {}
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in found:
            continue
        dist = metadata.distribution(name)
        found[name] = dist
        for text in dist.requires or []:
            sub = Requirement(text)
            if sub.marker is None or sub.marker.evaluate({"extra": ""}):
                todo.append(sub)
    return found


def link_site(dists: dict[str, metadata.Distribution], site: Path) -> None:
    """Link every file of ``dists`` (those inside site-packages) under ``site``."""
    for dist in dists.values():
        for file in dist.files or []:
            if ".." in file.parts:
                continue  # scripts and data outside site-packages
            target = site / file
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.symlink(Path(str(dist.locate_file(file))).resolve(), target)


def python(site: Path, code: str) -> list[str]:
    """A command running ``code`` on this Python with only the stdlib, ``site`` and the repository."""
    return [
        sys.executable,
        "-S",
        "-E",
        "-c",
        f"import sys; sys.path[:0] = [{str(site)!r}, {str(REPO)!r}]\n{code}",
    ]


@pytest.fixture(scope="module")
def client_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dists = client_closure()
    assert not SERVER_ONLY & set(dists), f"the client extra pulls the server's {SERVER_ONLY & set(dists)}"
    site = tmp_path_factory.mktemp("client-site")
    link_site(dists, site)
    return site


@pytest.fixture(scope="module")
def client_python(client_site: Path) -> list[str]:
    """``enclave-serve`` (its CLI) in the client-only environment: append the arguments."""
    return python(client_site, "from runtime.cli import main\nsys.exit(main(sys.argv[1:]))")


@pytest.fixture
def pool() -> Iterator[tuple[RoundRobin, list[ReplicaServer]]]:
    replicas = [ReplicaServer("a"), ReplicaServer("b")]
    balancer = RoundRobin(replicas)
    yield balancer, replicas
    balancer.close()
    for replica in replicas:
        replica.stop()


def test_the_client_only_environment_lacks_the_server_side(client_site: Path) -> None:
    """The contrast that makes the next test mean something: the server's imports fail there."""
    done = subprocess.run(
        python(client_site, "import server.engine"), capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "No module named 'fastapi'" in done.stderr


def test_verify_and_proxy_run_from_the_client_only_install(
    client_python: list[str], pool: tuple[RoundRobin, list[ReplicaServer]], tmp_path: Path
) -> None:
    balancer, replicas = pool
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY_TOML)
    insecure = "--allow-insecure-sample-tee"
    verify = [*client_python, "verify", balancer.url, "--replicas", "4", "--policy", str(policy), insecure]
    done = subprocess.run(verify, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "2 distinct in 4 connection(s)" in done.stdout
    assert {r.tls.spki_sha256 for r in replicas} <= set(done.stdout.split())

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    listen = f"127.0.0.1:{port}"
    proxy = subprocess.Popen(
        [*client_python, "proxy", balancer.url, "--policy", str(policy), insecure, "--listen", listen],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                reply = httpx.post(
                    f"http://{listen}/v1/chat/completions",
                    json={"model": "tiny", "messages": [{"role": "user", "content": "Hello!"}]},
                    timeout=30,
                )
                break
            except httpx.ConnectError:
                assert proxy.poll() is None and time.monotonic() < deadline, (
                    proxy.stdout and proxy.stdout.read()
                )
                time.sleep(0.2)
        assert reply.status_code == 200
        assert reply.json()["choices"][0]["message"]["content"] in {"a", "b"}
    finally:
        proxy.terminate()
        proxy.wait(30)


def test_the_readme_installs_exactly_the_client_extra() -> None:
    """The README's client-only recipe lists the extra's requirements, no more and no fewer."""
    import shlex

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["client"]
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index("pip install --no-deps enclave-serve")
    assert shlex.split(lines[start + 1]) == ["pip", "install", *extra]
