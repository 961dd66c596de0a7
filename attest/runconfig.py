"""The attested run configuration: one canonical JSON object of what runs.

The runtime builds it at the ``config`` stage from what it will actually use, serves its exact
bytes at ``GET /.well-known/enclave-serve/config`` and puts ``{"sha256": <hex>}`` of those bytes
into every attestation document's claims (which the hardware report data commits to). A
verifier fetches the bytes, checks their digest against the claim and reads or pins them.

Members (all required, nothing else allowed)::

    format        "enclave-serve/config/v1"
    model         {"manifest_digest": "sha256:…"}     the model identity
    runtime       {"name", "version", "vllm", "torch", "python", "python_isolated"}
    settings      the runtime's own settings: TEE, GPUs, key source, KBS URL and CA digest,
                  key resource, TLS, insecure modes…
    vllm          {"options": {...}}  every allowed vLLM option with its effective value
    environment   {name: value}       allowed and forced variables (private paths as
                                      "<private>/…", secrets as "<redacted>")
    private       {"filesystem": "tmpfs"}

Per-boot values (the TLS key, socket and private paths, listen address and port) are not in
it, so two boots with the same inputs give the same bytes, and any change of an input gives
other bytes. The encoding is RFC 8785 (JCS), so an independent implementation reproduces the
digest from the parsed object.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import rfc8785

from attest.errors import MalformedEvidence

__all__ = ["CONFIG_FORMAT", "CONFIG_MEMBERS", "RunConfiguration"]

#: Format identifier of the configuration object (bumped on any incompatible change).
CONFIG_FORMAT = "enclave-serve/config/v1"
#: The members of the object, exactly.
CONFIG_MEMBERS = frozenset({"format", "model", "runtime", "settings", "vllm", "environment", "private"})
_MAX_CONFIG = 1 << 20


@dataclass(frozen=True, slots=True)
class RunConfiguration:
    """The canonical bytes of a run configuration, and their digest."""

    raw: bytes = field(repr=False)

    @classmethod
    def build(
        cls,
        *,
        manifest_digest: str,
        runtime: Mapping[str, Any],
        settings: Mapping[str, Any],
        vllm_options: Mapping[str, Any],
        environment: Mapping[str, str],
        private_filesystem: str,
    ) -> RunConfiguration:
        """Encode a configuration canonically.

        Raises:
            ValueError: a value has no canonical JSON form (a float NaN, a non-JSON object).
        """
        obj: dict[str, Any] = {
            "format": CONFIG_FORMAT,
            "model": {"manifest_digest": manifest_digest},
            "runtime": dict(runtime),
            "settings": dict(settings),
            "vllm": {"options": dict(vllm_options)},
            "environment": dict(environment),
            "private": {"filesystem": private_filesystem},
        }
        try:
            return cls(rfc8785.dumps(obj))
        except Exception as exc:  # rfc8785 raises its own error types
            raise ValueError(f"the configuration has no canonical JSON form: {exc}") from exc

    @classmethod
    def from_bytes(cls, data: bytes) -> RunConfiguration:
        """Parse configuration bytes as served (strict: canonical, known format, exact members).

        Raises:
            MalformedEvidence: not canonical JSON, another format, or other members.
        """
        if len(data) > _MAX_CONFIG:
            raise MalformedEvidence("configuration: larger than 1 MiB")
        try:
            obj = json.loads(data)
            canonical = rfc8785.dumps(obj)
        except Exception as exc:
            raise MalformedEvidence("configuration: not JSON") from exc
        if canonical != data:
            raise MalformedEvidence("configuration: not RFC 8785 canonical JSON")
        if not isinstance(obj, dict) or obj.get("format") != CONFIG_FORMAT:
            raise MalformedEvidence(f"configuration: not {CONFIG_FORMAT}")
        if set(obj) != CONFIG_MEMBERS:
            raise MalformedEvidence("configuration: unexpected or missing members")
        if not all(isinstance(obj[m], dict) for m in CONFIG_MEMBERS - {"format"}):
            raise MalformedEvidence("configuration: every member but 'format' must be an object")
        return cls(bytes(data))

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the exact bytes: what the attestation claims carry."""
        return hashlib.sha256(self.raw).hexdigest()

    def to_json(self) -> dict[str, Any]:
        """Return the parsed object."""
        obj: dict[str, Any] = json.loads(self.raw)
        return obj

    @property
    def manifest_digest(self) -> str:
        """The model identity this configuration serves."""
        return str(self.to_json()["model"]["manifest_digest"])
