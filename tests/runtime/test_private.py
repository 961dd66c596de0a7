"""The guest-private directory: in guest memory, not the pod-wide /dev/shm, safe from other users,
fresh and 0700 each boot.

The tests run as root on a plain Linux machine whose only tmpfs is ``/dev/shm``: a base under
``/dev/shm`` stands for the memory ``emptyDir`` (with ``allow_insecure_shared`` where the test is
not about the filesystem), and a directory under ``tmp_path`` with a mount table saying ``tmpfs``
for a dedicated memory filesystem. Other containers of the pod are simulated by child processes
that drop to another uid (``os.setuid``); those tests need root and skip without it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from foundation.errors import ConfigError
from runtime.config import DEFAULT_PRIVATE_DIR, RunConfig
from runtime.private import SHARED_MEMORY, PrivateDirectory, filesystem_type

REPO = Path(__file__).resolve().parents[2]
#: Another container's user (``nobody``) and the image's runtime user (Containerfile).
OTHER_UID = 65534
RUNTIME_UID = 10001

MOUNTINFO = """\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:25 / /dev/shm rw,nosuid,nodev shared:4 - tmpfs tmpfs rw,size=65536k
41 22 0:40 / /models ro,relatime shared:9 - virtiofs kataShared ro
42 41 0:41 / /models/cache rw - tmpfs tmpfs rw
43 22 0:42 / /mnt/with\\040space rw - 9p hostshare rw
"""

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changes owners and drops to other uids")


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


@pytest.fixture
def shm_base() -> Iterator[Path]:
    """A fresh ``1777`` directory on the real ``/dev/shm`` (how a tmpfs or memory emptyDir arrives)."""
    if filesystem_type(SHARED_MEMORY) not in ("tmpfs", "ramfs"):
        pytest.skip("this machine has no tmpfs at /dev/shm")
    base = Path(tempfile.mkdtemp(prefix="es-test-base-", dir=SHARED_MEMORY))
    os.chmod(base, 0o1777)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def memory_base(tmp_path: Path) -> tuple[Path, str]:
    """A directory on another filesystem than /dev/shm, and a mount table that says it is a tmpfs."""
    base = tmp_path / "run-enclave-serve"
    base.mkdir(mode=0o700)
    info = f"22 1 253:0 / / rw - ext4 /dev/vda rw\n50 22 0:50 / {base} rw - tmpfs tmpfs rw\n"
    return base, info


def test_the_default_is_a_dedicated_mount_point_not_dev_shm() -> None:
    assert Path("/run/enclave-serve") == DEFAULT_PRIVATE_DIR
    assert not DEFAULT_PRIVATE_DIR.is_relative_to(SHARED_MEMORY)


def test_a_host_backed_base_is_refused(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    info = f"22 1 253:0 / / rw - ext4 /dev/vda rw\n41 22 0:40 / {tmp_path} rw - virtiofs kataShared rw\n"
    with pytest.raises(ConfigError, match=r"is on virtiofs, not in guest memory"):
        PrivateDirectory.create(tmp_path / "models", mountinfo=info)


def test_a_base_on_the_image_filesystem_is_refused(tmp_path: Path) -> None:
    # The image's /run/enclave-serve without the emptyDir mounted over it.
    info = "22 1 0:60 / / rw - overlay overlay rw,lowerdir=/a,upperdir=/b,workdir=/c\n"
    with pytest.raises(ConfigError, match=r"is on overlay, not in guest memory.*emptyDir"):
        PrivateDirectory.create(tmp_path, mountinfo=info)


def test_a_missing_base_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        PrivateDirectory.create(tmp_path / "nope")


def test_a_base_on_the_pod_wide_dev_shm_is_refused(shm_base: Path) -> None:
    with pytest.raises(ConfigError, match="every container of the pod shares"):
        PrivateDirectory.create(shm_base)
    with pytest.raises(ConfigError, match="every container of the pod shares"):
        PrivateDirectory.create(SHARED_MEMORY)
    assert not list(shm_base.iterdir())  # refused before anything was created


def test_a_path_leading_into_dev_shm_is_refused(shm_base: Path, tmp_path: Path) -> None:
    # A symbolic link (like a bind mount, same device) is judged by where it leads.
    link = tmp_path / "run-enclave-serve"
    link.symlink_to(shm_base)
    with pytest.raises(ConfigError, match="every container of the pod shares"):
        PrivateDirectory.create(link)


def test_dev_shm_only_with_the_insecure_flag_and_a_warning(
    shm_base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="runtime.private"):
        private = PrivateDirectory.create(shm_base, allow_insecure_shared=True)
    try:
        assert private.root.parent == shm_base and private.filesystem == "tmpfs"
        assert any("INSECURE" in r.getMessage() and "/dev/shm" in r.getMessage() for r in caplog.records)
    finally:
        private.remove()


def test_the_shared_dev_shm_flag_is_an_attested_insecure_mode(tmp_path: Path) -> None:
    config = RunConfig(model=str(tmp_path), allow_insecure_shared_private_dir=True)
    assert any("/dev/shm" in mode for mode in config.insecure_modes)
    from runtime.settings import declared_settings

    assert declared_settings(config, kbs_ca_pem=None)["allow_insecure_shared_private_dir"] is True
    assert not any("/dev/shm" in mode for mode in RunConfig(model=str(tmp_path)).insecure_modes)


def test_a_dedicated_memory_base_needs_no_flag(memory_base: tuple[Path, str]) -> None:
    base, info = memory_base
    private = PrivateDirectory.create(base, mountinfo=info)
    try:
        assert private.root.parent == base and private.filesystem == "tmpfs"
        status = private.root.stat()
        assert status.st_uid == os.geteuid() and stat.S_IMODE(status.st_mode) == 0o700
    finally:
        private.remove()


def test_created_fresh_private_and_removed(shm_base: Path) -> None:
    a = PrivateDirectory.create(shm_base, allow_insecure_shared=True)
    b = PrivateDirectory.create(shm_base, allow_insecure_shared=True)
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


@needs_root
def test_a_base_owned_by_another_user_is_refused(memory_base: tuple[Path, str]) -> None:
    base, info = memory_base
    os.chown(base, OTHER_UID, OTHER_UID)
    with pytest.raises(ConfigError, match=f"belongs to uid {OTHER_UID}"):
        PrivateDirectory.create(base, mountinfo=info)


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o2777, 0o757])
def test_a_base_others_can_write_without_the_sticky_bit_is_refused(
    memory_base: tuple[Path, str], mode: int
) -> None:
    base, info = memory_base
    os.chmod(base, mode)
    with pytest.raises(ConfigError, match="writable by other users without the sticky bit"):
        PrivateDirectory.create(base, mountinfo=info)


@needs_root
@pytest.mark.parametrize("mode", [0o1777, 0o3777, 0o700, 0o755])
def test_a_root_or_own_base_that_is_sticky_or_closed_gives_a_0700_directory(
    memory_base: tuple[Path, str], mode: int
) -> None:
    # 1777: a tmpfs or Kata's memory emptyDir; 3777: the same with a pod fsGroup (Kata sets the
    # group and set-group-ID). The set-group-ID bit a new directory inherits is cleared.
    base, info = memory_base
    os.chown(base, 0, 4242)
    os.chmod(base, mode)
    private = PrivateDirectory.create(base, mountinfo=info)
    try:
        for path in (private.root, private.key_dir, private.sub("tmp")):
            status = path.lstat()
            assert status.st_uid == os.geteuid() and stat.S_IMODE(status.st_mode) == 0o700, oct(
                status.st_mode
            )
    finally:
        private.remove()


def _as_user(uid: int, code: str, *, prelude: str = "") -> dict[str, object]:
    """Run ``code`` in a child that drops to ``uid`` (no supplementary groups); return its JSON."""
    script = (
        "import errno, json, os, sys\n"
        f"{prelude}\n"
        f"os.setgroups([]); os.setgid({uid}); os.setuid({uid})\n"
        "assert os.getuid() == os.geteuid() == " + str(uid) + "\n"
        f"{code}\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


_ATTEMPTS = """
def attempt(fn, *args):
    try:
        fn(*args)
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return "ok"

root, base = ROOT, BASE
report = {
    "create_in_base": attempt(lambda: open(os.path.join(base, "neighbour"), "x").close()),
    "create_in_private": attempt(lambda: open(os.path.join(root, "planted"), "x").close()),
    "create_in_cache": attempt(lambda: open(os.path.join(root, "cache", "planted"), "x").close()),
    "create_in_key": attempt(lambda: open(os.path.join(root, "key", "planted"), "x").close()),
    "list_private": attempt(os.listdir, root),
    "rename_private_away": attempt(os.rename, root, os.path.join(base, "moved")),
    "remove_private": attempt(os.rmdir, root),
    "chmod_private": attempt(os.chmod, root, 0o777),
}
print(json.dumps(report))
"""


@needs_root
def test_a_second_container_cannot_write_into_the_private_directory(shm_base: Path) -> None:
    # The base as a memory emptyDir arrives (root, 1777) and as another container would see it if
    # the pod spec mounted it there too: a process of another uid reaches the base (it can create
    # its own file there) but can neither write into, list, replace nor open up the runtime's.
    private = PrivateDirectory.create(shm_base, allow_insecure_shared=True)
    try:
        code = f"ROOT, BASE = {str(private.root)!r}, {str(shm_base)!r}\n" + _ATTEMPTS
        report = _as_user(OTHER_UID, code)
        assert report == {
            "create_in_base": "ok",
            "create_in_private": "EACCES",
            "create_in_cache": "EACCES",
            "create_in_key": "EACCES",
            "list_private": "EACCES",
            "rename_private_away": "EPERM",  # sticky base: only the owner (or root) may
            "remove_private": "EPERM",
            "chmod_private": "EPERM",
        }
        assert sorted(p.name for p in private.root.iterdir()) == ["cache", "config", "home", "key", "tmp"]
        assert not (shm_base / "moved").exists()
    finally:
        private.remove()


@needs_root
def test_a_non_root_runtime_owns_its_directory_in_a_root_owned_sticky_base(shm_base: Path) -> None:
    # As in the image: the runtime runs as uid 10001, the emptyDir is root's 1777 tmpfs.
    prelude = "sys.path.insert(0, os.getcwd())\nfrom runtime.private import PrivateDirectory\n"
    code = (
        f"p = PrivateDirectory.create(__import__('pathlib').Path({str(shm_base)!r}), "
        "allow_insecure_shared=True)\n"
        "s = os.lstat(p.root)\n"
        "print(json.dumps({'root': str(p.root), 'uid': s.st_uid, 'mode': s.st_mode & 0o7777}))\n"
    )
    made = _as_user(RUNTIME_UID, code, prelude=prelude)
    root = Path(str(made["root"]))
    assert made["uid"] == RUNTIME_UID and made["mode"] == 0o700
    assert root.parent == shm_base
    # Another container's user gets nowhere in it either.
    report = _as_user(OTHER_UID, f"ROOT, BASE = {str(root)!r}, {str(shm_base)!r}\n" + _ATTEMPTS)
    assert report["create_in_private"] == report["list_private"] == "EACCES"
    assert report["rename_private_away"] == report["chmod_private"] == "EPERM"
