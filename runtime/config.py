"""Runtime configuration: one typed object built from the command line.

Nothing here reads the environment or touches the network; :func:`RunConfig.validate` checks
combinations eagerly so a bad flag fails before anything boots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attest.errors import ConfigError

__all__ = ["ATTESTED_AS", "DEFAULT_PRIVATE_DIR", "KEY_SOURCES", "OPERATIONAL_SETTINGS", "RunConfig"]

KEY_SOURCES = ("kbs", "cdh", "file")

#: Where the guest-private working directory is created: the mount point of a memory emptyDir
#: that only the runtime's container mounts (runtime/private.py; never the pod-wide /dev/shm).
DEFAULT_PRIVATE_DIR = Path("/run/enclave-serve")


#: Settings that are attested under another name or as what they lead to.
ATTESTED_AS = {
    "model": "model.manifest_digest (the identity of what is served, not the path)",
    "key_id": "settings.key_resource",
    "kbs_cacert": "settings.kbs_ca_sha256 (the bytes read, not the path)",
    "vllm_args": "vllm.options (the parsed, checked values)",
}

#: Settings left out of the attested configuration, each with why that is safe: they change
#: where or how long the server is reachable, or how its output is formatted, never what runs,
#: what is loaded or who receives the key. A test holds every other setting to being attested.
OPERATIONAL_SETTINGS = {
    "host": "the listen address: the host controls the network anyway; nothing that runs changes",
    "port": "the listen port: as the address",
    "init_data": "the init-data's bytes are checked against the hardware register and claimed by digest; "
    "the path changes nothing",
    "sample_init_data": "as init_data, for the sample TEE",
    "drain_timeout_s": "how long in-flight requests may finish at SIGTERM: availability only",
    "attestation_rate": "attestation documents per client and second: availability only",
    "attestation_burst": "as attestation_rate",
    "attestation_queue": "fresh documents waiting for evidence (429 beyond): availability only",
    "tdx_collateral": "data each verifier authenticates by its own signatures against pinned roots; it "
    "decides only whether verification completes without fetching it",
    "snp_vcek": "as tdx_collateral",
    "log_format": "text or JSON lines: the same messages",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    """Everything ``enclave-serve run`` needs."""

    #: An encrypted model directory, or an image reference (``oci:DIR@sha256:…``, ``docker://…``).
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    tee: str = "auto"
    gpus: str = "auto"
    expected_gpus: int | None = None
    staging: str = "pinned"
    staging_slots: int | None = None
    allow_insecure_sample_tee: bool = False
    allow_insecure_gpu_cc_off: bool = False
    key_source: str = "kbs"
    kbs_url: str | None = None
    kbs_cacert: Path | None = None
    tee_key: str = "ec"
    kbs_deadline_s: float = 120.0
    cdh_url: str = "http://127.0.0.1:8006"
    key_file: Path | None = None
    allow_insecure_key_file: bool = False
    allow_insecure_http_registry: bool = False
    key_id: str | None = None
    tls: bool = True
    tls_hostnames: tuple[str, ...] = ("localhost", "127.0.0.1")
    exit_on_failure: bool = False
    private_dir: Path = DEFAULT_PRIVATE_DIR
    #: Accept a private directory on the pod-wide /dev/shm (development machines only).
    allow_insecure_shared_private_dir: bool = False
    init_data: Path | None = None
    sample_init_data: Path | None = None
    #: Refuse a model that records no canary reference (instead of serving it with the claim
    #: ``canary: not-recorded``).
    require_canary: bool = False
    #: Seconds between watchdog rounds after ready (re-attest the GPUs and the TEE); 0 disables.
    watchdog_interval_s: float = 60.0
    #: On SIGTERM: how long in-flight requests (and streams) may take to finish.
    drain_timeout_s: float = 30.0
    #: The cached, unchallenged attestation document: its maximum age.
    attestation_max_age_s: int = 60
    #: Fresh attestation requests per client address: sustained rate and burst.
    attestation_rate: float = 8.0
    attestation_burst: int = 32
    #: Fresh attestation requests waiting for evidence at most (429 beyond).
    attestation_queue: int = 64
    #: Verification collateral carried in every document (authenticated by its own signatures).
    tdx_collateral: Path | None = None
    snp_vcek: Path | None = None
    #: One-line JSON logs (``text`` otherwise).
    log_format: str = "text"
    #: Debug logging (``-v``): libraries log more at DEBUG (URLs, request details), so it is attested.
    verbose: bool = False
    vllm_args: tuple[str, ...] = field(default_factory=tuple)

    def validate(self) -> None:
        """Check flag combinations.

        Raises:
            ConfigError: an inconsistent or unsafe combination, with what to change.
        """
        from loader.oci.reference import ImageReference, is_image_reference

        if is_image_reference(self.model):
            reference = ImageReference.parse(self.model)
            if reference.layout is not None and not reference.layout.is_dir():
                raise ConfigError(f"OCI layout directory {reference.layout} does not exist")
            if self.key_id is None and self.key_source != "file":
                raise ConfigError(
                    "an image names no key: give --key-id (the KBS resource of its private key)"
                )
            if self.allow_insecure_http_registry and not (
                reference.transport == "docker" and reference.is_loopback
            ):
                raise ConfigError(
                    "--allow-insecure-http-registry is for a docker:// registry on localhost only"
                )
        elif not Path(self.model).is_dir():
            raise ConfigError(f"model directory {self.model} does not exist")
        elif self.allow_insecure_http_registry:
            raise ConfigError("--allow-insecure-http-registry applies to docker:// images only")
        if self.key_source not in KEY_SOURCES:
            raise ConfigError(
                f"unknown key source {self.key_source!r}; choose one of {', '.join(KEY_SOURCES)}"
            )
        if self.key_source == "kbs" and not self.kbs_url:
            raise ConfigError("--kbs-url is required with --key-source kbs")
        if self.key_source == "file":
            if self.key_file is None:
                raise ConfigError("--key-file is required with --key-source file")
            if not self.allow_insecure_key_file:
                raise ConfigError(
                    "--key-source file skips attestation entirely and is for development only; "
                    "add --allow-insecure-key-file to use it"
                )
        if self.tee == "sample" and not self.allow_insecure_sample_tee:
            raise ConfigError(
                "--tee sample proves nothing; add --allow-insecure-sample-tee (development only)"
            )
        if self.gpus == "sample" and not self.allow_insecure_sample_tee:
            raise ConfigError(
                "--gpus sample proves nothing; add --allow-insecure-sample-tee (development only)"
            )
        if self.expected_gpus is not None and (self.expected_gpus < 1 or self.gpus in ("none", "sample")):
            raise ConfigError("--expected-gpus needs a positive count and --gpus auto or nvidia")
        if self.staging not in ("pinned", "pageable"):
            raise ConfigError("--staging must be pinned or pageable")
        if self.staging_slots is not None and self.staging_slots < 1:
            raise ConfigError("--staging-slots must be at least 1")
        if self.tee_key not in ("ec", "rsa"):
            raise ConfigError("--tee-key must be ec or rsa")
        if self.sample_init_data is not None and self.tee != "sample":
            raise ConfigError("--sample-init-data is for the sample TEE; on TDX/SNP pass --init-data")
        if self.sample_init_data is not None and self.init_data is not None:
            raise ConfigError("pass --init-data or --sample-init-data, not both")
        if self.watchdog_interval_s < 0 or 0 < self.watchdog_interval_s < 1:
            raise ConfigError("--watchdog-interval must be 0 (off) or at least 1 second")
        if self.drain_timeout_s < 0:
            raise ConfigError("--drain-timeout must not be negative")
        if not 1 <= self.attestation_max_age_s <= 86400:
            raise ConfigError("--attestation-max-age must be between 1 and 86400 seconds")
        if self.attestation_rate <= 0 or self.attestation_burst < 1 or self.attestation_queue < 1:
            raise ConfigError(
                "--attestation-rate, --attestation-burst and --attestation-queue must be positive"
            )
        if self.log_format not in ("text", "json"):
            raise ConfigError("--log-format must be text or json")
        # The vLLM options are checked on vLLM's parsed namespace at the config stage
        # (runtime.vllm_args), not here by spelling.

    @property
    def init_data_file(self) -> Path | None:
        """The init-data file given (``--init-data`` or, for the sample TEE, ``--sample-init-data``)."""
        return self.init_data if self.init_data is not None else self.sample_init_data

    def attested_settings(self, *, resource: str, kbs_ca_sha256: str | None) -> dict[str, Any]:
        """Return the runtime's own settings as they go into the attested configuration.

        ``resource`` is the key resource the runtime will fetch; ``kbs_ca_sha256`` the digest of
        the pinned KBS CA bundle it read. Listen address and port are left out (they place the
        server on the network, which the host controls anyway, and change nothing it runs).
        """
        return {
            "tee": self.tee,
            "gpus": self.gpus,
            "expected_gpus": self.expected_gpus,
            "staging": self.staging,
            "staging_slots": self.staging_slots,
            "allow_insecure_sample_tee": self.allow_insecure_sample_tee,
            "allow_insecure_gpu_cc_off": self.allow_insecure_gpu_cc_off,
            "key_source": self.key_source,
            "key_resource": resource,
            "kbs_url": self.kbs_url if self.key_source == "kbs" else None,
            "kbs_ca_sha256": kbs_ca_sha256 if self.key_source == "kbs" else None,
            "tee_key": self.tee_key if self.key_source == "kbs" else None,
            "kbs_deadline_s": self.kbs_deadline_s if self.key_source == "kbs" else None,
            "cdh_url": self.cdh_url if self.key_source == "cdh" else None,
            "key_file": str(self.key_file) if self.key_source == "file" and self.key_file else None,
            "allow_insecure_key_file": self.allow_insecure_key_file,
            "allow_insecure_http_registry": self.allow_insecure_http_registry,
            "allow_insecure_shared_private_dir": self.allow_insecure_shared_private_dir,
            "tls": self.tls,
            "tls_hostnames": list(self.tls_hostnames) if self.tls else [],
            "exit_on_failure": self.exit_on_failure,
            "require_canary": self.require_canary,
            "watchdog_interval_s": self.watchdog_interval_s,
            "attestation_max_age_s": self.attestation_max_age_s,
            "private_dir": str(self.private_dir),
            "verbose": self.verbose,
            "insecure_modes": self.insecure_modes,
        }

    @property
    def insecure_modes(self) -> list[str]:
        """The development-only modes this configuration enables (shown loudly everywhere)."""
        modes = []
        if self.tee == "sample":
            modes.append("sample TEE (evidence proves nothing)")
        if self.gpus == "sample":
            modes.append("sample GPU device evidence")
        if self.allow_insecure_gpu_cc_off:
            modes.append("GPUs accepted with confidential computing off")
        if self.key_source == "file":
            modes.append("model key read from a local file (no attestation)")
        if not self.tls:
            modes.append("plain HTTP (attestation not bound to a TLS key)")
        if self.key_source == "kbs" and self.kbs_url and self.kbs_url.startswith("http://"):
            modes.append("plain-HTTP key broker")
        if self.allow_insecure_http_registry:
            modes.append("plain-HTTP image registry (loopback)")
        if self.allow_insecure_shared_private_dir:
            modes.append("private directory on the pod-wide /dev/shm (other containers can reach it)")
        return modes
