"""Fixtures for the KBS tests: a real kbs-dev on 127.0.0.1 (session-wide) and fresh ones."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest

from attest.kbs.dev.policy import PolicyRule, ResourcePolicy
from attest.kbs.dev.server import DevKbsConfig, ResourceStore
from attest.kbs.teekey import TeeKeyPair
from attest.tee.sample.attester import UnsafeSampleAttester, UnsafeSampleDeviceAttester
from foundation.secret import SecretBytes
from tests.kbs.support import ADMIN_TOKEN, ManualClock, run_dev_kbs

#: Resources of the session KBS.
MODEL_KEY = bytes(range(32))
SECOND_KEY = b"\xa5" * 32
RESTRICTED_KEY = b"restricted-secret-material-000000"
DEVICE_KEY = b"needs-gpu-evidence-secret-0000000"

SESSION_POLICY = ResourcePolicy(
    rules=(
        PolicyRule(resource="default/restricted/*", tees=("tdx",)),
        PolicyRule(resource="default/gpu/*", require_devices=("sampledevice",), allow_sample=True),
        PolicyRule(resource="*", allow_sample=True),
    )
)


@pytest.fixture(scope="session")
def kbs_clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(scope="session")
def kbs_config(kbs_clock: ManualClock) -> DevKbsConfig:
    return DevKbsConfig(
        admin_token=SecretBytes(ADMIN_TOKEN),
        resources=ResourceStore(
            {
                "default/model/key": MODEL_KEY,
                "default/model/second": SECOND_KEY,
                "default/restricted/key": RESTRICTED_KEY,
                "default/gpu/key": DEVICE_KEY,
            }
        ),
        policy=SESSION_POLICY,
        allow_insecure_sample_evidence=True,
        clock=kbs_clock,
    )


@pytest.fixture(scope="session")
def kbs_url(kbs_config: DevKbsConfig) -> Iterator[str]:
    """The URL of a real kbs-dev (uvicorn, TCP) shared by the session."""
    with run_dev_kbs(kbs_config) as url:
        yield url


@pytest.fixture
def fresh_kbs() -> Callable[..., AbstractContextManager[str]]:
    """Start a dedicated kbs-dev with a given config: ``with fresh_kbs(config) as url``."""
    return run_dev_kbs


@pytest.fixture(scope="session")
def rsa_tee_key() -> TeeKeyPair:
    """One RSA-3072 TEE key for the whole session (generation is the slow part)."""
    return TeeKeyPair.generate("rsa")


@pytest.fixture
def sample_attester() -> UnsafeSampleAttester:
    return UnsafeSampleAttester(allow_insecure=True)


@pytest.fixture
def sample_device() -> UnsafeSampleDeviceAttester:
    return UnsafeSampleDeviceAttester(allow_insecure=True)


def no_sleep(_: float) -> None:
    """Sleep replacement for retry tests that should not wait."""
