"""Read the TDX init-data register (MRCONFIGID) from a source the host cannot forge.

The TDREPORT path needs only the attester's I/O; the fallback collects a quote and verifies it
offline with this folder's verifier, which is why it lives here and not in the attester (an
attester never imports verification).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

from attest.tee.attester import Attester
from attest.tee.tdx.attester import TDX_GUEST_DEVICE, read_tdreport
from attest.tee.tdx.claims import TdxClaims
from attest.tee.tdx.quote import TdxEvidence
from attest.tee.tdx.verifier import TdxVerifier
from attest.tee.verifier import run_verifier
from foundation.errors import AttestationError, BackendUnavailable

__all__ = ["tdx_init_data_register"]

logger = logging.getLogger(__name__)


def tdx_init_data_register(
    attester: Attester, nonce: bytes, *, device: Path = TDX_GUEST_DEVICE, now: datetime | None = None
) -> bytes:
    """Return MRCONFIGID, the TDX init-data register, from a source the host cannot forge.

    Steps:

    1. Read the TDREPORT from ``device`` over ``nonce`` (:func:`read_tdreport`) and return its
       MRCONFIGID. The TDX module writes it through a TDCALL; the host is not on the path.
    2. Only if ``device`` is absent (:func:`read_tdreport` raised ``BackendUnavailable``):
       collect a quote over ``nonce`` through ``attester`` (configfs-tsm). The host's quoting
       service assembles that quote, so it is trusted only if it verifies offline
       (:class:`~attest.tee.tdx.verifier.TdxVerifier`, no policy, no collateral): the quote signature, the
       QE report's binding of the attestation key, the PCK chain to the pinned Intel SGX Root CA
       valid at ``now``, the PCK signature over the QE report, Intel's TD Quoting Enclave
       identity, and REPORTDATA equal to ``nonce`` (so the quote is fresh). Then return its
       MRCONFIGID.

    A device that exists but fails is an error, not a reason to fall back.

    What is *not* verified on the fallback path: without collateral, neither revocation (a
    host holding the keys of a compromised, revoked platform could still sign a quote) nor the
    TCB level; and nothing ties the quote to *this* TD beyond the fresh nonce, which the host
    sees: a host that runs a TD of its own could have that TD quote our nonce with the
    MRCONFIGID it wants. A verifier that checks MRCONFIGID in this TD's own quotes (the KBS,
    the user's ``verify``) still catches such a substitution; the TDREPORT path has neither gap.

    ``nonce`` is at most 64 bytes (zero-padded). ``now`` (default: the current time, timezone
    aware) is when the PCK chain must be valid.

    Raises:
        AttestationError: the device is absent and the quote could not be collected or does not
            verify (the message says why; the cause is chained), or ``attester`` returned
            something that is not TDX evidence.
        EvidenceCollectionError: the device exists but did not give a usable TDREPORT.
        ValueError: ``nonce`` is longer than 64 bytes, or ``now`` is naive.
    """
    # (1) The TDREPORT, straight from the TDX module.
    try:
        report = read_tdreport(nonce, device=device)
    except BackendUnavailable as exc:
        absent = exc
    else:
        logger.info("init-data register: MRCONFIGID read from the TDREPORT (tdx_guest)")
        return report.mr_config_id
    # (2) No device: only a quote that verifies offline to Intel's root will do.
    logger.warning(
        "no TDX guest device (%s): reading MRCONFIGID from a configfs-tsm quote verified offline "
        "(no collateral: revocation and TCB level are not checked)",
        absent.log_detail,
    )
    return _register_from_verified_quote(attester, nonce, now)


def _register_from_verified_quote(attester: Attester, nonce: bytes, now: datetime | None) -> bytes:
    if now is not None and now.tzinfo is None:
        raise ValueError("now must be timezone-aware (e.g. datetime.now(UTC))")
    why = (
        "the TDX init-data register (MRCONFIGID) could not be read from anything the host cannot "
        "forge: there is no TDX guest device (tdx_guest) to read the TDREPORT from, and the "
        "configfs-tsm quote, which the host's quoting service assembles"
    )
    advice = "Give the runtime /dev/tdx_guest, or check the platform's quoting service"
    try:
        evidence = attester.collect(nonce)
    except AttestationError as exc:
        raise AttestationError(f"{why}, could not be collected: {exc}. {advice}.") from exc
    if not isinstance(evidence, TdxEvidence):
        raise AttestationError(
            f"{why}, is missing: the {attester.tee.value} attester returned "
            f"{type(evidence).__name__}, not TDX evidence"
        )
    try:
        result = run_verifier(
            TdxVerifier(),
            evidence,
            nonce,
            policy=None,
            now=now or datetime.now(UTC),
            collateral=None,
            allow_insecure=False,
        )
    except AttestationError as exc:
        raise AttestationError(
            f"{why}, does not verify offline to the pinned Intel root: {exc} {advice}."
        ) from exc
    claims = result.claims
    if not isinstance(claims, TdxClaims):  # the TDX verifier always records TdxClaims
        raise AttestationError(f"{why}, verified without TDX claims")
    logger.info("init-data register: MRCONFIGID read from a quote that verified offline")
    return claims.mr_config_id
