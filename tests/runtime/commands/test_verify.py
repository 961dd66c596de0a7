"""``enclave-serve verify`` and the Python client: every failure says what answered and what to do.

Against real local servers: a TLS replica serving a real (sample-TEE) attestation document, a
plain-HTTP server that answers 404 like a plain vLLM, and a closed port. ``verify --offline``: a
saved bundle is shown with its age and "URL not verified", and refused past ``--max-age``.
``verify --replicas``: one line per replica behind a balancer.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import foundation.errors
from attest.client import (
    AttestationError,
    ConfigError,
    Error,
    MalformedEvidence,
    NotAnEnclave,
    PolicyViolation,
    ServerRefused,
    VerificationError,
    VerificationUnavailable,
    server_base_url,
    verify_server,
)
from attest.client.remote import VerificationBundle
from attest.client.wording import CLIENT_OPTIONS, for_cli, for_python
from attest.evidence import TeeKind
from attest.tee.sample.attester import UnsafeSampleAttester
from runtime.cli import main
from server.attestation import AttestationService, AttestedWorkload
from tests.attest.replicas import MODEL, OTHER_CONFIG, POLICY, POLICY_TOML, ReplicaServer, RoundRobin
from tests.attest.test_verdict import CONFIG, INIT, NONCE, SPKI
from tests.attest.test_verdict import MODEL as SAMPLE_MODEL
from tests.attest.test_verdict import POLICY as SAMPLE_POLICY
from tests.kbs.support import Reply, closed_port_url, scripted_server


@pytest.fixture(scope="module")
def replica() -> Iterator[ReplicaServer]:
    server = ReplicaServer("a")
    yield server
    server.stop()


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY_TOML)
    return path


def _not_found(method: str, path: str, body: bytes) -> Reply:
    return Reply(status=404, body=b'{"detail":"Not Found"}', headers={"content-type": "application/json"})


# -- the /v1 URL the demo prints -------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["/v1", "/v1/", "/"])
def test_verify_accepts_the_openai_url_the_server_prints(
    replica: ReplicaServer, policy_file: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = f"https://127.0.0.1:{replica.port}"
    code = main(["verify", base + suffix, "--policy", str(policy_file), "--allow-insecure-sample-tee"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith(f"verified: {base}\n")


def test_server_base_url_drops_only_a_trailing_v1() -> None:
    assert server_base_url("https://h:8000/v1") == "https://h:8000"
    assert server_base_url("https://h:8000/v1/") == "https://h:8000"
    assert server_base_url("https://h:8000/") == "https://h:8000"
    assert server_base_url("https://h:8000/api/v10") == "https://h:8000/api/v10"


# -- reachable but not an enclave: refused (1); could not check: 2 ---------------------------------


def test_a_plain_openai_server_is_refused_with_exit_1(
    policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with scripted_server(_not_found) as plain:
        code = main(["verify", plain.url + "/v1", "--policy", str(policy_file)])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out.startswith(f"NOT VERIFIED: {plain.url}\n")
    assert (
        f"{plain.url} answered HTTP 404 for /.well-known/enclave-serve/attestation: it is not an "
        "enclave-serve server" in captured.err
    )


def test_a_server_under_another_path_is_told_to_give_its_base_url(capsys: pytest.CaptureFixture[str]) -> None:
    with scripted_server(_not_found) as plain:
        code = main(["verify", plain.url + "/api", "--allow-unpinned-software"])
    assert code == 1
    assert f"if it is one, give its base URL (without /api), e.g. {plain.url}" in capsys.readouterr().err


def test_the_python_api_raises_not_an_enclave_a_refusal() -> None:
    with scripted_server(_not_found) as plain, pytest.raises(NotAnEnclave) as info:
        verify_server(plain.url, policy=POLICY)
    assert isinstance(info.value, ServerRefused)
    assert info.value.status == 404
    assert [s.name for s in info.value.verdict.failures] == ["document"]


def test_an_unreachable_server_could_not_be_checked_exit_2_naming_the_refused_address(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = closed_port_url()
    assert main(["verify", url, "--allow-unpinned-software"]) == 2
    err = capsys.readouterr().err
    assert f"could not check {url}: connection refused by {url}: nothing listens there" in err


def test_https_to_a_plain_http_server_says_use_http(capsys: pytest.CaptureFixture[str]) -> None:
    with scripted_server(_not_found) as plain:
        address = plain.url.removeprefix("http://")
        code = main(["verify", f"https://{address}", "--allow-unpinned-software"])
    assert code == 2
    assert (
        f"the server at {address} answered plain HTTP to a TLS handshake: use http://{address}"
        in capsys.readouterr().err
    )


# -- Python errors name Python arguments, CLI errors name flags ------------------------------------


def test_a_python_refusal_names_the_argument_and_the_cli_the_flag(
    replica: ReplicaServer, policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"https://127.0.0.1:{replica.port}"
    with pytest.raises(ServerRefused) as info:
        verify_server(url, policy=POLICY)  # a sample-TEE server, without allow_insecure=True
    message = str(info.value)
    assert "allow_insecure=True" in message
    assert "--allow-insecure-sample-tee" not in message
    assert "--allow-insecure-sample-tee" in info.value.cli_message

    assert main(["verify", url, "--policy", str(policy_file)]) == 1
    err = capsys.readouterr().err
    assert "--allow-insecure-sample-tee" in err
    assert "allow_insecure=True" not in err


def test_the_two_renderings_are_inverse_on_every_option() -> None:
    for option in CLIENT_OPTIONS:
        text = f"pass {option.flag} (development only); or not {option.flag}."
        python = for_python(text)
        assert option.flag not in python and option.argument in python
        assert for_cli(python) == text
    assert for_python("--allow-insecure-sample-tee-extra") == "--allow-insecure-sample-tee-extra"


def test_the_client_exports_its_exception_types() -> None:
    for exported, original in (
        (Error, foundation.errors.Error),
        (ConfigError, foundation.errors.ConfigError),
        (AttestationError, foundation.errors.AttestationError),
        (MalformedEvidence, foundation.errors.MalformedEvidence),
        (VerificationError, foundation.errors.VerificationError),
        (PolicyViolation, foundation.errors.PolicyViolation),
        (VerificationUnavailable, foundation.errors.VerificationUnavailable),
    ):
        assert exported is original
    assert issubclass(NotAnEnclave, ServerRefused) and issubclass(ServerRefused, PolicyViolation)


# -- verify --offline: a saved bundle, its age, and a URL it cannot vouch for -----------------------

YEAR_S = 365 * 86400


def save_bundle(path: Path, *, issued_at: float, url: str = "https://enclave.example") -> Path:
    """A bundle as ``verify --save`` writes it, whose document the enclave issued at ``issued_at``."""
    service = AttestationService(
        AttestedWorkload(
            model_digest=SAMPLE_MODEL, config=CONFIG, tls_spki_sha256=SPKI, init_data=INIT.digest_text,
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
def offline_policy(tmp_path: Path) -> Path:
    """The sample workload's policy (tests/attest/test_verdict.py) as a file."""
    path = tmp_path / "policy.toml"
    path.write_text(SAMPLE_POLICY.to_toml())
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
    capsys: pytest.CaptureFixture[str], tmp_path: Path, offline_policy: Path
) -> None:
    bundle = save_bundle(tmp_path / "bundle.json", issued_at=time.time() - 30)
    assert main(offline(bundle, offline_policy)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"verified offline: {bundle}"
    assert lines[1].startswith("  URL not verified: the bundle names https://enclave.example")
    age = next(line for line in lines if line.strip().startswith("✓ age"))
    assert re.search(r"issued 3\d s ago \(\d{4}-\d\d-\d\dT[\d:]+Z, by the enclave's clock\)", age), age
    assert "at most 5 min allowed" in age
    assert not any(line.startswith("verified: ") for line in lines)


def test_a_year_old_document_rewrapped_under_another_url_is_refused_with_its_age(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, offline_policy: Path
) -> None:
    """The review's scenario: an old document, re-wrapped as a bundle naming another server."""
    bundle = save_bundle(
        tmp_path / "rewrapped.json", issued_at=time.time() - YEAR_S, url="https://other.example"
    )
    assert main(offline(bundle, offline_policy)) == 1
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
    assert main(offline(bundle, offline_policy, "--max-age", "400d")) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"verified offline: {bundle}\n  URL not verified")
    assert "issued 365 d ago" in out and "at most 400 d allowed" in out


def test_the_json_verdict_of_an_offline_check_states_age_and_url_not_verified(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, offline_policy: Path
) -> None:
    bundle = save_bundle(tmp_path / "old.json", issued_at=time.time() - YEAR_S)
    assert main([*offline(bundle, offline_policy, "--max-age", "3600"), "--json"]) == 1
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert out["verified"] is False and out["url_verified"] is False and out["max_age_s"] == 3600
    assert abs(out["age_s"] - YEAR_S) < 60
    assert [s["name"] for s in out["steps"] if not s["ok"]] == ["age"]


def test_a_document_from_the_future_is_refused_offline(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, offline_policy: Path
) -> None:
    bundle = save_bundle(tmp_path / "future.json", issued_at=time.time() + 3600)
    assert main(offline(bundle, offline_policy, "--max-age", "30d")) == 1
    assert "in the future" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["0", "-5", "soon", "5 weeks", ""])
def test_a_max_age_that_is_not_a_duration_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, offline_policy: Path, value: str
) -> None:
    bundle = save_bundle(tmp_path / "bundle.json", issued_at=time.time())
    assert main(offline(bundle, offline_policy, "--max-age", value)) == 1
    assert "--max-age must be a positive number of seconds" in capsys.readouterr().err


def test_max_age_is_refused_online_where_the_nonce_proves_freshness(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["verify", "https://127.0.0.1:9", "--max-age", "5m"]) == 1
    assert "--max-age applies to --offline only" in capsys.readouterr().err


# -- verify --replicas: every replica behind a balancer --------------------------------------------


def test_verify_replicas_prints_one_line_per_replica_and_fails_on_a_refused_one(
    replicas: tuple[ReplicaServer, ...],
    balancer: RoundRobin,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a, b, c = replicas
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY_TOML)
    args = ["verify", balancer.url, "--replicas", "6", "--policy", str(policy), "--allow-insecure-sample-tee"]
    assert main(args) == 1
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if not line.startswith(" ")]
    assert lines[0].endswith("3 distinct in 6 connection(s)")
    by_key = {line.split()[0]: line for line in lines[1:]}
    assert set(by_key) == {a.tls.spki_sha256, b.tls.spki_sha256, c.tls.spki_sha256}
    assert " verified " in by_key[a.tls.spki_sha256] and MODEL in by_key[a.tls.spki_sha256]
    assert "NOT VERIFIED (policy:workload.config)" in by_key[c.tls.spki_sha256]
    assert f"config sha256:{OTHER_CONFIG.sha256}" in by_key[c.tls.spki_sha256]
    balancer.backends.remove(c)
    assert main(args) == 0
    assert "2 distinct in 6 connection(s)" in capsys.readouterr().out
