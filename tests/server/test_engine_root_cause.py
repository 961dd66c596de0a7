"""The engine's own error reaches the boot reason: one line, no secret, no host path.

vLLM's engine core is a spawned process; when it fails, the parent raises only "Engine core
initialization failed. See root cause above". These tests fail a real spawned process the same
way (its traceback on the stderr it inherited) and check what the runtime makes of it.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
from typing import Any

import pytest

from server.engine import MAX_CAUSE_CHARS, EngineOutput, EngineStartFailed, VllmEngine, root_cause, secrets_of

#: What vLLM 0.32's engine core leaves on stderr when it fails to start (multiprocessing's
#: ``Process._bootstrap`` prints the traceback), shortened.
ENGINE_CORE_STDERR = """\
Process EngineCore_DP0:
Traceback (most recent call last):
  File "/usr/lib/python3.11/multiprocessing/process.py", line 314, in _bootstrap
    self.run()
  File "/opt/venv/lib/python3.11/site-packages/vllm/v1/engine/core.py", line 1514, in run_engine_core
    raise e
ValueError: The model's max seq len (32768) is larger than the maximum number of tokens that can be stored in KV cache (9824). Try increasing `gpu_memory_utilization` or decreasing `max_model_len` when initializing the engine.
""".splitlines()

#: A worker's logged traceback (stdout, vLLM's header on every line, colours on), then the
#: engine core's pointer to it.
WORKER_STDOUT = [
    "\x1b[0;36m(Worker pid=4242)\x1b[0;0m ERROR 12-07 18:00:01 [multiproc_executor.py:750] WorkerProc failed to start.",
    "\x1b[0;36m(Worker pid=4242)\x1b[0;0m ERROR 12-07 18:00:01 [multiproc_executor.py:750] Traceback (most recent call last):",
    '\x1b[0;36m(Worker pid=4242)\x1b[0;0m ERROR 12-07 18:00:01 [multiproc_executor.py:750]   File "worker.py", line 3, in init_device',
    "\x1b[0;36m(Worker pid=4242)\x1b[0;0m ERROR 12-07 18:00:01 [multiproc_executor.py:750] torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.",
    "(EngineCore_DP0 pid=4241) ERROR 12-07 18:00:02 [core.py:1510] Traceback (most recent call last):",
    '(EngineCore_DP0 pid=4241) ERROR 12-07 18:00:02 [core.py:1510]   File "core.py", line 9, in run_engine_core',
    "(EngineCore_DP0 pid=4241) ERROR 12-07 18:00:02 [core.py:1510] Exception: WorkerProc initialization failed due to an exception in a background process. See stack trace for root cause.",
]

GENERIC_ONLY = [
    "Traceback (most recent call last):",
    '  File "x.py", line 1, in <module>',
    "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore_DP0': 1}",
]


def test_the_engine_cores_own_error_is_the_root_cause() -> None:
    assert root_cause(ENGINE_CORE_STDERR) == (
        "ValueError: The model's max seq len (32768) is larger than the maximum number of tokens that can be "
        "stored in KV cache (9824). Try increasing `gpu_memory_utilization` or decreasing `max_model_len` "
        "when initializing the engine."
    )


def test_a_workers_logged_error_wins_over_the_engine_cores_pointer_to_it() -> None:
    assert (
        root_cause(WORKER_STDOUT) == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB."
    )


def test_only_vllms_pointers_give_no_root_cause() -> None:
    assert root_cause(GENERIC_ONLY) is None
    assert root_cause(["ValueError: not after a traceback line"]) is None


def test_a_line_naming_a_secret_is_withheld() -> None:
    capability = "c0ffee" * 8
    args = argparse.Namespace(
        api_key=["sk-live-123456789"],
        model_loader_extra_config={"key_socket": "/run/k.sock", "capabilities": [capability]},
    )
    secrets = secrets_of(args)
    assert secrets == ("sk-live-123456789", capability)
    leaked = [
        _TB,
        "  File 'x'",
        f"pydantic.ValidationError: bad extra config {{'capabilities': ['{capability[:20]}",
    ]
    assert root_cause(leaked, secrets=secrets) == (
        "pydantic.ValidationError (its message is withheld: it may contain a secret; see the engine log)"
    )
    api = [_TB, "  File 'x'", "ValueError: api key sk-live-1234 rejected"]
    assert "withheld" in (root_cause(api, secrets=secrets) or "")


def test_a_bytes_literal_is_withheld_and_paths_are_hidden() -> None:
    key = [_TB, "  File 'x'", "ValueError: unexpected b'\\x8f\\x01\\xaa'"]
    assert (
        root_cause(key) == "ValueError (its message is withheld: it may contain a secret; see the engine log)"
    )
    path = [_TB, "  File 'x'", "FileNotFoundError: [Errno 2] No such file: '/host/models/llama/config.json'"]
    assert root_cause(path) == "FileNotFoundError: [Errno 2] No such file: '<path>'"
    url = [_TB, "  File 'x'", "OSError: cannot fetch https://huggingface.co/org/model"]
    assert root_cause(url) == "OSError: cannot fetch https://huggingface.co/org/model"


def test_the_root_cause_is_one_bounded_line() -> None:
    long = [_TB, "  File 'x'", "ValueError: " + "x" * 5000, "second line of the message"]
    cause = root_cause(long)
    assert cause is not None and "\n" not in cause and len(cause) == MAX_CAUSE_CHARS


_TB = "Traceback (most recent call last):"


def _fail_to_start(message: str) -> None:
    raise ValueError(message)


def _spawn_failing_child(message: str) -> int | None:
    """Fail a spawned process as vLLM's engine core fails (traceback on its inherited stderr)."""
    child = multiprocessing.get_context("spawn").Process(
        target=_fail_to_start, args=(message,), name="EngineCore_DP0"
    )
    child.start()
    child.join(60)
    return child.exitcode


def test_engine_output_captures_a_spawned_processes_traceback_and_still_forwards_it(
    capfd: pytest.CaptureFixture[str],
) -> None:
    with EngineOutput(2) as output:
        assert _spawn_failing_child("max_model_len 4096 is too large for /host/models/m") == 1
        lines = output.failure_lines()
    assert root_cause(lines) == "ValueError: max_model_len 4096 is too large for <path>"
    forwarded = capfd.readouterr().err
    assert "Process EngineCore_DP0:" in forwarded  # the real stderr still got everything
    assert "ValueError: max_model_len 4096 is too large for /host/models/m" in forwarded


class FailingLauncherDouble:
    """Test double of vLLM's ``build_async_engine_client``: spawns an engine core that fails, then
    raises what vLLM raises in the parent."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __call__(self, args: argparse.Namespace) -> FailingLauncherDouble:
        return self

    async def __aenter__(self) -> Any:
        exitcode = _spawn_failing_child(self.message)
        raise RuntimeError(
            "Engine core initialization failed. See root cause above. "
            f"Failed core proc(s): {{'EngineCore_DP0': {exitcode}}}"
        )

    async def __aexit__(self, *exc: object) -> None:
        return None


def test_a_failed_engine_start_carries_the_engine_cores_own_error() -> None:
    args = argparse.Namespace(api_key=None, model_loader_extra_config={"capabilities": ["k" * 32]})
    engine = VllmEngine(args, launcher=FailingLauncherDouble("no CUDA-capable device is detected"))
    with pytest.raises(EngineStartFailed) as info:
        asyncio.run(engine.start())
    assert str(info.value) == "vLLM's engine failed: ValueError: no CUDA-capable device is detected"
    assert info.value.root_cause == "ValueError: no CUDA-capable device is detected"
    assert isinstance(info.value.__cause__, RuntimeError)  # vLLM's own exception stays the cause
    assert not engine.started


def test_a_failed_engine_start_never_publishes_a_capability() -> None:
    capability = "0123456789abcdef" * 2
    args = argparse.Namespace(api_key=None, model_loader_extra_config={"capabilities": [capability]})
    engine = VllmEngine(args, launcher=FailingLauncherDouble(f"bad config: capabilities={capability}"))
    with pytest.raises(EngineStartFailed) as info:
        asyncio.run(engine.start())
    assert capability[:8] not in str(info.value)
    assert "withheld" in str(info.value)
