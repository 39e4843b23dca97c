"""What one QEMU guest runs, and the command line that runs it.

:class:`MachineConfig` says what to run (firmware, accelerator, SEV, memory,
devices, fw_cfg knobs, trace events); :func:`build_argv` turns it with the
run's :class:`RuntimePaths` into QEMU's argv, a pure function;
:func:`reproduce_script` writes the same QEMU as a shell script to run by
hand. The devices' arguments come from their registry
(:mod:`harness.vm.devices`), the SEV object's from its mode
(:mod:`harness.vm.sev`).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.vm.devices import (
    BlockDevice,
    Device,
    NetDevice,
    RngDevice,
    ScsiController,
    ZooDevice,
    comma,
    device_args,
)
from harness.vm.sev import SevConfig

ACCELS = ("tcg", "kvm")

DEBUGCON_IOBASE = 0x402
FW_CFG_PREFIX = "opt/"
_FW_CFG_NAME_MAX = 55   # FW_CFG_MAX_FILE_PATH (56) with its NUL


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
    :param cpu: ``-cpu`` model; None: the SEV mode's (``host`` under KVM), else
        QEMU's default.
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
        if self.sev is not None and self.smp > self.sev.kind.max_smp:
            raise ValueError(f"smp {self.smp}: SEV mode {self.sev.mode} runs at most "
                             f"{self.sev.kind.max_smp} vCPU")
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
    if config.sev is not None and config.sev.snp and not config.sev.emulated:
        machine += ",memory-backend=ram0"
    argv = [config.qemu, "-name", "ebs-harness,debug-threads=on",
            "-machine", machine, "-accel", config.accel]
    cpu = config.cpu
    if cpu is None and config.sev is not None:
        cpu = config.sev.kind.cpu
    if cpu:
        argv += ["-cpu", cpu]
    argv += ["-m", str(config.memory_mib), "-smp", str(config.smp),
             "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none"]
    if config.no_reboot:
        argv.append("-no-reboot")
    if config.sev is not None:
        sev = config.sev
        if sev.snp and not sev.emulated:
            # SNP's private memory comes from guest_memfd beside this shared memfd.
            argv += ["-object", (f"memory-backend-memfd,id=ram0,size={config.memory_mib}M,"
                                 "share=true")]
        # The emulated SNP is sev-emulated's switch, with the u64 policy beside.
        policy = (f"snp=on,snp-policy={sev.effective_policy:#x}" if sev.snp and sev.emulated
                  else f"policy={sev.effective_policy:#x}")
        argv += ["-object",
                 (f"{sev.qom_type},id=sev0,cbitpos={sev.cbitpos},"
                 f"reduced-phys-bits={sev.reduced_phys_bits},{policy}"
                 + (f",x-vc-mismatch={sev.vc_mismatch}" if sev.vc_mismatch else ""))]
    if config.sev is not None and config.sev.snp:
        argv += ["-bios", str(config.code)]
    else:
        argv += ["-drive",
                 f"if=pflash,format=raw,unit=0,readonly=on,file={comma(config.code)}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={comma(paths.vars_copy)}"]
    argv += ["-chardev", f"socket,id=qmp0,path={comma(paths.qmp_socket)},server=on,wait=off",
             "-mon", "chardev=qmp0,mode=control"]
    log = f"logfile={comma(paths.serial_log)},logappend=off"
    if paths.serial_socket is not None and not config.serial_input:
        argv += ["-chardev", f"file,id=serial0,path={comma(paths.serial_log)}"]
    elif paths.serial_socket is not None:
        argv += ["-chardev", (f"socket,id=serial0,path={comma(paths.serial_socket)},"
                             f"server=on,wait=off,{log}")]
    else:
        argv += ["-chardev", f"stdio,id=serial0,{log}"]
    argv += ["-serial", "chardev:serial0"]
    if config.debugcon:
        argv += ["-debugcon", f"file:{comma(paths.debugcon_log)}",
                 "-global", f"isa-debugcon.iobase={DEBUGCON_IOBASE:#x}"]
    for name, value in sorted(config.fw_cfg.items()):
        argv += ["-fw_cfg", f"name={comma(name)},string={comma(value)}"]
    argv += device_args(config.devices, config.virtio_secure, paths.nic_socket)
    if config.trace_events and paths.trace_log is not None:
        for event in config.trace_events:
            argv += ["-trace", f"enable={event}"]
        argv += ["-trace", f"file={comma(paths.trace_log)}"]
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

