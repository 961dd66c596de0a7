"""The one JWE unwrap (foundation.jwe): the caller's allow-lists decide, ``zip`` never passes, and
every failure is one error type whose ``failure`` says why (decryption failures opaquely)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jwcrypto import jwe, jwk

from foundation.jwe import JweError, JweFailure, unwrap_jwe

PAYLOAD = b"\x00layer-options\xff"
EC_ALGS, ENCS = ("ECDH-ES+A256KW",), ("A256GCM",)


@pytest.fixture(scope="module")
def ec() -> jwk.JWK:
    return jwk.JWK.generate(kty="EC", crv="P-256")


@pytest.fixture(scope="module")
def rsa() -> jwk.JWK:
    return jwk.JWK.generate(kty="RSA", size=2048)


def _public(key: jwk.JWK) -> jwk.JWK:
    return jwk.JWK(**key.export_public(as_dict=True))


def _seal(*recipients: tuple[jwk.JWK, str], enc: str = "A256GCM", **extra: str) -> jwe.JWE:
    """A JWE to ``recipients`` (key, alg); ``extra`` goes into the protected header."""
    shared = {"enc": enc, **extra}
    if len(recipients) == 1:
        (key, alg), *_ = recipients
        token = jwe.JWE(PAYLOAD, protected=json.dumps({"alg": alg, **shared}))
        token.add_recipient(_public(key))
        return token
    token = jwe.JWE(PAYLOAD, protected=json.dumps(shared))
    for key, alg in recipients:
        token.add_recipient(_public(key), header=json.dumps({"alg": alg}))
    return token


def _refused(token: str | bytes, key: jwk.JWK, **lists: tuple[str, ...]) -> JweFailure:
    with pytest.raises(JweError) as caught:
        unwrap_jwe(token, key, algs=lists.get("algs", EC_ALGS), encs=lists.get("encs", ENCS))
    return caught.value.failure


def test_the_compact_and_the_json_serialisations_decrypt(ec: jwk.JWK) -> None:
    token = _seal((ec, "ECDH-ES+A256KW"))
    assert unwrap_jwe(token.serialize(compact=True), ec, algs=EC_ALGS, encs=ENCS) == PAYLOAD
    assert unwrap_jwe(token.serialize().encode(), ec, algs=EC_ALGS, encs=ENCS) == PAYLOAD


def test_a_general_jwe_decrypts_through_the_recipient_in_the_lists(ec: jwk.JWK, rsa: jwk.JWK) -> None:
    """ocicrypt's shape: one JWE, one recipient per key; ours is found among the others."""
    other = jwk.JWK.generate(kty="EC", crv="P-256")
    token = _seal((other, "ECDH-ES+A256KW"), (rsa, "RSA-OAEP"), (ec, "ECDH-ES+A256KW")).serialize()
    assert unwrap_jwe(token, ec, algs=EC_ALGS, encs=ENCS) == PAYLOAD
    assert unwrap_jwe(token, rsa, algs=("RSA-OAEP",), encs=ENCS) == PAYLOAD


def test_an_alg_outside_the_callers_list_is_refused_before_decrypting(rsa: jwk.JWK) -> None:
    token = _seal((rsa, "RSA-OAEP")).serialize()
    assert _refused(token, rsa, algs=("RSA-OAEP-256",)) is JweFailure.ALGORITHM
    assert unwrap_jwe(token, rsa, algs=("RSA-OAEP",), encs=ENCS) == PAYLOAD  # the same, allowed


def test_an_enc_outside_the_callers_list_is_refused(ec: jwk.JWK) -> None:
    token = _seal((ec, "ECDH-ES+A256KW"), enc="A128GCM").serialize()
    assert _refused(token, ec) is JweFailure.ALGORITHM


def test_a_compressed_jwe_is_refused_even_with_allowed_algorithms(ec: jwk.JWK) -> None:
    token = _seal((ec, "ECDH-ES+A256KW"), zip="DEF")
    assert _refused(token.serialize(), ec) is JweFailure.COMPRESSED
    assert _refused(token.serialize(compact=True), ec) is JweFailure.COMPRESSED


def test_the_wrong_key_and_tampering_are_one_opaque_failure(ec: jwk.JWK) -> None:
    token = _seal((ec, "ECDH-ES+A256KW"))
    other = jwk.JWK.generate(kty="EC", crv="P-256")
    assert _refused(token.serialize(), other) is JweFailure.UNDECRYPTABLE
    head, key, iv, ciphertext, tag = token.serialize(compact=True).split(".")
    flipped = ("B" if ciphertext[0] == "A" else "A") + ciphertext[1:]
    tampered = ".".join((head, key, iv, flipped, tag))
    with pytest.raises(JweError, match="does not decrypt with this key") as caught:
        unwrap_jwe(tampered, ec, algs=EC_ALGS, encs=ENCS)
    assert caught.value.failure is JweFailure.UNDECRYPTABLE


@pytest.mark.parametrize("token", [b"\xff\xfe", "", "a.b.c.d.e", "{}", "[1, 2]", '{"protected": 1}'])
def test_what_is_not_a_jwe_is_malformed(ec: jwk.JWK, token: str | bytes) -> None:
    assert _refused(token, ec) is JweFailure.MALFORMED


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200)))
def test_arbitrary_input_gives_a_clean_error(token: str | bytes) -> None:
    key = jwk.JWK.generate(kty="oct", size=256)
    with pytest.raises(JweError):
        unwrap_jwe(token, key, algs=EC_ALGS, encs=ENCS)
