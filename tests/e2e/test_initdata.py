"""The init-data is the configuration, through the real CLI with the sample TEE.

The shared enclave is booted with only ``--init-data`` (and the sample TEE's register): it claims
the configuration digest ``initdata`` printed offline (test_trust.py checks the served bytes).
Here: the same digest from another directory and shell; every way the host can set what the
init-data pins, refused at ``config`` naming both values, before vLLM starts; and the register
rules at ``attest``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import (
    ES,
    VLLM_ARGS,
    Enclave,
    Launcher,
    Workspace,
    assert_nothing_served,
    child_env,
    wait_ready,
    write_init_data,
)

pytestmark = pytest.mark.e2e


def test_the_same_init_data_gives_the_same_digest_from_another_directory_and_shell(
    enclave: Enclave, workspace: Workspace, tmp_path: Path
) -> None:
    # The shared enclave, booted with only --init-data, claims what `initdata` printed offline.
    claims = httpx.get(enclave.url + "/.well-known/enclave-serve/attestation", params={"nonce": "55" * 32},
                       verify=False, timeout=60).json()["claims"]  # fmt: skip
    assert claims["config"] == {"sha256": enclave.provider.config_sha256}
    assert claims["init_data"] == {"digest": enclave.provider.init_data_digest}
    # Two operators, two shells and working directories, one init-data: one digest, the printed one.
    # (The pristine model: the shared enclave's copy has had its chat template rewritten by "the host".)
    init, shown = write_init_data(
        workspace, "initdata-pristine", model_dir=workspace.encrypted, model=workspace.manifest_digest,
        kbs_url=enclave.kbs_url,
    )  # fmt: skip
    shells = [
        child_env(),
        {**child_env(), "PATH": f"/opt/elsewhere/bin:{child_env()['PATH']}", "HOSTNAME": "operator-2",
         "LANG": "en_US.UTF-8", "TZ": "Europe/Paris", "KUBERNETES_SERVICE_HOST": "10.0.0.1"},
    ]  # fmt: skip
    printed = []
    for n, shell in enumerate(shells):
        cwd = tmp_path / f"operator-{n}"
        cwd.mkdir()
        out = subprocess.run(
            [ES, "run", "--init-data", str(init), "--print-config"],
            capture_output=True, env=shell, cwd=cwd, timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr.decode()
        assert f"config {shown['config_sha256']}".encode() in out.stderr
        printed.append(out.stdout)
    assert printed[0] == printed[1]


@pytest.mark.parametrize(
    ("scenario", "extra", "env", "named"),
    [
        ("an extra vLLM option", ("--", *VLLM_ARGS, "--max-num-seqs", "2"), {},
         "the vLLM options (after --): the init-data pins --enforce-eager"),
        ("a changed runtime flag", ("--watchdog-interval", "0"), {},
         "--watchdog-interval: the init-data pins 60.0, the command line gives 0"),
        ("an environment value not in the init-data", (), {"OMP_NUM_THREADS": "3"},
         "OMP_NUM_THREADS: the init-data pins (not set), the environment gives '3'"),
        ("a changed environment value", (), {"VLLM_CPU_KVCACHE_SPACE": "2"},
         "VLLM_CPU_KVCACHE_SPACE: the init-data pins '1', the environment gives '2'"),
    ],
)  # fmt: skip
def test_what_the_init_data_pins_cannot_be_changed_by_the_host(
    enclave: Enclave,
    workspace: Workspace,
    launcher: Launcher,
    scenario: str,
    extra: tuple[str, ...],
    env: dict[str, str],
    named: str,
) -> None:
    name = "runtime-pinned-" + scenario.replace(" ", "-")
    url, proc = launcher.runtime(
        name, workspace.served, "", *extra, env={**child_env(), **env}, init_data=enclave.provider.init_data
    )
    body = wait_ready(url, proc, want_failure=True)
    assert body["stage"] == "config", (scenario, body)
    assert named in body["reason"], (scenario, body["reason"])
    assert_nothing_served(url)
    assert "Initializing a V1 LLM engine" not in proc.text()


def test_a_register_without_its_init_data_or_with_another_file_is_refused(
    enclave: Enclave, workspace: Workspace, launcher: Launcher
) -> None:
    # The pristine model (the shared enclave's copy has had its chat template rewritten).
    launched, _ = write_init_data(
        workspace, "initdata-launched", model_dir=workspace.encrypted, model=workspace.manifest_digest,
        kbs_url=enclave.kbs_url,
    )  # fmt: skip
    # The guest was launched with init-data (the register holds its digest) but the host gives
    # none, and configures the runtime from flags.
    url, proc = launcher.runtime(
        "runtime-register-no-file", workspace.encrypted, enclave.kbs_url, "--sample-init-data", str(launched)
    )
    body = wait_ready(url, proc, want_failure=True)
    assert body["stage"] == "attest" and "no --init-data was given" in body["reason"], body
    assert_nothing_served(url)
    # The host gives another init-data file (its own options) than the one launched with.
    other, _ = write_init_data(
        workspace, "initdata-host", model_dir=workspace.encrypted, model=workspace.manifest_digest,
        kbs_url=enclave.kbs_url, vllm_extra=("--max-num-seqs", "2"),
    )  # fmt: skip
    argv = [ES, "run", "--init-data", str(other), "--sample-init-data", str(launched),
            "--exit-on-failure", "--port", "0"]  # fmt: skip
    refused = subprocess.run(argv, capture_output=True, text=True, env=child_env(), timeout=300)
    assert refused.returncode == 3, refused.stderr
    assert (
        "boot failed at stage attest: the init-data given is not the one this sample guest" in refused.stderr
    )
