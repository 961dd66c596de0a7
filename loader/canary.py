"""The canary: a reference generation recorded at pack time, replayed before ready.

``pack`` runs a fixed prompt through the *plaintext* model with fixed, non-default sampling
settings and records the prompt's token ids and the generated ones in the authenticated manifest.
Before the runtime becomes ready it runs the same generation through the engine it is about to
serve, and compares token ids: wrong or corrupted weights, a broken confidential-computing copy
path, stale pinned buffers or a vLLM bug that changes outputs fail the boot at stage ``canary``.

The settings are deterministic but not the default path: ``top_k=1`` with a temperature goes
through the sampler (not the greedy shortcut), a repetition penalty reads the per-request
output history (where stale per-request buffers show), and ``ignore_eos`` fixes the length.
``top_k=1`` makes the outcome the arg-max after the penalty, which the reference implementation
(Hugging Face ``transformers``, float32 on the CPU) computes the same way.

Limit: the reference is computed by another implementation than the served engine. A model
whose greedy choice is a near-tie somewhere in these tokens can differ between the two; the boot
then fails closed at ``canary`` and the provider repacks with ``--no-canary`` (the document then
claims ``not-recorded``) or another prompt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rfc8785

from attest.errors import ModelFormatError

__all__ = ["CANARY_PROMPT", "CANARY_SAMPLING", "CanaryReference", "compute_reference"]

CANARY_PROMPT = "enclave-serve canary: the quick brown fox jumps over the lazy dog, then counts to ten:"
#: vLLM ``SamplingParams`` names; the reference implementation maps them one to one.
CANARY_SAMPLING: Mapping[str, Any] = {
    "max_tokens": 16,
    "temperature": 0.7,
    "top_k": 1,
    "repetition_penalty": 1.3,
    "ignore_eos": True,
    "seed": 1234,
}
_MAX_TOKENS = 256


def _number(value: object) -> bool:
    return type(value) in (int, float)


def _sampling_ok(s: Mapping[str, Any]) -> bool:
    def count(value: object, low: int, high: int) -> bool:
        return type(value) is int and low <= value <= high

    return (
        count(s["max_tokens"], 1, _MAX_TOKENS)
        and _number(s["temperature"]) and 0 <= s["temperature"] <= 2
        and count(s["top_k"], 1, 1)  # top_k 1: the arg-max, whatever the temperature
        and _number(s["repetition_penalty"]) and 0 < s["repetition_penalty"] <= 10
        and type(s["ignore_eos"]) is bool
        and count(s["seed"], 0, 2**32 - 1)
    )  # fmt: skip


def _ids(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or len(value) > 4096:
        raise ModelFormatError(f"canary: {what} must be a non-empty list of token ids")
    if not all(type(v) is int and 0 <= v < 1 << 31 for v in value):
        raise ModelFormatError(f"canary: {what} must be token ids")
    return tuple(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class CanaryReference:
    """The prompt, the sampling settings and the tokens the plaintext model generated."""

    prompt: str
    prompt_token_ids: tuple[int, ...]
    sampling: Mapping[str, Any]
    token_ids: tuple[int, ...]
    reference: str

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "prompt_token_ids": list(self.prompt_token_ids),
            "sampling": dict(self.sampling),
            "token_ids": list(self.token_ids),
            "reference": self.reference,
        }

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the reference's canonical JSON (what the claim names)."""
        return hashlib.sha256(rfc8785.dumps(self.to_json())).hexdigest()

    @classmethod
    def from_json(cls, obj: object) -> CanaryReference:
        """Parse strictly. Raises :class:`ModelFormatError`."""
        keys = {"prompt", "prompt_token_ids", "sampling", "token_ids", "reference"}
        if not isinstance(obj, Mapping) or set(obj) != keys:
            raise ModelFormatError(f"canary: expected exactly the members {sorted(keys)}")
        sampling = obj["sampling"]
        if not isinstance(sampling, Mapping) or set(sampling) != set(CANARY_SAMPLING):
            raise ModelFormatError(f"canary: sampling must set exactly {sorted(CANARY_SAMPLING)}")
        if not _sampling_ok(sampling):
            raise ModelFormatError("canary: a sampling setting has the wrong type or range")
        token_ids = _ids(obj["token_ids"], "token_ids")
        if len(token_ids) != sampling["max_tokens"] or len(token_ids) > _MAX_TOKENS:
            raise ModelFormatError("canary: token_ids must hold max_tokens tokens")
        if not isinstance(obj["prompt"], str) or not isinstance(obj["reference"], str):
            raise ModelFormatError("canary: prompt and reference must be strings")
        return cls(
            prompt=obj["prompt"],
            prompt_token_ids=_ids(obj["prompt_token_ids"], "prompt_token_ids"),
            sampling=dict(sampling),
            token_ids=token_ids,
            reference=obj["reference"],
        )

    def mismatch(self, prompt_token_ids: list[int] | None, token_ids: list[int]) -> str | None:
        """Return why an engine's output differs from the reference, or None when equal."""
        if prompt_token_ids is not None and tuple(prompt_token_ids) != self.prompt_token_ids:
            return "the served tokenizer encodes the canary prompt differently from the packed one"
        if tuple(token_ids) == self.token_ids:
            return None
        first = next(
            (i for i, (a, b) in enumerate(zip(token_ids, self.token_ids, strict=False)) if a != b),
            min(len(token_ids), len(self.token_ids)),
        )
        return (
            f"the served engine generated different tokens from the packer's reference "
            f"(first difference at token {first} of {len(self.token_ids)})"
        )


def compute_reference(model_dir: Path, *, prompt: str = CANARY_PROMPT) -> CanaryReference:
    """Run the canary generation on the plaintext model in ``model_dir`` (CPU, float32).

    Uses Hugging Face ``transformers`` (installed with vLLM); needs memory for the model in
    float32.

    Raises:
        ModelFormatError: the model or its tokenizer cannot be loaded.
    """
    try:
        import torch
        import transformers
    except ImportError:
        raise ModelFormatError(
            "cannot compute the canary: this needs torch and transformers (installed with vLLM); "
            "pass --no-canary to pack without one"
        ) from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float32, local_files_only=True
        )
    except Exception as exc:  # transformers raises many kinds for a directory it cannot load
        raise ModelFormatError(
            f"cannot compute the canary: transformers cannot load {model_dir} ({type(exc).__name__}); "
            "pass --no-canary to pack without one"
        ) from None
    ids = list(tokenizer(prompt)["input_ids"])
    s = CANARY_SAMPLING
    with torch.inference_mode():
        torch.manual_seed(int(s["seed"]))
        out = model.generate(  # type: ignore[misc]
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=True,
            top_k=int(s["top_k"]),
            top_p=1.0,
            temperature=float(s["temperature"]),
            repetition_penalty=float(s["repetition_penalty"]),
            max_new_tokens=int(s["max_tokens"]),
            min_new_tokens=int(s["max_tokens"]),  # ignore_eos
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        )
    generated = [int(t) for t in out[0][len(ids) :]]
    return CanaryReference(
        prompt=prompt,
        prompt_token_ids=tuple(ids),
        sampling=dict(s),
        token_ids=tuple(generated),
        reference=f"transformers {transformers.__version__} float32 cpu",
    )
