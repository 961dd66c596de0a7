"""The exception tree of enclave-serve, rooted in the lowest layer.

Every error raised on purpose by enclave-serve derives from :class:`Error`. Third-party
exceptions are translated where they enter (``raise KeyAccessDenied(...) from exc``), so a
caller catching :class:`Error` sees everything that can go wrong, with a message that says what
failed and what to do about it. The runtime turns any :class:`Error` into one log line, a
readiness 503 with a JSON reason, and an exit code.

::

    Error
    ├── ConfigError                     bad flags or configuration (runtime/)
    ├── AttestationError                evidence (attest/)
    │   ├── BackendUnavailable          the TEE, device or library is not present
    │   ├── EvidenceCollectionError     the hardware refused or returned nonsense
    │   ├── MalformedEvidence           bytes/JSON that do not parse as the claimed format
    │   ├── VerificationError           evidence parsed but does not verify or bind
    │   │   └── PolicyViolation         evidence verified but a policy refused it
    │   └── VerificationUnavailable     the check could not be made (unreachable, unusable collateral)
    ├── KeyRetrievalError               key release (attest/kbs, attest/keysource)
    │   ├── KeyBrokerUnreachable        network fault, timeout, 5xx after retries
    │   ├── KeyBrokerProtocolError      the broker answered outside the protocol
    │   ├── KeyAccessDenied             attestation or resource policy refused (401/403)
    │   ├── ResourceNotFound            no such resource (404)
    │   ├── KeyUnwrapError              the JWE response does not decrypt with our TEE key
    │   └── KeyHandoffCompromised       something other than vLLM's workers asked for the key
    └── ModelError                      encrypted model (loader/)
        ├── ModelFormatError            manifest/header malformed, unsupported version, size mismatch
        └── ModelDecryptionError        opaque: a shard did not authenticate (never says why)

Messages never contain key material, tokens or plaintext: callers may log them.
"""

from __future__ import annotations

__all__ = [
    "AttestationError",
    "BackendUnavailable",
    "ConfigError",
    "Error",
    "EvidenceCollectionError",
    "KeyAccessDenied",
    "KeyBrokerProtocolError",
    "KeyBrokerUnreachable",
    "KeyHandoffCompromised",
    "KeyRetrievalError",
    "KeyUnwrapError",
    "MalformedEvidence",
    "ModelDecryptionError",
    "ModelError",
    "ModelFormatError",
    "PolicyViolation",
    "ResourceNotFound",
    "VerificationError",
    "VerificationUnavailable",
]


class Error(Exception):
    """Root of every enclave-serve error.

    ``str(error)`` is safe to log and show to anyone: it becomes the public readiness reason, so
    it names no host path and does not reveal whether a host file exists. ``log_detail`` (keyword
    only) carries what only the log may have: the path, the operating system's error text.
    """

    def __init__(self, *args: object, log_detail: str | None = None) -> None:
        super().__init__(*args)
        #: For the log only (host paths, OS errors); never part of ``str(error)``.
        self.log_detail = log_detail

    def diagnostics(self) -> str:
        """Return a human-readable explanation, including the chain of causes."""
        lines = [f"{type(self).__name__}: {self}"]
        cause = self.__cause__
        while cause is not None:
            if isinstance(cause, Error):
                lines.append(f"  caused by {type(cause).__name__}: {cause}")
            else:
                # Foreign exceptions may carry data we do not control: name the type only.
                lines.append(f"  caused by {type(cause).__module__}.{type(cause).__name__}")
            cause = cause.__cause__
        return "\n".join(lines)


class ConfigError(Error):
    """The configuration or command line is invalid."""


class AttestationError(Error):
    """Evidence could not be collected, parsed or verified."""


class BackendUnavailable(AttestationError):
    """The requested TEE, GPU or library is not available on this machine."""


class EvidenceCollectionError(AttestationError):
    """The hardware or kernel interface failed to produce evidence."""


class MalformedEvidence(AttestationError):
    """Evidence bytes or JSON do not parse as the claimed format."""


class VerificationError(AttestationError):
    """Evidence does not verify: signature, chain, nonce or binding mismatch."""


class PolicyViolation(VerificationError):
    """Evidence verified, but a policy (reference values, TCB, insecure TEE) refused it."""


class VerificationUnavailable(AttestationError):
    """The verification could not be carried out: the server is unreachable or answers errors,
    or the collateral is unusable. Not a verdict about the server (``verify`` exits 2)."""


class KeyRetrievalError(Error):
    """The model key could not be obtained."""


class KeyBrokerUnreachable(KeyRetrievalError):
    """The key broker could not be reached within the deadline."""


class KeyBrokerProtocolError(KeyRetrievalError):
    """The key broker answered something the protocol does not allow."""


class KeyAccessDenied(KeyRetrievalError):
    """The key broker refused to release the resource to this enclave."""


class ResourceNotFound(KeyRetrievalError):
    """The key broker has no such resource."""


class KeyUnwrapError(KeyRetrievalError):
    """The key broker's JWE response does not decrypt with this enclave's TEE key."""


class KeyHandoffCompromised(KeyRetrievalError):
    """A process without a worker's capability asked the runtime for the model key.

    Raised by the runtime, never recovered from: the boot fails and nothing is served.
    """


class ModelError(Error):
    """The encrypted model is unusable."""


class ModelFormatError(ModelError):
    """An encrypted model file is malformed, truncated or of an unsupported version."""


class ModelDecryptionError(ModelError):
    """A shard failed authentication.

    Deliberately opaque, like Fernet's ``InvalidToken``: it names the file, never which check
    failed (wrong key, tampered chunk, reordering, truncation, splicing all look the same).
    """
