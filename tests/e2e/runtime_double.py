"""``enclave-serve`` with one test double in place, for the end-to-end suite only.

    python -m tests.e2e.runtime_double run MODEL ...     (same arguments as ``enclave-serve``)

The double is chosen by ``ENCLAVE_SERVE_TEST_DOUBLE`` (read and removed before the runtime
starts, so the runtime's environment allowlist never sees it):

* ``corrupt-weight=NAME`` — every worker negates parameter NAME after loading and authenticating
  the weights (the loader's ``test_corrupt_weight`` hook): the canary must fail the boot.
* ``failing-device-after=N`` — the GPUs are one :class:`FailingDeviceAttesterDouble` (a sample
  device whose watchdog re-checks pass N times, then report the GPU gone), handed to the runtime
  through its device-attester seam (:class:`runtime.seams.BootSeams`).

Nothing here is reachable from the installed ``enclave-serve``: this module lives in ``tests``.
"""

from __future__ import annotations

import os
import sys

from attest.tee.attester import DeviceGate
from attest.tee.sample.attester import UnsafeSampleDeviceAttester
from foundation.errors import VerificationError


class FailingDeviceAttesterDouble(UnsafeSampleDeviceAttester):
    """Test double: passes the boot gate and ``passes`` watchdog re-checks, then fails."""

    def __init__(self, passes: int) -> None:
        super().__init__(allow_insecure=True)
        self.passes = passes
        self.rechecks = 0

    def recheck(self, *, expected_count: int | None = None) -> DeviceGate:
        self.rechecks += 1
        if self.rechecks > self.passes:
            raise VerificationError("GPU 0 (test double) no longer answers with valid evidence")
        return super().recheck(expected_count=expected_count)


def main() -> int:
    spec = os.environ.pop("ENCLAVE_SERVE_TEST_DOUBLE", "")
    os.environ.pop("PYTHONPATH", None)
    kind, _, value = spec.partition("=")
    import functools

    import runtime.boot
    import runtime.commands.run
    from runtime.cli import main as cli_main
    from runtime.seams import BootSeams

    if kind == "corrupt-weight":
        runtime.boot.Runtime.loader_test_hooks = {"test_corrupt_weight": value}
    elif kind == "failing-device-after":
        device = FailingDeviceAttesterDouble(int(value))
        seams = BootSeams(devices=lambda **_kw: [device])
        # The run command (registered by the parser cli_main builds) boots with these seams.
        runtime.commands.run.run = functools.partial(runtime.commands.run.run, seams=seams)  # type: ignore[assignment]
    elif kind:
        raise SystemExit(f"unknown test double {kind!r}")
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
