"""The user's pipeline as a pure function: every step reported, binding failures stop the rest."""

from __future__ import annotations

import json

import pytest

from attest.client.record import record_policy
from attest.client.verdict import verify_document
from attest.evidence import TeeKind
from attest.initdata import ENCLAVE_SERVE_ENTRY, InitData
from attest.runconfig import RunConfiguration
from attest.tee.sample.attester import UnsafeSampleAttester
from attest.verify.workload import WorkloadPolicy
from server.attestation import AttestationService, AttestedWorkload
from tests.attest.support import workload_pins

NONCE = bytes(range(32))
MODEL = "sha256:" + "aa" * 32
SPKI = "bb" * 32
INIT = InitData.build(entries=[(ENCLAVE_SERVE_ENTRY, workload_pins(MODEL).to_toml())])
CONFIG = RunConfiguration.from_pins(workload_pins(MODEL))


def document(
    *, register: bytes | None = INIT.register(TeeKind.SAMPLE), claimed: str | None = INIT.digest_text
) -> dict:
    service = AttestationService(
        AttestedWorkload(
            model_digest=MODEL, config=CONFIG, tls_spki_sha256=SPKI, init_data=claimed, runtime_version="0.1.0",
        ),
        attester=UnsafeSampleAttester(allow_insecure=True, init_data=register),
    )  # fmt: skip
    return json.loads(service.document([NONCE]).to_bytes())


POLICY = WorkloadPolicy.from_toml(
    f'version = 1\ninsecure_development = true\n[tee]\nallowed = ["sample"]\n'
    f'[workload]\nmodel = ["{MODEL}"]\nconfig = ["sha256:{CONFIG.sha256}"]\ninit_data = ["{INIT.digest_text}"]\n'
)


def run(doc: dict, config: bytes = CONFIG.raw, **kw: object):  # type: ignore[no-untyped-def]
    base: dict[str, object] = {
        "nonce": NONCE,
        "observed_tls_spki_sha256": SPKI,
        "policy": POLICY,
        "allow_insecure": True,
    }
    base.update(kw)
    return verify_document(doc, config, **base)  # type: ignore[arg-type]


def test_a_pinned_sample_server_verifies_step_by_step() -> None:
    verdict = run(document())
    assert verdict.ok, verdict.failures
    names = [s.name for s in verdict.steps]
    assert names[:10] == [
        "document",
        "nonce",
        "devices",
        "tls",
        "model",
        "config",
        "tee",
        "canary",
        "config-bytes",
        "evidence:sample",
    ]
    assert "init_data" in names and "policy:workload.init_data" in names


def test_no_policy_refuses_and_the_escape_hatch_says_so() -> None:
    refused = run(document(), policy=None)
    assert not refused.ok and refused.failures[0].name == "policy"
    unpinned = run(document(), policy=None, allow_unpinned_software=True)
    assert unpinned.ok and unpinned.unpinned and "UNPINNED" in unpinned.warnings[0]


@pytest.mark.parametrize(
    ("scenario", "make", "step"),
    [
        ("another nonce", lambda: run(document(), nonce=bytes(32)), "nonce"),
        ("another TLS key", lambda: run(document(), observed_tls_spki_sha256="cc" * 32), "tls"),
        (
            "a configuration other than the claimed one",
            lambda: run(document(), config=CONFIG.raw + b" "),
            "config-bytes",
        ),
        (
            "claimed init-data the register does not hold",
            lambda: run(document(register=bytes(48))),
            "init_data",
        ),
        ("sample TEE without the flag", lambda: run(document(), allow_insecure=False), "tee"),
    ],
)
def test_a_binding_failure_is_named_and_stops_the_steps_after_it(
    scenario: str, make: object, step: str
) -> None:
    verdict = make()  # type: ignore[operator]
    assert not verdict.ok, scenario
    assert verdict.steps[-1].name == step and not verdict.steps[-1].ok
    assert not any(s.name.startswith("policy:") for s in verdict.steps)


def test_a_recorded_policy_pins_what_verified() -> None:
    verdict = run(document(), policy=None, allow_unpinned_software=True)
    recorded = record_policy(verdict)
    assert recorded.policy.workload.model == (MODEL,)
    assert recorded.policy.workload.init_data == (("sha384", INIT.digest),)
    assert run(document(), policy=recorded.policy).ok
    with pytest.raises(ValueError, match="only from a server that verified"):
        record_policy(run(document(), nonce=bytes(32)))
