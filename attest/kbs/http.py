"""HTTP plumbing shared by the KBS client, the admin client and the CDH key source.

One place decides how connections are made: TLS trusts *only* the pinned CA when one is given,
proxies and other environment settings are ignored (``trust_env=False``), redirects are not
followed (a key broker that redirects is misconfigured or hostile).
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from attest.errors import ConfigError
from attest.kbs.wire import ErrorInformation, WireFormatError

__all__ = ["error_information", "make_http_client", "normalize_base_url"]

logger = logging.getLogger(__name__)


def normalize_base_url(url: str, *, what: str) -> str:
    """Return ``url`` without a trailing slash after checking it is ``http(s)://host[:port]``.

    Raises:
        ConfigError: not an absolute http(s) URL, or it carries a query or fragment.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(f"{what} URL {url!r} must look like https://host:port")
    return url.rstrip("/")


def make_http_client(*, cacert: Path | None) -> httpx.Client:
    """Return an :class:`httpx.Client` that trusts only ``cacert`` (or the system CAs if None).

    Raises:
        ConfigError: ``cacert`` cannot be read as a PEM CA bundle.
    """
    verify: ssl.SSLContext | bool = True
    if cacert is not None:
        try:
            verify = ssl.create_default_context(cafile=str(cacert))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the CA certificate {cacert}: {exc}") from exc
    return httpx.Client(verify=verify, trust_env=False, follow_redirects=False)


def error_information(response: httpx.Response) -> ErrorInformation | None:
    """Return the RFC 7807 body of an error response, or None if it has none."""
    try:
        return ErrorInformation.from_json(response.content)
    except WireFormatError:
        return None
