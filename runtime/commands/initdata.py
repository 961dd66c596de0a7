"""``enclave-serve initdata``: write the CoCo init-data that pins an enclave-serve workload.

The init-data carries the attestation agent's and the confidential data hub's KBS settings
(``aa.toml``, ``cdh.toml``), the Kata agent policy (``policy.rego``, which pins the container
image, its arguments and environment; Kata's ``genpolicy`` generates it from the pod spec) and
enclave-serve's own pins (``enclave-serve.toml``: the model identity, the key resource, the vLLM
options and optionally the exact run configuration). Its digest is what the hardware carries
(TDX MRCONFIGID, SNP HOST_DATA) and what a workload policy pins (``[workload] init_data``).

Prints the digest, the register values and the pod annotation; ``-o FILE`` gets the TOML and
``FILE.annotation`` the annotation value (base64 of gzip).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from attest.initdata import INSECURE_AGENT_POLICY

__all__ = ["INSECURE_AGENT_POLICY", "add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "initdata",
        help="write the CoCo init-data (KBS settings, agent policy, enclave-serve pins) and its digests",
        usage="enclave-serve initdata --kbs-url URL --expect-model DIGEST (--agent-policy FILE | "
        "--allow-insecure-agent-policy) -o FILE [options] [-- VLLM_ARGS...]",
    )
    p.add_argument("--kbs-url", required=True, help="the Trustee KBS the attestation agent talks to")
    p.add_argument("--kbs-cacert", type=Path, help="the KBS's CA certificate (PEM)")
    p.add_argument("--expect-model", required=True, metavar="DIGEST", help="the model identity (sha256:…)")
    p.add_argument("--key-id", help="the key resource (kbs:///repo/type/tag) the runtime must fetch")
    p.add_argument(
        "--config-sha256",
        metavar="HEX",
        help="the exact run configuration ('enclave-serve run … --print-config')",
    )
    policy = p.add_mutually_exclusive_group(required=True)
    policy.add_argument("--agent-policy", type=Path, metavar="FILE", help="the Kata agent policy (rego)")
    policy.add_argument(
        "--allow-insecure-agent-policy",
        action="store_true",
        help="DEVELOPMENT ONLY: an agent policy that pins nothing about the container",
    )
    p.add_argument("--algorithm", choices=["sha256", "sha384", "sha512"], default="sha384")
    p.add_argument("-o", "--output", type=Path, required=True, help="init-data TOML to write")
    p.add_argument("--json", action="store_true", help="print the digests as one JSON object")
    p.set_defaults(func=run)


def _aa_toml(url: str, cert: str | None) -> str:
    lines = ["[token_configs]", "[token_configs.coco_as]", f"url = {json.dumps(url)}", "",
             "[token_configs.kbs]", f"url = {json.dumps(url)}"]  # fmt: skip
    if cert:
        lines.append(f'cert = """\n{cert.strip()}\n"""')
    return "\n".join(lines) + "\n"


def _cdh_toml(url: str, cert: str | None) -> str:
    lines = ["socket = 'unix:///run/confidential-containers/cdh.sock'", "credentials = []", "",
             "[kbc]", "name = 'cc_kbc'", f"url = {json.dumps(url)}"]  # fmt: skip
    if cert:
        lines.append(f'kbs_cert = """\n{cert.strip()}\n"""')
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from attest.errors import ConfigError, MalformedEvidence
    from attest.evidence import TeeKind
    from attest.initdata import ENCLAVE_SERVE_ENTRY, INITDATA_ANNOTATION, InitData, WorkloadPins

    try:
        cert = None if args.kbs_cacert is None else args.kbs_cacert.read_text()
        rego = INSECURE_AGENT_POLICY if args.agent_policy is None else args.agent_policy.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    try:
        pins = WorkloadPins.from_toml(
            WorkloadPins(
                model=args.expect_model,
                key_resource=args.key_id,
                vllm_args=tuple(getattr(args, "passthrough", [])),
                config_sha256=None
                if args.config_sha256 is None
                else args.config_sha256.removeprefix("sha256:"),
            ).to_toml()
        )
        init = InitData.build(
            entries=[
                ("aa.toml", _aa_toml(args.kbs_url, cert)),
                ("cdh.toml", _cdh_toml(args.kbs_url, cert)),
                ("policy.rego", rego),
                (ENCLAVE_SERVE_ENTRY, pins.to_toml()),
            ],
            algorithm=args.algorithm,
        )
    except (MalformedEvidence, ValueError) as exc:
        raise ConfigError(f"cannot build the init-data: {exc}") from exc
    args.output.write_bytes(init.raw)
    annotation_file = args.output.with_name(args.output.name + ".annotation")
    annotation_file.write_text(init.annotation() + "\n")
    result = {
        "file": str(args.output),
        "digest": init.digest_text,
        "mrconfigid": init.register(TeeKind.TDX).hex(),
        "host_data": init.register(TeeKind.SNP).hex(),
        "annotation": INITDATA_ANNOTATION,
        "annotation_file": str(annotation_file),
        "insecure_agent_policy": args.agent_policy is None,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"wrote {args.output} ({len(init.raw)} bytes)")
    print(f"  init-data digest   {init.digest_text}   (policy: [workload] init_data)")
    print(f"  TDX MRCONFIGID     {result['mrconfigid']}")
    print(f"  SNP HOST_DATA      {result['host_data']}")
    print(f"  pod annotation     {INITDATA_ANNOTATION}: <the contents of {annotation_file}>")
    if args.agent_policy is None:
        print("  WARNING: INSECURE agent policy: it pins nothing about the container (development only)")
    return 0
