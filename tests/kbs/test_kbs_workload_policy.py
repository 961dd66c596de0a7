"""kbs-dev enforces the workload policy: init-data bound to the evidence, pins checked at release."""

from __future__ import annotations

from typing import Any

import pytest

from attest.evidence import TeeKind
from attest.initdata import ENCLAVE_SERVE_ENTRY, InitData
from attest.kbs.client import KbsClient
from attest.kbs.dev.server import DevKbsConfig, ResourceStore
from attest.tee.sample.attester import UnsafeSampleAttester
from attest.verify.workload import WorkloadPolicy
from foundation.errors import KeyAccessDenied, KeyRetrievalError
from foundation.resource import ResourceUri
from foundation.secret import SecretBytes
from tests.attest.support import workload_pins
from tests.kbs.support import ADMIN_TOKEN, run_dev_kbs

MODEL = "sha256:" + "ab" * 32
RESOURCE = "models/key/tiny"
CONFIG = workload_pins(MODEL, key_resource=f"kbs:///{RESOURCE}").config_sha256


def init_data(model: str = MODEL, **overrides: Any) -> InitData:
    pins = workload_pins(model, key_resource=f"kbs:///{RESOURCE}", **overrides)
    return InitData.build(
        entries=[("policy.rego", "package agent_policy\n"), (ENCLAVE_SERVE_ENTRY, pins.to_toml())]
    )


def policy_for(init: InitData) -> WorkloadPolicy:
    return WorkloadPolicy.from_toml(
        f'version = 1\ninsecure_development = true\n[tee]\nallowed = ["sample"]\n'
        f'[workload]\nmodel = ["{MODEL}"]\nconfig = ["{CONFIG}"]\ninit_data = ["{init.digest_text}"]\n'
        'runtime_version = ["0.1.0"]\n'
    )


@pytest.fixture
def kbs() -> object:
    good = init_data()
    config = DevKbsConfig(
        admin_token=SecretBytes(ADMIN_TOKEN),
        resources=ResourceStore({RESOURCE: b"k" * 32}),
        allow_insecure_sample_evidence=True,
        workload_policies={RESOURCE: policy_for(good)},
    )
    with run_dev_kbs(config) as url:
        yield url, good


def fetch(url: str, init: InitData | None, *, register: bytes | None = None) -> bytes:
    reg = register if register is not None else (None if init is None else init.register(TeeKind.SAMPLE))
    attester = UnsafeSampleAttester(allow_insecure=True, init_data=reg)
    with KbsClient(url=url, attester=attester, init_data=None if init is None else init.raw) as client:
        return client.get_resource(ResourceUri.parse(f"kbs:///{RESOURCE}")).reveal()


def test_the_pinned_workload_gets_the_key(kbs: tuple[str, InitData]) -> None:
    url, good = kbs
    assert fetch(url, good) == b"k" * 32


@pytest.mark.parametrize(
    ("scenario", "make", "rules"),
    [
        ("init-data pinning another model", lambda: init_data(model="sha256:" + "00" * 32),
         ["workload.init_data", "workload.model"]),
        ("init-data declaring another configuration", lambda: init_data(vllm_args=("--max-model-len", "64")),
         ["workload.init_data", "workload.config"]),
        ("no init-data at all", lambda: None, ["workload.init_data", "workload.model", "workload.config"]),
    ],
)  # fmt: skip
def test_other_software_is_denied_naming_the_rules(
    kbs: tuple[str, InitData], scenario: str, make: object, rules: list[str]
) -> None:
    url, _good = kbs
    with pytest.raises(KeyAccessDenied) as info:
        fetch(url, make())  # type: ignore[operator]
    for rule in rules:
        assert rule in str(info.value), (scenario, str(info.value))


def test_init_data_that_is_not_the_evidences_is_refused_at_attest(kbs: tuple[str, InitData]) -> None:
    url, good = kbs
    with pytest.raises(KeyRetrievalError, match="init-data is not what the evidence carries"):
        fetch(url, good, register=bytes(48))
