"""The canary: a reference generation recorded at pack time, replayed before ready.

``pack`` runs a fixed prompt through the *plaintext* model with fixed, non-default sampling
settings and records the prompt's token ids and the generated ones in the authenticated manifest.
Before the runtime becomes ready it runs the same generation through the engine it is about to
serve, and compares token ids: wrong or corrupted weights, a broken confidential-computing copy
path, stale pinned buffers or a vLLM bug that changes outputs fail the boot at stage ``canary``.

The canary goes the way requests go. When the model has a chat template, ``pack`` renders the
prompt as one user message with the model's own template (``render = "chat"``: the recorded
prompt ids are the rendered conversation) and the runtime replays it through the served OpenAI
chat endpoint, in process, before ready: a chat template or template arguments that differ from
the packed ones change the rendered ids and fail the boot. Models packed before this, or without
a chat template, keep the plain-prompt canary (``render`` absent), replayed on the engine.

The settings are deterministic but not the default path: ``top_k=1`` with a temperature goes
through the sampler (not the greedy shortcut), a repetition penalty reads the per-request
output history (where stale per-request buffers show), and ``ignore_eos`` fixes the length.
``top_k=1`` makes the outcome the arg-max after the penalty, which the reference implementation
(vLLM, or Hugging Face ``transformers`` where vLLM is not installed) computes the same way.

Exactness across implementations, devices and dtypes: measured on this project's CPU with the
tiny demo model (bfloat16 weights), ``transformers`` in float32 reproduces vLLM in float32
exactly, but ``transformers`` in bfloat16 differs from vLLM in bfloat16 at the third token, and
either float32 reference differs from vLLM in bfloat16 by the fifth. The comparison stays exact;
instead ``pack`` computes the reference with vLLM itself where it is installed (``engine``
``vllm``: the served implementation, one sequence, eager), in the dtype it will serve (the
model's own unless ``--canary-dtype``: ``transformers`` too loads the model's own, bfloat16 for
most models, half the memory of float32), on its device family, and the reference records all
three (``reference``, ``device``, ``dtype``). A mismatch on another device family says to repack
on one. References packed before these fields existed were computed with ``transformers`` on the
CPU in float32 and parse as such. Tensor-parallel sizes other than the packer's may change the
last bits too; a mismatch then fails closed at ``canary`` like any other, and the provider
repacks where it serves, or with ``--no-canary`` (the document then claims ``not-recorded``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rfc8785

from foundation.errors import ModelFormatError

__all__ = [
    "CANARY_DEVICES",
    "CANARY_DTYPES",
    "CANARY_ENGINES",
    "CANARY_PROMPT",
    "CANARY_RENDERS",
    "CANARY_SAMPLING",
    "CanaryReference",
    "canary_dtype",
    "compute_reference",
    "default_canary_device",
    "vllm_available",
]

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
#: Device families a reference can be computed on (what the served engine runs on).
CANARY_DEVICES = ("cpu", "cuda")
#: Implementations a reference can be computed with.
CANARY_ENGINES = ("vllm", "transformers")
#: Dtypes a reference can be computed in (torch names).
CANARY_DTYPES = ("float32", "bfloat16", "float16")
#: How the prompt reaches the model: ``chat`` (the model's chat template, one user message).
CANARY_RENDERS = ("chat",)
#: Where references recorded before ``device``/``dtype`` existed were computed.
_LEGACY_DEVICE, _LEGACY_DTYPE = "cpu", "float32"


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
    """The prompt, the sampling settings and the tokens the plaintext model generated.

    ``device`` and ``dtype`` say where the reference was computed; None in references recorded
    before they existed (which were computed on the CPU in float32, and serialise unchanged so
    their digest stays the one already claimed).
    """

    prompt: str
    prompt_token_ids: tuple[int, ...]
    sampling: Mapping[str, Any]
    token_ids: tuple[int, ...]
    reference: str
    device: str | None = None
    dtype: str | None = None
    #: ``chat``: ``prompt`` is one user message rendered with the model's chat template, and
    #: ``prompt_token_ids`` the rendered conversation; None: ``prompt`` is the raw prompt.
    render: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt": self.prompt,
            "prompt_token_ids": list(self.prompt_token_ids),
            "sampling": dict(self.sampling),
            "token_ids": list(self.token_ids),
            "reference": self.reference,
        }
        if self.device is not None:
            out["device"] = self.device
        if self.dtype is not None:
            out["dtype"] = self.dtype
        if self.render is not None:
            out["render"] = self.render
        return out

    @property
    def messages(self) -> list[dict[str, str]]:
        """The chat request of a ``chat`` canary: one user message."""
        return [{"role": "user", "content": self.prompt}]

    @property
    def device_family(self) -> str:
        """The device family the reference was computed on (``cpu`` or ``cuda``)."""
        return self.device or _LEGACY_DEVICE

    @property
    def computed_in(self) -> str:
        """Where the reference was computed, for messages: ``cpu float32``."""
        return f"{self.device_family} {self.dtype or _LEGACY_DTYPE}"

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the reference's canonical JSON (what the claim names)."""
        return hashlib.sha256(rfc8785.dumps(self.to_json())).hexdigest()

    @classmethod
    def from_json(cls, obj: object) -> CanaryReference:
        """Parse strictly. Raises :class:`ModelFormatError`."""
        keys = {"prompt", "prompt_token_ids", "sampling", "token_ids", "reference"}
        optional = {"device", "dtype", "render"}
        if not isinstance(obj, Mapping) or not keys <= set(obj) or not set(obj) <= keys | optional:
            raise ModelFormatError(
                f"canary: expected the members {sorted(keys)} and optionally {sorted(optional)}"
            )
        if ("device" in obj) != ("dtype" in obj):
            raise ModelFormatError("canary: device and dtype go together")
        if "device" in obj and (obj["device"] not in CANARY_DEVICES or obj["dtype"] not in CANARY_DTYPES):
            raise ModelFormatError(
                f"canary: device must be one of {', '.join(CANARY_DEVICES)} and dtype one of "
                f"{', '.join(CANARY_DTYPES)}"
            )
        if "render" in obj and obj["render"] not in CANARY_RENDERS:
            raise ModelFormatError(f"canary: render must be one of {', '.join(CANARY_RENDERS)}")
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
            device=obj.get("device"),
            dtype=obj.get("dtype"),
            render=obj.get("render"),
        )

    def mismatch(
        self, prompt_token_ids: list[int] | None, token_ids: list[int], *, served_on: str | None = None
    ) -> str | None:
        """Return why an engine's output differs from the reference, or None when equal.

        ``served_on`` is the serving engine's device family; when it is not the reference's, the
        reason says so (exact results do not carry across device families).
        """
        if prompt_token_ids is not None and tuple(prompt_token_ids) != self.prompt_token_ids:
            if self.render == "chat":
                return (
                    "the served chat rendering of the canary differs from the packed one (another chat "
                    "template, template arguments or tokenizer than the model's)"
                )
            return "the served tokenizer encodes the canary prompt differently from the packed one"
        if tuple(token_ids) == self.token_ids:
            return None
        first = next(
            (i for i, (a, b) in enumerate(zip(token_ids, self.token_ids, strict=False)) if a != b),
            min(len(token_ids), len(self.token_ids)),
        )
        why = (
            f"the served engine generated different tokens from the packer's reference "
            f"(first difference at token {first} of {len(self.token_ids)})"
        )
        if served_on is not None and served_on != self.device_family:
            why += (
                f"; the reference was computed on {self.computed_in} and this engine runs on "
                f"{served_on}: repack with --canary-device {served_on} on a machine with one"
            )
        return why


def default_canary_device() -> str:
    """Return ``cuda`` when this process sees a CUDA GPU (where the model is likely served), else ``cpu``."""
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _model_dtype(model_dir: Path) -> str:
    """The dtype the model's config names (what vLLM serves with ``--dtype auto``), else float32."""
    import json

    try:
        config = json.loads((model_dir / "config.json").read_bytes())
    except (OSError, ValueError):
        return "float32"
    if not isinstance(config, dict):
        return "float32"
    text = config.get("text_config")
    for holder in (config, text if isinstance(text, dict) else {}):
        value = holder.get("dtype") or holder.get("torch_dtype")
        if value is not None:
            return value if value in CANARY_DTYPES else "float32"
    return "float32"


def canary_dtype(model_dir: Path, dtype: str | None = None) -> str:
    """Return the dtype the canary loads the model in: ``dtype``, else the model's own.

    The model's own is the one its ``config.json`` names (``bfloat16`` for most models: what vLLM
    serves with ``--dtype auto``, half the memory of float32), float32 where it names none.

    Raises:
        ModelFormatError: ``dtype`` is not one of :data:`CANARY_DTYPES`.
    """
    dtype = dtype or _model_dtype(model_dir)
    if dtype not in CANARY_DTYPES:
        raise ModelFormatError(f"canary: dtype must be one of {', '.join(CANARY_DTYPES)}")
    return dtype


def _cannot_run(engine: str, model_dir: Path, exc: BaseException) -> ModelFormatError:
    """The error for an engine that cannot run a model that passed pack's checks, naming the cause."""
    cause = (str(exc).strip().splitlines() or [""])[0][:300]
    return ModelFormatError(
        f"cannot compute the canary: {engine} cannot run {model_dir} ({type(exc).__name__}"
        + (f": {cause}" if cause else "")
        + "): what it cannot load, the served engine cannot either: fix the model directory, or "
        "pack without a reference (--no-canary: the enclave then claims canary not-recorded)"
    )


def vllm_available() -> bool:
    """Whether vLLM can be imported here (the reference engine ``pack`` prefers)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


#: The canary's prompt and tokens fit in far fewer positions than this.
_CANARY_POSITIONS = 1024


def _one_sequence(model_dir: Path, dtype: str) -> tuple[int, int]:
    """Positions and KV-cache bytes for one canary sequence (not the engine's default share of memory)."""
    import json

    try:
        config = json.loads((model_dir / "config.json").read_bytes())
        config = config.get("text_config", config)
        positions = int(config.get("max_position_embeddings") or _CANARY_POSITIONS)
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (OSError, ValueError, TypeError, KeyError, ZeroDivisionError, AttributeError):
        return _CANARY_POSITIONS, 1 << 30  # unknown shape: a generous cache
    length = min(positions, _CANARY_POSITIONS)
    per_token = 2 * layers * kv_heads * head_dim * (4 if dtype == "float32" else 2)
    return length, 2 * length * per_token + (64 << 20)


def _vllm_reference(model_dir: Path, *, prompt: str, dtype: str, chat: bool | None) -> CanaryReference:
    """The canary through vLLM itself, offline: the implementation the runtime will serve with.

    One sequence, eager mode, the given dtype; the chat prompt is rendered by vLLM's own chat
    renderer (the served chat route's), the plain one tokenized by vLLM's tokenizer.
    """
    try:
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.platforms import current_platform
    except ImportError:
        raise ModelFormatError("cannot compute the canary with vLLM: it is not installed here") from None

    length, cache_bytes = _one_sequence(model_dir, dtype)
    try:
        llm = LLM(
            model=str(model_dir), dtype=dtype, enforce_eager=True, max_num_seqs=1,  # type: ignore[arg-type]
            max_model_len=length, kv_cache_memory_bytes=cache_bytes, seed=0, load_format="safetensors",
        )  # fmt: skip
        tokenizer = llm.get_tokenizer()
        if chat is None:
            chat = bool(getattr(tokenizer, "chat_template", None))
        params = SamplingParams(**CANARY_SAMPLING)
        messages: Any = [{"role": "user", "content": prompt}]
        outputs = (
            llm.chat(messages, params, use_tqdm=False)
            if chat
            else llm.generate(prompt, params, use_tqdm=False)
        )
    except Exception as exc:  # vLLM raises many kinds for a model it cannot load
        raise _cannot_run("vLLM", model_dir, exc) from None
    (output,) = outputs
    del llm  # the engine's processes and memory go before packing starts
    import gc

    gc.collect()
    device = str(current_platform.device_type or "cpu")
    if device not in CANARY_DEVICES:
        raise ModelFormatError(f"canary: vLLM runs on {device}, which canaries do not know")
    return CanaryReference(
        prompt=prompt,
        prompt_token_ids=tuple(int(t) for t in output.prompt_token_ids or ()),
        sampling=dict(CANARY_SAMPLING),
        token_ids=tuple(int(t) for t in output.outputs[0].token_ids),
        reference=f"vllm {vllm.__version__} {dtype} {device}",
        device=device,
        dtype=dtype,
        render="chat" if chat else None,
    )


def compute_reference(
    model_dir: Path,
    *,
    prompt: str = CANARY_PROMPT,
    device: str = "cpu",
    dtype: str | None = None,
    chat: bool | None = None,
    engine: str = "transformers",
) -> CanaryReference:
    """Run the canary generation on the plaintext model in ``model_dir``.

    ``engine`` is ``vllm`` (what ``pack`` uses where vLLM is installed: the served
    implementation, in the dtype it will serve, so the boot can reproduce the tokens exactly;
    ``device`` is then vLLM's own) or ``transformers`` (float32 on the CPU reproduces vLLM's
    float32 exactly, not its bfloat16). ``dtype`` defaults to the model's own
    (:func:`canary_dtype`: what vLLM serves by default). ``chat`` renders the prompt as one user
    message with the model's chat template (default: when the tokenizer has one). Needs memory
    for the model in that dtype on that device: parameters x 4 bytes in float32, x 2 in bfloat16.

    Raises:
        ModelFormatError: the model or its tokenizer cannot be loaded, or the device is absent.
    """
    if engine not in CANARY_ENGINES:
        raise ModelFormatError(f"canary: engine must be one of {', '.join(CANARY_ENGINES)}")
    dtype = canary_dtype(model_dir, dtype)
    if engine == "vllm":
        return _vllm_reference(model_dir, prompt=prompt, dtype=dtype, chat=chat)
    if device not in CANARY_DEVICES:
        raise ModelFormatError(f"canary: device must be one of {', '.join(CANARY_DEVICES)}")
    try:
        import torch
        import transformers
    except ImportError:
        raise ModelFormatError(
            "cannot compute the canary: this needs torch and transformers (installed with vLLM); "
            "pass --no-canary to pack without one"
        ) from None
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelFormatError("cannot compute the canary on cuda: this machine has no CUDA GPU")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        model: Any = transformers.AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=getattr(torch, dtype), local_files_only=True
        )
        model = model.to(device)
    except Exception as exc:  # transformers raises many kinds for a directory it cannot load
        raise _cannot_run("transformers", model_dir, exc) from None
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    if chat:
        rendered: Any = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        ids = [int(t) for t in (rendered["input_ids"] if isinstance(rendered, Mapping) else rendered)]
    else:
        ids = list(tokenizer(prompt)["input_ids"])
    s = CANARY_SAMPLING
    with torch.inference_mode():
        torch.manual_seed(int(s["seed"]))
        out = model.generate(
            torch.tensor([ids], device=device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
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
        reference=f"transformers {transformers.__version__} {dtype} {device}",
        device=device,
        dtype=dtype,
        render="chat" if chat else None,
    )
