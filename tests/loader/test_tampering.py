"""Every way of tampering with an encrypted model fails closed, opaquely, and zeroes what was written.

The loads run on the engine that ships (:class:`loader.lazy.LazyCheckpoint`, copied into
preallocated destinations as vLLM's loader does), on every engine path: straight into host
memory, through the staging ring of the GPU path, and into CUDA memory where a GPU is present.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import rfc8785
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from foundation.errors import ModelDecryptionError, ModelFormatError
from loader.format import GCM_TAG_SIZE, ShardHeader, chunk_aad, chunk_nonce, derive_shard_keys
from loader.manifest import MANIFEST_NAME, Manifest
from loader.modelview import stage_model_view
from loader.packer import pack_model
from loader.pipeline import decrypted_tensors
from loader.shard import EncryptedShard
from tests.loader.conftest import (
    CHUNK,
    ENGINE_PATHS,
    KEY,
    KEY_ID,
    MARKER,
    OTHER_KEY,
    as_bytes,
    engine_load,
    path_options,
)

SHARD1 = "model-00001-of-00003.safetensors.esenc"
SHARD2 = "model-00002-of-00003.safetensors.esenc"
SHARD3 = "model-00003-of-00003.safetensors.esenc"


Load = Callable[[Path], dict[str, torch.Tensor]]


@pytest.fixture(params=ENGINE_PATHS)
def load(request: pytest.FixtureRequest) -> Load:
    path: str = request.param
    return lambda model_dir: engine_load(model_dir, path=path)


def opened(model_dir: Path, file: str) -> EncryptedShard:
    manifest = Manifest.load(model_dir)
    entry = next(s for s in manifest.shards if s.file == file)
    return EncryptedShard.open(model_dir, manifest, entry, KEY.reveal())


def chunk_offsets(model_dir: Path, file: str) -> list[tuple[int, int]]:
    """(ciphertext offset, ciphertext length incl. tag) of every chunk of a pristine file."""
    shard = opened(model_dir, file)
    try:
        return [(c.ct_offset, c.ct_length) for c in shard.chunks]
    finally:
        shard.close()


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def expect_opaque_failure(load: Load, model_dir: Path, file: str) -> str:
    with pytest.raises(ModelDecryptionError) as info:
        load(model_dir)
    message = str(info.value)
    assert repr(file) in message
    error = info.value
    assert error.__cause__ is None and (error.__suppress_context__ or error.__context__ is None)
    return message.replace(repr(file), "<file>")


MESSAGES: set[str] = set()


def tamper_header_byte(d: Path) -> str:
    flip(d / SHARD2, 40)  # inside the safetensors-header digest
    return SHARD2


def tamper_header_mac(d: Path) -> str:
    offset, _ = chunk_offsets(d, SHARD2)[0]
    flip(d / SHARD2, offset - 1)  # last byte of the header MAC
    return SHARD2


def tamper_chunk_byte(d: Path) -> str:
    offset, length = chunk_offsets(d, SHARD3)[3]
    flip(d / SHARD3, offset + length // 2)
    return SHARD3


def tamper_tag_byte(d: Path) -> str:
    offset, length = chunk_offsets(d, SHARD3)[-1]
    flip(d / SHARD3, offset + length - 1)
    return SHARD3


def tamper_safetensors_header_chunk(d: Path) -> str:
    offset, _ = chunk_offsets(d, SHARD1)[0]
    flip(d / SHARD1, offset + 3)
    return SHARD1


def tamper_truncate_last_chunk(d: Path) -> str:
    offset, _ = chunk_offsets(d, SHARD3)[-1]
    with (d / SHARD3).open("r+b") as f:
        f.truncate(offset)
    return SHARD3


def tamper_truncate_mid_chunk(d: Path) -> str:
    with (d / SHARD3).open("r+b") as f:
        f.truncate((d / SHARD3).stat().st_size - 100)
    return SHARD3


def tamper_extend(d: Path) -> str:
    with (d / SHARD3).open("ab") as f:
        f.write(b"\x00" * (CHUNK + GCM_TAG_SIZE))
    return SHARD3


def tamper_reorder_chunks(d: Path) -> str:
    chunks = chunk_offsets(d, SHARD3)
    (a, la), (b, lb) = next(
        (x, y) for x, y in itertools.pairwise(chunks) if x[1] == y[1]
    )  # two neighbouring chunks of equal length
    data = bytearray((d / SHARD3).read_bytes())
    data[a : a + la], data[b : b + lb] = data[b : b + lb], data[a : a + la]
    (d / SHARD3).write_bytes(bytes(data))
    return SHARD3


def tamper_splice_from_other_file(d: Path) -> str:
    # Shards 1 and 2 have identical layouts: same key, other salt.
    offset, length = chunk_offsets(d, SHARD1)[2]
    donor = (d / SHARD2).read_bytes()[offset : offset + length]
    data = bytearray((d / SHARD1).read_bytes())
    data[offset : offset + length] = donor
    (d / SHARD1).write_bytes(bytes(data))
    return SHARD1


def tamper_swap_headers(d: Path) -> str:
    offset, _ = chunk_offsets(d, SHARD1)[0]
    h2 = (d / SHARD2).read_bytes()[:offset]
    data = bytearray((d / SHARD1).read_bytes())
    data[:offset] = h2
    (d / SHARD1).write_bytes(bytes(data))
    return SHARD1


def tamper_swap_files(d: Path) -> str:
    (d / SHARD1).rename(d / "tmp")
    (d / SHARD2).rename(d / SHARD1)
    (d / "tmp").rename(d / SHARD2)
    return SHARD1


CASES: dict[str, Callable[[Path], str]] = {
    "flipped_header_byte": tamper_header_byte,
    "flipped_header_mac": tamper_header_mac,
    "flipped_chunk_byte": tamper_chunk_byte,
    "flipped_tag_byte": tamper_tag_byte,
    "flipped_safetensors_header_chunk": tamper_safetensors_header_chunk,
    "truncated_at_chunk_boundary": tamper_truncate_last_chunk,
    "truncated_mid_chunk": tamper_truncate_mid_chunk,
    "extended": tamper_extend,
    "chunks_reordered": tamper_reorder_chunks,
    "chunk_spliced_from_other_file": tamper_splice_from_other_file,
    "headers_swapped_between_files": tamper_swap_headers,
    "files_swapped": tamper_swap_files,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tampering_fails_with_one_opaque_error_naming_the_file(load: Load, packed: Path, case: str) -> None:
    file = CASES[case](packed)
    MESSAGES.add(expect_opaque_failure(load, packed, file))


def test_every_failure_has_the_same_message() -> None:
    # Runs after the parametrized cases (same module, file order): the reason never leaks.
    assert len(MESSAGES) <= 1


def test_chunk_spliced_from_the_same_offset_of_another_model(
    load: Load, packed: Path, source_model: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    pack_model(source_model, other, key=KEY, key_id=KEY_ID, chunk_size=CHUNK)  # same key, new salts
    offset, length = chunk_offsets(packed, SHARD3)[4]
    donor = (other / SHARD3).read_bytes()[offset : offset + length]
    data = bytearray((packed / SHARD3).read_bytes())
    assert data[offset : offset + length] != donor
    data[offset : offset + length] = donor
    (packed / SHARD3).write_bytes(bytes(data))
    expect_opaque_failure(load, packed, SHARD3)


def test_whole_file_from_another_model_is_refused(
    load: Load, packed: Path, source_model: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    pack_model(source_model, other, key=KEY, key_id=KEY_ID, chunk_size=CHUNK)
    shutil.copy(other / SHARD2, packed / SHARD2)
    expect_opaque_failure(load, packed, SHARD2)


def test_truncation_at_a_chunk_boundary_is_caught_by_the_last_chunk_flag(packed: Path) -> None:
    # Even without the size checks, the cryptography refuses a non-last chunk presented as last.
    shard = opened(packed, SHARD3)
    try:
        raw = (packed / SHARD3).read_bytes()
        header, _ = ShardHeader.from_bytes(raw[: shard.header.length])
        keys = derive_shard_keys(KEY.reveal(), header.salt)
        c = shard.chunks[-2]
        ct = raw[c.ct_offset : c.ct_offset + c.ct_length]
        digest = shard._digest
        AESGCM(keys.enc_key).decrypt(chunk_nonce(c.index), ct, chunk_aad(digest, c.index, last=False))
        with pytest.raises(InvalidTag):
            AESGCM(keys.enc_key).decrypt(chunk_nonce(c.index), ct, chunk_aad(digest, c.index, last=True))
    finally:
        shard.close()


def test_wrong_key_is_detected_by_the_manifest_before_any_decryption(packed: Path) -> None:
    manifest = Manifest.load(packed)
    with pytest.raises(ModelDecryptionError, match=MANIFEST_NAME):
        manifest.authenticate(OTHER_KEY)
    with pytest.raises(ModelDecryptionError, match=MANIFEST_NAME):
        decrypted_tensors(packed, manifest, OTHER_KEY)  # raises at the call, not at the first next()


def test_wrong_key_is_detected_by_each_shard(packed: Path) -> None:
    manifest = Manifest.load(packed)
    entry = manifest.shards[0]
    with pytest.raises(ModelDecryptionError, match=repr(entry.file)):
        EncryptedShard.open(packed, manifest, entry, OTHER_KEY.reveal())


def test_manifest_tampered_fails_authentication(packed: Path) -> None:
    obj = json.loads((packed / MANIFEST_NAME).read_bytes())
    obj["shards"][0]["tensors"][0]["shape"] = [1, 64]
    (packed / MANIFEST_NAME).write_bytes(rfc8785.dumps(obj))
    manifest = Manifest.load(packed)
    with pytest.raises(ModelDecryptionError, match=MANIFEST_NAME):
        manifest.authenticate(KEY)


def test_manifest_edited_by_hand_is_not_canonical(packed: Path) -> None:
    obj = json.loads((packed / MANIFEST_NAME).read_bytes())
    (packed / MANIFEST_NAME).write_text(json.dumps(obj, indent=2))
    with pytest.raises(ModelFormatError, match="canonical"):
        Manifest.load(packed)


@pytest.mark.parametrize("change", ["modified", "deleted", "added"])
def test_plain_file_tampering_is_named(packed: Path, change: str, tmp_path: Path) -> None:
    manifest = Manifest.load(packed)
    manifest.authenticate(KEY)
    stage_model_view(packed, manifest, tmp_path / "view-before")
    if change == "modified":
        (packed / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 65}')
        name = "config.json"
    elif change == "deleted":
        (packed / "generation_config.json").unlink()
        name = "generation_config.json"
    else:
        (packed / "chat_template.jinja").write_text("{{ messages }}")
        name = "chat_template.jinja"
    with pytest.raises(ModelFormatError, match=name):
        stage_model_view(packed, manifest, tmp_path / "view-after")


@pytest.mark.parametrize("engine_path", ENGINE_PATHS)
def test_failure_zeroes_everything_already_written(
    packed: Path, reference: dict[str, torch.Tensor], engine_path: str
) -> None:
    tamper_tag_byte(packed)  # the last chunk of the last shard: everything else was delivered
    manifest = Manifest.load(packed)
    kept: dict[str, torch.Tensor] = {}
    device = "cuda" if engine_path == "cuda" else "cpu"
    with pytest.raises(ModelDecryptionError):
        for name, t in decrypted_tensors(
            packed,
            manifest,
            KEY,
            threads=2,
            device=device,
            **path_options(engine_path),  # type: ignore[arg-type]
        ):
            kept[name] = t  # a consumer that keeps references (no copy)
    assert len(kept) >= 8
    for name, t in kept.items():
        assert torch.count_nonzero(t.reshape(-1).view(torch.uint8)) == 0, name
    assert any(as_bytes(reference[n]) != bytes(reference[n].nbytes) for n in kept)


def test_no_plaintext_or_key_in_logs_or_errors(
    load: Load, packed: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    out = load(packed)
    assert as_bytes(out["model.marker"]).startswith(MARKER)
    tamper_chunk_byte(packed)
    with pytest.raises(ModelDecryptionError) as info:
        load(packed)
    with pytest.raises(ModelDecryptionError) as info2:
        Manifest.load(packed).authenticate(OTHER_KEY)
    texts = [
        caplog.text,
        str(info.value),
        info.value.diagnostics(),
        str(info2.value),
        info2.value.diagnostics(),
    ]
    secrets = [MARKER.decode(), KEY.reveal().hex(), KEY.reveal().decode("latin-1"), repr(KEY.reveal())]
    for text in texts:
        for secret in secrets:
            assert secret not in text
        assert "InvalidTag" not in text and "tag" not in text.lower()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.update(zz_extra="x"),
        lambda m: m["shards"][0].update(note="spliced"),
        lambda m: m["shards"][0]["tensors"][0].update(extra=1),
        lambda m: m["shards"][0]["tensors"][0].update(
            shape=[True] * len(m["shards"][0]["tensors"][0]["shape"])
        ),
    ],
    ids=["top-level", "shard", "tensor", "bool-shape"],
)
def test_unknown_or_ill_typed_manifest_members_are_refused(packed: Path, mutate) -> None:  # type: ignore[no-untyped-def]
    """Extra members would mint a new model identity for the same authenticated model."""
    import json

    import rfc8785

    from foundation.errors import ModelFormatError
    from loader.manifest import Manifest

    obj = json.loads((packed / "manifest.json").read_bytes())
    mutate(obj)
    with pytest.raises(ModelFormatError):
        Manifest.from_bytes(rfc8785.dumps(obj))
