"""Every KBS failure carries its cause: the address, what answered there, how long it was tried.

Against real local servers (a plain-HTTP scripted server, kbs-dev over TLS, a closed port); time
and jitter are injected, so nothing waits for real.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from attest.kbs.client import KbsClient
from attest.kbs.dev.server import DevKbsConfig, ResourceStore
from attest.kbs.http import check_base_url, normalize_base_url
from attest.kbs.retry import Deadline, RetryPolicy, call_with_retries
from attest.tee.sample.attester import UnsafeSampleAttester
from foundation.errors import ConfigError, KeyBrokerUnreachable
from foundation.secret import SecretBytes
from runtime.settings import resolve
from tests.kbs.conftest import MODEL_KEY
from tests.kbs.support import (
    ADMIN_TOKEN,
    Reply,
    SteppedTime,
    closed_port_url,
    make_pki,
    run_dev_kbs,
    scripted_server,
)


def _client(url: str, stepped: SteppedTime, **kwargs: Any) -> KbsClient:
    return KbsClient(
        url=url,
        attester=UnsafeSampleAttester(allow_insecure=True),
        clock=stepped.clock,
        sleep=stepped.sleep,
        **kwargs,
    )


# -- transport errors name the address and what answered ---------------------------------------


def test_https_to_a_plain_http_kbs_says_use_http_and_is_not_retried() -> None:
    stepped = SteppedTime()
    with scripted_server(lambda m, p, b: Reply(status=200, body=b"{}")) as plain:
        address = plain.url.removeprefix("http://")
        with (
            _client(f"https://{address}", stepped, deadline_s=120.0) as client,
            pytest.raises(KeyBrokerUnreachable) as info,
        ):
            client.attest()
    message = str(info.value)
    assert f"the server at {address} answered plain HTTP to a TLS handshake: use http://{address}" in message
    assert stepped.sleeps == []  # a misconfiguration: retrying for 120 s would not fix it
    assert "gave up" not in message


def test_http_to_a_tls_kbs_names_the_address_and_suggests_https(tmp_path: Path) -> None:
    pki = make_pki(tmp_path, "kbs")
    config = DevKbsConfig(
        admin_token=SecretBytes(ADMIN_TOKEN),
        resources=ResourceStore({"default/model/key": MODEL_KEY}),
        allow_insecure_sample_evidence=True,
    )
    stepped = SteppedTime()
    retry = RetryPolicy(max_attempts=2, jitter=0.0)
    with run_dev_kbs(config, certfile=pki.cert_pem, keyfile=pki.key_pem) as url:
        address = url.removeprefix("https://")
        with (
            _client(f"http://{address}", stepped, retry=retry) as client,
            pytest.raises(KeyBrokerUnreachable) as info,
        ):
            client.attest()
    assert (
        f"http://{address} closed the connection without an HTTP answer (a TLS port? then use https://{address})"
        in str(info.value)
    )


def test_connection_refused_is_named_with_the_address() -> None:
    stepped = SteppedTime()
    url = closed_port_url()
    with (
        _client(url, stepped, retry=RetryPolicy(max_attempts=2, jitter=0.0)) as client,
        pytest.raises(KeyBrokerUnreachable) as info,
    ):
        client.attest()
    assert f"last error: connection refused by {url}: nothing listens there" in str(info.value)


# -- retries last the deadline they state --------------------------------------------------------


def test_a_kbs_outage_is_retried_for_the_whole_stated_deadline() -> None:
    stepped = SteppedTime()
    with (
        _client(closed_port_url(), stepped, deadline_s=120.0) as client,
        pytest.raises(KeyBrokerUnreachable) as info,
    ):
        client.attest()
    message = str(info.value)
    assert sum(stepped.sleeps) == pytest.approx(120.0)  # not ~4 s of five quick attempts
    attempts = len(stepped.sleeps)  # the last pause ends at the deadline
    assert attempts > 5
    assert f"gave up after {attempts} attempt(s) over 120.0s (the 120s deadline)" in message


def test_a_kbs_that_comes_back_within_the_deadline_is_reached() -> None:
    stepped = SteppedTime()
    answers = iter([503] * 12)

    def flaky(timeout: float) -> str:
        status = next(answers, 200)
        if status != 200:
            from attest.kbs.retry import TransientFault

            raise TransientFault(f"HTTP {status}")
        return "served"

    result = call_with_retries(
        flaky,
        what="fetching",
        deadline=Deadline(120.0, clock=stepped.clock),
        policy=RetryPolicy(),
        sleep=stepped.sleep,
    )
    assert result == "served"
    assert len(stepped.sleeps) == 12
    assert 20.0 < sum(stepped.sleeps) < 120.0  # reached after ~1 min of a KBS restart


def test_backoff_is_exponential_capped_and_jittered_by_the_injected_random() -> None:
    low = RetryPolicy(initial_backoff_s=1.0, max_backoff_s=8.0, jitter=0.25, random=lambda: 0.0)
    high = RetryPolicy(initial_backoff_s=1.0, max_backoff_s=8.0, jitter=0.25, random=lambda: 1.0)
    assert [low.backoff(n) for n in (1, 2, 3, 4, 5, 60)] == [0.75, 1.5, 3.0, 6.0, 6.0, 6.0]
    assert [high.backoff(n) for n in (1, 2, 3, 4, 5)] == [1.25, 2.5, 5.0, 10.0, 10.0]
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(jitter=1.5)


def test_an_attempt_limit_says_it_stopped_before_the_deadline() -> None:
    stepped = SteppedTime()
    retry = RetryPolicy(max_attempts=3, initial_backoff_s=1.0, jitter=0.0)
    with (
        _client(closed_port_url(), stepped, retry=retry, deadline_s=120.0) as client,
        pytest.raises(KeyBrokerUnreachable) as info,
    ):
        client.attest()
    assert (
        "gave up after 3 attempt(s) over 3.0s (the retry policy's limit of 3 attempt(s), before the 120s deadline)"
        in str(info.value)
    )


# -- URLs are checked when they are given --------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("kbs.example:8080", "has no scheme: give http://kbs.example:8080 (development only"),
        ("127.0.0.1:8080", "has no scheme: give http://127.0.0.1:8080"),
        ("ftp://kbs.example", "has the scheme ftp://; only http:// and https:// are supported"),
        ("https://kbs.example:99999", "has an invalid port"),
        ("https://", "names no host"),
        ("https://kbs.example/?x=1", "carries a query or fragment"),
    ],
)
def test_a_bad_kbs_url_is_refused_with_what_to_give(url: str, expected: str) -> None:
    problem = check_base_url(url, what="KBS", setting="--kbs-url")
    assert problem.startswith(f"KBS URL {url!r} (--kbs-url) ")
    assert expected in problem
    with pytest.raises(ConfigError, match="KBS URL"):
        normalize_base_url(url, what="KBS")


def test_a_good_kbs_url_passes() -> None:
    assert check_base_url("https://kbs.example:8080", what="KBS") == ""
    assert normalize_base_url("http://127.0.0.1:8080/", what="KBS") == "http://127.0.0.1:8080"


def test_a_kbs_url_without_a_scheme_is_refused_when_the_settings_are_resolved() -> None:
    given = {"model": "/models/m", "kbs_url": "kbs.example:8080"}
    with pytest.raises(ConfigError) as info:
        resolve(given, None)
    assert "KBS URL 'kbs.example:8080' (--kbs-url) has no scheme: give http://kbs.example:8080" in str(
        info.value
    )
    assert "https://kbs.example:8080" in str(info.value)


def test_a_bad_cdh_url_is_refused_when_the_settings_are_resolved() -> None:
    with pytest.raises(ConfigError, match=r"CDH URL '127\.0\.0\.1:8006' \(--cdh-url\) has no scheme"):
        resolve({"model": "/models/m", "key_source": "cdh", "cdh_url": "127.0.0.1:8006"}, None)


def test_a_good_kbs_url_resolves() -> None:
    config, pins = resolve({"model": "/models/m", "kbs_url": "https://kbs.example:8080"}, None)
    assert config.kbs_url == "https://kbs.example:8080" and pins is None
