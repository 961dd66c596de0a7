"""CoCo init-data: exact-bytes digests, register placement, the annotation form, enclave-serve's pins."""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import tracemalloc
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attest.evidence import TeeKind
from attest.initdata import ENCLAVE_SERVE_ENTRY, InitData, WorkloadPins, register_for_digest
from foundation.errors import MalformedEvidence
from tests.attest.support import workload_pins
from tests.vector_files import vector

CAA_SHA384 = (
    "4bebff2869bcdd3e9848fd8bca681ffb9bd9e018e343aa664c960fb4834129ac5b7fed3ca94b2da609906f1e94924b17"
)
CAA_DOC_STATED = (  # the same text without its final newline (see PROVENANCE.md)
    "52af3178dd7ad4bf551e629b84b45bfd1fbe1434b980120267181ae3575ea20ca9013b8eadf31d27eed7ff2552d500ef"
)
MODEL = "sha256:" + "ab" * 32


def test_the_cloud_api_adaptor_annotation_digests_its_exact_bytes() -> None:
    init = InitData.load(vector("initdata", "caa-annotation.b64"))
    assert len(init.raw) == 4557 and init.algorithm == "sha384"
    assert set(init.data) == {"aa.toml", "cdh.toml", "policy.rego"}
    assert init.digest.hex() == CAA_SHA384
    assert hashlib.sha384(init.raw.rstrip(b"\n")).hexdigest() == CAA_DOC_STATED  # one byte, other digest
    assert init.register(TeeKind.TDX).hex() == CAA_SHA384  # 48 bytes: the digest itself
    assert init.register(TeeKind.SNP).hex() == CAA_SHA384[:64]  # truncated to 32
    assert init.pins is None


def test_digests_are_zero_padded_or_truncated_into_the_register() -> None:
    d32, d64 = bytes(range(32)), bytes(range(64))
    assert register_for_digest(TeeKind.TDX, d32) == d32 + bytes(16)
    assert register_for_digest(TeeKind.SNP, d32) == d32
    assert register_for_digest(TeeKind.TDX, d64) == d64[:48]
    assert register_for_digest(TeeKind.SNP, d64) == d64[:32]
    with pytest.raises(ValueError, match="carries no init-data"):
        register_for_digest(TeeKind.NVIDIA, d32)


def test_built_init_data_round_trips_through_the_annotation_and_carries_the_pins() -> None:
    pins = workload_pins(MODEL, key_resource="kbs:///a/b/c", environment={"OMP_NUM_THREADS": "4"})
    init = InitData.build(
        entries=[("policy.rego", "package agent_policy\n"), (ENCLAVE_SERVE_ENTRY, pins.to_toml())]
    )
    again = InitData.from_annotation(init.annotation())
    assert again.raw == init.raw and again.digest == init.digest
    assert again.pins == pins
    assert init.to_wire() == {"format": "toml", "body": init.raw.decode()}
    assert init.matches(TeeKind.TDX, init.register(TeeKind.TDX))
    assert not init.matches(TeeKind.TDX, bytes(48))
    sha256 = InitData.build(entries=[(ENCLAVE_SERVE_ENTRY, pins.to_toml())], algorithm="sha256")
    assert sha256.digest == hashlib.sha256(sha256.raw).digest()
    assert sha256.register(TeeKind.TDX) == sha256.digest + bytes(16)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'version = "0.2.0"\nalgorithm = "sha384"\n', "version"),
        (b'version = "0.1.0"\nalgorithm = "sha-384"\n', "algorithm"),
        (b'version = "0.1.0"\nalgorithm = "md5"\n', "algorithm"),
        (b'version = "0.1.0"\nalgorithm = "sha384"\n[data]\nx = 1\n', "strings"),
        (b"not = [toml", "not TOML"),
        (b"\xff\xfe", "not TOML"),
    ],
)
def test_malformed_init_data_is_refused(raw: bytes, message: str) -> None:
    with pytest.raises(MalformedEvidence, match=message):
        InitData.from_bytes(raw)


def test_a_bad_annotation_is_refused() -> None:
    with pytest.raises(MalformedEvidence, match="not base64 of gzip"):
        InitData.from_annotation("H4sI!!!")


_RUNTIME = (
    '[runtime]\nname = "enclave-serve"\nversion = "1"\nvllm = "1"\ntorch = "1"\npython = "3.11.0"\n'
    "python_isolated = false\n"
)
_VALID = f'model = "{MODEL}"\nkey_resource = "kbs:///a/b/c"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('model = "sha256:abc"\nkey_resource = "k"\n[settings]\n' + _RUNTIME, "model must be"),
        (_VALID + "extra = 1\n[settings]\n" + _RUNTIME, "unknown key"),
        (_VALID + 'vllm_args = "--x"\n[settings]\n' + _RUNTIME, "list of strings"),
        (_VALID + 'config_sha256 = "' + "ab" * 32 + '"\n[settings]\n' + _RUNTIME, "unknown key"),
        (_VALID + _RUNTIME, "declares no settings"),
        (
            _VALID + "[settings]\n" + _RUNTIME.replace("python_isolated = false", "python_isolated = 1"),
            "wrong type",
        ),
        (_VALID + "[settings]\nx = { a = 1 }\n" + _RUNTIME, "setting x must be"),
        (_VALID + "[settings]\n" + _RUNTIME + "[environment]\nX = 1\n", "strings"),
    ],
)
def test_malformed_pins_are_refused(text: str, message: str) -> None:
    with pytest.raises(MalformedEvidence, match=message):
        WorkloadPins.from_toml(text)


def test_the_configuration_is_a_function_of_the_declaration_alone() -> None:
    """Recomputed from the entry's TOML as docs/configuration.md says: JCS of the declared object."""
    import json
    import tomllib

    import rfc8785

    pins = workload_pins(MODEL, settings={"tee": "tdx", "watchdog_interval_s": 60.0, "tls": True})
    entry = tomllib.loads(pins.to_toml())
    obj = {
        "format": "enclave-serve/config/v2",
        "model": {"manifest_digest": entry["model"]},
        "runtime": entry["runtime"],
        "settings": {**entry["settings"], "key_resource": entry["key_resource"]},
        "vllm": {"args": entry["vllm_args"]},
        "environment": entry.get("environment", {}),
    }
    assert hashlib.sha256(rfc8785.dumps(obj)).hexdigest() == pins.config_sha256
    assert json.loads(pins.configuration().raw)["settings"]["watchdog_interval_s"] == 60
    # 60 and 60.0 are one number in the canonical form; any declared change is another digest.
    assert workload_pins(MODEL, settings={**pins.settings, "watchdog_interval_s": 60}).config_sha256 == (
        pins.config_sha256
    )
    assert workload_pins(MODEL, settings={**pins.settings, "tls": False}).config_sha256 != pins.config_sha256
    assert WorkloadPins.from_toml(pins.to_toml()) == pins


def test_declared_strings_survive_the_toml_round_trip() -> None:
    odd = 'a"b\\c\nd\x7fe\u00e9'
    pins = workload_pins(MODEL, settings={"kbs_ca_pem": odd, "x-y": ["1", odd]}, environment={"LANG": odd})
    assert WorkloadPins.from_toml(pins.to_toml()) == pins


def _annotation_of(packed: bytes) -> str:
    return base64.b64encode(packed).decode("ascii")


def test_a_gzip_bomb_annotation_is_refused_without_inflating_it() -> None:
    # 64 MiB of zeros in 64 KiB of gzip (1000:1); a bigger bomb costs the test time, not the
    # parser: decompression stops at the same 1 MiB. gzip.decompress peaked at over 128 MiB here.
    bomb = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    packed = b"".join(bomb.compress(zeros) for _ in range(64)) + bomb.flush()
    assert len(packed) < 100 << 10
    tracemalloc.start()
    try:
        with pytest.raises(MalformedEvidence, match="decompresses to more than 1 MiB"):
            InitData.from_annotation(_annotation_of(packed))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20  # the bounded output and the decoded input, not 64 MiB


def test_an_annotation_just_under_the_bound_is_parsed() -> None:
    padding = "#" * ((1 << 20) - 200) + "\n"
    raw = f'version = "0.1.0"\nalgorithm = "sha384"\n{padding}[data]\n"a" = "b"\n'.encode()
    assert len(raw) <= 1 << 20
    assert InitData.from_annotation(_annotation_of(gzip.compress(raw))).raw == raw


@pytest.mark.parametrize(
    ("packed", "message"),
    [
        (gzip.compress(b'version = "0.1.0"\nalgorithm = "sha384"\n')[:-6], "truncated"),
        (gzip.compress(b'version = "0.1.0"\n') + gzip.compress(b'algorithm = "sha384"\n'), "one gzip member"),
        (gzip.compress(b'version = "0.1.0"\nalgorithm = "sha384"\n') + b"\0", "one gzip member"),
        (zlib.compress(b'version = "0.1.0"\nalgorithm = "sha384"\n'), "not base64 of gzip"),
    ],
    ids=["truncated", "second-member", "trailing-byte", "zlib-not-gzip"],
)
def test_an_annotation_that_is_not_exactly_one_gzip_member_is_refused(packed: bytes, message: str) -> None:
    with pytest.raises(MalformedEvidence, match=message):
        InitData.from_annotation(_annotation_of(packed))


def test_a_corrupted_gzip_checksum_is_refused() -> None:
    packed = bytearray(gzip.compress(b'version = "0.1.0"\nalgorithm = "sha384"\n'))
    packed[-8] ^= 0xFF  # the CRC-32 in the trailer
    with pytest.raises(MalformedEvidence, match="not base64 of gzip"):
        InitData.from_annotation(_annotation_of(bytes(packed)))


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=512), st.binary(max_size=512).map(gzip.compress)))
def test_arbitrary_annotation_bytes_give_init_data_or_a_clean_error(payload: bytes) -> None:
    with contextlib.suppress(MalformedEvidence):
        InitData.from_annotation(_annotation_of(payload))
    with contextlib.suppress(MalformedEvidence):
        InitData.load(b"H4sI" + payload)


def test_the_development_agent_policy_is_recognised_as_insecure() -> None:
    from attest.initdata import INSECURE_AGENT_POLICY

    insecure = InitData.build(entries=[("policy.rego", INSECURE_AGENT_POLICY)], algorithm="sha384")
    assert insecure.insecure_agent_policy
    pinned = InitData.build(
        entries=[("policy.rego", "package agent_policy\ndefault X := false\n")], algorithm="sha384"
    )
    assert not pinned.insecure_agent_policy
    assert not InitData.build(entries=[], algorithm="sha384").insecure_agent_policy
