"""``enclave-serve initdata``: declare everything that is attested, as the CoCo init-data.

The init-data carries the attestation agent's and the confidential data hub's KBS settings
(``aa.toml``, ``cdh.toml``), the Kata agent policy (``policy.rego``, which pins the container
image, its arguments and environment; Kata's ``genpolicy`` generates it from the pod spec) and
enclave-serve's declaration (``enclave-serve.toml``, :class:`attest.initdata.WorkloadPins`): the
model identity and location, the key resource, the software the image runs, every attested
runtime setting, the vLLM options and the attested environment. Its digest is what the hardware
carries (TDX MRCONFIGID, SNP HOST_DATA) and what a workload policy pins (``[workload]
init_data``); the run configuration the enclave will claim is computed from it, offline, and
printed as ``config sha256:<hex>`` (``[workload] config``).

``-o FILE`` gets the TOML and ``FILE.annotation`` the pod annotation's value (base64 of gzip).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from attest.initdata import INSECURE_AGENT_POLICY

__all__ = ["INSECURE_AGENT_POLICY", "add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from runtime.settings import add_arguments

    p = sub.add_parser(
        "initdata",
        help="declare what runs (model, settings, vLLM options, environment) as CoCo init-data; print "
        "its digest and the configuration digest the enclave will claim",
        usage="enclave-serve initdata MODEL --expect-model DIGEST|DIR --key-id URI --kbs-url URL "
        "(--agent-policy FILE | --allow-insecure-agent-policy) [--image-facts FILE] [--env NAME=VALUE]... "
        "[run options] -o FILE [-- VLLM_ARGS...]",
        description="Write the CoCo init-data the pod is launched with: the model (where the enclave "
        "finds it and its identity), the key resource and KBS, the Kata agent policy, the software the "
        "image runs, every attested setting, the vLLM options (after '--') and the attested environment. "
        "Print its digest (what TDX MRCONFIGID or SNP HOST_DATA will hold) and the digest of the run "
        "configuration the enclave will claim, for the workload policy. Every attested option of "
        "'enclave-serve run' can be given here; the enclave then takes it from the init-data "
        "(docs/configuration.md).",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="where the enclave finds the model: the encrypted model directory as mounted in the pod, "
        "or an image reference pinned by digest (oci:DIR@sha256:…, docker://HOST/REPO@sha256:…)",
    )
    p.add_argument(
        "--expect-model",
        metavar="DIGEST|DIR",
        help="the model identity: sha256:… (pack prints it), or the encrypted model directory to read it "
        "from (default: the digest in an image reference)",
    )
    p.add_argument(
        "--image-facts",
        type=Path,
        metavar="FILE",
        help="the software the image runs ('enclave-serve image-facts' inside the image; default: this "
        "machine's install, with a warning)",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an attested environment variable the pod sets (repeatable; VLLM_API_KEY=<redacted>: "
        "required, value not pinned)",
    )
    policy = p.add_mutually_exclusive_group(required=True)
    policy.add_argument("--agent-policy", type=Path, metavar="FILE", help="the Kata agent policy (rego)")
    policy.add_argument(
        "--allow-insecure-agent-policy",
        action="store_true",
        help="DEVELOPMENT ONLY: an agent policy that pins nothing about the container",
    )
    p.add_argument(
        "--algorithm",
        choices=["sha256", "sha384", "sha512"],
        default="sha384",
        help="the init-data digest's algorithm, as the file declares it (default: sha384; TDX "
        "MRCONFIGID and SNP HOST_DATA hold the digest, zero-padded or truncated to their size)",
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="init-data TOML to write")
    p.add_argument("--json", action="store_true", help="print the digests as one JSON object")
    add_arguments(p, attested_only=True)
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


def _model_identity(expect: str | None, model: str) -> tuple[str, str | None]:
    """The model digest, and the key resource its manifest names (if read from a directory)."""
    from foundation.errors import ConfigError

    if expect is not None and expect.startswith("sha256:"):
        if len(expect) != 71 or expect[7:].strip("0123456789abcdef"):
            raise ConfigError("--expect-model must be sha256:<64 lowercase hex>")
        return expect, None
    if expect is not None:
        from loader.manifest import Manifest

        directory = Path(expect)
        if directory.name == "manifest.json":
            directory = directory.parent
        try:
            manifest = Manifest.load(directory)
        except Exception as exc:
            raise ConfigError(f"--expect-model {expect}: not an encrypted model directory ({exc})") from None
        return manifest.digest, manifest.key_id
    if "@sha256:" in model:
        return "sha256:" + model.rsplit("@sha256:", 1)[1], None
    raise ConfigError("give --expect-model: the model's sha256 (pack prints it) or its encrypted directory")


def _parse_env(image: dict[str, str], items: list[str]) -> dict[str, str]:
    """The declared environment: the image's own attested variables, then ``--env`` (the pod's)."""
    from foundation.errors import ConfigError
    from runtime.environment import check_declared_environment

    env: dict[str, str] = dict(image)
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--env takes NAME=VALUE, not {item!r}")
        env[name] = value
    check_declared_environment(env)
    return env


def run(args: argparse.Namespace) -> int:
    from attest.evidence import TeeKind
    from attest.initdata import ENCLAVE_SERVE_ENTRY, INITDATA_ANNOTATION, InitData, WorkloadPins
    from foundation.errors import ConfigError, MalformedEvidence
    from runtime.config import RunConfig
    from runtime.facts import load_image_facts, runtime_versions
    from runtime.settings import declared_settings, given_settings, read_ca_bundle

    given = given_settings(args)
    given["model"] = args.model
    config = RunConfig(**given)
    config.validate(check_paths=False)
    if not config.kbs_url:
        raise ConfigError("--kbs-url is required: the attestation agent and the data hub talk to the KBS")
    digest, manifest_key = _model_identity(args.expect_model, args.model)
    key_id = config.key_id or manifest_key
    if key_id is None:
        raise ConfigError("--key-id is required: the KBS resource of the model's key")
    from loader.manifest import parse_key_resource

    parse_key_resource(key_id)  # the check pack and run make: what one accepts, the others do
    from runtime.vllm_args import secret_options

    if secret_options(config.vllm_args):
        raise ConfigError(
            f"{secret_options(config.vllm_args)[0]} would put the API key into the init-data: declare "
            "--env VLLM_API_KEY=<redacted> and set the variable in the pod (from a Secret)"
        )
    image_env: dict[str, str] = {}
    if args.image_facts is not None:
        image = load_image_facts(args.image_facts)
        facts, image_env = image.runtime, image.environment
    else:
        facts = runtime_versions()
        print(
            "WARNING: no --image-facts: declaring this machine's software "
            f"(enclave-serve {facts['version']}, vLLM {facts['vllm']}, PyTorch {facts['torch']}, Python "
            f"{facts['python']}, isolated {str(facts['python_isolated']).lower()}). The enclave refuses to "
            "boot unless its image runs exactly that: record it with 'enclave-serve image-facts' in the "
            "image.",
            file=sys.stderr,
        )
    cert = None if config.kbs_cacert is None else read_ca_bundle(config.kbs_cacert)
    try:
        rego = INSECURE_AGENT_POLICY if args.agent_policy is None else args.agent_policy.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    try:
        pins = WorkloadPins(
            model=digest,
            key_resource=key_id,
            runtime=facts,
            settings=declared_settings(config, kbs_ca_pem=cert),
            vllm_args=tuple(config.vllm_args),
            environment=_parse_env(image_env, args.env),
        )
        entry = pins.to_toml()
        if WorkloadPins.from_toml(entry) != pins:  # what the enclave will read back
            raise ValueError("the declaration does not read back as written")
        init = InitData.build(
            entries=[
                ("aa.toml", _aa_toml(config.kbs_url, cert)),
                ("cdh.toml", _cdh_toml(config.kbs_url, cert)),
                ("policy.rego", rego),
                (ENCLAVE_SERVE_ENTRY, entry),
            ],
            algorithm=args.algorithm,
        )
        config_sha256 = pins.config_sha256
    except (MalformedEvidence, ValueError) as exc:
        raise ConfigError(f"cannot build the init-data: {exc}") from exc
    args.output.write_bytes(init.raw)
    annotation_file = args.output.with_name(args.output.name + ".annotation")
    annotation_file.write_text(init.annotation() + "\n")
    insecure = [m for m in config.insecure_modes if "not pinned by init-data" not in m]
    result: dict[str, object] = {
        "file": str(args.output),
        "init_data_digest": init.digest_text,
        "config_sha256": "sha256:" + config_sha256,
        "model": digest,
        "mrconfigid": init.register(TeeKind.TDX).hex(),
        "host_data": init.register(TeeKind.SNP).hex(),
        "annotation": INITDATA_ANNOTATION,
        "annotation_file": str(annotation_file),
        "insecure_agent_policy": args.agent_policy is None,
        "insecure_modes": insecure,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"wrote {args.output} ({len(init.raw)} bytes)")
    print(f"init-data {init.digest_text}")
    print(f"config sha256:{config_sha256}")
    print(f"  model              {digest}   (policy: [workload] model)")
    print("  policy             [workload] init_data = the init-data digest, config = the config digest")
    print(f"  TDX MRCONFIGID     {result['mrconfigid']}")
    print(f"  SNP HOST_DATA      {result['host_data']}")
    print(f"  pod annotation     {INITDATA_ANNOTATION}: <the contents of {annotation_file}>")
    if args.agent_policy is None:
        print("  WARNING: INSECURE agent policy: it pins nothing about the container (development only)")
    for mode in insecure:
        print(f"  WARNING: INSECURE: {mode}")
    return 0
