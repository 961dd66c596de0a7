"""Where the boot gets its hardware and its key source from: injected, production by default.

:class:`runtime.boot.Runtime` takes one :class:`BootSeams`. In production every field is the real
thing (:func:`attest.tee.select.select_attester`, :func:`attest.tee.select.detect_devices`,
:func:`attest.tee.select.nvidia_gpus_present`, :func:`attest.tee.select.init_data_register`,
:func:`attest.keysource.key_source_for`); a test passes doubles here instead of patching the
runtime's methods or its module's globals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from attest.keysource.registry import KeySourceFactory, key_source_for
from attest.tee.attester import Attester, DeviceAttester, DeviceGate
from attest.tee.select import (
    detect_devices,
    gate_device,
    init_data_register,
    nvidia_gpus_present,
    select_attester,
)

__all__ = ["AttesterFactory", "BootSeams", "DeviceAttesterFactory", "DeviceGateRunner"]


class AttesterFactory(Protocol):
    """Return the primary TEE's attester named ``name`` (``auto``: detect it)."""

    def __call__(
        self, name: str, *, allow_insecure: bool = False, sample_init_data: bytes | None = None
    ) -> Attester: ...


class DeviceAttesterFactory(Protocol):
    """Return the attesters of the devices ``gpus`` asks for (``auto``, ``none``, ``nvidia``, ...)."""

    def __call__(
        self, *, gpus: str = "auto", allow_insecure: bool = False, allow_gpu_cc_off: bool = False
    ) -> list[DeviceAttester]: ...


class DeviceGateRunner(Protocol):
    """Run a device's local gate: at the boot, and with ``recheck`` in every watchdog round."""

    def __call__(
        self, device: DeviceAttester, *, expected_count: int | None = None, recheck: bool = False
    ) -> DeviceGate: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class BootSeams:
    """The factories the boot builds its attesters and key source with (production by default)."""

    attesters: AttesterFactory = select_attester
    devices: DeviceAttesterFactory = detect_devices
    key_sources: KeySourceFactory = key_source_for
    #: Whether NVIDIA GPUs are on this machine (attested or not: an unattested one is claimed).
    gpus_present: Callable[[], bool] = nvidia_gpus_present
    #: The primary TEE's init-data register, read from what the host cannot forge (TDX: the
    #: TDREPORT or a locally verified quote; the sample TEE: what it was given).
    init_data_register: Callable[[Attester], bytes] = init_data_register
    #: The devices' local gate, for the boot's evidence stage and the watchdog's rounds.
    device_gate: DeviceGateRunner = gate_device
