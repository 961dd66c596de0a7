"""The KBS/key-source API the runtime calls exists under these names (exports: tests/test_exports.py)."""

from __future__ import annotations


def test_lead_api_names() -> None:
    from attest.kbs.client import KbsClient  # noqa: F401
    from attest.kbs.dev.server import DevKbsConfig, create_app, serve  # noqa: F401
    from attest.keysource import (  # noqa: F401
        CdhKeySource,
        KbsKeySource,
        KeyRelease,
        KeyReleaseReceipt,
        KeySource,
        ResourceUri,
        UnsafeFileKeySource,
    )
