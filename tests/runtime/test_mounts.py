"""The mount check of the config stage: no host-controlled filesystem where code is loaded from.

Mount tables are written as ``/proc/self/mountinfo`` lines (proc(5)); the real table of this
machine must pass, and the config stage refuses a bad one before it reads anything.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from foundation.errors import ConfigError
from runtime.mounts import (
    SYSTEM_CODE_PATHS,
    Mount,
    check_mounts,
    code_paths,
    parse_mountinfo,
    read_mount_table,
)

SITE = "/usr/local/lib/python3.12/dist-packages"
CODE = [*SYSTEM_CODE_PATHS, SITE, "/opt/enclave-serve"]


def line(
    mount_point: str, fstype: str, *, options: str = "rw,relatime", root: str = "/", source: str = "x"
) -> str:
    return f"36 25 0:32 {root} {mount_point} {options} shared:1 - {fstype} {source} rw"


#: What a Kata confidential GPU pod's container sees, roughly: the image, the kubelet's files,
#: the model volume, the private memory directory, the driver libraries CDI binds in.
POD = [
    line("/", "overlay", source="overlay"),
    line("/proc", "proc"),
    line("/dev", "tmpfs"),
    line("/dev/shm", "tmpfs"),
    line("/etc/hosts", "virtiofs", source="kataShared"),
    line("/etc/resolv.conf", "virtiofs", source="kataShared"),
    line("/dev/termination-log", "virtiofs", source="kataShared"),
    line("/run/secrets/kubernetes.io/serviceaccount", "tmpfs", options="ro,relatime"),
    line("/models", "virtiofs", options="ro,relatime", source="kataShared"),
    line("/run/enclave-serve", "tmpfs"),
    line(
        "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
        "ext4",
        options="ro,nosuid,nodev",
        root="/usr/lib/libcuda.so.1",
    ),
    line("/usr/bin/nvidia-smi", "ext4", options="ro,nosuid,nodev", root="/usr/bin/nvidia-smi"),
]


def check(*extra: str, allowed: tuple[str, ...] = ("/models",)) -> list[str]:
    return check_mounts(parse_mountinfo("\n".join([*POD, *extra])), code=CODE, allowed=allowed)


def test_a_confidential_gpu_pod_as_deployed_passes() -> None:
    assert check() == []


def test_this_machine_passes() -> None:
    assert check_mounts(read_mount_table(), code=[*SYSTEM_CODE_PATHS, *code_paths()]) == []


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        (line("/opt/ml", "tmpfs"), "a tmpfs mount at /opt/ml (a pod volume) sits inside /opt"),
        (line("/opt/ml/model", "virtiofs"), "a virtiofs mount at /opt/ml/model (served by the host)"),
        (line("/opt", "tmpfs"), "a tmpfs mount at /opt replaces /opt"),
        (
            line(f"{SITE}/vllm", "virtiofs", options="ro"),
            f"a virtiofs mount at {SITE}/vllm (served by the host)",
        ),
        (line("/usr/local", "ext4", options="ro"), "a ext4 mount at /usr/local replaces /usr/local/lib"),
        (line("/usr/lib/x86_64-linux-gnu/libfoo.so", "ext4"), "is writable and sits inside /usr"),
        (line("/etc/ld.so.preload", "tmpfs", options="ro"), "replaces /etc/ld.so.preload"),
        (line("/opt/enclave-serve/runtime", "9p"), "(served by the host) sits inside /opt"),
        (line("/usr/lib/python3/dist-packages/x", "fuse.sshfs", options="ro"), "(served by the host)"),
    ],
)
def test_a_host_mount_where_code_is_loaded_from_is_refused(extra: str, why: str) -> None:
    refused = check(extra)
    assert len(refused) == 1 and why in refused[0], refused


def test_a_host_served_root_filesystem_is_refused() -> None:
    refused = check_mounts(parse_mountinfo(line("/", "virtiofs", source="kataShared")), code=CODE)
    assert refused == ["the root filesystem is virtiofs, served by the host"]


def test_the_model_directory_may_be_a_host_mount_in_opt_ml_model() -> None:
    model = line("/opt/ml/model", "virtiofs", options="ro")
    assert check(model, allowed=("/opt/ml/model",)) == []
    assert check(line("/opt/ml/init-data.toml", "virtiofs"), allowed=("/opt/ml/init-data.toml",)) == []


def test_a_model_directory_given_inside_a_code_path_gains_nothing() -> None:
    """The host chooses the model path too: pointing it at site-packages does not exempt a mount."""
    refused = check(line(f"{SITE}/vllm", "virtiofs", options="ro"), allowed=(f"{SITE}/vllm",))
    assert refused and "served by the host" in refused[0]
    assert check(line("/opt", "virtiofs"), allowed=("/opt",))  # still replaces /opt/enclave-serve


def test_reasons_and_the_public_table_name_no_source() -> None:
    mounts = parse_mountinfo(line("/opt/ml", "nfs4", source="10.0.0.5:/exports/evil"))
    (mount,) = mounts
    assert mount.host_served and "10.0.0.5" not in str(mount.to_json())
    assert all("10.0.0.5" not in r for r in check_mounts(mounts, code=CODE))


def test_escaped_mount_points_and_odd_lines() -> None:
    (mount,) = parse_mountinfo(line("/opt/my\\040models", "tmpfs") + "\nnot a mountinfo line\n")
    assert mount == Mount(mount_point="/opt/my models", root="/", fstype="tmpfs", read_only=False)


def test_code_paths_cover_the_interpreter_and_the_packages_that_run() -> None:
    import sys

    paths = code_paths()
    assert str(Path(sys.prefix).resolve()) in paths
    assert str(Path(__file__).resolve().parents[2]) in paths  # enclave-serve's own packages
    assert "/" not in paths


def test_the_config_stage_refuses_a_host_mount_before_reading_the_model(
    packed_demo: Path, parser: argparse.ArgumentParser, tmp_path: Path
) -> None:
    from runtime.config import RunConfig
    from runtime.prepare import prepare
    from runtime.private import PrivateDirectory

    table = parse_mountinfo("\n".join([*POD, line("/opt/ml", "tmpfs")]))
    config = RunConfig(
        model=str(packed_demo), tee="sample", gpus="none", allow_insecure_sample_tee=True,
        kbs_url="http://127.0.0.1:8080", vllm_args=("--max-model-len", "512"),
    )  # fmt: skip
    private = PrivateDirectory.create(Path("/dev/shm"), allow_insecure_shared=True)
    try:
        with pytest.raises(ConfigError, match="refusing to run where the host could supply code: a tmpfs"):
            prepare(config, private, environment={}, parser=parser, mount_table=table)
        assert not private.model_view.exists() or not any(private.model_view.iterdir())  # nothing read
        prepared = prepare(
            config, private, environment={}, parser=parser, mount_table=parse_mountinfo("\n".join(POD))
        )
        assert {m.mount_point for m in prepared.mounts} >= {"/models", "/run/enclave-serve"}
    finally:
        private.remove()
