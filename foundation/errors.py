"""The exception tree of enclave-serve, rooted in the lowest layer.

Every error raised on purpose by enclave-serve derives from :class:`Error`. Third-party
exceptions are translated where they enter (``raise KeyAccessDenied(...) from exc``), so a
caller catching :class:`Error` sees everything that can go wrong, with a message that says what
failed and what to do about it. The runtime turns any :class:`Error` into one log line, a
readiness 503 with a JSON reason, and an exit code.

::

    Error
    ├── ConfigError                     bad flags or configuration (runtime/)
    │   ├── PolicyFileError             a workload policy that is not valid (attest.verify.workload)
    │   ├── ExportRefused               a rule Trustee cannot enforce (attest.verify.trustee)
    │   └── NoInitData                  recording a policy from a server without init-data
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
    │   │   └── WireFormatError         a KBS message of the wrong shape (attest.kbs.wire)
    │   ├── KeyAccessDenied             attestation or resource policy refused (401/403)
    │   │   └── TokenRejected           kbs-dev: a token it did not issue, or expired
    │   ├── ResourceNotFound            no such resource (404)
    │   ├── KeyUnwrapError              the JWE response does not decrypt with our TEE key
    │   └── KeyHandoffCompromised       something other than vLLM's workers asked for the key
    └── ModelError                      encrypted model (loader/)
        ├── ModelFormatError            manifest/header malformed, unsupported version, size mismatch
        └── ModelDecryptionError        opaque: a shard did not authenticate (never says why)

Defined where they are raised, beside the tree: ``server.engine.EngineStartFailed`` (an
:class:`Error`: vLLM's engine did not start). The exceptions that stay outside are signals
between two functions of one component, translated before a user sees them
(``tests/test_exports.py`` lists them).

Messages never contain key material, tokens or plaintext: callers may log them.

:func:`connection_failure` turns a failed connection (httpx's, or a socket's) into one line that
names the address and what answered there: every client that opens connections (the KBS, the
CDH, ``verify``) words it the same way.
"""

from __future__ import annotations

import errno
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = [
    "AttestationError",
    "BackendUnavailable",
    "ConfigError",
    "ConnectionFailure",
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
    "connection_failure",
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


#: OpenSSL's reasons when a TLS handshake gets a plain-HTTP answer (1.1/3.0, and 3.2 onwards).
_PLAIN_HTTP_REASONS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "HTTP_REQUEST"})
_TIMEOUT_WORDS = {
    "ConnectTimeout": "did not accept the connection in time",
    "ReadTimeout": "accepted the connection but did not answer in time",
    "WriteTimeout": "did not take the request in time",
    "PoolTimeout": "had no free connection in time",
}


@dataclass(frozen=True, slots=True)
class ConnectionFailure:
    """One line on a failed connection; ``final`` when retrying cannot help (a misconfiguration)."""

    text: str
    final: bool = False


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def connection_failure(exc: BaseException, *, url: str) -> ConnectionFailure:
    """Describe why a connection to ``url`` failed: the address (scheme, host, port) and what answered.

    Recognised, anywhere in ``exc``'s chain: a TLS handshake answered in plain HTTP (``final``: use
    ``http://``, or the HTTPS port), a refused connection, a name that does not resolve, a timeout,
    a certificate that does not verify, another TLS failure, and a plain request that a TLS port
    dropped. Pure: reads only the exceptions' types and the OS's and OpenSSL's error names (never a
    body, a header or a token), so the text is safe to log and to show.
    """
    parts = urlsplit(url)
    scheme = parts.scheme or "?"
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        port = 0
    host = parts.hostname or "?"
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    address = f"{scheme}://{where}"
    chain = _chain(exc)
    for cause in chain:
        if isinstance(cause, ssl.SSLError) and cause.reason in _PLAIN_HTTP_REASONS:
            return ConnectionFailure(
                f"the server at {where} answered plain HTTP to a TLS handshake: use http://{where} if "
                "that is the service (development only: the traffic is in clear), or the port where it "
                "serves HTTPS",
                final=True,
            )
    names = [type(cause).__name__ for cause in chain]
    for name in names:
        if name in _TIMEOUT_WORDS or name.endswith("Timeout"):
            return ConnectionFailure(
                f"{address} {_TIMEOUT_WORDS.get(name, 'did not answer in time')} (timed out: {name})"
            )
    for cause in chain:
        if isinstance(cause, ConnectionRefusedError) or getattr(cause, "errno", None) == errno.ECONNREFUSED:
            return ConnectionFailure(
                f"connection refused by {address}: nothing listens there (is the service running, and "
                "is the port right?)"
            )
        if isinstance(cause, socket.gaierror):
            return ConnectionFailure(
                f"cannot resolve the host of {address} ({cause.strerror or 'unknown name'}): check the name"
            )
        if isinstance(cause, ssl.SSLCertVerificationError):
            return ConnectionFailure(
                f"TLS certificate verification failed at {address} ({cause.verify_message})"
            )
        if isinstance(cause, ssl.SSLError):
            return ConnectionFailure(
                f"TLS handshake with {address} failed ({cause.reason or type(cause).__name__})"
            )
        if isinstance(cause, TimeoutError):
            return ConnectionFailure(f"{address} did not answer in time (timed out)")
        if isinstance(cause, OSError) and cause.strerror:
            return ConnectionFailure(f"cannot connect to {address} ({cause.strerror})")
    if "RemoteProtocolError" in names:
        if scheme == "http":
            return ConnectionFailure(
                f"{address} closed the connection without an HTTP answer (a TLS port? then use https://{where})"
            )
        return ConnectionFailure(f"{address} closed the connection without a complete HTTP answer")
    return ConnectionFailure(f"cannot talk to {address} ({names[0]})")
