"""The API app is what we assemble: no SageMaker bootstrap, no ``/invocations``, every route keyed.

The attack of the security review: vLLM's stock ``build_app`` imports ``/opt/ml/model/model.py``
whenever the file exists. The namespace test plants that file (in a private mount namespace, so
nothing outside the test sees it) and shows that the stock app runs it while ours never does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from server.auth import ApiKeyGuard, is_public
from server.engine import PUBLIC_PATHS, assemble_app

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def args() -> argparse.Namespace:
    from runtime.vllm_args import vllm_parser

    return vllm_parser().parse_args(["--model", "/nonexistent", "--api-key", KEY])


def _paths(app: object) -> set[str]:
    return {getattr(r, "path", "") for r in getattr(app, "routes", [])}


def test_only_the_routes_we_assemble_are_served(args: argparse.Namespace) -> None:
    paths = _paths(assemble_app(args, ("generate",), None))
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/health"} <= paths
    refused = {
        "/invocations", "/ping",  # SageMaker
        "/v1/load_lora_adapter", "/start_profile",  # runtime LoRA loading, the profiler
        "/scale_elastic_ep", "/is_scaling_elastic_ep",  # elastic expert-parallel admin
        "/inference/v1/generate", "/v1/chat/completions/render",  # scale-out and rendering
    }  # fmt: skip
    assert not paths & refused


def test_the_sagemaker_bootstrap_and_endpoint_plugins_are_never_consulted(
    args: argparse.Namespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vllm.entrypoints.launchers.app as stock
    import vllm.plugins.endpoint_plugins.interface as plugins

    def forbidden(*_: object, **__: object) -> None:
        raise AssertionError("consulted")

    monkeypatch.setattr(stock, "sagemaker_standards_bootstrap", forbidden)
    monkeypatch.setattr(stock, "attach_endpoint_plugins", forbidden)
    monkeypatch.setattr(plugins, "attach_endpoint_plugins", forbidden)
    assemble_app(args, ("generate",), None)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_a_model_py_planted_in_opt_ml_model_is_never_imported(tmp_path: Path) -> None:
    """In a private mount namespace: a fresh tmpfs over /opt with /opt/ml/model/model.py in it.
    The stock app imports it (the control); ours does not, and the mount check refuses /opt."""
    script = tmp_path / "probe.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, subprocess
            subprocess.run(["mount", "-t", "tmpfs", "none", "/opt"], check=True)
            os.makedirs("/opt/ml/model")
            with open("/opt/ml/model/model.py", "w") as f:
                f.write("import pathlib\\npathlib.Path('/opt/ml/IMPORTED').write_text('host code ran')\\n")
            from runtime.vllm_args import vllm_parser
            from runtime.mounts import SYSTEM_CODE_PATHS, check_mounts, code_paths, read_mount_table
            from server.engine import assemble_app
            args = vllm_parser().parse_args(["--model", "/nonexistent"])
            assemble_app(args, ("generate",), None)
            print("ours:", os.path.exists("/opt/ml/IMPORTED"))
            print("refused:", check_mounts(read_mount_table(), code=[*SYSTEM_CODE_PATHS, *code_paths()]))
            from vllm.entrypoints.launchers.app import build_app
            build_app(args, ("generate",), None)
            print("stock:", os.path.exists("/opt/ml/IMPORTED"))
            """
        )
    )
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, str(script)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
    assert lines["ours"] == "False"
    assert "a tmpfs mount at /opt replaces /opt" in lines["refused"]
    assert lines["stock"] == "True"  # the control: the attack is real against vLLM's own app


async def _status(app: object, method: str, path: str, key: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # type: ignore[arg-type]  # no engine: 500 past the guard
    async with httpx.AsyncClient(transport=transport, base_url="http://enclave") as client:
        response = await client.request(method, path, headers=headers, json={"model": "tiny", "prompt": "x"})
    return response.status_code


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/tokenize"), ("POST", "/detokenize"), ("POST", "/invocations"), ("GET", "/metrics"),
     ("GET", "/load"), ("GET", "/version"), ("POST", "/v1/completions"), ("GET", "/anything")],
)  # fmt: skip
def test_every_route_but_the_public_ones_needs_the_api_key(
    args: argparse.Namespace, method: str, path: str
) -> None:
    app = assemble_app(args, ("generate",), None)
    assert asyncio.run(_status(app, method, path)) == 401
    assert asyncio.run(_status(app, method, path, key="wrong")) == 401
    assert asyncio.run(_status(app, method, path, key=KEY)) != 401


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/health", "/.well-known/enclave-serve/boot"])
def test_probes_and_attestation_need_no_key(args: argparse.Namespace, path: str) -> None:
    app = assemble_app(args, ("generate",), None)
    assert asyncio.run(_status(app, "GET", path)) != 401


def test_public_paths_match_whole_paths() -> None:
    assert is_public("/.well-known/enclave-serve/attestation", PUBLIC_PATHS)
    assert is_public("/health", PUBLIC_PATHS)
    assert not is_public("/healthz", PUBLIC_PATHS)
    assert not is_public("/health/../tokenize", ("/health",))
    assert not is_public("/.well-knownx", PUBLIC_PATHS)
    with pytest.raises(ValueError, match="token"):
        ApiKeyGuard(lambda *_: None, tokens=(), public=PUBLIC_PATHS)  # type: ignore[arg-type]


def test_without_an_api_key_nothing_is_guarded(args: argparse.Namespace) -> None:
    open_args = argparse.Namespace(**{**vars(args), "api_key": None})
    app = assemble_app(open_args, ("generate",), None)
    assert asyncio.run(_status(app, "POST", "/tokenize")) != 401
