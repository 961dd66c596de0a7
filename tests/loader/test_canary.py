"""The canary reference: computed from the plaintext model, recorded under the manifest MAC."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import rfc8785

from foundation.errors import ModelDecryptionError, ModelFormatError
from foundation.secret import SecretBytes
from loader.canary import CANARY_SAMPLING, CanaryReference, compute_reference
from loader.manifest import MANIFEST_NAME, Manifest
from loader.packer import pack_model
from runtime.demo_model import build_demo_model

KEY = SecretBytes(bytes(range(32)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("canary") / "tiny")


@pytest.fixture(scope="module")
def reference(tiny: Path) -> CanaryReference:
    return compute_reference(tiny, dtype="float32")  # float32 remains choosable (the default: the model's)


def test_the_reference_is_deterministic_and_uses_the_fixed_settings(
    tiny: Path, reference: CanaryReference
) -> None:
    assert len(reference.token_ids) == CANARY_SAMPLING["max_tokens"] == 16
    assert reference.sampling == dict(CANARY_SAMPLING)
    assert reference.sampling["top_k"] == 1 and reference.sampling["temperature"] != 1.0  # not the defaults
    assert reference.prompt_token_ids and reference.reference.startswith("transformers ")
    assert compute_reference(tiny, dtype="float32") == reference


def test_another_model_gives_other_tokens(tmp_path: Path, reference: CanaryReference) -> None:
    other = compute_reference(build_demo_model(tmp_path / "other", seed=7), dtype="float32")
    assert other.prompt_token_ids == reference.prompt_token_ids  # same tokenizer
    assert other.token_ids != reference.token_ids


def test_round_trip_and_strict_parsing(reference: CanaryReference) -> None:
    assert CanaryReference.from_json(json.loads(json.dumps(reference.to_json()))) == reference
    good = reference.to_json()
    for bad in (
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "reference"},
        {**good, "token_ids": good["token_ids"][:-1]},
        {**good, "token_ids": [-1] * 16},
        {**good, "prompt_token_ids": []},
        {**good, "sampling": {**good["sampling"], "top_p": 0.5}},
        {**good, "sampling": {**good["sampling"], "max_tokens": True}},
        {**good, "sampling": {**good["sampling"], "top_k": 5}},
        {**good, "sampling": {**good["sampling"], "repetition_penalty": "1.3"}},
    ):
        with pytest.raises(ModelFormatError, match="canary"):
            CanaryReference.from_json(bad)


def test_mismatch_names_what_differs(reference: CanaryReference) -> None:
    assert reference.mismatch(list(reference.prompt_token_ids), list(reference.token_ids)) is None
    flipped = list(reference.token_ids)
    flipped[5] += 1
    assert "first difference at token 5 of 16" in str(reference.mismatch(None, flipped))
    assert "tokenizer" in str(reference.mismatch([1, 2, 3], list(reference.token_ids)))
    assert "first difference at token 3" in str(reference.mismatch(None, list(reference.token_ids)[:3]))


def test_the_manifest_carries_it_under_its_mac(
    tiny: Path, reference: CanaryReference, tmp_path: Path
) -> None:
    manifest = pack_model(tiny, tmp_path / "enc", key=KEY, key_id="kbs:///r/t/x", canary=reference)
    loaded = Manifest.load(tmp_path / "enc")
    assert loaded.canary == reference
    loaded.authenticate(KEY)
    # The host rewrites the reference to match whatever its substituted weights generate:
    # the manifest no longer authenticates with the model key.
    obj = json.loads(manifest.raw)
    obj["canary"]["token_ids"] = [1] * 16
    (tmp_path / "enc" / MANIFEST_NAME).write_bytes(rfc8785.dumps(obj))
    with pytest.raises(ModelDecryptionError):
        Manifest.load(tmp_path / "enc").authenticate(KEY)
    # ... and so does removing it.
    del obj["canary"]
    (tmp_path / "enc" / MANIFEST_NAME).write_bytes(rfc8785.dumps(obj))
    with pytest.raises(ModelDecryptionError):
        Manifest.load(tmp_path / "enc").authenticate(KEY)


def test_a_manifest_packed_without_one_still_loads(tiny: Path, tmp_path: Path) -> None:
    pack_model(tiny, tmp_path / "enc", key=KEY, key_id="kbs:///r/t/x")
    loaded = Manifest.load(tmp_path / "enc")
    assert loaded.canary is None and "canary" not in json.loads(loaded.raw)
    loaded.authenticate(KEY)


def test_a_directory_transformers_cannot_load_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelFormatError, match="--no-canary") as info:
        compute_reference(tmp_path)
    assert "(ValueError: " in str(info.value)  # the cause, named


def test_the_default_dtype_is_the_models_own(tiny: Path) -> None:
    reference = compute_reference(tiny)  # the demo model's config says bfloat16
    assert reference.dtype == "bfloat16" and reference.reference.endswith("bfloat16 cpu")


def test_the_reference_names_where_it_was_computed(reference: CanaryReference) -> None:
    assert (reference.device, reference.dtype) == ("cpu", "float32")
    assert reference.to_json()["device"] == "cpu" and reference.computed_in == "cpu float32"
    assert reference.reference.endswith("float32 cpu")


def test_references_packed_before_devices_parse_as_cpu_float32_and_keep_their_digest(
    reference: CanaryReference,
) -> None:
    legacy = {k: v for k, v in reference.to_json().items() if k not in ("device", "dtype")}
    parsed = CanaryReference.from_json(legacy)
    assert parsed.device is None and parsed.device_family == "cpu" and parsed.computed_in == "cpu float32"
    assert parsed.to_json() == legacy  # serialised unchanged: the claimed digest stays
    assert parsed.sha256 == hashlib.sha256(rfc8785.dumps(legacy)).hexdigest()


def test_device_and_dtype_are_parsed_strictly(reference: CanaryReference) -> None:
    good = reference.to_json()
    for bad in (
        {k: v for k, v in good.items() if k != "dtype"},
        {**good, "device": "tpu"},
        {**good, "dtype": "int8"},
        {**good, "device": 1},
    ):
        with pytest.raises(ModelFormatError, match="canary"):
            CanaryReference.from_json(bad)


def test_a_mismatch_across_device_families_says_where_to_repack(reference: CanaryReference) -> None:
    flipped = list(reference.token_ids)
    flipped[0] += 1
    why = str(reference.mismatch(None, flipped, served_on="cuda"))
    assert "computed on cpu float32" in why and "runs on cuda" in why and "--canary-device cuda" in why
    assert "canary-device" not in str(reference.mismatch(None, flipped, served_on="cpu"))
    assert reference.mismatch(None, list(reference.token_ids), served_on="cuda") is None  # exact is exact


def test_a_cuda_reference_needs_a_gpu(tiny: Path) -> None:
    import torch

    if torch.cuda.is_available():
        ref = compute_reference(tiny, device="cuda")
        assert (ref.device, ref.dtype) == ("cuda", "bfloat16")  # the demo model's own dtype
    else:
        with pytest.raises(ModelFormatError, match="no CUDA GPU"):
            compute_reference(tiny, device="cuda")
    with pytest.raises(ModelFormatError, match="device"):
        compute_reference(tiny, device="tpu")


def test_a_model_with_a_chat_template_records_a_chat_canary(tiny: Path, reference: CanaryReference) -> None:
    """The rendered conversation is recorded: the boot replays it through the served chat route."""
    import transformers

    assert reference.render == "chat" and reference.messages == [
        {"role": "user", "content": reference.prompt}
    ]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny), local_files_only=True)
    rendered = tokenizer.apply_chat_template(reference.messages, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<s>user\n") and rendered.endswith("<s>assistant\n")
    plain = compute_reference(tiny, chat=False)
    assert plain.render is None and "render" not in plain.to_json()
    assert plain.prompt_token_ids != reference.prompt_token_ids


def test_a_changed_chat_rendering_is_named(reference: CanaryReference) -> None:
    why = str(reference.mismatch([1, 2, 3], list(reference.token_ids)))
    assert "chat rendering of the canary differs" in why
    with pytest.raises(ModelFormatError, match="render"):
        CanaryReference.from_json({**reference.to_json(), "render": "completion"})
