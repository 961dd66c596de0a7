"""``enclave-serve inspect FILE``: print every field of a TDX quote, SNP report or NVIDIA report.

FILE may hold the raw bytes, hex or base64 text, or Trustee evidence JSON (``{"quote": ...}``,
``{"attestation_report": ...}``, ``{"device_evidence_list": ...}``, sample evidence). When the
evidence carries its certificates (TDX quotes, Trustee SNP/NVIDIA JSON) or ``--chain`` /
``--collateral`` supply them, it is also verified at ``--at`` (default: now) and each step is
printed. The report data binding is not checked (no expected value is known here).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from attest.errors import ConfigError, MalformedEvidence, VerificationError
from attest.evidence import Evidence, SampleEvidence, TeeKind, evidence_from_json
from attest.formats import (
    NvidiaDeviceEvidence,
    NvidiaEvidence,
    SnpEvidence,
    TdxEvidence,
    parse_nvidia_report,
    parse_snp_report,
    parse_tdx_quote,
)
from attest.formats.snp_report import REPORT_SIZE
from attest.verify import (
    SnpCollateral,
    TdxCollateral,
    VerificationResult,
    result_of,
    verify_device_evidence,
    verify_evidence,
)
from attest.verify.claims import TCB_STATUS_UNKNOWN

__all__ = ["add_parser", "run"]

#: Trustee evidence JSON: the key that identifies each TEE's object.
_JSON_KINDS = {
    "quote": TeeKind.TDX,
    "attestation_report": TeeKind.SNP,
    "device_evidence_list": TeeKind.NVIDIA,
}


def add_parser(subparsers: Any) -> None:
    """Register the ``inspect`` subcommand."""
    p = subparsers.add_parser(
        "inspect",
        help="print every field of a TDX quote, SNP report or NVIDIA report (and verify it)",
        description=__doc__,
    )
    p.add_argument("file", type=Path, help="raw, hex, base64 or Trustee JSON evidence")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--chain", type=Path, help="certificates: SNP VCEK/VLEK (DER/PEM) or NVIDIA PEM chain")
    p.add_argument("--collateral", type=Path, help="TDX DCAP collateral (dcap-qvl JSON)")
    p.add_argument("--at", help="verification time: ISO 8601 or Unix seconds (default: now)")
    p.set_defaults(func=run)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Loaded:
    evidence: Evidence
    encoding: str
    self_contained: bool


def _decode_text(data: bytes) -> tuple[bytes, str]:
    text = data.strip()
    try:
        return binascii.unhexlify(text), "hex"
    except (binascii.Error, ValueError):
        pass
    try:
        return base64.b64decode(b"".join(text.split()), validate=True), "base64"
    except (binascii.Error, ValueError):
        return data, "raw"


def _from_json(obj: Any) -> _Loaded:
    if isinstance(obj, list):
        # NVIDIA attestation-sdk (NVAT) JSON: a list of {"arch", "nonce", "evidence", "certificate"}.
        nvat = NvidiaEvidence.from_json({"device_evidence_list": obj})
        return _Loaded(evidence=nvat, encoding="nvat-json", self_contained=True)
    if not isinstance(obj, dict):
        raise MalformedEvidence("the JSON is not an evidence object")
    for key, tee in _JSON_KINDS.items():
        if key in obj:
            ev = evidence_from_json(tee, obj)
            contained = tee is not TeeKind.SNP or bool(obj.get("cert_chain"))
            return _Loaded(evidence=ev, encoding="trustee-json", self_contained=contained)
    if "svn" in obj and "report_data" in obj:
        return _Loaded(evidence=SampleEvidence.from_json(obj), encoding="trustee-json", self_contained=True)
    raise MalformedEvidence("unrecognised JSON: expected Trustee tdx, snp, nvidia or sample evidence")


def _from_bytes(raw: bytes, encoding: str, chain: bytes | None) -> _Loaded:
    if len(raw) >= 8 and int.from_bytes(raw[:2], "little") in (4, 5) and raw[4:8] == b"\x81\0\0\0":
        parse_tdx_quote(raw)
        return _Loaded(evidence=TdxEvidence(quote=raw), encoding=encoding, self_contained=True)
    if len(raw) == REPORT_SIZE and 2 <= int.from_bytes(raw[:4], "little") <= 5:
        parse_snp_report(raw)
        return _Loaded(evidence=SnpEvidence(report=raw), encoding=encoding, self_contained=False)
    if len(raw) >= 2 and raw[:2] == b"\x11\xe0":
        parse_nvidia_report(raw)
        arch = _arch_from_chain(chain)
        device = NvidiaDeviceEvidence(arch=arch, uuid="unknown", evidence=raw, certificate=chain or b"")
        return _Loaded(evidence=NvidiaEvidence(devices=(device,)), encoding=encoding, self_contained=False)
    raise MalformedEvidence("not a TDX quote (v4/v5), SNP report (1184 bytes) or NVIDIA SPDM report")


def _arch_from_chain(chain: bytes | None) -> str:
    """The GPU architecture the leaf certificate names (``GH100 …`` Hopper, ``GB…`` Blackwell)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        leaf = x509.load_pem_x509_certificates(chain)[0] if chain else None
    except (ValueError, IndexError):
        leaf = None
    names = [] if leaf is None else leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return "BLACKWELL" if names and str(names[0].value).startswith("GB") else "HOPPER"


def _load(data: bytes, chain: bytes | None) -> _Loaded:
    if data.lstrip()[:1] in (b"{", b"["):
        try:
            obj = json.loads(data)
        except ValueError as exc:
            raise MalformedEvidence("the file looks like JSON but does not parse") from exc
        return _from_json(obj)
    raw, encoding = _decode_text(data)
    return _from_bytes(raw, encoding, chain)


def _parse_time(value: str | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    try:
        return datetime.fromtimestamp(int(value), UTC)
    except ValueError:
        pass
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--at {value!r} is neither ISO 8601 nor Unix seconds") from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _fields(ev: Evidence) -> dict[str, Any]:
    if isinstance(ev, TdxEvidence):
        out = parse_tdx_quote(ev.quote).to_json()
        out["cc_eventlog_size"] = None if ev.cc_eventlog is None else len(ev.cc_eventlog)
        return {"type": "tdx_quote", **out}
    if isinstance(ev, SnpEvidence):
        out = parse_snp_report(ev.report).to_json()
        chain = [c.cert_type.value for c in ev.cert_chain or ()]
        return {"type": "snp_report", **out, "cert_chain": chain}
    if isinstance(ev, NvidiaEvidence):
        gpus = [
            {"arch": d.arch, "uuid": d.uuid, **parse_nvidia_report(d.evidence).to_json()} for d in ev.devices
        ]
        if len(gpus) == 1:
            return {"type": "nvidia_report", **gpus[0]}
        return {"type": "nvidia_evidence", "gpus": gpus}
    if isinstance(ev, SampleEvidence):
        return {"type": "sample", "svn": ev.svn, "report_data": ev.report_data.hex(), "insecure": True}
    raise MalformedEvidence(f"cannot inspect {type(ev).__name__}")


def _with_chain(loaded: _Loaded, chain: bytes | None) -> tuple[Evidence, object | None, bool]:
    ev = loaded.evidence
    if chain is None:
        return ev, None, loaded.self_contained
    if isinstance(ev, SnpEvidence):
        return ev, SnpCollateral(vek=chain), True
    if isinstance(ev, NvidiaEvidence):
        devices = tuple(
            NvidiaDeviceEvidence(arch=d.arch, uuid=d.uuid, evidence=d.evidence, certificate=chain)
            for d in ev.devices
        )
        return NvidiaEvidence(devices=devices), None, True
    return ev, None, loaded.self_contained


def _verify(
    ev: Evidence, collateral: object | None, at: datetime
) -> tuple[VerificationResult | None, str | None]:
    try:
        if ev.tee.is_device:
            return verify_device_evidence(ev, expected_runtime_data=None, now=at, collateral=collateral), None
        return verify_evidence(ev, expected_report_data=None, now=at, collateral=collateral), None
    except (VerificationError, MalformedEvidence) as exc:
        return result_of(exc), str(exc)


def _signature_valid(result: VerificationResult | None) -> bool | None:
    """Whether every signature step passed; None when no signature was checked."""
    if result is None:
        return None
    names = ("quote_signature", "report_signature")
    sig_steps = [s for s in result.steps if s.name in names or s.name.endswith(".signature")]
    return all(s.ok for s in sig_steps) if sig_steps else None


def _tcb_status(result: VerificationResult | None) -> str | None:
    claims = None if result is None else result.claims
    status = getattr(claims, "tcb_status", None)
    return status if isinstance(status, str) else None


def run(args: argparse.Namespace) -> int:
    """Print the fields (and the verification steps); return 1 when verification failed.

    Raises:
        ConfigError: unreadable files or a bad ``--at``.
        MalformedEvidence: the file is not recognised evidence.
    """
    try:
        data = args.file.read_bytes()
        chain = args.chain.read_bytes() if args.chain else None
        collateral = TdxCollateral.from_json(args.collateral.read_bytes()) if args.collateral else None
    except OSError as exc:
        raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    at = _parse_time(args.at)
    loaded = _load(data, chain)
    fields = _fields(loaded.evidence)
    evidence, extra, verifiable = _with_chain(loaded, chain)
    if collateral is not None:
        extra, verifiable = collateral, verifiable or isinstance(evidence, TdxEvidence)
    result: VerificationResult | None = None
    error: str | None = None
    if verifiable and not loaded.evidence.tee.is_insecure:
        result, error = _verify(evidence, extra, at)
    out: dict[str, Any] = {
        "encoding": loaded.encoding,
        **fields,
        "signature_valid": _signature_valid(result),
        "tcb_status": _tcb_status(result),
        "verified_at": at.isoformat() if result is not None else None,
        "verification": None if result is None else result.to_json(),
        "error": error,
    }
    if args.json:
        print(json.dumps(out, sort_keys=False))
    else:
        _print_human(out, result)
    return 1 if error else 0


def _print_human(out: dict[str, Any], result: VerificationResult | None) -> None:
    def show(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                show(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for i, v in enumerate(value):
                show(f"{prefix}[{i}]", v)
        else:
            print(f"{prefix:32} {value}")

    show("", {k: v for k, v in out.items() if k not in ("verification", "error")})
    if result is None:
        print("verification                     not attempted (give --chain / --collateral)")
        return
    print("verification steps:")
    for step in result.steps:
        print(f"  [{step.outcome.value:7}] {step.name:22} {step.detail}")
    if out["error"]:
        print(f"verification FAILED: {out['error']}", file=sys.stderr)
    elif out["tcb_status"] == TCB_STATUS_UNKNOWN:
        print("TCB status unknown: give --collateral to evaluate the platform TCB")
