"""The committed vectors pin format version 1: the packer reproduces them, the loader reads them,
and an independent decoder written from docs/format.md agrees."""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import itertools
import struct
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from safetensors.torch import load_file

from foundation.secret import SecretBytes
from loader.manifest import Manifest
from loader.modelview import stage_model_view
from loader.packer import pack_model
from tests.loader.conftest import ENGINE_PATHS, as_bytes, engine_load

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "format"


def _generator() -> object:
    spec = importlib.util.spec_from_file_location("generate_vectors", VECTORS / "generate_vectors.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_packer_reproduces_the_vector_bytes(tmp_path: Path) -> None:
    gen = _generator()
    dst = tmp_path / "encrypted"
    manifest = pack_model(
        VECTORS / "source",
        dst,
        key=SecretBytes(gen.KEY),  # type: ignore[attr-defined]
        key_id=gen.KEY_ID,  # type: ignore[attr-defined]
        chunk_size=gen.CHUNK_SIZE,  # type: ignore[attr-defined]
        threads=2,
        randbytes=gen.fixed_randbytes(),  # type: ignore[attr-defined]
    )
    expected = sorted(p.name for p in (VECTORS / "encrypted").iterdir())
    assert sorted(p.name for p in dst.iterdir()) == expected
    for name in expected:
        assert (dst / name).read_bytes() == (VECTORS / "encrypted" / name).read_bytes(), name
    assert (
        manifest.digest
        == "sha256:" + hashlib.sha256((VECTORS / "encrypted/manifest.json").read_bytes()).hexdigest()
    )


@pytest.mark.parametrize("engine_path", ENGINE_PATHS)
def test_loader_decrypts_the_vector(tmp_path: Path, engine_path: str) -> None:
    gen = _generator()
    key = SecretBytes(gen.KEY)  # type: ignore[attr-defined]
    model = VECTORS / "encrypted"
    manifest = Manifest.load(model)
    manifest.authenticate(key)
    stage_model_view(model, manifest, tmp_path / "view")
    out = engine_load(model, key, path=engine_path)
    ref = load_file(VECTORS / "source" / "model.safetensors")
    assert sorted(out) == sorted(ref)
    for name in ref:
        assert out[name].dtype == ref[name].dtype and out[name].shape == ref[name].shape
        assert as_bytes(out[name]) == as_bytes(ref[name])


def test_independent_decoder_from_the_spec() -> None:
    """Decode the shard with nothing but docs/format.md: byte offsets, HKDF, nonce and AAD."""
    gen = _generator()
    raw = (VECTORS / "encrypted" / "model.safetensors.esenc").read_bytes()
    plain = (VECTORS / "source" / "model.safetensors").read_bytes()
    assert raw[:8] == b"\x89ESENC\r\n"
    version, hlen, chunk, plen, stlen = struct.unpack_from("<HHIQQ", raw, 8)
    assert (version, chunk, plen) == (1, 4096, len(plain))
    salt = raw[64:96]
    assert salt == b"\x11" * 32
    okm = HKDF(hashes.SHA256(), 64, salt, b"enclave-serve/shard/v1").derive(gen.KEY)  # type: ignore[attr-defined]
    header = raw[:hlen]
    assert hmac.new(okm[32:], header[:-32], hashlib.sha256).digest() == header[-32:]
    assert raw[32:64] == hashlib.sha256(plain[:stlen]).digest()
    # Chunk boundaries: end of the safetensors header, tensor starts and ends, then every 4096 bytes.
    (n,) = struct.unpack_from("<Q", plain, 0)
    import json

    marks = {0, stlen, plen}
    for name, info in json.loads(plain[8 : 8 + n]).items():
        if name != "__metadata__":
            marks.update(stlen + o for o in info["data_offsets"])
    bounds = sorted(marks)
    pieces = []
    for a, b in itertools.pairwise(bounds):
        pieces += [(p, min(b, p + 4096)) for p in range(a, b, 4096)]
    digest = hashlib.sha256(header).digest()
    aead = AESGCM(okm[:32])
    pos, out = hlen, b""
    for i, (a, b) in enumerate(pieces):
        ct = raw[pos : pos + (b - a) + 16]
        aad = b"enclave-serve/chunk/v1" + digest + i.to_bytes(8, "big") + bytes([i == len(pieces) - 1])
        out += aead.decrypt(b"\x00" * 4 + i.to_bytes(8, "big"), ct, aad)
        pos += len(ct)
    assert pos == len(raw)
    assert out == plain
    assert torch.equal(load_file(VECTORS / "source" / "model.safetensors")["b.bias"], torch.arange(10.0))
