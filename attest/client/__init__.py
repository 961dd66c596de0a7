"""The user's side: verify an enclave-serve server before sending it anything, then talk to it.

* :mod:`attest.client.remote`: :func:`verify_server` fetches a fresh attestation document and
  the run configuration and verifies them against a policy.
* :mod:`attest.client.sdk`: :func:`attested_openai`, an OpenAI SDK client that refuses
  unattested servers and pins the attested TLS key.

Nothing here imports the key broker (client or development server): the contract in
``pyproject.toml`` keeps it so.
"""

from __future__ import annotations

from attest.client.remote import ATTESTATION_PATH, CONFIG_PATH, VerifiedServer, verify_server
from attest.client.sdk import attested_openai, pinned_ssl_context

__all__ = [
    "ATTESTATION_PATH",
    "CONFIG_PATH",
    "VerifiedServer",
    "attested_openai",
    "pinned_ssl_context",
    "verify_server",
]
