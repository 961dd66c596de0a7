"""``enclave-serve measure snp`` as a process (real CLI)."""

from __future__ import annotations

from tests.runtime.commands.support import es
from tests.vector_files import vector_path


def test_measure_snp_reproduces_the_published_vector() -> None:
    result = es("measure", "snp", "--ovmf", str(vector_path("snp-measure", "ovmf_AmdSev_suffix.bin")),
                "--kernel", "/dev/null", "--initrd", "/dev/null", "--vcpus", "1", "--vcpu-type", "EPYC-v4",
                "--guest-features", "0x21", "--ovmf-hash",
                "086e2e9149ebf45abdc3445fba5b2da8270bdbb04094d7a2c37faaa4b24af3aa16aff8c374c2a55c467a50da6d466b74")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "329c8ce0972ae52343b64d34a434a86f245dfd74f5ed7aae15d22efc78fb9683632b9b50e4e1d7fa41179ef98a7ef198"
    )
