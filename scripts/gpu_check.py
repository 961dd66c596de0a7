"""The prepared GPU check (``make gpu-check``): what this project can only learn on a GPU.

    PYTHONPATH=.gpu-deps:. /opt/torch/.venv/bin/python3 scripts/gpu_check.py --no-setup [--out DIR]

Made for the GPU machine as it is: one NVIDIA GPU (CC mode on or off), no network, a Python with
PyTorch (CUDA), nvidia-ml-py, transformers and safetensors, and the project's other dependencies
from ``.gpu-deps`` (``make gpu-deps`` builds it here: cryptography, cffi, rfc8785, pytest for
CPython 3.12). vLLM is optional. Each step runs in its own process group, bounded by what is left
of the budget (``--budget-s``, 330 s by default), and every process is killed with the check.

1. **cuda** -- the Python, torch, CUDA as torch itself sees it, and the packages found. Without
   CUDA everything below runs as a dry run on the CPU (and the table says so).
2. **nvml** -- NVML's view, printed, not asserted: driver, GPUs, CC state, the NVIDIA GPUs on the
   PCI bus and in NVML.
3. **gate** -- the boot's GPU gate on this machine: with CC on it must pass (evidence collected
   over a fresh nonce and verified locally); with CC off it must refuse naming CC, and
   ``--allow-insecure-gpu-cc-off`` must leave the GPUs unattested rather than fail.
4. **tests** -- the four GPU test files (``pytest``; the CUDA round trip, tampering, vectors and
   race tests, and the real NVML path).
5. **bench** -- ``bench/load.py`` at ``--repeat 1``: the AES-GCM bound, the pinned and pageable
   host-to-device bounds, enclave-serve with pinned and with pageable staging, the streaming
   adapter.
6. **e2e** -- ``scripts/gpu_e2e.py``: the encrypted tiny model decrypted straight into a
   ``transformers`` model's CUDA parameters through the engine, compared bit for bit and by
   greedy tokens with the plaintext model; the canary reference across devices and dtypes.
7. **vllm-e2e** -- only when vLLM is importable: stock vLLM and ``enclave-serve run`` on CUDA,
   greedy tokens compared.

Prints one summary table and writes ``DIR/summary.json`` (``--out``, else ``$OUT``, else
``.gpu-check``). Exit status 0 when every step that ran passed.

``--setup`` instead builds ``.gpu-venv`` with ``pip install -e '.[gpu,test]'`` (a machine with a
network, or ``--wheels DIR``) and runs the steps with it.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GPU_DEPS = REPO / ".gpu-deps"
TEST_FILES = (
    "tests/loader/test_roundtrip.py",
    "tests/loader/test_tampering.py",
    "tests/loader/test_vectors.py",
    "tests/attest/test_nvidia_provider.py",
)
BENCH_CASES = (
    "aes-gcm-bound",
    "h2d-pinned-bound",
    "h2d-pageable-bound",
    "enclave-serve",
    "enclave-serve-pageable",
    "enclave-serve-stream",
)
PROMPTS = ("The enclave proves", "Hello, how are you", "A key broker checks")
KEY_ID = "kbs:///enclave-serve/model-key/tiny"
VLLM_ARGS = ("--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "4", "--dtype", "bfloat16")

#: Process groups started by the check: all of them are killed when it ends, however it ends.
_LIVE: set[int] = set()


def _kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _kill_all() -> None:
    for pgid in list(_LIVE):
        _kill_group(pgid)
        _LIVE.discard(pgid)


atexit.register(_kill_all)


@dataclass
class Step:
    name: str
    status: str = "not run"  # passed | failed | skipped | dry run | not run
    seconds: float = 0.0
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.deadline: float = time.monotonic() + float(args.budget_s)
        self.steps: list[Step] = []
        self.python: str = args.python
        self.env = child_env()
        self.info: dict[str, Any] = {}

    @property
    def cuda(self) -> bool:
        return bool(self.info.get("cuda_available"))

    @property
    def device(self) -> str:
        return "cuda" if self.cuda else "cpu"

    def left(self, reserve: float = 0.0) -> float:
        return max(0.0, self.deadline - time.monotonic() - reserve)

    def run(self, name: str, fn: Any, *, share: float) -> Step:
        """Run step ``fn`` with at most ``share`` of the time left (the rest for later steps)."""
        step = Step(name)
        self.steps.append(step)
        start = time.monotonic()
        budget = self.left() * share
        if budget < 5:
            step.status, step.detail = "skipped", "out of time (--budget-s)"
        else:
            try:
                fn(step, budget)
                if step.status == "not run":
                    step.status = "passed"
            except subprocess.TimeoutExpired as exc:
                step.status, step.detail = "failed", f"out of time after {exc.timeout:.0f} s"
            except Exception as exc:
                step.status, step.detail = "failed", f"{type(exc).__name__}: {exc}"[:600]
        step.seconds = time.monotonic() - start
        print(f"[gpu-check] {name}: {step.status} ({step.seconds:.1f} s) {step.detail}", flush=True)
        return step

    def child(self, argv: list[str], *, timeout: float, log: str) -> tuple[int, str]:
        """Run ``argv`` in its own process group (killed on timeout); return (status, output)."""
        path = self.out / log
        with path.open("w") as f:
            proc = subprocess.Popen(
                argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
            _LIVE.add(proc.pid)
            try:
                code = proc.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
            finally:
                _LIVE.discard(proc.pid)
                _kill_group(proc.pid)  # anything the step left behind in its group
        return code, path.read_text(errors="replace")

    def probe(self, code: str, *, timeout: float, log: str) -> dict[str, Any]:
        """Run Python ``code`` that prints one JSON object as its last line; return it."""
        status, text = self.child([self.python, "-c", code], timeout=timeout, log=log)
        lines = [line for line in text.splitlines() if line.startswith("{")]
        if status != 0 or not lines:
            raise RuntimeError(f"exited {status}: {(text.strip().splitlines() or ['no output'])[-1][:300]}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    # -- steps ----------------------------------------------------------------------------

    def setup(self, step: Step, budget: float) -> None:
        venv = REPO / ".gpu-venv"
        if not (venv / "bin" / "python").exists():
            subprocess.run(
                [self.args.base_python, "-m", "venv", "--system-site-packages", str(venv)], check=True
            )
        py = str(venv / "bin" / "python")
        pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        if self.args.wheels:
            pip += ["--no-index", "--find-links", str(self.args.wheels)]
        status, text = self.child([*pip, "-e", ".[gpu,test]"], timeout=budget, log="setup.log")
        if status != 0:
            raise RuntimeError(f"pip exited {status}: {text.strip().splitlines()[-1:]}")
        self.python = py
        step.detail = f"{py}"

    def cuda_step(self, step: Step, budget: float) -> None:
        self.info = self.probe(CUDA_PROBE, timeout=min(budget, 120), log="cuda.log")
        step.data = self.info
        missing = [m for m, v in self.info["modules"].items() if v is None and m in REQUIRED_MODULES]
        if missing:
            raise RuntimeError(
                f"missing {', '.join(missing)} for {self.info['python']}: run `make gpu-deps` on a "
                "machine with PyPI and bring .gpu-deps along"
            )
        if not self.cuda:
            step.status = "dry run"
            step.detail = f"no CUDA in torch {self.info['torch']}: every step below runs on the CPU"
            return
        step.detail = (
            f"{self.info['device_name']} (sm {self.info['capability']}), torch {self.info['torch']}, "
            f"CUDA {self.info['torch_cuda']}, {self.info['device_count']} device(s); "
            f"vLLM {'present' if self.info['modules'].get('vllm') else 'absent'}"
        )

    def nvml(self, step: Step, budget: float) -> None:
        view = self.probe(NVML_PROBE, timeout=min(budget, 60), log="nvml.log")
        step.data = view
        if view.get("error"):
            step.status = "skipped" if not view.get("pci_gpus") else "failed"
            step.detail = (
                f"NVML unusable: {view['error']}; NVIDIA GPUs on the PCI bus: {view.get('pci_gpus')}"
            )
            return
        cc = view.get("cc") or {}
        gpus = ", ".join(f"{g['name']} ({g['arch']})" for g in view.get("gpus", []))
        step.detail = (
            f"driver {view.get('driver')}; {gpus}; CC feature {'on' if cc.get('cc_feature') else 'off'}, "
            f"devtools {'on' if cc.get('dev_tools_mode') else 'off'}, multi-GPU {cc.get('multi_gpu_mode')}, "
            f"ready {cc.get('gpus_ready')}; GPUs on the PCI bus {view.get('pci_gpus')}, "
            f"in NVML {view.get('nvml_gpus')}; attestation report call: {view.get('report_call', '-')}"
        )

    def gate(self, step: Step, budget: float) -> None:
        outcome = self.probe(GATE_PROBE, timeout=min(budget, 120), log="gate.log")
        step.data = outcome
        step.detail = outcome["detail"]
        step.status = outcome["status"]

    def tests(self, step: Step, budget: float) -> None:
        argv = [self.python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *TEST_FILES]
        status, text = self.child(argv, timeout=budget, log="tests.log")
        summary = next(
            (line for line in reversed(text.splitlines()) if " in " in line and "=" not in line[:1]), ""
        )
        summary = summary.strip("= ").strip() or (text.strip().splitlines() or ["no output"])[-1]
        skipped_cuda = text.count("needs CUDA") + text.count("needs an NVIDIA GPU")
        step.data = {"summary": summary, "cuda_skips": skipped_cuda}
        step.detail = summary + (f" ({skipped_cuda} skipped for want of a GPU)" if skipped_cuda else "")
        if status != 0:
            step.status = "failed"

    def bench(self, step: Step, budget: float) -> None:
        if self.cuda:
            sizing = ["--size-gib", str(self.args.bench_gib), "--dir", str(REPO / ".bench" / "gpu-check")]
            cases = BENCH_CASES
        else:
            sizing = ["--size-gib", "0.25", "--dir", str(REPO / ".bench" / "gpu-check-dry-run")]
            cases = tuple(c for c in BENCH_CASES if not c.startswith("h2d") and c != "enclave-serve-pageable")
        argv = [
            self.python, "bench/load.py", "--device", self.device, "--json", "--repeat", "1",
            "--cases", ",".join(cases), "--budget-s", str(int(budget - 10)),
            "--case-timeout-s", str(int(max(30, budget / 3))), *sizing,
        ]  # fmt: skip
        status, text = self.child(argv, timeout=budget, log="bench.log")
        rows = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        (self.out / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        step.data = {"rows": rows}
        by = {r["name"]: r for r in rows}
        failed = [
            line.split()[0] for line in text.splitlines() if line.endswith(" failed:") or " skipped:" in line
        ]
        if status != 0 or "enclave-serve" not in by:
            raise RuntimeError(f"bench exited {status}; not measured: {', '.join(failed) or 'see bench.log'}")
        ours = by["enclave-serve"]
        step.detail = (
            f"enclave-serve {ours['gbps']:.2f} GB/s = {ours.get('vs_target') or 0:.2f} x "
            f"min(AES-GCM bound, pinned H2D bound); {len(rows)}/{len(cases)} cases"
        )
        if failed:
            step.status = "failed"
            step.detail += f"; not measured: {', '.join(failed)}"

    def e2e(self, step: Step, budget: float) -> None:
        result = self.out / "e2e.json"
        argv = [self.python, "scripts/gpu_e2e.py", "--out", str(result), "--device", self.device]
        status, text = self.child(argv, timeout=budget, log="e2e.log")
        if not result.exists():
            raise RuntimeError(f"exited {status}: {(text.strip().splitlines() or ['no output'])[-1][:300]}")
        data = json.loads(result.read_text())
        step.data = data
        loads = "; ".join(
            f"{x['staging']}: {x['tensors']} tensors, bit-exact {x['bit_exact']}, "
            f"greedy equal {x['greedy_equal']}"
            for x in data["loads"]
        )
        canary = ", ".join(
            f"{label} {'=' if c['equal_to_cpu_float32'] else '!='} cpu float32"
            for label, c in data.get("canary", {}).items()
            if label != "cpu float32"
        )
        step.detail = f"{loads}; canary: {canary or 'not measured'}"
        if status != 0 or not data.get("ok"):
            step.status = "failed"
        elif not self.cuda:
            step.status = "dry run"

    def vllm_e2e(self, step: Step, budget: float) -> None:
        if not self.info.get("modules", {}).get("vllm"):
            step.status, step.detail = (
                "skipped",
                "vLLM is not installed here (the transformers e2e stands in)",
            )
            return
        if not self.cuda:
            step.status, step.detail = "skipped", "no CUDA (the CPU e2e runs in CI)"
            return
        self._vllm_e2e(step, budget)

    def _vllm_e2e(self, step: Step, budget: float) -> None:
        work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        procs: list[subprocess.Popen[bytes]] = []
        deadline = time.monotonic() + budget
        try:
            plain, served, key = work / "plain", work / "enc", work / "model.key"
            build = "from pathlib import Path; import sys; from runtime.demo_model import build_demo_model;"
            build += "build_demo_model(Path(sys.argv[1]))"
            self.child([self.python, "-c", build, str(plain)], timeout=120, log="vllm-build.log")
            es = [self.python, "-m", "runtime.cli"]
            self.child(
                [*es, "pack", str(plain), str(served), "--generate-key", str(key), "--key-id", KEY_ID],
                timeout=120,
                log="vllm-pack.log",
            )
            ports = (18431, 18432)
            stock = [
                self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(plain),
                "--port", str(ports[0]), "--served-model-name", "tiny", "--load-format", "safetensors",
                "--gpu-memory-utilization", "0.3", "--no-enable-prefix-caching", *VLLM_ARGS,
            ]  # fmt: skip
            enclave = [
                *es, "run", str(served), "--port", str(ports[1]), "--tee", "sample",
                "--allow-insecure-sample-tee", "--gpus", "auto", "--allow-insecure-gpu-cc-off",
                "--key-source", "file", "--key-file", str(key), "--allow-insecure-key-file", "--no-tls",
                "--private-dir", "/dev/shm", "--allow-insecure-shared-private-dir",
                "--exit-on-failure", "--", "--served-model-name", "tiny", "--gpu-memory-utilization", "0.3",
                *VLLM_ARGS,
            ]  # fmt: skip
            # The runtime refuses what its environment allowlist does not know (PYTHONPATH among
            # them): it gets a fixed environment, with the repository on its path through -m.
            served_env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "HOME": os.environ.get("HOME", "/root"),
                "LANG": "C.UTF-8",
                "HF_HUB_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1",
            }
            for name, argv, env in (("vllm-stock", stock, self.env), ("enclave-serve", enclave, served_env)):
                log = (self.out / f"e2e-{name}.log").open("w")
                proc = subprocess.Popen(
                    argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
                _LIVE.add(proc.pid)
                procs.append(proc)
            urls = [f"http://127.0.0.1:{p}" for p in ports]
            _wait(urls[0] + "/v1/models", procs[0], deadline - time.monotonic())
            _wait(urls[1] + "/readyz", procs[1], deadline - time.monotonic())
            results: list[dict[str, Any]] = []
            for prompt in PROMPTS:
                a, b = _greedy(urls[0], prompt), _greedy(urls[1], prompt)
                results.append({"prompt": prompt, "equal": a == b, "tokens": len(a)})
            boot = json.loads(urllib.request.urlopen(urls[1] + "/.well-known/enclave-serve/boot").read())
            stages = {s.get("stage"): s for s in boot.get("stages", [])}
            step.data = {"prompts": results, "load": stages.get("load"), "canary": stages.get("canary")}
            equal = sum(1 for r in results if r["equal"])
            step.detail = (
                f"{equal}/{len(results)} prompts x 24 greedy tokens equal; "
                f"load: {stages.get('load', {}).get('detail', '?')}; "
                f"canary: {stages.get('canary', {}).get('detail', '?')}"
            )
            if equal != len(results):
                step.status = "failed"
        finally:
            for p in procs:
                _kill_group(p.pid, signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                _LIVE.discard(p.pid)
            shutil.rmtree(work, ignore_errors=True)

    # -- report -----------------------------------------------------------------------------

    def report(self) -> int:
        summary = {
            "python": self.python,
            "cuda": self.cuda,
            "steps": [s.__dict__ for s in self.steps],
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print("\n| step | status | seconds | detail |\n|---|---|---|---|")
        for s in self.steps:
            print(f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.detail} |")
        bench = next((s for s in self.steps if s.name == "bench" and s.data.get("rows")), None)
        if bench is not None:
            print("\n| case | device | GB/s | peak RSS beyond model MiB | /bound | /target |")
            print("|---|---|---|---|---|---|")
            for r in bench.data["rows"]:
                ratios = " | ".join(f"{r[k]:.2f}" if r.get(k) else "-" for k in ("vs_bound", "vs_target"))
                print(
                    f"| {r['name']} | {r['device']} | {r['gbps']:.2f} | "
                    f"{r['peak_rss_beyond_model_mib']:.0f} | {ratios} |"
                )
        print(f"\nsummary: {self.out / 'summary.json'}")
        return 0 if all(s.status in ("passed", "skipped", "dry run") for s in self.steps) else 1


#: Modules the steps cannot run without (the rest are reported).
REQUIRED_MODULES = ("torch", "numpy", "safetensors", "cryptography", "rfc8785", "pytest", "transformers")

CUDA_PROBE = r"""
import importlib, json, platform, sys
mods = {}
for m in ("torch", "numpy", "safetensors", "transformers", "tokenizers", "pynvml", "cryptography",
          "cffi", "rfc8785", "pytest", "httpx", "vllm"):
    try:
        mod = importlib.import_module(m)
        mods[m] = str(getattr(mod, "__version__", "present"))
    except Exception as exc:
        mods[m] = None
import torch
ok = torch.cuda.is_available()
print(json.dumps({
    "python": sys.executable, "python_version": platform.python_version(), "modules": mods,
    "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": ok,
    "device_count": torch.cuda.device_count() if ok else 0,
    "device_name": torch.cuda.get_device_name(0) if ok else None,
    "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if ok else None,
}))
"""

NVML_PROBE = r"""
import json
from attest.tee.nvidia.pci import nvidia_pci_devices
pci = nvidia_pci_devices()
out = {"pci_gpus": sum(d.is_gpu for d in pci), "pci_switches": sum(d.is_switch for d in pci)}
try:
    import pynvml
    pynvml.nvmlInit()
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
else:
    try:
        from attest.tee.nvidia.attester import NvidiaAttester, NVML_DEVICE_ARCHITECTURES
        out["driver"] = str(pynvml.nvmlSystemGetDriverVersion())
        out["nvml_gpus"] = int(pynvml.nvmlDeviceGetCount())
        gpus = []
        for i in range(out["nvml_gpus"]):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            arch = int(pynvml.nvmlDeviceGetArchitecture(h))
            gpus.append({"name": str(pynvml.nvmlDeviceGetName(h)), "uuid": str(pynvml.nvmlDeviceGetUUID(h)),
                         "arch": NVML_DEVICE_ARCHITECTURES.get(arch, f"UNKNOWN({arch})"),
                         "pci": str(pynvml.nvmlDeviceGetPciInfo(h).busId)})
        out["gpus"] = gpus
        try:
            out["cc"] = NvidiaAttester._cc_state(pynvml).to_json()
        except Exception as exc:
            out["cc_error"] = f"{type(exc).__name__}: {exc}"
        try:
            h0 = pynvml.nvmlDeviceGetHandleByIndex(0)
            pynvml.nvmlDeviceGetConfComputeGpuAttestationReport(h0, b"\0" * 32)
            out["report_call"] = "report returned"
        except Exception as exc:
            out["report_call"] = f"{type(exc).__name__}: {exc}"
    finally:
        pynvml.nvmlShutdown()
print(json.dumps(out, default=str))
"""

GATE_PROBE = r"""
import json
from foundation.errors import Error
from attest.tee.select import detect_devices, nvidia_gpus_present
from attest.tee.nvidia.attester import NvidiaAttester
out = {"gpus_present": nvidia_gpus_present()}
if not out["gpus_present"]:
    out.update(status="skipped", detail="no NVIDIA GPU on the PCI bus or in NVML")
else:
    attester = NvidiaAttester(set_ready=False)
    try:
        state = attester.cc_state()
        out["cc_enabled"] = state.enabled
    except Error as exc:
        state = None
        out["cc_error"] = str(exc)
    try:
        gate = attester.gate()
        out["gate"] = {"devices": gate.devices, "steps": gate.steps, "facts": gate.facts}
        ok = state is not None and state.enabled
        out.update(status="passed" if ok else "failed",
                   detail=f"gate passed: {gate.devices} GPU(s) verified locally in {gate.steps} steps"
                   + ("" if ok else " although CC is not reported on"))
    except Error as exc:
        refused_for_cc = "confidential computing is off" in str(exc)
        out["refusal"] = f"{type(exc).__name__}: {exc}"
        unattested = detect_devices(gpus="auto", allow_gpu_cc_off=True) == [] if refused_for_cc else None
        out["allow_cc_off_unattested"] = unattested
        good = state is not None and not state.enabled and refused_for_cc and unattested
        out.update(status="passed" if good else "failed",
                   detail=f"refused: {type(exc).__name__}: {str(exc)[:160]}"
                   + ("; --allow-insecure-gpu-cc-off leaves the GPUs unattested" if unattested else ""))
print(json.dumps(out, default=str))
"""


def child_env() -> dict[str, str]:
    """The children's environment: the repository, and ``.gpu-deps`` when it fits this Python."""
    env = dict(os.environ)
    paths = [str(REPO)]
    tag = f"cpython-{sys.version_info.major}{sys.version_info.minor}"
    if GPU_DEPS.is_dir() and any(GPU_DEPS.glob(f"*{tag}*.so")):
        paths.insert(0, str(GPU_DEPS))
    existing = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in paths]
    env["PYTHONPATH"] = os.pathsep.join([*paths, *existing])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _wait(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise subprocess.TimeoutExpired(url, timeout)


def _greedy(base: str, prompt: str) -> list[str]:
    body = json.dumps(
        {
            "model": "tiny",
            "prompt": prompt,
            "max_tokens": 24,
            "temperature": 0,
            "logprobs": 1,
            "return_tokens_as_token_ids": True,
            "ignore_eos": True,
        }
    ).encode()
    req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        tokens: list[str] = json.loads(r.read())["choices"][0]["logprobs"]["tokens"]
    return tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / ".gpu-check"))
    p.add_argument("--python", default=sys.executable, help="the Python the steps run with")
    p.add_argument("--no-setup", action="store_true", help="use --python as it is (the default)")
    p.add_argument("--setup", action="store_true", help="build .gpu-venv with pip first (needs a network)")
    p.add_argument("--wheels", type=Path, help="with --setup: install from this wheelhouse only")
    p.add_argument("--base-python", default=sys.executable, help="with --setup: the venv's Python")
    p.add_argument("--budget-s", type=float, default=330.0, help="time for every step together")
    p.add_argument("--bench-gib", type=float, default=2.0, help="the bench model's size on CUDA")
    args = p.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))  # atexit kills the children
    check = Check(args)
    setup = args.setup  # --no-setup: the default, kept for the documented command line
    if setup and check.run("setup", check.setup, share=0.6).status != "passed":
        return check.report()
    cuda = check.run("cuda", check.cuda_step, share=0.2)
    if cuda.status == "failed":
        return check.report()
    check.run("nvml", check.nvml, share=0.1)
    check.run("gate", check.gate, share=0.2)
    check.run("tests", check.tests, share=0.3)
    check.run("bench", check.bench, share=0.55)
    check.run("e2e", check.e2e, share=0.7)
    check.run("vllm-e2e", check.vllm_e2e, share=1.0)
    return check.report()


if __name__ == "__main__":
    sys.exit(main())
