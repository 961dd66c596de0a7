"""Test support for the KBS tests: real servers on 127.0.0.1, test doubles, throwaway PKI."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from attest.kbs.dev.server import DevKbsConfig, create_app
from attest.tee.attester import Attester
from attest.tee.sample.evidence import SampleEvidence

ADMIN_TOKEN = b"test-admin-token-0123456789abcdef"


class ManualClock:
    """Test double of the dev KBS's wall clock: the real time plus an offset tests move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class SteppedTime:
    """Test double of the monotonic clock and ``sleep`` a client is given: sleeping advances the
    clock, nothing waits; every sleep is recorded."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@dataclass
class RunningServer:
    url: str
    server: uvicorn.Server
    config: DevKbsConfig | None = None


@contextmanager
def run_uvicorn(app: object, *, certfile: Path | None = None, keyfile: Path | None = None) -> Iterator[str]:
    """Run an ASGI app under uvicorn in a thread on 127.0.0.1:<free port>; yield its base URL."""
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        host="127.0.0.1",
        port=0,
        log_level="warning",
        lifespan="off",
        access_log=False,
        ssl_certfile=str(certfile) if certfile else None,
        ssl_keyfile=str(keyfile) if keyfile else None,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.005)
    port = server.servers[0].sockets[0].getsockname()[1]
    scheme = "https" if certfile else "http"
    try:
        yield f"{scheme}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)


@contextmanager
def run_dev_kbs(config: DevKbsConfig, **tls: Path) -> Iterator[str]:
    """Run the real kbs-dev app for ``config`` over TCP; yield its URL."""
    with run_uvicorn(create_app(config), **tls) as url:
        yield url


# --- a scripted HTTP server (test double) --------------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


Handler = Callable[[str, str, bytes], Reply]


@dataclass
class ScriptedServer:
    """Test double: a real local HTTP server answering with a Python function per request.

    Records every request as ``(method, path)`` in :attr:`hits`.
    """

    url: str
    hits: list[tuple[str, str]]


@contextmanager
def scripted_server(handler: Handler) -> Iterator[ScriptedServer]:
    hits: list[tuple[str, str]] = []

    class _Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            hits.append((self.command, self.path))
            reply = handler(self.command, self.path, body)
            if reply.delay_s:
                time.sleep(reply.delay_s)
            try:
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)
            except (BrokenPipeError, ConnectionResetError):
                pass

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, format: str, *args: object) -> None:
            return

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield ScriptedServer(url=f"http://127.0.0.1:{httpd.server_address[1]}", hits=hits)
    finally:
        httpd.shutdown()
        httpd.server_close()


def closed_port_url() -> str:
    """Return a URL on 127.0.0.1 where nothing listens (KBS down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --- attesters that lie (test doubles) -------------------------------------------------------------


class TamperingSampleAttester(Attester):
    """Test double: sample evidence over report data with one bit flipped (a wrong binding)."""

    tee = SampleEvidence.tee
    insecure = True

    @classmethod
    def detect(cls) -> bool:
        return False

    def collect(self, report_data: bytes) -> SampleEvidence:
        flipped = bytes([report_data[0] ^ 1]) + report_data[1:]
        return SampleEvidence(report_data=flipped)


# --- throwaway PKI -----------------------------------------------------------------------------------


@dataclass
class Pki:
    ca_pem: Path
    cert_pem: Path
    key_pem: Path


def make_pki(directory: Path, name: str) -> Pki:
    """Create a CA and a server certificate for 127.0.0.1 signed by it, as PEM files."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kbs.test")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(
        ca_pem=directory / f"{name}-ca.pem",
        cert_pem=directory / f"{name}-cert.pem",
        key_pem=directory / f"{name}-key.pem",
    )
    pki.ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    ssl.create_default_context(cafile=str(pki.ca_pem))  # sanity: loads
    return pki
