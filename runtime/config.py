"""Runtime configuration: one typed object built from the command line.

Nothing here reads the environment or touches the network; :func:`RunConfig.validate` checks
combinations eagerly so a bad flag fails before anything boots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from attest.errors import ConfigError

__all__ = ["KEY_SOURCES", "RESERVED_VLLM_FLAGS", "RunConfig"]

KEY_SOURCES = ("kbs", "cdh", "file")

#: vLLM flags the runtime sets itself; passing them through would bypass the enclave.
RESERVED_VLLM_FLAGS = (
    "--model",
    "--load-format",
    "--model-loader-extra-config",
    "--host",
    "--port",
    "--uds",
    "--ssl-keyfile",
    "--ssl-certfile",
    "--enable-ssl-refresh",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    """Everything ``enclave-serve run`` needs."""

    model_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    tee: str = "auto"
    gpus: str = "auto"
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
    key_id: str | None = None
    tls: bool = True
    tls_hostnames: tuple[str, ...] = ("localhost", "127.0.0.1")
    exit_on_failure: bool = False
    vllm_args: tuple[str, ...] = field(default_factory=tuple)

    def validate(self) -> None:
        """Check flag combinations.

        Raises:
            ConfigError: an inconsistent or unsafe combination, with what to change.
        """
        if not self.model_dir.is_dir():
            raise ConfigError(f"model directory {self.model_dir} does not exist")
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
        if self.tee_key not in ("ec", "rsa"):
            raise ConfigError("--tee-key must be ec or rsa")
        for arg in self.vllm_args:
            flag = arg.split("=", 1)[0]
            if flag in RESERVED_VLLM_FLAGS:
                raise ConfigError(f"{flag} is set by enclave-serve itself and cannot be passed to vLLM")

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
        return modes
