"""The descriptor of one TEE backend: everything the rest of enclave-serve may know about a kind.

A backend is one folder under :mod:`attest.tee` (``tdx/``, ``snp/``, ``nvidia/``, ``sample/``)
holding its pure parser, its verifier with its collateral, its claims and its I/O attester. The
folder's ``__init__`` builds one frozen :class:`TeeBackend`; the registry
(:data:`attest.tee.BACKENDS`) lists them by :class:`~attest.evidence.TeeKind`, and every choice
by kind elsewhere (CLI choices, collateral flags, ``inspect``, ACI names, configuration checks,
the insecure set) reads a descriptor instead of naming a kind.

The descriptor holds the pure side (parser, verifier, claims, its workload-policy section) as
values and the I/O side (the attester, its local gate, reading the init-data register) as
functions that import it when called, so that verifying evidence never loads the code that
collects it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from attest.evidence import Evidence, TeeKind
from attest.tee.attester import Attester, DeviceAttester, DeviceGate
from attest.tee.policyparts import RuleCheck, TrusteeRules
from attest.tee.result import VerificationResult
from attest.tee.verifier import Verifier

__all__ = ["Collateral", "DeviceGateRunner", "InitDataRegister", "PolicySection", "TeeBackend"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Collateral:
    """What a TEE's verifier accepts as collateral, and how it travels.

    Collateral is never trusted as given: the verifier checks it against its own signatures
    (Intel's PCS chain, AMD's ARK/ASK) when it uses it.
    """

    #: What the file holds, for ``--collateral TEE=FILE``'s help ("DCAP collateral (dcap-qvl JSON)").
    what: str
    #: A file's bytes as the JSON item an attestation document carries under ``collateral``.
    #: Raises MalformedEvidence when the bytes are not that.
    file_to_json: Callable[[bytes], object]
    #: The document's JSON item, typed for the verifier. Raises MalformedEvidence.
    from_json: Callable[[object], object]

    def from_file(self, data: bytes) -> object:
        """Return a file's collateral typed for the verifier.

        Raises:
            MalformedEvidence: the bytes are not this TEE's collateral.
        """
        return self.from_json(self.file_to_json(data))


@dataclass(frozen=True, slots=True, kw_only=True)
class InitDataRegister:
    """The register a primary TEE carries the init-data digest in (TDX MRCONFIGID, SNP HOST_DATA)."""

    #: The register's name in the TEE's specification.
    name: str
    #: Its size in bytes: the first ``size`` bytes of the digest (zero-padded) are what it holds.
    size: int
    #: The register's value in verified claims (None when the claims carry none).
    of_claims: Callable[[object], bytes | None]
    #: Read it on this machine from a source the host cannot forge (I/O, imported when called):
    #: ``read(attester, nonce, now=..., guest_device=...)``. Raises AttestationError.
    read: Callable[..., bytes]


class PolicySection(Protocol):
    """One TEE's section of the workload policy (``[tdx]``, ``[snp]``, ``[gpu]``; ``docs/policy.md``).

    It lives in the TEE's folder (``attest/tee/<tee>/policy.py``); :mod:`attest.verify.workload`
    (parse, evaluate, explain, write), :mod:`attest.client.record` (``policy record``) and
    :mod:`attest.verify.trustee` (``policy trustee``) reach it only through
    :attr:`TeeBackend.policy`, in registry order. A primary TEE's section is applied to that TEE's
    verified claims; a device section to every device's (and is applied, and explained, even
    when the policy does not give it: devices a policy does not expect are refused).
    """

    @property
    def table(self) -> str:
        """The TOML table, and the :class:`~attest.verify.workload.WorkloadPolicy` field (``tdx``)."""
        ...

    @property
    def rules_type(self) -> type:
        """The frozen rules dataclass (checked when constructed; raises PolicyFileError)."""
        ...

    def parse(self, table: Mapping[str, Any]) -> object:
        """Return the rules of the section's TOML table. Raises PolicyFileError."""
        ...

    def evaluate(
        self,
        rule: RuleCheck,
        rules: object | None,
        results: Sequence[VerificationResult],
        *,
        allow_insecure: bool,
    ) -> None:
        """Apply every rule of ``rules`` to verified ``results`` through ``rule``.

        ``results`` is the primary result (primary sections, called only with rules) or every
        device result (device sections, ``rules`` None when the policy has none);
        ``allow_insecure`` is the policy's ``insecure_development`` and the caller's flag.
        """
        ...

    def explain(self, rules: object | None) -> list[str]:
        """Return the rules as sentences (``policy show``); None: the section is not given."""
        ...

    def to_toml(self, rules: object) -> list[str]:
        """Return the section as TOML lines, its ``[table]`` header first."""
        ...

    def record(self, results: Sequence[VerificationResult], notes: list[str]) -> object | None:
        """Return the rules pinning what ``results`` show (``policy record``), or None.

        Appends to ``notes`` what the recording could not pin well.
        """
        ...

    def trustee(self, rules: object) -> TrusteeRules:
        """Return the section's part of the Trustee export. Raises ExportRefused."""
        ...


#: ``gate(attester, expected_count=..., recheck=...)``: a device's local gate (I/O; imported when
#: called), run before any key release and by the watchdog. Raises VerificationError.
DeviceGateRunner = Callable[..., DeviceGate]


@dataclass(frozen=True, slots=True, kw_only=True)
class TeeBackend:
    """One TEE, as the rest of enclave-serve sees it.

    .. warning::
       ``insecure`` backends (the sample TEEs) prove nothing; every use needs an explicit
       development flag, and the attestation document says so.
    """

    kind: TeeKind
    #: The TEE's name for people ("Intel TDX").
    title: str
    #: An additional (device) TEE whose evidence travels as Trustee's ``additional_evidence``.
    device: bool = False
    #: Its evidence proves nothing (development only); never auto-detected.
    insecure: bool = False
    #: ``--tee auto`` / ``--gpus auto`` looks for it (in registry order).
    detectable: bool = False
    #: The evidence type, with ``from_json`` (Trustee's JSON shape).
    evidence_type: type[Evidence]
    #: Trustee-shaped JSON to typed evidence. Raises MalformedEvidence.
    evidence_from_json: Callable[[Mapping[str, Any]], Evidence]
    #: The key that identifies this TEE's Trustee evidence JSON (``inspect``); None: no such key.
    json_key: str | None = None
    #: The verifier (pure: no I/O).
    verifier: Verifier
    #: The claims type its verifier records.
    claims_type: type
    #: Every field of the evidence, for ``enclave-serve inspect``.
    fields: Callable[[Evidence], dict[str, Any]]
    #: Raw evidence bytes (``inspect FILE``) as this TEE's evidence and whether it carries its own
    #: certificates, or None when the bytes are not this TEE's; ``chain`` is ``--chain``'s bytes.
    #: Raises MalformedEvidence when the bytes look like this TEE's but do not parse.
    from_raw: Callable[[bytes, bytes | None], tuple[Evidence, bool] | None] = lambda raw, chain: None
    #: The evidence with ``--chain``'s certificates (``inspect``): the evidence to verify and the
    #: collateral to verify it with; None: this TEE takes no separate chain.
    with_chain: Callable[[Evidence, bytes], tuple[Evidence, object | None]] | None = None
    #: What its verifier takes as collateral; None: it takes none.
    collateral: Collateral | None = None
    #: The attester class (I/O; the function imports it when called). Raises ImportError when this
    #: build lacks what the attester needs.
    attester: Callable[[], type[Attester] | type[DeviceAttester]]
    #: The init-data register (primary TEEs).
    init_data: InitDataRegister | None = None
    #: The TEE's ``tee_type`` in an ACI report (aci.md §4.2); None: same as ``kind``.
    aci_tee_type: str | None = None
    #: Why verified claims show a debuggable TEE, or None (``RefuseInsecure``).
    debuggable: Callable[[object], str | None] = lambda claims: None
    #: Its section of the workload policy (``[tdx]``, ``[snp]``, ``[gpu]``); None: it has none.
    policy: PolicySection | None = None
    #: Kata's ``runtimeClassName`` for a confidential pod in this TEE (``enclave-serve deploy``);
    #: None: it cannot be deployed to Kubernetes.
    kata_runtime_class: str | None = None
    #: The device's local gate, run on its attester before any key release and by the watchdog
    #: (I/O: the function imports it when called); None: it has none. It verifies with the
    #: folder's verifier, which the attester itself never imports.
    gate: DeviceGateRunner | None = None

    @property
    def name(self) -> str:
        """The kind's serialised name (``tdx``), as on the command line and in JSON."""
        return self.kind.value

    def typed_collateral(self, data: bytes, *, source: Path | str = "collateral") -> object:
        """Return ``data`` (a collateral file's bytes) typed for this TEE's verifier.

        Raises:
            MalformedEvidence: this TEE takes no collateral, or the bytes are not its collateral.
        """
        from foundation.errors import MalformedEvidence

        if self.collateral is None:
            raise MalformedEvidence(f"{source}: the {self.name} verifier takes no collateral")
        return self.collateral.from_file(data)
