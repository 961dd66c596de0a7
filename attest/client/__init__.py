"""The user's side: verify an enclave-serve server before sending it anything, then talk to it.

* :mod:`attest.client.verdict`: :func:`verify_document`, every check as a pure function
  (works offline on a saved bundle).
* :mod:`attest.client.remote`: :func:`verify_server` fetches a fresh attestation document and
  the run configuration and verifies them against a policy.
* :mod:`attest.client.sdk`: :func:`attested_openai`, an OpenAI SDK client that refuses
  unattested servers and pins the attested TLS key.
* :mod:`attest.client.aci`: :func:`verify_aci_report`, the same checks for the draft ACI
  ``aci/1`` report (keyset, statement, bound insecure modes and device evidence).

Nothing here imports the key broker (client or development server): the contract in
``pyproject.toml`` keeps it so.
"""

from __future__ import annotations

from attest.client.aci import AciVerdict, verify_aci_report
from attest.client.remote import (
    ATTESTATION_PATH,
    CONFIG_PATH,
    VerificationBundle,
    VerifiedServer,
    fetch_bundle,
    verify_bundle,
    verify_server,
)
from attest.client.sdk import attested_async_openai, attested_openai, pinned_ssl_context
from attest.client.verdict import ServerRefused, Verdict, verify_document

__all__ = [
    "ATTESTATION_PATH",
    "CONFIG_PATH",
    "AciVerdict",
    "ServerRefused",
    "Verdict",
    "VerificationBundle",
    "VerifiedServer",
    "attested_async_openai",
    "attested_openai",
    "fetch_bundle",
    "pinned_ssl_context",
    "verify_aci_report",
    "verify_bundle",
    "verify_document",
    "verify_server",
]
