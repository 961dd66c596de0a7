"""Mutual attestation with one policy: the user's verify and the provider's KBS pin the same software.

The shared enclave runs as the provider set it up (tests/e2e/conftest.py ``provider``): init-data
pinning the model, key, vLLM options and run configuration; kbs-dev releasing the key only to
evidence satisfying the workload policy; the sample TEE carrying the init-data digest.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from attest.client import ServerRefused, attested_openai
from tests.e2e.conftest import (
    ES,
    KEY_ID,
    Enclave,
    Launcher,
    Workspace,
    child_env,
    wait_ready,
    write_init_data,
    write_policy,
)

pytestmark = pytest.mark.e2e


def verify(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ES, "verify", url, *args], capture_output=True, text=True, env=child_env(), timeout=120
    )


def test_verify_refuses_without_a_policy(enclave: Enclave) -> None:
    plain = verify(enclave.url)
    assert plain.returncode == 1 and "✗ tee" in plain.stdout  # the sample TEE, before anything else
    result = verify(enclave.url, "--allow-insecure-sample-tee")  # even with the development flag
    assert result.returncode == 1, result.stdout
    assert "✗ policy" in result.stdout and "no policy" in result.stdout
    unpinned = verify(enclave.url, "--allow-insecure-sample-tee", "--allow-unpinned-software")
    assert unpinned.returncode == 0 and "UNPINNED SOFTWARE" in unpinned.stdout


def test_the_providers_policy_verifies_on_the_users_side(enclave: Enclave) -> None:
    result = verify(enclave.url, "--policy", str(enclave.provider.policy), "--allow-insecure-sample-tee")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"verified: {enclave.url}"
    for step in (
        "policy:tee",
        "policy:workload.init_data",
        "policy:workload.model",
        "policy:workload.config",
    ):
        assert any(line.strip().startswith(f"✓ {step} ") for line in lines), step
    assert not any("✗" in line for line in lines)


def test_a_recorded_policy_passes_and_pins_what_runs(enclave: Enclave, tmp_path: Path) -> None:
    """The shared enclave was launched with init-data (``--sample-init-data``): ``policy record``
    pins its digest. Without init-data it refuses (tests/runtime/commands/test_policy.py)."""
    recorded = tmp_path / "recorded.toml"
    record = subprocess.run(
        [ES, "policy", "record", enclave.url, "-o", str(recorded), "--allow-insecure-sample-tee"],
        capture_output=True, text=True, env=child_env(), timeout=120,
    )  # fmt: skip
    assert record.returncode == 0, record.stdout + record.stderr
    from attest.verify.workload import WorkloadPolicy

    policy = WorkloadPolicy.load(recorded)
    assert policy.insecure_development and policy.tees == ("sample",)
    assert policy.workload.model == (enclave.ws.manifest_digest,)
    assert policy.workload.config == ("sha256:" + enclave.provider.config_sha256,)
    assert [f"{a}:{d.hex()}" for a, d in policy.workload.init_data or ()] == [
        enclave.provider.init_data_digest
    ]
    show = subprocess.run(
        [ES, "policy", "show", str(recorded)], capture_output=True, text=True, env=child_env()
    )
    assert show.returncode == 0 and "INSECURE DEVELOPMENT POLICY" in show.stdout
    assert verify(enclave.url, "--policy", str(recorded), "--allow-insecure-sample-tee").returncode == 0


@pytest.mark.parametrize(
    ("rule", "change"),
    [
        ("workload.model", {"model": "sha256:" + "00" * 32}),
        ("workload.config", {"config_sha256": "00" * 32}),
        # Another init-data document's digest (a zero pin would not even load: no init-data at all).
        ("workload.init_data", {"init_data": "sha384:" + hashlib.sha384(b"other init-data").hexdigest()}),
    ],
)
def test_a_policy_naming_other_software_refuses_with_the_rule_named(
    enclave: Enclave, tmp_path: Path, rule: str, change: dict[str, str]
) -> None:
    values = {
        "model": enclave.ws.manifest_digest,
        "config_sha256": enclave.provider.config_sha256,
        "init_data": enclave.provider.init_data_digest,
        **change,
    }
    policy = write_policy(tmp_path / "other.toml", **values)
    result = verify(enclave.url, "--policy", str(policy), "--allow-insecure-sample-tee", "--json")
    assert result.returncode == 1
    failed = [s for s in json.loads(result.stdout)["steps"] if not s["ok"]]
    assert [s["name"] for s in failed] == [f"policy:{rule}"]


def test_a_saved_bundle_verifies_offline_and_a_tampered_one_does_not(
    enclave: Enclave, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle.json"
    policy = str(enclave.provider.policy)
    assert (
        verify(
            enclave.url, "--policy", policy, "--allow-insecure-sample-tee", "--save", str(bundle)
        ).returncode
        == 0
    )
    offline = subprocess.run(
        [ES, "verify", "--offline", str(bundle), "--policy", policy, "--allow-insecure-sample-tee"],
        capture_output=True, text=True, env=child_env(), timeout=60,
    )  # fmt: skip
    assert offline.returncode == 0, offline.stdout
    saved = json.loads(bundle.read_text())
    saved["document"]["claims"]["model"]["manifest_digest"] = "sha256:" + "00" * 32
    bundle.write_text(json.dumps(saved))
    tampered = subprocess.run(
        [ES, "verify", "--offline", str(bundle), "--policy", policy, "--allow-insecure-sample-tee"],
        capture_output=True, text=True, env=child_env(), timeout=60,
    )  # fmt: skip
    assert tampered.returncode == 1 and "✗" in tampered.stdout


def test_attested_openai_requires_a_policy_then_chats_and_streams(enclave: Enclave) -> None:
    with pytest.raises(ServerRefused, match="no policy"):
        attested_openai(enclave.url, policy=None, allow_insecure=True)
    client = attested_openai(enclave.url, policy=enclave.provider.policy, allow_insecure=True)
    reply = client.chat.completions.create(
        model="tiny", max_tokens=8, temperature=0, messages=[{"role": "user", "content": "Hello!"}]
    )
    assert reply.choices[0].message.content
    stream = client.chat.completions.create(
        model="tiny",
        max_tokens=8,
        temperature=0,
        stream=True,
        messages=[{"role": "user", "content": "Hello!"}],
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        == reply.choices[0].message.content
    )
    import asyncio

    from attest.client import attested_async_openai

    async def chat() -> str:
        aclient = await attested_async_openai(
            enclave.url, policy=enclave.provider.policy, allow_insecure=True
        )
        r = await aclient.chat.completions.create(
            model="tiny", max_tokens=8, temperature=0, messages=[{"role": "user", "content": "Hello!"}]
        )
        return str(r.choices[0].message.content)

    assert asyncio.run(chat()) == reply.choices[0].message.content


def _pack_v2(ws: Workspace, tmp_path: Path) -> Path:
    """The same model packed again under the same key: another manifest, another identity."""
    v2 = tmp_path / "tiny-v2"
    subprocess.run(
        [ES, "pack", str(ws.plain), str(v2), "--key-id", KEY_ID, "--key-file", str(ws.key_file), "--no-progress"],
        check=True, env=child_env(), capture_output=True,
    )  # fmt: skip
    return v2


def test_a_runtime_whose_init_data_pins_v1_refuses_manifest_v2(
    enclave: Enclave, workspace: Workspace, launcher: Launcher, tmp_path: Path
) -> None:
    from loader.manifest import Manifest

    v2 = _pack_v2(workspace, tmp_path)
    assert Manifest.load(v2).digest != workspace.manifest_digest
    kbs_url = launcher.kbs("kbs-v2-manifest", workspace.key_file)
    # The host puts manifest v2 where the init-data (pinning v1) says the model is.
    init_v1, _ = write_init_data(
        workspace, "initdata-v1-at-v2", model_dir=v2, model=workspace.manifest_digest, kbs_url=kbs_url
    )
    url, proc = launcher.runtime("runtime-v2-manifest", v2, kbs_url, init_data=init_v1)
    body = wait_ready(url, proc, want_failure=True)
    assert body["stage"] == "config"
    assert f"the init-data pins model {workspace.manifest_digest}" in body["reason"]


def test_kbs_dev_releases_no_key_to_init_data_that_pins_v2(
    enclave: Enclave, workspace: Workspace, launcher: Launcher, tmp_path: Path
) -> None:
    from loader.manifest import Manifest

    v2 = _pack_v2(workspace, tmp_path)
    kbs_url = launcher.kbs(
        "kbs-policy-v1",
        workspace.key_file,
        "--resource-policy",
        f"enclave-serve/model-key/tiny={enclave.provider.policy}",
    )
    init_v2, _ = write_init_data(
        workspace, "initdata-v2", model_dir=v2, model=Manifest.load(v2).digest, kbs_url=kbs_url
    )
    url, proc = launcher.runtime("runtime-init-v2", v2, kbs_url, init_data=init_v2)
    body = wait_ready(url, proc, want_failure=True)
    assert body["stage"] == "key", body
    assert "PolicyDeny" in body["reason"] or "denied" in body["reason"].lower()
    for rule in ("workload.init_data", "workload.model", "workload.config"):
        assert rule in body["reason"], (rule, body["reason"])
