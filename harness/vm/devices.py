"""The guest's devices: one registry entry per name ``--devices`` takes.

A :class:`DeviceKind` of :data:`KINDS` says how a name becomes a device
(:attr:`DeviceKind.make`), whether it is storage (a disk holding the canary,
and a slot in the boot order, so OVMF connects it), which device model of
QEMU's device trace it is (``harness.analysis.device_models.MODELS`` holds that
model's trace events and what counts as quiesced), and, for the zoo, its
QEMU arguments. The device dataclasses (:class:`BlockDevice`,
:class:`NetDevice`, ...) each give their own arguments through
:func:`device_args`. Adding a device is one entry here and, if QEMU's trace
knows it under a new model, one model there.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from harness.errors import UsageError


def comma(value: str | os.PathLike[str]) -> str:
    """Escape a value for QEMU's option syntax (a comma is doubled)."""
    return str(value).replace(",", ",,")


@dataclass(frozen=True)
class BlockDevice:
    """A virtio-blk disk from an image file."""

    image: Path
    bootindex: int | None = None
    format: str = "raw"
    readonly: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "image", Path(self.image))
        if self.format not in ("raw", "qcow2"):
            raise ValueError(f"image format {self.format!r}: raw or qcow2")
        if self.bootindex is not None and self.bootindex < 0:
            raise ValueError(f"bootindex {self.bootindex} < 0")


@dataclass(frozen=True)
class NetDevice:
    """A virtio-net NIC on a user-mode netdev (``restrict=on``: no way out).

    :param hostfwd: TCP forwards ``(host_port, guest_port)``, the host side
        on 127.0.0.1 only (they work with ``restrict=on``).
    :param bootindex: puts the NIC in QEMU's boot order, which OVMF also
        reads as the list of devices to connect.
    """

    restrict: bool = True
    mac: str | None = None
    hostfwd: tuple[tuple[int, int], ...] = ()
    bootindex: int | None = None

    def __post_init__(self) -> None:
        if self.bootindex is not None and self.bootindex < 0:
            raise ValueError(f"bootindex {self.bootindex} < 0")
        object.__setattr__(self, "hostfwd", tuple(tuple(f) for f in self.hostfwd))
        for forward in self.hostfwd:
            if len(forward) != 2 or not all(isinstance(p, int) and 1 <= p <= 65535
                                            for p in forward):
                raise ValueError(f"hostfwd {forward!r}: (host port, guest port) in 1..65535")
        if self.mac is not None and not re.fullmatch(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}",
                                                     self.mac):
            raise ValueError(f"MAC address {self.mac!r}")


@dataclass(frozen=True)
class ScsiController:
    """A virtio-scsi controller, optionally with one scsi-hd from an image."""

    image: Path | None = None
    format: str = "raw"

    def __post_init__(self) -> None:
        if self.image is not None:
            object.__setattr__(self, "image", Path(self.image))
        if self.format not in ("raw", "qcow2"):
            raise ValueError(f"image format {self.format!r}: raw or qcow2")


@dataclass(frozen=True)
class RngDevice:
    """A virtio-rng device fed from the host's /dev/urandom."""

    source: Path = Path("/dev/urandom")


#: iPXE's EFI option ROM for e1000e, from Debian's ipxe-qemu.
E1000E_ROM = Path("/usr/lib/ipxe/qemu/efi-e1000e.rom")


@dataclass(frozen=True)
class ZooDevice:
    """A device of the zoo OVMF drives on q35 (``docs/devices.md``).

    :param kind: a zoo kind of :data:`KINDS`.
    :param image: the disk of a storage kind (nvme, ahci, xhci-storage,
        pvscsi, mptsas, lsi).
    :param bootindex: puts it in QEMU's boot order, which OVMF reads as the
        list of devices to connect.
    """

    kind: str
    image: Path | None = None
    bootindex: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS or KINDS[self.kind].zoo is None:
            raise ValueError(f"zoo device {self.kind!r}: one of {', '.join(ZOO_KINDS)}")
        if KINDS[self.kind].storage != (self.image is not None):
            raise ValueError(f"{self.kind}: a storage kind needs an image, others none")
        if self.image is not None:
            object.__setattr__(self, "image", Path(self.image))



Device = BlockDevice | NetDevice | ScsiController | RngDevice | ZooDevice


def _kind(device: Device) -> str:
    """The registry name of ``device``."""
    if isinstance(device, ZooDevice):
        return device.kind
    return {BlockDevice: "virtio-blk", NetDevice: "virtio-net", ScsiController: "virtio-scsi",
            RngDevice: "virtio-rng"}[type(device)]


@dataclass(frozen=True)
class Slot:
    """What :attr:`DeviceKind.make` gets: the boot disk, this kind's disk
    (storage kinds), and the next free place in the boot order."""

    boot_image: Path | None
    disk: Path | None
    bootindex: int


#: A zoo kind's QEMU arguments: ``(device, index, virtio-secure suffix,
#: the adversary NIC's socket)``.
ZooArgs = Callable[[ZooDevice, int, str, Path | None], list[str]]


@dataclass(frozen=True)
class DeviceKind:
    """One name ``--devices`` takes.

    :param name: the name.
    :param make: the device, given its :class:`Slot`.
    :param trace_model: its model in QEMU's device trace (W1, W2).
    :param storage: it gets a disk with the canary and a boot slot.
    :param zoo: a zoo kind's arguments (a :class:`ZooDevice`); None for the
        virtio devices, whose dataclasses carry their own.
    :param xhci: it hangs off the qemu-xhci controller.
    """

    name: str
    make: Callable[[Slot], Device]
    trace_model: str
    storage: bool = False
    zoo: ZooArgs | None = None
    xhci: bool = False


def _boot_disk(slot: Slot) -> Device:
    if slot.boot_image is None:
        raise UsageError("virtio-blk needs a boot image")
    return BlockDevice(slot.boot_image, bootindex=0)


def _zoo(name: str, args: ZooArgs, model: str = "", *, storage: bool = False,
         boots: bool = False, xhci: bool = False) -> DeviceKind:
    def make(slot: Slot) -> Device:
        if storage and slot.disk is None:
            raise UsageError(f"{name} needs a disk image")
        return ZooDevice(name, slot.disk if storage else None,
                         bootindex=slot.bootindex if storage or boots else None)
    return DeviceKind(name, make, model or name, storage, args, xhci)


def _drive(device: ZooDevice, index: int) -> tuple[list[str], str]:
    """A zoo disk's ``-drive`` and the ``drive=`` property naming it."""
    boot = "" if device.bootindex is None else f",bootindex={device.bootindex}"
    argv = []
    if device.image is not None:
        argv = ["-drive", f"if=none,id=zdisk{index},format=raw,file={comma(device.image)}"]
    return argv, f"drive=zdisk{index}{boot}"


def _nvme(device: ZooDevice, index: int, secure: str, nic: Path | None) -> list[str]:
    argv, drive = _drive(device, index)
    return argv + ["-device", f"nvme,id=znvme{index},serial=EBS{index:04d},{drive}"]


def _ahci(device: ZooDevice, index: int, secure: str, nic: Path | None) -> list[str]:
    argv, drive = _drive(device, index)
    # q35's own ICH9 AHCI controller (00:1f.2), first port
    return argv + ["-device", f"ide-hd,bus=ide.0,{drive}"]


def _usb_storage(device: ZooDevice, index: int, secure: str, nic: Path | None) -> list[str]:
    argv, drive = _drive(device, index)
    return argv + ["-device", f"usb-storage,bus=xhci.0,{drive}"]


def _scsi_hba(qom: str) -> ZooArgs:
    def args(device: ZooDevice, index: int, secure: str, nic: Path | None) -> list[str]:
        argv, drive = _drive(device, index)
        return argv + ["-device", f"{qom},id=zhba{index}",
                       "-device", f"scsi-hd,bus=zhba{index}.0,{drive}"]
    return args


def _usb_kbd(device: ZooDevice, index: int, secure: str, nic: Path | None) -> list[str]:
    return ["-device", "usb-kbd,bus=xhci.0"]


def _virtio_gpu(device: ZooDevice, index: int, secure: str, nic: Path | None) -> list[str]:
    return ["-device", f"virtio-gpu-pci,id=zgpu{index}{secure}"]


def _e1000e(device: ZooDevice, index: int, secure: str, nic: Path | None) -> list[str]:
    boot = "" if device.bootindex is None else f",bootindex={device.bootindex}"
    return ["-netdev", f"user,id=znet{index},restrict=on",
            "-device", (f"e1000e,netdev=znet{index},id=znic{index},"
                        f"romfile={comma(E1000E_ROM)}{boot}")]


def _adversary_nic(device: ZooDevice, index: int, secure: str, nic: Path | None) -> list[str]:
    """Legacy only (device ID 0x1000), which no OVMF driver connects."""
    if nic is None:
        raise ValueError("adversary-nic needs a socket path")
    # QEMU 7.2's dgram netdev needs a remote too: the NIC's transmissions
    # go there, and nobody reads them.
    sink = nic.with_name(nic.name + ".out")
    return ["-netdev", (f"dgram,id=znet{index},local.type=unix,local.path={comma(nic)},"
                        f"remote.type=unix,remote.path={comma(sink)}"),
            "-device", (f"virtio-net-pci,netdev=znet{index},id=advnic,"
                        # a confidential machine turns iommu_platform on for
                        # every virtio device, which a legacy one cannot have
                        "disable-legacy=off,disable-modern=on,iommu_platform=off,"
                        "romfile=")]


#: Every device name, in the order ``--devices`` help lists them.
KINDS: Mapping[str, DeviceKind] = {kind.name: kind for kind in (
    DeviceKind("virtio-blk", _boot_disk, "virtio-blk"),
    DeviceKind("virtio-net", lambda slot: NetDevice(), "virtio-net"),
    DeviceKind("virtio-scsi", lambda slot: ScsiController(), "virtio-scsi"),
    DeviceKind("virtio-rng", lambda slot: RngDevice(), "virtio-rng"),
    _zoo("nvme", _nvme, storage=True),
    _zoo("ahci", _ahci, storage=True),
    _zoo("xhci-storage", _usb_storage, "xhci", storage=True, xhci=True),
    _zoo("pvscsi", _scsi_hba("pvscsi"), storage=True),
    _zoo("mptsas", _scsi_hba("mptsas1068"), storage=True),
    _zoo("lsi", _scsi_hba("lsi53c895a"), storage=True),
    _zoo("usb-kbd", _usb_kbd, "xhci", xhci=True),
    _zoo("virtio-gpu", _virtio_gpu),
    _zoo("e1000e", _e1000e, boots=True),
    # a legacy virtio-net no OVMF driver connects, which the adversary
    # driver arms (docs/devices.md); frames reach it through a unix
    # datagram socket (QemuMachine.nic_socket)
    _zoo("adversary-nic", _adversary_nic, "virtio-net"),
)}
DEVICE_NAMES = tuple(KINDS)
#: Zoo kinds with a disk.
STORAGE_KINDS = tuple(k.name for k in KINDS.values() if k.zoo is not None and k.storage)
ZOO_KINDS = tuple(k.name for k in KINDS.values() if k.zoo is not None)


def trace_models(devices: tuple[Device, ...]) -> list[str]:
    """The device-trace models of ``devices`` (``harness.analysis.device_models.MODELS``)."""
    return [KINDS[_kind(device)].trace_model for device in devices]


def parse_devices(names: str, boot_image: Path | None,
                  disk: Callable[[str], Path] | None = None) -> tuple[Device, ...]:
    """``virtio-blk,virtio-net,...``: the devices, in that order.

    ``virtio-blk`` is the boot disk (``boot_image``, bootindex 0); a storage
    kind gets ``disk(kind)`` as its disk and the next bootindex.
    :raises UsageError: an unknown name, a repeat, virtio-blk without image,
        or a storage kind without ``disk``.
    """
    devices: list[Device] = []
    seen: set[str] = set()
    for name in (part.strip() for part in names.split(",")):
        if not name:
            continue
        if name not in KINDS:
            raise UsageError(f"unknown device {name!r}: one of {', '.join(DEVICE_NAMES)}")
        if name in seen:
            raise UsageError(f"device {name} given twice")
        seen.add(name)
        kind = KINDS[name]
        # after the boot disk's 0, unique whatever the order
        next_boot = len(devices) + ("virtio-blk" not in seen)
        devices.append(kind.make(Slot(boot_image, disk(name) if disk and kind.storage else None,
                                      next_boot)))
    return tuple(devices)


def device_args(devices: tuple[Device, ...], secure: bool, nic_socket: Path | None
                ) -> list[str]:
    """QEMU's arguments for ``devices``, in order; ``secure``: modern-only
    virtio with the IOMMU feature (``disable-legacy=on,iommu_platform=on``)."""
    suffix = ",disable-legacy=on,iommu_platform=on" if secure else ""
    argv: list[str] = []
    xhci = False
    for index, device in enumerate(devices):
        kind = KINDS[_kind(device)]
        if kind.xhci and not xhci:
            argv += ["-device", "qemu-xhci,id=xhci"]
            xhci = True
        if isinstance(device, ZooDevice):
            assert kind.zoo is not None
            argv += kind.zoo(device, index, suffix, nic_socket)
        elif isinstance(device, BlockDevice):
            ro = ",readonly=on" if device.readonly else ""
            boot = "" if device.bootindex is None else f",bootindex={device.bootindex}"
            argv += ["-drive", (f"if=none,id=disk{index},format={device.format},"
                               f"file={comma(device.image)}{ro}"),
                     "-device", f"virtio-blk-pci,drive=disk{index},id=blk{index}{boot}{suffix}"]
        elif isinstance(device, NetDevice):
            restrict = "on" if device.restrict else "off"
            mac = "" if device.mac is None else f",mac={device.mac}"
            mac += "" if device.bootindex is None else f",bootindex={device.bootindex}"
            forwards = "".join(f",hostfwd=tcp:127.0.0.1:{host_port}-:{guest_port}"
                               for host_port, guest_port in device.hostfwd)
            argv += ["-netdev", f"user,id=net{index},restrict={restrict}{forwards}",
                     # romfile= (empty): no iPXE option ROM, the firmware's driver runs
                     "-device", (f"virtio-net-pci,netdev=net{index},id=nic{index},"
                                f"romfile={mac}{suffix}")]
        elif isinstance(device, ScsiController):
            argv += ["-device", f"virtio-scsi-pci,id=scsi{index}{suffix}"]
            if device.image is not None:
                argv += ["-drive", (f"if=none,id=sdisk{index},format={device.format},"
                                   f"file={comma(device.image)}"),
                         "-device", f"scsi-hd,drive=sdisk{index},bus=scsi{index}.0"]
        else:
            argv += ["-object", f"rng-random,id=rng{index},filename={comma(device.source)}",
                     "-device", f"virtio-rng-pci,rng=rng{index},id=vrng{index}{suffix}"]
    return argv
