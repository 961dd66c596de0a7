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

from attest.evidence import Evidence, TeeKind
from attest.tee import BACKENDS, TCB_STATUS_UNKNOWN, evidence_from_json
from attest.verify import VerificationResult, result_of, verify_device_evidence, verify_evidence
from foundation.errors import ConfigError, MalformedEvidence, VerificationError

__all__ = ["add_parser", "run"]

#: Trustee evidence JSON: the key that identifies each TEE's object (from the backends).
_JSON_KINDS = {b.json_key: kind for kind, b in BACKENDS.items() if b.json_key is not None}


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
    p.add_argument(
        "--collateral",
        type=Path,
        help="collateral for the evidence's TEE: "
        + "; ".join(f"{b.name}: {b.collateral.what}" for b in BACKENDS.values() if b.collateral),
    )
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
        nvat = evidence_from_json(TeeKind.NVIDIA, {"device_evidence_list": obj})
        return _Loaded(evidence=nvat, encoding="nvat-json", self_contained=True)
    if not isinstance(obj, dict):
        raise MalformedEvidence("the JSON is not an evidence object")
    for key, tee in _JSON_KINDS.items():
        if key in obj:
            ev = evidence_from_json(tee, obj)
            contained = BACKENDS[tee].with_chain is None or bool(obj.get("cert_chain"))
            return _Loaded(evidence=ev, encoding="trustee-json", self_contained=contained)
    if "svn" in obj and "report_data" in obj:
        sample = evidence_from_json(TeeKind.SAMPLE, obj)
        return _Loaded(evidence=sample, encoding="trustee-json", self_contained=True)
    raise MalformedEvidence("unrecognised JSON: expected Trustee tdx, snp, nvidia or sample evidence")


def _from_bytes(raw: bytes, encoding: str, chain: bytes | None) -> _Loaded:
    for b in BACKENDS.values():
        found = b.from_raw(raw, chain)
        if found is not None:
            evidence, contained = found
            return _Loaded(evidence=evidence, encoding=encoding, self_contained=contained)
    raise MalformedEvidence("not a TDX quote (v4/v5), SNP report (1184 bytes) or NVIDIA SPDM report")


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
    return BACKENDS[ev.tee].fields(ev)


def _with_chain(loaded: _Loaded, chain: bytes | None) -> tuple[Evidence, object | None, bool]:
    ev = loaded.evidence
    add = BACKENDS[ev.tee].with_chain
    if chain is None or add is None:
        return ev, None, loaded.self_contained
    evidence, collateral = add(ev, chain)
    return evidence, collateral, True


def _verify(
    ev: Evidence, collateral: object | None, at: datetime
) -> tuple[VerificationResult | None, str | None]:
    try:
        if BACKENDS[ev.tee].device:
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
        collateral_file = args.collateral.read_bytes() if args.collateral else None
    except OSError as exc:
        raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    at = _parse_time(args.at)
    loaded = _load(data, chain)
    fields = _fields(loaded.evidence)
    evidence, extra, verifiable = _with_chain(loaded, chain)
    if collateral_file is not None:
        extra, verifiable = (
            BACKENDS[evidence.tee].typed_collateral(collateral_file, source=args.collateral),
            True,
        )
    result: VerificationResult | None = None
    error: str | None = None
    if verifiable and not BACKENDS[loaded.evidence.tee].insecure:
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
