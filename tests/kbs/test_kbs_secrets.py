"""Key bytes, tokens and JWE plaintext never appear in log records or exception text."""

from __future__ import annotations

import base64
import logging
import traceback

import pytest

from attest.kbs.client import KbsClient
from attest.kbs.dev.jwe import seal
from attest.kbs.teekey import TeeKeyPair
from attest.keysource import KbsKeySource, ResourceUri
from attest.tee.sample.attester import UnsafeSampleAttester, UnsafeSampleDeviceAttester
from foundation.errors import Error, KeyAccessDenied, KeyUnwrapError, ResourceNotFound
from tests.kbs.conftest import MODEL_KEY, SECOND_KEY


def _forms(secret: bytes) -> list[str]:
    return [
        secret.hex(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
        secret.decode("latin-1"),
        repr(secret),
    ]


def _all_text(caplog: pytest.LogCaptureFixture, errors: list[BaseException]) -> str:
    parts = []
    for record in caplog.records:
        parts.append(record.getMessage())
        if record.exc_info:
            parts.append("".join(traceback.format_exception(*record.exc_info)))
    for exc in errors:
        parts.append(str(exc))
        parts.append("".join(traceback.format_exception(exc)))
        if isinstance(exc, Error):
            parts.append(exc.diagnostics())
    return "\n".join(parts)


def test_secrets_never_reach_logs_or_errors(
    kbs_url: str, caplog: pytest.LogCaptureFixture, sample_attester: UnsafeSampleAttester
) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[BaseException] = []
    source = KbsKeySource(
        url=kbs_url, attester=sample_attester, devices=[UnsafeSampleDeviceAttester(allow_insecure=True)]
    )
    first = source.fetch(ResourceUri.parse("kbs:///default/model/key"))
    second = source.fetch(ResourceUri.parse("kbs:///default/model/second"))
    token = source.client._token.value  # type: ignore[union-attr]  # test-only
    session = source.client._token.session_id  # type: ignore[union-attr]
    for uri in ("kbs:///default/restricted/key", "kbs:///default/model/nope"):
        with pytest.raises((KeyAccessDenied, ResourceNotFound)) as info:
            source.fetch(ResourceUri.parse(uri))
        errors.append(info.value)
    # A JWE that does not decrypt: its plaintext must not leak either.
    plaintext = b"jwe-plaintext-that-must-not-leak"
    with pytest.raises(KeyUnwrapError) as unwrap:
        source.client.tee_key.decrypt(seal(TeeKeyPair.generate("ec").public_key, plaintext))
    errors.append(unwrap.value)
    with KbsClient(url=kbs_url, attester=sample_attester) as other:
        other.get_resource("kbs:///default/model/key")

    text = _all_text(caplog, errors)
    assert first.secret.reveal() == MODEL_KEY and second.secret.reveal() == SECOND_KEY
    assert "fetched kbs:///default/model/key" in text  # the logs did capture the run
    for secret in (MODEL_KEY, SECOND_KEY, plaintext):
        for form in _forms(secret):
            assert form not in text
    assert token not in text
    for part in token.split("."):
        assert part not in text
    # httpcore's own DEBUG trace prints response headers, Set-Cookie included; nothing of ours does.
    ours = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("httpcore"))
    assert session not in ours
    assert "redacted" in repr(first.secret) and MODEL_KEY.hex() not in repr(first)
    assert token not in repr(source.client._token)
    source.close()
