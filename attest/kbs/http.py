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

from attest.kbs.wire import ErrorInformation, WireFormatError
from foundation.errors import ConfigError, connection_failure

__all__ = [
    "PlainHttpAnswer",
    "check_base_url",
    "describe_transport_error",
    "error_information",
    "make_http_client",
    "normalize_base_url",
]

logger = logging.getLogger(__name__)


def check_base_url(url: str, *, what: str, setting: str | None = None) -> str:
    """Return why ``url`` is not an ``http(s)://host[:port]`` base URL, or "" when it is one.

    ``what`` names the service ("KBS") and ``setting`` where the URL came from (``--kbs-url``),
    so that the message says what to change. Pure: used where settings are resolved (before any
    I/O) and again by the clients.
    """
    named = f"{what} URL {url!r}" + (f" ({setting})" if setting else "")
    parts = urlsplit(url)
    if "://" not in url:
        return (
            f"{named} has no scheme: give http://{url} (development only, the token travels in clear) "
            f"or https://{url}"
        )
    if parts.scheme not in ("http", "https"):
        return f"{named} has the scheme {parts.scheme}://; only http:// and https:// are supported"
    try:
        port = parts.port
    except ValueError:
        return f"{named} has an invalid port: give https://host:port with a port from 1 to 65535"
    if not parts.hostname:
        return f"{named} names no host: give it as https://host:port"
    if port == 0:
        return f"{named} has port 0: give the port the service listens on"
    if parts.query or parts.fragment:
        return f"{named} carries a query or fragment: give only https://host:port"
    return ""


def normalize_base_url(url: str, *, what: str, setting: str | None = None) -> str:
    """Return ``url`` without a trailing slash after checking it is ``http(s)://host[:port]``.

    Raises:
        ConfigError: not an absolute http(s) URL, or it carries a query or fragment; the message
            names ``what`` and ``setting`` and says what to give instead.
    """
    problem = check_base_url(url, what=what, setting=setting)
    if problem:
        raise ConfigError(problem)
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


class PlainHttpAnswer(Exception):
    """A TLS handshake reached a server that answered plain HTTP (``str()`` says what to use)."""


def describe_transport_error(exc: httpx.TransportError) -> str:
    """Return one line naming the address (scheme, host, port) and what happened there.

    See :func:`foundation.errors.connection_failure` for what is recognised.

    Raises:
        PlainHttpAnswer: the request was ``https://`` and the server answered plain HTTP: a
            misconfiguration that retrying cannot fix (the message says which URL to use).
    """
    try:
        url = str(exc.request.url)
    except RuntimeError:  # raised without a request: no address to name
        url = ""
    failure = connection_failure(exc, url=url)
    if failure.final:
        raise PlainHttpAnswer(failure.text)
    return failure.text
