"""``enclave-serve`` with the sample attester slowed, for ``bench/serve.py --quote-delay`` only.

    python -m bench.quote_delay SECONDS run MODEL ...     (then the arguments of ``enclave-serve``)

Every sample-TEE collection (key release, the cached documents, each fresh collection, watchdog
rounds) first sleeps SECONDS: a TDX quote through configfs-tsm takes about 1 s on a stock guest
kernel (``../shared/reference/deployment.md``), the sample TEE a millisecond. Nothing here is
reachable from the installed ``enclave-serve``: this module lives in ``bench``.
"""

from __future__ import annotations

import sys
import time

from attest.tee.sample.attester import UnsafeSampleAttester
from attest.tee.sample.evidence import SampleEvidence


def slow_sample_attester(seconds: float) -> None:
    """Make every :class:`UnsafeSampleAttester` collection take ``seconds`` longer."""
    collect = UnsafeSampleAttester.collect

    def slowed(self: UnsafeSampleAttester, report_data: bytes) -> SampleEvidence:
        time.sleep(seconds)
        return collect(self, report_data)

    UnsafeSampleAttester.collect = slowed  # type: ignore[method-assign]


def main() -> int:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m bench.quote_delay SECONDS run MODEL ...")
    seconds = float(sys.argv.pop(1))
    if seconds < 0:
        raise SystemExit("SECONDS must not be negative")
    slow_sample_attester(seconds)
    from runtime.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
