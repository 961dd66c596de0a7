"""Intel TDX: DCAP quotes (parser, verifier with DCAP collateral, claims) and the configfs-tsm attester.

Modules: :mod:`~attest.tee.tdx.quote` and :mod:`~attest.tee.tdx.report` (pure parsers),
:mod:`~attest.tee.tdx.verifier` and :mod:`~attest.tee.tdx.claims` (pure verification),
:mod:`~attest.tee.tdx.policy` (the ``[tdx]`` section of the workload policy),
:mod:`~attest.tee.tdx.attester` (I/O: configfs-tsm, ``/dev/tdx_guest``) and
:mod:`~attest.tee.tdx.register` (the init-data register, read on this machine). :data:`BACKEND`
is what the registry (:mod:`attest.tee`) lists; nothing outside :mod:`attest.tee` imports this
folder directly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from attest.evidence import Evidence, TeeKind
from attest.tee.attester import Attester
from attest.tee.base import Collateral, InitDataRegister, TeeBackend
from attest.tee.tdx.claims import TdxClaims
from attest.tee.tdx.policy import SECTION
from attest.tee.tdx.quote import TdxEvidence, parse_tdx_quote
from attest.tee.tdx.verifier import TdxCollateral, TdxVerifier
from foundation.errors import MalformedEvidence

__all__ = ["BACKEND"]


def _attester() -> type[Attester]:
    from attest.tee.tdx.attester import TdxAttester

    return TdxAttester


def _read_register(attester: Attester, nonce: bytes, **options: Any) -> bytes:
    from attest.tee.tdx.register import tdx_init_data_register

    device = options.get("guest_device")
    if device is None:
        return tdx_init_data_register(attester, nonce, now=options.get("now"))
    return tdx_init_data_register(attester, nonce, device=device, now=options.get("now"))


def _fields(ev: Evidence) -> dict[str, Any]:
    assert isinstance(ev, TdxEvidence)
    out = parse_tdx_quote(ev.quote).to_json()
    out["cc_eventlog_size"] = None if ev.cc_eventlog is None else len(ev.cc_eventlog)
    return {"type": "tdx_quote", **out}


def _from_raw(raw: bytes, chain: bytes | None) -> tuple[Evidence, bool] | None:
    if len(raw) >= 8 and int.from_bytes(raw[:2], "little") in (4, 5) and raw[4:8] == b"\x81\0\0\0":
        parse_tdx_quote(raw)
        return TdxEvidence(quote=raw), True
    return None


def _collateral_file(data: bytes) -> object:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise MalformedEvidence("TDX collateral is not JSON") from exc


def _collateral_from_json(item: object) -> object:
    if not isinstance(item, str | bytes | Mapping):
        raise MalformedEvidence("TDX collateral is not JSON")
    return TdxCollateral.from_json(item)


def _of_claims(claims: object) -> bytes | None:
    return claims.mr_config_id if isinstance(claims, TdxClaims) else None


def _debuggable(claims: object) -> str | None:
    if isinstance(claims, TdxClaims) and claims.debug:
        return "the TD runs in debug mode (TDATTRIBUTES.DEBUG)"
    return None


BACKEND = TeeBackend(
    kind=TeeKind.TDX,
    title="Intel TDX",
    detectable=True,
    evidence_type=TdxEvidence,
    evidence_from_json=TdxEvidence.from_json,
    json_key="quote",
    verifier=TdxVerifier(),
    claims_type=TdxClaims,
    fields=_fields,
    from_raw=_from_raw,
    collateral=Collateral(
        what="DCAP collateral (dcap-qvl JSON)",
        file_to_json=_collateral_file,
        from_json=_collateral_from_json,
    ),
    attester=_attester,
    init_data=InitDataRegister(name="MRCONFIGID", size=48, of_claims=_of_claims, read=_read_register),
    aci_tee_type="tdx",
    debuggable=_debuggable,
    policy=SECTION,
    kata_runtime_class="kata-qemu-nvidia-gpu-tdx",
)
