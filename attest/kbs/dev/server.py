"""kbs-dev: a development Key Broker Service speaking Trustee's RCAR protocol 0.4.0.

For demos and tests only. It behaves like Trustee wherever the client can see it:

* ``POST /kbs/v0/auth``: exact version match (``0.4.0``), a 32-byte base64 nonce, a
  ``kbs-session-id`` cookie (no ``Path``/``Secure``, ``Expires`` = now + session timeout),
  ``extra-params`` ``""`` unless a hash other than sha384 is configured.
* ``POST /kbs/v0/attest``: the nonce must be the session's; the evidence must bind the runtime
  data exactly as Trustee computes it; an already attested session gets its token back (as in
  Trustee, without re-appraisal); an expired session is deleted and refused.
* ``GET /kbs/v0/resource/<repo>/<type>/<tag>``: the token comes from the session cookie, else
  from ``Authorization: Bearer``; it must verify; the resource policy must allow the path; the
  resource is returned as a JWE built as ``trustee:kbs/src/jwe/mod.rs`` builds it.
* Admin API (``Authorization: Bearer <admin token>``): ``POST``/``DELETE
  /kbs/v0/resource/<path>`` (raw bytes), ``POST``/``GET /kbs/v0/resource-policy``
  (``{"policy": base64url-nopad}``).
* Errors are RFC 7807 bodies with Trustee's ``type`` URIs; everything is 401 except unknown
  plugins/paths and missing resources (404).

Every known difference from Trustee is listed in docs/kbs.md. State lives in memory.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import hmac
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response
from pydantic import JsonValue
from starlette.concurrency import run_in_threadpool

from attest.binding import HashAlgorithm
from attest.kbs.dev.appraisal import Appraisal, AppraisalFailed, EvidenceAppraiser
from attest.kbs.dev.jwe import seal
from attest.kbs.dev.policy import PolicyDenied, ResourcePolicy
from attest.kbs.token import TokenIssuer, TokenRejected
from attest.kbs.wire import (
    DEFAULT_HASH_ALGORITHM,
    PROTOCOL_VERSION,
    SELECTED_HASH_ALGORITHM_KEY,
    SESSION_COOKIE,
    Attestation,
    AttestationResponse,
    Challenge,
    ErrorInformation,
    ErrorType,
    Request,
    ResourcePolicyUpload,
    WireFormatError,
)
from attest.verify.workload import WorkloadFacts, WorkloadPolicy
from foundation.errors import MalformedEvidence
from foundation.resource import validate_resource_path
from foundation.secret import SecretBytes

__all__ = ["DevKbsConfig", "ResourceStore", "create_app", "serve"]

logger = logging.getLogger(__name__)

#: Nonce size (``trustee:kbs/src/attestation/backend.rs`` ``NONCE_SIZE_BYTES``).
NONCE_SIZE = 32
_SEMVER = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?")


class ResourceStore:
    """Resources by ``repository/type/tag``, in memory, thread-safe; values are secrets."""

    def __init__(self, initial: Mapping[str, bytes] | None = None) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, SecretBytes] = {}
        for path, data in (initial or {}).items():
            self.put(path, data)

    def put(self, path: str, data: bytes) -> None:
        """Store ``data`` at ``path`` (overwriting).

        Raises:
            ValueError: ``path`` is not a valid ``repository/type/tag``.
        """
        validate_resource_path(path)
        with self._lock:
            self._items[path] = SecretBytes(data)

    def get(self, path: str) -> SecretBytes | None:
        """Return the resource at ``path``, if any."""
        with self._lock:
            return self._items.get(path)

    def delete(self, path: str) -> bool:
        """Delete ``path``; return whether it existed."""
        with self._lock:
            return self._items.pop(path, None) is not None

    def paths(self) -> list[str]:
        """Return the stored paths (never the values)."""
        with self._lock:
            return sorted(self._items)


@dataclass(frozen=True, slots=True, kw_only=True)
class DevKbsConfig:
    """Everything kbs-dev depends on, passed in (no globals, no environment).

    ``policy`` is the initial resource policy; ``None`` means allow every attested TEE (sample
    evidence only with ``allow_insecure_sample_evidence``).

    .. warning::
       ``allow_insecure_sample_evidence`` lets anyone with a laptop obtain every resource the
       policy releases to sample evidence. Development only.
    """

    admin_token: SecretBytes
    resources: ResourceStore = field(default_factory=ResourceStore)
    policy: ResourcePolicy | None = None
    allow_insecure_sample_evidence: bool = False
    appraiser: EvidenceAppraiser = field(default_factory=EvidenceAppraiser)
    hash_algorithm: HashAlgorithm = DEFAULT_HASH_ALGORITHM
    session_timeout_s: float = 300.0
    token_lifetime_s: float = 300.0
    clock: Callable[[], float] = time.time
    random_bytes: Callable[[int], bytes] = os.urandom
    token_issuer: TokenIssuer | None = None
    #: Resource path -> the workload policy its release also requires (``--resource-policy``).
    workload_policies: Mapping[str, WorkloadPolicy] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.admin_token) < 16:
            raise ValueError("the admin token must be at least 16 bytes")
        if self.session_timeout_s <= 0 or self.token_lifetime_s <= 0:
            raise ValueError("session timeout and token lifetime must be positive")


class _KbsError(Exception):
    def __init__(self, status: int, kind: ErrorType, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail

    def response(self) -> Response:
        body = ErrorInformation(type=self.kind.uri, detail=self.detail).to_json()
        return JSONResponse(body, status_code=self.status)


def _auth_failed(reason: str) -> _KbsError:
    return _KbsError(401, ErrorType.ATTESTATION, f"Attestation error: RCAR handshake Auth failed: {reason}")


def _attest_failed(reason: str) -> _KbsError:
    return _KbsError(401, ErrorType.ATTESTATION, f"Attestation error: RCAR handshake Attest failed: {reason}")


@dataclass(slots=True)
class _Session:
    tee: str
    nonce: str
    expires: float
    token: str | None = None
    appraisal: Appraisal | None = None


@dataclass(frozen=True, slots=True)
class _Call:
    method: str
    path: str
    cookies: Mapping[str, str]
    authorization: str | None
    body: bytes


class _Kbs:
    """The protocol state machine; every method runs under one lock (state is small)."""

    def __init__(self, config: DevKbsConfig) -> None:
        self.config = config
        self.issuer = config.token_issuer or TokenIssuer(
            lifetime_s=config.token_lifetime_s, clock=config.clock
        )
        self.policy = config.policy or ResourcePolicy.allow_all_attested(allow_sample=True)
        self.sessions: dict[str, _Session] = {}
        self.lock = threading.Lock()

    # -- dispatch, as ``trustee:kbs/src/api_server.rs api()`` ------------------------------------
    def handle(self, call: _Call) -> Response:
        plugin, _, rest = call.path.partition("/")
        try:
            if plugin == "auth" and call.method == "POST":
                return self.auth(call)
            if plugin == "attest" and call.method == "POST":
                return self.attest(call)
            if plugin == "resource-policy" and call.method in ("POST", "GET"):
                self.check_admin(call, "resource-policy")
                return self.resource_policy(call)
            if plugin == "resource":
                return self.resource(call, rest)
            if plugin in ("attestation-policy", "reference-value"):
                raise _KbsError(
                    404,
                    ErrorType.PLUGIN_NOT_FOUND,
                    f"kbs-dev does not implement {plugin}; pin measurements with a workload policy "
                    "(--resource-policy, docs/policy.md)",
                )
            raise _KbsError(404, ErrorType.PLUGIN_NOT_FOUND, f"Plugin {plugin} not found")
        except _KbsError as exc:
            return exc.response()

    # -- RCAR ----------------------------------------------------------------------------------
    def auth(self, call: _Call) -> Response:
        try:
            request = Request.from_json(call.body)
        except WireFormatError:
            raise _auth_failed("deserialize Request") from None
        if not _SEMVER.fullmatch(request.version):
            raise _auth_failed("failed to parse KBS version")
        if request.version != PROTOCOL_VERSION:
            raise _auth_failed(
                f"KBS Client Protocol Version Mismatch: expect ={PROTOCOL_VERSION} while the request "
                f"is {request.version}"
            )
        nonce = base64.b64encode(self.config.random_bytes(NONCE_SIZE)).decode()
        alg = self.config.hash_algorithm
        extra: JsonValue = "" if alg is DEFAULT_HASH_ALGORITHM else {SELECTED_HASH_ALGORITHM_KEY: alg.value}
        session_id = self.config.random_bytes(16).hex()
        expires = self.config.clock() + self.config.session_timeout_s
        with self.lock:
            self._expire_sessions()
            self.sessions[session_id] = _Session(tee=request.tee, nonce=nonce, expires=expires)
        response = JSONResponse(Challenge(nonce=nonce, extra_params=extra).to_json())
        response.headers.append("set-cookie", _cookie(session_id, expires))
        return response

    def attest(self, call: _Call) -> Response:
        session_id = call.cookies.get(SESSION_COOKIE)
        if session_id is None:
            raise _attest_failed("cookie not found")
        try:
            attestation = Attestation.from_json(call.body)
        except WireFormatError:
            raise _attest_failed("deserialize Attestation") from None
        with self.lock:
            session = self.sessions.get(session_id)
            if session is None:
                raise _attest_failed("session not found")
            if session.expires < self.config.clock():
                del self.sessions[session_id]
                raise _attest_failed("session expired.")
            if session.token is not None:
                # Trustee: "already attested. Skip attestation and return the old token".
                return self._token_response(session_id, session)
            if attestation.runtime_data.nonce != session.nonce:
                raise _attest_failed(
                    "the nonce in the handshake session is different from the client side in KBS "
                    "protocol's Attestation message"
                )
            tee = session.tee
        try:
            appraisal = self.config.appraiser.appraise(
                attestation, tee=tee, hash_alg=self.config.hash_algorithm
            )
        except AppraisalFailed as exc:
            logger.warning("kbs-dev: refused %s evidence: %s", tee, exc)
            raise _attest_failed(f"verify TEE evidence failed: {exc}") from None
        submods = appraisal.submods
        token = self.issuer.issue(submods)
        with self.lock:
            session = self.sessions.get(session_id)
            if (
                session is None
                or session.token is not None
                or session.nonce != attestation.runtime_data.nonce
            ):
                raise _attest_failed("session not found")
            session.token = token
            session.appraisal = appraisal
            logger.info("kbs-dev: a %s session attested (%s)", tee, ", ".join(sorted(submods)))
            return self._token_response(session_id, session)

    def _token_response(self, session_id: str, session: _Session) -> Response:
        assert session.token is not None
        response = JSONResponse(AttestationResponse(token=session.token).to_json())
        response.headers.append("set-cookie", _cookie(session_id, session.expires))
        return response

    def _expire_sessions(self) -> None:
        now = self.config.clock()
        for sid in [sid for sid, s in self.sessions.items() if s.expires < now]:
            del self.sessions[sid]

    # -- resources ------------------------------------------------------------------------------
    def resource(self, call: _Call, path: str) -> Response:
        try:
            validate_resource_path(path)
        except ValueError:
            raise _KbsError(404, ErrorType.INVALID_REQUEST_PATH, f"Request path {path} is invalid") from None
        if call.method in ("POST", "DELETE"):
            self.check_admin(call, "resource")
            if call.method == "POST":
                self.config.resources.put(path, call.body)
                logger.info("kbs-dev: resource %s set (%d bytes)", path, len(call.body))
            elif not self.config.resources.delete(path):
                raise _KbsError(404, ErrorType.RESOURCE_NOT_FOUND, f"resource not found: {path}")
            return Response(status_code=200)
        if call.method != "GET":
            raise _KbsError(404, ErrorType.INVALID_REQUEST_PATH, f"Request path {path} is invalid")
        token = self._token_of(call)
        try:
            claims = self.issuer.verify(token)
        except TokenRejected as exc:
            raise _KbsError(401, ErrorType.TOKEN_VERIFIER, f"Token Verifier error: {exc}") from None
        with self.lock:
            policy = self.policy
            appraisal = next((s.appraisal for s in self.sessions.values() if s.token == token), None)
        try:
            policy.evaluate(path, claims, sample_permitted=self.config.allow_insecure_sample_evidence)
            workload = self.config.workload_policies.get(path)
            if workload is not None:
                self._check_workload(path, workload, appraisal)
        except PolicyDenied as exc:
            logger.warning("kbs-dev: policy refused %s: %s", path, exc)
            raise _KbsError(401, ErrorType.POLICY_DENY, f"Access denied by policy: {exc}") from None
        secret = self.config.resources.get(path)
        if secret is None:
            raise _KbsError(404, ErrorType.RESOURCE_NOT_FOUND, f"resource not found: {path}")
        try:
            tee_pubkey = claims.tee_pubkey()
            if tee_pubkey is None:
                raise ValueError("the token carries no tee-pubkey")
            jwe = seal(tee_pubkey, secret.reveal(), random_bytes=self.config.random_bytes)
        except (ValueError, WireFormatError) as exc:
            raise _KbsError(401, ErrorType.JWE, f"JWE failed: {exc}") from None
        logger.info("kbs-dev: released %s", path)
        return JSONResponse(jwe.to_json())

    def _check_workload(self, path: str, policy: WorkloadPolicy, appraisal: Appraisal | None) -> None:
        """Apply the workload policy of ``path`` to what the session's attestation established.

        The model, configuration and runtime come from the init-data's enclave-serve pins (the
        init-data was checked against the evidence's register at ``/attest``): the key goes only
        to a runtime that will load the pinned model with the pinned configuration.

        Raises:
            PolicyDenied: naming every failed rule.
        """
        if appraisal is None:
            raise PolicyDenied("workload policy: the session's attestation is no longer known; attest again")
        try:
            pins = None if appraisal.init_data is None else appraisal.init_data.pins
        except MalformedEvidence as exc:
            raise PolicyDenied(f"workload policy: {exc}") from None
        facts = WorkloadFacts(
            primary=appraisal.primary,
            devices=appraisal.devices,
            model_digest=None if pins is None else pins.model,
            config_sha256=None if pins is None else pins.config_sha256,
            runtime_version=None if pins is None else str(pins.runtime.get("version")),
            init_data_register=appraisal.init_data_register,
            allow_insecure=self.config.allow_insecure_sample_evidence,
        )
        failed = [o for o in policy.evaluate(facts) if not o.ok]
        if failed:
            raise PolicyDenied(
                f"workload policy for {path}: " + "; ".join(f"{o.rule}: {o.detail}" for o in failed)
            )

    def _token_of(self, call: _Call) -> str:
        session_id = call.cookies.get(SESSION_COOKIE)
        if session_id is not None:
            with self.lock:
                session = self.sessions.get(session_id)
                if session is not None and session.expires >= self.config.clock() and session.token:
                    return session.token
        if call.authorization is not None:
            scheme, _, value = call.authorization.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                return value.strip()
        raise _KbsError(401, ErrorType.TOKEN_NOT_FOUND, "Attestation Token not found")

    # -- admin ------------------------------------------------------------------------------------
    def check_admin(self, call: _Call, endpoint: str) -> None:
        presented = b""
        if call.authorization is not None:
            scheme, _, value = call.authorization.partition(" ")
            if scheme.lower() == "bearer":
                presented = value.strip().encode()
        if not hmac.compare_digest(presented, self.config.admin_token.reveal()):
            raise _KbsError(
                401,
                ErrorType.ADMIN_AUTH,
                f"admin access denied for endpoint {endpoint}: Admin access denied: "
                "missing or wrong admin bearer token",
            )

    def resource_policy(self, call: _Call) -> Response:
        if call.method == "GET":
            with self.lock:
                text = self.policy.to_json_text()
            return Response(content=text, media_type="application/json")
        try:
            policy_text = ResourcePolicyUpload.from_json(call.body).decoded()
            policy = ResourcePolicy.from_json(policy_text)
        except WireFormatError:
            raise _KbsError(
                401, ErrorType.PARSE_POLICY, "Failed to parse policy: Illegal SetPolicy Request Json"
            ) from None
        except ValueError as exc:
            raise _KbsError(401, ErrorType.PARSE_POLICY, f"Failed to parse policy: {exc}") from None
        with self.lock:
            self.policy = policy
        logger.info("kbs-dev: resource policy set (%d rules)", len(policy.rules))
        return Response(status_code=200)


def _cookie(session_id: str, expires: float) -> str:
    # Trustee's cookie: name=value and Expires only (no Path, no Secure, no SameSite).
    return f"{SESSION_COOKIE}={session_id}; Expires={email.utils.formatdate(expires, usegmt=True)}"


def create_app(config: DevKbsConfig) -> FastAPI:
    """Return the kbs-dev ASGI application for ``config``.

    Verified per request: see the module docstring. Not verified: anything about the admin
    beyond the bearer token (Trustee verifies a signed admin JWT and a role).
    """
    kbs = _Kbs(config)
    app = FastAPI(title="enclave-serve kbs-dev", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    def healthz() -> Response:
        return Response(status_code=200)

    @app.api_route("/kbs/v0/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def api(path: str, request: HttpRequest) -> Response:
        call = _Call(
            method=request.method,
            path=path,
            cookies=dict(request.cookies),
            authorization=request.headers.get("authorization"),
            body=await request.body(),
        )
        return await run_in_threadpool(kbs.handle, call)

    app.state.kbs = kbs
    return app


class _AnnouncingServer(uvicorn.Server):
    """A uvicorn server that reports the bound address once it accepts connections.

    SIGTERM and SIGINT stop it gracefully and :func:`serve` returns: a requested stop, not a
    death by signal (uvicorn itself raises the signal again once stopped, exit status 143).
    """

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[str, int], None]) -> None:
        super().__init__(config)
        self._on_ready = on_ready
        #: The signal that stopped the server, if one did.
        self.stopped_by: signal.Signals | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.stopped_by is None:
            self.stopped_by = signal.Signals(sig)
        super().handle_exit(sig, frame)

    async def startup(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        await super().startup(sockets)  # type: ignore[arg-type]
        if self.should_exit:
            return
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                self._on_ready(str(host), int(port))
                return


def serve(
    config: DevKbsConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    on_ready: Callable[[str, int], None] | None = None,
) -> str | None:
    """Run kbs-dev until interrupted; call ``on_ready(host, port)`` once it accepts connections.

    ``port=0`` picks a free port (reported through ``on_ready``). Returns the name of the signal
    that stopped it (``SIGTERM``, ``SIGINT``), if one did.

    Raises:
        ValueError: only one of ``tls_cert`` / ``tls_key`` is given.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("give both tls_cert and tls_key, or neither")
    uv_config = uvicorn.Config(
        create_app(config),
        host=host,
        port=port,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )
    server = _AnnouncingServer(uv_config, on_ready or (lambda h, p: None))
    server.run()
    return None if server.stopped_by is None else server.stopped_by.name
