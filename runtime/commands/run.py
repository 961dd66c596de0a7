"""``enclave-serve run``: the enclave entrypoint (attest, fetch the key, decrypt, serve)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "run",
        help="boot the enclave: attest, fetch the model key, decrypt the model, serve the OpenAI API",
        usage="enclave-serve run MODEL_DIR [options] [-- VLLM_ARGS...]",
        description=(
            "Boot the enclave and serve. Arguments after '--' go to vLLM "
            "(e.g. -- --max-model-len 4096 --enforce-eager)."
        ),
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="encrypted model directory (enclave-serve pack), or an encrypted OCI image pinned by digest: "
        "oci:LAYOUT_DIR@sha256:DIGEST or docker://HOST/REPO@sha256:DIGEST",
    )
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="listen port (default 8000)")
    g = p.add_argument_group("attestation")
    g.add_argument(
        "--tee", default="auto", choices=["auto", "tdx", "snp", "sample"], help="CPU TEE (default: detect)"
    )
    g.add_argument(
        "--gpus",
        default="auto",
        choices=["auto", "none", "nvidia", "sample"],
        help="GPU evidence (default: NVIDIA GPUs if any is on the PCI bus or in NVML)",
    )
    g.add_argument(
        "--expected-gpus",
        type=int,
        metavar="N",
        help="the number of GPUs the gate must verify (default: every NVIDIA GPU on the PCI bus)",
    )
    g.add_argument(
        "--allow-insecure-sample-tee",
        action="store_true",
        help="DEVELOPMENT ONLY: allow the sample TEE/device, whose evidence proves nothing",
    )
    g.add_argument(
        "--init-data",
        type=Path,
        metavar="FILE",
        help="the CoCo init-data this pod was launched with (its TOML, or the annotation value: "
        "base64 of gzip), e.g. from a Downward API volume; checked against MRCONFIGID/HOST_DATA, "
        "and its enclave-serve.toml pins are enforced",
    )
    g.add_argument(
        "--sample-init-data",
        type=Path,
        metavar="FILE",
        help="DEVELOPMENT ONLY (--tee sample): the init-data the sample TEE pretends to be launched with",
    )
    g.add_argument(
        "--allow-insecure-gpu-cc-off",
        action="store_true",
        help="DEVELOPMENT ONLY: accept NVIDIA GPUs whose confidential-computing mode is off",
    )
    k = p.add_argument_group("model key")
    k.add_argument(
        "--key-source", default="kbs", choices=["kbs", "cdh", "file"], help="where the key comes from"
    )
    k.add_argument(
        "--key-id",
        help="resource URI of the key (default: the one the manifest records; required for images: "
        "the KBS resource holding the image's recipient private key)",
    )
    k.add_argument(
        "--allow-insecure-http-registry",
        action="store_true",
        help="DEVELOPMENT ONLY: fetch a docker:// image from a registry on localhost over plain HTTP",
    )
    k.add_argument("--kbs-url", help="Trustee KBS URL, e.g. https://kbs.example:8080")
    k.add_argument("--kbs-cacert", type=Path, help="pinned CA certificate of the KBS (PEM)")
    k.add_argument(
        "--tee-key", default="ec", choices=["ec", "rsa"], help="ephemeral TEE key type (default ec)"
    )
    k.add_argument("--kbs-deadline", type=float, default=120.0, help="overall key-release deadline, seconds")
    k.add_argument("--cdh-url", default="http://127.0.0.1:8006", help="CoCo Confidential Data Hub URL")
    k.add_argument("--key-file", type=Path, help="DEVELOPMENT ONLY: read the key from this file")
    k.add_argument(
        "--allow-insecure-key-file",
        action="store_true",
        help="DEVELOPMENT ONLY: allow --key-source file (no attestation at all)",
    )
    s = p.add_argument_group("loading")
    s.add_argument(
        "--staging",
        default="pinned",
        choices=["pinned", "pageable"],
        help="host memory of the GPU staging ring: pinned (cudaHostAlloc, default) or pageable",
    )
    s.add_argument(
        "--staging-slots", type=int, metavar="N", help="staging slots per GPU (default: decrypt threads + 2)"
    )
    v = p.add_argument_group("serving (docs/attestation.md, docs/operations.md)")
    v.add_argument(
        "--require-canary",
        action="store_true",
        help="refuse a model that records no canary reference (default: serve it, claiming "
        "canary not-recorded)",
    )
    v.add_argument(
        "--watchdog-interval",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds between re-attestation rounds after ready; a change exits the process (0: off)",
    )
    v.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM, how long in-flight requests may take to finish (default 30)",
    )
    v.add_argument(
        "--attestation-max-age",
        type=int,
        default=60,
        metavar="S",
        help="maximum age of the cached (nonce-less) attestation document (default 60)",
    )
    v.add_argument(
        "--attestation-rate",
        type=float,
        default=8.0,
        metavar="R",
        help="fresh attestation requests per second per client address, sustained (default 8)",
    )
    v.add_argument(
        "--attestation-burst",
        type=int,
        default=32,
        metavar="N",
        help="fresh attestation requests a client may make at once (default 32)",
    )
    v.add_argument(
        "--attestation-queue",
        type=int,
        default=64,
        metavar="N",
        help="fresh attestation requests waiting for evidence at most; 429 beyond (default 64)",
    )
    v.add_argument(
        "--tdx-collateral",
        type=Path,
        metavar="FILE",
        help="DCAP collateral (dcap-qvl JSON) carried in every document for offline verification",
    )
    v.add_argument(
        "--snp-vcek", type=Path, metavar="FILE", help="the VCEK (DER or PEM) carried in every document"
    )
    v.add_argument(
        "--log-format", choices=["text", "json"], default="text", help="json: one JSON object per log line"
    )
    t = p.add_argument_group("TLS")
    t.add_argument(
        "--no-tls",
        dest="tls",
        action="store_false",
        help="serve plain HTTP (attestation is then not bound to a TLS key)",
    )
    t.add_argument(
        "--tls-hostname",
        action="append",
        dest="tls_hostnames",
        help="subject alternative name for the in-enclave certificate (repeatable)",
    )
    p.add_argument(
        "--exit-on-failure",
        action="store_true",
        help="exit with status 3 when boot fails (default: stay up and report the reason)",
    )
    from runtime.config import DEFAULT_PRIVATE_DIR

    p.add_argument(
        "--private-dir",
        type=Path,
        default=DEFAULT_PRIVATE_DIR,
        help="memory-backed directory (tmpfs) only this container mounts, owned by the runtime's "
        f"user or root (sticky), for the runtime's private files (default {DEFAULT_PRIVATE_DIR}: "
        "a memory emptyDir, docs/operations.md)",
    )
    p.add_argument(
        "--allow-insecure-shared-private-dir",
        action="store_true",
        help="DEVELOPMENT ONLY: accept a --private-dir on the pod-wide /dev/shm, which every "
        "container of the pod can reach",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="run only the config stage: print the run configuration this boot would attest "
        "(canonical JSON on stdout, its sha256 on stderr) and exit",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from runtime.boot import run_blocking
    from runtime.config import RunConfig

    vllm_args = list(getattr(args, "passthrough", []))
    hostnames = tuple(args.tls_hostnames or ("localhost", "127.0.0.1", args.host))
    config = RunConfig(
        model=args.model,
        allow_insecure_http_registry=args.allow_insecure_http_registry,
        host=args.host,
        port=args.port,
        tee=args.tee,
        gpus=args.gpus,
        expected_gpus=args.expected_gpus,
        staging=args.staging,
        staging_slots=args.staging_slots,
        allow_insecure_sample_tee=args.allow_insecure_sample_tee,
        allow_insecure_gpu_cc_off=args.allow_insecure_gpu_cc_off,
        key_source=args.key_source,
        key_id=args.key_id,
        kbs_url=args.kbs_url,
        kbs_cacert=args.kbs_cacert,
        tee_key=args.tee_key,
        kbs_deadline_s=args.kbs_deadline,
        cdh_url=args.cdh_url,
        key_file=args.key_file,
        allow_insecure_key_file=args.allow_insecure_key_file,
        tls=args.tls,
        tls_hostnames=tuple(dict.fromkeys(hostnames)),
        exit_on_failure=args.exit_on_failure,
        private_dir=args.private_dir,
        allow_insecure_shared_private_dir=args.allow_insecure_shared_private_dir,
        init_data=args.init_data,
        sample_init_data=args.sample_init_data,
        require_canary=args.require_canary,
        watchdog_interval_s=args.watchdog_interval,
        drain_timeout_s=args.drain_timeout,
        attestation_max_age_s=args.attestation_max_age,
        attestation_rate=args.attestation_rate,
        attestation_burst=args.attestation_burst,
        attestation_queue=args.attestation_queue,
        tdx_collateral=args.tdx_collateral,
        snp_vcek=args.snp_vcek,
        log_format=args.log_format,
        verbose=bool(getattr(args, "verbose", False)),
        vllm_args=tuple(vllm_args),
    )
    if args.print_config:
        from runtime.boot import print_configuration

        configuration = print_configuration(config)
        sys.stdout.buffer.write(configuration.raw + b"\n")
        sys.stdout.flush()
        print(f"config sha256:{configuration.sha256}", file=sys.stderr)
        return 0
    return run_blocking(config)
