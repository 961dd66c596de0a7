"""Test double of a hostile process in the container (not part of the product).

Run it inside the runtime's PID namespace (``nsenter --pid --mount``): it double-forks so that
the worker doing the asking is an orphan re-parented to the namespace's init (the runtime, as a
container's PID 1 would be), waits for the key handoff socket and asks for the model key the
way a vLLM worker did before capabilities existed. It writes what happened as JSON to argv[1].
"""

from __future__ import annotations

import glob
import json
import os
import socket
import sys
import time

SOCKETS = "/dev/shm/enclave-serve-*/key/enclave-serve-key-*/key.sock"


def ask(out: str, digest: str) -> None:
    time.sleep(0.2)  # let the intermediate parent exit, so this process is an orphan
    ppid = os.getppid()
    deadline = time.monotonic() + 300
    paths: list[str] = []
    while not paths and time.monotonic() < deadline:
        paths = glob.glob(SOCKETS)
        time.sleep(0.005)
    reply = b""
    if paths:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(paths[0])
            conn.sendall(json.dumps({"op": "key", "manifest": digest, "rank": 0}).encode() + b"\n")
            reply = conn.recv(65536)
    with open(out + ".tmp", "w") as f:
        json.dump({"ppid": ppid, "pid": os.getpid(), "found": bool(paths), "reply": reply.hex()}, f)
    os.replace(out + ".tmp", out)


if __name__ == "__main__":
    if os.fork() == 0:
        if os.fork() == 0:
            ask(sys.argv[1], sys.argv[2])
        os._exit(0)
    os.wait()
