"""Runtime configuration: one typed object, each of whose fields declares its own setting.

A :class:`RunConfig` field carries its default and a :class:`Setting` (option, help, group, and
whether it is attested or, with the reason, operational). :mod:`runtime.settings` derives the
``run`` and ``initdata`` options, the init-data declaration and the docs table from them.
Nothing here reads the environment or touches the network; :func:`RunConfig.validate` checks
combinations eagerly so a bad flag fails before anything boots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attest.evidence import TeeKind
from attest.tee.select import device_choices, insecure_choices, primary_choices
from foundation.errors import ConfigError

__all__ = [
    "DEFAULT_PRIVATE_DIR",
    "KBS_DEADLINE_S",
    "KEY_SOURCES",
    "SETTING",
    "RunConfig",
    "Setting",
    "setting",
]

KEY_SOURCES = ("kbs", "cdh", "file")

#: Where the guest-private working directory is created: the mount point of a memory emptyDir
#: that only the runtime's container mounts (runtime/private.py; never the pod-wide /dev/shm).
DEFAULT_PRIVATE_DIR = Path("/run/enclave-serve")


#: The metadata key under which a :class:`RunConfig` field carries its :class:`Setting`.
SETTING = "enclave-serve/setting"


@dataclass(frozen=True, slots=True, kw_only=True)
class Setting:
    """How one setting is set, shown and attested: the single declaration every view derives from.

    The ``run`` options (:func:`runtime.settings.add_run_arguments`), the ``initdata`` options,
    the init-data's ``[settings]`` table, the attested configuration and the table in
    docs/configuration.md are all made from these.
    """

    help: str
    #: The option group in ``run --help``.
    group: str
    #: The command-line option; None: a positional or one set another way (see ``declared``).
    flag: str | None = None
    #: Why the setting may be left out of the attestation (None: it is attested).
    operational: str | None = None
    #: Where an attested setting is declared in the init-data entry: ``"settings"`` (its
    #: ``[settings]`` table, under the field's name) or a top-level key of the entry.
    declared: str = "settings"
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    #: Converts a command-line string (None: the type of the default, or a flag).
    kind: Callable[[str], Any] | None = None
    #: Whether ``initdata`` offers the option (False for ones that only mean something without
    #: init-data).
    in_initdata: bool = True

    @property
    def attested(self) -> bool:
        return self.operational is None


def setting(default: Any, *, help: str, group: str, **spec: Any) -> Any:
    """Declare a :class:`RunConfig` field: its default and its :class:`Setting`."""
    return field(default=default, metadata={SETTING: Setting(help=help, group=group, **spec)})


#: How long a key release may take in all, retries included, in seconds: the boot's
#: ``--kbs-deadline`` and ``enclave-serve kbs fetch --deadline`` default to it.
KBS_DEADLINE_S = 120.0

_ATT, _KEY, _LOAD, _SRV, _TLS, _RUN = "attestation", "model key", "loading", "serving", "TLS", "process"


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    """Everything ``enclave-serve run`` needs: each field declares its option and whether it is attested."""

    #: An encrypted model directory, or an image reference (``oci:DIR@sha256:…``, ``docker://…``).
    model: str = setting(
        "",
        help="encrypted model directory (enclave-serve pack), or an encrypted OCI image pinned by digest: "
        "oci:LAYOUT_DIR@sha256:DIGEST or docker://HOST/REPO@sha256:DIGEST (default: the init-data's)",
        group=_RUN,
        declared="settings:model_source",
    )
    host: str = setting(
        "127.0.0.1",
        help="listen address",
        group=_RUN,
        flag="--host",
        operational="the listen address: the host controls the network anyway; nothing that runs changes",
    )
    port: int = setting(
        8000,
        help="listen port",
        group=_RUN,
        flag="--port",
        operational="the listen port: the host controls the network anyway; nothing that runs changes",
    )
    tee: str = setting(
        "auto",
        help="CPU TEE (auto: detect)",
        group=_ATT,
        flag="--tee",
        choices=primary_choices(),
    )
    gpus: str = setting(
        "auto",
        help="GPU evidence (auto: NVIDIA GPUs if any is on the PCI bus or in NVML)",
        group=_ATT,
        flag="--gpus",
        choices=device_choices(),
    )
    expected_gpus: int | None = setting(
        None,
        help="the number of GPUs the gate must verify (default: every NVIDIA GPU on the PCI bus)",
        group=_ATT,
        flag="--expected-gpus",
        metavar="N",
        kind=int,
    )
    allow_insecure_sample_tee: bool = setting(
        False,
        help="DEVELOPMENT ONLY: allow the sample TEE/device, whose evidence proves nothing",
        group=_ATT,
        flag="--allow-insecure-sample-tee",
    )
    allow_insecure_gpu_cc_off: bool = setting(
        False,
        help="DEVELOPMENT ONLY: accept NVIDIA GPUs whose confidential-computing mode is off",
        group=_ATT,
        flag="--allow-insecure-gpu-cc-off",
    )
    init_data: Path | None = setting(
        None,
        help="the CoCo init-data this pod was launched with (its TOML, or the annotation value: base64 "
        "of gzip), e.g. from a Downward API volume: checked against MRCONFIGID/HOST_DATA, and every "
        "attested setting is taken from it",
        group=_ATT,
        flag="--init-data",
        metavar="FILE",
        kind=Path,
        operational="the file is the declaration itself: its bytes are checked against the hardware "
        "register and claimed by digest; the path changes nothing",
    )
    sample_init_data: Path | None = setting(
        None,
        help="DEVELOPMENT ONLY (--tee sample): the init-data the sample TEE's register holds (it plays "
        "the hardware; --init-data is the host's file)",
        group=_ATT,
        flag="--sample-init-data",
        metavar="FILE",
        kind=Path,
        operational="plays the hardware register of the sample TEE, which proves nothing anyway",
    )
    allow_insecure_no_initdata: bool = setting(
        False,
        help="DEVELOPMENT ONLY: boot a TDX/SNP guest launched without init-data, configured from the "
        "command line (claimed: configuration not pinned by init-data)",
        group=_ATT,
        flag="--allow-insecure-no-initdata",
        in_initdata=False,
    )
    key_source: str = setting(
        "kbs", help="where the key comes from", group=_KEY, flag="--key-source", choices=KEY_SOURCES
    )
    key_id: str | None = setting(
        None,
        help="resource URI of the key (default: the one the manifest records; required for images: "
        "the KBS resource holding the image's recipient private key)",
        group=_KEY,
        flag="--key-id",
        declared="key_resource",
    )
    allow_insecure_http_registry: bool = setting(
        False,
        help="DEVELOPMENT ONLY: fetch a docker:// image from a registry on localhost over plain HTTP",
        group=_KEY,
        flag="--allow-insecure-http-registry",
    )
    kbs_url: str | None = setting(
        None, help="Trustee KBS URL, e.g. https://kbs.example:8080", group=_KEY, flag="--kbs-url"
    )
    kbs_cacert: Path | None = setting(
        None,
        help="pinned CA certificate of the KBS (PEM)",
        group=_KEY,
        flag="--kbs-cacert",
        kind=Path,
        declared="settings:kbs_ca_pem",
    )
    tee_key: str = setting(
        "ec", help="ephemeral TEE key type", group=_KEY, flag="--tee-key", choices=("ec", "rsa")
    )
    kbs_deadline_s: float = setting(
        KBS_DEADLINE_S,
        help="overall key-release deadline, seconds",
        group=_KEY,
        flag="--kbs-deadline",
        metavar="S",
        operational="how long key release is retried: availability only (the KBS decides what it releases)",
    )
    cdh_url: str = setting(
        "http://127.0.0.1:8006", help="CoCo Confidential Data Hub URL", group=_KEY, flag="--cdh-url"
    )
    key_file: Path | None = setting(
        None, help="DEVELOPMENT ONLY: read the key from this file", group=_KEY, flag="--key-file", kind=Path
    )
    allow_insecure_key_file: bool = setting(
        False,
        help="DEVELOPMENT ONLY: allow --key-source file (no attestation at all)",
        group=_KEY,
        flag="--allow-insecure-key-file",
    )
    staging: str = setting(
        "pinned",
        help="host memory of the GPU staging ring: pinned (cudaHostAlloc) or pageable",
        group=_LOAD,
        flag="--staging",
        choices=("pinned", "pageable"),
    )
    staging_slots: int | None = setting(
        None,
        help="staging slots per GPU (default: decrypt threads + 2)",
        group=_LOAD,
        flag="--staging-slots",
        metavar="N",
        kind=int,
    )
    require_canary: bool = setting(
        False,
        help="refuse a model that records no canary reference (default: serve it, claiming canary "
        "not-recorded)",
        group=_SRV,
        flag="--require-canary",
    )
    watchdog_interval_s: float = setting(
        60.0,
        help="seconds between re-attestation rounds after ready; a change exits the process (0: off)",
        group=_SRV,
        flag="--watchdog-interval",
        metavar="S",
    )
    drain_timeout_s: float = setting(
        30.0,
        help="on SIGTERM, how long in-flight requests may take to finish",
        group=_SRV,
        flag="--drain-timeout",
        metavar="S",
        operational="how long in-flight requests may finish at SIGTERM: availability only",
    )
    attestation_max_age_s: int = setting(
        60,
        help="maximum age of the cached (nonce-less) attestation document",
        group=_SRV,
        flag="--attestation-max-age",
        metavar="S",
    )
    attestation_rate: float = setting(
        8.0,
        help="fresh attestation requests per second per client address, sustained",
        group=_SRV,
        flag="--attestation-rate",
        metavar="R",
        operational="attestation documents per client and second: availability only",
    )
    attestation_burst: int = setting(
        32,
        help="fresh attestation requests a client may make at once",
        group=_SRV,
        flag="--attestation-burst",
        metavar="N",
        operational="fresh attestation requests a client may make at once: availability only",
    )
    attestation_queue: int = setting(
        64,
        help="fresh attestation requests waiting for evidence at most; 429 beyond",
        group=_SRV,
        flag="--attestation-queue",
        metavar="N",
        operational="fresh documents waiting for evidence (429 beyond): availability only",
    )
    collateral: tuple[str, ...] = setting(
        (),
        help="collateral carried in every document for offline verification, TEE=FILE; repeat for each "
        "TEE (tdx: DCAP collateral, dcap-qvl JSON; snp: the VCEK or VLEK, DER or PEM)",
        group=_SRV,
        flag="--collateral",
        metavar="TEE=FILE",
        operational="data each verifier authenticates by its own signatures against pinned roots; it "
        "decides only whether verification completes without fetching it",
    )
    tdx_collateral: Path | None = setting(
        None,
        help="DCAP collateral (dcap-qvl JSON) carried in every document; the same as --collateral tdx=FILE",
        group=_SRV,
        flag="--tdx-collateral",
        metavar="FILE",
        kind=Path,
        operational="data each verifier authenticates by its own signatures against pinned roots; it "
        "decides only whether verification completes without fetching it",
    )
    snp_vcek: Path | None = setting(
        None,
        help="the VCEK (DER or PEM) carried in every document; the same as --collateral snp=FILE",
        group=_SRV,
        flag="--snp-vcek",
        metavar="FILE",
        kind=Path,
        operational="data each verifier authenticates by its own signatures against AMD's pinned roots; "
        "it decides only whether verification completes without fetching it",
    )
    log_format: str = setting(
        "text",
        help="json: one JSON object per log line",
        group=_SRV,
        flag="--log-format",
        choices=("text", "json"),
        operational="text or JSON lines: the same messages",
    )
    tls: bool = setting(
        True,
        help="serve plain HTTP (attestation is then not bound to a TLS key)",
        group=_TLS,
        flag="--no-tls",
    )
    tls_hostnames: tuple[str, ...] = setting(
        ("localhost", "127.0.0.1"),
        help="subject alternative name for the in-enclave certificate (repeatable; default: localhost, "
        "127.0.0.1 and --host)",
        group=_TLS,
        flag="--tls-hostname",
        operational="names in the in-enclave certificate: clients trust the attested key, not a name",
    )
    exit_on_failure: bool = setting(
        False,
        help="exit with status 3 when boot fails (default: stay up and report the reason)",
        group=_RUN,
        flag="--exit-on-failure",
        operational="whether a failed boot exits or stays up to report why: it serves nothing either way",
    )
    private_dir: Path = setting(
        DEFAULT_PRIVATE_DIR,
        help="memory-backed directory (tmpfs) only this container mounts, owned by the runtime's user "
        f"or root (sticky), for the runtime's private files (default {DEFAULT_PRIVATE_DIR}: a memory "
        "emptyDir, docs/operations.md)",
        group=_RUN,
        flag="--private-dir",
        kind=Path,
    )
    #: Accept a private directory on the pod-wide /dev/shm (development machines only).
    allow_insecure_shared_private_dir: bool = setting(
        False,
        help="DEVELOPMENT ONLY: accept a --private-dir on the pod-wide /dev/shm, which every container "
        "of the pod can reach",
        group=_RUN,
        flag="--allow-insecure-shared-private-dir",
    )
    #: Debug logging (``-v``): libraries log more at DEBUG (URLs, request details), so it is attested.
    verbose: bool = setting(False, help="debug logging", group=_RUN, flag="--verbose")
    vllm_args: tuple[str, ...] = setting(
        (), help="vLLM's options (after '--')", group=_RUN, declared="vllm_args"
    )

    def validate(self, *, check_paths: bool = True) -> None:
        """Check flag combinations (and, with ``check_paths``, that the model is where it is said to be).

        Raises:
            ConfigError: an inconsistent or unsafe combination, with what to change.
        """
        from loader.oci.reference import ImageReference, is_image_reference

        if not self.model:
            raise ConfigError("no model: give MODEL, or --init-data whose declaration names one")
        if is_image_reference(self.model):
            reference = ImageReference.parse(self.model)
            if check_paths and reference.layout is not None and not reference.layout.is_dir():
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
        elif check_paths and not Path(self.model).is_dir():
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
        insecure_tee, insecure_gpus = (
            self.tee in insecure_choices(),
            self.gpus in insecure_choices(device=True),
        )
        if insecure_tee and not self.allow_insecure_sample_tee:
            raise ConfigError(
                f"--tee {self.tee} proves nothing; add --allow-insecure-sample-tee (development only)"
            )
        if insecure_gpus and not self.allow_insecure_sample_tee:
            raise ConfigError(
                f"--gpus {self.gpus} proves nothing; add --allow-insecure-sample-tee (development only)"
            )
        if self.expected_gpus is not None and (
            self.expected_gpus < 1 or self.gpus == "none" or insecure_gpus
        ):
            counted = [c for c in device_choices() if c != "none" and c not in insecure_choices(device=True)]
            raise ConfigError(f"--expected-gpus needs a positive count and --gpus {' or '.join(counted)}")
        if self.staging not in ("pinned", "pageable"):
            raise ConfigError("--staging must be pinned or pageable")
        if self.staging_slots is not None and self.staging_slots < 1:
            raise ConfigError("--staging-slots must be at least 1")
        if self.tee_key not in ("ec", "rsa"):
            raise ConfigError("--tee-key must be ec or rsa")
        if self.sample_init_data is not None and not insecure_tee:
            raise ConfigError("--sample-init-data is for the sample TEE; on TDX/SNP pass --init-data")
        if self.allow_insecure_no_initdata and self.init_data is not None:
            raise ConfigError("--allow-insecure-no-initdata with --init-data: there is nothing to allow")
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
        self.collateral_files()  # each --collateral names a TEE that takes collateral, once
        if self.log_format not in ("text", "json"):
            raise ConfigError("--log-format must be text or json")
        # The vLLM options are checked on vLLM's parsed namespace at the config stage
        # (runtime.vllm_args), not here by spelling.

    def collateral_files(self) -> dict[TeeKind, Path]:
        """Return the collateral files by TEE: ``--collateral TEE=FILE`` and its two aliases.

        Raises:
            ConfigError: an item is not TEE=FILE with a TEE that takes collateral, or one TEE is
                given two files.
        """
        from runtime.collateral import collateral_files, parse_collateral

        aliases = {TeeKind.TDX: self.tdx_collateral, TeeKind.SNP: self.snp_vcek}
        return collateral_files([parse_collateral(item) for item in self.collateral], aliases)

    @property
    def insecure_modes(self) -> list[str]:
        """The development-only modes this configuration enables (shown loudly everywhere)."""
        modes = []
        if self.init_data is None:
            modes.append("configuration not pinned by init-data (set from the command line)")
        if self.tee in insecure_choices():
            modes.append(f"{self.tee} TEE (evidence proves nothing)")
        if self.gpus in insecure_choices(device=True):
            modes.append(f"{self.gpus} GPU device evidence")
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
