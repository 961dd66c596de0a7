"""Probes during boot, and the hand-over of the listening socket to the final server."""

from __future__ import annotations

import asyncio
import socket

import httpx
import uvicorn
from fastapi import FastAPI

from server.boot_server import BootServer
from server.routes import boot_app, enclave_router
from server.status import BootStatus, Stage
from server.tls import generate_enclave_tls


def _listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def _boot_app(status: BootStatus) -> FastAPI:
    return boot_app(status, enclave_router(status=status, attestation=lambda: None))


async def _get(url: str, **kw: object) -> httpx.Response:
    async with httpx.AsyncClient(verify=False, timeout=10) as client:
        return await client.get(url, **kw)  # type: ignore[arg-type]


def test_probes_report_the_stage_then_the_failure_reason() -> None:
    async def scenario() -> None:
        sock = _listening_socket()
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        status = BootStatus()
        server = BootServer(_boot_app(status), sock, tls=None)
        await server.start()
        try:
            status.begin(Stage.KEY)
            r = await _get(url + "/readyz")
            assert r.status_code == 503
            assert r.json() == {"ready": False, "status": "booting", "stage": "key", "reason": "booting: key"}
            assert (await _get(url + "/livez")).status_code == 200

            status.fail(Stage.KEY, "the key broker refused resource enclave-serve/model-key/tiny")
            r = await _get(url + "/readyz")
            assert r.status_code == 503
            assert r.json()["status"] == "failed" and r.json()["stage"] == "key"
            assert "refused resource" in r.json()["reason"]

            # Everything else is refused in the OpenAI error shape, naming the reason.
            async with httpx.AsyncClient() as client:
                chat = await client.post(url + "/v1/chat/completions", json={"model": "x", "messages": []})
            assert chat.status_code == 503
            assert "refused resource" in chat.json()["error"]["message"]
            attestation = await _get(
                url + "/.well-known/enclave-serve/attestation", params={"nonce": "ab" * 32}
            )
            assert attestation.status_code == 503

            boot = (await _get(url + "/.well-known/enclave-serve/boot")).json()
            assert [(s["stage"], s["ok"]) for s in boot["stages"]] == [("key", False)]
        finally:
            await server.stop()
            sock.close()

    asyncio.run(scenario())


def test_bad_nonce_is_a_400_even_while_booting() -> None:
    async def scenario() -> None:
        sock = _listening_socket()
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        server = BootServer(_boot_app(BootStatus()), sock, tls=None)
        await server.start()
        try:
            for nonce in ("", "ab" * 31, "AB" * 32, "zz" * 32):
                r = await _get(url + "/.well-known/enclave-serve/attestation", params={"nonce": nonce})
                assert r.status_code in (400, 422), nonce
        finally:
            await server.stop()
            sock.close()

    asyncio.run(scenario())


def test_socket_hand_over_keeps_queued_connections() -> None:
    """Stopping the boot server closes only its duplicate; the next server gets the backlog."""

    async def scenario() -> None:
        sock = _listening_socket()
        port = sock.getsockname()[1]
        tls = generate_enclave_tls()
        status = BootStatus()
        boot = BootServer(_boot_app(status), sock, tls=tls)
        await boot.start()
        assert (await _get(f"https://127.0.0.1:{port}/readyz")).status_code == 503
        await boot.stop()

        # A client connecting in the gap is queued by the kernel, not refused.
        pending = asyncio.create_task(_get(f"https://127.0.0.1:{port}/ready-now"))
        await asyncio.sleep(0.3)
        assert not pending.done()

        final = FastAPI()

        @final.get("/ready-now")
        async def ready_now() -> dict[str, bool]:
            return {"served_by_final": True}

        config = uvicorn.Config(
            final, log_level="warning", ssl_keyfile=tls.keyfile, ssl_certfile=tls.certfile
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            r = await asyncio.wait_for(pending, timeout=10)
            assert r.json() == {"served_by_final": True}
        finally:
            server.should_exit = True
            await task
            sock.close()
            tls.close()

    asyncio.run(scenario())
