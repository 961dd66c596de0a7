"""The key handoff socket: releases only to descendants asking for the right model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from attest.errors import KeyRetrievalError
from attest.secret import SecretBytes
from loader.keyhandoff import KeyHandoffServer, is_descendant, request_key

DIGEST = "sha256:" + "ab" * 32
KEY = bytes(range(32))

CHILD = textwrap.dedent(
    """
    import json, sys
    from loader.keyhandoff import request_key
    path, digest, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    try:
        key, channel = request_key(path, manifest_digest=digest, rank=0)
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


def run_child(path: Path, digest: str, mode: str = "ok") -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), digest, mode],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_descendant_gets_key_and_reports_back() -> None:
    with KeyHandoffServer(SecretBytes(KEY), manifest_digest=DIGEST, max_releases=1) as server:
        assert oct(server.path.parent.stat().st_mode & 0o777) == "0o700"
        assert run_child(server.path, DIGEST) == {"len": 32, "first": 0}
        (report,) = server.wait_for_reports(1, timeout=10)
        assert report.ok and report.stats == {"gbps": 1.5}
    assert not server.path.exists()


def test_failure_report_is_kept_for_the_boot_reason() -> None:
    with KeyHandoffServer(SecretBytes(KEY), manifest_digest=DIGEST) as server:
        run_child(server.path, DIGEST, mode="fail")
        server.wait_for_reports(1, timeout=10)
        failure = server.first_failure()
        assert failure is not None and "model-00001.safetensors.enc" in failure.error


def test_worker_dying_before_report_is_a_failure() -> None:
    with KeyHandoffServer(SecretBytes(KEY), manifest_digest=DIGEST) as server:
        run_child(server.path, DIGEST, mode="silent")
        (report,) = server.wait_for_reports(1, timeout=10)
        assert not report.ok and "before reporting" in report.error


def test_wrong_model_is_refused() -> None:
    with KeyHandoffServer(SecretBytes(KEY), manifest_digest=DIGEST) as server:
        result = run_child(server.path, "sha256:" + "cd" * 32)
        assert "different model" in result["error"]
        assert server.refusals


def test_one_release_per_rank() -> None:
    with KeyHandoffServer(SecretBytes(KEY), manifest_digest=DIGEST, max_releases=1) as server:
        assert run_child(server.path, DIGEST)["len"] == 32
        assert "no key releases left" in run_child(server.path, DIGEST)["error"]


def test_non_descendant_is_refused() -> None:
    """A process re-parented away from the runtime (double fork) cannot obtain the key."""
    script = textwrap.dedent(
        """
        import os, sys, json, time
        r, w = os.pipe()
        if os.fork() == 0:
            if os.fork() == 0:
                os.close(r)
                while os.getppid() != 1 and os.getppid() == int(sys.argv[3]):
                    time.sleep(0.01)
                time.sleep(0.2)
                from loader.keyhandoff import request_key
                try:
                    request_key(sys.argv[1], manifest_digest=sys.argv[2])
                    msg = "GOT KEY"
                except Exception as exc:
                    msg = str(exc)
                os.write(w, msg.encode())
                os._exit(0)
            os._exit(0)
        os.close(w)
        print(os.read(r, 4096).decode())
        """
    )
    with KeyHandoffServer(SecretBytes(KEY), manifest_digest=DIGEST) as server:
        # The intermediate child exits, so the grandchild's parent is no longer in our tree.
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(server.path), DIGEST, "0"],
            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2],
            start_new_session=True,
        )  # fmt: skip
        out, _ = proc.communicate(timeout=60)
        if is_descendant(os.getpid(), 1) and os.getpid() == 1:
            pytest.skip("running as pid 1: every process descends from us")
        assert "not a descendant" in out
        assert "GOT KEY" not in out


def test_request_key_without_runtime_explains() -> None:
    with pytest.raises(KeyRetrievalError, match="only works under 'enclave-serve run'"):
        request_key("/nonexistent/key.sock", manifest_digest=DIGEST)


def test_is_descendant() -> None:
    assert is_descendant(os.getpid(), os.getppid())
    assert not is_descendant(os.getppid(), os.getpid())
    # As a container's entrypoint the runtime is pid 1, the ancestor of every process.
    assert is_descendant(os.getpid(), 1)
