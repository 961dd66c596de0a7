"""Trustee Key Broker Service: the RCAR 0.4.0 client, its wire models, and a development KBS.

Modules, each owning one thing:

* :mod:`attest.kbs.wire`: the messages, field for field as ``kbs-types`` (shared by both sides).
* :mod:`foundation.resource`: ``kbs:///repo/type/tag`` resource URIs.
* :mod:`attest.kbs.teekey`: the ephemeral TEE key and JWE decryption (jwcrypto).
* :mod:`attest.kbs.dev.jwe`: JWE responses built exactly as Trustee builds them (server side).
* :mod:`attest.kbs.client`: :class:`KbsClient`, the handshake and resource fetches.
* :mod:`attest.kbs.admin`: the admin API (``kbs-client set-resource`` / ``set-resource-policy``).
* :mod:`attest.kbs.token`: the EAR-shaped attestation token.
* :mod:`attest.kbs.retry`: bounded retries under a deadline.
* :mod:`attest.kbs.dev.policy`, :mod:`attest.kbs.dev.appraisal`, :mod:`attest.kbs.dev.server`: kbs-dev.

The dev server is not imported here (it pulls in FastAPI and uvicorn); import
:mod:`attest.kbs.dev.server` explicitly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from foundation.resource import ResourceUri

if TYPE_CHECKING:
    from attest.kbs.admin import KbsAdminClient
    from attest.kbs.client import KbsAttestation, KbsClient, TokenTransport
    from attest.kbs.retry import Deadline, RetryPolicy
    from attest.kbs.teekey import TeeKeyKind, TeeKeyPair

#: Imported on first use: the client and the TEE key need jwcrypto, which a client-only install
#: (``enclave-serve verify``, whose packages parse ``kbs:///`` URIs) does not have.
_LAZY = {
    "Deadline": "attest.kbs.retry",
    "RetryPolicy": "attest.kbs.retry",
    "KbsAdminClient": "attest.kbs.admin",
    "KbsAttestation": "attest.kbs.client",
    "KbsClient": "attest.kbs.client",
    "TeeKeyKind": "attest.kbs.teekey",
    "TeeKeyPair": "attest.kbs.teekey",
    "TokenTransport": "attest.kbs.client",
}

__all__ = [
    "Deadline",
    "KbsAdminClient",
    "KbsAttestation",
    "KbsClient",
    "ResourceUri",
    "RetryPolicy",
    "TeeKeyKind",
    "TeeKeyPair",
    "TokenTransport",
]


def __getattr__(name: str) -> Any:
    """Import the KBS client, the admin client, the retries and the TEE key on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
