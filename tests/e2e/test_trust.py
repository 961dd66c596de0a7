"""What runs is exactly what was attested: hostile options, environment, side files and peers.

Each test is one attack from the security review, played through the real CLI and the real
runtime (real vLLM on the CPU, sample TEE): refused inputs stop the boot at stage ``config``
before anything is served; a side file rewritten after the config stage is not what vLLM
renders; a double-forked process in the runtime's PID namespace gets no key and fails the boot;
the configuration endpoint's bytes are the attested claim, stable across restarts.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from attest.runconfig import RunConfiguration
from tests.e2e.conftest import (
    ES,
    HOSTILE_TEMPLATE,
    VLLM_ARGS,
    Enclave,
    Launcher,
    Workspace,
    assert_nothing_served,
    child_env,
    key_forms,
    wait_ready,
)

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent


def _tokens(client: httpx.Client, body: dict) -> list[int]:
    r = client.post("/tokenize", json={"model": "tiny", **body})
    r.raise_for_status()
    return list(r.json()["tokens"])


def test_chat_template_rewritten_after_the_config_stage_is_not_rendered(enclave: Enclave) -> None:
    from jinja2 import Template

    from runtime.demo_model import DEMO_CHAT_TEMPLATE

    assert (enclave.ws.served / "chat_template.jinja").read_text() == HOSTILE_TEMPLATE  # the attack ran
    messages = [{"role": "user", "content": "Hello"}]
    attested = Template(DEMO_CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    hostile = Template(HOSTILE_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    with httpx.Client(verify=False, base_url=enclave.url, timeout=60) as client:
        rendered = _tokens(client, {"messages": messages, "add_special_tokens": False})
        assert rendered == _tokens(client, {"prompt": attested, "add_special_tokens": False})
        assert rendered != _tokens(client, {"prompt": hostile, "add_special_tokens": False})


def test_configuration_endpoint_is_the_attested_claim_and_stable_across_restarts(enclave: Enclave) -> None:
    with httpx.Client(verify=False, base_url=enclave.url, timeout=60) as client:
        served = client.get("/.well-known/enclave-serve/config").content
        claims = client.get("/.well-known/enclave-serve/attestation", params={"nonce": "33" * 32}).json()
    digest = hashlib.sha256(served).hexdigest()
    assert claims["claims"]["config"] == {"sha256": digest}
    # The enclave, booted with only --init-data, claims what `initdata` printed offline.
    assert digest == enclave.provider.config_sha256
    config = RunConfiguration.from_bytes(served).to_json()
    assert config["model"]["manifest_digest"] == enclave.ws.manifest_digest
    assert config["vllm"]["args"] == VLLM_ARGS
    assert config["environment"] == {"VLLM_CPU_KVCACHE_SPACE": "1"}  # nothing from the shell
    assert config["settings"]["model_source"] == str(enclave.ws.served)
    pinned = subprocess.run(
        [ES, "verify", enclave.url, "--policy", str(enclave.provider.policy), "--allow-insecure-sample-tee",
         "--expect-config", f"sha256:{digest}", "--json"],
        capture_output=True, text=True, env=child_env(), timeout=120,
    )  # fmt: skip
    assert pinned.returncode == 0, pinned.stderr
    assert json.loads(pinned.stdout)["config_sha256"] == digest
    other = subprocess.run(
        [ES, "verify", enclave.url, "--policy", str(enclave.provider.policy), "--allow-insecure-sample-tee",
         "--expect-config", "sha256:" + "0" * 64],
        capture_output=True, text=True, env=child_env(), timeout=120,
    )  # fmt: skip
    assert other.returncode == 1 and re.search(r"✗ config +the server runs configuration", other.stdout)


@pytest.mark.parametrize(
    ("scenario", "kwargs", "named"),
    [
        ("an abbreviated option that logs every prompt", {"vllm_extra": ("--enable-log-req",)},
         "--enable-log-requests"),
        ("a config file", {"vllm_extra": ("--config", "/etc/hostname")}, "--config"),
        ("vLLM's development routes", {"env": {"VLLM_SERVER_DEV_MODE": "1"}}, "VLLM_SERVER_DEV_MODE"),
    ],
)  # fmt: skip
def test_refused_input_stops_the_boot_before_anything_is_served(
    workspace: Workspace, launcher: Launcher, scenario: str, kwargs: dict, named: str
) -> None:
    kbs_url = launcher.kbs(f"kbs-refused-{named.strip('-')}", workspace.key_file)
    url, proc = launcher.runtime(
        f"runtime-refused-{named.strip('-')}", workspace.encrypted, kbs_url, **kwargs
    )
    body = wait_ready(url, proc, want_failure=True)
    assert body["stage"] == "config", scenario
    assert named in body["reason"]
    assert_nothing_served(url)
    with httpx.Client(verify=False, base_url=url, timeout=10) as client:
        assert client.post("/collective_rpc", json={"method": "save_sharded_state"}).status_code == 503
    log = proc.text()
    assert sum("boot failed at stage config" in line for line in log.splitlines()) == 1
    assert "Initializing a V1 LLM engine" not in log  # stopped before vLLM's engine started


def _runtime_pid(unshare_pid: int) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        children = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise AssertionError("unshare started no child")


def test_double_forked_process_in_the_runtimes_pid_namespace_gets_no_key(
    workspace: Workspace, launcher: Launcher, tmp_path: Path
) -> None:
    """The runtime as PID 1 of its namespace (as in a container): every orphan descends from it."""
    unshare, nsenter = shutil.which("unshare"), shutil.which("nsenter")
    probe = [unshare or "unshare", "--pid", "--fork", "--mount-proc", "true"]
    if unshare is None or nsenter is None or subprocess.run(probe, capture_output=True).returncode != 0:
        pytest.skip("needs util-linux unshare/nsenter and permission to create PID namespaces")
    kbs_url = launcher.kbs("kbs-hostile-peer", workspace.key_file)
    url, proc = launcher.runtime(
        "runtime-pid1", workspace.encrypted, kbs_url,
        wrap=(unshare, "--pid", "--fork", "--mount-proc", "--kill-child"),
    )  # fmt: skip
    runtime = _runtime_pid(proc.popen.pid)
    result = tmp_path / "peer.json"
    subprocess.run(
        [nsenter, "--target", str(runtime), "--pid", "--mount", sys.executable, str(HERE / "hostile_peer.py"),
         str(result), workspace.manifest_digest],
        check=True, timeout=60, env=child_env(),
    )  # fmt: skip
    body = wait_ready(url, proc, want_failure=True)
    deadline = time.monotonic() + 30
    while not result.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    peer = json.loads(result.read_text())
    assert peer["ppid"] == 1, "the hostile process should be an orphan of the runtime (PID 1)"
    assert peer["found"], "the hostile process never saw the key socket"
    reply = bytes.fromhex(peer["reply"])
    assert reply == b'{"ok": false, "error": "refused"}\n'
    assert body["stage"] == "load" and "key compromise" in body["reason"]
    assert f"pid {peer['pid']} asked for the model key" in body["reason"]
    assert_nothing_served(url)
    log = proc.text()
    assert "model key handed to worker" not in log
    assert not any(f in log.encode() for f in key_forms(workspace.key_file))
