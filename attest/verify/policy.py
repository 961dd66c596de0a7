"""Policies over verified evidence, in the sigstore-python style.

A policy is a tiny object with one method, ``verify(result)``, that returns None or raises
:class:`~attest.errors.PolicyViolation`. Policies compose with :class:`AllOf` and
:class:`AnyOf`; an empty :class:`AllOf` refuses (an empty list of requirements would accept
anything, which is never what a caller meant). A policy that targets one TEE refuses the
results of every other TEE, so a policy can never pass by not applying.

.. warning::
   :class:`UnsafeNoOp` accepts everything and exists for tests and inspection only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar, runtime_checkable

from attest.errors import PolicyViolation
from attest.verify.claims import (
    TCB_STATUS_UNKNOWN,
    NvidiaClaims,
    SampleClaims,
    SnpClaims,
    TdxClaims,
)
from attest.verify.result import VerificationResult

__all__ = [
    "AllOf",
    "AllowedGpuVersions",
    "AllowedSnpMeasurements",
    "AllowedTdxMeasurements",
    "AllowedTdxTcbStatus",
    "AnyOf",
    "MinimumSampleSvn",
    "MinimumSnpTcb",
    "Policy",
    "RefuseInsecure",
    "UnsafeNoOp",
]

logger = logging.getLogger(__name__)

_C = TypeVar("_C")


@runtime_checkable
class Policy(Protocol):
    """Decide whether a verified result is acceptable."""

    def verify(self, result: VerificationResult) -> None:
        """Return None if ``result`` is acceptable.

        Raises:
            PolicyViolation: it is not.
        """
        ...


def _claims(policy: object, result: VerificationResult, kind: type[_C]) -> _C:
    claims = result.claims
    if not isinstance(claims, kind):
        raise PolicyViolation(
            f"policy {type(policy).__name__} applies to {kind.__name__} evidence, not "
            f"{result.tee.value}; combine per-TEE policies with AnyOf if several TEEs are acceptable"
        )
    return claims


def _hexset(values: Iterable[bytes | str] | None) -> frozenset[bytes] | None:
    if values is None:
        return None
    out = frozenset(bytes.fromhex(v) if isinstance(v, str) else bytes(v) for v in values)
    if not out:
        raise ValueError("an allowed-values set must not be empty (it would refuse everything)")
    return out


def _check_allowed(policy: object, name: str, value: bytes, allowed: frozenset[bytes] | None) -> None:
    if allowed is not None and value not in allowed:
        raise PolicyViolation(
            f"policy {type(policy).__name__}: {name} {value.hex()} is not an allowed value; "
            "if this build is trusted, add its reference value to the policy"
        )


class AllOf:
    """Pass when every child policy passes. An empty ``AllOf`` always refuses."""

    def __init__(self, children: Sequence[Policy]) -> None:
        self._children = tuple(children)

    def verify(self, result: VerificationResult) -> None:
        """Run every child.

        Raises:
            PolicyViolation: there are no children, or one refused.
        """
        # An empty list of requirements is trivially satisfied, which is a likely misuse.
        if not self._children:
            raise PolicyViolation("policy AllOf has no child policies; refusing (give at least one)")
        for child in self._children:
            child.verify(result)


class AnyOf:
    """Pass when at least one child policy passes. An empty ``AnyOf`` always refuses."""

    def __init__(self, children: Sequence[Policy]) -> None:
        self._children = tuple(children)

    def verify(self, result: VerificationResult) -> None:
        """Run the children until one passes.

        Raises:
            PolicyViolation: none passed (the message lists why each refused).
        """
        reasons: list[str] = []
        for child in self._children:
            try:
                child.verify(result)
            except PolicyViolation as exc:
                reasons.append(str(exc))
            else:
                return
        raise PolicyViolation("policy AnyOf: no child policy accepted the evidence: " + "; ".join(reasons))


class UnsafeNoOp:
    """Accept everything.

    .. warning::
       **Fundamentally insecure.** It checks nothing, so any evidence that verifies
       cryptographically passes, whatever software it measures. Use it only in tests or to
       inspect evidence; it logs a warning every time it is used.
    """

    def verify(self, result: VerificationResult) -> None:
        """Accept ``result`` and log a warning."""
        logger.warning(
            "INSECURE: UnsafeNoOp policy accepted %s evidence without checking it", result.tee.value
        )


class RefuseInsecure:
    """Refuse evidence that proves nothing or whose TEE is debuggable.

    Refuses sample/sampledevice results (``insecure``), TDX quotes with TDATTRIBUTES.DEBUG set,
    and SNP reports whose guest policy allows debugging.
    """

    def verify(self, result: VerificationResult) -> None:
        """Check the insecure flag and the debug attributes.

        Raises:
            PolicyViolation: the evidence is insecure or from a debuggable TEE.
        """
        if result.insecure:
            raise PolicyViolation(
                f"policy RefuseInsecure: {result.tee.value} evidence is insecure (not signed by "
                "hardware); use a real TEE"
            )
        claims = result.claims
        if isinstance(claims, TdxClaims) and claims.debug:
            raise PolicyViolation("policy RefuseInsecure: the TD runs in debug mode (TDATTRIBUTES.DEBUG)")
        if isinstance(claims, SnpClaims) and claims.debug_allowed:
            raise PolicyViolation("policy RefuseInsecure: the SNP guest policy allows debugging")


class AllowedTdxMeasurements:
    """Require TDX measurement registers to be among allowed values (hex strings or bytes).

    Only the registers given are checked; at least one must be given.
    """

    def __init__(
        self,
        *,
        mrtd: Iterable[bytes | str] | None = None,
        rtmr0: Iterable[bytes | str] | None = None,
        rtmr1: Iterable[bytes | str] | None = None,
        rtmr2: Iterable[bytes | str] | None = None,
        rtmr3: Iterable[bytes | str] | None = None,
        mr_config_id: Iterable[bytes | str] | None = None,
    ) -> None:
        self._allowed = {
            "mrtd": _hexset(mrtd),
            "rtmr0": _hexset(rtmr0),
            "rtmr1": _hexset(rtmr1),
            "rtmr2": _hexset(rtmr2),
            "rtmr3": _hexset(rtmr3),
            "mr_config_id": _hexset(mr_config_id),
        }
        if all(v is None for v in self._allowed.values()):
            raise ValueError("AllowedTdxMeasurements needs at least one register to check")

    def verify(self, result: VerificationResult) -> None:
        """Compare each configured register.

        Raises:
            PolicyViolation: a register is not allowed, or the result is not TDX.
        """
        c = _claims(self, result, TdxClaims)
        actual = {
            "mrtd": c.mrtd,
            "rtmr0": c.rtmrs[0],
            "rtmr1": c.rtmrs[1],
            "rtmr2": c.rtmrs[2],
            "rtmr3": c.rtmrs[3],
            "mr_config_id": c.mr_config_id,
        }
        for name, allowed in self._allowed.items():
            _check_allowed(self, name, actual[name], allowed)


class AllowedSnpMeasurements:
    """Require the SNP launch MEASUREMENT and/or HOST_DATA to be among allowed values."""

    def __init__(
        self,
        *,
        measurement: Iterable[bytes | str] | None = None,
        host_data: Iterable[bytes | str] | None = None,
    ) -> None:
        self._measurement = _hexset(measurement)
        self._host_data = _hexset(host_data)
        if self._measurement is None and self._host_data is None:
            raise ValueError("AllowedSnpMeasurements needs measurement and/or host_data")

    def verify(self, result: VerificationResult) -> None:
        """Compare MEASUREMENT and HOST_DATA.

        Raises:
            PolicyViolation: a value is not allowed, or the result is not SNP.
        """
        c = _claims(self, result, SnpClaims)
        _check_allowed(self, "measurement", c.measurement, self._measurement)
        _check_allowed(self, "host_data", c.host_data, self._host_data)


class AllowedTdxTcbStatus:
    """Require the DCAP TCB status to be one of ``statuses`` (e.g. ``{"UpToDate"}``).

    Evidence verified without collateral has status ``"unknown"``; include it only if an
    unchecked TCB is acceptable. Advisory IDs in ``refused_advisories`` are refused whatever
    the status.
    """

    def __init__(self, statuses: Iterable[str], *, refused_advisories: Iterable[str] = ()) -> None:
        self._statuses = frozenset(statuses)
        self._refused = frozenset(refused_advisories)
        if not self._statuses:
            raise ValueError("AllowedTdxTcbStatus needs at least one status")

    def verify(self, result: VerificationResult) -> None:
        """Check the status and advisories.

        Raises:
            PolicyViolation: the status is not allowed, an advisory is refused, or not TDX.
        """
        c = _claims(self, result, TdxClaims)
        if c.tcb_status not in self._statuses:
            hint = (
                "verify with DCAP collateral (--collateral) to learn the TCB status"
                if c.tcb_status == TCB_STATUS_UNKNOWN
                else "update the platform TCB or allow this status"
            )
            raise PolicyViolation(
                f"policy AllowedTdxTcbStatus: TCB status {c.tcb_status!r} is not one of "
                f"{sorted(self._statuses)}; {hint}"
            )
        bad = sorted(self._refused.intersection(c.advisory_ids))
        if bad:
            raise PolicyViolation(f"policy AllowedTdxTcbStatus: refused advisories apply: {', '.join(bad)}")


class MinimumSnpTcb:
    """Require each component of the SNP REPORTED_TCB to be at least the given SPL."""

    def __init__(
        self, *, bootloader: int = 0, tee: int = 0, snp: int = 0, microcode: int = 0, fmc: int | None = None
    ) -> None:
        self._minimum = {"bootloader": bootloader, "tee": tee, "snp": snp, "microcode": microcode}
        self._fmc = fmc

    def verify(self, result: VerificationResult) -> None:
        """Compare REPORTED_TCB (the TCB the VCEK certifies) with the minimum.

        Raises:
            PolicyViolation: a component is lower, or the result is not SNP.
        """
        tcb = _claims(self, result, SnpClaims).reported_tcb
        for name, minimum in self._minimum.items():
            value = getattr(tcb, name)
            if value < minimum:
                raise PolicyViolation(
                    f"policy MinimumSnpTcb: reported TCB {name} SPL {value} is below {minimum}; "
                    "update the host firmware/microcode"
                )
        if self._fmc is not None and (tcb.fmc is None or tcb.fmc < self._fmc):
            raise PolicyViolation(
                f"policy MinimumSnpTcb: reported TCB fmc SPL {tcb.fmc} is below {self._fmc}"
            )


class AllowedGpuVersions:
    """Require every GPU's driver and/or VBIOS version to be among allowed values."""

    def __init__(
        self, *, driver_versions: Iterable[str] | None = None, vbios_versions: Iterable[str] | None = None
    ) -> None:
        self._drivers = None if driver_versions is None else frozenset(driver_versions)
        self._vbios = None if vbios_versions is None else frozenset(v.lower() for v in vbios_versions)
        if self._drivers is None and self._vbios is None:
            raise ValueError("AllowedGpuVersions needs driver_versions and/or vbios_versions")

    def verify(self, result: VerificationResult) -> None:
        """Check each GPU.

        Raises:
            PolicyViolation: a version is not allowed, there are no GPUs, or not NVIDIA.
        """
        gpus = _claims(self, result, NvidiaClaims).gpus
        if not gpus:
            raise PolicyViolation("policy AllowedGpuVersions: the evidence lists no GPU")
        for gpu in gpus:
            if self._drivers is not None and gpu.driver_version not in self._drivers:
                raise PolicyViolation(
                    f"policy AllowedGpuVersions: GPU {gpu.uuid} runs driver {gpu.driver_version!r}, "
                    f"not one of {sorted(self._drivers)}"
                )
            if self._vbios is not None and gpu.vbios_version not in self._vbios:
                raise PolicyViolation(
                    f"policy AllowedGpuVersions: GPU {gpu.uuid} has VBIOS {gpu.vbios_version!r}, "
                    f"not one of {sorted(self._vbios)}"
                )


class MinimumSampleSvn:
    """Require sample evidence's ``svn`` to be at least ``minimum`` (it proves nothing anyway)."""

    def __init__(self, minimum: int) -> None:
        self._minimum = minimum

    def verify(self, result: VerificationResult) -> None:
        """Compare the svn.

        Raises:
            PolicyViolation: the svn is lower, or the result is not sample evidence.
        """
        svn = _claims(self, result, SampleClaims).svn
        if svn < self._minimum:
            raise PolicyViolation(f"policy MinimumSampleSvn: svn {svn} is below {self._minimum}")
