"""Hand the model key to vLLM worker processes over a private Unix socket.

vLLM loads weights in worker processes it spawns itself, so the key has to cross a process
boundary. Environment variables (inherited, copied to Ray workers, visible in
``/proc/<pid>/environ``), argv and ``--model-loader-extra-config`` (printed in vLLM's
"non-default args" log line) are all out. Instead the runtime keeps the key in memory and
serves it on a Unix socket in a fresh ``0700`` directory; the loader is told only the socket
*path* and the manifest digest.

The server releases the key only to a peer that

1. runs as our uid (``SO_PEERCRED``) and is a **descendant of this process** (walks
   ``/proc/<pid>/stat``), so another process in the enclave cannot ask for it;
2. asks for the model whose manifest digest the runtime holds the key for;
3. arrives while releases remain (one per rank: ``max_releases``).

The same connection then carries the worker's load report back (``ok`` with throughput, or the
error text), so the runtime can say *why* a load failed instead of "engine core failed".

Wire format (one connection per worker): newline-terminated JSON request
``{"op": "key", "manifest": <digest>, "rank": <int>}``; the reply is one JSON line
``{"ok": true, "length": N}`` followed by exactly N key bytes, or ``{"ok": false, "error": ...}``.
The worker later sends one JSON line ``{"op": "report", "ok": bool, "error": str, "stats": {...}}``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attest.errors import KeyRetrievalError
from attest.secret import SecretBytes

__all__ = [
    "KeyHandoffClient",
    "KeyHandoffServer",
    "LoadReport",
    "is_descendant",
    "request_key",
    "serving_key",
]

logger = logging.getLogger(__name__)

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


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is parenthesised and may contain spaces: parse after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[1])


def is_descendant(pid: int, ancestor: int) -> bool:
    """Return whether process ``pid`` descends from ``ancestor`` (per ``/proc``)."""
    seen = 0
    current: int | None = pid
    # The ancestor may be pid 1 (the runtime as a container's entrypoint): compare before stopping.
    while current is not None and current > 0 and seen < 4096:
        if current == ancestor:
            return True
        current = _parent_pid(current)
        seen += 1
    return False


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
    """Serve one model key to this process's vLLM workers over a private Unix socket.

    Use as a context manager; on exit the socket and its directory are removed and the server's
    reference to the key is dropped (the caller still owns and wipes the :class:`SecretBytes`).

    .. warning::
       The socket is protected by directory permissions, the peer's uid and its ancestry. Any
       code already running *as a descendant of this process* can obtain the key; that is the
       point (the vLLM workers), and why the runtime runs nothing else.
    """

    def __init__(
        self,
        key: SecretBytes,
        *,
        manifest_digest: str,
        max_releases: int = 1,
        socket_dir: Path | None = None,
    ) -> None:
        self._key: SecretBytes | None = key
        self._manifest_digest = manifest_digest
        self._releases_left = max_releases
        self._dir = Path(tempfile.mkdtemp(prefix="enclave-serve-key-", dir=socket_dir))
        os.chmod(self._dir, 0o700)
        self.path = self._dir / "key.sock"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self._sock.listen(16)
        self._lock = threading.Lock()
        self._reports: list[LoadReport] = []
        self._refusals: list[str] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="key-handoff", daemon=True)
        self._report_cond = threading.Condition(self._lock)

    def __enter__(self) -> KeyHandoffServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def reports(self) -> list[LoadReport]:
        """Load reports received so far."""
        with self._lock:
            return list(self._reports)

    @property
    def refusals(self) -> list[str]:
        """Why connections were refused (for diagnostics)."""
        with self._lock:
            return list(self._refusals)

    def wait_for_reports(self, count: int, timeout: float) -> list[LoadReport]:
        """Wait until ``count`` reports arrived (or ``timeout`` seconds) and return them."""
        with self._report_cond:
            self._report_cond.wait_for(lambda: len(self._reports) >= count, timeout=timeout)
            return list(self._reports)

    def first_failure(self) -> LoadReport | None:
        """Return the first failed load report, if any."""
        return next((r for r in self.reports if not r.ok), None)

    def close(self) -> None:
        """Stop serving, remove the socket, forget the key."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._key = None
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        shutil.rmtree(self._dir, ignore_errors=True)

    def _refuse(self, conn: socket.socket, reason: str) -> None:
        with self._lock:
            self._refusals.append(reason)
        logger.warning("key handoff refused: %s", reason)
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"ok": False, "error": reason}).encode() + b"\n")

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), name="key-handoff-conn", daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                creds = conn.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(_SO_PEERCRED_FMT)
                )
                pid, uid, _gid = struct.unpack(_SO_PEERCRED_FMT, creds)
                request = json.loads(_read_line(conn) or b"null")
            except (OSError, ValueError):
                return
            if not isinstance(request, dict) or request.get("op") != "key":
                self._refuse(conn, "malformed request")
                return
            rank = request.get("rank", 0)
            if uid != os.getuid():
                self._refuse(conn, f"peer pid {pid} runs as uid {uid}, not {os.getuid()}")
                return
            if not is_descendant(pid, os.getpid()):
                self._refuse(conn, f"peer pid {pid} is not a descendant of the runtime (pid {os.getpid()})")
                return
            if request.get("manifest") != self._manifest_digest:
                self._refuse(
                    conn, "the worker asked for a different model than the runtime holds the key for"
                )
                return
            with self._lock:
                key = self._key
                if key is None or self._releases_left <= 0:
                    key = None
                else:
                    self._releases_left -= 1
            if key is None:
                self._refuse(conn, "no key releases left (one per rank)")
                return
            material = key.reveal()
            try:
                conn.sendall(json.dumps({"ok": True, "length": len(material)}).encode() + b"\n" + material)
            finally:
                del material
            logger.info("model key handed to worker pid %d (rank %s)", pid, rank)
            # Wait for the worker's load report on the same connection.
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
                rank=int(rank) if isinstance(rank, int) else 0,
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
        with contextlib.suppress(OSError):
            self._conn.close()


def request_key(
    path: str | os.PathLike[str], *, manifest_digest: str, rank: int = 0
) -> tuple[SecretBytes, KeyHandoffClient]:
    """Fetch the model key from the runtime's handoff socket.

    Returns the key and the open connection on which to :meth:`KeyHandoffClient.report`.

    Raises:
        KeyRetrievalError: the socket is unreachable or the runtime refused.
    """
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(30)
        conn.connect(os.fspath(path))
        conn.sendall(json.dumps({"op": "key", "manifest": manifest_digest, "rank": rank}).encode() + b"\n")
        header = json.loads(_read_line(conn) or b"null")
        if not isinstance(header, dict) or not header.get("ok"):
            reason = header.get("error", "no answer") if isinstance(header, dict) else "no answer"
            raise KeyRetrievalError(f"the runtime refused to hand over the model key: {reason}")
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


@contextlib.contextmanager
def serving_key(
    key: SecretBytes, *, manifest_digest: str, max_releases: int = 1
) -> Iterator[KeyHandoffServer]:
    """Serve ``key`` for the duration of the ``with`` block."""
    server = KeyHandoffServer(key, manifest_digest=manifest_digest, max_releases=max_releases)
    with server:
        yield server
