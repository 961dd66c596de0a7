"""The CDH and file key sources (the KBS source is covered by test_kbs_protocol)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from attest.kbs.retry import RetryPolicy
from attest.keysource import CdhKeySource, KeySource, ResourceUri, UnsafeFileKeySource
from foundation.errors import (
    ConfigError,
    KeyAccessDenied,
    KeyBrokerUnreachable,
    KeyRetrievalError,
    ResourceNotFound,
)
from tests.kbs.support import Reply, closed_port_url, scripted_server

KEY = ResourceUri.parse("kbs:///default/llama/key")


def _cdh(method: str, path: str, body: bytes) -> Reply:
    """Test double of api-server-rest's /cdh/resource endpoint."""
    if path == "/cdh/resource/default/llama/key":
        return Reply(body=b"cdh-released-key")
    if path == "/cdh/resource/default/llama/denied":
        return Reply(status=500, body=b"get resource failed: KBS UnAuthorized\n PolicyDeny")
    if path == "/cdh/resource/default/llama/forbidden":
        return Reply(status=403, body=b"FORBIDDEN")
    return Reply(status=404, body=b"URL NOT FOUND")


def test_cdh_source_fetches_through_the_local_endpoint() -> None:
    with scripted_server(_cdh) as cdh:
        source = CdhKeySource(url=cdh.url)
        release = source.fetch(KEY)
        source.close()
    assert isinstance(source, KeySource)
    assert release.secret.reveal() == b"cdh-released-key"
    assert release.source == "cdh" and release.receipt is None and not release.insecure
    assert cdh.hits == [("GET", "/cdh/resource/default/llama/key")]


@pytest.mark.parametrize(
    ("tag", "error", "text"),
    [
        ("denied", KeyRetrievalError, "PolicyDeny"),
        ("forbidden", KeyAccessDenied, "Kata agent policy"),
        ("missing", ResourceNotFound, "kbs:///default/llama/missing"),
    ],
)
def test_cdh_source_errors_are_explained(tag: str, error: type[Exception], text: str) -> None:
    with scripted_server(_cdh) as cdh, pytest.raises(error, match=text):
        CdhKeySource(url=cdh.url).fetch(ResourceUri.parse(f"kbs:///default/llama/{tag}"))


def test_cdh_down_is_unreachable_after_retries() -> None:
    slept: list[float] = []
    source = CdhKeySource(
        url=closed_port_url(),
        retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.1, jitter=0.0),
        sleep=slept.append,
    )
    with pytest.raises(KeyBrokerUnreachable, match="gave up after 3 attempt"):
        source.fetch(KEY)
    assert slept == [0.1, 0.2]


def test_cdh_refuses_plain_http_off_loopback() -> None:
    with pytest.raises(ConfigError, match="loopback"):
        CdhKeySource(url="http://10.0.0.5:8006")


def test_cdh_refuses_plugin_uris() -> None:
    with pytest.raises(ConfigError):
        CdhKeySource().fetch(ResourceUri.parse("kbs+pkcs11:///a/b/c"))


def test_file_source_refuses_without_the_insecure_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="insecure"):
        UnsafeFileKeySource(path=tmp_path / "key")


def test_file_source_warns_at_every_fetch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(b"k" * 32)
    caplog.set_level(logging.WARNING)
    source = UnsafeFileKeySource(path=key_file, allow_insecure=True)
    caplog.clear()
    for _ in range(2):
        release = source.fetch(KEY)
        assert release.secret.reveal() == b"k" * 32
        assert release.insecure and release.source == "file"
    assert sum("INSECURE" in r.getMessage() for r in caplog.records) == 2


def test_file_source_directory_layout(tmp_path: Path) -> None:
    (tmp_path / "default" / "llama").mkdir(parents=True)
    (tmp_path / "default" / "llama" / "key").write_bytes(b"dir-key")
    source = UnsafeFileKeySource(path=tmp_path, allow_insecure=True)
    assert source.fetch(KEY).secret.reveal() == b"dir-key"
    with pytest.raises(ResourceNotFound, match="kbs:///default/llama/other"):
        source.fetch(ResourceUri.parse("kbs:///default/llama/other"))
