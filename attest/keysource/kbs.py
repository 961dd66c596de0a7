"""Key source over a Trustee KBS: attest once with the enclave's TEE, fetch resources."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import httpx

from attest.kbs.client import KbsClient, TokenTransport
from attest.kbs.retry import RetryPolicy
from attest.kbs.teekey import TeeKeyKind
from attest.kbs.wire import PROTOCOL_VERSION
from attest.keysource.base import KeyRelease, KeyReleaseReceipt, KeySource, KeySourceName
from attest.tee.attester import Attester, DeviceAttester
from foundation.resource import ResourceUri

__all__ = ["KbsKeySource"]


class KbsKeySource(KeySource):
    """Fetch keys from a Trustee KBS with the RCAR protocol (:class:`attest.kbs.KbsClient`).

    Construction does no I/O (it only generates the ephemeral TEE key). The first
    :meth:`fetch` attests; later fetches reuse the token and re-attest only if the KBS stops
    accepting it. Each fetch has its own ``deadline_s``.
    """

    name: ClassVar[KeySourceName] = "kbs"

    def __init__(
        self,
        *,
        url: str,
        attester: Attester,
        devices: Sequence[DeviceAttester] = (),
        cacert: Path | None = None,
        tee_key: TeeKeyKind = "ec",
        deadline_s: float = 60.0,
        http_client: httpx.Client | None = None,
        token_transport: TokenTransport = "cookie",
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        init_data: bytes | None = None,
    ) -> None:
        self._client = KbsClient(
            init_data=init_data,
            url=url,
            attester=attester,
            devices=devices,
            cacert=cacert,
            tee_key=tee_key,
            token_transport=token_transport,
            deadline_s=deadline_s,
            retry=retry,
            http_client=http_client,
            clock=clock,
            sleep=sleep,
        )

    @property
    def client(self) -> KbsClient:
        """Return the underlying KBS client."""
        return self._client

    def fetch(self, resource: ResourceUri) -> KeyRelease:
        """Attest if needed, then fetch and decrypt ``resource``.

        Raises:
            foundation.errors.KeyRetrievalError: see :meth:`attest.kbs.KbsClient.get_resource`.
            foundation.errors.AttestationError: the local TEE failed to produce evidence.
        """
        secret = self._client.get_resource(resource, deadline=self._client.deadline())
        attestation = self._client.attestation
        assert attestation is not None  # get_resource attested
        claims = attestation.claims
        receipt = KeyReleaseReceipt(
            kbs_url=attestation.kbs_url,
            resource=str(resource),
            protocol_version=PROTOCOL_VERSION,
            tee=attestation.tee,
            devices=attestation.devices,
            hash_algorithm=attestation.hash_algorithm.value,
            token_sha256=attestation.token_sha256,
            tee_pubkey_thumbprint=attestation.tee_pubkey_thumbprint,
            token_issuer=claims.iss if claims else None,
            token_issued_at=claims.iat if claims else None,
            token_expires_at=claims.exp if claims else None,
            ear_status=tuple(claims.statuses().items()) if claims else (),
        )
        return KeyRelease(secret=secret, resource=resource, source="kbs", receipt=receipt)

    def close(self) -> None:
        """Forget the token and close the HTTP client (if this source created it)."""
        self._client.close()
