"""``enclave-serve initdata`` (and the ``image-facts`` it takes) as a process (real CLI)."""

from __future__ import annotations

import json
from pathlib import Path

from attest.evidence import TeeKind
from attest.initdata import InitData
from tests.runtime.commands.support import es

MODEL = "sha256:" + "ab" * 32


def test_initdata_declares_everything_and_prints_both_digests(tmp_path: Path) -> None:
    out = tmp_path / "initdata.toml"
    result = es("initdata", "/models/tiny", "--kbs-url", "https://kbs.example:8080", "--allow-insecure-agent-policy",
                "--expect-model", MODEL, "--key-id", "kbs:///m/key/tiny", "--tee", "tdx", "--watchdog-interval",
                "30", "--env", "OMP_NUM_THREADS=4", "-o", str(out), "--json", "--", "--max-model-len", "512")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "WARNING: no --image-facts" in result.stderr
    shown = json.loads(result.stdout)
    init = InitData.from_bytes(out.read_bytes())
    assert shown["init_data_digest"] == init.digest_text and init.algorithm == "sha384"
    assert shown["mrconfigid"] == init.register(TeeKind.TDX).hex() == init.digest.hex()
    assert shown["host_data"] == init.digest.hex()[:64]
    assert shown["insecure_agent_policy"] is True
    assert set(init.data) == {"aa.toml", "cdh.toml", "policy.rego", "enclave-serve.toml"}
    pins = init.pins
    assert pins is not None and pins.model == MODEL and pins.vllm_args == ("--max-model-len", "512")
    assert pins.key_resource == "kbs:///m/key/tiny" and pins.environment == {"OMP_NUM_THREADS": "4"}
    assert pins.settings["tee"] == "tdx" and pins.settings["watchdog_interval_s"] == 30.0
    assert pins.settings["model_source"] == "/models/tiny" and "host" not in pins.settings
    assert shown["config_sha256"] == "sha256:" + pins.config_sha256
    assert "https://kbs.example:8080" in init.data["aa.toml"] and "cc_kbc" in init.data["cdh.toml"]
    annotation = Path(shown["annotation_file"]).read_text().strip()
    assert InitData.from_annotation(annotation).raw == init.raw
    text = es("initdata", "/models/tiny", "--kbs-url", "https://kbs.example:8080", "--allow-insecure-agent-policy",
              "--expect-model", MODEL, "--key-id", "kbs:///m/key/tiny", "--tee", "tdx", "--watchdog-interval",
              "30", "--env", "OMP_NUM_THREADS=4", "-o", str(out), "--", "--max-model-len", "512")  # fmt: skip
    assert f"config sha256:{pins.config_sha256}" in text.stdout.splitlines()


def test_initdata_takes_the_image_facts_and_refuses_what_cannot_be_declared(tmp_path: Path) -> None:
    facts = tmp_path / "facts.json"
    # As the image build runs it: an environment of its own (not this test process's, to which
    # importing PyTorch adds variables).
    shown = es("image-facts", env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2", "LANG": "C.UTF-8"})
    assert shown.returncode == 0, shown.stderr
    image = json.loads(shown.stdout)
    assert image["environment"] == {"OMP_NUM_THREADS": "2"}  # attested only: LANG is operational
    facts.write_text(json.dumps({**image, "vllm": "9.9.9"}))
    base = ("initdata", "/m", "--kbs-url", "https://k", "--allow-insecure-agent-policy", "--expect-model", MODEL,
            "--key-id", "kbs:///m/key/tiny", "-o", str(tmp_path / "i.toml"))  # fmt: skip
    ok = es(*base, "--image-facts", str(facts))
    assert ok.returncode == 0 and "no --image-facts" not in ok.stderr
    pins = InitData.from_bytes((tmp_path / "i.toml").read_bytes()).pins
    assert (
        pins is not None and pins.runtime["vllm"] == "9.9.9" and pins.environment == {"OMP_NUM_THREADS": "2"}
    )
    for extra, why in (
        (("--env", "LD_PRELOAD=/x.so"), "LD_PRELOAD"),
        (("--env", "LANG=C.UTF-8"), "operational, never attested"),
        (("--env", "VLLM_API_KEY=secret"), "declare it as <redacted>"),
        (("--", "--api-key", "secret"), "VLLM_API_KEY=<redacted>"),
    ):
        refused = es(*base, *extra)
        assert refused.returncode == 1 and why in refused.stderr, refused.stderr
        assert "secret" not in refused.stderr.replace("a secret", "")


def test_initdata_needs_an_agent_policy_or_the_insecure_flag(tmp_path: Path) -> None:
    result = es(
        "initdata", "/m", "--kbs-url", "https://kbs", "--expect-model", MODEL, "-o", str(tmp_path / "x")
    )
    assert result.returncode == 2 and "agent-policy" in result.stderr
    rego = tmp_path / "policy.rego"
    rego.write_text("package agent_policy\ndefault ExecProcessRequest := false\n")
    ok = es("initdata", "/m", "--kbs-url", "https://kbs", "--expect-model", MODEL, "--agent-policy", str(rego),
            "--key-id", "kbs:///m/key/tiny", "-o", str(tmp_path / "y"))  # fmt: skip
    assert ok.returncode == 0 and "INSECURE" not in ok.stdout
    assert InitData.from_bytes((tmp_path / "y").read_bytes()).data["policy.rego"] == rego.read_text()
