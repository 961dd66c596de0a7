"""NVIDIA devices on the PCI bus, read from sysfs: the count that does not depend on NVML.

NVML answers for the GPUs the driver bound. Security decisions need an independent count:
a GPU the driver does not report (NVML missing, the driver not loaded, a device hidden from it)
would otherwise run unattested. ``/sys/bus/pci/devices/*/{vendor,class}`` is what the guest
kernel enumerated: NVIDIA's vendor id ``0x10de`` with a display-controller class (``0x03xxxx``)
is a GPU; a bridge-class NVIDIA function (``0x0680xx``) is an NVSwitch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["NVIDIA_VENDOR_ID", "SYSFS_PCI_DEVICES", "PciDevice", "nvidia_pci_devices"]

#: PCI vendor id of NVIDIA Corporation.
NVIDIA_VENDOR_ID = 0x10DE
#: Where the kernel lists PCI functions.
SYSFS_PCI_DEVICES = Path("/sys/bus/pci/devices")
_DISPLAY_CLASS = 0x03  # base class: display controller (VGA 0x0300, 3D 0x0302)
_BRIDGE_OTHER = 0x0680  # class 0x06, subclass 0x80: other bridge (NVSwitch)


@dataclass(frozen=True, slots=True)
class PciDevice:
    """One NVIDIA PCI function: its address (``0000:41:00.0``), class code and device id."""

    address: str
    class_code: int
    device_id: int

    @property
    def is_gpu(self) -> bool:
        """Whether the function is a GPU (display-controller class)."""
        return self.class_code >> 16 == _DISPLAY_CLASS

    @property
    def is_switch(self) -> bool:
        """Whether the function is an NVSwitch (other-bridge class)."""
        return self.class_code >> 8 == _BRIDGE_OTHER


def _read_hex(path: Path) -> int | None:
    try:
        return int(path.read_text().strip(), 16)
    except (OSError, ValueError):
        return None


def nvidia_pci_devices(root: Path = SYSFS_PCI_DEVICES) -> tuple[PciDevice, ...]:
    """Return the NVIDIA GPUs and NVSwitches the kernel enumerated, sorted by address.

    A missing ``root`` (no PCI bus, as in some sandboxes) gives an empty tuple; unreadable
    entries are skipped.
    """
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return ()
    found = []
    for entry in entries:
        if _read_hex(entry / "vendor") != NVIDIA_VENDOR_ID:
            continue
        class_code = _read_hex(entry / "class")
        if class_code is None:
            continue
        device = PciDevice(
            address=entry.name, class_code=class_code, device_id=_read_hex(entry / "device") or 0
        )
        if device.is_gpu or device.is_switch:
            found.append(device)
    return tuple(found)
