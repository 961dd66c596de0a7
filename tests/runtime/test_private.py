"""The guest-private directory: only on a memory-backed filesystem, fresh and 0700 each boot."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from attest.errors import ConfigError
from runtime.private import PrivateDirectory, filesystem_type

MOUNTINFO = """\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:25 / /dev/shm rw,nosuid,nodev shared:4 - tmpfs tmpfs rw,size=65536k
41 22 0:40 / /models ro,relatime shared:9 - virtiofs kataShared ro
42 41 0:41 / /models/cache rw - tmpfs tmpfs rw
43 22 0:42 / /mnt/with\\040space rw - 9p hostshare rw
"""


@pytest.mark.parametrize(
    ("path", "fs"),
    [
        ("/dev/shm", "tmpfs"),
        ("/dev/shm/x/y", "tmpfs"),
        ("/models", "virtiofs"),
        ("/models/tiny", "virtiofs"),
        ("/models/cache/z", "tmpfs"),
        ("/modelsx", "ext4"),
        ("/mnt/with space/a", "9p"),
        ("/", "ext4"),
    ],
)
def test_filesystem_type_picks_the_innermost_mount(path: str, fs: str) -> None:
    assert filesystem_type(Path(path), mountinfo=MOUNTINFO) == fs


def test_a_host_backed_base_is_refused(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    info = f"22 1 253:0 / / rw - ext4 /dev/vda rw\n41 22 0:40 / {tmp_path} rw - virtiofs kataShared rw\n"
    with pytest.raises(ConfigError, match=r"is on virtiofs, not in guest memory"):
        PrivateDirectory.create(tmp_path / "models", mountinfo=info)


def test_created_fresh_private_and_removed() -> None:
    shm = Path("/dev/shm")
    if filesystem_type(shm) != "tmpfs":
        pytest.skip("this machine has no tmpfs at /dev/shm")
    a, b = PrivateDirectory.create(shm), PrivateDirectory.create(shm)
    try:
        assert a.root != b.root and a.filesystem == "tmpfs"
        assert stat.S_IMODE(a.root.stat().st_mode) == 0o700
        for name in ("cache", "config", "home", "tmp"):
            assert stat.S_IMODE(a.sub(name).stat().st_mode) == 0o700
        assert a.key_dir.is_dir() and not a.model_view.exists()
    finally:
        a.remove()
        b.remove()
    assert not a.root.exists()
    a.remove()  # idempotent


def test_a_missing_base_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        PrivateDirectory.create(tmp_path / "nope")
