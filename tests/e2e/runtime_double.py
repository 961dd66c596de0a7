"""``enclave-serve`` with one test double in place, for the end-to-end suite only.

    python -m tests.e2e.runtime_double run MODEL ...     (same arguments as ``enclave-serve``)

The double is chosen by ``ENCLAVE_SERVE_TEST_DOUBLE`` (read and removed before the runtime
starts, so the runtime's environment allowlist never sees it):

* ``corrupt-weight=NAME`` — every worker negates parameter NAME after loading and authenticating
  the weights (the loader's ``test_corrupt_weight`` hook): the canary must fail the boot.
* ``failing-device-after=N`` — the GPUs are one sample device whose watchdog re-checks pass N
  times, then report the GPU gone (:class:`FailingRecheckDouble`, handed to the runtime through
  its device-gate seam, :class:`runtime.seams.BootSeams`).

Nothing here is reachable from the installed ``enclave-serve``: this module lives in ``tests``.
"""

from __future__ import annotations

import os
import sys

from attest.tee.attester import DeviceAttester, DeviceGate
from attest.tee.select import gate_device
from foundation.errors import VerificationError


class FailingRecheckDouble:
    """Test double of the device gate: the boot's gate and ``passes`` watchdog re-checks are the
    real one; every later re-check fails."""

    def __init__(self, passes: int) -> None:
        self.passes = passes
        self.rechecks = 0

    def __call__(
        self, device: DeviceAttester, *, expected_count: int | None = None, recheck: bool = False
    ) -> DeviceGate:
        if recheck:
            self.rechecks += 1
            if self.rechecks > self.passes:
                raise VerificationError("GPU 0 (test double) no longer answers with valid evidence")
        return gate_device(device, expected_count=expected_count, recheck=recheck)


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
        seams = BootSeams(device_gate=FailingRecheckDouble(int(value)))
        # The run command (registered by the parser cli_main builds) boots with these seams.
        runtime.commands.run.run = functools.partial(runtime.commands.run.run, seams=seams)  # type: ignore[assignment]
    elif kind:
        raise SystemExit(f"unknown test double {kind!r}")
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
