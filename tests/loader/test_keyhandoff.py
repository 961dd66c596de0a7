"""The key handoff socket: one release per rank, only to holders of that rank's capability.

Every refusal is a key compromise: the server forgets the key, so even the real worker that
comes later is refused, and the runtime fails the boot with the recorded reason.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from foundation.errors import KeyRetrievalError
from foundation.secret import SecretBytes
from loader.keyhandoff import CAPABILITY_BYTES, KeyHandoffServer, request_key

DIGEST = "sha256:" + "ab" * 32
KEY = bytes(range(32))
REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import json, sys
    from loader.keyhandoff import request_key
    path, digest, rank, capability, mode = sys.argv[1:6]
    try:
        key, channel = request_key(path, manifest_digest=digest, rank=int(rank), capability=capability)
    except Exception as exc:
        print(json.dumps({"error": str(exc)}))
        sys.exit(0)
    print(json.dumps({"len": len(key), "first": key.reveal()[0]}))
    if mode == "ok":
        channel.report(ok=True, stats={"gbps": 1.5})
    elif mode == "fail":
        channel.report(ok=False, error="ModelDecryptionError: model-00001.safetensors.enc failed")
    else:
        channel.close()
    """
)


def run_child(server: KeyHandoffServer, *, rank: int = 0, capability: str | None = None,
              digest: str = DIGEST, mode: str = "ok") -> dict:  # fmt: skip
    cap = server.capabilities[rank] if capability is None else capability
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(server.path), digest, str(rank), cap, mode],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_capability_holder_gets_key_and_reports_back() -> None:
    with KeyHandoffServer(SecretBytes(KEY), manifest_digest=DIGEST, ranks=1) as server:
        assert oct(server.path.parent.stat().st_mode & 0o777) == "0o700"
        assert run_child(server) == {"len": 32, "first": 0}
        (report,) = server.wait_for_reports(1, timeout=10)
        assert report.ok and report.rank == 0 and report.stats == {"gbps": 1.5}
        assert server.compromise is None
    assert not server.path.exists()


def test_each_rank_has_its_own_capability() -> None:
    with KeyHandoffServer(SecretBytes(KEY), manifest_digest=DIGEST, ranks=3) as server:
        caps = server.capabilities
        assert len(set(caps)) == 3 and all(len(bytes.fromhex(c)) == CAPABILITY_BYTES for c in caps)
        for rank in (2, 0, 1):
            assert run_child(server, rank=rank)["len"] == 32
        assert sorted(r.rank for r in server.wait_for_reports(3, timeout=10)) == [0, 1, 2]
        assert server.compromise is None


def test_failure_report_is_kept_for_the_boot_reason() -> None:
    with KeyHandoffServer(SecretBytes(KEY), manifest_digest=DIGEST) as server:
        run_child(server, mode="fail")
        server.wait_for_reports(1, timeout=10)
        failure = server.first_failure()
        assert failure is not None and "model-00001.safetensors.enc" in failure.error


def test_worker_dying_before_report_is_a_failure() -> None:
    with KeyHandoffServer(SecretBytes(KEY), manifest_digest=DIGEST) as server:
        run_child(server, mode="silent")
        (report,) = server.wait_for_reports(1, timeout=10)
        assert not report.ok and "before reporting" in report.error


@pytest.mark.parametrize(
    ("scenario", "request_for", "reason"),
    [
        ("no capability", lambda caps: {"rank": 0}, "without its capability"),
        ("a guessed capability", lambda caps: {"rank": 0, "capability": "00" * CAPABILITY_BYTES},
         "without its capability"),
        ("another rank's capability", lambda caps: {"rank": 0, "capability": caps[1]},
         "without its capability"),
        ("a rank the engine lacks", lambda caps: {"rank": 2, "capability": caps[1]},
         "which this engine does not have"),
        ("a boolean rank", lambda caps: {"rank": True, "capability": caps[1]},
         "which this engine does not have"),
        ("another model", lambda caps: {"rank": 0, "capability": caps[0], "manifest": "sha256:" + "cd" * 32},
         "different model"),
    ],
)  # fmt: skip
def test_invalid_request_is_a_compromise_and_withdraws_the_key(
    scenario: str, request_for: Callable[[tuple[str, ...]], dict], reason: str
) -> None:
    with KeyHandoffServer(SecretBytes(KEY), manifest_digest=DIGEST, ranks=2) as server:
        request = {"op": "key", "manifest": DIGEST, **request_for(server.capabilities)}
        assert _raw_request(server, request)["ok"] is False, scenario
        assert server.compromised.is_set()
        assert server.compromise is not None and reason in server.compromise
        assert "key compromise" in server.compromise
        # The real workers come later: the key is gone, nothing more is released.
        assert "refused" in run_child(server, rank=1)["error"]
        assert server.reports == []


def _raw_request(server: KeyHandoffServer, request: object) -> dict:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(server.path))
        conn.sendall(json.dumps(request).encode() + b"\n")
        reply = conn.recv(4096)
    header = json.loads(reply.split(b"\n", 1)[0])
    return {"error": header.get("error", ""), "ok": header.get("ok"), "raw": reply}


def test_malformed_request_is_a_compromise() -> None:
    with KeyHandoffServer(SecretBytes(KEY), manifest_digest=DIGEST) as server:
        assert _raw_request(server, ["not", "an", "object"])["ok"] is False
        assert server.compromise is not None and "malformed" in server.compromise


def test_surplus_request_for_a_served_rank_is_a_compromise() -> None:
    """A second request for a rank (a replayed capability, a copy of the worker) fails the boot."""
    with KeyHandoffServer(SecretBytes(KEY), manifest_digest=DIGEST, ranks=1) as server:
        assert run_child(server)["len"] == 32
        assert server.compromise is None
        assert "refused" in run_child(server)["error"]
        assert server.compromise is not None and "a second time" in server.compromise
        # wait_for_reports returns early on a compromise instead of waiting for the timeout.
        server.wait_for_reports(5, timeout=30)


def test_refusal_does_not_tell_the_peer_why() -> None:
    with KeyHandoffServer(SecretBytes(KEY), manifest_digest=DIGEST) as server:
        reply = _raw_request(server, {"op": "key", "manifest": DIGEST, "rank": 0, "capability": "x"})
        assert reply["raw"] == b'{"ok": false, "error": "refused"}\n'


ORPHAN = textwrap.dedent(
    """
    import json, os, sys, time
    r, w = os.pipe()
    if os.fork() == 0:
        if os.fork() == 0:          # the grandchild: orphaned when its parent exits
            os.close(r)
            while os.getppid() == int(sys.argv[3]):
                time.sleep(0.01)
            import socket
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(sys.argv[1])
                s.sendall(json.dumps({"op": "key", "manifest": sys.argv[2], "rank": 0}).encode() + b"\\n")
                reply = s.recv(4096)
            os.write(w, json.dumps({"ppid": os.getppid(), "reply": reply.decode(errors="replace")}).encode())
            os._exit(0)
        os._exit(0)
    os.close(w)
    print(os.read(r, 65536).decode())
    """
)


def test_double_forked_orphan_reparented_to_the_runtime_gets_nothing() -> None:
    """The attack on ancestry: an orphan re-parented to the runtime (here a child subreaper, as a
    container's PID 1 is) is a descendant, yet holds no capability and gets no key."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_child_subreaper = 36
    assert libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0
    try:
        with KeyHandoffServer(SecretBytes(KEY), manifest_digest=DIGEST) as server:
            proc = subprocess.Popen(
                [sys.executable, "-c", ORPHAN, str(server.path), DIGEST, "0"],
                stdout=subprocess.PIPE, text=True, cwd=REPO,
            )  # fmt: skip
            out, _ = proc.communicate(timeout=60)
            proc.wait()
            result = json.loads(out)
            assert result["ppid"] == os.getpid(), "the orphan should be re-parented to us"
            assert '"ok": true' not in result["reply"] and '"ok": false' in result["reply"]
            assert server.compromise is not None and "without its capability" in server.compromise
    finally:
        libc.prctl(pr_set_child_subreaper, 0, 0, 0, 0)
        _reap()


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def test_request_key_without_runtime_explains() -> None:
    with pytest.raises(KeyRetrievalError, match="only works under 'enclave-serve run'"):
        request_key("/nonexistent/key.sock", manifest_digest=DIGEST, rank=0, capability="00")


def test_the_first_compromise_calls_back_once() -> None:
    calls: list[str] = []
    with KeyHandoffServer(SecretBytes(KEY), manifest_digest=DIGEST, on_compromise=calls.append) as server:
        _raw_request(server, {"op": "key", "manifest": DIGEST, "rank": 0})
        _raw_request(server, {"op": "key", "manifest": DIGEST, "rank": 0, "capability": "x"})
        server.wait_for_reports(1, timeout=5)
    assert len(calls) == 1 and "without its capability" in calls[0]
