"""CoCo init-data: the workload identity the hardware carries (spec: ``trustee:kbs/docs/initdata.md``).

Init-data is a TOML document the pod spec carries (the Kata annotation
:data:`INITDATA_ANNOTATION`, base64 of the gzip of the TOML) and the hypervisor measures: its
digest, under the document's own ``algorithm``, is placed in TDX ``MRCONFIGID`` (48 bytes) or
SNP ``HOST_DATA`` (32 bytes), zero-padded when shorter and truncated when longer
(:func:`register_for_digest`). Inside, ``policy.rego`` is the Kata agent policy that pins the
container image, its arguments and environment; ``aa.toml`` and ``cdh.toml`` configure the
attestation agent and the confidential data hub. enclave-serve adds one entry,
:data:`ENCLAVE_SERVE_ENTRY`, with its own pins (:class:`WorkloadPins`): the expected model
identity, the key resource, the vLLM options and optionally the exact run configuration.

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
import tomllib
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from attest.errors import MalformedEvidence
from attest.evidence import TeeKind

__all__ = [
    "ENCLAVE_SERVE_ENTRY",
    "INITDATA_ANNOTATION",
    "INITDATA_VERSION",
    "INSECURE_AGENT_POLICY",
    "REGISTER_SIZES",
    "InitData",
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
#: Size of the register each TEE carries the digest in (TDX MRCONFIGID, SNP HOST_DATA); the
#: sample TEE uses TDX's size.
REGISTER_SIZES: Mapping[TeeKind, int] = {TeeKind.TDX: 48, TeeKind.SNP: 32, TeeKind.SAMPLE: 48}
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


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadPins:
    """enclave-serve's entry in the init-data: what the runtime must load and how.

    ``model`` is the manifest digest the runtime must load (required). ``key_resource`` the KBS
    resource of the key, ``vllm_args`` the exact pass-through vLLM options, ``config_sha256``
    the exact attested run configuration (``enclave-serve run … --print-config``); each that is
    set the runtime enforces at its ``config`` stage.
    """

    model: str
    key_resource: str | None = None
    vllm_args: tuple[str, ...] | None = None
    config_sha256: str | None = None

    def to_toml(self) -> str:
        """Return the entry's TOML text."""
        lines = [f"model = {json.dumps(self.model)}"]
        if self.key_resource is not None:
            lines.append(f"key_resource = {json.dumps(self.key_resource)}")
        if self.vllm_args is not None:
            lines.append("vllm_args = [" + ", ".join(json.dumps(a) for a in self.vllm_args) + "]")
        if self.config_sha256 is not None:
            lines.append(f"config_sha256 = {json.dumps(self.config_sha256)}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, text: str) -> WorkloadPins:
        """Parse the entry. Raises MalformedEvidence."""
        try:
            obj = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise MalformedEvidence(f"init-data {ENCLAVE_SERVE_ENTRY} is not TOML: {exc}") from None
        unknown = sorted(set(obj) - {"model", "key_resource", "vllm_args", "config_sha256"})
        if unknown:
            raise MalformedEvidence(
                f"init-data {ENCLAVE_SERVE_ENTRY} has unknown key(s) {', '.join(unknown)}"
            )
        model = _basic(obj.get("model"), "model")
        if not model.startswith("sha256:") or len(model) != 71:
            raise MalformedEvidence(f"init-data {ENCLAVE_SERVE_ENTRY}: model must be sha256:<64 hex>")
        args = obj.get("vllm_args")
        if args is not None and (not isinstance(args, list) or not all(isinstance(a, str) for a in args)):
            raise MalformedEvidence(f"init-data {ENCLAVE_SERVE_ENTRY}: vllm_args must be a list of strings")
        config = obj.get("config_sha256")
        if config is not None:
            config = _basic(config, "config_sha256").removeprefix("sha256:")
            if len(config) != 64 or config.strip("0123456789abcdef"):
                raise MalformedEvidence(
                    f"init-data {ENCLAVE_SERVE_ENTRY}: config_sha256 must be 64 hex digits"
                )
        resource = obj.get("key_resource")
        return cls(
            model=model,
            key_resource=None if resource is None else _basic(resource, "key_resource"),
            vllm_args=None if args is None else tuple(args),
            config_sha256=config,
        )


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
