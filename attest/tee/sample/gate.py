"""The sample device's local gate (development only: the evidence proves nothing).

:func:`gate` collects sampledevice evidence over a random nonce and checks it with the folder's
verifier, as a real device's gate would; it lives beside the attester so that the attester never
imports the verifier.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

from attest.tee.attester import DeviceAttester, DeviceGate
from attest.tee.sample.verifier import SampleDeviceVerifier
from attest.tee.verifier import run_verifier
from foundation.errors import VerificationError

__all__ = ["gate"]


def gate(attester: DeviceAttester, *, expected_count: int | None = None, recheck: bool = False) -> DeviceGate:
    """Collect sampledevice evidence over a random nonce and check it (it proves nothing).

    ``recheck`` (the watchdog's round) checks the same.

    Raises:
        VerificationError: the evidence does not verify, or ``expected_count`` is not 1.
    """
    nonce = secrets.token_bytes(32)
    result = run_verifier(
        SampleDeviceVerifier(),
        attester.collect(nonce),
        nonce,
        policy=None,
        now=datetime.now(UTC),
        collateral=None,
        allow_insecure=True,
    )
    if expected_count is not None and expected_count != 1:
        raise VerificationError(f"{expected_count} devices were expected; {attester.tee.value} attests 1")
    return DeviceGate(tee=attester.tee, devices=1, steps=len(result.steps))
