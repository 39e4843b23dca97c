"""A QEMU process and its QMP: one guest of the harness.

:class:`MachineConfig` says what to run (firmware, accelerator, SEV, memory,
devices, fw_cfg knobs); :func:`build_argv` turns it into QEMU's argv, a pure
function; :class:`QemuMachine` runs it, in the manner of QEMU's
``python/qemu/machine/machine.py``::

    with QemuMachine(config, artifacts_dir) as vm:
        vm.debugcon.expect(r"\\[Bds\\] Expand .*BOOTX64\\.EFI", timeout=20)
        vm.dump(vm.artifacts / "memory.elf")

QEMU starts paused (``-S``). Its QMP monitor and its serial port are unix
sockets in the run's private (0700) working directory; the harness
connects to both (QMP with :class:`~harness.vm.qmp.QmpSession`), checks
SEV with ``query-sev`` where asked, then sends ``cont``. Where QEMU runs is
the machine's :class:`~harness.vm.runner.Runner`: this host
(:class:`~harness.vm.runner.LocalRunner`, the default: QEMU dies with the
harness, however the harness dies) or another over SSH
(:class:`harness.vm.remote.SshRunner`); the machine is the same.

Artifacts per VM, in the directory given: ``cmdline.txt`` (shell-quoted),
``reproduce.sh`` (the same QEMU, by hand, with a QMP socket and the serial
port on the terminal), ``qmp.log`` (transcript), ``serial.log``,
``debugcon.log``, ``qemu-stderr.log`` and ``OVMF_VARS.fd`` (this VM's copy)."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shlex
import shutil
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TextIO

from harness.errors import DependencyError, LaunchError, QmpError, UsageError
from harness.vm import limits
from harness.vm.console import Console, debug_console, serial_console, tail_lines
from harness.vm.qmp import QmpSession
from harness.vm.runner import LocalProcess, LocalRunner, Process, Runner, describe_exit

LOG = logging.getLogger(__name__)

ACCELS = ("tcg", "kvm")
#: ``emulated``: the harness's QEMU (``ebs-harness build-qemu``) gives a TCG
#: guest the platform side of plain SEV (``sev-emulated``), with memory
#: in plaintext.
SEV_MODES = ("off", "sev", "sev-es", "snp", "emulated")

# SEV guest policy bits (AMD SEV API specification, "Guest Policy").
POLICY_NODBG = 0x01     #: debugging of the guest is disallowed
POLICY_NOKS = 0x02      #: sharing keys with other guests is disallowed
POLICY_ES = 0x04        #: SEV-ES is required
POLICY_NOSEND = 0x08    #: sending the guest to another platform is disallowed
POLICY_DOMAIN = 0x10    #: the guest must not leave the domain
POLICY_SEV = 0x20       #: the guest must not be sent to a non-SEV platform

#: SEV-SNP guest policy (SNP firmware ABI, "Guest Policy"): bit 16 SMT
#: allowed, bit 17 reserved and must be 1 (QEMU's default too).
SNP_POLICY_DEFAULT = 0x30000

#: The CPU of an emulated-SEV guest: TCG's default model, plus RDRAND, which
#: every SEV-capable processor has and Linux's early SEV code uses (its
#: C-bit check, sev_verify_cbit, draws a random value with it).
EMULATED_SEV_CPU = "qemu64,+rdrand"

DEBUGCON_IOBASE = 0x402
FW_CFG_PREFIX = "opt/"
_FW_CFG_NAME_MAX = 55   # FW_CFG_MAX_FILE_PATH (56) with its NUL


def _comma(value: str | os.PathLike[str]) -> str:
    """Escape a value for QEMU's option syntax (a comma is doubled)."""
    return str(value).replace(",", ",,")


# ------------------------------------------------------------ devices


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

    :param kind: one of :data:`ZOO_KINDS`.
    :param image: the disk of a storage kind (nvme, ahci, xhci-storage,
        pvscsi, mptsas, lsi).
    :param bootindex: puts it in QEMU's boot order, which OVMF reads as the
        list of devices to connect.
    """

    kind: str
    image: Path | None = None
    bootindex: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ZOO_KINDS:
            raise ValueError(f"zoo device {self.kind!r}: one of {', '.join(ZOO_KINDS)}")
        if (self.kind in STORAGE_KINDS) != (self.image is not None):
            raise ValueError(f"{self.kind}: a storage kind needs an image, others none")
        if self.image is not None:
            object.__setattr__(self, "image", Path(self.image))


#: Zoo kinds with a disk.
STORAGE_KINDS = ("nvme", "ahci", "xhci-storage", "pvscsi", "mptsas", "lsi")
#: ``adversary-nic``: a legacy virtio-net no OVMF driver connects, which the
#: adversary driver arms (``docs/devices.md``); frames reach it through a
#: unix datagram socket (:attr:`QemuMachine.nic_socket`).
ZOO_KINDS = (*STORAGE_KINDS, "usb-kbd", "virtio-gpu", "e1000e", "adversary-nic")

Device = BlockDevice | NetDevice | ScsiController | RngDevice | ZooDevice

DEVICE_NAMES = ("virtio-blk", "virtio-net", "virtio-scsi", "virtio-rng", *ZOO_KINDS)


def parse_devices(names: str, boot_image: Path | None,
                  disk: Callable[[str], Path] | None = None) -> tuple[Device, ...]:
    """``--devices virtio-blk,virtio-net,...``: the devices, in that order.

    ``virtio-blk`` is the boot disk (``boot_image``, bootindex 0); a storage
    kind of the zoo gets ``disk(kind)`` as its disk and the next bootindex.
    :raises UsageError: an unknown name, a repeat, virtio-blk without image,
        or a storage kind without ``disk``.
    """
    devices: list[Device] = []
    seen: set[str] = set()
    for name in (part.strip() for part in names.split(",")):
        if not name:
            continue
        if name not in DEVICE_NAMES:
            raise UsageError(f"unknown device {name!r}: one of {', '.join(DEVICE_NAMES)}")
        if name in seen:
            raise UsageError(f"device {name} given twice")
        seen.add(name)
        # after the boot disk's 0, unique whatever the order
        next_boot = len(devices) + ("virtio-blk" not in seen)
        if name == "virtio-blk":
            if boot_image is None:
                raise UsageError("virtio-blk needs a boot image")
            devices.append(BlockDevice(boot_image, bootindex=0))
        elif name == "virtio-net":
            devices.append(NetDevice())
        elif name == "virtio-scsi":
            devices.append(ScsiController())
        elif name == "virtio-rng":
            devices.append(RngDevice())
        elif name in STORAGE_KINDS:
            if disk is None:
                raise UsageError(f"{name} needs a disk image")
            devices.append(ZooDevice(name, disk(name), bootindex=next_boot))
        else:
            devices.append(ZooDevice(name, bootindex=next_boot if name == "e1000e" else None))
    return tuple(devices)


# ------------------------------------------------------------- config


@dataclass(frozen=True)
class SevConfig:
    """The SEV object: mode, C-bit, reduced physical bits, policy.

    ``sev`` and ``sev-es`` are QEMU's ``sev-guest`` under KVM, whose
    ``cbitpos`` and ``reduced_phys_bits`` must match the host (QMP
    ``query-sev-capabilities``); ``snp`` is ``sev-snp-guest`` (QEMU >= 9.1),
    whose memory is a memfd backend and whose firmware is one ``-bios``
    image (KVM's SNP VM type has no read-only memory slots for pflash);
    ``emulated`` is ``sev-emulated`` under TCG (plain SEV only).
    ``policy`` defaults to NODBG|NOKS, plus ES for SEV-ES, and to
    :data:`SNP_POLICY_DEFAULT` for SNP; an explicit SEV policy must agree with
    the mode about ES.
    """

    mode: str
    cbitpos: int
    reduced_phys_bits: int
    policy: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in SEV_MODES or self.mode == "off":
            raise ValueError(f"SEV mode {self.mode!r}: one of {', '.join(SEV_MODES[1:])}")
        if not 32 <= self.cbitpos <= 63:
            raise ValueError(f"cbitpos {self.cbitpos}: not in 32..63")
        if not 1 <= self.reduced_phys_bits <= 63:
            # QEMU's sev-guest refuses 0 ("it should be >=1"), as does ours.
            raise ValueError(f"reduced-phys-bits {self.reduced_phys_bits}: not in 1..63")
        if self.policy is not None and self.mode == "snp":
            if not 0 <= self.policy < 1 << 64 or not self.policy & (1 << 17):
                raise ValueError(f"SNP policy {self.policy:#x}: a u64 with bit 17 set")
        elif self.policy is not None:
            if not 0 <= self.policy <= 0xFFFFFFFF:
                raise ValueError(f"policy {self.policy:#x}: not a u32")
            if bool(self.policy & POLICY_ES) != (self.mode == "sev-es"):
                raise ValueError(
                    f"policy {self.policy:#x}: the ES bit (0x4) must be "
                    f"{'set' if self.mode == 'sev-es' else 'clear'} for {self.mode}")

    @property
    def emulated(self) -> bool:
        return self.mode == "emulated"

    @property
    def accel(self) -> str:
        """The accelerator this mode runs under."""
        return "tcg" if self.emulated else "kvm"

    @property
    def qom_type(self) -> str:
        return {"emulated": "sev-emulated", "snp": "sev-snp-guest"}.get(self.mode, "sev-guest")

    @property
    def snp(self) -> bool:
        return self.mode == "snp"

    @property
    def pins_memory(self) -> bool:
        """KVM pins this guest's RAM (SEV, SEV-ES): the locked-memory limit
        must cover it."""
        return self.mode in ("sev", "sev-es")

    @property
    def effective_policy(self) -> int:
        if self.policy is not None:
            return self.policy
        if self.snp:
            return SNP_POLICY_DEFAULT
        base = POLICY_NODBG | POLICY_NOKS
        return base | POLICY_ES if self.mode == "sev-es" else base

    @property
    def cbit_mask(self) -> int:
        return 1 << self.cbitpos


@dataclass(frozen=True)
class MachineConfig:
    """Everything that decides QEMU's command line.

    :param code: the firmware's OVMF_CODE.fd (mapped read-only); for SEV-SNP
        the whole image (OVMF.fd), loaded with ``-bios``.
    :param vars_template: OVMF_VARS.fd; each VM runs on its own copy.
    :param accel: ``tcg`` or ``kvm``.
    :param sev: the SEV guest, or None for a plain guest (``sev_mode`` "off").
    :param memory_mib: guest RAM.
    :param devices: the guest's devices, in PCI order.
    :param fw_cfg: fw_cfg file name (``opt/...``) to string value.
    :param debugcon: capture the debug port (0x402) to ``debugcon.log``.
    :param iommu_platform: ``disable-legacy=on,iommu_platform=on`` on virtio
        devices; None means "when SEV is on".
    :param qemu: the QEMU binary (name on PATH or path).
    :param cpu: ``-cpu`` model; None: ``host`` with SEV, :data:`EMULATED_SEV_CPU`
        with emulated SEV, else QEMU's default.
    :param no_reboot: a guest reset ends QEMU instead of rebooting.
    :param serial_input: the serial port takes input (a socket chardev the
        harness writes to). Without it the port is a plain file chardev: QEMU
        7.2's socket chardev can write a byte twice to its logfile when the
        socket is momentarily full, which corrupts a trace read from serial.
    :param extra_args: appended to the command line as they are.
    :param kernel: ``-kernel``: a Linux image the firmware loads from fw_cfg
        (OVMF's QemuKernelLoaderFsDxe) and starts through its EFI stub.
    :param initrd: ``-initrd`` (needs ``kernel``).
    :param append: ``-append``, the kernel command line (needs ``kernel``).
    :param trace_events: QEMU trace events to enable; their lines go to the
        device trace (``device-trace.log``, ``harness.analysis.devices``).
    """

    code: Path
    vars_template: Path
    accel: str = "tcg"
    sev: SevConfig | None = None
    memory_mib: int = 256
    smp: int = 1
    devices: tuple[Device, ...] = ()
    fw_cfg: Mapping[str, str] = field(default_factory=dict)
    debugcon: bool = True
    iommu_platform: bool | None = None
    qemu: str = "qemu-system-x86_64"
    cpu: str | None = None
    no_reboot: bool = False
    serial_input: bool = True
    extra_args: tuple[str, ...] = ()
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    trace_events: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "code", Path(self.code))
        object.__setattr__(self, "trace_events", tuple(self.trace_events))
        for event in self.trace_events:
            if not re.fullmatch(r"[a-z0-9_]+", event):
                raise ValueError(f"trace event {event!r}")
        for name in ("kernel", "initrd"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.kernel is None and (self.initrd is not None or self.append is not None):
            raise ValueError("initrd and append need a kernel")
        object.__setattr__(self, "vars_template", Path(self.vars_template))
        object.__setattr__(self, "devices", tuple(self.devices))
        object.__setattr__(self, "extra_args", tuple(self.extra_args))
        object.__setattr__(self, "fw_cfg", dict(self.fw_cfg))
        if self.accel not in ACCELS:
            raise ValueError(f"accel {self.accel!r}: one of {', '.join(ACCELS)}")
        if self.sev is not None and self.accel != self.sev.accel:
            raise ValueError(f"SEV mode {self.sev.mode} needs accel {self.sev.accel}")
        if not 32 <= self.memory_mib <= 1024 * 1024:
            raise ValueError(f"memory {self.memory_mib} MiB: not in 32..1048576")
        if not 1 <= self.smp <= 288:
            raise ValueError(f"smp {self.smp}: not in 1..288")
        for device in self.devices:
            if not isinstance(device, (BlockDevice, NetDevice, ScsiController, RngDevice,
                                       ZooDevice)):
                raise TypeError(f"not a device: {device!r}")
        boot = [d.bootindex for d in self.devices
                if isinstance(d, (BlockDevice, NetDevice, ZooDevice)) and d.bootindex is not None]
        if len(boot) != len(set(boot)):
            raise ValueError(f"duplicate bootindex in {boot}")
        for name, value in self.fw_cfg.items():
            if not name.startswith(FW_CFG_PREFIX) or len(name) > _FW_CFG_NAME_MAX:
                raise ValueError(f"fw_cfg name {name!r}: must start with "
                                 f"{FW_CFG_PREFIX!r}, at most {_FW_CFG_NAME_MAX} chars")
            if not isinstance(value, str):
                raise TypeError(f"fw_cfg {name}: value must be a string")
        if not self.qemu:
            raise ValueError("no QEMU binary")

    @property
    def sev_mode(self) -> str:
        return "off" if self.sev is None else self.sev.mode

    @property
    def virtio_secure(self) -> bool:
        return self.sev is not None if self.iommu_platform is None else self.iommu_platform

    def resolved(self) -> MachineConfig:
        """The same config with absolute file paths (for reproduce.sh)."""
        devices: list[Device] = []
        for device in self.devices:
            if isinstance(device, (BlockDevice, ScsiController, ZooDevice)) and device.image:
                device = dataclasses.replace(device, image=device.image.absolute())
            devices.append(device)
        return dataclasses.replace(
            self, code=self.code.absolute(), vars_template=self.vars_template.absolute(),
            devices=tuple(devices),
            kernel=None if self.kernel is None else self.kernel.absolute(),
            initrd=None if self.initrd is None else self.initrd.absolute())


@dataclass(frozen=True)
class RuntimePaths:
    """Where one QEMU run puts its sockets and logs.

    :param serial_socket: the serial chardev socket (QEMU listens), or None
        for the serial port on stdio (reproduce.sh).
    """

    qmp_socket: Path
    serial_socket: Path | None
    serial_log: Path
    debugcon_log: Path
    vars_copy: Path
    trace_log: Path | None = None
    nic_socket: Path | None = None


def build_argv(config: MachineConfig, paths: RuntimePaths, *,
               paused: bool = True) -> list[str]:
    """QEMU's argv for ``config`` with ``paths``. Pure: touches no file."""
    machine = "q35"
    if config.sev is not None:
        machine += ",confidential-guest-support=sev0"
    if config.sev is not None and config.sev.snp:
        machine += ",memory-backend=ram0"
    argv = [config.qemu, "-name", "ebs-harness,debug-threads=on",
            "-machine", machine, "-accel", config.accel]
    cpu = config.cpu
    if cpu is None and config.sev is not None:
        cpu = EMULATED_SEV_CPU if config.sev.emulated else "host"
    if cpu:
        argv += ["-cpu", cpu]
    argv += ["-m", str(config.memory_mib), "-smp", str(config.smp),
             "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none"]
    if config.no_reboot:
        argv.append("-no-reboot")
    if config.sev is not None:
        sev = config.sev
        if sev.snp:
            # SNP's private memory comes from guest_memfd beside this shared memfd.
            argv += ["-object", (f"memory-backend-memfd,id=ram0,size={config.memory_mib}M,"
                                 "share=true")]
        argv += ["-object",
                 (f"{sev.qom_type},id=sev0,cbitpos={sev.cbitpos},"
                 f"reduced-phys-bits={sev.reduced_phys_bits},"
                 f"policy={sev.effective_policy:#x}")]
    if config.sev is not None and config.sev.snp:
        argv += ["-bios", str(config.code)]
    else:
        argv += ["-drive",
                 f"if=pflash,format=raw,unit=0,readonly=on,file={_comma(config.code)}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={_comma(paths.vars_copy)}"]
    argv += ["-chardev", f"socket,id=qmp0,path={_comma(paths.qmp_socket)},server=on,wait=off",
             "-mon", "chardev=qmp0,mode=control"]
    log = f"logfile={_comma(paths.serial_log)},logappend=off"
    if paths.serial_socket is not None and not config.serial_input:
        argv += ["-chardev", f"file,id=serial0,path={_comma(paths.serial_log)}"]
    elif paths.serial_socket is not None:
        argv += ["-chardev", (f"socket,id=serial0,path={_comma(paths.serial_socket)},"
                             f"server=on,wait=off,{log}")]
    else:
        argv += ["-chardev", f"stdio,id=serial0,{log}"]
    argv += ["-serial", "chardev:serial0"]
    if config.debugcon:
        argv += ["-debugcon", f"file:{_comma(paths.debugcon_log)}",
                 "-global", f"isa-debugcon.iobase={DEBUGCON_IOBASE:#x}"]
    for name, value in sorted(config.fw_cfg.items()):
        argv += ["-fw_cfg", f"name={_comma(name)},string={_comma(value)}"]
    argv += _device_args(config, paths)
    if config.trace_events and paths.trace_log is not None:
        for event in config.trace_events:
            argv += ["-trace", f"enable={event}"]
        argv += ["-trace", f"file={_comma(paths.trace_log)}"]
    if config.kernel is not None:
        argv += ["-kernel", str(config.kernel)]
        if config.initrd is not None:
            argv += ["-initrd", str(config.initrd)]
        if config.append is not None:
            argv += ["-append", config.append]
    argv += list(config.extra_args)
    if paused:
        argv.append("-S")
    return argv


def _device_args(config: MachineConfig, paths: RuntimePaths) -> list[str]:
    secure = ",disable-legacy=on,iommu_platform=on" if config.virtio_secure else ""
    argv: list[str] = []
    xhci = False
    for index, device in enumerate(config.devices):
        if isinstance(device, ZooDevice):
            if device.kind in ("xhci-storage", "usb-kbd") and not xhci:
                argv += ["-device", "qemu-xhci,id=xhci"]
                xhci = True
            argv += _zoo_args(device, index, secure, paths)
            continue
        if isinstance(device, BlockDevice):
            ro = ",readonly=on" if device.readonly else ""
            boot = "" if device.bootindex is None else f",bootindex={device.bootindex}"
            argv += ["-drive", (f"if=none,id=disk{index},format={device.format},"
                               f"file={_comma(device.image)}{ro}"),
                     "-device", f"virtio-blk-pci,drive=disk{index},id=blk{index}{boot}{secure}"]
        elif isinstance(device, NetDevice):
            restrict = "on" if device.restrict else "off"
            mac = "" if device.mac is None else f",mac={device.mac}"
            mac += "" if device.bootindex is None else f",bootindex={device.bootindex}"
            forwards = "".join(f",hostfwd=tcp:127.0.0.1:{host_port}-:{guest_port}"
                               for host_port, guest_port in device.hostfwd)
            argv += ["-netdev", f"user,id=net{index},restrict={restrict}{forwards}",
                     # romfile= (empty): no iPXE option ROM, the firmware's driver runs
                     "-device", (f"virtio-net-pci,netdev=net{index},id=nic{index},"
                                f"romfile={mac}{secure}")]
        elif isinstance(device, ScsiController):
            argv += ["-device", f"virtio-scsi-pci,id=scsi{index}{secure}"]
            if device.image is not None:
                argv += ["-drive", (f"if=none,id=sdisk{index},format={device.format},"
                                   f"file={_comma(device.image)}"),
                         "-device", f"scsi-hd,drive=sdisk{index},bus=scsi{index}.0"]
        else:
            argv += ["-object", f"rng-random,id=rng{index},filename={_comma(device.source)}",
                     "-device", f"virtio-rng-pci,rng=rng{index},id=vrng{index}{secure}"]
    return argv


def _zoo_args(device: ZooDevice, index: int, secure: str, paths: RuntimePaths) -> list[str]:
    boot = "" if device.bootindex is None else f",bootindex={device.bootindex}"
    argv: list[str] = []
    if device.image is not None:
        argv += ["-drive", f"if=none,id=zdisk{index},format=raw,file={_comma(device.image)}"]
    drive = f"drive=zdisk{index}{boot}"
    kind = device.kind
    if kind == "nvme":
        argv += ["-device", f"nvme,id=znvme{index},serial=EBS{index:04d},{drive}"]
    elif kind == "ahci":
        # q35's own ICH9 AHCI controller (00:1f.2), first port
        argv += ["-device", f"ide-hd,bus=ide.0,{drive}"]
    elif kind == "xhci-storage":
        argv += ["-device", f"usb-storage,bus=xhci.0,{drive}"]
    elif kind in ("pvscsi", "mptsas", "lsi"):
        qom = {"pvscsi": "pvscsi", "mptsas": "mptsas1068", "lsi": "lsi53c895a"}[kind]
        argv += ["-device", f"{qom},id=zhba{index}",
                 "-device", f"scsi-hd,bus=zhba{index}.0,{drive}"]
    elif kind == "usb-kbd":
        argv += ["-device", "usb-kbd,bus=xhci.0"]
    elif kind == "virtio-gpu":
        argv += ["-device", f"virtio-gpu-pci,id=zgpu{index}{secure}"]
    elif kind == "e1000e":
        argv += ["-netdev", f"user,id=znet{index},restrict=on",
                 "-device", (f"e1000e,netdev=znet{index},id=znic{index},"
                            f"romfile={_comma(E1000E_ROM)}{boot}")]
    else:   # adversary-nic: legacy only (device ID 0x1000), which no OVMF driver connects
        if paths.nic_socket is None:
            raise ValueError("adversary-nic needs a socket path")
        # QEMU 7.2's dgram netdev needs a remote too: the NIC's transmissions
        # go there, and nobody reads them.
        sink = paths.nic_socket.with_name(paths.nic_socket.name + ".out")
        argv += ["-netdev", (f"dgram,id=znet{index},local.type=unix,"
                            f"local.path={_comma(paths.nic_socket)},remote.type=unix,"
                            f"remote.path={_comma(sink)}"),
                 "-device", (f"virtio-net-pci,netdev=znet{index},id=advnic,"
                            # a confidential machine turns iommu_platform on for
                            # every virtio device, which a legacy one cannot have
                            "disable-legacy=off,disable-modern=on,iommu_platform=off,"
                            "romfile=")]
    return argv


def reproduce_script(config: MachineConfig, original_vars: Path) -> str:
    """A shell script that runs ``config``'s QEMU by hand, from its directory."""
    paths = RuntimePaths(qmp_socket=Path("repro/qmp.sock"), serial_socket=None,
                         serial_log=Path("repro/serial.log"),
                         debugcon_log=Path("repro/debugcon.log"),
                         vars_copy=Path("repro/OVMF_VARS.fd"),
                         trace_log=Path("repro/device-trace.raw"),
                         nic_socket=Path("repro/adversary-nic.sock"))
    argv = build_argv(config, paths, paused=False)
    lines = [
        "#!/bin/sh",
        "# Re-run this VM's QEMU by hand (running, not paused; Ctrl-C ends it).",
        "# Serial port on this terminal; debug log in repro/debugcon.log;",
        "# QMP on repro/qmp.sock, e.g.:  qmp-shell repro/qmp.sock",
        "set -eu",
        'cd "$(dirname "$0")"',
        "mkdir -p repro",
        f"cp {shlex.quote(str(original_vars))} repro/OVMF_VARS.fd",
        "exec " + " \\\n    ".join(_option_lines(argv)),
        "",
    ]
    return "\n".join(lines)


def _option_lines(argv: Sequence[str]) -> list[str]:
    """Shell-quoted argv, one option with its value per line."""
    out: list[str] = [shlex.quote(argv[0])]
    for arg in argv[1:]:
        quoted = shlex.quote(arg)
        if not arg.startswith("-") and out[-1].startswith("-") and " " not in out[-1]:
            out[-1] += " " + quoted
        else:
            out.append(quoted)
    return out


# ------------------------------------------------------------ machine


class QemuMachine:
    """A QEMU guest: launch, QMP, consoles, memory dump, shutdown, on this
    host or, with :class:`harness.vm.remote.SshRunner`, on another.

    A context manager; :meth:`launch` cleans up on any failure and raises
    :class:`LaunchError`; :meth:`shutdown` is idempotent.

    :param config: what to run.
    :param artifacts: this VM's artifact directory (created).
    :param name: the VM's name in logs (child logger ``harness.vm.machine.NAME``).
    :param runner: where QEMU runs (default: :class:`~harness.vm.runner.LocalRunner`).
    :param launch_timeout: deadline for QEMU to come up on QMP.
    :param qmp_timeout: default deadline of a QMP command.
    """

    def __init__(self, config: MachineConfig, artifacts: Path, *, name: str = "vm",
                 runner: Runner | None = None, launch_timeout: float = 30.0,
                 qmp_timeout: float = 30.0) -> None:
        self.config = config.resolved()
        self.artifacts = Path(artifacts).absolute()
        self.name = name
        self.runner: Runner = runner if runner is not None else LocalRunner()
        self.log = LOG.getChild(name)
        self.launch_timeout = launch_timeout
        self.qmp_timeout = qmp_timeout
        self.command: list[str] = []
        self.exitcode: int | None = None
        self.process: Process | None = None
        self._qmp: QmpSession | None = None
        self._transcript: TextIO | None = None
        self._serial: Console | None = None
        self._debugcon: Console | None = None
        self._serial_sock: socket.socket | None = None
        self._launched = False
        self._closed = False
        #: the adversary NIC's unix datagram socket (QEMU binds it), or None
        self.nic_socket: Path | None = None
        self._nic_sock: socket.socket | None = None

    # artifact paths
    @property
    def serial_log(self) -> Path:
        return self.artifacts / "serial.log"

    @property
    def debugcon_log(self) -> Path:
        return self.artifacts / "debugcon.log"

    @property
    def stderr_log(self) -> Path:
        return self.artifacts / "qemu-stderr.log"

    @property
    def qmp_log(self) -> Path:
        return self.artifacts / "qmp.log"

    @property
    def device_trace_raw(self) -> Path:
        """QEMU's trace lines, as QEMU wrote them (``config.trace_events``)."""
        return self.artifacts / "device-trace.raw"

    @property
    def pid(self) -> int | None:
        """QEMU's PID on this host (None before launch, or when it runs elsewhere)."""
        return self.process.pid if isinstance(self.process, LocalProcess) else None

    @property
    def serial(self) -> Console:
        if self._serial is None:
            raise QmpError(f"{self.name}: not launched")
        return self._serial

    @property
    def debugcon(self) -> Console:
        if self._debugcon is None:
            raise QmpError(f"{self.name}: not launched or debugcon off")
        return self._debugcon

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every QMP event seen so far."""
        return [] if self._qmp is None else list(self._qmp.history)

    def __enter__(self) -> Self:
        self.launch()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ended(self) -> str:
        """Why the consoles ended (QEMU's exit, or what broke), for errors."""
        return describe_exit(None) if self.process is None else self.process.ended()

    def _readable(self) -> bool:
        return self.process is not None and self.process.readable()

    def _stderr_text(self) -> str:
        """QEMU's output so far, for errors."""
        return "" if self.process is None else self.process.stderr_text()

    def _logs(self) -> dict[str, Path]:
        logs = {"serial.log": self.serial_log}
        if self.config.debugcon:
            logs["debugcon.log"] = self.debugcon_log
        logs["qemu-stderr.log"] = self.stderr_log
        return logs

    def tails(self) -> dict[str, str]:
        """The last lines of the serial and debug logs and of QEMU's stderr."""
        return {name: tail_lines(path) for name, path in self._logs().items()}

    # --------------------------------------------------------- launch

    def launch(self, *, start: bool = True) -> None:
        """Start QEMU paused, connect QMP and the serial port, then ``cont``.

        :param start: send ``cont``; False leaves the guest paused.
        :raises LaunchError: QEMU did not start, died, or SEV is not on.
        """
        if self._launched or self._closed:
            raise LaunchError(f"{self.name}: a QemuMachine launches once")
        self._launched = True
        try:
            self._launch(start)
        except BaseException as exc:
            stderr = self._stderr_text()
            self.shutdown()
            if isinstance(exc, LaunchError):
                exc.log = exc.log or stderr
                raise
            if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit
                raise
            where = f" on {self.runner.where}" if self.runner.where else ""
            raise LaunchError(f"launch{where} failed: {type(exc).__name__}: {exc}",
                              self.exitcode, self.command, stderr) from exc

    def _placed(self, vars_copy: Path) -> MachineConfig:
        """The config with every input file where QEMU reads it."""
        runner = self.runner
        config = self.config
        devices: list[Device] = []
        for index, device in enumerate(config.devices):
            if isinstance(device, (BlockDevice, ScsiController, ZooDevice)) and device.image:
                device = dataclasses.replace(device, image=runner.place(
                    device.image, f"disk{index}-{device.image.name}"))
            devices.append(device)
        return dataclasses.replace(
            config, code=runner.place(config.code, "OVMF_CODE.fd"),
            vars_template=runner.place(vars_copy, "OVMF_VARS.fd"), devices=tuple(devices),
            kernel=None if config.kernel is None else runner.place(config.kernel, "kernel"),
            initrd=None if config.initrd is None else runner.place(config.initrd, "initrd"))

    def _launch(self, start: bool) -> None:
        runner = self.runner
        self.artifacts.mkdir(parents=True, exist_ok=True)
        work = runner.open()
        vars_copy = self.artifacts / "OVMF_VARS.fd"
        try:
            shutil.copyfile(self.config.vars_template, vars_copy)
        except OSError as exc:
            raise LaunchError(f"cannot copy the firmware VARS {self.config.vars_template}: "
                              f"{exc.strerror}") from exc
        config = self._placed(vars_copy)
        zoo = {d.kind for d in config.devices if isinstance(d, ZooDevice)}
        if "adversary-nic" in zoo and runner.where:
            raise LaunchError(f"adversary-nic needs QEMU on this host, not on {runner.where}")
        if "e1000e" in zoo and not runner.where and not E1000E_ROM.is_file():
            raise DependencyError(f"e1000e needs iPXE's EFI ROM {E1000E_ROM}: install "
                                  "Debian's ipxe-qemu (scripts/setup-host)")
        self.nic_socket = work / "adv-nic.sock" if "adversary-nic" in zoo else None
        paths = RuntimePaths(qmp_socket=work / "qmp.sock", serial_socket=work / "serial.sock",
                             serial_log=runner.output(self.serial_log),
                             debugcon_log=runner.output(self.debugcon_log),
                             vars_copy=config.vars_template,
                             trace_log=(runner.output(self.device_trace_raw)
                                        if config.trace_events else None),
                             nic_socket=self.nic_socket)
        stderr = runner.output(self.stderr_log)
        self.command = build_argv(config, paths)
        where = f" on {runner.where}" if runner.where else ""
        (self.artifacts / "cmdline.txt").write_text(
            (f"# on {runner.where}\n" if runner.where else "") + shlex.join(self.command) + "\n")
        script = self.artifacts / "reproduce.sh"
        script.write_text(reproduce_script(self.config, self.config.vars_template))
        script.chmod(0o755)
        for stale in self._logs().values():
            stale.unlink(missing_ok=True)

        self._transcript = open(self.qmp_log, "w", encoding="utf-8")  # noqa: SIM115
        self.log.info("launching%s: %s", where, shlex.join(self.command))
        memlock = (limits.sev_memlock_bytes(self.config.memory_mib)
                   if self.config.sev is not None and self.config.sev.pins_memory else None)
        self.process = runner.start(self.command, stderr=stderr, memlock=memlock)
        deadline = time.monotonic() + self.launch_timeout
        self._qmp = self._connect_qmp(paths.qmp_socket, deadline)
        if self.config.serial_input:
            assert paths.serial_socket is not None
            self._serial_sock = runner.connect(paths.serial_socket)
        if self.nic_socket is not None:
            # connected now: the working directory and its names go next
            self._nic_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._nic_sock.connect(str(self.nic_socket))
        runner.sockets_done()

        logs = self._logs()
        # The console owns the connected socket from here on (and closes it).
        sock, self._serial_sock = self._serial_sock, None
        self._serial = serial_console(sock, self.serial_log, self._readable, self.log,
                                      logs, self.command, ended=self.ended)
        if self.config.debugcon:
            self._debugcon = debug_console(self.debugcon_log, self._readable, self.log,
                                           logs, self.command, ended=self.ended)
        if self.config.sev is not None:
            self._check_sev(self.config.sev, SEV_STATE_PAUSED)
        if start:
            self.qmp("cont")
            if self.config.sev is not None:
                self._check_sev(self.config.sev, SEV_STATE_RUNNING)

    def _connect_qmp(self, path: Path, deadline: float) -> QmpSession:
        assert self.process is not None and self._transcript is not None
        last: Exception | None = None
        while True:
            exitcode = self.process.poll()
            if exitcode is not None:
                self.exitcode = exitcode
                raise self._early_exit(self.process.ended(), self._stderr_text())
            if self.runner.has_socket(path):
                qmp = QmpSession(f"{self.name}-qmp", self._transcript, self.log)
                try:
                    qmp.connect(self.runner.connect(path), max(0.1, deadline - time.monotonic()))
                    return qmp
                except Exception as exc:  # noqa: BLE001 - retried until the deadline
                    last = exc
                    qmp.close()
            if time.monotonic() > deadline:
                raise LaunchError(f"QEMU's QMP socket did not answer in "
                                  f"{self.launch_timeout:g} s ({last})", None,
                                  self.command, self._stderr_text())
            time.sleep(0.02)

    def _early_exit(self, ended: str, stderr: str) -> LaunchError:
        """The error of a QEMU that ended before its QMP answered: how it
        ended and, when its stderr says why (a SEV refusal), why."""
        why = sev_launch_reason(stderr) if self.config.sev is not None else None
        return LaunchError(ended + (f": {why}" if why else ""), self.exitcode, self.command,
                           stderr)

    def _check_sev(self, sev: SevConfig, state: str) -> None:
        """``query-sev`` must say SEV is on as ``sev`` asks, in launch ``state``."""
        info = self.qmp("query-sev")
        problem = sev_info_problem(info, sev.effective_policy, emulated=sev.emulated,
                                   state=None if sev.snp else state, snp=sev.snp)
        if problem:
            raise LaunchError(f"SEV is not active as asked: {problem}", None, self.command,
                              self._stderr_text())
        self.log.info("SEV active: %s %#x, state %s%s", "snp-policy" if sev.snp else "policy",
                      info["snp-policy" if sev.snp else "policy"], info.get("state"),
                      " (emulated)" if sev.emulated else "")

    # ------------------------------------------------------------ QMP

    def qmp(self, command: str, arguments: Mapping[str, object] | None = None, *,
            timeout: float | None = None) -> Any:
        """Run a QMP command; its ``return`` value, or :class:`QmpError`."""
        if self._qmp is None:
            raise QmpError(f"QMP {command}: {self.name} is not connected")
        return self._qmp.execute(command, arguments,
                                 self.qmp_timeout if timeout is None else timeout)

    def send_frames(self, frames: Sequence[bytes]) -> int:
        """Send Ethernet frames to the adversary NIC (``adversary-nic``); how
        many QEMU took. A frame QEMU's socket refuses is not retried."""
        if self._nic_sock is None:
            raise UsageError(f"{self.name}: no adversary-nic to send frames to")
        sent = 0
        for frame in frames:
            try:
                self._nic_sock.send(frame)
                sent += 1
            except OSError as exc:
                self.log.warning("frame to the adversary NIC not sent: %s", exc)
        return sent

    def wait_event(self, names: str | Sequence[str], timeout: float = 30.0) -> dict[str, Any]:
        """Wait for (and consume) the next QMP event of one of ``names``."""
        if self._qmp is None:
            raise QmpError(f"{self.name} is not connected")
        wanted = [names] if isinstance(names, str) else list(names)
        return self._qmp.wait_event(wanted, timeout)

    def status(self) -> str:
        """The run state from ``query-status`` ("running", "paused", ...)."""
        return str(self.qmp("query-status")["status"])

    # ----------------------------------------------------------- dump

    def dump(self, path: Path | None = None, timeout: float = 300.0) -> Path:
        """Stop the guest and write its memory as an ELF core (``paging=false``).

        The guest stays stopped. :returns: the dump's path.
        :raises QmpError: the dump failed or missed the deadline.
        """
        target = (path or self.artifacts / "memory.elf").absolute()
        target.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        landed = self.runner.landing(target)
        self.qmp("stop")
        # QEMU 7.2: synchronous unless "detach" is given.
        self.qmp("dump-guest-memory", {"paging": False, "protocol": f"file:{landed}"},
                 timeout=timeout)
        self.runner.fetch(landed, target)
        self.log.info("memory dump %s (%d bytes) in %.2f s", target,
                      target.stat().st_size, time.monotonic() - started)
        return target

    # ------------------------------------------------------- shutdown

    def wait(self, timeout: float) -> int:
        """Wait for QEMU to exit by itself; its exit status."""
        if self.process is None:
            raise QmpError(f"{self.name}: not launched")
        try:
            self.exitcode = self.process.wait(timeout)
        except TimeoutError as exc:
            raise QmpError(f"{self.name}: QEMU still runs after {timeout:g} s") from exc
        return self.exitcode

    def shutdown(self, timeout: float = 10.0) -> None:
        """QMP ``quit``, wait, then kill; close everything; the runner removes
        what the run left. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._qmp is not None and self.is_running():
                try:
                    self._qmp.execute("quit", None, 3.0)
                except QmpError as exc:
                    self.log.debug("quit: %s", exc)
            if self.process is not None:
                try:
                    self.exitcode = self.process.wait(timeout)
                except TimeoutError:
                    self.log.warning("QEMU did not quit in %g s: killing it", timeout)
                    self.process.kill()
                    self.exitcode = self.process.poll()
        finally:
            if self.process is not None:
                self.process.kill()
                if self.exitcode is None:
                    self.exitcode = self.process.poll()
            if self._qmp is not None:
                self._qmp.close()
            for console in (self._serial, self._debugcon):
                if console is not None:
                    console.close()
            if self._transcript is not None:
                self._transcript.close()
            if self._serial_sock is not None:
                self._serial_sock.close()
            if self._nic_sock is not None:
                self._nic_sock.close()
            self.runner.close()
            if self.exitcode is not None:
                self.log.info("QEMU exited with status %s", self.exitcode)


#: What QEMU 7.2's ``target/i386/sev.c`` prints when a SEV launch fails, and
#: what to do about it: ``(pattern, reason)``.
SEV_LAUNCH_FAILURES: tuple[tuple[str, str], ...] = (
    (r"failed to register region .*Cannot allocate memory",
     "KVM could not pin the guest's memory: RLIMIT_MEMLOCK is too low for this user; "
     + limits.HOW_TO_GRANT),
    (r"Failed to open /dev/sev 'Permission denied'",
     ("/dev/sev is not read/writable by this user: add the user to the group that owns "
      "/dev/sev (or run as root)")),
    (r"Failed to open /dev/sev",
     "/dev/sev cannot be opened: is the ccp driver loaded with the PSP firmware?"),
    (r"failed to initialize ret=-16",
     ("KVM_SEV_INIT got EBUSY: no free SEV ASID (all in use by other guests, or the BIOS "
      "reserves none for this kind: check the SEV / SEV-ES ASID settings)")),
    (r"failed to initialize ret=",
     "KVM_SEV_INIT failed: the SEV firmware refused the guest (see QEMU's message)"),
    (r"host SEV-ES support unavailable",
     "the SEV firmware has no SEV-ES (CONFIG_ES): update the PSP firmware, or run plain SEV"),
    (r"SEV-ES guests require in-kernel irqchip",
     "SEV-ES needs KVM's in-kernel irqchip (do not pass kernel-irqchip=off)"),
    (r"cbitpos check failed",
     "the sev-guest cbitpos does not match the host's C-bit (query-sev-capabilities)"),
    (r"reduced_phys_bits check failed",
     "reduced-phys-bits must be at least 1"),
)


def sev_launch_reason(stderr: str) -> str | None:
    """The remedy for a SEV launch QEMU refused, from its stderr, or None."""
    for pattern, reason in SEV_LAUNCH_FAILURES:
        if re.search(pattern, stderr):
            return reason
    return None


#: ``query-sev`` ``state`` before ``cont`` and after: QEMU 7.2 measures the
#: launch when the machine is created (``sev_launch_get_measure``:
#: launch-secret) and finishes it when the guest first runs
#: (``sev_launch_finish``: running); the emulated SEV keeps the same states.
SEV_STATE_PAUSED = "launch-secret"
SEV_STATE_RUNNING = "running"


def sev_info_problem(info: Mapping[str, Any], policy: int, *, emulated: bool = False,
                     state: str | None = None, snp: bool = False) -> str | None:
    """Why a ``query-sev`` reply (QAPI ``SevInfo``) is not SEV with ``policy``.

    None when ``enabled`` is true, the policy matches, the launch is in
    ``state`` (when given), and the reply's ``emulated`` mark (the harness's
    QEMU; absent in other QEMUs, meaning false) is what was asked: a real SEV
    test never runs on an emulation, and an emulated one never on a plain
    guest. ``snp``: QEMU 9.1's reply (``sev-type`` ``sev-snp`` and its
    ``snp-policy``).
    """
    if not info.get("enabled"):
        return "query-sev says enabled=false"
    if state is not None and info.get("state") != state:
        return f"query-sev state {info.get('state')!r}, expected {state!r}"
    if snp:
        # QEMU >= 9.1: SevInfo is a union on sev-type; SNP's policy is a u64.
        if info.get("sev-type") != "sev-snp":
            return f"query-sev sev-type {info.get('sev-type')!r}, expected 'sev-snp'"
        got = info.get("snp-policy")
        if got != policy:
            shown = f"{got:#x}" if isinstance(got, int) else repr(got)
            return f"query-sev snp-policy {shown}, expected {policy:#x}"
        return None
    got = info.get("policy")
    if got != policy:
        shown = f"{got:#x}" if isinstance(got, int) else repr(got)
        return f"query-sev policy {shown}, expected {policy:#x}"
    is_emulated = bool(info.get("emulated", False))
    if not emulated and not is_emulated and (info.get("api-major"), info.get("api-minor")) \
            == (0, 0):
        return "query-sev says SEV API 0.0: no SEV firmware answered the launch"
    if is_emulated != emulated:
        return ("query-sev says the SEV is emulated (sev-emulated), not real"
                if is_emulated else "query-sev does not say emulated=true")
    return None
