"""The user's side: verify an enclave-serve deployment before sending it anything, then talk to it.

* :mod:`attest.client.verdict`: :func:`verify_document`, every check as a pure function
  (works offline on a saved bundle).
* :mod:`attest.client.remote`: :func:`verify_server` fetches a fresh attestation document and
  the run configuration and verifies them against a policy.
* :mod:`attest.client.verifier`: :class:`Verifier`, the options built once and the verified set
  of replicas (SPKI sha256 → verified server).
* :mod:`attest.client.transport`: :class:`VerifyingTransport` / :class:`AsyncVerifyingTransport`,
  httpx transports that verify every new TLS connection over itself before any request.
* :mod:`attest.client.sdk`: :func:`attested_openai`, an OpenAI SDK client over that transport
  (imported on first use: the OpenAI SDK is slow to import).
* :mod:`attest.client.proxy`: :func:`proxy_app`, a local plain-HTTP OpenAI endpoint that forwards
  only over verified connections (``enclave-serve proxy``).
* :mod:`attest.client.aci`: :func:`verify_aci_report`, the same checks for the draft ACI
  ``aci/1`` report (keyset, statement, bound insecure modes and device evidence).

Exceptions a client sees, all exported here (all :class:`Error`)::

    Error
    ├── ConfigError                    an unusable policy or collateral file, a bad option
    └── AttestationError
        ├── MalformedEvidence          the server's document is not JSON / not the format
        ├── VerificationError
        │   └── PolicyViolation        e.g. a plain-HTTP URL given to the verifying transport
        │       └── ServerRefused      a replica did not verify (``exc.verdict``: every step)
        │           ├── NoVerifiedReplica  every connection tried reached a refused replica
        │           └── NotAnEnclave   the server answered, but has no attestation (plain vLLM)
        └── VerificationUnavailable    no replica could be asked (unreachable, HTTP error)

A refusal's ``str()`` names the Python arguments (``allow_insecure=True``); its ``cli_message``
names the command line's flags (:mod:`attest.client.wording`).

Client-only install: nothing here imports ``server``, ``loader`` or ``runtime`` (the layers
contract in ``pyproject.toml``) nor vLLM or torch (a forbidden contract); the packages it needs are
the ``client`` extra. Nothing here imports the key broker either (a contract keeps it so).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from attest.client.aci import AciVerdict, verify_aci_report
from attest.client.remote import (
    ATTESTATION_PATH,
    CONFIG_PATH,
    NotAnEnclave,
    VerificationBundle,
    VerifiedServer,
    fetch_bundle,
    server_base_url,
    verify_bundle,
    verify_server,
)
from attest.client.transport import (
    AsyncVerifyingTransport,
    VerifyingTransport,
    probe,
    replica_of,
    verified_async_client,
    verified_client,
    verify_first,
)
from attest.client.verdict import ServerRefused, Verdict, verify_document
from attest.client.verifier import NoVerifiedReplica, Replica, Verifier
from foundation.errors import (
    AttestationError,
    ConfigError,
    Error,
    MalformedEvidence,
    PolicyViolation,
    VerificationError,
    VerificationUnavailable,
)

if TYPE_CHECKING:
    from attest.client.proxy import proxy_app
    from attest.client.sdk import (
        AttestedAsyncOpenAI,
        AttestedOpenAI,
        attested_async_openai,
        attested_openai,
        pinned_ssl_context,
    )

_LAZY = {
    "AttestedAsyncOpenAI": "attest.client.sdk",
    "AttestedOpenAI": "attest.client.sdk",
    "attested_async_openai": "attest.client.sdk",
    "attested_openai": "attest.client.sdk",
    "pinned_ssl_context": "attest.client.sdk",
    "proxy_app": "attest.client.proxy",
}

__all__ = [
    "ATTESTATION_PATH",
    "CONFIG_PATH",
    "AciVerdict",
    "AsyncVerifyingTransport",
    "AttestationError",
    "AttestedAsyncOpenAI",
    "AttestedOpenAI",
    "ConfigError",
    "Error",
    "MalformedEvidence",
    "NoVerifiedReplica",
    "NotAnEnclave",
    "PolicyViolation",
    "Replica",
    "ServerRefused",
    "Verdict",
    "VerificationBundle",
    "VerificationError",
    "VerificationUnavailable",
    "VerifiedServer",
    "Verifier",
    "VerifyingTransport",
    "attested_async_openai",
    "attested_openai",
    "fetch_bundle",
    "pinned_ssl_context",
    "probe",
    "proxy_app",
    "replica_of",
    "server_base_url",
    "verified_async_client",
    "verified_client",
    "verify_aci_report",
    "verify_bundle",
    "verify_document",
    "verify_first",
    "verify_server",
]


def __getattr__(name: str) -> Any:
    """Import the OpenAI SDK client and the proxy on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
