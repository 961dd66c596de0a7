"""The loader's extra config: socket, digest and per-rank capabilities, never a key in sight."""

from __future__ import annotations

import pytest

from foundation.errors import ConfigError
from loader.vllm_plugin import EncryptedLoaderConfig

DIGEST = "sha256:" + "ab" * 32
CAPS = ["11" * 32, "22" * 32]


def test_capability_of_each_rank_and_none_beyond() -> None:
    options = EncryptedLoaderConfig.from_extra(
        {"key_socket": "/dev/shm/x/key.sock", "manifest_digest": DIGEST, "capabilities": CAPS}
    )
    assert options.capability(0) == CAPS[0] and options.capability(1) == CAPS[1]
    with pytest.raises(ConfigError, match="outside the 2 rank"):
        options.capability(2)
    assert CAPS[0] not in repr(options)
    assert options.staging.mode == "pinned" and options.staging.slots is None


def test_staging_options_reach_the_engine() -> None:
    options = EncryptedLoaderConfig.from_extra(
        {
            "key_socket": "/s",
            "manifest_digest": DIGEST,
            "capabilities": CAPS,
            "staging": "pageable",
            "staging_slots": 6,
        }
    )
    assert (options.staging.mode, options.staging.slots) == ("pageable", 6)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"key_socket": "/s", "manifest_digest": DIGEST}, "needs 'capabilities'"),
        ({"key_socket": "/s", "manifest_digest": DIGEST, "capabilities": []}, "needs 'capabilities'"),
        ({"key_socket": "/s", "manifest_digest": DIGEST, "capabilities": [1]}, "needs 'capabilities'"),
        ({"key_socket": "", "manifest_digest": DIGEST, "capabilities": CAPS}, "needs 'key_socket'"),
        ({"key_socket": "/s", "manifest_digest": "md5:x", "capabilities": CAPS}, "needs 'manifest_digest'"),
        ({"key_socket": "/s", "manifest_digest": DIGEST, "capabilities": CAPS, "key": "x"}, "unknown"),
        ({"key_socket": "/s", "manifest_digest": DIGEST, "capabilities": CAPS, "staging": "x"}, "'staging'"),
        (
            {"key_socket": "/s", "manifest_digest": DIGEST, "capabilities": CAPS, "staging_slots": True},
            "'staging_slots'",
        ),
    ],
)
def test_incomplete_or_unknown_options_are_refused(extra: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EncryptedLoaderConfig.from_extra(extra)


def test_each_rank_decrypts_with_its_share_of_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import loader.vllm_plugin as plugin

    monkeypatch.setattr(plugin, "default_threads", lambda: 16)
    options = EncryptedLoaderConfig.from_extra(
        {"key_socket": "/s", "manifest_digest": DIGEST, "capabilities": CAPS}
    )
    assert options.engine_options(1)["threads"] == 16
    assert options.engine_options(4)["threads"] == 4
    assert options.engine_options(32)["threads"] == 1
    configured = EncryptedLoaderConfig.from_extra(
        {"key_socket": "/s", "manifest_digest": DIGEST, "capabilities": CAPS, "threads": 3}
    )
    assert configured.engine_options(8)["threads"] == 3  # a configured count is per rank, as given


def test_the_engine_crash_dump_logs_no_request_data(caplog: pytest.LogCaptureFixture) -> None:
    """vLLM's dump prints sampling parameters and the config; after register() nothing of them."""
    import logging
    from types import SimpleNamespace

    import vllm.v1.engine.core as core
    from vllm.logging_utils import dump_input

    from loader.vllm_plugin import scrub_engine_dumps

    request = SimpleNamespace(sampling_params=SimpleNamespace(stop=["SECRET-STOP-STRING"]))
    output = SimpleNamespace(scheduled_new_reqs=[request])
    config = SimpleNamespace(capabilities=["CAPABILITY-0123"])
    original = dump_input._dump_engine_exception
    with caplog.at_level(logging.ERROR):
        original(config, output, None)  # type: ignore[arg-type]  # the control: it does leak
    assert "SECRET-STOP-STRING" in caplog.text
    caplog.clear()
    scrub_engine_dumps()
    with caplog.at_level(logging.ERROR):
        core.dump_engine_exception(config, output, None)  # type: ignore[arg-type]
        dump_input.dump_engine_exception(config, output, None)  # type: ignore[arg-type]
    assert "SECRET-STOP-STRING" not in caplog.text and "CAPABILITY-0123" not in caplog.text
    assert "input dump is suppressed" in caplog.text
