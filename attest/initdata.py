"""CoCo init-data: the workload identity the hardware carries (spec: ``trustee:kbs/docs/initdata.md``).

Init-data is a TOML document the pod spec carries (the Kata annotation
:data:`INITDATA_ANNOTATION`, base64 of the gzip of the TOML) and the hypervisor measures: its
digest, under the document's own ``algorithm``, is placed in TDX ``MRCONFIGID`` (48 bytes) or
SNP ``HOST_DATA`` (32 bytes), zero-padded when shorter and truncated when longer
(:func:`register_for_digest`). Inside, ``policy.rego`` is the Kata agent policy that pins the
container image, its arguments and environment; ``aa.toml`` and ``cdh.toml`` configure the
attestation agent and the confidential data hub. enclave-serve adds one entry,
:data:`ENCLAVE_SERVE_ENTRY`, with its declaration of everything that is attested
(:class:`WorkloadPins`): the model identity, the key resource, the software the image runs,
every attested runtime setting, the vLLM options and the attested environment. The runtime takes
its configuration from it, and the run configuration it claims is computed from it alone.

The digest covers the **exact bytes** (no canonicalisation, a final newline counts), so the
bytes sent to the KBS (RCAR ``init-data``) must be the bytes that were hashed: :class:`InitData`
keeps them (``raw``).

Verified here: the structure (version ``0.1.0``, a supported algorithm, a ``data`` table of
strings) and, by :meth:`InitData.matches`, that a register holds this document's digest. Not
verified here: who wrote it (only the hardware register makes it trustworthy).
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import json
import math
import tomllib
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from attest.evidence import TeeKind
from attest.runconfig import RunConfiguration
from attest.tee import BACKENDS
from foundation.errors import MalformedEvidence

__all__ = [
    "ENCLAVE_SERVE_ENTRY",
    "INITDATA_ANNOTATION",
    "INITDATA_VERSION",
    "INSECURE_AGENT_POLICY",
    "REGISTER_SIZES",
    "RUNTIME_FACTS",
    "InitData",
    "SettingValue",
    "WorkloadPins",
    "register_for_digest",
]

#: The only init-data version (spec; ``kata-types/src/initdata.rs`` ``validate``).
INITDATA_VERSION = "0.1.0"
#: The Kata pod annotation carrying base64(gzip(init-data TOML)) (``kata: annotations.go``).
INITDATA_ANNOTATION = "io.katacontainers.config.hypervisor.cc_init_data"

#: An agent policy that allows every agent request except exec and reading container output
#: streams: for development only (it pins nothing about the container). ``enclave-serve initdata
#: --allow-insecure-agent-policy`` writes it; the runtime lists it among its insecure modes.
INSECURE_AGENT_POLICY = "package agent_policy\n\n" + "".join(
    f"default {name} := {'false' if name in ('ExecProcessRequest', 'ReadStreamRequest') else 'true'}\n"
    for name in (
        "AddARPNeighborsRequest", "AddSwapRequest", "CloseStdinRequest", "CopyFileRequest",
        "CreateContainerRequest", "CreateSandboxRequest", "DestroySandboxRequest", "ExecProcessRequest",
        "GetMetricsRequest", "GetOOMEventRequest", "GuestDetailsRequest", "ListInterfacesRequest",
        "ListRoutesRequest", "MemHotplugByProbeRequest", "OnlineCPUMemRequest", "PauseContainerRequest",
        "PullImageRequest", "ReadStreamRequest", "RemoveContainerRequest",
        "RemoveStaleVirtiofsShareMountsRequest", "ReseedRandomDevRequest", "ResumeContainerRequest",
        "SetGuestDateTimeRequest", "SignalProcessRequest", "StartContainerRequest", "StartTracingRequest",
        "StatsContainerRequest", "StopTracingRequest", "TtyWinResizeRequest", "UpdateContainerRequest",
        "UpdateEphemeralMountsRequest", "UpdateInterfaceRequest", "UpdateRoutesRequest",
        "WaitProcessRequest", "WriteStreamRequest",
    )
)  # fmt: skip

#: enclave-serve's own entry in the init-data's ``data`` table.
ENCLAVE_SERVE_ENTRY = "enclave-serve.toml"
#: Size of the register each TEE carries the digest in (TDX MRCONFIGID, SNP HOST_DATA; the
#: sample TEE uses TDX's size), from the backends (:mod:`attest.tee`).
REGISTER_SIZES: Mapping[TeeKind, int] = MappingProxyType(
    {kind: b.init_data.size for kind, b in BACKENDS.items() if b.init_data is not None}
)
_ALGORITHMS = {"sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}
#: The largest init-data document accepted, as TOML and as the annotation's decompressed output.
#: Real documents are a few KiB (the Cloud API Adaptor's example, with its agent policy, is
#: 4.5 KiB) and the compressed annotation must fit Kubernetes' 256 KiB cap on all of a pod's
#: annotations together; 1 MiB leaves room for large generated policies while a gzip bomb (about
#: 1000:1) stops after 1 MiB of output instead of exhausting the guest's memory.
_MAX_INITDATA = 1 << 20
#: zlib ``wbits`` for exactly one gzip member (header and CRC-32/ISIZE trailer checked).
_GZIP_WBITS = 16 + zlib.MAX_WBITS


def _gunzip_bounded(packed: bytes, limit: int) -> bytes:
    """Decompress exactly one gzip member into at most ``limit`` bytes.

    Decompression stops at ``limit + 1`` bytes of output, so a bomb costs no more memory or time
    than that. Trailing bytes after the member (a second member included) are refused: Kata's
    agent reads one member, and the bytes measured must be the bytes parsed here.

    Raises:
        MalformedEvidence: not gzip, truncated, trailing data, or more than ``limit`` bytes.
    """
    inflater = zlib.decompressobj(wbits=_GZIP_WBITS)
    try:
        out = inflater.decompress(packed, limit + 1)
    except zlib.error as exc:
        raise MalformedEvidence(f"the init-data annotation is not base64 of gzip: {exc}") from None
    if len(out) > limit:
        raise MalformedEvidence(
            f"the init-data annotation decompresses to more than {limit >> 20} MiB; refused"
        )
    if not inflater.eof:
        raise MalformedEvidence("the init-data annotation is not base64 of gzip: truncated")
    if inflater.unused_data:
        raise MalformedEvidence(
            "the init-data annotation has data after its gzip stream (one gzip member expected)"
        )
    return out


def register_for_digest(tee: TeeKind, digest: bytes) -> bytes:
    """Return the register value that carries ``digest`` on ``tee`` (zero-pad or truncate).

    Raises:
        ValueError: ``tee`` carries no init-data digest.
    """
    try:
        size = REGISTER_SIZES[tee]
    except KeyError:
        raise ValueError(f"{tee.value} evidence carries no init-data digest") from None
    return digest[:size].ljust(size, b"\x00")


def _basic(value: object, what: str) -> str:
    if not isinstance(value, str) or any(c in value for c in "\n\r\x00"):
        raise MalformedEvidence(f"init-data {what} must be a single-line string")
    return value


#: The members of :attr:`WorkloadPins.runtime`: the software the image runs (``enclave-serve
#: image-facts`` prints them inside the image).
RUNTIME_FACTS = ("name", "version", "vllm", "torch", "python", "python_isolated")
#: A declared setting's value: TOML scalars and lists of strings (no tables, no dates).
SettingValue = str | int | float | bool | list[str]
_ENTRY_KEYS = frozenset({"model", "key_resource", "vllm_args", "runtime", "settings", "environment"})


def _toml_string(text: str) -> str:
    """A TOML basic string for ``text`` (JSON's escapes are TOML's; DEL must be escaped too)."""
    return json.dumps(text).replace("\x7f", "\\u007f")


def _toml_key(key: str) -> str:
    """A bare TOML key where the key allows it, else a quoted one."""
    return key if key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key) else _toml_string(key)


def _toml_value(value: SettingValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("a declared number must be finite")
        return json.dumps(value)
    return "[" + ", ".join(_toml_string(item) for item in value) + "]"


def _setting_value(name: str, value: object) -> SettingValue:
    if isinstance(value, bool | str | int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise MalformedEvidence(
        f"init-data {ENCLAVE_SERVE_ENTRY}: setting {name} must be a string, number, boolean or a list "
        "of strings"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadPins:
    """enclave-serve's entry in the init-data: the declaration of everything that is attested.

    ``model`` is the manifest digest the runtime must load, ``key_resource`` the KBS resource
    of its key, ``runtime`` the software the image runs (:data:`RUNTIME_FACTS`), ``settings``
    every attested runtime setting by name (a setting not declared is null), ``vllm_args`` the
    exact vLLM options and ``environment`` the attested environment variables (a secret one,
    ``VLLM_API_KEY``, as ``"<redacted>"``: it must be set, its value is not pinned).

    The run configuration the enclave claims is a function of this object alone
    (:meth:`configuration`, specified in :mod:`attest.runconfig`), so a provider computes it
    offline and a verifier recomputes it from the init-data. Which setting names exist, and
    their types, is the runtime's declaration (``runtime/config.py``); this class checks only
    the entry's shape.
    """

    model: str
    key_resource: str
    runtime: Mapping[str, str | bool]
    settings: Mapping[str, SettingValue]
    vllm_args: tuple[str, ...] = ()
    environment: Mapping[str, str] = field(default_factory=dict)

    def to_toml(self) -> str:
        """Return the entry's TOML text (keys in a fixed order: the same pins give the same bytes)."""
        lines = [
            f"model = {_toml_string(self.model)}",
            f"key_resource = {_toml_string(self.key_resource)}",
            "vllm_args = [" + ", ".join(_toml_string(a) for a in self.vllm_args) + "]",
        ]
        for table, values in (
            ("runtime", {k: self.runtime[k] for k in RUNTIME_FACTS if k in self.runtime}),
            ("settings", dict(sorted(self.settings.items()))),
            ("environment", dict(sorted(self.environment.items()))),
        ):
            lines += ["", f"[{table}]"]
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items()]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, text: str) -> WorkloadPins:
        """Parse the entry (strict: known keys only, typed values).

        Raises:
            MalformedEvidence: not TOML, an unknown or missing key, or a value of the wrong type.
        """
        what = f"init-data {ENCLAVE_SERVE_ENTRY}"
        try:
            obj = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise MalformedEvidence(f"{what} is not TOML: {exc}") from None
        unknown = sorted(set(obj) - _ENTRY_KEYS)
        if unknown:
            raise MalformedEvidence(
                f"{what} has unknown key(s) {', '.join(unknown)} (written by another enclave-serve "
                "version? make it again with 'enclave-serve initdata')"
            )
        missing = sorted({"model", "key_resource", "runtime", "settings"} - set(obj))
        if missing:
            raise MalformedEvidence(
                f"{what} declares no {', '.join(missing)}: make it with 'enclave-serve initdata'"
            )
        model = _basic(obj["model"], "model")
        if not model.startswith("sha256:") or len(model) != 71 or model[7:].strip("0123456789abcdef"):
            raise MalformedEvidence(f"{what}: model must be sha256:<64 lowercase hex>")
        args = obj.get("vllm_args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise MalformedEvidence(f"{what}: vllm_args must be a list of strings")
        runtime, settings, environment = obj["runtime"], obj["settings"], obj.get("environment", {})
        if not all(isinstance(t, dict) for t in (runtime, settings, environment)):
            raise MalformedEvidence(f"{what}: runtime, settings and environment must be tables")
        if set(runtime) != set(RUNTIME_FACTS):
            raise MalformedEvidence(f"{what}: [runtime] must declare exactly {', '.join(RUNTIME_FACTS)}")
        for key, value in runtime.items():
            if not isinstance(value, bool if key == "python_isolated" else str):
                raise MalformedEvidence(f"{what}: [runtime] {key} has the wrong type")
        if not all(isinstance(v, str) for v in environment.values()):
            raise MalformedEvidence(f"{what}: [environment] values must be strings")
        return cls(
            model=model,
            key_resource=_basic(obj["key_resource"], "key_resource"),
            runtime=dict(runtime),
            settings={str(k): _setting_value(str(k), v) for k, v in settings.items()},
            vllm_args=tuple(args),
            environment=dict(environment),
        )

    def configuration(self) -> RunConfiguration:
        """The run configuration these pins declare (what the enclave claims; attest.runconfig).

        Raises:
            ValueError: a value has no canonical JSON form.
        """
        return RunConfiguration.from_pins(self)

    @property
    def config_sha256(self) -> str:
        """Hex SHA-256 of :meth:`configuration`: the ``config`` digest verifiers pin."""
        return self.configuration().sha256


def _multiline(text: str) -> str:
    """A TOML multi-line literal string (no escapes) holding ``text``."""
    if "'''" in text:
        raise ValueError("init-data entries cannot contain ''' (a TOML literal-string delimiter)")
    return "'''\n" + text + "'''"


@dataclass(frozen=True, slots=True)
class InitData:
    """One init-data document: its exact bytes and what they say."""

    raw: bytes
    algorithm: str
    data: Mapping[str, str]

    @property
    def insecure_agent_policy(self) -> bool:
        """Whether ``policy.rego`` is the development policy that pins nothing about the container."""
        return self.data.get("policy.rego") == INSECURE_AGENT_POLICY

    @classmethod
    def from_bytes(cls, raw: bytes) -> InitData:
        """Parse init-data TOML bytes (the exact bytes that were measured).

        Raises:
            MalformedEvidence: not TOML, another version, an unsupported algorithm, or a
                ``data`` value that is not a string.
        """
        if len(raw) > _MAX_INITDATA:
            raise MalformedEvidence("init-data is larger than 1 MiB")
        try:
            obj = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise MalformedEvidence(f"init-data is not TOML: {exc}") from None
        if obj.get("version") != INITDATA_VERSION:
            raise MalformedEvidence(
                f"init-data version must be {INITDATA_VERSION!r}, not {obj.get('version')!r}"
            )
        algorithm = obj.get("algorithm")
        if algorithm not in _ALGORITHMS:
            raise MalformedEvidence(f"init-data algorithm must be one of {', '.join(_ALGORITHMS)}")
        data = obj.get("data", {})
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise MalformedEvidence("init-data [data] must map names to strings")
        return cls(raw=bytes(raw), algorithm=str(algorithm), data=dict(data))

    @classmethod
    def from_annotation(cls, value: str | bytes) -> InitData:
        """Parse the Kata annotation form: base64 (standard alphabet) of gzip of the TOML.

        Missing ``=`` padding is tolerated (published examples lack it). Decompression is
        bounded: output beyond 1 MiB (the init-data size limit) is refused before it is produced.

        Raises:
            MalformedEvidence: not base64 of one gzip member, larger than 1 MiB decompressed,
                or not valid init-data.
        """
        text = (value.decode("ascii", errors="replace") if isinstance(value, bytes) else value).strip()
        text += "=" * (-len(text) % 4)  # lenient padding
        try:
            packed = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MalformedEvidence(f"the init-data annotation is not base64 of gzip: {exc}") from None
        return cls.from_bytes(_gunzip_bounded(packed, _MAX_INITDATA))

    @classmethod
    def load(cls, data: bytes) -> InitData:
        """Parse either form: the TOML itself, or the annotation (base64 of gzip)."""
        stripped = data.strip()
        if stripped.startswith(b"H4sI"):  # base64 of the gzip magic 1f 8b 08
            return cls.from_annotation(stripped.decode("ascii", errors="replace"))
        return cls.from_bytes(data)

    @classmethod
    def build(
        cls,
        *,
        entries: Sequence[tuple[str, str]],
        algorithm: str = "sha384",
    ) -> InitData:
        """Write an init-data document with ``entries`` (name, text) in ``[data]``, in order.

        Raises:
            ValueError: an unsupported algorithm or an entry that cannot be a literal string.
        """
        if algorithm not in _ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(_ALGORITHMS)}")
        parts = [f'version = "{INITDATA_VERSION}"', f'algorithm = "{algorithm}"', "", "[data]"]
        for name, text in entries:
            parts.append(
                f"{json.dumps(name)} = {_multiline(text if text.endswith(chr(10)) else text + chr(10))}"
            )
        return cls.from_bytes(("\n".join(parts) + "\n").encode())

    @property
    def digest(self) -> bytes:
        """The digest of the exact bytes under the document's algorithm."""
        return _ALGORITHMS[self.algorithm](self.raw).digest()

    @property
    def digest_text(self) -> str:
        """``"<algorithm>:<hex digest>"``."""
        return f"{self.algorithm}:{self.digest.hex()}"

    def register(self, tee: TeeKind) -> bytes:
        """The register value this document gives on ``tee`` (MRCONFIGID, HOST_DATA)."""
        return register_for_digest(tee, self.digest)

    def matches(self, tee: TeeKind, register: bytes) -> bool:
        """Whether ``register`` (read from verified evidence of ``tee``) holds this digest."""
        return register == self.register(tee)

    def annotation(self) -> str:
        """The Kata annotation value: base64 of gzip of the exact bytes."""
        return base64.b64encode(gzip.compress(self.raw, mtime=0)).decode("ascii")

    @property
    def pins(self) -> WorkloadPins | None:
        """enclave-serve's pins, if the document has its entry.

        Raises:
            MalformedEvidence: the entry is malformed.
        """
        text = self.data.get(ENCLAVE_SERVE_ENTRY)
        return None if text is None else WorkloadPins.from_toml(text)

    def to_wire(self) -> dict[str, Any]:
        """The RCAR ``init-data`` member: ``{"format": "toml", "body": <the exact text>}``."""
        return {"format": "toml", "body": self.raw.decode("utf-8")}
