"""``enclave-serve proxy URL --policy FILE --listen 127.0.0.1:PORT``: a local verifying OpenAI endpoint.

Serves the OpenAI API over plain HTTP on loopback and forwards every request only over TLS
connections whose replica verified against the policy (:mod:`attest.client.proxy`), streaming
included, so curl or any OpenAI SDK can use a verified enclave::

    enclave-serve proxy https://model.example --policy policy.toml --listen 127.0.0.1:8080
    curl http://127.0.0.1:8080/v1/chat/completions -H 'content-type: application/json' -d '{...}'
    curl http://127.0.0.1:8080/.well-known/enclave-serve/verified

One replica is verified before the proxy listens (exit 1 if it is refused, 2 if none could be
asked). A non-loopback ``--listen`` is refused unless ``--allow-non-loopback-listen`` is given:
the proxy's listener has no TLS and no authentication.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys

from runtime.commands.verify import (
    EXIT_NOT_VERIFIED,
    EXIT_UNAVAILABLE,
    add_verifier_arguments,
    verifier_from_args,
)

__all__ = ["DEFAULT_LISTEN", "add_parser", "parse_listen", "run"]

DEFAULT_LISTEN = "127.0.0.1:8080"


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "proxy",
        help="serve the OpenAI API on loopback, forwarding only over verified connections",
        description="Verify each replica of the server at URL over its own TLS connection before "
        "forwarding anything to it, and serve the OpenAI API over plain HTTP on loopback "
        "(GET /.well-known/enclave-serve/verified lists the verified replicas).",
    )
    p.add_argument("url", help="server base URL, e.g. https://model.example:8443")
    add_verifier_arguments(p)
    p.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"where to serve plain HTTP (default {DEFAULT_LISTEN}; loopback only)",
    )
    p.add_argument(
        "--allow-non-loopback-listen",
        action="store_true",
        help="INSECURE: listen beyond this machine (no TLS, no authentication: anyone who reaches it "
        "uses the enclave through your verification)",
    )
    p.set_defaults(func=run)


def parse_listen(value: str, *, allow_non_loopback: bool) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) to (host, port); loopback only unless allowed.

    Raises:
        ConfigError: malformed, or not loopback without ``allow_non_loopback``.
    """
    from foundation.errors import ConfigError

    host, sep, port_text = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"--listen must be HOST:PORT (e.g. {DEFAULT_LISTEN}), not {value!r}")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_non_loopback:
        raise ConfigError(
            f"--listen {value} is not a loopback address: the proxy serves plain HTTP with no "
            "authentication; use 127.0.0.1 (or give --allow-non-loopback-listen, INSECURE)"
        )
    return host, int(port_text)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from attest.client.proxy import VERIFIED_PATH, proxy_app
    from attest.client.transport import verify_first
    from attest.client.verdict import ServerRefused
    from foundation.errors import ConfigError, Error

    host, port = parse_listen(args.listen, allow_non_loopback=args.allow_non_loopback_listen)
    if args.allow_non_loopback_listen:
        print(
            f"WARNING: INSECURE: serving plain HTTP without authentication on {host}:{port}",
            file=sys.stderr,
        )
    try:
        verifier = verifier_from_args(args)
    except ConfigError as exc:
        print(f"enclave-serve proxy: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        first = verify_first(verifier, args.url)
    except ServerRefused as exc:
        print(f"enclave-serve proxy: not verified: {exc.cli_message}", file=sys.stderr)
        return EXIT_NOT_VERIFIED
    except Error as exc:
        print(f"enclave-serve proxy: could not check {args.url}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    print(f"verified replica {first.tls_spki_sha256} of {args.url}", file=sys.stderr)
    print(
        f"serving http://{host}:{port}/v1 (verified replicas: http://{host}:{port}{VERIFIED_PATH})",
        file=sys.stderr,
    )
    uvicorn.run(proxy_app(verifier, args.url), host=host, port=port, log_level="warning")
    return 0
