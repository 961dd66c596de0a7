"""Key source over the CoCo Confidential Data Hub inside a CoCo pod.

In a CoCo (Kata) pod, guest-components already attest on the pod's behalf: ``api-server-rest``
on ``http://127.0.0.1:8006`` answers ``GET /cdh/resource/<repo>/<type>/<tag>`` with the
plaintext resource, which the CDH fetched from its configured KBS after an RCAR handshake
(``guest-components:api-server-rest``). There is no crypto on this side, and no receipt: the
enclave never sees the token.

Verified: nothing cryptographic (the CDH did the attestation). Because the answer is
plaintext over HTTP, the URL must be a loopback address.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from typing import ClassVar
from urllib.parse import urlsplit

import httpx

from attest.kbs.http import normalize_base_url
from attest.kbs.retry import Deadline, RetryPolicy, TransientFault, call_with_retries
from attest.keysource.base import KeyRelease, KeySource, KeySourceName
from foundation.errors import (
    ConfigError,
    KeyAccessDenied,
    KeyBrokerProtocolError,
    KeyRetrievalError,
    ResourceNotFound,
)
from foundation.resource import RESOURCE_PLUGIN, ResourceUri
from foundation.secret import SecretBytes

__all__ = ["DEFAULT_CDH_URL", "CdhKeySource"]

#: ``api-server-rest`` default listen address in CoCo guests.
DEFAULT_CDH_URL = "http://127.0.0.1:8006"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class CdhKeySource(KeySource):
    """Fetch resources through the CDH's REST endpoint (``/cdh/resource/...``)."""

    name: ClassVar[KeySourceName] = "cdh"

    def __init__(
        self,
        *,
        url: str = DEFAULT_CDH_URL,
        http_client: httpx.Client | None = None,
        deadline_s: float = 60.0,
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = normalize_base_url(url, what="CDH")
        host = urlsplit(self.url).hostname or ""
        if urlsplit(self.url).scheme == "http" and not _is_loopback(host):
            raise ConfigError(
                f"the CDH answers in plaintext; {url} is not a loopback address (use the pod-local "
                f"{DEFAULT_CDH_URL})"
            )
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client(trust_env=False)
        self._deadline_s = deadline_s
        self._retry = retry or RetryPolicy()
        self._clock = clock
        self._sleep = sleep

    def fetch(self, resource: ResourceUri) -> KeyRelease:
        """Ask the CDH for ``resource``.

        Raises:
            KeyBrokerUnreachable: the CDH did not answer within the deadline.
            KeyAccessDenied: the endpoint is forbidden in this pod.
            ResourceNotFound: 404 from the endpoint.
            KeyRetrievalError: the CDH failed to get the resource from its KBS.
        """
        if resource.plugin != RESOURCE_PLUGIN:
            raise ConfigError(f"the CDH serves only kbs:/// resources, not {resource}")
        url = f"{self.url}/cdh/resource/{resource.path}"
        where = f"the CDH at {self.url}"

        def attempt(timeout: float) -> SecretBytes:
            response = self._http.get(url, timeout=timeout)
            status = response.status_code
            if status == 200:
                if not response.content:
                    raise KeyBrokerProtocolError(f"{where} returned an empty body for {resource}")
                return SecretBytes(response.content)
            if status in (429, 502, 503, 504):
                raise TransientFault(f"HTTP {status}")
            reason = " ".join(response.text.split())[:300]
            if status == 403:
                raise KeyAccessDenied(
                    f"{where} refused /cdh/resource for {resource} (HTTP 403: {reason}); the pod's "
                    "Kata agent policy or api-server-rest configuration does not allow it"
                )
            if status == 404:
                raise ResourceNotFound(
                    f"{where} answered 404 for {resource} ({reason}); check the resource exists on the "
                    "KBS and that api-server-rest serves /cdh/resource"
                )
            raise KeyRetrievalError(
                f"{where} could not get {resource} (HTTP {status}: {reason}); see the CDH / "
                "attestation-agent logs of the pod and the KBS resource policy"
            )

        secret = call_with_retries(
            attempt,
            what=f"fetching {resource} from {where}",
            deadline=Deadline(self._deadline_s, clock=self._clock),
            policy=self._retry,
            sleep=self._sleep,
        )
        return KeyRelease(secret=secret, resource=resource, source="cdh", receipt=None)

    def close(self) -> None:
        """Close the HTTP client if this source created it."""
        if self._owns_http:
            self._http.close()
