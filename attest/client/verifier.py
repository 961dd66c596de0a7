"""The user's verification options, built once, and the replicas they verified.

A :class:`Verifier` holds what every check of a replica needs (the workload policy, collateral,
the clock, the insecure allowances, how many connections to try) and the outcome of each check
it made: the *verified set*, keyed by the SHA-256 of the replica's TLS public key (SPKI), and the
replicas it refused. It opens no connection: :mod:`attest.client.transport` fetches a document
over each new TLS connection and hands it to :meth:`Verifier.check`, which runs
:func:`attest.client.verdict.verify_document` (its numbered steps) with the SPKI that connection
used.

What is remembered, and what is not:

* a verified SPKI stays verified for the life of the :class:`Verifier` (an enclave's TLS key is
  born in it and dies with its process; a replica that restarts has a new key and is verified
  again);
* a replica refused by a step (:class:`ServerRefused`) stays refused, so a connection that lands
  on it again is dropped without asking it for another quote; a replica that could not be asked
  (:class:`VerificationUnavailable`) is not remembered.

Warning:
    The verified set is per :class:`Verifier`. Options are fixed at construction; to verify
    against another policy, build another :class:`Verifier`.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from os import PathLike
from pathlib import Path

from attest.client.remote import VerificationBundle, VerifiedServer, verify_bundle
from attest.client.verdict import ServerRefused, Verdict
from attest.client.wording import for_python
from attest.document import NONCE_SIZE
from attest.evidence import TeeKind
from attest.verify.workload import WorkloadPolicy
from foundation.errors import AttestationError, ConfigError, PolicyViolation

__all__ = ["DEFAULT_MAX_ATTEMPTS", "NoVerifiedReplica", "Replica", "Verifier"]

logger = logging.getLogger(__name__)

#: Connections tried for one new connection before giving up (the first and three more).
DEFAULT_MAX_ATTEMPTS = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class Replica:
    """One peer a connection reached: its TLS key and what its check said.

    ``server`` is set when it verified; ``error`` when it did not (a :class:`ServerRefused` holds
    the verdict, a :class:`VerificationUnavailable` says why it could not be asked).
    """

    address: str
    spki_sha256: str | None
    server: VerifiedServer | None = None
    error: AttestationError | None = None

    @property
    def ok(self) -> bool:
        """True when this replica verified."""
        return self.server is not None

    @property
    def verdict(self) -> Verdict | None:
        """The verdict, verified or refused; None when the replica could not be asked."""
        if self.server is not None:
            return self.server.verdict
        return self.error.verdict if isinstance(self.error, ServerRefused) else None

    def describe(self) -> str:
        """``<spki> <outcome>``, one line."""
        key = self.spki_sha256 or "(no TLS key)"
        return f"{key} {'verified' if self.ok else f'NOT VERIFIED: {self.error}'}"


class NoVerifiedReplica(ServerRefused):
    """Every connection tried reached a replica that did not verify.

    ``verdict`` is the first refusal's; ``replicas`` holds every connection tried, in order.
    """

    def __init__(self, address: str, replicas: tuple[Replica, ...]) -> None:
        refused = [r for r in replicas if isinstance(r.error, ServerRefused)]
        assert refused, "NoVerifiedReplica needs at least one refusal"
        first = refused[0].error
        assert isinstance(first, ServerRefused)
        super().__init__(first.verdict)
        self.replicas = replicas
        reasons = "; ".join(
            dict.fromkeys(f"{(r.spki_sha256 or '?')[:16]}…: {_cli_text(r.error)}" for r in replicas)
        )
        self.cli_message = (
            f"no replica behind {address} verified in {len(replicas)} connection(s): {reasons}. "
            "Check the policy (enclave-serve verify URL --replicas N shows each replica)"
        )
        self.args = (for_python(self.cli_message),)


def _cli_text(error: object) -> str:
    """An error's text in the CLI's words (a :class:`ServerRefused` keeps them apart)."""
    return error.cli_message if isinstance(error, ServerRefused) else str(error)


def _policy(policy: WorkloadPolicy | str | PathLike[str] | None) -> WorkloadPolicy | None:
    if policy is None or isinstance(policy, WorkloadPolicy):
        return policy
    return WorkloadPolicy.load(Path(policy))


class Verifier:
    """Verify replicas against one policy and keep the verified set (SPKI sha256 → server).

    ``policy`` is required (a :class:`WorkloadPolicy` or a policy file's path): without one every
    replica is refused unless ``allow_unpinned_software`` is given, for inspection only.
    ``clock`` gives the verification time (default: now); ``token_bytes`` the nonces.

    Warning:
        ``allow_insecure`` accepts the sample TEE, whose evidence proves nothing (development
        only; the policy must say ``insecure_development = true`` too).

    Raises:
        PolicyFileError: ``policy`` names a file that is not a valid policy.
        ConfigError: ``max_attempts`` is below 1.
    """

    def __init__(
        self,
        *,
        policy: WorkloadPolicy | str | PathLike[str] | None,
        allow_unpinned_software: bool = False,
        allow_insecure: bool = False,
        expected_model_digest: str | None = None,
        expected_config_sha256: str | None = None,
        collateral: Mapping[TeeKind, object] | None = None,
        clock: Callable[[], datetime] | None = None,
        token_bytes: Callable[[int], bytes] = secrets.token_bytes,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        timeout_s: float = 60.0,
    ) -> None:
        if max_attempts < 1:
            raise ConfigError("max_attempts must be at least 1")
        self.policy = _policy(policy)
        self.allow_unpinned_software = allow_unpinned_software
        self.allow_insecure = allow_insecure
        self.expected_model_digest = expected_model_digest
        self.expected_config_sha256 = expected_config_sha256
        self.collateral = dict(collateral or {})
        self.max_attempts = max_attempts
        self.timeout_s = timeout_s
        self._clock = clock
        self._token_bytes = token_bytes
        self._lock = threading.Lock()
        self._verified: dict[str, VerifiedServer] = {}
        self._refused: dict[str, ServerRefused] = {}

    def nonce(self) -> bytes:
        """A fresh nonce for one document request."""
        return self._token_bytes(NONCE_SIZE)

    @property
    def verified(self) -> dict[str, VerifiedServer]:
        """The verified set (a copy): SPKI sha256 → the verified replica, in verification order."""
        with self._lock:
            return dict(self._verified)

    @property
    def refused(self) -> dict[str, ServerRefused]:
        """The replicas refused by a step (a copy): SPKI sha256 → the refusal."""
        with self._lock:
            return dict(self._refused)

    def known(self, spki_sha256: str) -> VerifiedServer | ServerRefused | None:
        """What an earlier check of this TLS key said, or None if it was never checked."""
        with self._lock:
            return self._verified.get(spki_sha256) or self._refused.get(spki_sha256)

    def check(self, bundle: VerificationBundle) -> VerifiedServer:
        """Verify a bundle fetched over one connection (its SPKI is that connection's) and remember it.

        Raises:
            ServerRefused: a step failed (remembered: that key is refused from now on).
            PolicyViolation: the bundle records no TLS key.
        """
        if bundle.tls_spki_sha256 is None:
            raise PolicyViolation("a replica is verified per TLS connection; this bundle records no TLS key")
        try:
            server = verify_bundle(
                bundle,
                policy=self.policy,
                allow_unpinned_software=self.allow_unpinned_software,
                allow_insecure=self.allow_insecure,
                expected_model_digest=self.expected_model_digest,
                expected_config_sha256=self.expected_config_sha256,
                collateral=self.collateral,
                now=None if self._clock is None else self._clock(),
            )
        except ServerRefused as exc:
            logger.warning(
                "refused the replica with TLS key %s at %s: %s", bundle.tls_spki_sha256, bundle.url, exc
            )
            with self._lock:
                self._refused[bundle.tls_spki_sha256] = exc
            raise
        logger.info("verified the replica with TLS key %s at %s", bundle.tls_spki_sha256, bundle.url)
        with self._lock:
            self._verified.setdefault(bundle.tls_spki_sha256, server)
        return server
