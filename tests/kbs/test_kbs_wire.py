"""Wire models and runtime-data binding against Trustee's vectors and shapes."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json

import pytest
import rfc8785
from hypothesis import given
from hypothesis import strategies as st

from attest.binding import HashAlgorithm, canonical_json
from attest.kbs.teekey import TeeKeyPair
from attest.kbs.wire import (
    Attestation,
    Challenge,
    CompositeEvidence,
    EcTeePubKey,
    ErrorInformation,
    ErrorType,
    JweResponse,
    Request,
    ResourcePolicyUpload,
    RuntimeData,
    WireFormatError,
    parse_tee_pubkey,
)
from foundation.resource import ResourceUri
from tests.vector_files import vector

# trustee attestation-service/src/lib.rs tests (reference doc §1.5).
JCS_VECTOR_INPUT = {"b": 1, "a": "test", "c": {"d": "e"}}
JCS_VECTOR_SHA384 = (
    "e71ce8e70d814ba6639c3612ebee0ff1f76f650f8dbb5e47157e0f3f525cd22c4597480a186427c813ca941da78870c3"
)

JWK = {"kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW", "x": "AAAA", "y": "BBBB"}


def test_jcs_sha384_vector_from_trustee() -> None:
    assert HashAlgorithm.SHA384.digest(canonical_json(JCS_VECTOR_INPUT)).hex() == JCS_VECTOR_SHA384
    assert canonical_json(JCS_VECTOR_INPUT) == b'{"a":"test","b":1,"c":{"d":"e"}}'


def test_primary_digest_is_sha384_of_jcs_with_additional_evidence_always_present() -> None:
    runtime = RuntimeData(nonce="bm9uY2U=", tee_pubkey=parse_tee_pubkey(JWK))
    expected = hashlib.sha384(
        rfc8785.dumps({"additional-evidence": "", "nonce": "bm9uY2U=", "tee-pubkey": JWK})
    ).digest()
    assert runtime.primary_digest("", HashAlgorithm.SHA384) == expected
    assert len(expected) == 48


def test_device_digest_is_sha384_of_jcs_nonce_and_key() -> None:
    runtime = RuntimeData(nonce="bm9uY2U=", tee_pubkey=parse_tee_pubkey(JWK))
    canon = json.dumps({"nonce": "bm9uY2U=", "tee-pubkey": JWK}, sort_keys=True, separators=(",", ":"))
    assert runtime.device_digest(HashAlgorithm.SHA384) == hashlib.sha384(canon.encode()).digest()


def test_primary_digest_commits_to_the_additional_evidence_string() -> None:
    runtime = RuntimeData(nonce="n", tee_pubkey=parse_tee_pubkey(JWK))
    a = runtime.primary_digest('{"sampledevice":{"svn":"2","report_data":"AA=="}}', HashAlgorithm.SHA384)
    b = runtime.primary_digest('{"sampledevice":{"svn":"3","report_data":"AA=="}}', HashAlgorithm.SHA384)
    assert a != b


def test_unknown_jwk_members_are_dropped_as_serde_does() -> None:
    key = parse_tee_pubkey({**JWK, "use": "enc", "kid": "x"})
    assert key.to_json() == JWK


def test_trustee_evidence_posts_through_the_wire_models_unchanged() -> None:
    raw = vector("kbs", "evidence.json")
    assert (
        hashlib.sha256(raw).hexdigest() == "3c7d1e6a3575beb6b7632e2a08123d45de9c9128a357a0bd3f97630ef4b1ac3d"
    )
    evidence = json.loads(raw)
    key = TeeKeyPair.generate("ec").public_key
    attestation = Attestation(
        runtime_data=RuntimeData(nonce=base64.b64encode(b"\1" * 32).decode(), tee_pubkey=key),
        tee_evidence=CompositeEvidence(primary_evidence=evidence, additional_evidence=""),
    )
    wire = json.loads(attestation.to_bytes())
    assert list(wire) == ["init-data", "runtime-data", "tee-evidence"]
    assert wire["init-data"] is None
    assert wire["tee-evidence"] == {"primary_evidence": evidence, "additional_evidence": ""}
    assert wire["runtime-data"]["tee-pubkey"] == key.to_json()
    parsed = Attestation.from_json(json.dumps(wire))
    assert parsed == attestation
    assert parsed.tee_evidence.primary_evidence["attestation_report"]["version"] == 3  # type: ignore[index,call-overload]


def test_request_shape_matches_guest_components() -> None:
    request = Request(version="0.4.0", tee="tdx", extra_params={"supported-hash-algorithms": ["sha384"]})
    assert request.to_json() == {
        "version": "0.4.0",
        "tee": "tdx",
        "extra-params": {"supported-hash-algorithms": ["sha384"]},
    }
    with pytest.raises(WireFormatError, match="tee"):
        Request.from_json(b'{"version":"0.4.0","tee":"nosuchtee","extra-params":""}')


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("", HashAlgorithm.SHA384),
        ({}, HashAlgorithm.SHA384),
        ({"selected-hash-algorithm": "sha512"}, HashAlgorithm.SHA512),
        ({"selected-hash-algorithm": "SHA256"}, HashAlgorithm.SHA256),
    ],
)
def test_challenge_hash_selection(extra: object, expected: HashAlgorithm) -> None:
    challenge = Challenge.from_json({"nonce": "abc", "extra-params": extra})
    assert challenge.hash_algorithm() is expected


def test_challenge_with_unsupported_hash_is_a_protocol_error() -> None:
    with pytest.raises(WireFormatError, match="sm3"):
        Challenge.from_json(
            {"nonce": "abc", "extra-params": {"selected-hash-algorithm": "sm3"}}
        ).hash_algorithm()


def test_additional_evidence_map_parses_and_rejects_unknown_tees() -> None:
    evidence = CompositeEvidence(primary_evidence={}, additional_evidence='{"nvidia":{"a":1}}')
    assert evidence.additional_map() == {"nvidia": {"a": 1}}
    with pytest.raises(WireFormatError):
        CompositeEvidence(primary_evidence={}, additional_evidence='{"gpu":{}}').additional_map()
    with pytest.raises(WireFormatError):
        CompositeEvidence(primary_evidence={}, additional_evidence="not json").additional_map()


def test_jwe_response_omits_absent_aad_and_checks_base64url() -> None:
    jwe = JweResponse(protected="eyJ9", encrypted_key="", iv="AAAA", ciphertext="AA", tag="AAAA")
    assert "aad" not in jwe.to_json()
    with pytest.raises(WireFormatError, match="iv"):
        JweResponse.from_json(
            {"protected": "e30", "encrypted_key": "", "iv": "AA==", "ciphertext": "", "tag": ""}
        )


def test_error_information_type_uri() -> None:
    info = ErrorInformation(type=ErrorType.POLICY_DENY.uri, detail="Access denied by policy")
    assert info.to_json() == {
        "type": "https://github.com/confidential-containers/kbs/errors/PolicyDeny",
        "detail": "Access denied by policy",
    }
    assert info.short_type == "PolicyDeny"


def test_resource_policy_upload_is_base64url_without_padding() -> None:
    upload = ResourcePolicyUpload.of(b"package policy\ndefault allow = true\n")
    assert "=" not in upload.policy
    assert upload.decoded() == b"package policy\ndefault allow = true\n"


def test_ec_tee_pubkey_exact_members() -> None:
    key = TeeKeyPair.generate("ec").public_key
    assert isinstance(key, EcTeePubKey)
    assert sorted(key.to_json()) == ["alg", "crv", "kty", "x", "y"]
    assert key.alg == "ECDH-ES+A256KW" and key.crv == "P-256"


def test_rsa_tee_pubkey_exact_members(rsa_tee_key: TeeKeyPair) -> None:
    key = rsa_tee_key.public_key
    assert key.to_json()["kty"] == "RSA"
    assert sorted(key.to_json()) == ["alg", "e", "kty", "n"]
    assert key.alg == "RSA-OAEP-256"


@pytest.mark.parametrize(
    ("uri", "path", "plugin"),
    [
        ("kbs:///default/key/1", "default/key/1", "resource"),
        ("kbs://kbs.example:8080/repo/type/tag", "repo/type/tag", "resource"),
        ("kbs+pkcs11:///a/b/c.v1", "a/b/c.v1", "pkcs11"),
    ],
)
def test_resource_uri_parse(uri: str, path: str, plugin: str) -> None:
    parsed = ResourceUri.parse(uri)
    assert parsed.path == path and parsed.plugin == plugin
    assert ResourceUri.parse(str(parsed)) == parsed
    assert parsed.kbs_path == f"/kbs/v0/{plugin}/{path}"


@pytest.mark.parametrize(
    "uri",
    [
        "kbs:///a/b",
        "kbs:///a/b/c/d",
        "https:///a/b/c",
        "kbs:///a/../c",
        "kbs:///a/b/c?x=1",
        "kbs:///a/.b/c",
        "kbs:///a//c",
    ],
)
def test_resource_uri_refuses_malformed(uri: str) -> None:
    with pytest.raises(ValueError):
        ResourceUri.parse(uri)


@given(st.binary(max_size=256))
def test_wire_parsers_on_arbitrary_bytes_raise_only_wire_errors(data: bytes) -> None:
    for model in (Request, Challenge, Attestation, JweResponse, ErrorInformation, ResourcePolicyUpload):
        with contextlib.suppress(WireFormatError):
            model.from_json(data)


@given(st.text(max_size=80))
def test_resource_uri_on_arbitrary_text_raises_only_value_error(text: str) -> None:
    with contextlib.suppress(ValueError):
        ResourceUri.parse(text)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
        max_leaves=10,
    )
)
def test_tee_pubkey_parser_on_arbitrary_json_raises_only_wire_errors(obj: object) -> None:
    with contextlib.suppress(WireFormatError):
        parse_tee_pubkey(obj)
