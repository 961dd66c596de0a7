"""Kubernetes manifests for a confidential deployment (``enclave-serve deploy``, docs/deploy.md).

From the provider's init-data and the enclave image's digest, :func:`render` writes the files an
operator applies and the ones the provider still has to run:

* ``deployment.yaml``: the Deployment. Kata's runtime class for the TEE (NVIDIA's reference
  architecture: ``kata-qemu-nvidia-gpu-tdx`` / ``-snp``), every GPU of a node
  (``nvidia.com/pgpu``, plus the four NVSwitches of a Hopper HGX in protected-PCIe mode), the
  init-data as the Kata annotation (base64 of gzip, computed here from the TOML's exact bytes)
  and, through a Downward API volume, as the file the runtime reads
  (``/run/initdata/initdata.toml``: the runtime accepts the annotation form and checks its digest
  against MRCONFIGID/HOST_DATA), probes on the runtime's HTTPS endpoints sized for a large
  model's load, the hardened security context, the private directory as a memory ``emptyDir``,
  the encrypted model read-only from a PersistentVolumeClaim, and one pod per node.
* ``service.yaml`` and ``pdb.yaml``: the TLS port (passed through: each replica terminates TLS
  with its own attested key) and a disruption budget of one pod.
* ``genpolicy.sh``: the Kata ``genpolicy`` command for the agent policy, which goes back into
  the init-data, which changes the digest, so this is run again (the loop is in the file).
* ``trustee/``: the Trustee KBS policies of the workload policy (:mod:`attest.verify.trustee`,
  every ``gpuN`` submodule) and the ``kbs-client`` commands that install them.

``--tee sample`` writes the same shape for ``podman kube play`` on a development machine: no
runtime class, no GPUs, the init-data from a ConfigMap (podman 4.3 has no Downward API volume),
no probes, a host port; every file says INSECURE. :data:`PODMAN_DIFFERENCES` lists each change.

Checked here: the image is pinned by digest, the counts make sense (``--ppcie`` is 8 GPUs), the
init-data parses, declares enclave-serve's entry and agrees with the deployment (TEE, GPU
count, model location, private directory, no insecure mode on real hardware). Not checked here:
that the cluster has these runtime classes, labels and volumes, nor anything the runtime and the
verifiers check at boot (the register, the evidence, the policy).

Output is deterministic: the same inputs give the same bytes (no time, no randomness).
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import urlsplit

from attest.evidence import TeeKind
from attest.initdata import ENCLAVE_SERVE_ENTRY, INITDATA_ANNOTATION, InitData
from attest.tee import BACKENDS
from attest.verify.trustee import ExportRefused, export_policy, kbs_client_script
from attest.verify.workload import WorkloadPolicy
from foundation.errors import ConfigError
from runtime.config import RunConfig
from runtime.environment import REDACTED, SECRET_VALUES
from runtime.settings import resolve

__all__ = [
    "CC_LABELS",
    "IMAGE_PULL_TIMEOUT_ANNOTATION",
    "INITDATA_MOUNT",
    "MODEL_MOUNT",
    "PODMAN_DIFFERENCES",
    "RUNTIME_CLASSES",
    "DeploySpec",
    "render",
]

#: Kata runtime classes of NVIDIA's reference architecture, made by the kata-deploy chart
#: (NVIDIA/cloud-native-docs confidential-containers/configure-workloads.rst), by TEE: each
#: backend's ``kata_runtime_class`` (:class:`attest.tee.base.TeeBackend`).
RUNTIME_CLASSES: Mapping[TeeKind, str] = {
    kind: b.kata_runtime_class for kind, b in BACKENDS.items() if b.kata_runtime_class is not None
}


def _dev_tee(tee: TeeKind) -> bool:
    # The insecure development variant: a primary TEE whose evidence proves nothing (sample).
    found = BACKENDS.get(tee)
    return found is not None and found.insecure and not found.device


#: Node labels of the GPU Operator's CC manager (configure-cc-mode.rst): the desired mode (set
#: per node, ``ppcie`` is node-level and Hopper multi-GPU only) and the readiness it reports.
CC_LABELS = ("nvidia.com/cc.mode", "nvidia.com/cc.ready.state")
#: The Kata agent's image-pull timeout, raised through the kernel command line
#: (configure-image-pull-timeouts.rst: agent default 1200 s). The kernel command line is part of
#: the launch measurement (TDX RTMR, SNP with kernel hashes): measure with it.
IMAGE_PULL_TIMEOUT_ANNOTATION = (
    "io.katacontainers.config.hypervisor.kernel_params",
    "agent.image_pull_timeout=1800",
)
#: Where the runtime reads the init-data (the image's CMD; Containerfile).
INITDATA_MOUNT = PurePosixPath("/run/initdata")
INITDATA_FILE = "initdata.toml"
#: Where the encrypted model directory is mounted (the image's VOLUME).
MODEL_MOUNT = PurePosixPath("/models")
#: The runtime's user and group (Containerfile ``USER 10001:10001``; docs/operations.md).
RUNTIME_UID = 10001
#: The port the image's entrypoint listens on (``run --port 8000``).
CONTAINER_PORT = 8000
#: Resource names of NVIDIA's sandbox device plugin (configure-workloads.rst).
GPU_RESOURCE = "nvidia.com/pgpu"
NVSWITCH_RESOURCE = "nvidia.com/nvswitch"
#: A Hopper HGX board in protected-PCIe mode: 8 GPUs and 4 NVSwitches, all in one VM.
PPCIE_GPUS = 8
PPCIE_NVSWITCHES = 4
#: Probe periods (seconds); the startup probe's threshold is the budget divided by its period.
STARTUP_PERIOD_S = 10
#: Size of the private directory (kernel caches, the model view): counts against pod memory.
PRIVATE_DIR_SIZE = "4Gi"
#: The pod's /dev/shm for vLLM's engine (its shared-memory queues; NCCL between the GPUs of a
#: tensor-parallel group): containerd's default is 64 MiB, too small for vLLM (the CPU image
#: alone needs 160 MiB). Counts against pod memory. Never the runtime's private files.
SHM_SIZE = "8Gi"
#: Container shutdown: ``--drain-timeout`` (30 s) + 10 s to stop the engine + margin.
TERMINATION_GRACE_S = 45

#: How the ``--tee sample`` variant differs from the production manifest, and why.
PODMAN_DIFFERENCES = (
    "no runtimeClassName, no nvidia.com/pgpu or nvswitch, no CC node affinity: a plain container",
    "the init-data file comes from a ConfigMap holding the TOML, not a Downward API volume of the "
    "annotation (podman 4.3 kube play supports only HostPath, ConfigMap, EmptyDir and "
    "PersistentVolumeClaim volumes); the annotation is still set",
    "the container's arguments add --sample-init-data with the same file (it plays the register)",
    "no probes: podman 4.3 turns only livenessProbe into a curl healthcheck and cannot resolve a "
    "named port; poll /readyz instead",
    "the port is a hostPort (podman publishes nothing else); the Service is ignored by podman",
    "an emptyDir with medium Memory is a disk volume under podman: the init-data must declare "
    "--private-dir /dev/shm --allow-insecure-shared-private-dir, and no volume is mounted for it",
    "no /dev/shm volume either: the pod's /dev/shm is podman's tmpfs, sized by containers.conf "
    "shm_size (set 1g: vLLM needs more than the 64 MiB default)",
    "no Kata annotations (image-pull timeout), no genpolicy, no Trustee files (use kbs-dev)",
    "the PersistentVolumeClaim is a podman named volume: fill it with 'podman volume import'",
)

_DIGEST_REF = re.compile(r"^[a-z0-9][a-z0-9._/:-]*@sha256:[0-9a-f]{64}$")
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_SHM = "/dev/shm"


@dataclass(frozen=True, slots=True, kw_only=True)
class DeploySpec:
    """What to deploy: the TEE, the image, the init-data and the operator's choices.

    Construction checks the values (:meth:`check` checks them against the init-data).

    Raises:
        ConfigError: a value that cannot be deployed, with what to give instead.
    """

    tee: TeeKind
    image: str
    init_data: InitData
    init_data_source: str = INITDATA_FILE
    replicas: int = 1
    gpus: int = 0
    ppcie: bool = False
    name: str = "enclave-serve"
    namespace: str = "enclave-serve"
    model_claim: str | None = None
    memory: str = "64Gi"
    cpus: int = 16
    port: int = 443
    service_type: str = "ClusterIP"
    startup_minutes: int = 60
    allow_insecure_agent_policy: bool = False

    def __post_init__(self) -> None:
        if not _DIGEST_REF.match(self.image):
            raise ConfigError(
                f"--image {self.image} is not pinned by digest: give REF@sha256:<64 hex> (the agent "
                "policy and the attestation pin the image's digest; a tag can move)"
            )
        if self.replicas < 1:
            raise ConfigError(f"--replicas must be at least 1, not {self.replicas}")
        if _dev_tee(self.tee):
            if self.gpus != 0 or self.ppcie:
                raise ConfigError("--tee sample takes no --gpus or --ppcie (a CPU-only development pod)")
        elif self.tee in RUNTIME_CLASSES:
            if self.gpus < 1:
                raise ConfigError(
                    f"--gpus must be at least 1, not {self.gpus} (every GPU of a node goes to its one pod)"
                )
            if self.ppcie and self.gpus != PPCIE_GPUS:
                raise ConfigError(
                    f"--ppcie needs --gpus {PPCIE_GPUS}, not {self.gpus}: protected PCIe is Hopper HGX "
                    f"only, all {PPCIE_GPUS} GPUs and {PPCIE_NVSWITCHES} NVSwitches in one VM"
                )
        else:
            deployable = [k.value for k in RUNTIME_CLASSES] + [k.value for k in BACKENDS if _dev_tee(k)]
            raise ConfigError(
                f"cannot deploy --tee {self.tee.value}: {', '.join(deployable[:-1])} or {deployable[-1]}"
            )
        for flag, value in (("--name", self.name), ("--namespace", self.namespace),
                            ("--model-claim", self.model_claim)):  # fmt: skip
            if value is not None and not _DNS_LABEL.match(value):
                raise ConfigError(f"{flag} {value!r} is not a DNS label (lowercase letters, digits, '-')")
        if not _QUANTITY.match(self.memory):
            raise ConfigError(f"--memory {self.memory!r} is not a Kubernetes quantity such as 64Gi")
        if self.cpus < 1:
            raise ConfigError(f"--cpus must be at least 1, not {self.cpus}")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"--port must be 1 to 65535, not {self.port}")
        if self.startup_minutes < 1:
            raise ConfigError(f"--startup-minutes must be at least 1, not {self.startup_minutes}")

    @property
    def dev(self) -> bool:
        """Whether this is the insecure development variant (the sample TEE under podman)."""
        return _dev_tee(self.tee)

    @property
    def claim(self) -> str:
        """The model volume's PersistentVolumeClaim name."""
        return self.model_claim or f"{self.name}-models"

    def check(self) -> RunConfig:
        """Check the init-data against this deployment; return the configuration it declares.

        Raises:
            ConfigError: the init-data has no enclave-serve entry, declares another TEE or GPU
                count, a model outside the model volume, a private directory the pod cannot
                provide, an insecure mode on real hardware, or the development agent policy
                without ``allow_insecure_agent_policy``.
        """
        if ENCLAVE_SERVE_ENTRY not in self.init_data.data:
            raise ConfigError(
                f"the init-data {self.init_data_source} has no {ENCLAVE_SERVE_ENTRY} declaration: make it "
                "with 'enclave-serve initdata'"
            )
        config, _pins = resolve({}, self.init_data)
        where = f"the init-data {self.init_data_source}"
        if config.tee not in (self.tee.value, "auto"):
            raise ConfigError(
                f"{where} declares --tee {config.tee}; this deployment is --tee {self.tee.value}"
            )
        if self.dev:
            if config.gpus == "nvidia":
                raise ConfigError(f"{where} declares --gpus nvidia; the development pod has no GPU")
        else:
            if config.gpus not in ("nvidia", "auto"):
                raise ConfigError(
                    f"{where} declares --gpus {config.gpus}: the GPUs would not be attested (make it "
                    "with --gpus nvidia)"
                )
            if config.expected_gpus is not None and config.expected_gpus != self.gpus:
                raise ConfigError(
                    f"{where} declares --expected-gpus {config.expected_gpus}; this deployment gives "
                    f"each pod --gpus {self.gpus}"
                )
            insecure = [m for m in config.insecure_modes if "not pinned by init-data" not in m]
            if insecure:
                raise ConfigError(
                    f"{where} declares insecure mode(s): {'; '.join(insecure)}; not for --tee "
                    f"{self.tee.value} (make it again without the --allow-insecure-… options)"
                )
            if self.init_data.insecure_agent_policy and not self.allow_insecure_agent_policy:
                raise ConfigError(
                    f"{where} has the development agent policy, which pins nothing about the container: "
                    "give --allow-insecure-agent-policy to write the manifests genpolicy needs (then put "
                    "its policy.rego into the init-data and run deploy again), never to deploy them"
                )
            if str(config.private_dir) == _SHM:
                raise ConfigError(f"{where} declares --private-dir /dev/shm, which every container shares")
        model = _model_path(config.model)
        if model is not None and not model.is_relative_to(MODEL_MOUNT):
            raise ConfigError(
                f"{where} declares the model at {config.model}, outside {MODEL_MOUNT} where the model "
                f"volume is mounted (make it with 'enclave-serve initdata {MODEL_MOUNT}/NAME …')"
            )
        return config


def _model_path(model: str) -> PurePosixPath | None:
    """The model's directory in the container, or None for a registry the enclave pulls from."""
    if model.startswith("docker://"):
        return None
    if model.startswith("oci:"):
        model = model[4:].rsplit("@", 1)[0]
    return PurePosixPath(model)


# --- YAML ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Note:
    """A mapping value with a comment written above its key."""

    value: object
    comment: str


_PLAIN = re.compile(r"^[A-Za-z_/][A-Za-z0-9_./@-]*$")
_RESERVED = frozenset({"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"})


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if _PLAIN.match(value) and value.lower() not in _RESERVED:
            return value
        return json.dumps(value)
    raise TypeError(f"cannot write {type(value).__name__} as YAML")


def _literal_ok(text: str) -> bool:
    lines = text.split("\n")
    return (
        text.endswith("\n")
        and not text.endswith("\n\n")
        and not text.startswith((" ", "\n"))
        and all(line == line.rstrip() and line.isprintable() for line in lines)
    )


def _yaml(value: object, indent: int = 0) -> list[str]:
    """Block-style YAML lines for ``value`` (mappings keep their order: deterministic)."""
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(item, _Note):
                lines += [f"{pad}# {line}".rstrip() for line in item.comment.splitlines()]
                item = item.value
            head = f"{pad}{_scalar(key)}:"
            if isinstance(item, Mapping | list) and item:
                lines.append(head)
                lines += _yaml(item, indent + 2)
            elif isinstance(item, Mapping | list):
                lines.append(f"{head} {'{}' if isinstance(item, Mapping) else '[]'}")
            elif isinstance(item, str) and "\n" in item and _literal_ok(item):
                lines.append(f"{head} |")
                lines += [f"{pad}  {line}" if line else "" for line in item[:-1].split("\n")]
            else:
                lines.append(f"{head} {_scalar(item)}")
        return lines
    if isinstance(value, list):
        for item in value:
            if isinstance(item, Mapping | list) and item:
                inner = _yaml(item, indent + 2)
                lines.append(f"{pad}- {inner[0].lstrip()}")
                lines += inner[1:]
            else:
                lines.append(f"{pad}- {_scalar(item)}")
        return lines
    return [pad + _scalar(value)]


def _document(header: Sequence[str], objects: Sequence[Mapping[str, object]]) -> str:
    lines = [f"# {line}".rstrip() for line in header]
    for obj in objects:
        lines.append("---")
        lines += _yaml(obj)
    return "\n".join(lines) + "\n"


# --- the manifests -------------------------------------------------------------------------------


def _header(spec: DeploySpec, what: str) -> list[str]:
    lines = [
        f"{what}",
        "Generated by 'enclave-serve deploy' (docs/deploy.md); edit the inputs, not this file.",
        f"From the init-data {spec.init_data_source}, whose digest (TDX MRCONFIGID, SNP HOST_DATA) is",
        spec.init_data.digest_text,
        "and the image",
        spec.image,
    ]
    if spec.dev:
        lines += [
            "",
            "INSECURE, DEVELOPMENT ONLY: the sample TEE, whose evidence proves nothing, under",
            "'podman kube play'. Never deploy this to a cluster. It differs from the production",
            "manifest (--tee tdx|snp) in:",
            *(
                line
                for d in PODMAN_DIFFERENCES
                for line in textwrap.wrap(d, 92, initial_indent="  - ", subsequent_indent="    ")
            ),
        ]
    elif spec.init_data.insecure_agent_policy:
        lines += [
            "",
            "INSECURE: the init-data's agent policy is the development one, which pins nothing.",
            "This output is input for genpolicy only: DO NOT APPLY (genpolicy.sh says what next).",
        ]
    return lines


def _labels(spec: DeploySpec) -> dict[str, str]:
    return {"app.kubernetes.io/name": "enclave-serve", "app.kubernetes.io/instance": spec.name}


def _probe(path: str, period: int, **more: int) -> dict[str, object]:
    return {"httpGet": {"path": path, "port": "https", "scheme": "HTTPS"}, "periodSeconds": period,
            "timeoutSeconds": 5, **more}  # fmt: skip


def _startup_note(spec: DeploySpec) -> str:
    threshold = spec.startup_minutes * 60 // STARTUP_PERIOD_S
    return (
        f"Boot budget {spec.startup_minutes} min = failureThreshold {threshold} x periodSeconds "
        f"{STARTUP_PERIOD_S} s.\n"
        "Sized for a 70B model: 140 GB of encrypted bf16 weights pulled or read into the\n"
        "guest at ~50 MB/s is ~47 min (140e9 / 50e6 = 2800 s), then attest, key, decrypt into\n"
        "the GPUs and the canary (~10 min). Size it to your slowest boot (--startup-minutes):\n"
        "a failed boot answers 503 with its reason meanwhile, and the startup probe restarts\n"
        "the pod only after the budget."
    )


def _container(spec: DeploySpec, config: RunConfig) -> dict[str, object]:
    init_file = str(INITDATA_MOUNT / INITDATA_FILE)
    args = ["--init-data", init_file]
    if spec.dev:
        args += ["--sample-init-data", init_file]
    port: dict[str, object] = {"name": "https", "containerPort": CONTAINER_PORT, "protocol": "TCP"}
    if spec.dev:
        port["hostPort"] = spec.port
    limits: dict[str, object] = {"cpu": str(spec.cpus), "memory": spec.memory}
    if not spec.dev:
        limits[GPU_RESOURCE] = str(spec.gpus)
        if spec.ppcie:
            limits[NVSWITCH_RESOURCE] = str(PPCIE_NVSWITCHES)
    requests = {"cpu": str(spec.cpus), "memory": spec.memory}
    mounts: list[dict[str, object]] = [
        {"name": "initdata", "mountPath": str(INITDATA_MOUNT), "readOnly": True},
    ]
    if str(config.private_dir) != _SHM:
        mounts.append({"name": "enclave-private", "mountPath": str(config.private_dir)})
    if not spec.dev:
        mounts.append({"name": "dshm", "mountPath": _SHM})
    if _model_path(config.model) is not None:
        mounts.append({"name": "models", "mountPath": str(MODEL_MOUNT), "readOnly": True})
    container: dict[str, object] = {
        "name": "enclave-serve",
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "args": args,
    }
    secrets = sorted(
        n for n, v in (_declared_environment(spec)).items() if n in SECRET_VALUES and v == REDACTED
    )
    if secrets:
        container["env"] = _Note(
            [
                {"name": n, "valueFrom": {"secretKeyRef": {"name": f"{spec.name}-secrets", "key": n}}}
                for n in secrets
            ],
            f"Declared as {REDACTED} in the init-data: set, not pinned. Create the Secret first.",
        )
    container |= {
        "ports": [port],
        "resources": _Note(
            {"requests": requests, "limits": limits},
            "Kata sizes the VM from these (the vCPU count is part of an SNP launch measurement).\n"
            "Every GPU of the node goes to this one VM (configure-workloads.rst).",
        ),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNTIME_UID,
            "runAsGroup": RUNTIME_UID,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
    }
    if not spec.dev:
        threshold = spec.startup_minutes * 60 // STARTUP_PERIOD_S
        container |= {
            "startupProbe": _Note(
                _probe("/readyz", STARTUP_PERIOD_S, failureThreshold=threshold), _startup_note(spec)
            ),
            "readinessProbe": _probe("/readyz", 5, failureThreshold=2),
            "livenessProbe": _Note(
                _probe("/livez", 10, failureThreshold=6),
                "200 while the process runs, after a failed boot too (docs/operations.md).",
            ),
        }
    return container


def _declared_environment(spec: DeploySpec) -> Mapping[str, str]:
    pins = spec.init_data.pins
    return {} if pins is None else pins.environment


def _volumes(spec: DeploySpec, config: RunConfig) -> list[dict[str, object]]:
    if spec.dev:
        initdata: dict[str, object] = {
            "name": "initdata",
            "configMap": {
                "name": f"{spec.name}-initdata",
                "items": [{"key": INITDATA_FILE, "path": INITDATA_FILE}],
            },
        }
    else:
        field = f"metadata.annotations['{INITDATA_ANNOTATION}']"
        initdata = {
            "name": "initdata",
            "downwardAPI": {"items": [{"path": INITDATA_FILE, "fieldRef": {"fieldPath": field}}]},
        }
    volumes = [initdata]
    if str(config.private_dir) != _SHM:
        volumes.append(
            {"name": "enclave-private", "emptyDir": {"medium": "Memory", "sizeLimit": PRIVATE_DIR_SIZE}}
        )
    if not spec.dev:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}})
    if _model_path(config.model) is not None:
        volumes.append(
            {"name": "models", "persistentVolumeClaim": {"claimName": spec.claim, "readOnly": True}}
        )
    return volumes


def _affinity(spec: DeploySpec) -> dict[str, object]:
    selector = {"matchLabels": _labels(spec)}
    affinity: dict[str, object] = {
        "podAntiAffinity": _Note(
            {"requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": selector, "topologyKey": "kubernetes.io/hostname"}]},
            "One pod per node: all of a node's GPUs go to one VM.",
        )
    }  # fmt: skip
    if not spec.dev:
        mode, ready = CC_LABELS
        mode_rule = (
            {"key": mode, "operator": "In", "values": ["ppcie"]}
            if spec.ppcie
            else {"key": mode, "operator": "NotIn", "values": ["off", "ppcie"]}
        )
        affinity["nodeAffinity"] = _Note(
            {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [mode_rule, {"key": ready, "operator": "In", "values": ["true"]}]}]}},
            "CC mode as the GPU Operator's CC manager labels it (configure-cc-mode.rst); the\n"
            "runtime class adds the TEE's feature label.",
        )  # fmt: skip
    return affinity


def _deployment(spec: DeploySpec, config: RunConfig) -> dict[str, object]:
    annotations: dict[str, object] = {
        INITDATA_ANNOTATION: _Note(
            spec.init_data.annotation(),
            f"base64(gzip(init-data)); the runtime reads the init-data from {INITDATA_MOUNT} and checks\n"
            f"its digest against TDX MRCONFIGID / SNP HOST_DATA:\n{spec.init_data.digest_text}",
        ),
    }
    if not spec.dev:
        key, value = IMAGE_PULL_TIMEOUT_ANNOTATION
        annotations[key] = _Note(
            value,
            "The in-guest image pull (agent default 1200 s). Part of the measured kernel command\n"
            "line: the launch measurement in the workload policy must be taken with it.",
        )
    pod: dict[str, object] = {}
    if not spec.dev:
        pod["runtimeClassName"] = RUNTIME_CLASSES[spec.tee]
    pod |= {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNTIME_UID,
            "runAsGroup": RUNTIME_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "affinity": _affinity(spec),
        "containers": [_container(spec, config)],
        "volumes": _volumes(spec, config),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": _labels(spec)},
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": _labels(spec)},
            "strategy": _Note(
                {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
                "No surge: a new pod needs a whole free node.",
            ),
            "template": {
                "metadata": {"labels": _labels(spec), "annotations": annotations},
                "spec": pod,
            },
        },
    }


def _service(spec: DeploySpec) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": _labels(spec)},
        "spec": {
            "type": spec.service_type,
            "selector": _labels(spec),
            "ports": [{"name": "https", "port": spec.port, "targetPort": "https", "protocol": "TCP"}],
        },
    }


def _budget(spec: DeploySpec) -> dict[str, object]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": _labels(spec)},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _labels(spec)}},
    }


def _config_map(spec: DeploySpec) -> dict[str, object]:
    text = spec.init_data.raw.decode("utf-8")
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{spec.name}-initdata", "namespace": spec.namespace, "labels": _labels(spec)},
        "data": {INITDATA_FILE: text},
    }


def _genpolicy(spec: DeploySpec) -> str:
    return "\n".join([
        "#!/bin/sh",
        *(f"# {line}".rstrip() for line in _header(spec, "The Kata agent policy for deployment.yaml.")),
        "#",
        "# The chicken and the egg: the agent policy pins this pod spec, and lives in the init-data,",
        "# whose digest this pod spec carries. So, in this directory:",
        "#   1. genpolicy (Kata 4.1.0 or later) writes policy.rego for deployment.yaml, below;",
        "#   2. put it into the init-data: enclave-serve initdata … --agent-policy policy.rego -o FILE",
        "#      (the same options as before); the init-data digest changes;",
        "#   3. pin the new digest in the workload policy ([workload] init_data);",
        "#   4. run enclave-serve deploy again with the new init-data and --policy: its",
        "#      deployment.yaml (the same pod spec, the new annotation) is what you apply.",
        "# genpolicy rewrites the YAML it reads (it adds its own annotation): it reads a copy, and",
        "# -r prints the policy. -u caches image layers in ./layers_cache; -j names the settings",
        "# file of your Kata release (genpolicy-settings.json by default).",
        "set -eu",
        "cp deployment.yaml genpolicy-input.yaml",
        f"genpolicy -u -r -y genpolicy-input.yaml --initdata-path={INITDATA_FILE} > policy.rego",
        'echo "wrote policy.rego: enclave-serve initdata … --agent-policy policy.rego, then deploy again"',
        "",
    ])  # fmt: skip


def _trustee(spec: DeploySpec, policy: WorkloadPolicy, kbs_url: str, key_resource: str) -> dict[str, str]:
    if spec.tee.value not in policy.tees:
        raise ConfigError(f"the workload policy does not allow --tee {spec.tee.value} ([tee] allowed)")
    count = 0 if policy.gpu is None else policy.gpu.count
    if count != spec.gpus:
        raise ConfigError(
            f"the workload policy's [gpu] count is {count}; this deployment gives each pod --gpus "
            f"{spec.gpus}: Trustee would refuse every replica's key"
        )
    try:
        export = export_policy(policy, [spec.init_data])
    except ExportRefused as exc:
        raise ConfigError(f"the workload policy cannot be exported for Trustee: {exc}") from None
    head = [f"# {line}".rstrip() for line in _header(spec, "Trustee KBS policies of the workload policy.")]
    files = {f"trustee/{name}": "\n".join(head) + "\n" + text for name, text in export.files().items()}
    pins = spec.init_data.pins
    pem = None if pins is None else pins.settings.get("kbs_ca_pem")
    cacert = None
    if isinstance(pem, str):  # the KBS's private CA, as the init-data pins it for the enclave
        cacert = "kbs-ca.pem"
        files[f"trustee/{cacert}"] = pem.strip() + "\n"
    shebang, _, script = kbs_client_script(export, kbs_url=kbs_url, cacert=cacert).partition("\n")
    key = urlsplit(key_resource).path.strip("/")
    cert = "" if cacert is None else f" --cert-file {cacert}"
    files["trustee/kbs-client.sh"] = "\n".join([
        shebang, *head, script.rstrip("\n"),
        "# The model key itself is the provider's and never in this directory; install it with:",
        f"# kbs-client --url {kbs_url}{cert} config --admin-token-file admin.jwt \\",
        f"#     set-resource --path {key} --resource-file model.key",
        "",
    ])  # fmt: skip
    return files


def render(spec: DeploySpec, policy: WorkloadPolicy | None = None) -> dict[str, str]:
    """Return the files of the deployment, by path relative to the output directory.

    ``policy`` (the workload policy the KBS releases the key under) adds the Trustee files;
    it is required on real hardware unless the init-data has the development agent policy.

    Raises:
        ConfigError: the init-data does not fit the deployment (:meth:`DeploySpec.check`), no
            policy for a final deployment, or a policy that does not fit it or Trustee.
    """
    config = spec.check()
    deployment = _deployment(spec, config)
    files: dict[str, str] = {}
    if spec.dev:
        files["deployment.yaml"] = _document(
            _header(spec, "The development pod: podman kube play deployment.yaml"),
            [_config_map(spec), deployment],
        )
    else:
        files["deployment.yaml"] = _document(_header(spec, "The enclave's Deployment."), [deployment])
        files["genpolicy.sh"] = _genpolicy(spec)
    files["service.yaml"] = _document(
        _header(spec, "The TLS port, passed through: each replica has its own attested TLS key."),
        [_service(spec)],
    )
    files[INITDATA_FILE] = spec.init_data.raw.decode("utf-8")
    files["pdb.yaml"] = _document(_header(spec, "At most one replica down at a time."), [_budget(spec)])
    if not spec.dev:
        if policy is None and not spec.init_data.insecure_agent_policy:
            raise ConfigError(
                "give --policy FILE: the workload policy the KBS releases the model key under (the "
                "Trustee files are written from it)"
            )
        if policy is not None:
            pins = spec.init_data.pins
            assert pins is not None  # check() refused an init-data without the entry
            files |= _trustee(spec, policy, config.kbs_url or "https://kbs:8080", pins.key_resource)
    return dict(sorted(files.items()))
