"""One boot of the probe guest, from firmware to verdicts.

A :class:`Scenario` says what to boot (teardown scheme, adversary depth,
devices, probe options, accelerator, SEV mode); :func:`run_scenario` writes
the per-run FAT image with a fresh canary, boots it through
:class:`~harness.vm.machine.QemuMachine`, waits for the probe's
``EBST probe-parked`` line, dumps memory when asked, and judges the debug log
(V1..V4) and the dump (D1..D3). What it leaves in the artifact directory::

    canary.bin  probe.img  ebs-probe.cfg      the guest's inputs
    vm/                                        the machine's artifacts (debugcon.log, ...)
    memory.elf                                 the dump (with Scenario.dump)
    timeline.html  result.json                 the verdicts
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.analysis import dump as dumps
from harness.analysis import report, symbols, trace
from harness.build.edk2 import Firmware
from harness.errors import UsageError
from harness.vm import guest, host, machine
from harness.vm.console import DEFAULT_FAILURES

LOG = logging.getLogger(__name__)

EBS_MODES = ("callback", "legacy", "none")
SEV_MODES = machine.SEV_MODES
FW_CFG = "opt/org.ebs-harness"
PARKED = r"EBST probe-parked"
#: The probe gives up before EBS: no park will come.
PROBE_ERROR = r"EBST probe step=error[^\r\n]*"
CANARY_FILE = "canary.bin"
#: Said of every boot in IoMmuDxe's emulation mode.
EMULATION_MODE_NOTE = ("IoMmuDxe's emulation mode (page-table bit 52): the teardown ran, but "
                       "not the code that ships under SEV (MemEncryptSevLib, the "
                       "confidential-computing PCD); --sev emulated runs that path")


@dataclass(frozen=True)
class Scenario:
    """What one boot asks of the firmware and the probe.

    :param ebs_mode: the IOMMU's teardown scheme.
    :param requeue_depth: the adversary driver's re-signal depth; None: off.
    :param devices: ``--devices`` names; virtio-blk (the boot disk) first.
    :param leak_mapping: the probe leaves one mapping with canary bytes live.
    :param stale_mapkey: the probe first calls EBS with a stale MapKey.
    :param start_net: the probe starts virtio-net's SNP (default: when
        virtio-net is among the devices).
    :param emulation: IOMMU emulation mode (default: when SEV is off).
    :param accel: ``auto``, ``tcg`` or ``kvm``.
    :param sev: ``off``, ``sev``, ``sev-es``, ``snp`` (KVM on a SEV host; SNP
        with a QEMU >= 9.1) or ``emulated`` (TCG on the harness's QEMU,
        ``docs/emulated-sev.md``).
    :param dump: take a memory dump once the probe parked.
    :param memory_mib: guest RAM.
    :param timeout: seconds from QEMU's start to the park.
    """

    ebs_mode: str = "callback"
    requeue_depth: int | None = None
    devices: tuple[str, ...] = ("virtio-blk",)
    leak_mapping: bool = False
    stale_mapkey: bool = False
    start_net: bool | None = None
    emulation: bool | None = None
    accel: str = "auto"
    sev: str = "off"
    dump: bool = False
    memory_mib: int = 256
    timeout: float = 120.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(self.devices))
        if self.ebs_mode not in EBS_MODES:
            raise UsageError(f"--ebs-mode {self.ebs_mode!r}: one of {', '.join(EBS_MODES)}")
        if self.requeue_depth is not None and not 0 <= self.requeue_depth <= 64:
            raise UsageError(f"--requeue-depth {self.requeue_depth}: not in 0..64")
        if "virtio-blk" not in self.devices:
            raise UsageError("--devices must include virtio-blk: the probe boots from it")
        if self.sev not in machine.SEV_MODES:
            raise UsageError(f"--sev {self.sev!r}: one of {', '.join(machine.SEV_MODES)}")
        if self.emulation and self.sev != "off":
            raise UsageError("emulation mode is for guests without SEV")
        if self.sev == "emulated" and self.accel == "kvm":
            raise UsageError("--sev emulated runs under TCG: drop --accel kvm")
        if self.timeout <= 0:
            raise UsageError(f"--timeout {self.timeout}: must be positive")

    @property
    def emulated(self) -> bool:
        return self.sev == "off" if self.emulation is None else self.emulation

    @property
    def net(self) -> bool:
        return "virtio-net" in self.devices if self.start_net is None else self.start_net

    def fw_cfg(self, canary: bytes) -> dict[str, str]:
        """The firmware's knobs (docs/emulation.md); the adversary driver
        puts ``canary`` in the buffer it maps."""
        knobs = {f"{FW_CFG}/ebs-mode": self.ebs_mode}
        if self.emulated:
            knobs[f"{FW_CFG}/emulation"] = "1"
        if self.requeue_depth is not None:
            knobs[f"{FW_CFG}/requeue-depth"] = str(self.requeue_depth)
            knobs[f"{FW_CFG}/canary"] = canary.decode("ascii")
        return knobs

    def probe_config(self) -> str:
        """``ebs-probe.cfg`` (guests/ebs-probe/README.md)."""
        lines = [f"canary={CANARY_FILE}",
                 f"leak-mapping={int(self.leak_mapping)}",
                 f"start-net={int(self.net)}",
                 f"stale-mapkey={int(self.stale_mapkey)}"]
        return "\n".join(lines) + "\n"

    def label(self) -> str:
        """A short name: ``callback-d2-blk+net-leak``."""
        parts = [self.ebs_mode]
        if self.requeue_depth is not None:
            parts.append(f"d{self.requeue_depth}")
        parts.append("+".join(d.removeprefix("virtio-") for d in self.devices))
        parts += [name for name, on in (("leak", self.leak_mapping),
                                        ("stale", self.stale_mapkey)) if on]
        if self.sev != "off":
            parts.append("emulated-sev" if self.sev == "emulated" else self.sev)
        return "-".join(parts)


def make_canary() -> bytes:
    """A fresh canary: a recognisable prefix and 48 random hex digits (ASCII,
    no comma or space: it also travels as a fw_cfg string)."""
    return b"EBS-CANARY-" + secrets.token_hex(24).encode()


@dataclass(frozen=True)
class RunResult:
    """What one boot showed."""

    scenario: Scenario
    artifacts: Path
    accel: str
    qemu_version: str
    firmware_key: str
    park_seconds: float
    log: trace.LogReport
    symbolizer: symbols.Symbolizer = field(repr=False)
    dump: dumps.DumpReport | None = None

    @property
    def violations(self) -> list[trace.Violation]:
        found = list(self.log.violations)
        if self.dump is not None:
            found += self.dump.violations
        return found

    @property
    def passed(self) -> bool:
        return not self.violations

    def failed_checks(self) -> set[str]:
        return {v.check for v in self.violations}

    @property
    def debug_log(self) -> Path:
        """The log the trace was read from (debug port, or serial)."""
        return Path(self.log.timeline.trace.path)

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "scenario": self.scenario.label(),
            "settings": dataclasses.asdict(self.scenario),
            "verdict": "pass" if self.passed else "fail",
            "violations": [v.as_json() for v in self.violations],
            "accel": self.accel,
            "sev": self.scenario.sev,
            "emulation": self.scenario.emulated,
            "qemu_version": self.qemu_version,
            "firmware_key": self.firmware_key,
            "park_seconds": round(self.park_seconds, 3),
            "artifacts": str(self.artifacts),
            "findings": [f.as_json() for f in self.log.findings],
            "notes": list(self.log.anomalies),
        }
        if self.dump is not None:
            dumped = self.dump.as_json()
            for key in ("live_mappings", "shared_pages", "canary_hits"):
                data[key] = dumped.get(key)
            data["dump"] = dumped
        return data


def machine_config(firmware: Firmware, scenario: Scenario, devices: tuple[machine.Device, ...],
                   caps: host.HostCaps, canary: bytes, *, no_reboot: bool = False,
                   serial_input: bool = False) -> machine.MachineConfig:
    """The QEMU guest for ``scenario`` with ``devices``: the accelerator and
    SEV the host proved, the firmware's knobs."""
    sev = host.sev_config(scenario.sev, caps)
    return machine.MachineConfig(
        code=firmware.combined if sev is not None and sev.snp else firmware.code,
        vars_template=firmware.vars,
        accel=sev.accel if sev is not None else host.resolve_accel(scenario.accel, caps),
        sev=sev,
        memory_mib=scenario.memory_mib,
        devices=devices,
        fw_cfg=scenario.fw_cfg(canary),
        # Modern-only virtio with the IOMMU feature: OVMF's legacy virtio
        # driver never calls PciIo->Map, so nothing would reach the IOMMU.
        iommu_platform=True if scenario.emulated else None,
        qemu=caps.qemu,
        no_reboot=no_reboot,
        # The probe reads no console: a plain file keeps a serial trace intact.
        serial_input=serial_input,
    )


def check_host(scenario: Scenario, caps: host.HostCaps) -> None:
    """Raise the :class:`~harness.errors.UsageError` ``scenario`` would meet on
    a host with ``caps`` (an accelerator or SEV mode it lacks), before any
    build starts."""
    sev = host.sev_config(scenario.sev, caps)
    if sev is None:
        host.resolve_accel(scenario.accel, caps)


def write_guest(firmware: Firmware, scenario: Scenario, artifacts: Path,
                canary: bytes) -> Path:
    """The per-run FAT image: the probe as BOOTX64.EFI, its config, the canary."""
    probe = firmware.module_file("EbsProbe", ".efi")
    if not probe.is_file():
        raise UsageError(f"{firmware.path} has no modules/EbsProbe.efi: not a build of "
                         "this project's series")
    config = scenario.probe_config()
    (artifacts / CANARY_FILE).write_bytes(canary)
    (artifacts / "ebs-probe.cfg").write_text(config)
    return guest.make_fat_image(artifacts / "probe.img", {
        guest.BOOT_PATH: probe,
        "ebs-probe.cfg": config.encode(),
        CANARY_FILE: canary,
    })


def run_scenario(firmware: Firmware, scenario: Scenario, artifacts: Path, *,
                 caps: host.HostCaps | None = None,
                 launcher: Callable[..., machine.QemuMachine] = machine.QemuMachine
                 ) -> RunResult:
    """Boot ``scenario`` and judge it. Raises only for the environment
    (:class:`~harness.errors.LaunchError`, a console timeout or failure) or bad
    input; violations are in the result.

    :param launcher: makes the machine from ``(config, artifacts, name=)``:
        :class:`~harness.vm.machine.QemuMachine`, or a remote host's
        (:meth:`harness.vm.remote.RemoteHost.launcher`)."""
    artifacts = Path(artifacts).absolute()
    artifacts.mkdir(parents=True, exist_ok=True)
    caps = caps or host.cached_probe()
    canary = make_canary()
    image = write_guest(firmware, scenario, artifacts, canary)
    config = machine_config(firmware, scenario,
                            machine.parse_devices(",".join(scenario.devices), image),
                            caps, canary)
    LOG.info("%s: %s under %s", scenario.label(), artifacts, config.accel)
    dump_path: Path | None = None
    started = time.monotonic()
    with launcher(config, artifacts / "vm", name=scenario.label()) as vm:
        # The firmware writes its debug log, and so the trace, to one port.
        console, log = ((vm.serial, vm.serial_log) if firmware.debug_on_serial
                        else (vm.debugcon, vm.debugcon_log))
        console.expect(PARKED, failure=[*DEFAULT_FAILURES, PROBE_ERROR],
                           timeout=scenario.timeout)
        park_seconds = time.monotonic() - started
        if scenario.dump:
            dump_path = vm.dump(artifacts / "memory.elf")
    log_report, sym = trace.analyze_log(log, firmware.path)
    if scenario.emulated:
        log_report = dataclasses.replace(
            log_report, anomalies=(*log_report.anomalies, EMULATION_MODE_NOTE))
    dump_report = None
    if dump_path is not None:
        parsed = log_report.timeline.trace
        sev = config.sev
        dump_report = dumps.analyze_dump(
            dump_path, parsed, maphead_symbol=sym.symbol_address("IoMmuDxe", "mMapInfos"),
            canary=canary, cbit=sev.cbit_mask if sev is not None else None,
            encrypted=sev is not None and not sev.emulated)
    result = RunResult(scenario, artifacts, config.accel, caps.qemu_version, firmware.key,
                       park_seconds, log_report, sym, dump_report)
    (artifacts / "timeline.html").write_text(report.render_html(log_report, sym),
                                             encoding="utf-8")
    (artifacts / "result.json").write_text(json.dumps(result.as_json(), indent=2) + "\n")
    return result


def scenario_from_options(options: Mapping[str, Any]) -> Scenario:
    """A Scenario from the ``boot`` command's options."""
    devices = tuple(d.strip() for d in str(options.get("devices") or "virtio-blk").split(",")
                    if d.strip())
    return Scenario(
        ebs_mode=options.get("ebs_mode") or "callback",
        requeue_depth=options.get("requeue_depth"),
        devices=devices,
        leak_mapping=bool(options.get("leak_mapping")),
        stale_mapkey=bool(options.get("stale_mapkey")),
        accel=options.get("accel") or "auto",
        sev=options.get("sev") or "off",
        dump=bool(options.get("dump")),
        timeout=float(options.get("timeout") or 120.0),
    )
