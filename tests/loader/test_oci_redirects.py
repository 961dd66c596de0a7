"""The registry client goes nowhere the image does not live (issue 17): redirects, the bearer
token and the public reasons, each scenario through real local HTTP(S) servers.

Names resolve through :class:`LoopbackNetwork`, a test double of :class:`loader.oci.blobs.Network`:
a table of names to addresses (so no DNS is needed), after which every connection the client
opens goes to 127.0.0.1 at the same port. A "public" CDN can so be a local server, while every
address check is the shipping one: a refused address is never connected to at all.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import socket
import ssl
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpcore
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from foundation.errors import ModelFormatError
from loader.oci.blobs import MAX_REDIRECTS, RegistryStore, is_public_address
from loader.oci.image import load_image
from loader.oci.packer import pack_oci_layout
from loader.oci.reference import ImageReference
from tests import oci_support as oci

MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
REPO = "models/tiny"
MANIFEST_PATH = f"/v2/{REPO}/manifests/{DIGEST}"
TOKEN = "registry-token-7f3a"
KBS_TOKEN = "kbs-token-of-the-pod-91c2"
PUBLIC = "93.184.216.34"  # a globally routable address; LoopbackNetwork connects it to 127.0.0.1


# -- test doubles ------------------------------------------------------------------------------


class LoopbackNetwork:
    """A test double of :class:`loader.oci.blobs.Network`: names from ``names`` (a list of answers
    is given one per lookup, the last repeated, as a rebinding DNS server does), connections to
    127.0.0.1 at the same port whatever the address, each one recorded."""

    def __init__(self, names: dict[str, list[str] | list[list[str]]]) -> None:
        self._names = {k: [v] if v and isinstance(v[0], str) else v for k, v in names.items()}
        self.connects: list[tuple[str, int]] = []
        self.lookups: list[str] = []

    def resolve(self, host: str, port: int) -> Sequence[str]:
        self.lookups.append(host)
        answers = self._names.get(host)
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, "unknown name")
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        assert isinstance(answer, list)
        return answer

    def connect(self, address: str, port: int, timeout: float | None) -> httpcore.NetworkStream:
        self.connects.append((address, port))
        return httpcore.SyncBackend().connect_tcp("127.0.0.1", port, timeout=timeout)


Answer = tuple[int, dict[str, str], bytes]


@dataclass
class Seen:
    path: str
    headers: dict[str, str]  # lower-case names


@dataclass
class Server:
    """A test double of a registry, a CDN, a token service or the attestation agent: a real
    HTTP(S) server on 127.0.0.1 that answers by path (404 otherwise) and records every request."""

    tls: ssl.SSLContext | None = None
    routes: dict[str, Callable[[Seen], Answer]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                request = Seen(self.path, {k.lower(): v for k, v in self.headers.items()})
                server.seen.append(request)
                route = server.routes.get(self.path.split("?")[0])
                status, headers, body = route(request) if route else (404, {}, b'{"errors":[]}')
                self.send_response(status)
                for name, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if self.tls is not None:
            self._httpd.socket = self.tls.wrap_socket(self._httpd.socket, server_side=True)
        self.port = int(self._httpd.server_address[1])
        threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True).start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def redirect(location: str, status: int = 307) -> Callable[[Seen], Answer]:
    return lambda _r: (status, {"Location": location}, b"")


def serve(body: bytes, *, token: str | None = None, realm: str = "") -> Callable[[Seen], Answer]:
    """Answer ``body``; with ``token``, only to ``Authorization: Bearer <token>`` (else a challenge)."""

    def answer(request: Seen) -> Answer:
        if token is not None and request.headers.get("authorization") != f"Bearer {token}":
            return 401, {"WWW-Authenticate": f'Bearer realm="{realm}",service="registry.test"'}, b""
        return 200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, body

    return answer


def behind_token(answer: Callable[[Seen], Answer], realm: str) -> Callable[[Seen], Answer]:
    """``answer``, once the request carries the registry's token (else a challenge naming ``realm``)."""

    def guarded(request: Seen) -> Answer:
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return 401, {"WWW-Authenticate": f'Bearer realm="{realm}",service="registry.test"'}, b""
        return answer(request)

    return guarded


def _answer(body: bytes) -> Callable[[Seen], Answer]:
    return lambda _r: (200, {}, body)


def token_service(token: str = TOKEN) -> Callable[[Seen], Answer]:
    return lambda _r: (200, {"Content-Type": "application/json"}, json.dumps({"token": token}).encode())


@dataclass(frozen=True)
class Pki:
    server: ssl.SSLContext  # a certificate for registry.test, cdn.test and auth.test
    client: ssl.SSLContext  # trusts only the test CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "registry redirects test CA")])

    def cert(subject: x509.Name, public: ec.EllipticCurvePublicKey, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )  # fmt: skip
        if ca:
            usage = x509.KeyUsage(True, False, False, False, False, True, True, False, False)
            builder = builder.add_extension(usage, critical=True)
        else:
            names = [x509.DNSName(n) for n in ("registry.test", "cdn.test", "auth.test")]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    ca = cert(ca_name, ca_key.public_key(), True)
    leaf = cert(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "registry.test")]), key.public_key(), False
    )
    (root / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (root / "cert.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (root / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )  # fmt: skip
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(root / "cert.pem", root / "key.pem")
    return Pki(server=server, client=ssl.create_default_context(cafile=str(root / "ca.pem")))


@pytest.fixture
def servers() -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(tls: ssl.SSLContext | None = None) -> Server:
        started.append(Server(tls))
        return started[-1]

    yield start
    for server in started:
        server.close()


@dataclass
class Scene:
    """A registry (https://registry.test), a CDN (https://cdn.test, public), and the attestation
    agent on loopback (plain HTTP, as its REST API is), with one network naming them."""

    registry: Server
    cdn: Server
    agent: Server
    network: LoopbackNetwork
    pki: Pki

    @property
    def origin(self) -> str:
        return f"https://registry.test:{self.registry.port}"

    @property
    def cdn_url(self) -> str:
        return f"https://cdn.test:{self.cdn.port}"

    def store(self) -> RegistryStore:
        ref = ImageReference.parse(f"docker://registry.test:{self.registry.port}/{REPO}@{DIGEST}")
        return RegistryStore(ref, network=self.network, ssl_context=self.pki.client, timeout_s=10)

    def connected_to(self, server: Server) -> bool:
        return any(port == server.port for _address, port in self.network.connects)


@pytest.fixture
def scene(servers: Callable[..., Server], pki: Pki) -> Scene:
    registry, cdn, agent = servers(pki.server), servers(pki.server), servers()
    agent.routes["/aa/token"] = token_service(KBS_TOKEN)
    network = LoopbackNetwork({"registry.test": ["127.0.0.1"], "cdn.test": [PUBLIC], "auth.test": [PUBLIC]})
    return Scene(registry, cdn, agent, network, pki)


def _refused(store: RegistryStore) -> str:
    with pytest.raises(ModelFormatError) as info:
        store.manifest(DIGEST)
    store.close()
    return str(info.value)


# -- the addresses -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "127.8.9.10", "::1", "0.0.0.0", "::",  # loopback, unspecified
        "10.1.2.3", "172.16.0.9", "192.168.1.1", "fd12:3456::1", "fec0::1",  # private, ULA, site-local
        "169.254.169.254", "fe80::1", "fe80::1%eth0",  # link-local: the cloud metadata service
        "100.64.0.1", "224.0.0.251", "ff02::1", "255.255.255.255", "192.0.2.1",  # shared, multicast, docs
        "::ffff:127.0.0.1", "::ffff:10.0.0.1", "2002:7f00:1::1", "64:ff9b::a00:1", "::127.0.0.1",  # carried v4
        "not-an-address", "",
    ],
)  # fmt: skip
def test_an_address_that_is_not_public_is_refused(address: str) -> None:
    assert not is_public_address(address)


@pytest.mark.parametrize(
    "address", [PUBLIC, "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]
)
def test_a_public_address_is_allowed(address: str) -> None:
    assert is_public_address(address)


# -- the redirects -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "location",
    [
        "http://127.0.0.1:{agent}/aa/token",  # the review's repro: the attestation agent on loopback
        "https://127.0.0.1:{agent}/aa/token",
        "https://[::1]:{agent}/aa/token",
        "https://[::ffff:127.0.0.1]:{agent}/aa/token",
        "https://localhost:{agent}/aa/token",
        "https://agent.test:{agent}/aa/token",  # a name that resolves to loopback
    ],
)
def test_a_redirect_to_loopback_is_refused(scene: Scene, location: str) -> None:
    scene.network = LoopbackNetwork(
        {"registry.test": ["127.0.0.1"], "agent.test": ["127.0.0.1"], "localhost": ["127.0.0.1", "::1"]}
    )
    realm = f"{scene.origin}/token"
    scene.registry.routes["/token"] = token_service()
    target = location.format(agent=scene.agent.port)
    scene.registry.routes[MANIFEST_PATH] = behind_token(redirect(target), realm)
    reason = _refused(scene.store())
    assert "may not come from" in reason
    assert scene.agent.seen == [] and not scene.connected_to(scene.agent)
    assert [r.headers.get("authorization") for r in scene.registry.seen if r.path == MANIFEST_PATH] == [
        None,
        f"Bearer {TOKEN}",
    ]


@pytest.mark.parametrize(
    "location",
    [
        "https://10.0.0.1:{port}/blob",
        "https://192.168.1.20:{port}/blob",
        "https://[fd00::1]:{port}/blob",
        "https://169.254.169.254:{port}/latest/meta-data/",
        "https://100.64.0.1:{port}/blob",
        "https://0.0.0.0:{port}/blob",
        "https://internal.test:{port}/blob",  # one public address and one private: every one counts
        "https://nowhere.test:{port}/blob",  # does not resolve
    ],
)
def test_a_redirect_to_a_private_address_is_refused(scene: Scene, location: str) -> None:
    scene.network = LoopbackNetwork({"registry.test": ["127.0.0.1"], "internal.test": [PUBLIC, "10.0.0.7"]})
    scene.registry.routes[MANIFEST_PATH] = redirect(location.format(port=scene.cdn.port))
    assert "may not come from" in _refused(scene.store())
    assert scene.cdn.seen == [] and not scene.connected_to(scene.cdn)
    if "[" in location or location[8].isdigit():  # a literal is checked as it is, not looked up
        assert scene.network.lookups == ["registry.test"]


def test_a_cross_origin_redirect_is_followed_without_the_authorization_header(
    scene: Scene, caplog: pytest.LogCaptureFixture
) -> None:
    """A registry sends its blobs to a CDN: followed, with the token left at the registry."""
    realm = f"{scene.origin}/token"
    scene.registry.routes["/token"] = token_service()
    scene.registry.routes[MANIFEST_PATH] = behind_token(
        redirect(f"{scene.cdn_url}/m?X-Amz-Signature=s1gned"), realm
    )
    blob = b"config bytes " * 100
    blob_digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    scene.registry.routes[f"/v2/{REPO}/blobs/{blob_digest}"] = behind_token(
        redirect(f"{scene.cdn_url}/b", status=302), realm
    )
    scene.cdn.routes["/m"] = serve(MANIFEST)
    scene.cdn.routes["/b"] = serve(blob)
    store = scene.store()
    with caplog.at_level("DEBUG", logger="loader"):
        assert store.manifest(DIGEST) == (MANIFEST, "application/vnd.oci.image.manifest.v1+json")
        assert store.small_blob(blob_digest, len(blob), "the config") == blob
    store.close()
    assert [r.path for r in scene.cdn.seen] == ["/m?X-Amz-Signature=s1gned", "/b"]
    assert all("authorization" not in r.headers and "cookie" not in r.headers for r in scene.cdn.seen)
    at_registry = [r.headers.get("authorization") for r in scene.registry.seen if r.path.startswith("/v2/")]
    assert at_registry == [None, f"Bearer {TOKEN}", f"Bearer {TOKEN}"]  # challenged once, then the token
    assert "authorization" not in next(r for r in scene.registry.seen if r.path.startswith("/token")).headers
    assert TOKEN not in caplog.text and "s1gned" not in caplog.text  # nor a CDN's signed query


def test_a_redirect_to_http_is_refused(scene: Scene) -> None:
    scene.cdn.routes["/m"] = serve(MANIFEST)
    for location in (f"http://cdn.test:{scene.cdn.port}/m", f"http://registry.test:{scene.registry.port}/m"):
        scene.registry.routes[MANIFEST_PATH] = redirect(location)
        assert "may not come from" in _refused(scene.store())
    assert scene.cdn.seen == [] and not scene.connected_to(scene.cdn)
    assert [r.path for r in scene.registry.seen] == [MANIFEST_PATH, MANIFEST_PATH]


def test_a_redirect_with_a_user_name_is_refused(scene: Scene) -> None:
    scene.registry.routes[MANIFEST_PATH] = redirect(f"https://user:pw@cdn.test:{scene.cdn.port}/m")
    assert "may not come from" in _refused(scene.store())
    assert scene.cdn.seen == []


def test_too_many_redirects_are_refused(scene: Scene) -> None:
    scene.registry.routes[MANIFEST_PATH] = redirect("/again", status=302)
    scene.registry.routes["/again"] = redirect(f"{scene.origin}/again", status=301)
    assert "too many times" in _refused(scene.store())
    assert len(scene.registry.seen) == MAX_REDIRECTS + 1


def test_a_name_rebound_to_loopback_after_the_check_is_refused_at_connect(scene: Scene) -> None:
    """DNS rebinding: the CDN's name answers a public address to the redirect check and
    loopback to the next lookup. The connection opens on a checked address or not at all."""
    scene.network = LoopbackNetwork({"registry.test": ["127.0.0.1"], "cdn.test": [[PUBLIC], ["127.0.0.1"]]})
    scene.registry.routes[MANIFEST_PATH] = redirect(f"{scene.cdn_url}/m")
    scene.cdn.routes["/m"] = serve(MANIFEST)
    assert "may not come from" in _refused(scene.store())
    assert scene.cdn.seen == [] and not scene.connected_to(scene.cdn)


# -- the token realm ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "realm",
    [
        "https://auth.test:{auth}/token",  # another host, public
        "http://registry.test:{registry}/token",  # the registry's host, not https
        "https://127.0.0.1:{agent}/aa/token",  # loopback
        "http://127.0.0.1:{agent}/aa/token?token_type=kbs",  # the review's repro
        "https://user@registry.test:{registry}/token",
    ],
)
def test_a_token_realm_on_another_host_is_refused(
    scene: Scene, servers: Callable[..., Server], realm: str
) -> None:
    auth = servers(scene.pki.server)
    auth.routes["/token"] = token_service()
    scene.registry.routes["/token"] = token_service()
    url = realm.format(auth=auth.port, registry=scene.registry.port, agent=scene.agent.port)
    scene.registry.routes[MANIFEST_PATH] = serve(MANIFEST, token=TOKEN, realm=url)
    assert "did not serve the manifest" in _refused(scene.store())
    assert auth.seen == [] and scene.agent.seen == []
    assert [r.path for r in scene.registry.seen] == [MANIFEST_PATH]  # asked once, no token fetched


def test_a_token_realm_that_redirects_to_the_attestation_agent_gets_no_token(scene: Scene) -> None:
    """The review's repro: a realm on the registry's host that redirects to the agent's
    ``/aa/token`` would hand the pod's KBS token to the registry as a bearer token."""
    scene.registry.routes["/token"] = redirect(f"http://127.0.0.1:{scene.agent.port}/aa/token?token_type=kbs")
    scene.registry.routes[MANIFEST_PATH] = serve(MANIFEST, token=KBS_TOKEN, realm=f"{scene.origin}/token")
    assert "may not come from" in _refused(scene.store())
    assert scene.agent.seen == []
    assert all(KBS_TOKEN not in str(r.headers) for r in scene.registry.seen)


def test_a_token_realm_on_the_registry_host_gives_the_token(scene: Scene) -> None:
    scene.registry.routes["/token"] = token_service()
    scene.registry.routes[MANIFEST_PATH] = serve(MANIFEST, token=TOKEN, realm=f"{scene.origin}/token")
    store = scene.store()
    assert store.manifest(DIGEST)[0] == MANIFEST
    store.close()
    token_request = scene.registry.seen[1]
    assert (
        token_request.path.startswith("/token?")
        and "scope=repository%3Amodels%2Ftiny%3Apull" in token_request.path
    )


# -- the development registry ------------------------------------------------------------------


def test_the_development_registry_follows_its_own_redirects_over_http_and_no_others(
    servers: Callable[..., Server], scene: Scene
) -> None:
    dev = servers()  # plain HTTP on loopback: --allow-insecure-http-registry
    dev.routes["/token"] = token_service()
    dev.routes[MANIFEST_PATH] = behind_token(redirect("/storage/m"), f"http://localhost:{dev.port}/token")
    dev.routes["/storage/m"] = behind_token(serve(MANIFEST), f"http://localhost:{dev.port}/token")
    ref = ImageReference.parse(f"docker://127.0.0.1:{dev.port}/{REPO}@{DIGEST}")
    store = RegistryStore(ref, allow_http=True, timeout_s=10)  # the system network: loopback only
    assert store.manifest(DIGEST)[0] == MANIFEST
    at_registry = [r.headers.get("authorization") for r in dev.seen if not r.path.startswith("/token")]
    assert at_registry == [None, f"Bearer {TOKEN}", f"Bearer {TOKEN}"]  # challenged, then the token
    # Another loopback port is another origin: plain HTTP there is refused, and so is loopback.
    dev.routes[MANIFEST_PATH] = redirect(f"http://127.0.0.1:{scene.agent.port}/aa/token")
    assert "may not come from" in _refused(store)
    assert scene.agent.seen == []


def test_an_image_whose_blobs_live_on_a_cdn_loads(scene: Scene, source_model: Path, tmp_path: Path) -> None:
    """Manifest at the registry, every blob redirected to the CDN (as real registries do)."""
    layout = tmp_path / "layout"
    pack_oci_layout(source_model, layout)
    digest = oci.index_digest(layout)
    realm = f"{scene.origin}/token"
    scene.registry.routes["/token"] = token_service()
    scene.registry.routes[f"/v2/{REPO}/manifests/{digest}"] = behind_token(
        lambda _r: (200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, oci.blob(layout, digest).read_bytes()),
        realm,
    )  # fmt: skip
    for path in (layout / "blobs" / "sha256").iterdir():
        scene.registry.routes[f"/v2/{REPO}/blobs/sha256:{path.name}"] = behind_token(
            redirect(f"{scene.cdn_url}/{path.name}?sig=1"), realm
        )
        scene.cdn.routes[f"/{path.name}"] = _answer(path.read_bytes())
    ref = ImageReference.parse(f"docker://registry.test:{scene.registry.port}/{REPO}@{digest}")
    store = RegistryStore(ref, network=scene.network, ssl_context=scene.pki.client, timeout_s=10)
    image = load_image(store, digest)
    for layer in image.layers:
        store.open_blob(layer.digest, layer.size, layer.label).drain()
    store.close()
    assert len(scene.cdn.seen) == 1 + len(image.layers)  # the config and every layer
    assert all("authorization" not in r.headers for r in scene.cdn.seen)


# -- what the public reason says ---------------------------------------------------------------


def _setup_status(scene: Scene, status: int) -> None:
    scene.registry.routes[MANIFEST_PATH] = lambda _r: (status, {}, b"x" * 1234)


def _setup_refused(scene: Scene, status: int) -> None:
    scene.registry.routes[MANIFEST_PATH] = redirect(f"http://127.0.0.1:{scene.agent.port}/aa/token")


def _setup_unreachable(scene: Scene, status: int) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    scene.registry.routes[MANIFEST_PATH] = redirect(f"https://cdn.test:{closed}/m")


@pytest.mark.parametrize(
    ("setup", "status"),
    [
        (_setup_status, 404),
        (_setup_status, 500),
        (_setup_status, 401),
        (_setup_refused, 0),
        (_setup_unreachable, 0),
    ],
)
def test_the_public_reason_names_no_url_status_or_length(
    scene: Scene, setup: Callable[[Scene, int], None], status: int, caplog: pytest.LogCaptureFixture
) -> None:
    setup(scene, status)
    with caplog.at_level("INFO", logger="loader"):
        reason = _refused(scene.store())
    assert not re.search(r"https?:|registry\.test|cdn\.test|127\.0\.0\.1|/v2/|/aa/", reason), reason
    for number in (status, 1234, scene.registry.port, scene.agent.port):
        assert not re.search(rf"\b{number}\b", reason), reason
    if status:  # the log has the detail the reason leaves out
        assert f"answered {status}" in caplog.text and MANIFEST_PATH in caplog.text


def test_a_short_blob_names_no_length_in_its_reason(scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    blob = b"b" * 3000
    blob_digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    scene.registry.routes[f"/v2/{REPO}/blobs/{blob_digest}"] = lambda _r: (200, {}, blob[:1700])
    store = scene.store()
    with caplog.at_level("INFO", logger="loader"), pytest.raises(ModelFormatError) as info:
        store.small_blob(blob_digest, len(blob), "the config")
    store.close()
    assert "truncated" in str(info.value)
    assert not re.search(r"\b(1700|3000)\b", str(info.value))
    assert "1700 of its 3000 bytes" in caplog.text
