"""``enclave-serve deploy``: the manifests, their refusals, and the linters they pass (real CLI)."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import gzip
import io
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from attest.evidence import TeeKind
from attest.initdata import INITDATA_ANNOTATION, InitData
from attest.verify.workload import WorkloadPolicy
from runtime.cli import main
from runtime.deploy import PODMAN_DIFFERENCES
from tests.attest.support import TEST_RUNTIME_FACTS

REPO = Path(__file__).resolve().parents[2]
IMAGE = "registry.example/enclave-serve@sha256:" + "b" * 64
MODEL = "sha256:" + "ab" * 32
KEY_PATH = "enclave-serve/model-key/llama"
#: The Kubernetes versions the manifests are validated against: 1.32, the oldest minor NVIDIA's
#: reference architecture still reaches (below 1.34 it needs the KubeletPodResourcesGet feature
#: gate; ../shared/reference/deployment.md), and 1.35, a current one.
KUBERNETES_VERSIONS = ("1.32.0", "1.35.0")
AGENT_POLICY = "package agent_policy\n\ndefault CreateContainerRequest := true\n"


def es(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


@dataclasses.dataclass(frozen=True)
class Inputs:
    """An init-data made by ``enclave-serve initdata`` and a workload policy pinning it."""

    init_data: Path
    policy: Path
    init: InitData


def _initdata(root: Path, tee: str, gpus: int, *extra: str, insecure_policy: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    facts = root / "image-facts.json"
    facts.write_text(json.dumps({**TEST_RUNTIME_FACTS, "environment": {}}))
    (root / "policy.rego").write_text(AGENT_POLICY)
    out = root / "initdata.toml"
    agent = (
        ["--allow-insecure-agent-policy"]
        if insecure_policy
        else ["--agent-policy", str(root / "policy.rego")]
    )
    gpu_args = ["--gpus", "nvidia", "--expected-gpus", str(gpus)] if gpus else []
    secret = ["--env", "VLLM_API_KEY=<redacted>"] if gpus else []  # a pod secret (the podman test sets none)
    code, _, err = es("initdata", "/models/llama", "--expect-model", MODEL, "--key-id", f"kbs:///{KEY_PATH}",
                      "--kbs-url", "https://kbs.example:8080", *agent, "--image-facts", str(facts),
                      "--tee", tee, *gpu_args, *extra, *secret, "-o", str(out), "--json")  # fmt: skip
    assert code == 0, err
    return out


def _policy(root: Path, init: InitData, tee: str, gpus: int) -> Path:
    """The vectors' policy (tests/kbs) re-pinned to ``init``: regorus can then evaluate the export."""
    from tests.kbs.test_trustee_export import snp_policy, tdx_policy, with_workload

    pins = init.pins
    assert pins is not None
    base = tdx_policy(gpus) if tee == "tdx" else snp_policy(gpus)
    policy = with_workload(base, model=(MODEL,), config=("sha256:" + pins.config_sha256,),
                           init_data=((init.algorithm, init.digest),))  # fmt: skip
    path = root / "policy.toml"
    path.write_text(policy.to_toml())
    assert WorkloadPolicy.load(path) == policy
    return path


def _inputs(root: Path, tee: str, gpus: int) -> Inputs:
    init_path = _initdata(root, tee, gpus)
    init = InitData.from_bytes(init_path.read_bytes())
    return Inputs(init_path, _policy(root, init, tee, gpus), init)


@pytest.fixture(scope="module")
def tdx(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    return _inputs(tmp_path_factory.mktemp("tdx"), "tdx", 8)


@pytest.fixture(scope="module")
def snp(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    return _inputs(tmp_path_factory.mktemp("snp"), "snp", 1)


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _initdata(tmp_path_factory.mktemp("sample"), "sample", 0, "--allow-insecure-sample-tee", "--gpus",
                     "none", "--private-dir", "/dev/shm", "--allow-insecure-shared-private-dir",
                     insecure_policy=True)  # fmt: skip


def deploy_tdx(tdx: Inputs, out: Path, *more: str) -> tuple[int, str, str]:
    return es("deploy", "--tee", "tdx", "--image", IMAGE, "--init-data", str(tdx.init_data), "--gpus", "8",
              "--ppcie", "--replicas", "2", "--policy", str(tdx.policy), "-o", str(out), *more)  # fmt: skip


def deploy_sample(sample: Path, out: Path) -> tuple[int, str, str]:
    return es("deploy", "--tee", "sample", "--allow-insecure-sample-tee", "--image", IMAGE, "--init-data",
              str(sample), "--memory", "4Gi", "--cpus", "2", "--port", "18443", "-o", str(out))  # fmt: skip


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kind(out: Path, name: str) -> dict[str, Any]:
    return next(d for p in sorted(out.glob("*.yaml")) for d in documents(p) if d["kind"] == name)


def walk(obj: object) -> Iterator[tuple[str, object]]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield key, value
            yield from walk(value)
    elif isinstance(obj, list):
        for item in obj:
            yield from walk(item)


@pytest.fixture(scope="module")
def tdx_out(tdx: Inputs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tdx-out")
    code, stdout, err = deploy_tdx(tdx, out)
    assert code == 0, err
    assert "kubectl apply" in stdout
    return out


# -- the production manifest --------------------------------------------------------------------


def test_tdx_ppcie_deployment_has_the_runtime_class_every_gpu_and_the_nvswitches(tdx_out: Path) -> None:
    deployment = kind(tdx_out, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "kata-qemu-nvidia-gpu-tdx"
    (container,) = pod["containers"]
    assert container["image"] == IMAGE
    assert container["resources"]["limits"]["nvidia.com/pgpu"] == "8"
    assert container["resources"]["limits"]["nvidia.com/nvswitch"] == "4"
    assert container["args"] == ["--init-data", "/run/initdata/initdata.toml"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert {"key": "nvidia.com/cc.mode", "operator": "In", "values": ["ppcie"]} in terms[0][
        "matchExpressions"
    ]


def test_the_annotation_decodes_to_the_exact_init_data_and_the_runtime_reads_it(
    tdx: Inputs, tdx_out: Path
) -> None:
    template = kind(tdx_out, "Deployment")["spec"]["template"]
    annotation = template["metadata"]["annotations"][INITDATA_ANNOTATION]
    assert gzip.decompress(base64.b64decode(annotation)) == tdx.init_data.read_bytes()
    assert InitData.load(annotation.encode()).raw == tdx.init.raw  # the runtime's --init-data parser
    assert template["metadata"]["annotations"]["io.katacontainers.config.hypervisor.kernel_params"] == (
        "agent.image_pull_timeout=1800"
    )
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    (item,) = volumes["initdata"]["downwardAPI"]["items"]
    assert item == {"path": "initdata.toml",
                    "fieldRef": {"fieldPath": f"metadata.annotations['{INITDATA_ANNOTATION}']"}}  # fmt: skip
    assert (tdx_out / "initdata.toml").read_bytes() == tdx.init.raw
    header = (tdx_out / "deployment.yaml").read_text().split("---")[0]
    assert "enclave-serve deploy" in header and tdx.init.digest_text in header


def test_the_pod_is_hardened_and_mounts_only_its_four_volumes(tdx_out: Path) -> None:
    pod = kind(tdx_out, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }  # fmt: skip
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(volumes) == {"initdata", "enclave-private", "dshm", "models"}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert volumes["enclave-private"]["emptyDir"]["medium"] == "Memory"
    assert volumes["models"]["persistentVolumeClaim"] == {
        "claimName": "enclave-serve-models",
        "readOnly": True,
    }
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["enclave-private"]["mountPath"] == "/run/enclave-serve"
    assert mounts["models"] == {"name": "models", "mountPath": "/models", "readOnly": True}
    assert mounts["initdata"]["readOnly"] is True
    assert mounts["dshm"]["mountPath"] == "/dev/shm"
    for path in tdx_out.glob("*.yaml"):
        assert not [k for d in documents(path) for k, _ in walk(d) if k == "hostPath"], path


def test_probes_use_the_https_endpoints_and_the_startup_budget(tdx_out: Path) -> None:
    (container,) = kind(tdx_out, "Deployment")["spec"]["template"]["spec"]["containers"]
    for probe, path in (
        ("startupProbe", "/readyz"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/livez"),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": "https", "scheme": "HTTPS"}
    startup = container["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] == 60 * 60
    assert "140e9 / 50e6 = 2800 s" in (tdx_out / "deployment.yaml").read_text()


def test_one_pod_per_node(tdx_out: Path) -> None:
    deployment = kind(tdx_out, "Deployment")
    anti = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    (term,) = anti["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_the_service_passes_tls_through_and_the_budget_allows_one_down(tdx_out: Path) -> None:
    service = kind(tdx_out, "Service")
    assert service["spec"]["ports"] == [
        {"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}
    ]
    assert kind(tdx_out, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_the_secret_variable_comes_from_a_secret(tdx_out: Path) -> None:
    (container,) = kind(tdx_out, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["env"] == [{"name": "VLLM_API_KEY",
                                 "valueFrom": {"secretKeyRef": {"name": "enclave-serve-secrets", "key": "VLLM_API_KEY"}}}]  # fmt: skip


def test_genpolicy_command_and_the_loop_back_into_the_init_data(tdx_out: Path) -> None:
    script = (tdx_out / "genpolicy.sh").read_text()
    assert "genpolicy -u -r -y genpolicy-input.yaml --initdata-path=initdata.toml > policy.rego" in script
    assert "--agent-policy policy.rego" in script and "run enclave-serve deploy again" in script


def test_snp_manifest(snp: Inputs, tmp_path: Path) -> None:
    code, _, err = es("deploy", "--tee", "snp", "--image", IMAGE, "--init-data", str(snp.init_data), "--gpus", "1",
                      "--policy", str(snp.policy), "-o", str(tmp_path))  # fmt: skip
    assert code == 0, err
    pod = kind(tmp_path, "Deployment")["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "kata-qemu-nvidia-gpu-snp"
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/pgpu"] == "1" and "nvidia.com/nvswitch" not in limits
    match = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert {"key": "nvidia.com/cc.mode", "operator": "NotIn", "values": ["off", "ppcie"]} in match[
        "nodeSelectorTerms"
    ][0]["matchExpressions"]
    assert (tmp_path / "trustee" / "resource-policy.rego").exists()


# -- Trustee ------------------------------------------------------------------------------------


def test_a_private_kbs_ca_in_the_init_data_goes_to_every_kbs_client_command(tmp_path: Path) -> None:
    from tests.kbs.support import make_pki

    pki = make_pki(tmp_path, "kbs")
    init_path = _initdata(tmp_path / "in", "snp", 1, "--kbs-cacert", str(pki.ca_pem))
    init = InitData.from_bytes(init_path.read_bytes())
    policy = _policy(tmp_path / "in", init, "snp", 1)
    out = tmp_path / "out"
    code, _, err = es("deploy", "--tee", "snp", "--image", IMAGE, "--init-data", str(init_path), "--gpus", "1",
                      "--policy", str(policy), "-o", str(out))  # fmt: skip
    assert code == 0, err
    assert (out / "trustee" / "kbs-ca.pem").read_text().strip() == pki.ca_pem.read_text().strip()
    commands = [
        line for line in (out / "trustee" / "kbs-client.sh").read_text().splitlines() if "kbs-client " in line
    ]
    assert len(commands) == 4  # two attestation policies, the resource policy, the key (commented)
    assert all(
        "kbs-client --url https://kbs.example:8080 --cert-file kbs-ca.pem config " in c for c in commands
    )


def test_the_trustee_export_requires_every_one_of_the_eight_gpus(tdx: Inputs, tdx_out: Path) -> None:
    from tests.kbs.test_trustee_export import HOPPERS, TDX, launched
    from tests.kbs.trustee_support import allows, token

    trustee = tdx_out / "trustee"
    policies = {
        i: (trustee / f"attestation-policy-{i}.rego").read_text() for i in ("default_cpu", "default_gpu")
    }
    resource = (trustee / "resource-policy.rego").read_text()
    claims = token(launched(TDX, tdx.init), (HOPPERS,), tdx.init, policies)
    assert sorted(claims["submods"]) == ["cpu0", *(f"gpu{i}" for i in range(8))]
    assert allows(resource, claims, KEY_PATH)
    for i in range(8):
        claims["submods"][f"gpu{i}"]["ear.status"] = "warning"
        assert not allows(resource, claims, KEY_PATH), f"gpu{i}"
        claims["submods"][f"gpu{i}"]["ear.status"] = "affirming"
    del claims["submods"]["gpu7"]
    assert not allows(resource, claims, KEY_PATH)
    script = (trustee / "kbs-client.sh").read_text()
    assert script.startswith("#!/bin/sh\n")
    for line in ("set-attestation-policy --type rego --id default_cpu", "set-attestation-policy --type rego --id "
                 "default_gpu", "set-resource-policy --policy-file resource-policy.rego"):  # fmt: skip
        assert (
            f"kbs-client --url https://kbs.example:8080 config --admin-token-file admin.jwt {line}" in script
        )


# -- the development variant --------------------------------------------------------------------


def test_the_sample_variant_is_marked_insecure_and_has_no_kata_or_gpu(sample: Path, tmp_path: Path) -> None:
    code, _, err = deploy_sample(sample, tmp_path)
    assert code == 0, err
    assert "INSECURE, DEVELOPMENT ONLY" in err
    text = (tmp_path / "deployment.yaml").read_text()
    assert "INSECURE, DEVELOPMENT ONLY" in text
    for difference in PODMAN_DIFFERENCES:
        assert " ".join(difference.split()[:6]) in " ".join(text.split())
    config_map, deployment = documents(tmp_path / "deployment.yaml")
    assert config_map["data"]["initdata.toml"].encode() == sample.read_bytes()
    pod = deployment["spec"]["template"]["spec"]
    assert "runtimeClassName" not in pod and "nodeAffinity" not in pod["affinity"]
    (container,) = pod["containers"]
    assert "nvidia.com/pgpu" not in container["resources"]["limits"]
    assert container["args"] == ["--init-data", "/run/initdata/initdata.toml",
                                 "--sample-init-data", "/run/initdata/initdata.toml"]  # fmt: skip
    assert container["ports"][0]["hostPort"] == 18443
    assert {v["name"] for v in pod["volumes"]} == {"initdata", "models"}  # /dev/shm: no emptyDir
    assert not (tmp_path / "genpolicy.sh").exists() and not (tmp_path / "trustee").exists()


# -- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ["--image", "registry.example/enclave-serve:1.0"],
            "--image registry.example/enclave-serve:1.0 is not pinned by digest: give REF@sha256:<64 hex> (the "
            "agent policy and the attestation pin the image's digest; a tag can move)",
        ),
        (
            ["--gpus", "4"],
            "--ppcie needs --gpus 8, not 4: protected PCIe is Hopper HGX only, all 8 GPUs and 4 NVSwitches in "
            "one VM",
        ),
        (["--gpus", "0"], "--gpus must be at least 1, not 0 (every GPU of a node goes to its one pod)"),
        (["--replicas", "0"], "--replicas must be at least 1, not 0"),
        (
            ["--init-data", "/nonexistent/initdata.toml"],
            "cannot read the init-data /nonexistent/initdata.toml: No such file or directory",
        ),
        (["--tee", "snp"], "the init-data initdata.toml declares --tee tdx; this deployment is --tee snp"),
        (["--memory", "lots"], "--memory 'lots' is not a Kubernetes quantity such as 64Gi"),
    ],
    ids=[
        "tag-without-digest",
        "ppcie-without-8-gpus",
        "no-gpus",
        "no-replicas",
        "unreadable-init-data",
        "another-tee",
        "bad-memory",
    ],
)
def test_refusals(tdx: Inputs, tmp_path: Path, change: list[str], message: str) -> None:
    argv = ["deploy", "--tee", "tdx", "--image", IMAGE, "--init-data", str(tdx.init_data), "--gpus", "8",
            "--ppcie", "--replicas", "2", "--policy", str(tdx.policy), "-o", str(tmp_path / "out")]  # fmt: skip
    for flag, value in zip(change[::2], change[1::2], strict=True):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    code, _, err = es(*argv)
    assert code == 1
    assert err.strip() == f"enclave-serve deploy: ConfigError: {message}"
    assert not (tmp_path / "out").exists()


def test_malformed_init_data_is_refused(tdx: Inputs, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('version = "0.2.0"\nalgorithm = "sha384"\n')
    code, _, err = deploy_tdx(dataclasses.replace(tdx, init_data=bad), tmp_path / "out")
    assert code == 1
    assert err.strip() == (
        f"enclave-serve deploy: ConfigError: the init-data {bad}: init-data version must be '0.1.0', not '0.2.0'"
    )


def test_a_policy_for_another_gpu_count_is_refused(tdx: Inputs, snp: Inputs, tmp_path: Path) -> None:
    policy = _policy(tmp_path, tdx.init, "tdx", 4)
    code, _, err = deploy_tdx(dataclasses.replace(tdx, policy=policy), tmp_path / "out")
    assert code == 1
    assert "the workload policy's [gpu] count is 4; this deployment gives each pod --gpus 8" in err


def test_the_development_agent_policy_needs_its_flag_and_makes_genpolicy_input_only(tmp_path: Path) -> None:
    init = _initdata(tmp_path, "tdx", 8, insecure_policy=True)
    argv = ["deploy", "--tee", "tdx", "--image", IMAGE, "--init-data", str(init), "--gpus", "8", "-o",
            str(tmp_path / "out")]  # fmt: skip
    code, _, err = es(*argv)
    assert code == 1 and "give --allow-insecure-agent-policy to write the manifests genpolicy needs" in err
    code, _, err = es(*argv, "--allow-insecure-agent-policy")
    assert code == 0, err
    assert "Do NOT apply this output" in err
    assert "DO NOT APPLY" in (tmp_path / "out" / "deployment.yaml").read_text()
    assert (tmp_path / "out" / "genpolicy.sh").exists() and not (tmp_path / "out" / "trustee").exists()


def test_a_final_deployment_needs_the_workload_policy(tdx: Inputs, tmp_path: Path) -> None:
    code, _, err = es("deploy", "--tee", "tdx", "--image", IMAGE, "--init-data", str(tdx.init_data), "--gpus", "8",
                      "-o", str(tmp_path / "out"))  # fmt: skip
    assert code == 1 and "give --policy FILE" in err


def test_the_sample_tee_needs_its_flag(sample: Path, tmp_path: Path) -> None:
    code, _, err = es(
        "deploy", "--tee", "sample", "--image", IMAGE, "--init-data", str(sample), "-o", str(tmp_path)
    )
    assert code == 1 and "give --allow-insecure-sample-tee" in err


# -- linters and determinism --------------------------------------------------------------------


def _yaml_files(tdx: Inputs, snp: Inputs, sample: Path, root: Path) -> list[Path]:
    assert deploy_tdx(tdx, root / "tdx")[0] == 0
    assert es("deploy", "--tee", "snp", "--image", IMAGE, "--init-data", str(snp.init_data), "--gpus", "1",
              "--policy", str(snp.policy), "-o", str(root / "snp"))[0] == 0  # fmt: skip
    assert deploy_sample(sample, root / "sample")[0] == 0
    return sorted(root.glob("*/*.yaml"))


def test_the_manifests_pass_kubernetes_validate(
    tdx: Inputs, snp: Inputs, sample: Path, tmp_path: Path
) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    checked = 0
    for path in _yaml_files(tdx, snp, sample, tmp_path):
        for document in documents(path):
            for version in KUBERNETES_VERSIONS:
                kubernetes_validate.validate(document, version, strict=True)
                checked += 1
    assert checked == 2 * (3 * 3 + 1)  # Deployment, Service, budget x3, and the ConfigMap


def test_the_manifests_pass_yamllint_with_the_repository_config(
    tdx: Inputs, snp: Inputs, sample: Path, tmp_path: Path
) -> None:
    pytest.importorskip("yamllint")
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(file=str(REPO / ".yamllint"))
    for path in _yaml_files(tdx, snp, sample, tmp_path):
        problems = list(linter.run(path.read_text(), config))
        assert not problems, f"{path}: {[str(p) for p in problems]}"


def test_the_same_inputs_give_the_same_bytes(tdx: Inputs, tmp_path: Path) -> None:
    assert deploy_tdx(tdx, tmp_path / "a")[0] == 0
    assert deploy_tdx(tdx, tmp_path / "b")[0] == 0
    a = {
        p.relative_to(tmp_path / "a"): p.read_bytes()
        for p in sorted((tmp_path / "a").rglob("*"))
        if p.is_file()
    }
    b = {
        p.relative_to(tmp_path / "b"): p.read_bytes()
        for p in sorted((tmp_path / "b").rglob("*"))
        if p.is_file()
    }
    assert a == b and len(a) == 9


def test_the_register_of_the_manifest_init_data(tdx: Inputs, tdx_out: Path) -> None:
    """What the hardware will hold for this manifest (the runtime compares it at stage attest)."""
    template = kind(tdx_out, "Deployment")["spec"]["template"]
    init = InitData.from_annotation(template["metadata"]["annotations"][INITDATA_ANNOTATION])
    assert init.register(TeeKind.TDX) == tdx.init.register(TeeKind.TDX)


# -- podman ------------------------------------------------------------------------------------


def test_podman_kube_play_creates_the_sample_variant(sample: Path, tmp_path: Path) -> None:
    """``podman kube play --start=false`` creates the pod, its volumes and its container from the
    variant (an empty local image: nothing runs). Skipped without podman."""
    podman = shutil.which("podman")
    if podman is None:
        pytest.skip("podman is not installed")
    conf = tmp_path / "containers.conf"
    conf.write_text("[containers]\ndefault_ulimits = []\n")
    env = {"CONTAINERS_CONF": str(conf), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
    base = [podman, "--runtime", "runc", "--cgroup-manager", "cgroupfs"]

    def podman_run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*base, *args], input=stdin, capture_output=True, timeout=120, env=env)

    name = f"deploytest{tmp_path.name.rsplit('_', 1)[-1].lower()}"[:40].rstrip("-") or "deploytest"
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"\0" * 10240)  # an empty tar archive
    tag = f"localhost/{name}:empty"
    imported = podman_run("import", str(empty), tag)
    if imported.returncode != 0:
        pytest.skip(f"podman cannot import an image here: {imported.stderr.decode()[-300:]}")
    out = tmp_path / "dev"
    try:
        digest = podman_run("image", "inspect", "--format", "{{.Digest}}", tag).stdout.decode().strip()
        code, _, err = es("deploy", "--tee", "sample", "--allow-insecure-sample-tee", "--image",
                          f"localhost/{name}@{digest}", "--init-data", str(sample), "--name", name, "-o", str(out))  # fmt: skip
        assert code == 0, err
        played = podman_run("kube", "play", "--start=false", str(out / "deployment.yaml"))
        assert played.returncode == 0, played.stderr.decode()
        volumes = podman_run("volume", "ls", "--format", "{{.Name}}").stdout.decode().split()
        assert {f"{name}-initdata", f"{name}-models"} <= set(volumes)
        inspect = podman_run("container", "inspect", f"{name}-pod-0-enclave-serve")
        assert inspect.returncode == 0, inspect.stderr.decode()
        (container,) = json.loads(inspect.stdout)
        assert container["Config"]["User"] == "10001:10001"
        assert container["HostConfig"]["ReadonlyRootfs"] is True
        assert container["Config"]["Cmd"][-4:] == ["--init-data", "/run/initdata/initdata.toml",
                                          "--sample-init-data", "/run/initdata/initdata.toml"]  # fmt: skip
    finally:
        if (out / "deployment.yaml").exists():
            podman_run("kube", "down", str(out / "deployment.yaml"))
        podman_run("volume", "rm", "-f", f"{name}-initdata", f"{name}-models")
        podman_run("rmi", "-f", tag)


def test_the_kata_runtime_classes_are_the_descriptors() -> None:
    from attest.tee import BACKENDS
    from runtime.deploy import RUNTIME_CLASSES

    assert {
        k: b.kata_runtime_class for k, b in BACKENDS.items() if b.kata_runtime_class is not None
    } == RUNTIME_CLASSES
    assert RUNTIME_CLASSES == {
        TeeKind.TDX: "kata-qemu-nvidia-gpu-tdx",
        TeeKind.SNP: "kata-qemu-nvidia-gpu-snp",
    }
