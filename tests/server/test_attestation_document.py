"""The attestation document: what the report data commits to, and the binding checks."""

from __future__ import annotations

import base64
import dataclasses

import pytest

from attest.binding import document_device_nonce
from attest.document import AttestationDocument
from attest.keysource.base import KeyReleaseReceipt
from attest.runconfig import RunConfiguration
from attest.tee.sample.attester import UnsafeSampleAttester, UnsafeSampleDeviceAttester
from foundation.errors import MalformedEvidence, PolicyViolation, VerificationError
from server.attestation import AttestationService, AttestedWorkload
from tests.attest.support import workload_pins

NONCE = bytes(range(32))
DIGEST = "sha256:" + "aa" * 32
SPKI = "bb" * 32
CONFIG = RunConfiguration.from_pins(workload_pins(DIGEST))


RECEIPT = KeyReleaseReceipt(
    kbs_url="http://127.0.0.1:8080",
    resource="kbs:///r/t/x",
    protocol_version="0.4.0",
    tee="sample",
    devices=("sampledevice",),
    hash_algorithm="sha384",
    token_sha256="cc" * 32,
    tee_pubkey_thumbprint="dd" * 16,
)
#: The service's own arguments; every other keyword of :func:`service` is an AttestedWorkload field.
_SERVICE_ARGS = ("attester", "devices", "clock")


def service(**kw: object) -> AttestationService:
    """A sample-TEE service; ``kw`` overrides the service's arguments and the workload's fields."""
    args: dict[str, object] = {
        "attester": UnsafeSampleAttester(allow_insecure=True),
        "devices": [UnsafeSampleDeviceAttester(allow_insecure=True)],
    }
    fields: dict[str, object] = {
        "model_digest": DIGEST,
        "config": CONFIG,
        "tls_spki_sha256": SPKI,
        "key_release": RECEIPT,
        "runtime_version": "test",
    }
    for name, value in kw.items():
        (args if name in _SERVICE_ARGS else fields)[name] = value
    return AttestationService(AttestedWorkload(**fields), **args)  # type: ignore[arg-type]


def roundtrip(doc: AttestationDocument) -> AttestationDocument:
    import json

    return AttestationDocument.from_json(json.loads(doc.to_bytes()))


def test_report_data_commits_to_claims_and_devices_to_derived_nonce() -> None:
    doc = roundtrip(service().document([NONCE]))
    primary_rd = doc.primary.to_json()["report_data"]
    assert base64.b64decode(primary_rd) == doc.claims.report_data()
    assert len(doc.claims.report_data()) == 48
    (device,) = doc.devices
    assert base64.b64decode(device.to_json()["report_data"]) == document_device_nonce(
        [NONCE], doc.claims.enclave_nonce
    )
    checks = doc.check_binding(
        nonce=NONCE, observed_tls_spki_sha256=SPKI, expected_model_digest=DIGEST, allow_insecure=True
    )
    assert [c.name for c in checks] == ["nonce", "devices", "tls", "model", "config", "tee", "canary"]
    assert doc.claims.config_sha256 == CONFIG.sha256


def test_every_claim_changes_the_report_data() -> None:
    base = service().document([NONCE]).claims
    variants = [
        dataclasses.replace(base, nonces=(bytes(32),)),
        dataclasses.replace(base, nonces=(NONCE, bytes(32))),
        dataclasses.replace(base, enclave_nonce=bytes(32)),
        dataclasses.replace(base, issued_at=base.issued_at + 1),
        dataclasses.replace(base, canary={"status": "passed", "tokens": 16, "reference_sha256": "00" * 32}),
        dataclasses.replace(base, model_digest="sha256:" + "cc" * 32),
        dataclasses.replace(base, config_sha256="cc" * 32),
        dataclasses.replace(base, tls_spki_sha256=None),
        dataclasses.replace(base, devices=()),
        dataclasses.replace(base, key_release=None),
        dataclasses.replace(base, insecure_modes=("key from a file",)),
        dataclasses.replace(base, runtime={"name": "other"}),
    ]
    digests = {v.report_data() for v in variants} | {base.report_data()}
    assert len(digests) == len(variants) + 1


@pytest.mark.parametrize(
    ("kw", "error", "message"),
    [
        ({"nonce": bytes(32)}, VerificationError, "answers other nonces"),
        ({"nonce": None}, VerificationError, "a challenged document was given"),
        ({"observed_tls_spki_sha256": "cc" * 32}, VerificationError, "possible interception"),
        ({"observed_tls_spki_sha256": None}, PolicyViolation, "not bound to a TLS key"),
        ({"expected_model_digest": "sha256:" + "dd" * 32}, PolicyViolation, "not the expected"),
        ({"expected_config_sha256": "dd" * 32}, PolicyViolation, "config: the server runs configuration"),
        ({"allow_insecure": False}, PolicyViolation, "INSECURE development mode \\(sample TEE"),
    ],
)
def test_binding_failures_name_the_step(kw: dict[str, object], error: type[Exception], message: str) -> None:
    doc = service().document([NONCE])
    args: dict[str, object] = {
        "nonce": NONCE, "observed_tls_spki_sha256": SPKI, "expected_model_digest": DIGEST,
        "allow_insecure": True,
    }  # fmt: skip
    args.update(kw)
    with pytest.raises(error, match=message):
        doc.check_binding(**args)  # type: ignore[arg-type]


def test_swapped_device_evidence_is_detected() -> None:
    doc = service().document([NONCE])
    other = service().document([bytes(reversed(NONCE))])
    forged = dataclasses.replace(doc, devices=other.devices)
    with pytest.raises(VerificationError, match="devices"):
        forged.check_binding(
            nonce=NONCE, observed_tls_spki_sha256=SPKI, expected_model_digest=None, allow_insecure=True
        )


def test_a_refresh_that_answered_nonces_serves_them_and_the_cache() -> None:
    """One collection for a cache refresh and the verifiers waiting beside it: the document answers
    their nonces and states its maximum age, and it checks out both ways (and only within its age)."""
    doc = roundtrip(service().document([NONCE], max_age_s=60))
    binding: dict[str, object] = {"observed_tls_spki_sha256": SPKI, "expected_model_digest": DIGEST}
    doc.check_binding(nonce=NONCE, allow_insecure=True, **binding)  # type: ignore[arg-type]
    checks = doc.check_binding(nonce=None, allow_insecure=True, **binding)  # type: ignore[arg-type]
    assert checks[0].name == "nonce" and checks[0].detail.startswith("unchallenged")
    with pytest.raises(VerificationError, match=r"cached document is .* old"):
        doc.check_binding(nonce=None, allow_insecure=True, now=doc.claims.issued_at + 61, **binding)  # type: ignore[arg-type]
    with pytest.raises(VerificationError, match="answers other nonces"):
        doc.check_binding(nonce=bytes(32), allow_insecure=True, **binding)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(format="enclave-serve/attestation/v1"),
        lambda d: d["claims"].pop("config"),
        lambda d: d["claims"].update(config={"sha256": "not hex"}),
        lambda d: d["claims"].update(purpose="something-else"),
        lambda d: d["claims"].pop("model"),
        lambda d: d["evidence"].update(tee="tdx"),
        lambda d: d["evidence"].update(primary="not an object"),
        lambda d: d["evidence"]["devices"].append({"tee": "bogus", "evidence": {}}),
        lambda d: d["claims"].update(extra=1),
        lambda d: d["claims"].update(nonces=[" " + "ab" * 31 + "a"]),
        lambda d: d["claims"].update(nonces=["AB" * 32]),
        lambda d: d["claims"].update(nonces=["ab" * 32, "ab" * 32]),
        lambda d: d["claims"].update(nonces=[]),  # unchallenged, but no max_age_s
        lambda d: d["claims"].update(max_age_s=0),  # a maximum age out of range
        lambda d: d.update(format="enclave-serve/attestation/v3"),  # v3 refused unchallenged nonces
        lambda d: d["claims"].update(enclave_nonce="00"),
        lambda d: d["claims"].update(issued_at="1"),
        lambda d: d["claims"].update(canary=None),
        lambda d: d["claims"].update(canary={"status": "failed"}),
        lambda d: d.update(collateral=[]),
    ],
)
def test_malformed_documents_are_rejected(mutate) -> None:  # type: ignore[no-untyped-def]
    body = service().document([NONCE]).to_json()
    mutate(body)
    with pytest.raises(MalformedEvidence):
        AttestationDocument.from_json(body)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["claims"].update(key_release={"n": 2**64}),
        lambda d: d["claims"].update(key_release={"x": float("nan")}),
        lambda d: d["evidence"]["devices"].append(
            {"tee": "tdx", "evidence": {"quote": "", "cc_eventlog": None}}
        ),
    ],
    ids=["huge-int", "nan", "cpu-tee-as-device"],
)
def test_hostile_documents_are_malformed_not_crashes(mutate) -> None:  # type: ignore[no-untyped-def]
    body = service().document([NONCE]).to_json()
    mutate(body)
    with pytest.raises(MalformedEvidence):
        AttestationDocument.from_json(body)


def test_run_configuration_is_canonical_and_strict() -> None:
    again = RunConfiguration.from_bytes(CONFIG.raw)
    assert again.sha256 == CONFIG.sha256 and again.manifest_digest == DIGEST
    body = CONFIG.to_json()
    assert set(body) == {"format", "model", "runtime", "settings", "vllm", "environment"}
    import json

    import rfc8785

    for bad in (
        json.dumps(body).encode(),  # not canonical
        rfc8785.dumps({**body, "extra": {}}),
        rfc8785.dumps({k: v for k, v in body.items() if k != "environment"}),
        rfc8785.dumps({**body, "format": "enclave-serve/config/v0"}),
        rfc8785.dumps({**body, "settings": []}),
        b"\xff",
    ):
        with pytest.raises(MalformedEvidence):
            RunConfiguration.from_bytes(bad)
    with pytest.raises(ValueError, match="canonical"):
        RunConfiguration.from_pins(workload_pins(DIGEST, settings={"x": float("nan")}))
