"""The loader's extra config: socket, digest and per-rank capabilities, never a key in sight."""

from __future__ import annotations

import pytest

from attest.errors import ConfigError
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
