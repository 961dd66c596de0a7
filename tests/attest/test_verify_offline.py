"""``enclave-serve verify --offline`` through the real CLI entry point: a saved bundle is shown
with its age and "URL not verified", and refused past ``--max-age``."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from attest.client.remote import VerificationBundle
from attest.evidence import TeeKind
from attest.tee.sample.attester import UnsafeSampleAttester
from runtime.cli import main
from server.attestation import AttestationService, AttestedWorkload
from tests.attest.test_verdict import CONFIG, INIT, MODEL, NONCE, POLICY, SPKI

YEAR_S = 365 * 86400


def save_bundle(path: Path, *, issued_at: float, url: str = "https://enclave.example") -> Path:
    """A bundle as ``verify --save`` writes it, whose document the enclave issued at ``issued_at``."""
    service = AttestationService(
        AttestedWorkload(
            model_digest=MODEL, config=CONFIG, tls_spki_sha256=SPKI, init_data=INIT.digest_text,
            runtime_version="0.1.0",
        ),
        attester=UnsafeSampleAttester(allow_insecure=True, init_data=INIT.register(TeeKind.SAMPLE)),
        clock=lambda: issued_at,
    )  # fmt: skip
    bundle = VerificationBundle(
        url=url,
        nonce=NONCE,
        tls_spki_sha256=SPKI,
        tls_certificate_pem=None,
        document=json.loads(service.document([NONCE]).to_bytes()),
        config=CONFIG.raw,
    )
    path.write_text(json.dumps(bundle.to_json(), indent=2))
    return path


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY.to_toml())
    return path


def offline(bundle: Path, policy: Path, *extra: str) -> list[str]:
    return [
        "verify",
        "--offline",
        str(bundle),
        "--policy",
        str(policy),
        "--allow-insecure-sample-tee",
        *extra,
    ]


def test_a_fresh_saved_bundle_verifies_offline_and_says_the_url_is_not_verified(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, policy: Path
) -> None:
    bundle = save_bundle(tmp_path / "bundle.json", issued_at=time.time() - 30)
    assert main(offline(bundle, policy)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"verified offline: {bundle}"
    assert lines[1].startswith("  URL not verified: the bundle names https://enclave.example")
    age = next(line for line in lines if line.strip().startswith("✓ age"))
    assert re.search(r"issued 3\d s ago \(\d{4}-\d\d-\d\dT[\d:]+Z, by the enclave's clock\)", age), age
    assert "at most 5 min allowed" in age
    assert not any(line.startswith("verified: ") for line in lines)


def test_a_year_old_document_rewrapped_under_another_url_is_refused_with_its_age(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, policy: Path
) -> None:
    """The review's scenario: an old document, re-wrapped as a bundle naming another server."""
    bundle = save_bundle(
        tmp_path / "rewrapped.json", issued_at=time.time() - YEAR_S, url="https://other.example"
    )
    assert main(offline(bundle, policy)) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == f"NOT VERIFIED offline: {bundle}"
    assert "URL not verified: the bundle names https://other.example" in lines[1]
    age = next(line for line in lines if line.strip().startswith("✗ age"))
    assert "issued 365 d ago" in age and "at most 5 min is allowed" in age and "--max-age" in age
    assert not any(line.strip().startswith("✓ policy") for line in lines)  # nothing after the age step
    assert "verified: https://other.example" not in captured.out
    assert "age: the document was issued 365 d ago" in captured.err

    # A larger --max-age lets it through, still with its age and still without vouching for the URL.
    assert main(offline(bundle, policy, "--max-age", "400d")) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"verified offline: {bundle}\n  URL not verified")
    assert "issued 365 d ago" in out and "at most 400 d allowed" in out


def test_the_json_verdict_of_an_offline_check_states_age_and_url_not_verified(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, policy: Path
) -> None:
    bundle = save_bundle(tmp_path / "old.json", issued_at=time.time() - YEAR_S)
    assert main([*offline(bundle, policy, "--max-age", "3600"), "--json"]) == 1
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert out["verified"] is False and out["url_verified"] is False and out["max_age_s"] == 3600
    assert abs(out["age_s"] - YEAR_S) < 60
    assert [s["name"] for s in out["steps"] if not s["ok"]] == ["age"]


def test_a_document_from_the_future_is_refused_offline(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, policy: Path
) -> None:
    bundle = save_bundle(tmp_path / "future.json", issued_at=time.time() + 3600)
    assert main(offline(bundle, policy, "--max-age", "30d")) == 1
    assert "in the future" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["0", "-5", "soon", "5 weeks", ""])
def test_a_max_age_that_is_not_a_duration_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, policy: Path, value: str
) -> None:
    bundle = save_bundle(tmp_path / "bundle.json", issued_at=time.time())
    assert main(offline(bundle, policy, "--max-age", value)) == 1
    assert "--max-age must be a positive number of seconds" in capsys.readouterr().err


def test_max_age_is_refused_online_where_the_nonce_proves_freshness(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["verify", "https://127.0.0.1:9", "--max-age", "5m"]) == 1
    assert "--max-age applies to --offline only" in capsys.readouterr().err
