"""The CPU container image, run for real with podman, as a pod would run it.

``make image-cpu`` builds ``localhost/enclave-serve:cpu`` from the production Containerfile. This
test runs it the way docs/operations.md describes the pod: as uid/gid 10001, on a read-only root
filesystem, with its own memory tmpfs at ``/run/enclave-serve``, the encrypted model mounted
read-only under ``/models`` and the init-data as a file at ``/run/initdata/initdata.toml`` (the
image's default ``--init-data``). The init-data declares the image's own facts, read out of the
image (the runtime refuses an init-data that declares other software). A development KBS on the
host releases the key (host networking); then the user verifies the server and chats with it
through :func:`attest.client.attested_openai`. INSECURE: the sample TEE, whose evidence proves
nothing (``--sample-init-data`` stands in for the hardware register).

During the boot, ``/livez`` is asked every 0.2 s on a fresh connection, from the container's start
until ready: every answer must come within a second, in every boot stage (the engine's start
included). The figures per stage (from ``/readyz``'s body) are printed (``pytest -s``).

Skipped, saying which is missing, without podman or without the image. podman runs with
``images/containers.conf`` (runc, cgroupfs, no default ulimits: what Debian 12's podman 4.3 needs
on these machines).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import (
    BOOT_TIMEOUT,
    ES,
    KEY_ID,
    REPO,
    VLLM_ARGS,
    Proc,
    Workspace,
    child_env,
    free_port,
    start,
    start_kbs,
    write_policy,
)

pytestmark = pytest.mark.e2e

IMAGE = "localhost/enclave-serve:cpu"
#: podman's settings for these machines (make image-cpu uses the same file, unless CONTAINERS_CONF is set).
CONTAINERS_CONF = os.environ.get("CONTAINERS_CONF") or str(REPO / "images" / "containers.conf")
#: Where the pod finds the model and the init-data (the image's default CMD names the latter).
MODEL_IN_POD = "/models/tiny"
INIT_DATA_IN_POD = "/run/initdata/initdata.toml"
RUNTIME_UID = 10001
#: How often and how fast /livez must answer during the boot (the issue: "within a second").
LIVEZ_EVERY_S = 0.2
LIVEZ_WITHIN_S = 1.0


@dataclass(frozen=True)
class Podman:
    argv: list[str]
    env: dict[str, str]

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*self.argv, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check:
            assert done.returncode == 0, f"podman {' '.join(args)}: {done.stderr[-2000:]}"
        return done


@pytest.fixture(scope="module")
def podman() -> Podman:
    found = shutil.which("podman")
    if found is None:
        pytest.skip("podman is not installed (make image-cpu installs it, as root)")
    tool = Podman([found], {**child_env(), "CONTAINERS_CONF": CONTAINERS_CONF})
    if tool.run("image", "exists", IMAGE, check=False).returncode != 0:
        pytest.skip(f"the image {IMAGE} is not built: make image-cpu")
    return tool


@dataclass
class LivezProbe:
    """Asks ``/livez`` every :data:`LIVEZ_EVERY_S` on a fresh connection, ``/readyz`` for the stage."""

    url: str
    #: (stage, seconds) of every answer to /livez.
    answers: list[tuple[str, float]] = field(default_factory=list)
    #: What went wrong once the server had answered (errors, other statuses).
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    listening: threading.Event = field(default_factory=threading.Event)
    ready: threading.Event = field(default_factory=threading.Event)
    last_body: dict[str, object] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    #: Seconds from the container's start to the first answer.
    first_answer_s: float | None = None

    def loop(self) -> None:
        stage = "starting"
        while not self.stop.is_set() and not self.ready.is_set():
            tick = time.monotonic()
            began = time.perf_counter()
            try:
                # A new connection each time (TLS handshake included), as a kubelet probe makes;
                # the stage is the one /readyz names right after, on the same connection.
                with httpx.Client(verify=False, timeout=10) as client:
                    answer = client.get(self.url + "/livez")
                    took = time.perf_counter() - began
                    body = client.get(self.url + "/readyz").json()
            except httpx.ConnectError:
                if self.listening.is_set():
                    self.failures.append(f"{stage}: connection refused after the server had answered")
            except (httpx.HTTPError, ValueError) as exc:
                self.failures.append(f"{stage}: {type(exc).__name__}: {exc}")
            else:
                if not self.listening.is_set():
                    self.first_answer_s = time.monotonic() - self.started
                self.listening.set()
                self.last_body = body
                stage = str(body.get("stage", "?"))
                if answer.status_code != 200:
                    self.failures.append(f"{stage}: /livez answered {answer.status_code}")
                self.answers.append((stage, took))
                if body.get("ready"):
                    self.ready.set()
                elif body.get("status") == "failed":
                    self.failures.append(f"boot failed: {body}")
                    return
            self.stop.wait(max(0.0, LIVEZ_EVERY_S - (time.monotonic() - tick)))

    def figures(self) -> dict[str, tuple[int, float, float]]:
        """Per stage: (answers, max seconds, p99 seconds), in the order the stages came."""
        by_stage: dict[str, list[float]] = {}
        for stage, took in self.answers:
            by_stage.setdefault(stage, []).append(took)
        out = {}
        for stage, times in by_stage.items():
            p99 = statistics.quantiles(times, n=100, method="inclusive")[98] if len(times) > 1 else times[0]
            out[stage] = (len(times), max(times), p99)
        return out


@dataclass
class Booted:
    url: str
    name: str
    policy: Path
    container: Proc
    probe: LivezProbe


def _image_facts(podman: Podman, ws: Workspace) -> Path:
    """The image's own facts, read out of the image (what its build recorded)."""
    path = ws.root / "image-cpu-facts.json"
    out = podman.run("run", "--rm", "--entrypoint", "cat", IMAGE, "/usr/share/enclave-serve/image-facts.json")
    path.write_text(out.stdout)
    return path


def _init_data(podman: Podman, ws: Workspace, kbs_url: str) -> tuple[Path, dict[str, str]]:
    """The provider's init-data for the image: the model where the pod mounts it, the image's
    facts, the pod's private directory (the default, /run/enclave-serve: no insecure mode)."""
    path = ws.root / "image-initdata.toml"
    argv = [ES, "initdata", MODEL_IN_POD, "--expect-model", ws.manifest_digest, "--key-id", KEY_ID,
            "--kbs-url", kbs_url, "--allow-insecure-agent-policy", "--image-facts", str(_image_facts(podman, ws)),
            "--tee", "sample", "--allow-insecure-sample-tee", "--gpus", "none",
            "--env", "VLLM_CPU_KVCACHE_SPACE=1", "-o", str(path), "--json", "--", *VLLM_ARGS]  # fmt: skip
    out = subprocess.run(argv, check=True, env=child_env(), capture_output=True, timeout=120)
    path.chmod(0o644)  # the runtime's user reads it through the bind mount
    return path, json.loads(out.stdout)


@pytest.fixture(scope="module")
def booted(podman: Podman, request: pytest.FixtureRequest) -> Iterator[Booted]:
    # The session's model and KBS workspace only once podman and the image are known to be there.
    workspace: Workspace = request.getfixturevalue("workspace")
    kbs_port, port = free_port(), free_port()
    init_data, shown = _init_data(podman, workspace, f"http://127.0.0.1:{kbs_port}")
    policy = write_policy(
        workspace.root / "image-policy.toml", model=shown["model"],
        config_sha256=shown["config_sha256"].removeprefix("sha256:"), init_data=shown["init_data_digest"],
    )  # fmt: skip
    _, kbs = start_kbs(
        workspace, "image-kbs", workspace.key_file,
        "--resource-policy", f"enclave-serve/model-key/tiny={policy}", port=kbs_port,
    )  # fmt: skip
    name = f"enclave-serve-e2e-{port}"
    url = f"https://127.0.0.1:{port}"
    probe = LivezProbe(url)
    thread = threading.Thread(target=probe.loop, name="livez-probe", daemon=True)
    container = start(
        "image-container",
        [*podman.argv, "run", "--rm", "--name", name, "--network", "host", "--read-only",
         "--user", f"{RUNTIME_UID}:{RUNTIME_UID}",
         "--tmpfs", "/run/enclave-serve:rw,mode=0700,U",  # a memory emptyDir: tmpfs, the runtime's
         "--shm-size", "1g",  # vLLM's engine puts 160 MiB in /dev/shm; podman gives 64 MiB
         "--volume", f"{workspace.encrypted}:{MODEL_IN_POD}:ro",
         "--volume", f"{init_data}:{INIT_DATA_IN_POD}:ro",
         "--env", "VLLM_CPU_KVCACHE_SPACE=1",
         IMAGE, "--init-data", INIT_DATA_IN_POD, "--sample-init-data", INIT_DATA_IN_POD,
         "--host", "127.0.0.1", "--port", str(port)],
        workspace.root, podman.env,
    )  # fmt: skip
    thread.start()
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not probe.ready.wait(1.0):
            failed = [f for f in probe.failures if f.startswith("boot failed")]
            if container.popen.poll() is not None or failed or time.monotonic() > deadline:
                raise AssertionError(
                    f"the container did not become ready ({failed or probe.last_body}; podman run "
                    f"exited {container.popen.poll()}):\n{container.text()[-4000:]}"
                )
        yield Booted(url=url, name=name, policy=policy, container=container, probe=probe)
    finally:
        probe.stop.set()
        thread.join(timeout=15)
        podman.run("rm", "--force", "--time", "10", name, check=False, timeout=120)
        container.stop()
        kbs.stop()


def test_livez_answers_within_a_second_in_every_boot_stage(booted: Booted) -> None:
    figures = booted.probe.figures()
    print(
        f"\n/livez during the container's boot (fresh connection each, every {LIVEZ_EVERY_S} s; "
        f"first answer {booted.probe.first_answer_s:.1f} s after podman run):"
    )
    for stage, (count, slowest, p99) in figures.items():
        print(f"  {stage:<10} {count:4d} answers  max {slowest * 1000:7.1f} ms  p99 {p99 * 1000:7.1f} ms")
    assert not booted.probe.failures, booted.probe.failures
    # The engine's start happens in stage load: it must have been probed, not skipped over.
    assert "load" in figures, figures
    # Stage serve includes the hand-over of the port from the boot server to vLLM's at ready
    # (it held a probe for up to 1.06 s before the boot server stopped accepting first).
    assert "serve" in figures, figures
    slow = [(stage, took) for stage, took in booted.probe.answers if took > LIVEZ_WITHIN_S]
    assert not slow, f"/livez took longer than {LIVEZ_WITHIN_S} s: {slow}"


def test_runs_as_the_runtime_user_on_a_read_only_root(podman: Podman, booted: Booted) -> None:
    # From the host: PID 1 (tini) and the runtime (its child), real/effective/saved/fs uid and gid.
    pid = podman.run("inspect", "--format", "{{.State.Pid}}", booted.name).stdout.strip()
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert children, "tini has no child: the runtime is not running"
    for proc in (pid, *children):
        status = Path(f"/proc/{proc}/status").read_text()
        ids = {
            line.split(":")[0]: line.split()[1:]
            for line in status.splitlines()
            if line[:4] in ("Uid:", "Gid:")
        }
        assert ids == {"Uid": [str(RUNTIME_UID)] * 4, "Gid": [str(RUNTIME_UID)] * 4}, (proc, ids)
    # Inside: / is mounted read-only, and writing to it fails.
    root = podman.run("exec", booted.name, "awk", '$5 == "/" { print $6 }', "/proc/1/mountinfo").stdout
    assert root.split(",")[0] == "ro", root
    wrote = podman.run("exec", booted.name, "touch", "/probe", check=False)
    assert wrote.returncode != 0 and "Read-only file system" in wrote.stderr, wrote
    private = podman.run(
        "exec", booted.name, "awk", '$5 == "/run/enclave-serve" { print $9 }', "/proc/1/mountinfo"
    )
    assert private.stdout.strip() == "tmpfs", private.stdout


def test_verified_then_chats_through_the_attested_client(booted: Booted) -> None:
    verify = subprocess.run(
        [ES, "verify", booted.url, "--policy", str(booted.policy), "--allow-insecure-sample-tee"],
        env=child_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "policy:workload.config" in verify.stdout + verify.stderr

    from attest.client import attested_openai

    client = attested_openai(booted.url, policy=booted.policy, allow_insecure=True)
    with contextlib.closing(client):
        reply = client.chat.completions.create(
            model="tiny", max_tokens=8, messages=[{"role": "user", "content": "Hello!"}]
        )
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0
