"""The development variant of ``enclave-serve deploy`` runs: ``podman kube play`` boots it, and a
user verifies it through its port (INSECURE: the sample TEE, whose evidence proves nothing).

Needs podman and the CPU image ``localhost/enclave-serve:cpu``; skipped, saying which is missing,
without them. podman 4.3 (Debian 12) runs it with ``--runtime runc --cgroup-manager cgroupfs``
and ``images/containers.conf`` (no default ulimits, and a 1 GiB ``/dev/shm``: vLLM's engine needs
more than podman's 64 MiB), the file ``make image-cpu`` and ``tests/e2e/test_image.py`` use.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import ES, VLLM_ARGS, Workspace, child_env, free_port, start_kbs

pytestmark = pytest.mark.e2e

IMAGE = "localhost/enclave-serve:cpu"
CONTAINERS_CONF = Path(__file__).resolve().parents[2] / "images" / "containers.conf"
NAME = "kubeplay-e2e"
BOOT_TIMEOUT_S = 600


def _podman_base(tmp: Path) -> tuple[list[str], dict[str, str]]:
    podman = shutil.which("podman")
    if podman is None:
        pytest.skip("podman is not installed (apt install podman)")
    env = {**child_env(), "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    return [podman, "--runtime", "runc", "--cgroup-manager", "cgroupfs"], env


@pytest.fixture
def podman(tmp_path: Path) -> Iterator[tuple[list[str], dict[str, str]]]:
    base, env = _podman_base(tmp_path)
    found = subprocess.run([*base, "image", "exists", IMAGE], env=env, capture_output=True, timeout=60)
    if found.returncode != 0:
        pytest.skip(f"the CPU image {IMAGE} is not built (the image build makes it)")
    yield base, env


def _run(base: list[str], env: dict[str, str], *args: str, stdin: bytes | None = None) -> str:
    done = subprocess.run([*base, *args], input=stdin, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, f"podman {' '.join(args)}: {done.stderr.decode(errors='replace')[-2000:]}"
    return done.stdout.decode()


def _tar(directory: Path) -> bytes:
    """The directory as a tar archive that uid 10001 can read (root's files, world-readable)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted(directory.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(directory)))
            info.uid = info.gid = 0
            info.mode = 0o755 if path.is_dir() else 0o644
            if path.is_file():
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)
    return buf.getvalue()


def _wait_ready(url: str) -> dict[str, object]:
    body: dict[str, object] = {}
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    with httpx.Client(verify=False, timeout=5) as client:
        while time.monotonic() < deadline and not body.get("ready") and body.get("status") != "failed":
            with contextlib.suppress(httpx.HTTPError, ValueError):
                body = client.get(url + "/readyz").json()
            time.sleep(2)
    return body


def test_the_sample_pod_boots_under_kube_play_and_verifies(
    podman: tuple[list[str], dict[str, str]], workspace: Workspace, tmp_path: Path
) -> None:
    base, env = podman
    digest = _run(base, env, "image", "inspect", "--format", "{{.Digest}}", IMAGE).strip()
    facts = tmp_path / "image-facts.json"
    facts.write_text(
        _run(
            base,
            env,
            "run",
            "--rm",
            "--entrypoint",
            "cat",
            IMAGE,
            "/usr/share/enclave-serve/image-facts.json",
        )
    )
    kbs_port = free_port()
    # The pod reaches the host's kbs-dev through podman's host.containers.internal.
    _, kbs = start_kbs(workspace, "kubeplay-kbs", workspace.key_file, "--host", "0.0.0.0", port=kbs_port)
    init = tmp_path / "initdata.toml"
    declared = subprocess.run(
        [ES, "initdata", "/models", "--expect-model", str(workspace.encrypted), "--key-id",
         "kbs:///enclave-serve/model-key/tiny", "--kbs-url", f"http://host.containers.internal:{kbs_port}",
         "--allow-insecure-agent-policy", "--image-facts", str(facts), "--tee", "sample",
         "--allow-insecure-sample-tee", "--gpus", "none", "--private-dir", "/dev/shm",
         "--allow-insecure-shared-private-dir", "--env", "VLLM_CPU_KVCACHE_SPACE=1", "-o", str(init), "--json",
         "--", *VLLM_ARGS],
        env=child_env(), capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    d = json.loads(declared)
    policy = tmp_path / "policy.toml"
    policy.write_text(
        'version = 1\ninsecure_development = true\n[tee]\nallowed = ["sample"]\n[workload]\n'
        f'model = ["{d["model"]}"]\nconfig = ["{d["config_sha256"]}"]\ninit_data = ["{d["init_data_digest"]}"]\n'
    )
    port = free_port()
    out = tmp_path / "deploy"
    subprocess.run(
        [ES, "deploy", "--tee", "sample", "--allow-insecure-sample-tee", "--image",
         f"localhost/enclave-serve@{digest}", "--init-data", str(init), "--name", NAME, "--memory", "6Gi",
         "--cpus", "2", "--port", str(port), "-o", str(out)],
        env=child_env(), capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    manifest = out / "deployment.yaml"
    try:
        # The PersistentVolumeClaim is a podman named volume: fill it with the encrypted model.
        _run(base, env, "volume", "create", f"{NAME}-models")
        _run(base, env, "volume", "import", f"{NAME}-models", "-", stdin=_tar(workspace.encrypted))
        _run(base, env, "kube", "play", str(manifest))
        url = f"https://127.0.0.1:{port}"
        body = _wait_ready(url)
        logs = subprocess.run([*base, "logs", f"{NAME}-pod-0-enclave-serve"], env=env, capture_output=True,
                              text=True, timeout=60).stdout  # fmt: skip
        assert body.get("ready"), f"not ready: {body}\n{logs[-4000:]}"
        verified = subprocess.run(
            [ES, "verify", url, "--policy", str(policy), "--allow-insecure-sample-tee"],
            env=child_env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert f"verified: {url}" in verified.stdout
    finally:
        subprocess.run([*base, "kube", "down", str(manifest)], env=env, capture_output=True, timeout=120)
        subprocess.run([*base, "volume", "rm", "-f", f"{NAME}-models", f"{NAME}-initdata"], env=env,
                       capture_output=True, timeout=60)  # fmt: skip
        kbs.stop()
