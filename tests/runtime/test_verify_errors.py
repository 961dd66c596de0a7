"""``enclave-serve verify`` and the Python client: every failure says what answered and what to do.

Against real local servers: a TLS replica serving a real (sample-TEE) attestation document, a
plain-HTTP server that answers 404 like a plain vLLM, and a closed port.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
from attest.client.wording import CLIENT_OPTIONS, for_cli, for_python
from runtime.cli import main
from tests.attest.replicas import POLICY, POLICY_TOML, ReplicaServer
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
