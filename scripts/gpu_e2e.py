"""The CUDA end to end without vLLM: the encrypted tiny model decrypted into a model's GPU parameters.

    python scripts/gpu_e2e.py --out result.json [--device cuda|cpu]

1. Build the tiny demo model (random bf16 Llama, offline) and pack it (enclave-serve format,
   4 KiB chunks so every tensor spans several chunks and the staging ring cycles).
2. Load the plaintext model with ``transformers`` onto the device (the reference), and a second,
   zeroed instance of the same architecture.
3. Decrypt every tensor of the encrypted model through the decrypt engine
   (:class:`loader.lazy.LazyCheckpoint`, as the vLLM loader does) straight into the second
   instance's parameters on the device, once with pinned and once with pageable staging.
4. Compare every parameter bit for bit, and greedy tokens (3 prompts x 24 tokens) of both.
5. The canary across devices: compute the canary reference on the CPU in float32 (what models
   packed before ``--canary-device`` record), and on the device in bfloat16 and float32, and
   report which agree (exactness is what the boot's canary requires).

Writes one JSON object to ``--out``; exit status 0 when steps 3-4 agree (step 5 is a
measurement). Needs torch, transformers, tokenizers, safetensors and the project's own
dependencies (cryptography, rfc8785), not vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PROMPTS = ("The enclave proves", "Hello, how are you", "A key broker checks")
KEY_ID = "kbs:///enclave-serve/model-key/gpu-check"


def _bits(t: Any) -> Any:
    """The tensor's bytes (bit-exact, NaN-safe comparison)."""
    import torch

    return t.detach().contiguous().view(-1).view(torch.uint8)


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def _greedy(model: Any, tokenizer: Any, device: str) -> list[list[int]]:
    import torch

    out = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=24,
                min_new_tokens=24,
                pad_token_id=tokenizer.pad_token_id or 0,
            )
            out.append([int(t) for t in gen[0][ids.shape[1] :]])
    return out


def _decrypt_into(model: Any, enc: Path, key: Any, staging: str) -> dict[str, Any]:
    import torch

    from loader.lazy import LazyCheckpoint
    from loader.manifest import Manifest
    from loader.staging import StagingOptions

    params = dict(model.named_parameters())
    with torch.no_grad():
        for p in params.values():
            p.zero_()  # prove the write
    loaded: list[str] = []
    started = time.perf_counter()
    with LazyCheckpoint.open(
        enc,
        Manifest.load(enc),
        key,
        threads=4,
        staging=StagingOptions(mode=staging),  # type: ignore[arg-type]
    ) as checkpoint:
        with torch.no_grad():
            for name, lazy in checkpoint.tensors():
                params[name].copy_(lazy)
                loaded.append(name)
        checkpoint.synchronize()
        rings = {device: ring.pinned for device, ring in checkpoint.lanes.items()}
        materialized = checkpoint.materialized
        stats = checkpoint.stats.snapshot()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {
        "staging": staging,
        "tensors": len(loaded),
        "missing": sorted(set(params) - set(loaded)),
        "materialized": materialized,
        "rings_pinned": rings,
        "bytes": stats.bytes,
        "seconds": round(time.perf_counter() - started, 4),
    }


def run(device: str) -> dict[str, Any]:
    import torch
    import transformers

    from foundation.secret import SecretBytes
    from loader.canary import compute_reference
    from loader.packer import pack_model
    from runtime.demo_model import build_demo_model

    result: dict[str, Any] = {
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    with tempfile.TemporaryDirectory(prefix="gpu-e2e-") as tmp:
        work = Path(tmp)
        plain = build_demo_model(work / "plain")
        key = SecretBytes(os.urandom(32))
        pack_model(plain, work / "enc", key=key, key_id=KEY_ID, chunk_size=4096, threads=4)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(plain), local_files_only=True)
        reference = transformers.AutoModelForCausalLM.from_pretrained(
            str(plain), dtype=torch.bfloat16, local_files_only=True
        ).to(device)
        target = transformers.AutoModelForCausalLM.from_config(reference.config, dtype=torch.bfloat16).to(
            device
        )
        ref_params = dict(reference.named_parameters())
        expected = _greedy(reference, tokenizer, device)
        loads = []
        for staging in ("pinned", "pageable"):
            load = _decrypt_into(target, work / "enc", key, staging)
            got = dict(target.named_parameters())
            load["bit_exact"] = all(torch.equal(_bits(got[n]), _bits(r)) for n, r in ref_params.items())
            load["greedy_equal"] = _greedy(target, tokenizer, device) == expected
            loads.append(load)
        result["loads"] = loads
        result["prompts"] = len(PROMPTS)
        result["ok"] = all(
            x["bit_exact"] and x["greedy_equal"] and not x["missing"] and x["materialized"] == 0
            for x in loads
        )
        # The canary across devices: which references agree exactly with which.
        canaries: dict[str, list[int]] = {}
        for where, dtype in (("cpu", "float32"), (device, "bfloat16"), (device, "float32")):
            label = f"{where} {dtype}"
            if label in canaries:
                continue
            try:
                canaries[label] = list(compute_reference(plain, device=where, dtype=dtype).token_ids)
            except Exception as exc:  # a measurement: report, never fail the check on it
                result.setdefault("canary_errors", {})[label] = f"{type(exc).__name__}: {exc}"
        base = canaries.get("cpu float32")
        result["canary"] = {
            label: {
                "tokens": ids,
                "equal_to_cpu_float32": ids == base,
                "first_difference": _first_difference(ids, base or []),
            }
            for label, ids in canaries.items()
        }  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default=None, help="cuda when available, else cpu")
    args = p.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = run(device)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "canary"}))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
