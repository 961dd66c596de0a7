"""One factory for key sources, chosen by the address's scheme; the boot and ``kbs fetch`` share it."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest

from attest.keysource import (
    KEY_SOURCE_FOR_URI_SCHEME,
    CdhKeySource,
    KbsKeySource,
    KeySourceSpec,
    UnsafeFileKeySource,
    key_source_for,
)
from attest.tee.sample.attester import UnsafeSampleAttester
from foundation.errors import ConfigError
from runtime.boot import key_source_spec
from runtime.cli import build_parser
from runtime.commands.kbs import fetch_spec
from runtime.config import RunConfig

ATTESTER = UnsafeSampleAttester(allow_insecure=True)


def test_the_registry_is_keyed_by_the_key_source_names() -> None:
    assert sorted(KEY_SOURCE_FOR_URI_SCHEME) == ["cdh", "file", "kbs"]


def test_the_factory_picks_the_source_by_scheme(tmp_path: Path) -> None:
    kbs = key_source_for(KeySourceSpec(uri="kbs+https://kbs.example:8080"), attester=ATTESTER)
    assert isinstance(kbs, KbsKeySource) and kbs.client.url == "https://kbs.example:8080"
    kbs.close()
    plain = key_source_for(KeySourceSpec.kbs("http://127.0.0.1:8080"), attester=ATTESTER)
    assert isinstance(plain, KbsKeySource) and plain.client.url == "http://127.0.0.1:8080"
    plain.close()
    cdh = key_source_for(KeySourceSpec(uri="cdh+http://127.0.0.1:8006"))
    assert isinstance(cdh, CdhKeySource) and cdh.url == "http://127.0.0.1:8006"
    cdh.close()
    (tmp_path / "my key").write_bytes(b"k" * 32)
    spec = KeySourceSpec.file(tmp_path / "my key", allow_insecure=True)
    assert spec.uri.startswith("file:///") and "%20" in spec.uri
    source = key_source_for(spec)
    assert isinstance(source, UnsafeFileKeySource)
    from foundation.resource import ResourceUri

    assert source.fetch(ResourceUri.parse("kbs:///a/b/c")).secret.reveal() == b"k" * 32


@pytest.mark.parametrize(
    "uri",
    ["s3://bucket/key", "vault+https://v.example", "kbs.example:8080", "https://kbs.example", ""],
)
def test_an_unknown_scheme_is_refused_naming_the_forms(uri: str) -> None:
    with pytest.raises(ConfigError, match="unknown key source") as info:
        key_source_for(KeySourceSpec(uri=uri), attester=ATTESTER)
    assert "kbs+https://HOST" in str(info.value) and "file:///PATH" in str(info.value)


def test_a_kbs_address_without_its_transport_is_refused() -> None:
    # kbs:///repo/type/tag is a resource URI, not a key source: the transport must be said.
    with pytest.raises(ConfigError, match=r"kbs\+https:// or kbs\+http://"):
        key_source_for(KeySourceSpec(uri="kbs://kbs.example:8080"), attester=ATTESTER)
    with pytest.raises(ConfigError, match="file:///ABSOLUTE/PATH"):
        key_source_for(KeySourceSpec(uri="file://otherhost/key", allow_insecure_file=True))


def test_the_kbs_needs_an_attester() -> None:
    with pytest.raises(ConfigError, match="needs its attester"):
        key_source_for(KeySourceSpec.kbs("https://kbs.example"))


def test_the_file_source_keeps_its_explicit_flag_and_its_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConfigError, match="explicit insecure flag"):
        key_source_for(KeySourceSpec.file(tmp_path / "key", allow_insecure=False))
    with caplog.at_level(logging.WARNING):
        key_source_for(KeySourceSpec.file(tmp_path / "key", allow_insecure=True))
    assert "INSECURE: the model key comes from a local file" in caplog.text


def test_the_cdh_off_loopback_is_still_refused() -> None:
    with pytest.raises(ConfigError, match="not a loopback address"):
        key_source_for(KeySourceSpec.cdh("http://10.0.0.1:8006"))


def _fetch_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["kbs", "fetch", "kbs:///default/llama/key", *argv])


def test_kbs_fetch_and_the_boot_get_the_same_source_for_the_same_settings(tmp_path: Path) -> None:
    from server.tls import generate_enclave_tls

    ca = tmp_path / "ca.pem"
    ca.write_bytes(generate_enclave_tls().cert_pem)
    url = "https://kbs.example:8080"
    args = _fetch_args("--url", url, "--cacert", str(ca), "--tee-key", "rsa", "--deadline", "12")
    config = RunConfig(model="/m", kbs_url=url, kbs_cacert=ca, tee_key="rsa", kbs_deadline_s=12.0)
    from_boot = key_source_spec(config, cacert=ca, init_data=None)
    assert fetch_spec(args) == from_boot
    fetched, booted = (key_source_for(spec, attester=ATTESTER) for spec in (fetch_spec(args), from_boot))
    assert type(fetched) is type(booted) is KbsKeySource
    assert isinstance(fetched, KbsKeySource) and isinstance(booted, KbsKeySource)
    assert fetched.client.url == booted.client.url == url
    fetched.close()
    booted.close()


def test_the_boot_names_each_configured_source_by_its_scheme(tmp_path: Path) -> None:
    def spec(**kw: object) -> KeySourceSpec:
        return key_source_spec(RunConfig(model="/m", **kw), cacert=None, init_data=b"init")  # type: ignore[arg-type]

    assert spec(kbs_url="http://127.0.0.1:1").scheme == "kbs"
    assert spec(kbs_url="http://127.0.0.1:1").init_data == b"init"
    assert spec(key_source="cdh").uri == "cdh+http://127.0.0.1:8006"
    file = spec(key_source="file", key_file=tmp_path / "k", allow_insecure_key_file=True)
    assert file.scheme == "file" and file.allow_insecure_file
    with pytest.raises(ConfigError, match="unknown key source"):
        key_source_for(spec(key_source="vault"))
