"""Hand the model key to the vLLM workers the runtime started, and to nobody else.

vLLM loads weights in worker processes it spawns itself, so the key has to cross a process
boundary. Environment variables (inherited, visible in ``/proc/<pid>/environ``), argv and files
are all out. Instead the runtime keeps the key in memory and serves it on a Unix socket in a
private ``0700`` directory, to peers that present a **capability**:

* The server draws one random 256-bit capability per rank (:attr:`KeyHandoffServer.capabilities`).
  The runtime puts them into vLLM's load configuration *after* vLLM has logged its arguments;
  vLLM hands that configuration to the engine and worker processes it spawns through the
  private pipes of ``multiprocessing`` (spawn), never through argv, env or a file. Only those
  processes hold the capabilities.
* A release needs the capability of a rank, that rank not yet released, our uid
  (``SO_PEERCRED``) and the manifest digest the runtime holds the key for.
* **Anything else is a key compromise**: a request without a valid capability, a second request
  for a rank, a request after every rank was served, a wrong model or a malformed request all
  mean that something other than vLLM's workers is asking (a process the host started in the
  container, an orphan re-parented to the runtime, a replay). The server forgets the key at
  once, releases nothing more and records the reason; the runtime fails the boot with it.

Ancestry is deliberately not used: as a container's PID 1 (or beside a shell the host
``exec``\\ s), every orphan in the PID namespace descends from the runtime.

The same connection then carries the worker's load report back (``ok`` with throughput, or the
error text), so the runtime can say *why* a load failed instead of "engine core failed".

Wire format (one connection per worker): newline-terminated JSON request
``{"op": "key", "manifest": <digest>, "rank": <int>, "capability": <64 hex>}``; the reply is one
JSON line ``{"ok": true, "length": N}`` followed by exactly N key bytes, or
``{"ok": false, "error": ...}``. The worker later sends one JSON line
``{"op": "report", "ok": bool, "error": str, "stats": {...}}``.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import secrets
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foundation.errors import KeyRetrievalError
from foundation.secret import SecretBytes

__all__ = [
    "CAPABILITY_BYTES",
    "KeyHandoffClient",
    "KeyHandoffServer",
    "LoadReport",
    "request_key",
]

logger = logging.getLogger(__name__)

#: Size of one rank's capability (hex-encoded on the wire).
CAPABILITY_BYTES = 32
_MAX_LINE = 64 * 1024
_SO_PEERCRED_FMT = "3i"  # struct ucred {pid_t pid; uid_t uid; gid_t gid;} (socket(7))


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadReport:
    """What one worker reported after loading (no secrets: an error class/message and stats)."""

    rank: int
    pid: int
    ok: bool
    error: str = ""
    stats: dict[str, Any] = field(default_factory=dict)


def _read_line(conn: socket.socket) -> bytes:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = conn.recv(1)
        if not chunk:
            break
        buf += chunk
        if len(buf) > _MAX_LINE:
            raise ValueError("line too long")
    return bytes(buf)


class KeyHandoffServer:
    """Serve one model key to exactly ``ranks`` capability holders over a private Unix socket.

    Use as a context manager; on exit the socket and its directory are removed and the server's
    reference to the key is dropped (the caller still owns and wipes the :class:`SecretBytes`).

    .. warning::
       :attr:`capabilities` are as sensitive as the key for as long as the server runs: pass
       them only through a channel the workers alone can read (vLLM's spawn pipes), never log
       them, never put them in argv, env or a file.
    """

    def __init__(
        self,
        key: SecretBytes,
        *,
        manifest_digest: str,
        ranks: int = 1,
        socket_dir: Path | None = None,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
        on_compromise: Callable[[str], None] | None = None,
    ) -> None:
        if ranks < 1:
            raise ValueError("ranks must be at least 1")
        self._key: SecretBytes | None = key
        self._manifest_digest = manifest_digest
        self._capabilities = tuple(random_bytes(CAPABILITY_BYTES).hex() for _ in range(ranks))
        self._released: set[int] = set()
        self._on_compromise = on_compromise
        self._dir = Path(tempfile.mkdtemp(prefix="enclave-serve-key-", dir=socket_dir))
        os.chmod(self._dir, 0o700)
        self.path = self._dir / "key.sock"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self._sock.listen(16)
        self._lock = threading.Lock()
        self._reports: list[LoadReport] = []
        self._compromise: str | None = None
        self._closed = threading.Event()
        self.compromised = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="key-handoff", daemon=True)
        self._report_cond = threading.Condition(self._lock)

    def __enter__(self) -> KeyHandoffServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def ranks(self) -> int:
        """How many releases this server makes, one per rank."""
        return len(self._capabilities)

    @property
    def capabilities(self) -> tuple[str, ...]:
        """The per-rank capabilities (hex), index = rank. Secret: see the class warning."""
        return self._capabilities

    @property
    def reports(self) -> list[LoadReport]:
        """Load reports received so far."""
        with self._lock:
            return list(self._reports)

    @property
    def compromise(self) -> str | None:
        """Why the key is considered compromised (the first refused request), or None."""
        with self._lock:
            return self._compromise

    def wait_for_reports(self, count: int, timeout: float) -> list[LoadReport]:
        """Wait until ``count`` reports arrived, a compromise, or ``timeout`` seconds."""
        with self._report_cond:
            self._report_cond.wait_for(
                lambda: len(self._reports) >= count or self._compromise is not None, timeout=timeout
            )
            return list(self._reports)

    def first_failure(self) -> LoadReport | None:
        """Return the first failed load report, if any."""
        return next((r for r in self.reports if not r.ok), None)

    def close(self) -> None:
        """Stop serving, remove the socket, forget the key."""
        if self._closed.is_set():
            return
        self._closed.set()
        with self._lock:
            self._key = None
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        shutil.rmtree(self._dir, ignore_errors=True)

    def _refuse(self, conn: socket.socket, pid: int, reason: str) -> None:
        """Refuse a request and treat it as a compromise: forget the key, release nothing more.

        The first compromise calls ``on_compromise`` (from this server's thread) with the reason.
        """
        first = False
        with self._report_cond:
            self._key = None
            if self._compromise is None:
                first = True
                self._compromise = (
                    f"pid {pid} asked for the model key {reason}; treating it as a key compromise "
                    "(only vLLM's workers hold a capability, one release per rank)"
                )
            compromise = self._compromise
            self._report_cond.notify_all()
        self.compromised.set()
        logger.error("key handoff refused pid %d: %s", pid, reason)
        if first and self._on_compromise is not None:
            try:
                self._on_compromise(compromise)
            except Exception:
                logger.exception("key handoff: the compromise callback failed")
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"ok": False, "error": "refused"}).encode() + b"\n")

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), name="key-handoff-conn", daemon=True).start()

    def _check(self, request: object, uid: int) -> tuple[int | None, str | None]:
        """Return ``(rank, None)`` for a valid request, else ``(None, why it is refused)``."""
        if uid != os.getuid():
            return None, f"as uid {uid}, not {os.getuid()}"
        if not isinstance(request, dict) or request.get("op") != "key":
            return None, "with a malformed request"
        rank, capability = request.get("rank"), request.get("capability")
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < self.ranks:
            return None, f"for rank {rank!r}, which this engine does not have"
        if not isinstance(capability, str) or not hmac.compare_digest(
            capability.encode(), self._capabilities[rank].encode()
        ):
            return None, f"for rank {rank} without its capability"
        if request.get("manifest") != self._manifest_digest:
            return None, "for a different model than the runtime holds the key for"
        return rank, None

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                creds = conn.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(_SO_PEERCRED_FMT)
                )
                pid, uid, _gid = struct.unpack(_SO_PEERCRED_FMT, creds)
            except OSError:
                return
            try:
                request: object = json.loads(_read_line(conn) or b"null")
            except (OSError, ValueError):
                request = None
            rank, refusal = self._check(request, uid)
            key: SecretBytes | None = None
            with self._lock:
                if refusal is None and rank is not None:
                    if rank in self._released:
                        refusal = f"for rank {rank} a second time"
                    elif self._key is None:
                        refusal = f"for rank {rank} after the key was withdrawn"
                    else:
                        self._released.add(rank)
                        key = self._key
            if refusal is not None or key is None or rank is None:
                self._refuse(conn, pid, refusal or "unexpectedly")
                return
            material = key.reveal()
            try:
                conn.sendall(json.dumps({"ok": True, "length": len(material)}).encode() + b"\n" + material)
            finally:
                del material
            logger.info("model key handed to worker pid %d (rank %d of %d)", pid, rank, self.ranks)
            self._receive_report(conn, pid, rank)

    def _receive_report(self, conn: socket.socket, pid: int, rank: int) -> None:
        try:
            conn.settimeout(None)
            line = _read_line(conn)
            report = json.loads(line) if line else None
        except (OSError, ValueError):
            report = None
        if not isinstance(report, dict):
            report = {"ok": False, "error": "the worker exited before reporting its load"}
        stats = report.get("stats")
        entry = LoadReport(
            rank=rank,
            pid=pid,
            ok=bool(report.get("ok")),
            error=str(report.get("error", ""))[:2000],
            stats=dict(stats) if isinstance(stats, dict) else {},
        )
        with self._report_cond:
            self._reports.append(entry)
            self._report_cond.notify_all()


class KeyHandoffClient:
    """The worker's side: one connection that fetched the key and will carry the load report."""

    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn

    def report(self, *, ok: bool, error: str = "", stats: dict[str, Any] | None = None) -> None:
        """Send the load report (never include secrets in ``error``) and close."""
        payload = {"op": "report", "ok": ok, "error": error, "stats": stats or {}}
        with contextlib.suppress(OSError):
            self._conn.sendall(json.dumps(payload).encode() + b"\n")
        self.close()

    def close(self) -> None:
        """Close the connection without a report (the runtime records a failure)."""
        with contextlib.suppress(OSError):
            self._conn.close()


def request_key(
    path: str | os.PathLike[str], *, manifest_digest: str, rank: int, capability: str
) -> tuple[SecretBytes, KeyHandoffClient]:
    """Fetch the model key from the runtime's handoff socket with this rank's capability.

    Returns the key and the open connection on which to :meth:`KeyHandoffClient.report`.

    Raises:
        KeyRetrievalError: the socket is unreachable or the runtime refused.
    """
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    request = {"op": "key", "manifest": manifest_digest, "rank": rank, "capability": capability}
    try:
        conn.settimeout(30)
        conn.connect(os.fspath(path))
        conn.sendall(json.dumps(request).encode() + b"\n")
        header = json.loads(_read_line(conn) or b"null")
        if not isinstance(header, dict) or not header.get("ok"):
            raise KeyRetrievalError(
                f"the runtime refused to hand rank {rank} the model key (see the runtime's log)"
            )
        length = int(header["length"])
        buf = bytearray(length)
        view = memoryview(buf)
        got = 0
        while got < length:
            n = conn.recv_into(view[got:], length - got)
            if n == 0:
                raise KeyRetrievalError("the key handoff connection closed early")
            got += n
        key = SecretBytes(buf)
        for i in range(length):
            buf[i] = 0
    except (OSError, ValueError, KeyError) as exc:
        conn.close()
        raise KeyRetrievalError(
            f"cannot reach the runtime's key handoff socket {os.fspath(path)!r}; the encrypted "
            "loader only works under 'enclave-serve run'"
        ) from exc
    except KeyRetrievalError:
        conn.close()
        raise
    conn.settimeout(None)
    return key, KeyHandoffClient(conn)
