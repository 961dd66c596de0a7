"""The canary reference: computed from the plaintext model, recorded under the manifest MAC."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import rfc8785

from attest.errors import ModelDecryptionError, ModelFormatError
from attest.secret import SecretBytes
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
    return compute_reference(tiny)


def test_the_reference_is_deterministic_and_uses_the_fixed_settings(
    tiny: Path, reference: CanaryReference
) -> None:
    assert len(reference.token_ids) == CANARY_SAMPLING["max_tokens"] == 16
    assert reference.sampling == dict(CANARY_SAMPLING)
    assert reference.sampling["top_k"] == 1 and reference.sampling["temperature"] != 1.0  # not the defaults
    assert reference.prompt_token_ids and reference.reference.startswith("transformers ")
    assert compute_reference(tiny) == reference


def test_another_model_gives_other_tokens(tmp_path: Path, reference: CanaryReference) -> None:
    other = compute_reference(build_demo_model(tmp_path / "other", seed=7))
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
    with pytest.raises(ModelFormatError, match="--no-canary"):
        compute_reference(tmp_path)
