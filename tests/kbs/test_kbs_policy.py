"""kbs-dev's resource policy, and real SNP evidence through kbs-dev."""

from __future__ import annotations

import json

import httpx
import pytest

from attest.kbs.dev.policy import PolicyDenied, PolicyRule, ResourcePolicy
from attest.kbs.teekey import TeeKeyPair
from attest.kbs.token import SubmodClaims, TokenClaims
from attest.kbs.wire import Attestation, CompositeEvidence, RuntimeData
from tests.vector_files import vector

MRTD = "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"


def _claims(cpu_tee: str, cpu_claims: dict[str, object], *devices: str) -> TokenClaims:
    submods = {"cpu0": SubmodClaims(annotated_evidence={cpu_tee: cpu_claims})}  # type: ignore[dict-item]
    for index, tee in enumerate(devices):
        submods[f"gpu{index}"] = SubmodClaims(annotated_evidence={tee: {}})
    return TokenClaims(submods=submods)


TDX = _claims("tdx", {"mrtd": MRTD, "tcb": {"status": "UpToDate"}}, "nvidia")
SAMPLE = _claims("sample", {"svn": 1})


def test_a_rule_says_who_may_ask_never_what_must_run() -> None:
    policy = ResourcePolicy(
        rules=(PolicyRule(resource="models/llama/*", tees=("tdx",), require_devices=("nvidia",)),)
    )
    policy.evaluate("models/llama/key", TDX, sample_permitted=False)
    # Measurements are the workload policy's (one vocabulary): a rule that pins them is refused.
    text = json.dumps({"version": 1, "rules": [{"resource": "m/*/*", "claims": {"cpu0.mrtd": [MRTD]}}]})
    with pytest.raises(ValueError, match="'claims' would pin measurements in a second vocabulary"):
        ResourcePolicy.from_json(text)


@pytest.mark.parametrize(
    ("rule", "reason"),
    [
        (PolicyRule(tees=("snp",)), "primary TEE tdx is not one of snp"),
        (PolicyRule(require_devices=("sampledevice",)), "required device evidence missing: sampledevice"),
    ],
)
def test_rule_conditions_refuse_with_the_reason(rule: PolicyRule, reason: str) -> None:
    with pytest.raises(PolicyDenied, match=reason):
        ResourcePolicy(rules=(rule,)).evaluate("a/b/c", TDX, sample_permitted=False)


def test_first_matching_rule_decides_and_no_match_refuses() -> None:
    policy = ResourcePolicy(rules=(PolicyRule(resource="a/*/c", tees=("snp",)), PolicyRule(resource="a/*/*")))
    with pytest.raises(PolicyDenied, match="not one of snp"):
        policy.evaluate("a/b/c", TDX, sample_permitted=False)
    policy.evaluate("a/b/d", TDX, sample_permitted=False)
    with pytest.raises(PolicyDenied, match="no rule of the resource policy covers x/y/z"):
        policy.evaluate("x/y/z", TDX, sample_permitted=False)


def test_empty_policy_refuses_everything() -> None:
    with pytest.raises(PolicyDenied):
        ResourcePolicy().evaluate("a/b/c", TDX, sample_permitted=True)


def test_sample_needs_both_the_kbs_flag_and_the_rule() -> None:
    allow = ResourcePolicy.allow_all_attested(allow_sample=True)
    allow.evaluate("a/b/c", SAMPLE, sample_permitted=True)
    with pytest.raises(PolicyDenied, match="--allow-insecure-sample-evidence"):
        allow.evaluate("a/b/c", SAMPLE, sample_permitted=False)
    with pytest.raises(PolicyDenied, match="does not allow sample evidence"):
        ResourcePolicy.allow_all_attested().evaluate("a/b/c", SAMPLE, sample_permitted=True)


def test_policy_json_round_trip_and_rego_is_refused() -> None:
    text = json.dumps(
        {"version": 1, "rules": [{"resource": "m/*/*", "tees": ["tdx"], "require_devices": ["nvidia"]}]}
    )
    policy = ResourcePolicy.from_json(text)
    assert ResourcePolicy.from_json(policy.to_json_text()) == policy
    with pytest.raises(ValueError, match="rego is not supported"):
        ResourcePolicy.from_json("package policy\ndefault allow = false\n")
    with pytest.raises(ValueError, match="rules"):
        ResourcePolicy.from_json('{"rules": [{"resource": "a/b"}]}')


def test_trustee_snp_evidence_reaches_the_snp_verifier_and_fails_closed_on_binding(kbs_url: str) -> None:
    evidence = json.loads(vector("kbs", "evidence.json"))
    key = TeeKeyPair.generate("ec")
    with httpx.Client() as http:
        auth = http.post(
            f"{kbs_url}/kbs/v0/auth", json={"version": "0.4.0", "tee": "snp", "extra-params": ""}
        )
        nonce, session = auth.json()["nonce"], auth.cookies["kbs-session-id"]
        body = Attestation(
            runtime_data=RuntimeData(nonce=nonce, tee_pubkey=key.public_key),
            tee_evidence=CompositeEvidence(primary_evidence=evidence),
        ).to_bytes()
        http.cookies.clear()
        refused = http.post(
            f"{kbs_url}/kbs/v0/attest", content=body, headers={"cookie": f"kbs-session-id={session}"}
        )
    assert refused.status_code == 401
    detail = refused.json()["detail"]
    assert "snp evidence does not verify" in detail
    assert "failed step 'report_data'" in detail  # signature and chain passed; the binding did not
