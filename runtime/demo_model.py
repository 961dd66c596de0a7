"""Build the tiny random-weight Llama used by the demo and the tests, entirely offline.

The model is small enough to load in milliseconds yet has the shape vLLM's CPU backend needs
(head_dim 64). Its weights are random (seeded, so builds are reproducible); its tokenizer is a
byte-level BPE trained here on a short built-in corpus; it carries a chat template so the
OpenAI chat API works.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["DEMO_CHAT_TEMPLATE", "build_demo_model"]

#: A minimal chat template (Jinja, as transformers renders it).
DEMO_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<s>' + message['role'] + '\n' + message['content'] + '</s>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}"
)

_CORPUS = (
    """\
Confidential computing protects data in use by running code inside a hardware enclave.
The enclave proves what it runs with attestation evidence signed by the hardware vendor.
A key broker checks the evidence and releases the model key only to an approved enclave.
The runtime decrypts the model weights straight into accelerator memory and serves requests.
Users verify the attestation document before they send any sensitive prompt to the server.
The quick brown fox jumps over the lazy dog while the model answers questions politely.
Hello, how are you today? I am fine, thank you. What is the capital of France? Paris.
"""
    * 4
)


def _train_tokenizer(vocab_size: int):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    return tok


def build_demo_model(out: Path, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a tiny Llama (config, BPE tokenizer, chat template, safetensors) to ``out``.

    The directory is built next to ``out`` and renamed into place, so a failed build leaves
    nothing behind.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is false.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)
    try:
        tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
            tokenizer_object=_train_tokenizer(vocab_size=512),
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
        )
        tokenizer.chat_template = DEMO_CHAT_TEMPLATE
        tokenizer.save_pretrained(staging)

        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,  # head_dim 64: the smallest the CPU attention backend accepts
            num_key_value_heads=1,
            max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
            dtype="bfloat16",
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
        # Scale up the random weights a little so greedy decoding is not a constant token.
        with torch.no_grad():
            for param in model.parameters():
                param.mul_(4.0)
        model.to(torch.bfloat16).save_pretrained(staging, safe_serialization=True)  # type: ignore[arg-type]
        (staging / "enclave-serve-demo.json").write_text(
            json.dumps({"builder": "enclave-serve demo-model", "seed": seed}, indent=2) + "\n"
        )
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
