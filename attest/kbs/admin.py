"""The KBS admin API, as Trustee's ``kbs-client`` calls it (``tools/kbs-client/src/lib.rs``).

* ``POST /kbs/v0/resource/<repo>/<type>/<tag>``: raw bytes (``application/octet-stream``).
* ``POST /kbs/v0/resource-policy``: ``{"policy": base64url-nopad(policy text)}``.

Both carry ``Authorization: Bearer <admin token>``. Against a real Trustee the token is the
admin JWT its ``[admin]`` section trusts (and the policy is rego); against kbs-dev it is the
random token from ``--admin-token-file`` (and the policy is kbs-dev's JSON, docs/kbs.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import httpx

from attest.kbs.http import error_information, make_http_client, normalize_base_url
from attest.kbs.retry import Deadline, RetryPolicy, TransientFault, call_with_retries
from attest.kbs.wire import KBS_PREFIX, RESOURCE_POLICY_PATH, ResourcePolicyUpload
from foundation.errors import KeyAccessDenied, KeyBrokerProtocolError
from foundation.resource import validate_resource_path
from foundation.secret import SecretBytes

__all__ = ["KbsAdminClient"]

logger = logging.getLogger(__name__)


class KbsAdminClient:
    """Upload resources and the resource policy to a KBS with an admin bearer token.

    Verified: the TLS certificate against ``cacert`` when given. Not verified: that the KBS
    stored what it was sent (the API does not echo it back).
    """

    def __init__(
        self,
        *,
        url: str,
        admin_token: SecretBytes,
        cacert: Path | None = None,
        deadline_s: float = 30.0,
        retry: RetryPolicy | None = None,
        http_client: httpx.Client | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = normalize_base_url(url, what="KBS")
        if http_client is not None and cacert is not None:
            raise ValueError("pass cacert or http_client, not both")
        self._token = admin_token
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else make_http_client(cacert=cacert)
        self._deadline_s = deadline_s
        self._retry = retry or RetryPolicy()
        self._clock = clock
        self._sleep = sleep

    def close(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> KbsAdminClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def set_resource(self, path: str, data: bytes) -> None:
        """Store ``data`` as resource ``repository/type/tag``.

        Raises:
            ValueError: ``path`` is not a valid resource path.
            KeyAccessDenied: the admin token was refused.
            KeyBrokerUnreachable / KeyBrokerProtocolError: transport or protocol failure.
        """
        validate_resource_path(path)
        self._post(
            f"{KBS_PREFIX}/resource/{path}", data, "application/octet-stream", what=f"set-resource {path}"
        )
        logger.info("uploaded resource %s (%d bytes) to %s", path, len(data), self.url)

    def set_resource_policy(self, policy_text: bytes) -> None:
        """Replace the KBS resource policy with ``policy_text`` (rego for Trustee, JSON for kbs-dev).

        Raises:
            KeyAccessDenied: the admin token was refused.
            KeyBrokerUnreachable / KeyBrokerProtocolError: transport or protocol failure, or the
                KBS could not parse the policy.
        """
        body = ResourcePolicyUpload.of(policy_text).to_bytes()
        self._post(RESOURCE_POLICY_PATH, body, "application/json", what="set-resource-policy")
        logger.info("set the resource policy on %s", self.url)

    def _post(self, path: str, body: bytes, content_type: str, *, what: str) -> None:
        deadline = Deadline(self._deadline_s, clock=self._clock)

        def attempt(timeout: float) -> None:
            response = self._http.post(
                self.url + path,
                content=body,
                headers={
                    "content-type": content_type,
                    "authorization": f"Bearer {self._token.reveal().decode()}",
                },
                timeout=timeout,
            )
            if response.status_code == 200:
                return
            if response.status_code >= 500 or response.status_code == 429:
                raise TransientFault(f"HTTP {response.status_code}")
            info = error_information(response)
            detail = info.detail if info else f"HTTP {response.status_code}"
            if info is not None and info.short_type in ("AdminAuthAccess", "AdminAuthInitialization"):
                raise KeyAccessDenied(f"{what}: the KBS at {self.url} refused the admin token: {detail}")
            raise KeyBrokerProtocolError(f"{what}: the KBS at {self.url} refused the request: {detail}")

        call_with_retries(
            attempt, what=f"{what} on {self.url}", deadline=deadline, policy=self._retry, sleep=self._sleep
        )
