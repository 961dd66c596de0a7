"""``enclave-serve deploy``: Kubernetes manifests from the init-data and the image digest.

``deploy --tee tdx|snp --image REF@sha256:… --init-data FILE --gpus N [--ppcie] --policy FILE -o DIR``
writes the Deployment (Kata runtime class, every GPU of a node, the init-data annotation and its
Downward API file, probes, security context), the Service, the disruption budget, the
``genpolicy`` command for the Kata agent policy and the Trustee policies with the ``kbs-client``
commands that install them (:mod:`runtime.deploy`, docs/deploy.md). ``--tee sample
--allow-insecure-sample-tee`` writes the same shape for ``podman kube play`` (development only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from attest.tee.select import primary_choices

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "deploy",
        help="write the Kubernetes manifests, the genpolicy command and the Trustee policies of a "
        "deployment (docs/deploy.md)",
        usage="enclave-serve deploy --tee tdx|snp --image REF@sha256:… --init-data FILE --gpus N [--ppcie] "
        "--policy FILE [--replicas N] [options] -o DIR",
        description="Write the Kubernetes manifests of a confidential deployment from the init-data "
        "('enclave-serve initdata') and the enclave image pinned by digest: the Deployment, the Service, "
        "a PodDisruptionBudget, the genpolicy command for the Kata agent policy, and the Trustee "
        "policies of the workload policy with the kbs-client commands that install them. "
        "--tee sample writes the same shape for 'podman kube play' (DEVELOPMENT ONLY).",
    )
    p.add_argument("--tee", choices=primary_choices()[1:], required=True, help="the CPU TEE of the nodes")
    p.add_argument(
        "--image", required=True, metavar="REF@sha256:…", help="the enclave image, pinned by digest"
    )
    p.add_argument(
        "--init-data",
        type=Path,
        required=True,
        metavar="FILE",
        help="the init-data ('enclave-serve initdata -o FILE'; the TOML or the annotation)",
    )
    p.add_argument(
        "--gpus",
        type=int,
        default=0,
        metavar="N",
        help="GPUs per pod: all of a node's (required for tdx/snp)",
    )
    p.add_argument(
        "--ppcie",
        action="store_true",
        help="Hopper HGX protected PCIe: 8 GPUs and 4 NVSwitches in one VM (nodes labelled "
        "nvidia.com/cc.mode=ppcie)",
    )
    p.add_argument("--replicas", type=int, default=1, metavar="N", help="pods, one per node (default 1)")
    p.add_argument(
        "--policy",
        type=Path,
        metavar="FILE",
        help="the workload policy the KBS releases the model key under: writes trustee/ (required for "
        "tdx/snp)",
    )
    p.add_argument("--name", default="enclave-serve", help="name of the Deployment, Service and budget")
    p.add_argument("--namespace", default="enclave-serve", help="namespace (default enclave-serve)")
    p.add_argument(
        "--model-claim",
        metavar="NAME",
        help="PersistentVolumeClaim holding the encrypted model, mounted read-only at /models "
        "(default NAME-models; none when the init-data names a docker:// model)",
    )
    p.add_argument("--memory", default="64Gi", help="memory per pod, the VM's size (default 64Gi)")
    p.add_argument("--cpus", type=int, default=16, metavar="N", help="vCPUs per pod (default 16)")
    p.add_argument(
        "--port",
        type=int,
        default=443,
        help="the Service's TLS port (default 443; --tee sample: the host port)",
    )
    p.add_argument(
        "--service-type",
        choices=["ClusterIP", "LoadBalancer", "NodePort"],
        default="ClusterIP",
        help="how users reach the Service (never through a TLS-terminating proxy)",
    )
    p.add_argument(
        "--startup-minutes",
        type=int,
        default=60,
        metavar="M",
        help="boot budget of the startup probe (default 60: a 70B model pulled into the guest)",
    )
    p.add_argument(
        "--allow-insecure-agent-policy",
        action="store_true",
        help="DEVELOPMENT ONLY: accept an init-data with the development agent policy (the first pass, "
        "for genpolicy; never apply its output)",
    )
    p.add_argument(
        "--allow-insecure-sample-tee",
        action="store_true",
        help="DEVELOPMENT ONLY: with --tee sample, write the podman variant (evidence proves nothing)",
    )
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="directory to write into")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from attest.evidence import TeeKind
    from attest.initdata import InitData
    from attest.verify.workload import PolicyFileError, WorkloadPolicy
    from foundation.errors import ConfigError, MalformedEvidence
    from runtime.deploy import DeploySpec, render

    tee = TeeKind(args.tee)
    if tee is TeeKind.SAMPLE and not args.allow_insecure_sample_tee:
        raise ConfigError(
            "--tee sample writes an insecure development pod (its evidence proves nothing): give "
            "--allow-insecure-sample-tee"
        )
    try:
        init = InitData.load(args.init_data.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read the init-data {args.init_data}: {exc.strerror}") from None
    except MalformedEvidence as exc:
        raise ConfigError(f"the init-data {args.init_data}: {exc}") from None
    policy = None
    if args.policy is not None:
        try:
            policy = WorkloadPolicy.load(args.policy)
        except PolicyFileError as exc:
            raise ConfigError(f"{args.policy}: {exc}") from None
    spec = DeploySpec(
        tee=tee,
        image=args.image,
        init_data=init,
        init_data_source=args.init_data.name,
        replicas=args.replicas,
        gpus=args.gpus,
        ppcie=args.ppcie,
        name=args.name,
        namespace=args.namespace,
        model_claim=args.model_claim,
        memory=args.memory,
        cpus=args.cpus,
        port=args.port,
        service_type=args.service_type,
        startup_minutes=args.startup_minutes,
        allow_insecure_agent_policy=args.allow_insecure_agent_policy,
    )
    files = render(spec, policy)
    out: Path = args.output
    for name, text in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
        if name.endswith(".sh"):
            path.chmod(0o755)
    print(f"wrote {', '.join(files)} into {out} (init-data {init.digest_text})")
    if spec.dev:
        print(
            "INSECURE, DEVELOPMENT ONLY (sample TEE): podman kube play "
            f"{out / 'deployment.yaml'}; never deploy it to a cluster",
            file=sys.stderr,
        )
    elif init.insecure_agent_policy:
        print(
            "INSECURE: the init-data has the development agent policy. Do NOT apply this output: run "
            f"{out / 'genpolicy.sh'}, put policy.rego into the init-data (enclave-serve initdata … "
            "--agent-policy policy.rego), pin its new digest in the workload policy, and deploy again",
            file=sys.stderr,
        )
    else:
        print(
            f"apply: kubectl apply -f {out}; install the KBS policies: (cd {out / 'trustee'} && "
            "./kbs-client.sh)"
        )
    return 0
