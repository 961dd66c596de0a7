"""Benchmark serving side by side: stock vLLM on the plaintext model, enclave-serve on the encrypted one.

    python bench/serve.py                          # 250M random-weight Llama, 4 clients, 2 rounds of 20 s
    python bench/serve.py --model tiny --duration 5 --rounds 1 --clients 2   # a quick smoke
    python bench/serve.py --json                   # one JSON object per line

Each round boots one system at a time on this machine (never both: they would share the cores),
waits until it is ready, sends one warm-up request, then runs ``--clients`` concurrent streaming
clients (the ``openai`` SDK's ``AsyncOpenAI``, ``completions.create(stream=True)``, greedy,
``ignore_eos`` so every request generates ``--max-tokens``) for ``--duration`` seconds, and stops
it (SIGTERM to its process group, SIGKILL after a timeout). The order alternates across rounds
(plain, enclave, enclave, plain, ...) so that drift hits both alike.

* stock vLLM: ``python -m vllm.entrypoints.openai.api_server --model PLAIN_DIR``, plain HTTP unless
  ``--plain-tls`` (then a self-signed certificate through ``--ssl-keyfile/--ssl-certfile``).
* enclave-serve: ``enclave-serve run ENCRYPTED_DIR --tee sample --gpus none`` with the key released
  by a development KBS (``enclave-serve kbs-dev``, sample evidence: INSECURE, as scripts/demo.sh),
  over HTTPS with its in-enclave self-signed certificate. TLS is part of enclave-serve's real cost,
  so by default it is measured against stock vLLM over plain HTTP; ``--plain-tls`` compares TLS
  with TLS instead.

Both get the same vLLM options (``--enforce-eager --max-model-len L --max-num-seqs CLIENTS
--dtype bfloat16 --served-model-name bench``, L = 512 for tiny, 1024 for 250m) and the same small
environment (``VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1``, not the caller's environment).

Figures per system:

* ``tok_s``: output tokens (the stream's ``usage``) over the measurement window. Clients start
  requests until ``--duration`` has passed and let those in flight finish; the window runs from
  the start of the load to the last completion. Median over rounds.
* ``ttft_p50_s`` / ``ttft_p99_s``: time from sending a request to its first chunk carrying a
  choice. Percentiles over every request of every round (pooled).
* ``boot_s``: process start until ready (stock vLLM: ``GET /health`` 200 and ``/v1/models``
  answers; enclave-serve: ``GET /readyz`` 200, which includes attestation, key release and
  decryption). Median over rounds.
* ``errors``: failed requests (exceptions, empty streams), summed over rounds.

Attestation (enclave-serve rounds, after the load): ``--attest-requests`` requests per kind, in
bursts of ``--attest-concurrency`` simultaneous requests, the kinds taking turns burst by burst
(in every order in rotation: drift and each burst's aftermath hit them alike), one
``httpx.AsyncClient`` (one
connection, opened before timing) per simulated client, each from its own loopback address
(127.0.0.10, 127.0.0.11, ...: distinct verifiers). "fresh" asks
``/.well-known/enclave-serve/attestation?nonce=<64 hex>`` with a new random nonce per request
(the document must answer that nonce); "cached" asks it without a nonce. The server rate-limits
fresh documents per client address (burst 32, 8/s): 429 answers are counted (``rate_limited``)
and left out of the latencies, never retried. Latencies are p50/p99
in ms over the 200 answers of every round (pooled); a kind without any 200 reports null. "floor"
sends ``GET /livez`` the same way: what the harness, TLS and the server's event loop cost alone
at that concurrency (every simulated client shares the bench's one Python event loop). Cached and
floor are also sent one at a time (``*_serial_p50_ms``): the latency without any queueing.

Targets (printed with whether each is met): throughput >= 0.98x stock vLLM, TTFT p50 <= 1.05x
(``--ttft-target``; 1.02x on a quiet machine), boot->ready <= 1.10x; attestation at
``--attest-concurrency`` clients: fresh p99 <= 1.5x and cached p99 <= 1.0x the floor's p99, or,
with ``--quote-delay S`` (every sample-TEE collection slowed to S seconds through
``bench/quote_delay.py``, a wrapper around the CLI: a TDX quote takes about 1 s), fresh p99 <=
1.3 S. The one-at-a-time figures are the 1-client ones.

A benchmark, not a test. Models are built once under ``--dir`` and reused: ``tiny`` is
``enclave-serve demo-model``; ``250m`` a random-weight Llama (~244M parameters, bf16, head_dim 64)
with the demo model's tokenizer; each is encrypted with ``enclave-serve pack --generate-key``
(again with ``--repack``, e.g. after a change to the packer).
Server logs go to ``--dir/logs`` (removed after a successful run unless ``--keep-logs``; kept, and
named, when something fails).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the virtualenv's bin (not resolved: the venv's python is a link)

KEY_ID = "kbs:///enclave-serve/model-key/bench"
RESOURCE = "enclave-serve/model-key/bench"
SERVED = "bench"
HOST = "127.0.0.1"
PLAIN, ENCLAVE = "plain-vllm", "enclave-serve"
ATTESTATION_PATH = "/.well-known/enclave-serve/attestation"
#: Attestation measurements; "floor" is ``GET /livez`` the same way: harness, TLS and server loop.
ATTEST_KINDS = ("fresh", "cached", "floor")
#: Also measured one request at a time (``--attest-concurrency`` of them; fresh would hit the limit).
SERIAL_KINDS = ("fresh", "cached", "floor")

#: max_model_len per model (the tiny demo model has 512 positions).
MAX_MODEL_LEN = {"tiny": 512, "250m": 1024}
#: The 250m model: hidden 1024, 16 layers, 16 heads (head_dim 64), 4 KV heads, MLP 4096.
BIG = {"hidden_size": 1024, "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 4}
BIG_INTERMEDIATE = 4096
#: Files of the demo model that are its tokenizer (copied into the 250m model).
NOT_TOKENIZER = {"config.json", "generation_config.json", "model.safetensors", "enclave-serve-demo.json"}

TARGET_TOK_S = 0.98  # enclave/plain, at least
TARGET_BOOT = 1.10  # enclave/plain, at most
#: Fresh and cached p99 over the floor's p99 (/livez, same concurrency, same run), at no quote delay.
TARGET_FRESH_FLOOR = 1.5
TARGET_CACHED_FLOOR = 1.0
#: Fresh p99 over the quote delay, with --quote-delay: one quote (and a little) per burst.
TARGET_FRESH_QUOTE = 1.3

PROMPTS = (
    "Confidential computing protects data in use by running code inside a hardware enclave.",
    "The enclave proves what it runs with attestation evidence signed by the hardware vendor.",
    "A key broker checks the evidence and releases the model key only to an approved enclave.",
    "Users verify the attestation document before they send any sensitive prompt to the server.",
    "The quick brown fox jumps over the lazy dog while the model answers questions politely.",
    "Hello, how are you today? I am fine, thank you. What is the capital of France? Paris.",
)


class BenchError(Exception):
    """A step of the benchmark failed (the message says which, with the log tail)."""


def note(message: str) -> None:
    """Progress, on stderr (stdout holds the results)."""
    print(message, file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) by linear interpolation, or None without values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# --- models ------------------------------------------------------------------------------------


def count_params(model_dir: Path) -> int:
    """Parameters in the safetensors files of ``model_dir`` (from their headers)."""
    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header: dict[str, Any] = json.loads(fh.read(size))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def build_250m(out: Path, tokenizer_from: Path) -> None:
    """Write the random-weight 250m Llama to ``out`` (run in a child: it imports torch)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = json.loads((tokenizer_from / "config.json").read_text())
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)
    try:
        config = LlamaConfig(
            vocab_size=tiny["vocab_size"],
            intermediate_size=BIG_INTERMEDIATE,
            max_position_embeddings=2048,
            bos_token_id=tiny["bos_token_id"],
            eos_token_id=tiny["eos_token_id"],
            pad_token_id=tiny["pad_token_id"],
            tie_word_embeddings=False,
            dtype="bfloat16",
            hidden_size=BIG["hidden_size"],
            num_hidden_layers=BIG["num_hidden_layers"],
            num_attention_heads=BIG["num_attention_heads"],
            num_key_value_heads=BIG["num_key_value_heads"],
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
        model.to(torch.bfloat16).save_pretrained(staging, safe_serialization=True)  # type: ignore[arg-type]
        for src in tokenizer_from.iterdir():
            if src.is_file() and src.name not in NOT_TOKENIZER:
                shutil.copy2(src, staging / src.name)
        params = count_params(staging)
        (staging / "bench-model.json").write_text(
            json.dumps({"builder": "bench/serve.py", "params": params, **BIG}, indent=2) + "\n"
        )
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@dataclass(frozen=True)
class Models:
    plain: Path
    encrypted: Path
    key: Path
    params: int


def _check(cmd: list[str], what: str) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise BenchError(f"{what} failed ({out.returncode}):\n{(out.stdout + out.stderr)[-3000:]}")


def build_models(root: Path, model: str, *, repack: bool = False) -> Models:
    """Build (once) the plaintext model and its encrypted form under ``root`` (``repack``: re-encrypt)."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)  # it holds the model key
    es = str(BIN / "enclave-serve")
    tiny = root / "tiny"
    if not (tiny / "config.json").exists():
        note(f"building the demo model in {tiny} ...")
        _check([es, "demo-model", str(tiny), "--force"], "enclave-serve demo-model")
    plain = tiny
    if model == "250m":
        plain = root / "250m"
        if not (plain / "bench-model.json").exists():
            note(f"building the 250m random-weight model in {plain} (a minute or two) ...")
            cmd = [sys.executable, __file__, "--build-250m", str(plain), "--tokenizer-from", str(tiny)]
            _check(cmd, "building the 250m model")
    encrypted, key = root / f"{model}-encrypted", root / f"{model}.key"
    source_mtime = max(p.stat().st_mtime for p in plain.iterdir())
    manifest = encrypted / "manifest.json"
    fresh = manifest.exists() and key.exists() and manifest.stat().st_mtime >= source_mtime
    if repack or not fresh:
        note(f"encrypting {plain} into {encrypted} ...")
        key.unlink(missing_ok=True)
        cmd = [es, "pack", str(plain), str(encrypted), "--key-id", KEY_ID, "--generate-key", str(key)]
        _check([*cmd, "--force", "--no-progress"], "enclave-serve pack")
    return Models(plain=plain, encrypted=encrypted, key=key, params=count_params(plain))


def self_signed_tls(root: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (stock vLLM's ``--plain-tls``): (key, cert)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key_path, cert_path = root / "plain-tls.key", root / "plain-tls.crt"
    if key_path.exists() and cert_path.exists():
        return key_path, cert_path
    key = ec.generate_private_key(ec.SECP256R1())  # as the enclave's own certificate
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]), False)
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


# --- processes ---------------------------------------------------------------------------------


def server_env(system: str, stock_workers: str = "spawn") -> dict[str, str]:
    """The environment of a server: a few fixed variables, like a pod spec (the same for both).

    enclave-serve always spawns vLLM's engine and worker processes (a fork would copy the
    runtime's memory, keys included, into them); stock vLLM gets the same start method unless
    ``stock_workers`` is ``default`` (vLLM's own choice, fork on this machine).
    """
    extra = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"} if system == PLAIN and stock_workers == "spawn" else {}
    return extra | {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        # enclave-serve forces these; stock vLLM gets them too, so neither phones home.
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Process:
    """A process the benchmark started, in its own process group, logging to ``log``."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    started: float
    log_file: IO[bytes] = field(repr=False)

    @classmethod
    def start(cls, name: str, cmd: list[str], log: Path, port: int, env: dict[str, str]) -> Process:
        for _ in range(50):  # a server stopped just before may still hold its port a moment
            if _port_free(port):
                break
            time.sleep(0.2)
        else:
            raise BenchError(f"port {port} is in use (another server?): pass another --port-base")
        log_file = log.open("wb")
        log_file.write(("$ " + " ".join(cmd) + "\n").encode())
        log_file.flush()
        started = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return cls(name=name, proc=proc, log=log, started=started, log_file=log_file)

    def failure(self, why: str) -> BenchError:
        return BenchError(f"{self.name}: {why}; log {self.log}, last lines:\n{_log_tail(self.log)}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``timeout`` seconds."""
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                note(f"{self.name} did not stop in {timeout:.0f} s: SIGKILL")
                self._signal(signal.SIGKILL)
                self.proc.wait(10)
        # Engine processes left behind in the group (the leader is gone): end them too.
        self._signal(signal.SIGKILL)
        self.log_file.close()

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)


def vllm_options(args: argparse.Namespace) -> list[str]:
    return [
        "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN[args.model]),
        "--max-num-seqs", str(args.clients), "--dtype", "bfloat16", "--served-model-name", SERVED,
    ]  # fmt: skip


def start_kbs(args: argparse.Namespace, models: Models, logs: Path) -> tuple[Process, str]:
    """The development KBS holding the model key (sample evidence: INSECURE)."""
    token = args.dir / "admin.token"
    if not token.exists():
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")
    port = args.port_base + 2
    cmd = [
        str(BIN / "enclave-serve"), "kbs-dev", "--host", HOST, "--port", str(port),
        "--admin-token-file", str(token), "--allow-insecure-sample-evidence",
        "--resource", f"{RESOURCE}={models.key}",
    ]  # fmt: skip
    kbs = Process.start("kbs-dev", cmd, logs / "kbs.log", port, server_env("kbs-dev"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if kbs.proc.poll() is not None:
            raise kbs.failure(f"exited with status {kbs.proc.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return kbs, f"http://{HOST}:{port}"
        except OSError:
            time.sleep(0.2)
    kbs.stop()
    raise kbs.failure("did not listen within 60 s")


def start_server(
    system: str, args: argparse.Namespace, models: Models, kbs_url: str, log: Path
) -> tuple[Process, str]:
    """Start ``system``; return it and its base URL."""
    if system == PLAIN:
        port = args.port_base
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(models.plain),
            "--host", HOST, "--port", str(port), *vllm_options(args),
            "--no-enable-prefix-caching",  # as the enclave runs by default: like for like
        ]  # fmt: skip
        scheme = "http"
        if args.plain_tls:
            key, cert = self_signed_tls(args.dir)
            cmd += ["--ssl-keyfile", str(key), "--ssl-certfile", str(cert)]
            scheme = "https"
    else:
        port = args.port_base + 1
        # --quote-delay: the same CLI through a wrapper that slows the sample attester (not a flag).
        launcher = [str(BIN / "enclave-serve")]
        if args.quote_delay > 0:
            launcher = [sys.executable, "-m", "bench.quote_delay", str(args.quote_delay)]
        cmd = [
            *launcher, "run", str(models.encrypted), "--host", HOST, "--port", str(port),
            "--tee", "sample", "--gpus", "none", "--allow-insecure-sample-tee", "--kbs-url", kbs_url,
            "--private-dir", "/dev/shm", "--allow-insecure-shared-private-dir", "--", *vllm_options(args),
        ]  # fmt: skip
        scheme = "https"
    env = server_env(system, args.stock_workers)
    return Process.start(system, cmd, log, port, env), f"{scheme}://{HOST}:{port}"


def wait_ready(server: Process, base_url: str, timeout: float) -> float:
    """Poll until ``server`` is ready; return seconds from its start."""
    import httpx

    deadline = server.started + timeout
    last = "no answer yet"
    with httpx.Client(base_url=base_url, verify=False, timeout=5.0) as client:
        while time.perf_counter() < deadline:
            if server.proc.poll() is not None:
                raise server.failure(f"exited with status {server.proc.returncode} before ready")
            try:
                if server.name == PLAIN:
                    health = client.get("/health")
                    last = f"/health {health.status_code}"
                    if health.status_code == 200:
                        models = client.get("/v1/models")
                        last = f"/v1/models {models.status_code}"
                        if models.status_code == 200 and models.json().get("data"):
                            return time.perf_counter() - server.started
                else:
                    ready = client.get("/readyz")
                    body = ready.json()
                    last = f"/readyz {ready.status_code} {body}"
                    if ready.status_code == 200 and body.get("ready") is True:
                        return time.perf_counter() - server.started
                    if body.get("status") == "failed":
                        reason = f"boot failed at stage {body.get('stage')}: {body.get('reason')}"
                        raise server.failure(reason)
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.2)
    raise server.failure(f"not ready within {timeout:.0f} s (last: {last})")


# --- load --------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    tokens: int = 0
    window_s: float = 0.0
    requests: int = 0
    errors: int = 0
    ttfts: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.window_s if self.window_s > 0 else 0.0


async def _one_request(client: Any, prompt: str, max_tokens: int) -> tuple[float, int]:
    """Send one streaming completion; return (TTFT seconds, output tokens)."""
    start = time.perf_counter()
    stream = await client.completions.create(
        model=SERVED,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    ttft: float | None = None
    chunks = 0
    usage: int | None = None
    async for chunk in stream:
        if chunk.choices:
            if ttft is None:
                ttft = time.perf_counter() - start
            chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    if ttft is None:
        raise BenchError("the stream carried no tokens")
    return ttft, usage if usage is not None else chunks


def _openai_client(base_url: str) -> tuple[Any, Any]:
    """An SDK client with its own connection pool (the SDK's default HTTP client, TLS unverified)."""
    from openai import AsyncOpenAI, DefaultAsyncHttpxClient

    http = DefaultAsyncHttpxClient(verify=False)
    client = AsyncOpenAI(
        base_url=f"{base_url}/v1", api_key="bench", http_client=http, max_retries=0, timeout=300.0
    )
    return client, http


async def warm_up(base_url: str, max_tokens: int) -> None:
    client, http = _openai_client(base_url)
    try:
        await _one_request(client, PROMPTS[0], max_tokens)
    finally:
        await http.aclose()


async def run_load(base_url: str, clients: int, duration: float, max_tokens: int) -> LoadResult:
    """``clients`` concurrent streaming clients, starting requests for ``duration`` seconds."""
    result = LoadResult()
    start = time.perf_counter()
    deadline = start + duration

    async def one_client(index: int) -> None:
        client, http = _openai_client(base_url)
        turn = index
        try:
            while time.perf_counter() < deadline:
                prompt = PROMPTS[turn % len(PROMPTS)]
                turn += clients
                result.requests += 1
                try:
                    ttft, tokens = await _one_request(client, prompt, max_tokens)
                except Exception as exc:  # any failure of a request is an error of the system
                    result.errors += 1
                    if len(result.error_samples) < 3:
                        result.error_samples.append(f"{type(exc).__name__}: {exc}"[:300])
                    await asyncio.sleep(0.1)
                else:
                    result.ttfts.append(ttft)
                    result.tokens += tokens
        finally:
            await http.aclose()

    await asyncio.gather(*(one_client(i) for i in range(clients)))
    result.window_s = time.perf_counter() - start
    return result


# --- attestation -------------------------------------------------------------------------------


@dataclass
class AttestResult:
    latencies_ms: list[float] = field(default_factory=list)
    rate_limited: int = 0
    errors: int = 0
    statuses: dict[str, int] = field(default_factory=dict)

    def add(self, status: str, ms: float) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status == "200":
            self.latencies_ms.append(ms)
        elif status == "429":
            self.rate_limited += 1
        else:
            self.errors += 1


async def _attest_one(client: Any, kind: str) -> tuple[str, float]:
    """One request of ``kind`` (fresh, cached, or floor: ``/livez``); return (outcome, ms)."""
    import httpx

    nonce = secrets.token_hex(32)
    fresh = kind == "fresh"
    params = {"nonce": nonce} if fresh else None
    start = time.perf_counter()
    try:
        response = await client.get("/livez" if kind == "floor" else ATTESTATION_PATH, params=params)
    except httpx.HTTPError as exc:
        return type(exc).__name__, (time.perf_counter() - start) * 1000
    ms = (time.perf_counter() - start) * 1000
    if response.status_code == 200 and fresh:
        try:
            claims = response.json()["claims"]
            # One nonce ("nonce"), or those of a batch sharing one collection ("nonces").
            answered = [claims["nonce"]] if "nonce" in claims else list(claims["nonces"])
        except (ValueError, KeyError, TypeError):
            return "bad-document", ms
        if nonce not in answered:
            return "wrong-nonce", ms
    return str(response.status_code), ms


def add_server_buckets(base_url: str, into: dict[str, dict[float, float]]) -> None:
    """Add the server's own attestation latency histogram (``/metrics``) to ``into[kind][le]``.

    Measured inside the server from the request's arrival at the handler to its answer: no
    client, TLS or queueing time. Each server process is new per round, so its counts are the
    bench's requests only.
    """
    import httpx

    pattern = re.compile(
        r'^enclave_serve_attestation_latency_seconds_bucket\{kind="([a-z-]+)",le="([^"]+)"\} (\S+)$'
    )
    try:
        text = httpx.get(f"{base_url}/metrics", verify=False, timeout=10.0).text
    except httpx.HTTPError:
        return
    for line in text.splitlines():
        match = pattern.match(line)
        if match:
            kind, le, count = match.group(1), float(match.group(2)), float(match.group(3))
            into.setdefault(kind, {})
            into[kind][le] = into[kind].get(le, 0.0) + count


def bucket_quantile(buckets: dict[float, float], q: float) -> float | None:
    """The upper bound (ms) of the histogram bucket holding quantile ``q`` (None when empty)."""
    if not buckets or not buckets.get(math.inf):
        return None
    total = buckets[math.inf]
    for le in sorted(buckets):
        if buckets[le] >= q * total:
            return None if le == math.inf else le * 1000
    return None


async def measure_attestation(
    base_url: str, concurrency: int, requests: int, into: dict[str, AttestResult]
) -> None:
    """``requests`` fresh, cached and floor (``/livez``) requests, in bursts of ``concurrency``.

    The kinds take turns burst by burst, in a rotating order; then each kind one request at a
    time, each on a connection just used (untimed).
    """
    import httpx

    # Each simulated client is its own verifier, on its own loopback address (127.0.0.10, ...):
    # the server's rate limit is per client address, as it would be for distinct verifiers.
    clients = [
        httpx.AsyncClient(
            base_url=base_url,
            timeout=30.0,
            transport=httpx.AsyncHTTPTransport(verify=False, local_address=f"127.0.0.{10 + i % 240}"),
            limits=httpx.Limits(max_connections=1),
        )
        for i in range(concurrency)
    ]
    try:
        await asyncio.gather(*(c.get("/livez") for c in clients))  # TLS handshakes, untimed
        # Bursts of each kind in turn, side by side, so that drift over the measurement (the
        # machine, the server warming up) hits every kind alike; the order rotates through every
        # permutation, so that no kind always follows another (a fresh burst's aftermath).
        orders = itertools.cycle(itertools.permutations(ATTEST_KINDS))
        left = requests
        while left > 0:
            burst = min(concurrency, left)
            for kind in next(orders):
                answers = await asyncio.gather(*(_attest_one(c, kind) for c in clients[:burst]))
                for status, ms in answers:
                    into[kind].add(status, ms)
            left -= burst
        for kind in SERIAL_KINDS:  # one at a time: the latency without queueing
            for i in range(concurrency):
                # Untimed: the connection may have idled past the server's keep-alive (5 s) while
                # the other clients took their turns (a second each, with a slow quote).
                await clients[i].get("/livez")
                status, ms = await _attest_one(clients[i], kind)
                into[f"{kind}-serial"].add(status, ms)
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))


# --- the run -----------------------------------------------------------------------------------


@dataclass
class SystemRuns:
    tok_s: list[float] = field(default_factory=list)
    boot_s: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    load_avg: list[float] = field(default_factory=list)
    tokens: int = 0
    requests: int = 0
    errors: int = 0


def one_round(
    system: str,
    round_no: int,
    args: argparse.Namespace,
    models: Models,
    kbs_url: str,
    logs: Path,
    runs: SystemRuns,
    attest: dict[str, AttestResult],
    server_buckets: dict[str, dict[float, float]],
) -> None:
    log = logs / f"r{round_no}-{system}.log"
    note(f"round {round_no}: starting {system} (log {log}) ...")
    server, base_url = start_server(system, args, models, kbs_url, log)
    try:
        boot = wait_ready(server, base_url, args.boot_timeout)
        note(f"  ready after {boot:.1f} s")
        if system == ENCLAVE:
            _save_boot_stages(base_url, logs / f"r{round_no}-{system}.boot.json")
        try:
            asyncio.run(warm_up(base_url, args.max_tokens))
        except Exception as exc:
            raise server.failure(f"the warm-up request failed: {type(exc).__name__}: {exc}") from exc
        load_avg = os.getloadavg()[0]  # other work on the machine shows here
        load = asyncio.run(run_load(base_url, args.clients, args.duration, args.max_tokens))
        p50 = percentile(load.ttfts, 0.5)
        note(
            f"  {load.requests} requests, {load.tokens} tokens in {load.window_s:.1f} s: "
            f"{load.tok_s:.1f} tok/s, TTFT p50 {_fmt(p50, '.3f')} s, {load.errors} errors"
        )
        for sample in load.error_samples:
            note(f"  error: {sample}")
        if system == ENCLAVE and args.attest_requests > 0:
            before = {k: dict(v.statuses) for k, v in attest.items()}
            asyncio.run(measure_attestation(base_url, args.attest_concurrency, args.attest_requests, attest))
            add_server_buckets(base_url, server_buckets)
            for kind, result in attest.items():
                now = {s: n - before[kind].get(s, 0) for s, n in result.statuses.items()}
                note(f"  attestation {kind}: answers {dict(sorted(now.items()))}")
        if server.proc.poll() is not None:
            raise server.failure(f"exited with status {server.proc.returncode} during the load")
    finally:
        server.stop()
    runs.boot_s.append(boot)
    runs.load_avg.append(load_avg)
    runs.tok_s.append(load.tok_s)
    runs.ttfts += load.ttfts
    runs.tokens += load.tokens
    runs.requests += load.requests
    runs.errors += load.errors


def _save_boot_stages(base_url: str, path: Path) -> None:
    import httpx

    try:
        body = httpx.get(f"{base_url}/.well-known/enclave-serve/boot", verify=False, timeout=5.0).json()
    except (httpx.HTTPError, ValueError):
        return
    path.write_text(json.dumps(body, indent=2) + "\n")
    stages = ", ".join(f"{s['stage']} {s['seconds']}" for s in body.get("stages", []) if s.get("seconds"))
    note(f"  boot stages (s): {stages}")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _met(value: float | None, limit: float, at_least: bool = False) -> bool | None:
    if value is None:
        return None
    return value >= limit if at_least else value <= limit


def summarize(
    args: argparse.Namespace,
    runs: dict[str, SystemRuns],
    attest: dict[str, AttestResult],
    server_buckets: dict[str, dict[float, float]],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The JSON records: one per system (enclave-serve's with ratios and targets), attestation."""
    systems: list[dict[str, Any]] = []
    for name in (PLAIN, ENCLAVE):
        r = runs[name]
        systems.append(
            {
                "name": name,
                "tok_s": statistics.median(r.tok_s) if r.tok_s else None,
                "ttft_p50_s": percentile(r.ttfts, 0.5),
                "ttft_p99_s": percentile(r.ttfts, 0.99),
                "boot_s": statistics.median(r.boot_s) if r.boot_s else None,
                "errors": r.errors,
                "requests": r.requests,
                "tokens": r.tokens,
                "rounds": len(r.tok_s),
                "tok_s_rounds": [round(v, 2) for v in r.tok_s],
                "boot_s_rounds": [round(v, 2) for v in r.boot_s],
                "load_avg_1m_rounds": [round(v, 2) for v in r.load_avg],
                "aggregate": "tok_s, boot_s: median of rounds; ttft: pooled requests; errors: sum",
                "transport": "https" if name == ENCLAVE or args.plain_tls else "http",
                "clients": args.clients,
                "max_tokens": args.max_tokens,
                "duration_s": args.duration,
                "model": args.model,
            }
        )
    plain, enclave = systems
    ratios = {
        "tok_s_ratio": _ratio(enclave["tok_s"], plain["tok_s"]),
        "ttft_p50_ratio": _ratio(enclave["ttft_p50_s"], plain["ttft_p50_s"]),
        "boot_ratio": _ratio(enclave["boot_s"], plain["boot_s"]),
    }
    enclave.update(ratios)
    enclave["tok_s_target_met"] = _met(ratios["tok_s_ratio"], TARGET_TOK_S, at_least=True)
    enclave["ttft_p50_target_met"] = _met(ratios["ttft_p50_ratio"], args.ttft_target)
    enclave["boot_target_met"] = _met(ratios["boot_ratio"], TARGET_BOOT)
    fresh, cached, floor = attest["fresh"], attest["cached"], attest["floor"]
    attestation = {
        "name": "attestation",
        "fresh_p99_ms": percentile(fresh.latencies_ms, 0.99),
        "cached_p99_ms": percentile(cached.latencies_ms, 0.99),
        "concurrency": args.attest_concurrency,
        "fresh_p50_ms": percentile(fresh.latencies_ms, 0.5),
        "cached_p50_ms": percentile(cached.latencies_ms, 0.5),
        "fresh_ok": len(fresh.latencies_ms),
        "cached_ok": len(cached.latencies_ms),
        "fresh_rate_limited": fresh.rate_limited,
        "cached_rate_limited": cached.rate_limited,
        "rate_limited": fresh.rate_limited + cached.rate_limited,
        "fresh_errors": fresh.errors,
        "cached_errors": cached.errors,
        "floor_p50_ms": percentile(floor.latencies_ms, 0.5),
        "floor_p99_ms": percentile(floor.latencies_ms, 0.99),
        "cached_serial_p50_ms": percentile(attest["cached-serial"].latencies_ms, 0.5),
        "fresh_serial_p50_ms": percentile(attest["fresh-serial"].latencies_ms, 0.5),
        "fresh_serial_p99_ms": percentile(attest["fresh-serial"].latencies_ms, 0.99),
        "quote_delay_s": args.quote_delay,
        "server_fresh_p99_ms": bucket_quantile(server_buckets.get("fresh", {}), 0.99),
        "server_cached_p99_ms": bucket_quantile(server_buckets.get("cached", {}), 0.99),
        "floor_serial_p50_ms": percentile(attest["floor-serial"].latencies_ms, 0.5),
        "floor_ok": len(floor.latencies_ms),
        "floor_errors": floor.errors + floor.rate_limited,
        "fresh_statuses": dict(sorted(fresh.statuses.items())),
        "cached_statuses": dict(sorted(cached.statuses.items())),
        "requests_per_kind_per_round": args.attest_requests,
        "rounds": len(runs[ENCLAVE].tok_s),
    }
    floor_p99 = attestation["floor_p99_ms"]
    attestation["fresh_floor_ratio"] = _ratio(attestation["fresh_p99_ms"], floor_p99)
    attestation["cached_floor_ratio"] = _ratio(attestation["cached_p99_ms"], floor_p99)
    if args.quote_delay > 0:
        attestation["fresh_target"] = f"p99<={TARGET_FRESH_QUOTE:g}x{args.quote_delay:g}s"
        limit = TARGET_FRESH_QUOTE * args.quote_delay * 1000
        attestation["fresh_target_met"] = _met(attestation["fresh_p99_ms"], limit)
    else:
        attestation["fresh_target"] = f"<={TARGET_FRESH_FLOOR:g}x floor"
        attestation["fresh_target_met"] = _met(attestation["fresh_floor_ratio"], TARGET_FRESH_FLOOR)
    attestation["cached_target"] = f"<={TARGET_CACHED_FLOOR:g}x floor"
    attestation["cached_target_met"] = _met(attestation["cached_floor_ratio"], TARGET_CACHED_FLOOR)
    return systems, attestation


def _yes(met: bool | None) -> str:
    return "n/a" if met is None else "yes" if met else "NO"


def render(args: argparse.Namespace, params: int, systems: list[dict[str, Any]], att: dict[str, Any]) -> str:
    plain, enc = systems
    plain_transport = "HTTPS (self-signed)" if args.plain_tls else "plain HTTP"
    loads = plain["load_avg_1m_rounds"] + enc["load_avg_1m_rounds"]
    lines = [
        f"model {args.model} ({params / 1e6:.1f}M params, bf16), {args.clients} streaming clients, "
        f"{args.duration:g} s x {len(enc['tok_s_rounds'])} round(s), max_tokens {args.max_tokens}, "
        f"CPU ({os.cpu_count()} cores)",
        f"stock vLLM over {plain_transport}; enclave-serve over HTTPS (sample TEE, dev KBS)",
        "tok/s and boot: median of rounds; TTFT: pooled over every request; 1-min load average "
        f"before the loads {min(loads):.1f}-{max(loads):.1f} (includes the boot just before)",
        "",
        f"{'':<16}{'plain-vllm':>12}{'enclave-serve':>15}{'enclave/plain':>15}{'target':>10}{'met':>6}",
    ]
    rows: list[tuple[str, str, float | None, float | None, float | None, str, bool | None]] = [
        ("tok/s", ".1f", plain["tok_s"], enc["tok_s"], enc["tok_s_ratio"], f">={TARGET_TOK_S}x",
         enc["tok_s_target_met"]),
        ("TTFT p50 s", ".3f", plain["ttft_p50_s"], enc["ttft_p50_s"], enc["ttft_p50_ratio"],
         f"<={args.ttft_target}x", enc["ttft_p50_target_met"]),
        ("TTFT p99 s", ".3f", plain["ttft_p99_s"], enc["ttft_p99_s"],
         _ratio(enc["ttft_p99_s"], plain["ttft_p99_s"]), "", None),
        ("boot->ready s", ".1f", plain["boot_s"], enc["boot_s"], enc["boot_ratio"], f"<={TARGET_BOOT}x",
         enc["boot_target_met"]),
    ]  # fmt: skip
    for label, spec, a, b, ratio, target, met in rows:
        lines.append(
            f"{label:<16}{_fmt(a, spec):>12}{_fmt(b, spec):>15}{_fmt(ratio, '.3f'):>15}{target:>10}"
            f"{_yes(met) if target else '':>6}"
        )
    lines.append(f"{'requests':<16}{plain['requests']:>12}{enc['requests']:>15}")
    lines.append(f"{'errors':<16}{plain['errors']:>12}{enc['errors']:>15}")
    lines.append(f"{'tok/s rounds':<16}{' '.join(map(str, plain['tok_s_rounds'])):>12}"
                 f"{' '.join(map(str, enc['tok_s_rounds'])):>15}")  # fmt: skip
    lines.append(f"{'boot s rounds':<16}{' '.join(map(str, plain['boot_s_rounds'])):>12}"
                 f"{' '.join(map(str, enc['boot_s_rounds'])):>15}")  # fmt: skip
    if not args.attest_requests:
        return "\n".join([*lines, "", "attestation: not measured (--attest-requests 0)"])
    lines += [
        "",
        f"attestation: {att['concurrency']} concurrent clients (one loopback address each), "
        f"{args.attest_requests} requests per kind per round, {att['rounds']} round(s), "
        f"quote delay {args.quote_delay:g} s",
        f"{'':<16}{'p50 ms':>9}{'p99 ms':>9}{'/floor':>8}{'200':>6}{'429':>6}{'errors':>8}"
        f"{'target':>18}{'met':>6}",
    ]
    for kind in ("fresh", "cached"):
        lines.append(
            f"{kind:<16}{_fmt(att[f'{kind}_p50_ms'], '.2f'):>9}{_fmt(att[f'{kind}_p99_ms'], '.2f'):>9}"
            f"{_fmt(att[f'{kind}_floor_ratio'], '.2f'):>8}"
            f"{att[f'{kind}_ok']:>6}{att[f'{kind}_rate_limited']:>6}{att[f'{kind}_errors']:>8}"
            f"{att[f'{kind}_target']:>18}{_yes(att[f'{kind}_target_met']):>6}"
        )
        others = {s: n for s, n in att[f"{kind}_statuses"].items() if s not in ("200", "429")}
        if others:
            lines.append(f"{'':<16}other answers: {others}")
    lines.append(
        f"{'floor (/livez)':<16}{_fmt(att['floor_p50_ms'], '.2f'):>9}{_fmt(att['floor_p99_ms'], '.2f'):>9}"
        f"{'':>8}{att['floor_ok']:>6}{'':>6}{att['floor_errors']:>8}"
    )
    lines.append(
        f"one at a time (1 client): fresh p50 {_fmt(att['fresh_serial_p50_ms'], '.2f')} ms, "
        f"p99 {_fmt(att['fresh_serial_p99_ms'], '.2f')} ms; p50 ms: "
        f"cached {_fmt(att['cached_serial_p50_ms'], '.2f')}, "
        f"floor {_fmt(att['floor_serial_p50_ms'], '.2f')}"
    )
    lines.append(
        "inside the server (handler, from /metrics, bucket upper bound), p99 ms: "
        f"fresh <= {_fmt(att['server_fresh_p99_ms'], 'g')}, "
        f"cached <= {_fmt(att['server_cached_p99_ms'], 'g')}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=4, help="concurrent streaming clients (default 4)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per round (default 20)")
    p.add_argument("--rounds", type=int, default=2, help="rounds, alternating the order (default 2)")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (default 64)")
    p.add_argument("--model", choices=sorted(MAX_MODEL_LEN), default="250m", help="default 250m")
    p.add_argument(
        "--dir",
        type=Path,
        default=REPO / ".bench" / "serve",
        help="models, key and logs (default .bench/serve)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument(
        "--port-base",
        type=int,
        default=18400,
        help="stock vLLM on it, enclave-serve +1, KBS +2 (default 18400)",
    )
    p.add_argument(
        "--repack", action="store_true", help="re-encrypt the model (after a change to the packer)"
    )
    p.add_argument("--keep-logs", action="store_true", help="keep --dir/logs after a successful run")
    p.add_argument("--plain-tls", action="store_true", help="serve stock vLLM over HTTPS too (self-signed)")
    p.add_argument(
        "--stock-workers",
        choices=["spawn", "default"],
        default="spawn",
        help="stock vLLM's worker start method: spawn, as enclave-serve always does (default), or "
        "vLLM's default (fork here): what enclave-serve's spawn costs at boot",
    )
    p.add_argument(
        "--attest-requests",
        type=int,
        default=640,
        help="attestation requests per kind per round (default 640: 20 bursts of 32, within each "
        "client's fresh-document burst of 32)",
    )
    p.add_argument(
        "--attest-concurrency", type=int, default=32, help="simultaneous attestation requests (default 32)"
    )
    p.add_argument(
        "--quote-delay",
        type=float,
        default=0.0,
        metavar="S",
        help="slow every sample-TEE collection of enclave-serve to S seconds (bench/quote_delay.py; "
        "a TDX quote takes about 1 s); default 0",
    )
    p.add_argument(
        "--ttft-target", type=float, default=1.05, help="TTFT p50 target, enclave/plain (default 1.05)"
    )
    p.add_argument(
        "--boot-timeout", type=float, default=600.0, help="seconds to wait for ready (default 600)"
    )
    p.add_argument("--build-250m", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--tokenizer-from", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.build_250m:  # child
        build_250m(args.build_250m, args.tokenizer_from)
        return 0
    if args.clients < 1 or args.rounds < 1 or args.duration <= 0 or args.max_tokens < 1:
        p.error("--clients, --rounds, --duration and --max-tokens must be positive")
    if args.attest_concurrency < 1 or args.attest_requests < 0 or args.quote_delay < 0:
        p.error("--attest-concurrency must be positive, --attest-requests and --quote-delay not negative")
    args.dir = args.dir.resolve()

    logs = args.dir / "logs"
    kbs: Process | None = None
    try:
        models = build_models(args.dir, args.model, repack=args.repack)
        note(f"model {args.model}: {models.params:,} parameters ({models.params / 1e6:.1f}M), {models.plain}")
        shutil.rmtree(logs, ignore_errors=True)
        logs.mkdir(parents=True)
        kbs, kbs_url = start_kbs(args, models, logs)
        runs = {PLAIN: SystemRuns(), ENCLAVE: SystemRuns()}
        attest = {kind: AttestResult() for kind in (*ATTEST_KINDS, *(f"{k}-serial" for k in SERIAL_KINDS))}
        server_buckets: dict[str, dict[float, float]] = {}
        for r in range(args.rounds):
            order = (PLAIN, ENCLAVE) if r % 2 == 0 else (ENCLAVE, PLAIN)
            for system in order:
                one_round(system, r + 1, args, models, kbs_url, logs, runs[system], attest, server_buckets)
    except BenchError as exc:
        note(f"FAILED: {exc}")
        return 1
    finally:
        if kbs is not None:
            kbs.stop()
    systems, attestation = summarize(args, runs, attest, server_buckets)
    if args.json:
        for record in (*systems, attestation):
            print(json.dumps(record))
    else:
        print(render(args, models.params, systems, attestation))
    if not args.keep_logs:
        shutil.rmtree(logs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
