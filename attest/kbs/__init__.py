"""Trustee Key Broker Service: the RCAR 0.4.0 client, its wire models, and a development KBS.

Modules, each owning one thing:

* :mod:`attest.kbs.wire`: the messages, field for field as ``kbs-types`` (shared by both sides).
* :mod:`attest.kbs.uri`: ``kbs:///repo/type/tag`` resource URIs.
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

from attest.kbs.admin import KbsAdminClient
from attest.kbs.client import KbsAttestation, KbsClient, TokenTransport
from attest.kbs.retry import Deadline, RetryPolicy
from attest.kbs.teekey import TeeKeyKind, TeeKeyPair
from attest.kbs.uri import ResourceUri

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
