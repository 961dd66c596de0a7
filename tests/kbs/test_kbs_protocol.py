"""The RCAR client against the real kbs-dev over TCP: happy paths, refusals, session rules."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from contextlib import AbstractContextManager

import httpx
import pytest

from attest.binding import HashAlgorithm
from attest.kbs.admin import KbsAdminClient
from attest.kbs.client import KbsClient
from attest.kbs.dev.server import DevKbsConfig, ResourceStore
from attest.kbs.teekey import TeeKeyPair
from attest.kbs.token import peek_claims
from attest.kbs.wire import Attestation, CompositeEvidence, RuntimeData
from attest.keysource import KbsKeySource, ResourceUri
from attest.tee.sample.attester import UnsafeSampleAttester, UnsafeSampleDeviceAttester
from foundation.errors import KeyAccessDenied, KeyBrokerProtocolError, ResourceNotFound
from foundation.secret import SecretBytes
from tests.kbs.conftest import DEVICE_KEY, MODEL_KEY, SECOND_KEY
from tests.kbs.support import ADMIN_TOKEN, ManualClock, TamperingSampleAttester

MODEL = ResourceUri.parse("kbs:///default/model/key")
SECOND = ResourceUri.parse("kbs:///default/model/second")

FreshKbs = Callable[..., AbstractContextManager[str]]


def _config(**overrides: object) -> DevKbsConfig:
    values: dict[str, object] = {
        "admin_token": SecretBytes(ADMIN_TOKEN),
        "resources": ResourceStore({"default/model/key": MODEL_KEY}),
    }
    values.update(overrides)
    return DevKbsConfig(**values)  # type: ignore[arg-type]


def test_full_rcar_happy_path_with_sample_and_sampledevice(
    kbs_url: str, sample_attester: UnsafeSampleAttester, sample_device: UnsafeSampleDeviceAttester
) -> None:
    source = KbsKeySource(url=kbs_url, attester=sample_attester, devices=[sample_device])
    # default/gpu/* requires attested sampledevice evidence: the additional-evidence binding ran.
    release = source.fetch(ResourceUri.parse("kbs:///default/gpu/key"))
    assert release.secret.reveal() == DEVICE_KEY
    assert release.source == "kbs"
    receipt = release.receipt
    assert receipt is not None
    assert receipt.tee == "sample" and receipt.devices == ("sampledevice",)
    assert receipt.hash_algorithm == "sha384" and receipt.protocol_version == "0.4.0"
    assert dict(receipt.ear_status) == {"cpu0": "warning", "gpu0": "warning"}
    assert receipt.insecure and release.insecure
    assert receipt.token_claims_verified is False
    assert len(receipt.token_sha256) == 64
    document = json.dumps(release.to_json())
    assert "token_sha256" in document and "secret" not in document
    source.close()


def test_device_rule_refuses_without_device_evidence(
    kbs_url: str, sample_attester: UnsafeSampleAttester
) -> None:
    with KbsClient(url=kbs_url, attester=sample_attester) as client, pytest.raises(KeyAccessDenied) as info:
        client.get_resource("kbs:///default/gpu/key")
    assert "kbs:///default/gpu/key" in str(info.value)
    assert "sampledevice" in str(info.value)


@pytest.mark.parametrize("transport", ["cookie", "bearer"])
def test_token_is_reused_for_two_resources(
    kbs_url: str, sample_attester: UnsafeSampleAttester, transport: str
) -> None:
    with KbsClient(url=kbs_url, attester=sample_attester, token_transport=transport) as client:  # type: ignore[arg-type]
        first = client.get_resource(MODEL)
        attestation = client.attestation
        second = client.get_resource(SECOND)
        assert client.attestation is attestation  # no second handshake
        assert first.reveal() == MODEL_KEY and second.reveal() == SECOND_KEY


def test_bearer_token_alone_is_accepted_without_cookie(
    kbs_url: str, sample_attester: UnsafeSampleAttester
) -> None:
    with KbsClient(url=kbs_url, attester=sample_attester) as client:
        client.attest()
        token = client._token.value  # type: ignore[union-attr]  # test-only peek at the private token
        key = client.tee_key
    response = httpx.get(
        f"{kbs_url}/kbs/v0/resource/default/model/key", headers={"authorization": f"Bearer {token}"}
    )
    assert response.status_code == 200
    from attest.kbs.wire import JweResponse

    assert key.decrypt(JweResponse.from_json(response.content)).reveal() == MODEL_KEY


def test_rsa_tee_key(kbs_url: str, sample_attester: UnsafeSampleAttester, rsa_tee_key: TeeKeyPair) -> None:
    with KbsClient(url=kbs_url, attester=sample_attester, tee_key=rsa_tee_key) as client:
        assert client.get_resource(MODEL).reveal() == MODEL_KEY


def _auth(url: str, client: httpx.Client, version: str = "0.4.0") -> tuple[str, str]:
    response = client.post(
        f"{url}/kbs/v0/auth", json={"version": version, "tee": "sample", "extra-params": ""}
    )
    assert response.status_code == 200, response.text
    assert "path" not in response.headers["set-cookie"].lower()
    return response.json()["nonce"], response.cookies["kbs-session-id"]


def _sample_attestation(nonce: str, key: TeeKeyPair) -> bytes:
    runtime = RuntimeData(nonce=nonce, tee_pubkey=key.public_key)
    evidence = UnsafeSampleAttester(allow_insecure=True).collect(
        runtime.primary_digest("", HashAlgorithm.SHA384)
    )
    return Attestation(
        runtime_data=runtime, tee_evidence=CompositeEvidence(primary_evidence=evidence.to_json())
    ).to_bytes()


def test_challenge_shape_is_trustees(kbs_url: str) -> None:
    with httpx.Client() as http:
        response = http.post(
            f"{kbs_url}/kbs/v0/auth", json={"version": "0.4.0", "tee": "tdx", "extra-params": {}}
        )
    body = response.json()
    assert body["extra-params"] == ""
    assert len(base64.b64decode(body["nonce"], validate=True)) == 32
    assert response.cookies["kbs-session-id"]


def test_replayed_nonce_is_refused(kbs_url: str) -> None:
    key = TeeKeyPair.generate("ec")
    with httpx.Client() as http:
        old_nonce, _ = _auth(kbs_url, http)
        captured = _sample_attestation(old_nonce, key)
        _, new_session = _auth(kbs_url, http)
        http.cookies.clear()
        replay = http.post(
            f"{kbs_url}/kbs/v0/attest", content=captured, headers={"cookie": f"kbs-session-id={new_session}"}
        )
    assert replay.status_code == 401
    assert replay.json()["type"].endswith("/AttestationError")
    assert "nonce" in replay.json()["detail"]


def test_attested_session_returns_its_token_again(kbs_url: str) -> None:
    key = TeeKeyPair.generate("ec")
    with httpx.Client() as http:
        nonce, session = _auth(kbs_url, http)
        body = _sample_attestation(nonce, key)
        headers = {"cookie": f"kbs-session-id={session}"}
        first = http.post(f"{kbs_url}/kbs/v0/attest", content=body, headers=headers)
        again = http.post(f"{kbs_url}/kbs/v0/attest", content=body, headers=headers)
    assert first.status_code == again.status_code == 200
    assert first.json()["token"] == again.json()["token"]
    claims = peek_claims(first.json()["token"])
    assert claims is not None and claims.tee_pubkey() == key.public_key


def test_expired_session_is_refused_and_the_client_attests_again(
    fresh_kbs: FreshKbs, sample_attester: UnsafeSampleAttester
) -> None:
    clock = ManualClock()
    key = TeeKeyPair.generate("ec")
    with fresh_kbs(_config(allow_insecure_sample_evidence=True, clock=clock, session_timeout_s=60)) as url:
        with httpx.Client() as http:
            nonce, session = _auth(url, http)
            clock.advance(61)
            late = http.post(
                f"{url}/kbs/v0/attest",
                content=_sample_attestation(nonce, key),
                headers={"cookie": f"kbs-session-id={session}"},
            )
        assert late.status_code == 401 and "session expired" in late.json()["detail"]

        with KbsClient(url=url, attester=sample_attester) as client:
            client.get_resource(MODEL)
            before = client.attestation
            clock.advance(600)  # session and token both expired
            with httpx.Client() as http:
                stale = http.get(
                    f"{url}/kbs/v0/resource/default/model/key",
                    headers={"cookie": f"kbs-session-id={client._token.session_id}"},  # type: ignore[union-attr]
                )
            assert stale.status_code == 401 and stale.json()["type"].endswith("/TokenNotFound")
            assert client.get_resource(MODEL).reveal() == MODEL_KEY
            assert client.attestation is not before  # re-attested once


def test_policy_deny_names_the_resource_and_the_kbs_detail(
    kbs_url: str, sample_attester: UnsafeSampleAttester
) -> None:
    with KbsClient(url=kbs_url, attester=sample_attester) as client, pytest.raises(KeyAccessDenied) as info:
        client.get_resource("kbs:///default/restricted/key")
    message = str(info.value)
    assert "kbs:///default/restricted/key" in message
    assert "resource policy" in message
    assert "the rule for default/restricted/* does not allow sample evidence" in message


def test_missing_resource_is_named(kbs_url: str, sample_attester: UnsafeSampleAttester) -> None:
    with KbsClient(url=kbs_url, attester=sample_attester) as client, pytest.raises(ResourceNotFound) as info:
        client.get_resource("kbs:///default/model/nope")
    assert "kbs:///default/model/nope" in str(info.value)
    assert "set-resource --path default/model/nope" in str(info.value)


def test_version_mismatch_is_reported_by_the_dev_kbs(kbs_url: str) -> None:
    with httpx.Client() as http:
        response = http.post(
            f"{kbs_url}/kbs/v0/auth", json={"version": "0.1.1", "tee": "sample", "extra-params": ""}
        )
    assert response.status_code == 401
    assert response.json() == {
        "type": "https://github.com/confidential-containers/kbs/errors/AttestationError",
        "detail": "Attestation error: RCAR handshake Auth failed: KBS Client Protocol Version Mismatch: "
        "expect =0.4.0 while the request is 0.1.1",
    }


def test_sample_evidence_is_refused_without_the_insecure_flag(
    fresh_kbs: FreshKbs, sample_attester: UnsafeSampleAttester
) -> None:
    with (
        fresh_kbs(_config()) as url,
        KbsClient(url=url, attester=sample_attester) as client,
        pytest.raises(KeyAccessDenied, match="--allow-insecure-sample-evidence"),
    ):
        client.get_resource(MODEL)


def test_wrong_binding_is_refused_at_attest(kbs_url: str) -> None:
    with (
        KbsClient(url=kbs_url, attester=TamperingSampleAttester()) as client,
        pytest.raises(KeyAccessDenied, match="failed step 'report_data'"),
    ):
        client.attest()


def test_hardware_evidence_without_verifier_is_refused(kbs_url: str) -> None:
    key = TeeKeyPair.generate("ec")
    with httpx.Client() as http:
        response = http.post(
            f"{kbs_url}/kbs/v0/auth", json={"version": "0.4.0", "tee": "snp", "extra-params": ""}
        )
        nonce, session = response.json()["nonce"], response.cookies["kbs-session-id"]
        body = Attestation(
            runtime_data=RuntimeData(nonce=nonce, tee_pubkey=key.public_key),
            tee_evidence=CompositeEvidence(primary_evidence={"attestation_report": {}}),
        ).to_bytes()
        http.cookies.clear()
        refused = http.post(
            f"{kbs_url}/kbs/v0/attest", content=body, headers={"cookie": f"kbs-session-id={session}"}
        )
    assert refused.status_code == 401
    assert refused.json()["type"].endswith("/AttestationError")


def test_selected_hash_algorithm_is_honoured(
    fresh_kbs: FreshKbs, sample_attester: UnsafeSampleAttester
) -> None:
    config = _config(allow_insecure_sample_evidence=True, hash_algorithm=HashAlgorithm.SHA512)
    with fresh_kbs(config) as url, KbsClient(url=url, attester=sample_attester) as client:
        assert client.get_resource(MODEL).reveal() == MODEL_KEY
        assert client.attestation is not None and client.attestation.hash_algorithm is HashAlgorithm.SHA512


def test_admin_api_uploads_and_sets_policy(
    fresh_kbs: FreshKbs, sample_attester: UnsafeSampleAttester
) -> None:
    with fresh_kbs(_config(allow_insecure_sample_evidence=True)) as url:
        with KbsAdminClient(url=url, admin_token=SecretBytes(ADMIN_TOKEN)) as admin:
            admin.set_resource("demo/llama/key", b"uploaded-key")
            with KbsClient(url=url, attester=sample_attester) as client:
                assert client.get_resource("kbs:///demo/llama/key").reveal() == b"uploaded-key"
            admin.set_resource_policy(
                b'{"version": 1, "rules": [{"resource": "demo/*/*", "allow_sample": true}]}'
            )
            with (
                KbsClient(url=url, attester=sample_attester) as client,
                pytest.raises(KeyAccessDenied, match="no rule"),
            ):
                client.get_resource(MODEL)
            with pytest.raises(KeyBrokerProtocolError, match="rego is not supported"):
                admin.set_resource_policy(b"package policy\ndefault allow = true\n")
        with (
            KbsAdminClient(url=url, admin_token=SecretBytes(b"wrong-token-0123456789")) as intruder,
            pytest.raises(KeyAccessDenied, match="admin token"),
        ):
            intruder.set_resource("demo/llama/key", b"evil")
        with httpx.Client() as http:
            listed = http.get(
                f"{url}/kbs/v0/resource-policy", headers={"authorization": f"Bearer {ADMIN_TOKEN.decode()}"}
            )
        assert listed.status_code == 200 and listed.json()["rules"][0]["resource"] == "demo/*/*"


def test_unknown_plugin_is_404(kbs_url: str) -> None:
    response = httpx.get(f"{kbs_url}/kbs/v0/nosuchplugin/a/b")
    assert response.status_code == 404
    assert response.json()["type"].endswith("/PluginNotFound")


@pytest.mark.parametrize("plugin", ["reference-value", "attestation-policy"])
def test_reference_values_are_not_taken_the_workload_policy_pins_measurements(
    kbs_url: str, plugin: str
) -> None:
    response = httpx.post(f"{kbs_url}/kbs/v0/{plugin}", content=b"{}")
    assert response.status_code == 404 and response.json()["type"].endswith("/PluginNotFound")
    assert "--resource-policy" in response.json()["detail"]
