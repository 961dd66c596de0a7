"""Real TLS replicas of one deployment, and a TCP round-robin balancer in front of them.

Each :class:`ReplicaServer` is uvicorn over TLS with its own enclave TLS key
(:func:`server.tls.generate_enclave_tls`), serving a real attestation document (the sample TEE,
signed as the runtime signs it) that binds that key, the run configuration, and a tiny OpenAI
chat endpoint that answers with the replica's name (streamed or not). It logs every request as
(connection, what) so a test can tell what each connection carried, in order.
:class:`RoundRobin` is an L4 balancer: each accepted connection goes to the next backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from attest.client.remote import ATTESTATION_PATH, CONFIG_PATH
from attest.evidence import TeeKind
from attest.initdata import ENCLAVE_SERVE_ENTRY, InitData
from attest.runconfig import RunConfiguration
from attest.tee.sample.attester import UnsafeSampleAttester
from attest.verify.workload import WorkloadPolicy
from server.attestation import AttestationService, AttestedWorkload
from server.tls import generate_enclave_tls
from tests.attest.support import workload_pins

MODEL = "sha256:" + "aa" * 32
PINS = workload_pins(MODEL)
INIT = InitData.build(entries=[(ENCLAVE_SERVE_ENTRY, PINS.to_toml())])
CONFIG = RunConfiguration.from_pins(PINS)
#: Another configuration of the same model: a replica of another deployment.
OTHER_CONFIG = RunConfiguration.from_pins(workload_pins(MODEL, vllm_args=("--max-model-len", "1024")))
POLICY_TOML = (
    'version = 1\ninsecure_development = true\n[tee]\nallowed = ["sample"]\n'
    f'[workload]\nmodel = ["{MODEL}"]\nconfig = ["sha256:{CONFIG.sha256}"]\ninit_data = ["{INIT.digest_text}"]\n'
)
POLICY = WorkloadPolicy.from_toml(POLICY_TOML)


def completion(name: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "tiny",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": name}, "finish_reason": "stop"}],
    }  # fmt: skip


def chunk(piece: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "tiny",
        "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
    }  # fmt: skip


class ReplicaServer:
    """One replica: uvicorn over TLS in a thread, a fresh TLS key at each :meth:`start`."""

    def __init__(self, name: str, config: RunConfiguration = CONFIG, *, delay_s: float = 0.05) -> None:
        self.name = name
        self.config = config
        self.delay_s = delay_s
        self.chunk_delay_s = 0.0
        self.port = 0
        self.log: list[tuple[int, str]] = []
        self.start()

    @property
    def chats(self) -> int:
        return sum(1 for _, what in self.log if what == "chat")

    def connections(self) -> dict[int, list[str]]:
        """What each connection carried, in order."""
        out: dict[int, list[str]] = {}
        for conn, what in self.log:
            out.setdefault(conn, []).append(what)
        return out

    def _app(self) -> Starlette:
        service = AttestationService(
            AttestedWorkload(
                model_digest=MODEL, config=self.config, tls_spki_sha256=self.tls.spki_sha256,
                init_data=INIT.digest_text, runtime_version="0.1.0",
            ),
            attester=UnsafeSampleAttester(allow_insecure=True, init_data=INIT.register(TeeKind.SAMPLE)),
        )  # fmt: skip

        def note(request: Request, what: str) -> None:
            client = request.scope["client"]
            self.log.append((client[1] if client else 0, what))

        async def attestation(request: Request) -> Response:
            note(request, "attestation")
            nonce = bytes.fromhex(request.query_params["nonce"])
            return Response(service.document([nonce]).to_bytes(), media_type="application/json")

        async def config(request: Request) -> Response:
            note(request, "config")
            return Response(self.config.raw, media_type="application/json")

        async def chat(request: Request) -> Response:
            note(request, "chat")
            body = await request.json()
            await asyncio.sleep(self.delay_s)
            if not body.get("stream"):
                return JSONResponse(completion(self.name))

            async def events() -> Any:
                for piece in (self.name, " says", " hi"):
                    yield f"data: {json.dumps(chunk(piece))}\n\n"
                    await asyncio.sleep(self.chunk_delay_s)
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        async def models(request: Request) -> Response:
            note(request, "models")
            return JSONResponse(
                {"object": "list", "data": [{"id": "tiny", "object": "model", "created": 1, "owned_by": "x"}]}
            )

        return Starlette(
            routes=[
                Route(ATTESTATION_PATH, attestation),
                Route(CONFIG_PATH, config),
                Route("/v1/chat/completions", chat, methods=["POST"]),
                Route("/v1/models", models),
            ]
        )

    def start(self) -> None:
        self.tls = generate_enclave_tls(hostnames=("127.0.0.1",))
        config = uvicorn.Config(
            self._app(), host="127.0.0.1", port=self.port, ssl_keyfile=self.tls.keyfile,
            ssl_certfile=self.tls.certfile, log_level="warning", lifespan="off", timeout_graceful_shutdown=1,
        )  # fmt: skip
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert self._thread.is_alive() and time.monotonic() < deadline, "the replica did not start"
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self.tls.close()

    def restart(self) -> None:
        """Stop, then start on the same port with a new TLS key (a replica rescheduled)."""
        self.stop()
        self.log.clear()
        self.start()


class RoundRobin:
    """An L4 balancer on 127.0.0.1: each accepted connection goes to the next backend in turn."""

    def __init__(self, backends: list[ReplicaServer]) -> None:
        self.backends = backends
        self.accepted = 0
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                down, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            down.settimeout(None)
            backend = self.backends[self.accepted % len(self.backends)]
            self.accepted += 1
            try:
                up = socket.create_connection(("127.0.0.1", backend.port))
            except OSError:
                down.close()
                continue
            self._sockets += [down, up]
            for src, dst in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (dst, src):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for sock in self._sockets:
            sock.close()


@contextlib.contextmanager
def three_replicas() -> Iterator[tuple[ReplicaServer, ReplicaServer, ReplicaServer]]:
    """Start replicas "a" and "b" (the policy's configuration) and "c" (:data:`OTHER_CONFIG`); stop
    them on exit."""
    servers = (ReplicaServer("a"), ReplicaServer("b"), ReplicaServer("c", OTHER_CONFIG))
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()
