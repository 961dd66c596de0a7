"""The draft ACI report: insecure modes and device evidence bound inside the keyset, and the
user's verifier (attest.client.aci) refusing a report a relay stripped or altered."""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attest.aci import AciReport, aci_device_nonce, aci_report_data, keyset_digest
from attest.client.aci import verify_aci_report
from attest.evidence import TeeKind
from attest.tee.attester import DeviceAttester
from attest.tee.sample.evidence import SampleDeviceEvidence
from attest.verify.workload import GpuRules, WorkloadPolicy, WorkloadRules
from foundation.errors import MalformedEvidence
from tests.server.test_attestation_document import CONFIG, DIGEST, SPKI, service
from tests.server.test_attestation_routes import aci_report_data as independent_report_data

NONCE = bytes(range(32))
POLICY = WorkloadPolicy(
    tees=("sample",),
    workload=WorkloadRules(model=(DIGEST,), config=("sha256:" + CONFIG.sha256,)),
    gpu=GpuRules(count=1, driver=("sample",), vbios=("sample",)),  # required; sampledevice has none
    insecure_development=True,
)

Report = dict[str, Any]


def report(nonce: bytes | None = NONCE, **kw: object) -> Report:
    body: Report = json.loads(json.dumps(service(**kw).aci(nonce)))
    return body


def verify(body: Report, nonce: bytes | None = NONCE, **kw: Any):  # type: ignore[no-untyped-def]
    args: dict[str, Any] = {
        "nonce": nonce,
        "observed_tls_spki_sha256": SPKI,
        "policy": POLICY,
        "allow_insecure": True,
    }
    args.update(kw)
    return verify_aci_report(body, **args)


class CountingDevice(DeviceAttester):
    """A test double: sampledevice evidence that counts its collections (insecure, like the sample)."""

    tee: ClassVar[TeeKind] = TeeKind.SAMPLE_DEVICE
    insecure: ClassVar[bool] = True

    def __init__(self) -> None:
        self.nonces: list[bytes] = []

    @classmethod
    def detect(cls) -> bool:
        return False

    def collect(self, runtime_data: bytes) -> SampleDeviceEvidence:
        self.nonces.append(bytes(runtime_data))
        return SampleDeviceEvidence(report_data=bytes(runtime_data))


def test_a_report_verifies_step_by_step_with_modes_and_devices_inside_the_keyset() -> None:
    body = report()
    keyset = body["attestation"]["workload_keyset"]
    modes = keyset["enclave_serve"]["insecure_modes"]
    assert modes == body["attestation"]["evidence"]["insecure_modes"] and any("sample" in m for m in modes)
    assert [d["tee"] for d in keyset["enclave_serve"]["devices"]] == ["sampledevice"]
    # Still aci/1 for a reader that knows nothing of our member: digest, statement, report data.
    digest, data = independent_report_data(keyset, NONCE.hex())
    assert body["workload_keyset_digest"] == digest and body["attestation"]["report_data"] == data.hex()
    verdict = verify(body)
    assert verdict.ok, verdict.failures
    assert [s.name for s in verdict.steps] == [
        "report", "keyset", "nonce", "insecure_modes", "devices", "tls", "model", "config", "tee",
        "evidence:sample", "device:sampledevice", "init_data",
        "policy:tee", "policy:workload.init_data", "policy:gpu", "policy:workload.model",
        "policy:workload.config",
    ]  # fmt: skip
    assert verdict.to_json()["insecure_modes"] == modes


def test_the_unchallenged_report_verifies_without_a_nonce_and_says_it_proves_no_freshness() -> None:
    verdict = verify(report(None), None)
    assert verdict.ok, verdict.failures
    assert "proves no freshness" in next(s.detail for s in verdict.steps if s.name == "nonce")
    assert not verify(report(None), NONCE).ok  # not an answer to a nonce


def test_devices_sign_a_nonce_derived_from_the_keyset_once_per_keyset() -> None:
    device = CountingDevice()
    svc = service(devices=[device])
    digest = svc.keyset_digest
    bodies = [svc.aci(NONCE), svc.aci(bytes(32)), svc.aci(None)]
    assert len(device.nonces) == 1  # collected once, when the keyset was made
    keyset = bodies[0]["attestation"]["workload_keyset"]
    assert device.nonces == [aci_device_nonce(keyset)]
    assert {b["workload_keyset_digest"] for b in bodies} == {digest} == {keyset_digest(keyset)}
    for body, nonce in zip(bodies, (NONCE, bytes(32), None), strict=True):
        assert bytes.fromhex(body["attestation"]["report_data"]) == aci_report_data(digest, nonce)
        assert verify(json.loads(json.dumps(body)), nonce).ok


def test_two_keysets_differ_in_their_enclave_nonce_so_device_nonces_are_never_known_in_advance() -> None:
    first, second = report(), report()
    nonces = [r["attestation"]["workload_keyset"]["enclave_serve"]["enclave_nonce"] for r in (first, second)]
    assert nonces[0] != nonces[1]
    assert aci_device_nonce(first["attestation"]["workload_keyset"]) != aci_device_nonce(
        second["attestation"]["workload_keyset"]
    )


def _strip_report_modes(r: Report) -> None:
    r["attestation"]["evidence"]["insecure_modes"] = []


def _strip_keyset_modes(r: Report) -> None:
    r["attestation"]["workload_keyset"]["enclave_serve"]["insecure_modes"] = []
    r["attestation"]["evidence"]["insecure_modes"] = []


def _strip_all_modes_and_rehash(r: Report) -> None:
    """Strip the modes everywhere and recompute the digest and report data, as a careful relay
    would: only the CPU evidence (signed by the hardware) still holds the original."""
    _strip_keyset_modes(r)
    _rehash(r)


def _rehash(r: Report) -> None:
    keyset = r["attestation"]["workload_keyset"]
    r["workload_keyset_digest"] = keyset_digest(keyset)
    r["attestation"]["report_data"] = aci_report_data(r["workload_keyset_digest"], NONCE).hex()


def _alter_a_mode(r: Report) -> None:
    r["attestation"]["evidence"]["insecure_modes"][0] = "nothing insecure here"


def _strip_devices(r: Report) -> None:
    r["attestation"]["evidence"]["devices"] = []


def _strip_devices_everywhere_and_rehash(r: Report) -> None:
    r["attestation"]["evidence"]["devices"] = []
    r["attestation"]["workload_keyset"]["enclave_serve"]["devices"] = []
    _rehash(r)


def _swap_device(r: Report) -> None:
    """Evidence from another device that signed the very same nonce."""
    nonce = aci_device_nonce(r["attestation"]["workload_keyset"])
    other = SampleDeviceEvidence(svn="7", report_data=nonce)
    r["attestation"]["evidence"]["devices"] = [{"tee": "sampledevice", "evidence": other.to_json()}]


def _add_device(r: Report) -> None:
    devices = r["attestation"]["evidence"]["devices"]
    devices.append(copy.deepcopy(devices[0]))


def _alter_device_digest(r: Report) -> None:
    r["attestation"]["workload_keyset"]["enclave_serve"]["devices"][0]["evidence_sha384"] = "00" * 48


@pytest.mark.parametrize(
    ("scenario", "mutate", "step"),
    [
        ("insecure modes stripped from the report", _strip_report_modes, "insecure_modes"),
        ("a mode altered in the report", _alter_a_mode, "insecure_modes"),
        ("insecure modes stripped from keyset and report", _strip_keyset_modes, "keyset"),
        ("insecure modes stripped, digest and report data recomputed", _strip_all_modes_and_rehash,
         "evidence:sample"),
        ("device evidence stripped", _strip_devices, "devices"),
        ("device evidence swapped for another device's over the same nonce", _swap_device, "devices"),
        ("device evidence added", _add_device, "devices"),
        ("device digest altered in the keyset", _alter_device_digest, "keyset"),
        ("devices stripped everywhere, digest and report data recomputed",
         _strip_devices_everywhere_and_rehash, "evidence:sample"),
    ],
)  # fmt: skip
def test_stripping_or_altering_bound_members_breaks_verification(
    scenario: str, mutate: Callable[[Report], None], step: str
) -> None:
    body = report()
    mutate(body)
    verdict = verify(body)
    assert not verdict.ok, scenario
    assert verdict.steps[-1].name == step and not verdict.steps[-1].ok, (scenario, verdict.steps[-1])
    assert not any(s.name.startswith("policy:") for s in verdict.steps)


def test_an_insecure_report_is_refused_without_the_flag_even_with_its_modes_stripped() -> None:
    refused = verify(report(), allow_insecure=False)
    assert refused.failures[-1].name == "tee" and "INSECURE" in refused.failures[-1].detail
    stripped = report()
    _strip_report_modes(stripped)
    assert not verify(stripped, allow_insecure=False).ok


@pytest.mark.parametrize(
    ("scenario", "kw", "step"),
    [
        ("another nonce", {"nonce": bytes(32)}, "nonce"),
        ("another TLS key", {"observed_tls_spki_sha256": "cc" * 32}, "tls"),
        ("no TLS seen", {"observed_tls_spki_sha256": None}, "tls"),
        ("another model expected", {"expected_model_digest": "sha256:" + "dd" * 32}, "model"),
        ("another configuration expected", {"expected_config_sha256": "dd" * 32}, "config"),
        ("the keyset expired", {"now": datetime(2100, 1, 1, tzinfo=UTC)}, "keyset"),
        ("no policy", {"policy": None}, "policy"),
    ],
)
def test_binding_and_policy_failures_are_named(scenario: str, kw: dict[str, Any], step: str) -> None:
    verdict = verify(report(), **kw)
    assert not verdict.ok, scenario
    assert verdict.failures[-1].name == step, (scenario, verdict.failures)


def test_a_tampered_top_level_digest_or_tee_type_is_refused() -> None:
    body = report()
    body["workload_keyset_digest"] = "sha256:" + "00" * 32
    assert verify(body).failures[-1].name == "keyset"
    body = report()
    body["attestation"]["tee_type"] = "tdx"
    assert verify(body).failures[-1].name == "report"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r.update(api_version="aci/2"),
        lambda r: r["attestation"]["workload_keyset"].pop("enclave_serve"),
        lambda r: r["attestation"]["workload_keyset"]["enclave_serve"].pop("devices"),
        lambda r: r["attestation"]["workload_keyset"]["enclave_serve"].update(insecure_modes="none"),
        lambda r: r["attestation"]["workload_keyset"]["enclave_serve"].update(extra=1),
        lambda r: r["attestation"]["workload_keyset"]["enclave_serve"]["devices"].append({"tee": "x"}),
        lambda r: r["attestation"]["workload_keyset"].update(not_after="soon"),
        lambda r: r["attestation"].update(report_data="AB" * 32),
        lambda r: r["attestation"]["evidence"].update(devices=[{"tee": "sample", "evidence": {}}]),
        lambda r: r["attestation"]["evidence"].update(insecure_modes=[1]),
        lambda r: r["attestation"]["evidence"].pop("primary"),
        lambda r: r.pop("attestation"),
    ],
)
def test_malformed_reports_fail_the_first_step(mutate: Callable[[Report], None]) -> None:
    body = report()
    mutate(body)
    verdict = verify(body)
    assert [s.name for s in verdict.steps] == ["report"] and not verdict.ok


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
_PATHS = [
    ("api_version",), ("workload_keyset_digest",), ("attestation", "tee_type"), ("attestation", "report_data"),
    ("attestation", "workload_keyset", "not_after"), ("attestation", "workload_keyset", "tls_public_keys"),
    ("attestation", "workload_keyset", "enclave_serve", "devices"),
    ("attestation", "workload_keyset", "enclave_serve", "insecure_modes"),
    ("attestation", "workload_keyset", "enclave_serve", "enclave_nonce"),
    ("attestation", "evidence", "primary"), ("attestation", "evidence", "devices"),
    ("attestation", "evidence", "insecure_modes"), ("attestation", "evidence", "collateral"),
]  # fmt: skip
_REPORT = report()


@settings(max_examples=200, deadline=None)
@given(path=st.sampled_from(_PATHS), value=_JSON)
def test_any_value_anywhere_gives_a_clean_refusal_never_a_crash(path: tuple[str, ...], value: Any) -> None:
    body = copy.deepcopy(_REPORT)
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    verdict = verify(body)  # never raises: a malformed or unbound value fails a named step
    assert verdict.ok == (value == _report_at(path))


def _report_at(path: tuple[str, ...]) -> Any:
    node: Any = _REPORT
    for key in path:
        node = node[key]
    return node


@given(value=_JSON)
def test_arbitrary_json_is_malformed_not_a_crash(value: Any) -> None:
    with contextlib.suppress(MalformedEvidence):
        AciReport.from_json(value)
        raise AssertionError("arbitrary JSON parsed as an ACI report")
