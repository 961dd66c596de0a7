"""Network faults and hostile answers, against real local HTTP servers (test doubles)."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from attest.kbs.client import KbsClient
from attest.kbs.dev.jwe import seal
from attest.kbs.dev.server import DevKbsConfig, ResourceStore
from attest.kbs.retry import RetryPolicy
from attest.kbs.teekey import TeeKeyPair
from attest.kbs.wire import ErrorType
from attest.tee.sample.attester import UnsafeSampleAttester
from foundation.errors import (
    KeyAccessDenied,
    KeyBrokerProtocolError,
    KeyBrokerUnreachable,
    KeyUnwrapError,
    ResourceNotFound,
)
from foundation.secret import SecretBytes
from tests.kbs.conftest import MODEL_KEY
from tests.kbs.support import (
    ADMIN_TOKEN,
    Handler,
    Reply,
    SteppedTime,
    closed_port_url,
    make_pki,
    run_dev_kbs,
    scripted_server,
)

FAST = RetryPolicy(
    max_attempts=4, initial_backoff_s=0.5, max_backoff_s=2.0, jitter=0.0, request_timeout_s=5.0
)


@pytest.fixture
def stepped_time() -> SteppedTime:
    return SteppedTime()


def _client(url: str, stepped: SteppedTime, **kwargs: object) -> KbsClient:
    values: dict[str, object] = {
        "url": url,
        "attester": UnsafeSampleAttester(allow_insecure=True),
        "retry": FAST,
        "deadline_s": 10.0,
        "clock": stepped.clock,
        "sleep": stepped.sleep,
    }
    values.update(kwargs)
    return KbsClient(**values)  # type: ignore[arg-type]


def _challenge() -> Reply:
    body = json.dumps({"nonce": base64.b64encode(b"\7" * 32).decode(), "extra-params": ""}).encode()
    return Reply(body=body, headers={"content-type": "application/json", "set-cookie": "kbs-session-id=abc"})


def _error(kind: ErrorType, detail: str, status: int = 401) -> Reply:
    return Reply(status=status, body=json.dumps({"type": kind.uri, "detail": detail}).encode())


def test_kbs_down_retries_a_bounded_number_of_times_then_gives_up(stepped_time: SteppedTime) -> None:
    with _client(closed_port_url(), stepped_time) as client, pytest.raises(KeyBrokerUnreachable) as info:
        client.get_resource("kbs:///default/model/key")
    message = str(info.value)
    assert "gave up after 4 attempt(s) over 3.5s (the retry policy's limit of 4 attempt(s)" in message
    assert "connection refused by http://127.0.0.1:" in message
    assert stepped_time.sleeps == [0.5, 1.0, 2.0]  # exponential backoff, capped, 3 pauses for 4 attempts


def test_kbs_down_respects_the_deadline(stepped_time: SteppedTime) -> None:
    policy = RetryPolicy(max_attempts=100, initial_backoff_s=1.0, max_backoff_s=4.0)
    with (
        _client(closed_port_url(), stepped_time, retry=policy, deadline_s=6.0) as client,
        pytest.raises(KeyBrokerUnreachable, match=r"over 6\.0s \(the 6s deadline\)"),
    ):
        client.attest()
    assert sum(stepped_time.sleeps) == pytest.approx(6.0)  # the whole deadline, not a second more
    assert len(stepped_time.sleeps) < 100


def test_slow_kbs_hits_the_deadline() -> None:
    with scripted_server(lambda m, p, b: Reply(delay_s=3.0, body=b"{}")) as kbs:
        start = time.monotonic()
        client = KbsClient(url=kbs.url, attester=UnsafeSampleAttester(allow_insecure=True), deadline_s=0.6)
        with client, pytest.raises(KeyBrokerUnreachable, match="timed out"):
            client.attest()
        elapsed = time.monotonic() - start
    assert elapsed < 2.0


def test_500_is_retried_then_reported(stepped_time: SteppedTime) -> None:
    with (
        scripted_server(lambda m, p, b: Reply(status=500, body=b"internal")) as kbs,
        _client(kbs.url, stepped_time) as client,
        pytest.raises(KeyBrokerUnreachable, match="HTTP 500"),
    ):
        client.attest()
    assert kbs.hits == [("POST", "/kbs/v0/auth")] * 4


def test_500_then_recovery_succeeds(stepped_time: SteppedTime) -> None:
    config = DevKbsConfig(
        admin_token=SecretBytes(ADMIN_TOKEN),
        resources=ResourceStore({"default/model/key": MODEL_KEY}),
        allow_insecure_sample_evidence=True,
    )
    with run_dev_kbs(config) as real:
        import httpx

        failures = iter([True, True, False, False, False, False])

        def flaky(method: str, path: str, body: bytes) -> Reply:
            if next(failures, False):
                return Reply(status=503)
            upstream = httpx.request(
                method,
                real + path,
                content=body,
                headers={"cookie": "kbs-session-id=" + _cookie_jar.get("id", "")},
            )
            if "set-cookie" in upstream.headers:
                _cookie_jar["id"] = upstream.cookies["kbs-session-id"]
            headers = {"content-type": "application/json"}
            if "set-cookie" in upstream.headers:
                headers["set-cookie"] = upstream.headers["set-cookie"]
            return Reply(status=upstream.status_code, body=upstream.content, headers=headers)

        _cookie_jar: dict[str, str] = {}
        with scripted_server(flaky) as proxy, _client(proxy.url, stepped_time) as client:
            assert client.get_resource("kbs:///default/model/key").reveal() == MODEL_KEY
    assert stepped_time.sleeps == [0.5, 1.0]


def test_garbage_challenge_is_a_protocol_error(stepped_time: SteppedTime) -> None:
    garbage = Reply(body=b"<html>not a kbs</html>", headers={"set-cookie": "kbs-session-id=x"})
    with scripted_server(lambda m, p, b: garbage) as kbs, _client(kbs.url, stepped_time) as client:
        with pytest.raises(KeyBrokerProtocolError, match="outside the protocol"):
            client.attest()
        assert len(kbs.hits) == 1  # not retried


def test_missing_session_cookie_is_a_protocol_error(stepped_time: SteppedTime) -> None:
    no_cookie = Reply(body=_challenge().body)
    with (
        scripted_server(lambda m, p, b: no_cookie) as kbs,
        _client(kbs.url, stepped_time) as client,
        pytest.raises(KeyBrokerProtocolError, match="kbs-session-id"),
    ):
        client.attest()


def test_version_mismatch_from_a_trustee_kbs(stepped_time: SteppedTime) -> None:
    detail = (
        "Attestation error: RCAR handshake Auth failed: KBS Client Protocol Version Mismatch: expect =0.2.0 "
        "while the request is 0.4.0"
    )
    with (
        scripted_server(lambda m, p, b: _error(ErrorType.ATTESTATION, detail)) as kbs,
        _client(kbs.url, stepped_time) as client,
        pytest.raises(KeyBrokerProtocolError) as info,
    ):
        client.attest()
    assert "does not speak KBS protocol 0.4.0" in str(info.value)
    assert "expect =0.2.0" in str(info.value)


def _scripted_kbs(resource_reply: Reply) -> Handler:
    def handler(method: str, path: str, body: bytes) -> Reply:
        if path == "/kbs/v0/auth":
            return _challenge()
        if path == "/kbs/v0/attest":
            return Reply(body=b'{"token":"e30.e30.sig"}', headers={"content-type": "application/json"})
        return resource_reply

    return handler


def _fetch_from_script(reply: Reply, stepped: SteppedTime) -> None:
    with scripted_server(_scripted_kbs(reply)) as kbs, _client(kbs.url, stepped) as client:
        client.get_resource("kbs:///default/model/key")


def test_jwe_for_another_key_fails_closed(stepped_time: SteppedTime) -> None:
    wrong = seal(TeeKeyPair.generate("ec").public_key, b"not for you")
    reply = Reply(body=json.dumps(wrong.to_json()).encode(), headers={"content-type": "application/json"})
    with pytest.raises(KeyUnwrapError, match="does not decrypt"):
        _fetch_from_script(reply, stepped_time)


def test_garbage_resource_body_is_a_protocol_error(stepped_time: SteppedTime) -> None:
    with pytest.raises(KeyBrokerProtocolError, match="JweResponse"):
        _fetch_from_script(Reply(body=b'{"ciphertext": 5}'), stepped_time)


def test_trustee_plugin_internal_error_is_reported_as_probably_missing(stepped_time: SteppedTime) -> None:
    with pytest.raises(ResourceNotFound, match="kbs:///default/model/key"):
        _fetch_from_script(_error(ErrorType.PLUGIN_INTERNAL, "Plugin internal error"), stepped_time)


def test_error_without_rfc7807_body_is_reported(stepped_time: SteppedTime) -> None:
    with pytest.raises(KeyAccessDenied, match="HTTP 403 without an RFC 7807 error body"):
        _fetch_from_script(Reply(status=403, body=b"forbidden"), stepped_time)


@pytest.fixture(scope="module")
def https_kbs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    directory = tmp_path_factory.mktemp("pki")
    good = make_pki(directory, "good")
    other = make_pki(directory, "other")
    config = DevKbsConfig(
        admin_token=SecretBytes(ADMIN_TOKEN),
        resources=ResourceStore({"default/model/key": MODEL_KEY}),
        allow_insecure_sample_evidence=True,
    )
    with run_dev_kbs(config, certfile=good.cert_pem, keyfile=good.key_pem) as url:
        yield url, good.ca_pem, other.ca_pem


def test_https_with_pinned_ca(https_kbs: tuple[str, Path, Path], stepped_time: SteppedTime) -> None:
    url, ca, _ = https_kbs
    with _client(url, stepped_time, cacert=ca) as client:
        assert client.get_resource("kbs:///default/model/key").reveal() == MODEL_KEY


def test_https_with_wrong_ca_is_refused_without_retry(
    https_kbs: tuple[str, Path, Path], stepped_time: SteppedTime
) -> None:
    url, _, wrong_ca = https_kbs
    with (
        _client(url, stepped_time, cacert=wrong_ca) as client,
        pytest.raises(KeyBrokerUnreachable, match="TLS certificate verification failed"),
    ):
        client.attest()
    assert stepped_time.sleeps == []
