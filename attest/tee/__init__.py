"""The TEE registry: one backend per :class:`~attest.evidence.TeeKind`, the only switch on kind.

Each TEE is one folder (``tdx/``, ``snp/``, ``nvidia/``, ``sample/``) holding its pure parser,
its verifier with its collateral, its claims and its I/O attester, described by one frozen
:class:`~attest.tee.base.TeeBackend`. :data:`BACKENDS` lists them, in detection order; everything
that differs by kind elsewhere (CLI choices, collateral flags, ``inspect``, ACI names, the
insecure set, configuration checks) reads a descriptor from here. Backends do not register
themselves, and nothing outside :mod:`attest.tee` imports a backend's folder (import-linter
contracts in ``pyproject.toml`` keep both true).

Adding a TEE: one folder with its ``BACKEND``, one line below, tests, vectors and a docs page.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from attest.evidence import Evidence, TeeKind
from attest.tee import nvidia, sample, snp, tdx
from attest.tee.base import Collateral, InitDataRegister, PolicySection, TeeBackend

# The public types of the backends, for the code outside attest.tee that names them (the
# verification API's re-exports, the workload policy's re-exported sections): this module is
# their one door.
from attest.tee.nvidia.claims import GpuClaims, NvidiaClaims
from attest.tee.nvidia.policy import GpuRules
from attest.tee.sample.claims import SampleClaims
from attest.tee.snp.claims import SnpClaims
from attest.tee.snp.measure import snp_launch_measurement
from attest.tee.snp.policy import SNP_POLICY_DEBUG, SNP_POLICY_MIGRATE_MA, SNP_POLICY_SMT, SnpRules
from attest.tee.snp.verifier import SnpCollateral, fetch_vcek
from attest.tee.tdx.claims import TCB_STATUS_UNKNOWN, TdxClaims
from attest.tee.tdx.policy import TDX_ATTR_DEBUG, TDX_ATTR_MIGRATABLE, TDX_ATTR_SEPT_VE_DISABLE, TdxRules
from attest.tee.tdx.verifier import TdxCollateral
from foundation.errors import MalformedEvidence

__all__ = [
    "BACKENDS",
    "SNP_POLICY_DEBUG",
    "SNP_POLICY_MIGRATE_MA",
    "SNP_POLICY_SMT",
    "TCB_STATUS_UNKNOWN",
    "TDX_ATTR_DEBUG",
    "TDX_ATTR_MIGRATABLE",
    "TDX_ATTR_SEPT_VE_DISABLE",
    "Collateral",
    "GpuClaims",
    "GpuRules",
    "InitDataRegister",
    "NvidiaClaims",
    "PolicySection",
    "SampleClaims",
    "SnpClaims",
    "SnpCollateral",
    "SnpRules",
    "TdxClaims",
    "TdxCollateral",
    "TdxRules",
    "TeeBackend",
    "backend",
    "collateral_from_json",
    "evidence_from_json",
    "fetch_vcek",
    "insecure_kinds",
    "insecure_names",
    "kinds",
    "snp_launch_measurement",
]

#: Every backend by kind, in detection order (primary: TDX, then SNP; devices: NVIDIA).
BACKENDS: Mapping[TeeKind, TeeBackend] = MappingProxyType(
    {
        TeeKind.TDX: tdx.BACKEND,
        TeeKind.SNP: snp.BACKEND,
        TeeKind.SAMPLE: sample.BACKEND,
        TeeKind.NVIDIA: nvidia.BACKEND,
        TeeKind.SAMPLE_DEVICE: sample.DEVICE_BACKEND,
    }
)


def backend(kind: TeeKind | str) -> TeeBackend:
    """Return the backend of ``kind`` (a :class:`TeeKind` or its serialised name).

    Raises:
        MalformedEvidence: no backend is known for that name.
    """
    try:
        return BACKENDS[TeeKind(kind)]
    except ValueError:
        raise MalformedEvidence(
            f"unknown TEE {kind!r}; known: {', '.join(k.value for k in BACKENDS)}"
        ) from None


def kinds(
    *, device: bool | None = None, insecure: bool | None = None, collateral: bool | None = None
) -> tuple[str, ...]:
    """Return the serialised names of the backends that match, in registry order (CLI choices)."""
    return tuple(
        b.name
        for b in BACKENDS.values()
        if (device is None or b.device == device)
        and (insecure is None or b.insecure == insecure)
        and (collateral is None or (b.collateral is not None) == collateral)
    )


def insecure_kinds() -> frozenset[TeeKind]:
    """Return the kinds whose evidence proves nothing (the sample TEEs)."""
    return frozenset(k for k, b in BACKENDS.items() if b.insecure)


def insecure_names() -> frozenset[str]:
    """Return the serialised names of the kinds whose evidence proves nothing (``sample``...)."""
    return frozenset(k.value for k in insecure_kinds())


def evidence_from_json(tee: TeeKind, obj: object) -> Evidence:
    """Parse Trustee-shaped evidence JSON for ``tee``.

    Raises:
        MalformedEvidence: the object is not evidence of that kind.
    """
    if not isinstance(obj, Mapping):
        raise MalformedEvidence(f"{tee.value} evidence must be a JSON object")
    return backend(tee).evidence_from_json(obj)


def collateral_from_json(items: Mapping[str, Any]) -> dict[TeeKind, object]:
    """Type collateral given as JSON by TEE name (an attestation document's ``collateral``).

    Each backend says what its item is (``tdx``: dcap-qvl collateral JSON; ``snp``:
    ``{"vcek": <base64 DER or PEM>}``). The result is what :func:`attest.verify.verify_evidence`
    takes as ``collateral``. Nothing here is trusted yet: each item is checked against its own
    signatures (Intel's PCS chain, AMD's ARK/ASK) when used.

    Raises:
        MalformedEvidence: an item is not what its TEE expects, or the TEE is unknown or takes
            no collateral.
    """
    typed: dict[TeeKind, object] = {}
    for name, item in items.items():
        try:
            found = backend(name)
        except MalformedEvidence:
            raise MalformedEvidence(f"collateral: unknown TEE {name!r}") from None
        if found.collateral is None:
            raise MalformedEvidence(f"collateral: unknown TEE {name!r}")
        typed[found.kind] = found.collateral.from_json(item)
    return typed
