"""One boot of the probe guest, from firmware to verdicts.

A :class:`Scenario` says what to boot (teardown scheme, adversary depth,
devices, probe options, accelerator, SEV mode); :func:`run_scenario` writes
the per-run FAT image with a fresh canary, boots it through
:class:`~harness.vm.machine.QemuMachine`, waits for the probe's
``EBST probe-parked`` line, dumps memory when asked, and judges the debug log
(V1..V4) and the dump (D1..D3). What it leaves in the artifact directory::

    canary.bin  probe.img  ebs-probe.cfg      the guest's inputs
    disk-KIND.img                              a zoo storage device's disk
    vm/                                        the machine's artifacts (debugcon.log, ...)
    device-trace.log                           QEMU's device trace (W1, W2)
    memory.elf                                 the dump (with Scenario.dump)
    timeline.html  result.json                 the verdicts
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.analysis import device_models
from harness.build.edk2 import Firmware
from harness.errors import SettingError, UsageError
from harness.tools import interrupts_held
from harness.vm import guest, host
from harness.vm.config import MachineConfig
from harness.vm.console import DEFAULT_FAILURES
from harness.vm.devices import Device, parse_devices, trace_models
from harness.vm.machine import QemuMachine
from harness.vm.sev import MODES, SEV_MODES

# What judges a run is imported in run_scenario() once QEMU is running, so
# that the guest boots while it loads.
if TYPE_CHECKING:
    from harness.analysis import devices as device_trace
    from harness.analysis import dump as dumps
    from harness.analysis import trace
    from harness.analysis.judgement import Judgement

LOG = logging.getLogger(__name__)

EBS_MODES = ("callback", "legacy", "none")
FW_CFG = "opt/org.ebs-harness"
#: The park line whole: the guest writes no more once it is there, and the
#: log is read to its end while QEMU quits.
PARKED = r"EBST probe-parked\r?\n"
#: The probe gives up before EBS: no park will come.
PROBE_ERROR = r"EBST probe step=error[^\r\n]*"
CANARY_FILE = "canary.bin"
#: Said of every boot in IoMmuDxe's emulation mode.
EMULATION_MODE_NOTE = ("IoMmuDxe's emulation mode (page-table bit 52): the teardown ran, but "
                       "not the code that ships under SEV (MemEncryptSevLib, the "
                       "confidential-computing PCD); the emulated SEV runs that path")


@dataclass(frozen=True)
class Scenario:
    """What one boot asks of the firmware and the probe.

    :param ebs_mode: the IOMMU's teardown scheme.
    :param requeue_depth: the adversary driver's re-signal depth; None: off.
    :param devices: device names (``harness.vm.devices.KINDS``); virtio-blk,
        the boot disk, is always there, first unless placed.
    :param leak_mapping: the probe leaves one mapping with canary bytes live.
    :param stale_mapkey: the probe first calls EBS with a stale MapKey.
    :param start_net: the probe starts virtio-net's SNP (default: when
        virtio-net is among the devices).
    :param iommu_emulation: IoMmuDxe's emulation mode (default: when SEV is
        off); not QEMU's emulated SEV, which is the ``sev`` mode ``emulated``.
    :param accel: ``auto``, ``tcg`` or ``kvm``.
    :param sev: ``off`` or a mode of ``harness.vm.sev.MODES``.
    :param dump: take a memory dump once the probe parked.
    :param memory_mib: guest RAM.
    :param timeout: seconds from QEMU's start to the park.
    :param device_trace: record QEMU's device trace and judge W1, W2.
    :param inject_frames: once the probe parked, send this many Ethernet
        frames to the adversary NIC (``adversary-nic``), each carrying the
        run's canary.
    """

    ebs_mode: str = "callback"
    requeue_depth: int | None = None
    devices: tuple[str, ...] = ("virtio-blk",)
    leak_mapping: bool = False
    stale_mapkey: bool = False
    start_net: bool | None = None
    iommu_emulation: bool | None = None
    accel: str = "auto"
    sev: str = "off"
    dump: bool = False
    memory_mib: int = 256
    timeout: float = 120.0
    device_trace: bool = True
    inject_frames: int = 0

    def __post_init__(self) -> None:
        devices = tuple(self.devices)
        if "virtio-blk" not in devices:     # the boot disk, always
            devices = ("virtio-blk", *devices)
        object.__setattr__(self, "devices", devices)
        if self.ebs_mode not in EBS_MODES:
            raise SettingError("ebs_mode", self.ebs_mode, f"one of {', '.join(EBS_MODES)}")
        if self.requeue_depth is not None and not 0 <= self.requeue_depth <= 64:
            raise SettingError("requeue_depth", self.requeue_depth, "not in 0..64")
        if self.sev not in SEV_MODES:
            raise SettingError("sev", self.sev, f"one of {', '.join(SEV_MODES)}")
        if self.iommu_emulation and self.sev != "off":
            raise SettingError("iommu_emulation", self.iommu_emulation,
                               "IoMmuDxe's emulation mode is for guests without SEV")
        if self.sev != "off" and self.accel not in ("auto", MODES[self.sev].accel):
            raise SettingError("sev", self.sev, f"runs under {MODES[self.sev].accel}, "
                                                f"not accel {self.accel}")
        if self.timeout <= 0:
            raise SettingError("timeout", self.timeout, "must be positive")
        if not 0 <= self.inject_frames <= 4096:
            raise SettingError("inject_frames", self.inject_frames, "not in 0..4096")
        if self.inject_frames and "adversary-nic" not in self.devices:
            raise SettingError("inject_frames", self.inject_frames,
                               "frames go to the adversary NIC: add the device adversary-nic")

    @property
    def iommu_emulated(self) -> bool:
        """IoMmuDxe runs in its emulation mode."""
        return self.sev == "off" if self.iommu_emulation is None else self.iommu_emulation

    @property
    def net(self) -> bool:
        return "virtio-net" in self.devices if self.start_net is None else self.start_net

    def fw_cfg(self, canary: bytes) -> dict[str, str]:
        """The firmware's knobs (docs/emulation.md); the adversary driver
        puts ``canary`` in the buffer it maps."""
        knobs = {f"{FW_CFG}/ebs-mode": self.ebs_mode}
        if self.iommu_emulated:
            knobs[f"{FW_CFG}/emulation"] = "1"
        if self.requeue_depth is not None:
            knobs[f"{FW_CFG}/requeue-depth"] = str(self.requeue_depth)
            knobs[f"{FW_CFG}/canary"] = canary.decode("ascii")
        if "adversary-nic" in self.devices:
            knobs[f"{FW_CFG}/adversary-nic"] = "1"
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
        if self.inject_frames:
            parts.append(f"frames{self.inject_frames}")
        if self.sev != "off":
            parts.append(MODES[self.sev].label)
        return "-".join(parts)


def make_canary() -> bytes:
    """A fresh canary: a recognisable prefix and 48 random hex digits (ASCII,
    no comma or space: it also travels as a fw_cfg string)."""
    return b"EBS-CANARY-" + secrets.token_hex(24).encode()


@dataclass(frozen=True)
class RunResult:
    """What one boot showed: the run, and its evidence judged."""

    scenario: Scenario
    artifacts: Path
    accel: str
    qemu_version: str
    firmware_key: str
    park_seconds: float
    judgement: Judgement

    @property
    def log(self) -> trace.LogReport:
        return self.judgement.log

    @property
    def dump(self) -> dumps.DumpReport | None:
        return self.judgement.dump

    @property
    def devices(self) -> device_trace.DeviceReport | None:
        return self.judgement.devices

    @property
    def violations(self) -> list[trace.Violation]:
        return self.judgement.violations

    @property
    def passed(self) -> bool:
        return self.judgement.passed

    def failed_checks(self) -> set[str]:
        return self.judgement.failed_checks()

    @property
    def debug_log(self) -> Path:
        """The log the trace was read from (debug port, or serial)."""
        return Path(self.log.timeline.trace.path)

    def verdict_line(self) -> str:
        """``LABEL: PASS (parked after ...)``, or the failed checks in registry order."""
        from harness.analysis.judgement import summary_checks

        verdict = ("PASS" if self.passed else
                   "FAIL: " + ", ".join(summary_checks(self.failed_checks())))
        return (f"{self.scenario.label()}: {verdict} (parked after {self.park_seconds:.1f} s "
                f"under {self.accel}; artifacts {self.artifacts}, timeline "
                f"{self.artifacts / 'timeline.html'})")

    def render_text(self) -> str:
        """The timeline, the dump's and the devices' reports, the notes on
        the device trace, and the verdict line."""
        notes = "".join(f"note: {note}\n" for note in self.judgement.device_notes)
        return f"{self.judgement.render_text()}{notes}\n{self.verdict_line()}\n"

    def as_json(self) -> dict[str, Any]:
        judged = self.judgement
        data: dict[str, Any] = {
            "scenario": self.scenario.label(),
            "settings": dataclasses.asdict(self.scenario),
            "verdict": "pass" if self.passed else "fail",
            "violations": [v.as_json() for v in self.violations],
            "checks": judged.checks_json(),
            "accel": self.accel,
            "sev": self.scenario.sev,
            "emulation": self.scenario.iommu_emulated,
            "qemu_version": self.qemu_version,
            "firmware_key": self.firmware_key,
            "park_seconds": round(self.park_seconds, 3),
            "artifacts": str(self.artifacts),
            "findings": [f.as_json() for f in self.log.findings],
            "notes": [*self.log.anomalies, *judged.device_notes],
        }
        if self.dump is not None:
            dumped = self.dump.as_json()
            for key in ("live_mappings", "shared_pages", "canary_hits"):
                data[key] = dumped.get(key)
            data["dump"] = dumped
        if self.devices is not None:
            data["devices"] = self.devices.as_json()
        return data


def machine_config(firmware: Firmware, scenario: Scenario, devices: tuple[Device, ...],
                   caps: host.HostCaps, canary: bytes, *, no_reboot: bool = False,
                   serial_input: bool = False) -> MachineConfig:
    """The QEMU guest for ``scenario`` with ``devices``: the accelerator and
    SEV the host proved, the firmware's knobs, the device trace's events."""
    sev = host.sev_config(scenario.sev, caps)
    return MachineConfig(
        code=firmware.combined if sev is not None and sev.snp else firmware.code,
        vars_template=firmware.vars,
        accel=sev.accel if sev is not None else host.resolve_accel(scenario.accel, caps),
        sev=sev,
        memory_mib=scenario.memory_mib,
        devices=devices,
        fw_cfg=scenario.fw_cfg(canary),
        # Modern-only virtio with the IOMMU feature: OVMF's legacy virtio
        # driver never calls PciIo->Map, so nothing would reach the IOMMU.
        iommu_platform=True if scenario.iommu_emulated else None,
        qemu=caps.qemu,
        no_reboot=no_reboot,
        # The probe reads no console: a plain file keeps a serial trace intact.
        serial_input=serial_input,
        trace_events=((*device_models.trace_events(trace_models(devices)),
                       *(device_models.PAGE_STATE_EVENTS
                         if sev is not None and sev.snp and sev.emulated
                         else ()))
                      if scenario.device_trace else ()),
    )


def check_host(scenario: Scenario, caps: host.HostCaps) -> None:
    """Raise the :class:`~harness.errors.UsageError` ``scenario`` would meet on
    a host with ``caps`` (an accelerator or SEV mode it lacks), before any
    build starts."""
    sev = host.sev_config(scenario.sev, caps)
    if sev is None:
        host.resolve_accel(scenario.accel, caps)


def check_firmware(scenario: Scenario, firmware: Firmware) -> None:
    """Raise the :class:`~harness.errors.SettingError` of a SEV mode that
    ``firmware``'s edk2 baseline does not boot in."""
    if scenario.sev == "off":
        return
    why = MODES[scenario.sev].stops(firmware.baseline)
    if why is not None:
        raise SettingError("sev", scenario.sev, why)


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
                 launcher: Callable[..., QemuMachine] = QemuMachine
                 ) -> RunResult:
    """Boot ``scenario`` and judge it. Raises only for the environment
    (:class:`~harness.errors.LaunchError`, a console timeout or failure) or bad
    input; violations are in the result.

    :param launcher: makes the machine from ``(config, artifacts, name=)``:
        :class:`~harness.vm.machine.QemuMachine`, or a remote host's
        (:meth:`harness.vm.remote.RemoteHost.launcher`)."""
    check_firmware(scenario, firmware)
    artifacts = Path(artifacts).absolute()
    artifacts.mkdir(parents=True, exist_ok=True)
    caps = caps or host.cached_probe()
    canary = make_canary()
    image = write_guest(firmware, scenario, artifacts, canary)
    devices = parse_devices(",".join(scenario.devices), image,
                                    lambda kind: write_disk(artifacts, kind, canary))
    config = machine_config(firmware, scenario, devices, caps, canary)
    LOG.info("%s: %s under %s", scenario.label(), artifacts, config.accel)
    dump_path: Path | None = None
    started = time.monotonic()
    with launcher(config, artifacts / "vm", name=scenario.label()) as vm:
        # Loaded and read while the guest boots, not before QEMU starts; a
        # Ctrl-C meanwhile waits for the imports to be whole.
        with interrupts_held():
            from harness.analysis import devicetrace, symbols, trace
            from harness.analysis import dump as dumps
            from harness.analysis import trace_events as qemu_events
            from harness.analysis.judgement import Judgement

            symbols.preload(firmware.path)
            events_file = qemu_events.events_file(caps.qemu)
            if scenario.device_trace:
                devicetrace.preload(events_file)
        # The firmware writes its debug log, and so the trace, to one port.
        console, log = ((vm.serial, vm.serial_log) if firmware.debug_on_serial
                        else (vm.debugcon, vm.debugcon_log))
        # Read while the guest runs, the log is parsed when the guest parks.
        with trace.parsing_while_written(log) as parsed_log:
            console.expect(PARKED, failure=[*DEFAULT_FAILURES, PROBE_ERROR],
                               timeout=scenario.timeout)
            park_seconds = time.monotonic() - started
            if scenario.inject_frames:
                inject(vm, scenario.inject_frames, canary)
            if scenario.dump:
                dump_path = vm.dump(artifacts / "memory.elf")
            # The parked guest writes no more: its log is judged while QEMU exits.
            vm.request_quit()
            if vm.abnormal is None:     # else leaving the block reports that first
                log_report, sym = trace.analyze_trace(parsed_log(), firmware.path)
            vm.shutdown()
    if scenario.iommu_emulated:
        log_report = trace.with_notes(log_report, EMULATION_MODE_NOTE)
    dump_report = None
    if dump_path is not None:
        parsed = log_report.timeline.trace
        sev = config.sev
        dump_report = dumps.analyze_dump(
            dump_path, parsed, maphead_symbol=sym.symbol_address("IoMmuDxe", "mMapInfos"),
            canary=canary, cbit=sev.cbit_mask if sev is not None else None,
            encrypted=sev is not None and sev.kind.encrypted)
    device_report: device_trace.DeviceReport | None = None
    device_notes: tuple[str, ...] = ()
    if scenario.device_trace:
        device_report, device_notes = judge_devices(
            vm.device_trace_raw, artifacts / DEVICE_TRACE, caps.qemu_version,
            log_report.timeline.trace.events, events_file)
    if scenario.inject_frames and dump_path is not None and dump_report is not None:
        device_notes += (late_frames(dump_path, dump_report),)
    result = RunResult(scenario, artifacts, config.accel, caps.qemu_version, firmware.key,
                       park_seconds, Judgement(log_report, sym, dump_report, device_report,
                                               device_notes))
    (artifacts / "timeline.html").write_text(result.judgement.render_html(), encoding="utf-8")
    (artifacts / "result.json").write_text(json.dumps(result.as_json(), indent=2) + "\n")
    return result


DEVICE_TRACE = "device-trace.log"
#: Where injected frames go: broadcast, from a locally administered MAC, of
#: the local experimental EtherType.
_FRAME_HEAD = bytes.fromhex("ffffffffffff" "525400eb5001" "88b5")
FRAME_TAG = b"EBS-LATE-DMA "
#: How long QEMU gets to take injected frames before the dump.
INJECT_SETTLE = 1.0


def write_disk(artifacts: Path, kind: str, canary: bytes) -> Path:
    """A zoo storage device's disk: a FAT image holding the canary."""
    return guest.make_fat_image(artifacts / f"disk-{kind}.img", {CANARY_FILE: canary})


def inject(vm: QemuMachine, count: int, canary: bytes) -> None:
    """Send ``count`` frames carrying ``canary`` to the adversary NIC, and
    give QEMU a moment to take them."""
    frames = [_FRAME_HEAD + FRAME_TAG + b"%04d " % n + canary for n in range(count)]
    sent = vm.send_frames(frames)
    LOG.info("sent %d of %d frames to the adversary NIC", sent, count)
    time.sleep(INJECT_SETTLE)


def late_frames(dump_path: Path, report: dumps.DumpReport) -> str:
    """Where the frames injected after the park are in the dump, and whether
    those pages are shared: what a device's late DMA did to guest memory."""
    from harness.analysis.memdump import QemuDump

    with QemuDump(dump_path) as dump:
        hits = dump.scan(FRAME_TAG)
    if not hits:
        return "late DMA: no injected frame in guest memory (the device wrote none)"
    shared = [(r.paddr, r.size) for r in report.shared or ()] + \
        [(r.paddr, r.size) for r, _ in report.by_design]
    private = [a for a in hits if not any(p <= a < p + n for p, n in shared)]
    where = ", ".join(f"{a:#x}" for a in hits[:4]) + (" ..." if len(hits) > 4 else "")
    if report.shared is None:
        return (f"late DMA: {len(hits)} injected frame(s) in guest memory at paddr {where} "
                "(page state not walked)")
    text = (f"late DMA: {len(hits)} injected frame(s) in guest memory at paddr {where}, "
            f"{len(private)} in private pages")
    if private:
        text += (": the device wrote them after the teardown made its buffers private; under "
                 "SEV the guest reads such a page through its key, as garbage, so the late "
                 "DMA corrupts memory")
    return text


def judge_devices(raw: Path, kept: Path, qemu_version: str,
                  log_events: Sequence[trace.TraceEvent] = (),
                  events: Path | None = None
                  ) -> tuple[device_trace.DeviceReport | None, tuple[str, ...]]:
    """The device trace QEMU wrote to ``raw``, kept as ``kept`` behind its
    header (which names ``events``, the QEMU's ``trace-events-all``), and
    judged; or None and why not."""
    from harness.analysis import devices as device_trace
    from harness.analysis import devicetrace

    try:
        with open(raw, "rb") as source, open(kept, "wb") as target:
            target.write(devicetrace.header(qemu_version, events).encode())
            shutil.copyfileobj(source, target)
    except OSError as exc:
        return None, (f"no device trace ({raw}: {exc.strerror}): W1, W2 not judged",)
    raw.unlink()
    try:
        return device_trace.analyze_device_trace(kept, log_events), ()
    except devicetrace.DeviceTraceError as exc:
        return None, (f"device trace unreadable, W1 and W2 not judged: {exc}",)


def scenario_from_options(options: Mapping[str, Any]) -> Scenario:
    """A Scenario from settings named by its fields (a command line's
    options, a plan's table); a setting that is absent or None keeps the
    field's default. ``devices`` may be one comma-separated string."""
    given = {f.name: options[f.name] for f in dataclasses.fields(Scenario)
             if options.get(f.name) is not None}
    if isinstance(given.get("devices"), str):
        given["devices"] = tuple(d.strip() for d in given["devices"].split(",") if d.strip())
    return Scenario(**given)
