"""The attested run configuration: one canonical JSON object of what runs.

The runtime builds it at the ``config`` stage from the declaration it runs under (the CoCo
init-data's ``enclave-serve.toml`` entry, :class:`attest.initdata.WorkloadPins`; in development,
the same declaration made from the command line), serves its exact bytes at
``GET /.well-known/enclave-serve/config`` and puts ``{"sha256": <hex>}`` of those bytes into
every attestation document's claims (which the hardware report data commits to). A verifier
fetches the bytes, checks their digest against the claim and reads or pins them.

**Canonical form** (``enclave-serve/config/v2``): the RFC 8785 (JCS) encoding of the object ::

    format        "enclave-serve/config/v2"
    model         {"manifest_digest": <entry model>}
    runtime       <entry [runtime]>: name, version, vllm, torch, python, python_isolated
    settings      <entry [settings]>, plus "key_resource": <entry key_resource>
    vllm          {"args": <entry vllm_args>}
    environment   <entry [environment]>

Nothing else goes in: no per-boot value (TLS key, paths, listen address) and nothing from the
operator's shell, so anyone holding the init-data recomputes the digest (:meth:`from_pins`),
and two boots under the same init-data claim the same bytes. JCS writes numbers in their
shortest form (``60.0`` and ``60`` both as ``60``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import rfc8785

from foundation.errors import MalformedEvidence

__all__ = ["CONFIG_FORMAT", "CONFIG_MEMBERS", "Declaration", "RunConfiguration"]

#: Format identifier of the configuration object (bumped on any incompatible change).
CONFIG_FORMAT = "enclave-serve/config/v2"
#: The members of the object, exactly.
CONFIG_MEMBERS = frozenset({"format", "model", "runtime", "settings", "vllm", "environment"})
_MAX_CONFIG = 1 << 20


class Declaration(Protocol):
    """What a configuration is made from: :class:`attest.initdata.WorkloadPins` (by its shape,
    so that this module does not import the init-data's)."""

    @property
    def model(self) -> str: ...
    @property
    def key_resource(self) -> str: ...
    @property
    def runtime(self) -> Mapping[str, Any]: ...
    @property
    def settings(self) -> Mapping[str, Any]: ...
    @property
    def vllm_args(self) -> Sequence[str]: ...
    @property
    def environment(self) -> Mapping[str, str]: ...


@dataclass(frozen=True, slots=True)
class RunConfiguration:
    """The canonical bytes of a run configuration, and their digest."""

    raw: bytes = field(repr=False)

    @classmethod
    def from_pins(cls, pins: Declaration) -> RunConfiguration:
        """Encode the configuration a declaration makes (the module docstring's canonical form).

        Raises:
            ValueError: a value has no canonical JSON form.
        """
        obj: dict[str, Any] = {
            "format": CONFIG_FORMAT,
            "model": {"manifest_digest": pins.model},
            "runtime": dict(pins.runtime),
            "settings": {**pins.settings, "key_resource": pins.key_resource},
            "vllm": {"args": list(pins.vllm_args)},
            "environment": dict(pins.environment),
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
