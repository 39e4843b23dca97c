"""The device side: QEMU's own trace of the devices, and verdicts W1 and W2.

The harness runs QEMU with a chosen set of its trace events enabled (the
``log`` backend, one file per boot, :func:`trace_events`). The device models
write them as they act: PCI command register writes, virtio status changes
and virtqueue accesses, NVMe controller enables and PRP mappings, xHCI
run/stop and TRB fetches, AHCI port engines, e1000e receive control. The
firmware's test build writes two markers into the same stream: IoMmuDxe
selects the fw_cfg keys 0x3EB1 when its teardown begins and 0x3EB2 when it
ends, which QEMU traces as ``fw_cfg_select``. QEMU emits each trace line
whole, under one lock, in the order the events happen, so "after the
teardown began" is the line order of one file, not a comparison of clocks.

Verdicts (``docs/devices.md`` says what counts as quiesced per model):

- **W1**: every device the firmware made a bus master was quiesced (its
  model's reset or stop, or bus mastering off) when the teardown began;
- **W2**: no device DMA from the teardown's beginning until the operating
  system first touches that device again (its next PCI config write), or to
  the end of the trace (the probe parks and touches nothing).

The trace is read by :mod:`harness.analysis.devicetrace` (the formats of
the QEMU that wrote it); here are the device models, the devices' states as
the trace unfolds, and the verdicts.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.analysis import checks
from harness.analysis.checks import Violation
from harness.analysis.device_models import BY_QOM, NO_DMA_ENGINE, Model
from harness.analysis.devicetrace import (
    MARKERS,
    PCI_COMMAND,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    DeviceEvent,
    DeviceTrace,
    parse_device_trace,
)
from harness.analysis.pagestates import NO_MEMORY_MAP, PageStates, judge_page_states

#: Why S1 to S3 are not judged of a trace without page states.
NO_PAGE_STATES = ("no page states in QEMU's trace: not an emulated SEV-SNP guest "
                  "(--sev emulated-snp), whose QEMU is the only place they are read")

# ------------------------------------------------------------ devices


@dataclass
class LaneMark:
    """One thing the device lane draws: ``bm-on``, ``bm-off``, ``arm``,
    ``quiesce``, ``dma``."""

    line: int
    kind: str
    text: str


@dataclass
class Device:
    """One PCI device as the trace shows it."""

    bdf: str
    qom: str
    model: Model | None
    bus_master_since: int | None = None     # line of the write that set it, while on
    ever_master: bool = False
    armed: dict[str, int] = field(default_factory=dict)   # what is armed -> since line
    vdevs: set[str] = field(default_factory=set)
    marks: list[LaneMark] = field(default_factory=list)
    touched_after: int | None = None        # first config write after the teardown began
    dma_before: int = 0
    dma_after: list[DeviceEvent] = field(default_factory=list)
    dma_os: int = 0                          # once the OS touched it again
    quiesce_text: str | None = None
    #: the driver that armed it when the firmware log says so (the adversary)
    owner: str | None = None
    #: the probe read the canary through a volume on it (None: no volume)
    canary: bool | None = None

    @property
    def driver(self) -> str:
        if self.owner is not None:
            return self.owner
        return self.model.driver if self.model is not None else self.qom

    @property
    def name(self) -> str:
        return f"{self.kind} {self.bdf} ({self.qom})"

    @property
    def kind(self) -> str:
        return self.model.kind if self.model is not None else self.qom


@dataclass(frozen=True)
class DeviceReport:
    """W1 and W2 of one device trace, and S1 to S3 of the page states in it.

    :param begin_line: the teardown-begin marker's line, or None (no
        teardown, or a firmware without the markers: nothing judged).
    :param page_states: an emulated SEV-SNP's page states (S1 to S3), or None
        for a trace without them.
    """

    path: Path
    qemu: str | None
    events: int
    begin_line: int | None
    end_line: int | None
    devices: tuple[Device, ...]
    violations: tuple[Violation, ...]
    notes: tuple[str, ...]
    page_states: PageStates | None = None

    @property
    def judged(self) -> bool:
        return self.begin_line is not None

    @property
    def outcomes(self) -> dict[str, checks.Outcome]:
        """W1 and W2: held or failed, or not judged (without the teardown's
        marker) for the reason the notes give; S1 to S3 likewise, not judged
        without page states."""
        ids = checks.of(checks.Evidence.DEVICE_TRACE)
        found = (checks.not_judged(ids, self.notes[0] if self.notes else "no teardown marker")
                 if not self.judged else checks.outcomes(ids, self.violations, {}))
        pages = checks.of(checks.Evidence.PAGE_STATES)
        if self.page_states is None:
            found.update(checks.not_judged(pages, NO_PAGE_STATES))
        else:
            found.update(checks.outcomes(pages, self.page_states.violations, {}))
            if self.page_states.usable_pages is None:
                found.update(checks.not_judged(("S3",), self.page_states.memmap_cut
                                               or NO_MEMORY_MAP))
        return found

    def held(self) -> str:
        """The checks of this trace that held: ``W1, W2, S1, S2, S3``."""
        return ", ".join(c for c, o in self.outcomes.items() if o.state is checks.State.HELD)

    def as_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "qemu": self.qemu, "events": self.events,
            "teardown_begin_line": self.begin_line, "teardown_end_line": self.end_line,
            "judged": self.judged,
            "devices": [{"pci": d.bdf, "model": d.qom, "kind": d.kind,
                         "bus_master": d.ever_master, "quiesced": d.quiesce_text,
                         "dma_before": d.dma_before, "dma_after": len(d.dma_after),
                         "dma_by_os": d.dma_os, "os_touched_line": d.touched_after,
                         "driver": d.driver, "canary_read": d.canary}
                        for d in self.devices],
            "violations": [v.as_json() for v in self.violations],
            "notes": list(self.notes),
            "page_states": self.page_states.as_json() if self.page_states else None,
        }


class _State:
    """The devices as the trace unfolds, line by line."""

    def __init__(self) -> None:
        self.devices: dict[str, Device] = {}
        self.vdev_owner: dict[str, Device] = {}
        self.vq_vdev: dict[str, str] = {}
        self.last_enabled_virtio: Device | None = None
        self.begin: int | None = None
        self.end: int | None = None
        self.unattributed: list[DeviceEvent] = []

    def by_model(self, kind: str) -> Device | None:
        found = [d for d in self.devices.values() if d.model is not None and d.model.kind == kind]
        return found[0] if len(found) == 1 else None

    def cfg_write(self, event: DeviceEvent) -> None:
        bdf = f"{event.num('bus'):02x}:{event.num('slot'):02x}.{event.num('func')}"
        device = self.devices.get(bdf)
        if device is None:
            qom = event.fields["dev"]
            device = self.devices[bdf] = Device(bdf, qom, BY_QOM.get(qom))
        if self.begin is not None and device.touched_after is None:
            device.touched_after = event.line
        if event.num("offs") != PCI_COMMAND:
            return
        value = event.num("val")
        if value & PCI_COMMAND_MASTER and device.bus_master_since is None:
            device.bus_master_since = event.line
            device.ever_master = True
            device.marks.append(LaneMark(event.line, "bm-on", "bus mastering on"))
        elif not value & PCI_COMMAND_MASTER and device.bus_master_since is not None:
            device.bus_master_since = None
            device.marks.append(LaneMark(event.line, "bm-off", "bus mastering off"))
        if value & (PCI_COMMAND_MASTER | PCI_COMMAND_MEMORY) and device.qom.startswith("virtio-"):
            self.last_enabled_virtio = device

    def virtio_device(self, vdev: str) -> Device | None:
        """The device of a virtio backend: the virtio PCI device the
        driver enabled last before the backend first appeared (drivers
        enable their PCI device, then reset the virtio device)."""
        owner = self.vdev_owner.get(vdev)
        if owner is None and self.last_enabled_virtio is not None \
                and not self.last_enabled_virtio.vdevs:
            owner = self.vdev_owner[vdev] = self.last_enabled_virtio
            owner.vdevs.add(vdev)
        return owner

    def claim(self, vdev: str, kind: str) -> None:
        """A backend event only one model has (virtio-blk's, virtio-rng's)."""
        device = self.by_model(kind)
        if device is not None and vdev not in device.vdevs:
            previous = self.vdev_owner.get(vdev)
            if previous is not None:
                previous.vdevs.discard(vdev)
            self.vdev_owner[vdev] = device
            device.vdevs.add(vdev)

    def arm(self, device: Device | None, what: str, event: DeviceEvent, text: str) -> None:
        if device is None:
            return
        if what not in device.armed:
            device.armed[what] = event.line
            device.marks.append(LaneMark(event.line, "arm", text))

    def quiesce(self, device: Device | None, what: str | None, event: DeviceEvent,
                text: str) -> None:
        if device is None:
            return
        if what is None:
            cleared = bool(device.armed)
            device.armed.clear()
        else:
            cleared = device.armed.pop(what, None) is not None
        if cleared:
            device.marks.append(LaneMark(event.line, "quiesce", text))

    def dma(self, device: Device | None, event: DeviceEvent) -> None:
        if device is None:
            if self.begin is not None:
                self.unattributed.append(event)
            return
        if self.begin is None:
            device.dma_before += 1
        elif device.touched_after is None:
            device.dma_after.append(event)
        else:
            device.dma_os += 1
        if device.marks and device.marks[-1].kind == "dma" \
                and device.marks[-1].line >= event.line - 64:
            return
        device.marks.append(LaneMark(event.line, "dma", event.name))


def _step(state: _State, event: DeviceEvent) -> None:
    name = event.name
    f = event.fields
    if name == "fw_cfg_select":
        marker = MARKERS.get(event.num("key"))
        if marker == "teardown-begin" and state.begin is None:
            state.begin = event.line
        elif marker == "teardown-end" and state.end is None and state.begin is not None:
            state.end = event.line
        return
    if name == "pci_cfg_write":
        state.cfg_write(event)
        return
    if name.startswith(("virtio", "virtqueue")):
        _virtio_step(state, event)
        return
    kind = {"pci": "nvme", "ahc": "ahci", "usb": "xhci", "e10": "e1000e", "pvs": "pvscsi",
            "mpt": "mptsas", "lsi": "lsi"}[name[:3]]
    device = state.by_model(kind)
    if name in ("pci_nvme_mmio_start_success", "usb_xhci_run"):
        state.arm(device, "engine", event, name)
    elif name in ("pci_nvme_mmio_stopped", "pci_nvme_mmio_shutdown_set", "usb_xhci_stop",
                  "usb_xhci_reset", "ahci_reset", "e1000e_core_ctrl_sw_reset", "mptsas_reset",
                  "lsi_reset"):
        state.quiesce(device, None, event, name)
    elif name == "ahci_port_write" and f["reg"] == "PxCMD":
        what = f"port {f['port']}"
        if event.num("val") & 0x11:
            state.arm(device, what, event, f"{what} PxCMD={event.num('val'):#x}")
        else:
            state.quiesce(device, what, event, f"{what} PxCMD={event.num('val'):#x}")
    elif name == "ahci_mem_write_host":
        if f["reg"] == "GHC" and event.num("val") & 1:
            state.quiesce(device, None, event, "GHC.HR (HBA reset)")
    elif name == "e1000e_rx_set_rctl":
        if event.num("rctl") & 0x2:
            state.arm(device, "receiver", event, f"RCTL={event.num('rctl'):#x}")
        else:
            state.quiesce(device, "receiver", event, f"RCTL={event.num('rctl'):#x}")
    elif name == "pvscsi_on_cmd_arrived":
        if f["cmd"] == "PVSCSI_CMD_SETUP_RINGS":
            state.arm(device, "rings", event, f["cmd"])
        elif f["cmd"] == "PVSCSI_CMD_ADAPTER_RESET":
            state.quiesce(device, None, event, f["cmd"])
    elif name == "mptsas_process_message":
        if event.num("cmd") == 0x02:      # MPI_FUNCTION_IOC_INIT
            state.arm(device, "ioc", event, "IOC init")
    elif name not in ("ahci_port_write",):
        state.dma(device, event)


def _virtio_step(state: _State, event: DeviceEvent) -> None:
    name = event.name
    f = event.fields
    if name in ("virtqueue_pop", "virtqueue_flush"):
        vdev = state.vq_vdev.get(f["vq"])
        device = state.vdev_owner.get(vdev) if vdev is not None else None
        state.dma(device, event)
        return
    vdev = f["vdev"]
    if name == "virtio_blk_handle_read" or name == "virtio_blk_handle_write":
        state.claim(vdev, "virtio-blk")
        return
    if name == "virtio_rng_pushed":
        state.claim(vdev, "virtio-rng")
        return
    device = state.virtio_device(vdev)
    if name == "virtio_queue_notify":
        state.vq_vdev[f["vq"]] = vdev
    elif name == "virtio_set_status":
        status = event.num("val")
        if status == 0:
            state.quiesce(device, None, event, "virtio reset (status 0)")
        elif status & 0x4:
            state.arm(device, "queues", event, f"virtio status {status:#x} (DRIVER_OK)")


def judge(trace: DeviceTrace, owners: Mapping[str, str] | None = None,
          canary: Mapping[str, bool] | None = None,
          memmap: Sequence[tuple[int, int, int]] = (), memmap_cut: str = "") -> DeviceReport:
    """W1 and W2 of ``trace``.

    :param owners: PCI address to the driver the firmware log says armed
        that device, where it is not the model's usual driver
        (:func:`owners_in_log`).
    :param canary: PCI address to whether the probe read the canary through
        a volume on that device (:func:`canary_reads`).
    :param memmap: the memory map ExitBootServices() took, from the log
        (:func:`memmap_in_log`), for S3; ``memmap_cut``: why the log's map
        cannot be judged."""
    state = _State()
    at_begin: dict[str, tuple[int | None, dict[str, int]]] = {}
    for event in trace.events:
        if event.name.startswith("sev_snp_"):
            continue        # page states, judged below
        _step(state, event)
        if state.begin == event.line:
            at_begin = {d.bdf: (d.bus_master_since, dict(d.armed))
                        for d in state.devices.values()}
    devices = tuple(sorted(state.devices.values(), key=lambda d: d.bdf))
    for device in devices:
        device.owner = (owners or {}).get(device.bdf)
        device.canary = (canary or {}).get(device.bdf)
    notes: list[str] = []
    pages = judge_page_states(trace.events, state.begin, state.end, memmap, memmap_cut)
    paged = pages.violations if pages is not None else ()
    if pages is not None:
        notes += pages.notes
    if state.begin is None:
        notes.append("no teardown-begin marker (fw_cfg key 0x3eb1) in the device trace: no "
                     "teardown ran, or the firmware is not a test build with the markers; "
                     "W1 and W2 not judged")
        return DeviceReport(trace.path, trace.qemu, len(trace.events), None, None, devices,
                            paged, (*notes, *trace.notes), pages)
    violations = (*quiesced(devices, at_begin, state.begin),
                  *no_late_dma(devices, state.begin, state.unattributed), *paged)
    return DeviceReport(trace.path, trace.qemu, len(trace.events), state.begin, state.end,
                        devices, violations, (*notes, *trace.notes), pages)


def quiesced(devices: Sequence[Device], at_begin: Mapping[str, tuple[int | None,
                                                                   dict[str, int]]],
             begin: int) -> list[Violation]:
    """W1: every device the firmware made a bus master (q35's chipset
    functions aside) had bus mastering off or nothing armed at line
    ``begin``; ``at_begin``: each device's bus-master line and armed engines
    then. Says, of each device, how it was quiesced."""
    found: list[Violation] = []
    for device in devices:
        if not device.ever_master or device.qom in NO_DMA_ENGINE:
            continue
        master, armed = at_begin.get(device.bdf, (None, {}))
        if master is None:
            device.quiesce_text = "bus mastering off"
        elif not armed and device.model is not None:
            device.quiesce_text = _quiesced_by(device, begin)
        else:
            what = (", ".join(f"{k} since line {v}" for k, v in armed.items())
                    if armed else f"no quiesce event the harness knows of {device.qom}")
            means = f" (quiesced would be: {device.model.quiesced})" if device.model else ""
            found.append(Violation(
                "W1", f"{device.name} still armed when the teardown began (line "
                f"{begin}): {what}; bus mastering on since line {master}{means}",
                culprit=device.driver))
    return found


def no_late_dma(devices: Sequence[Device], begin: int,
                unattributed: Sequence[DeviceEvent]) -> list[Violation]:
    """W2: no device did DMA from line ``begin`` until the OS touched it,
    nor did one the trace does not name."""
    found: list[Violation] = []
    for device in devices:
        if device.ever_master and device.qom not in NO_DMA_ENGINE and device.dma_after:
            first = device.dma_after[0]
            found.append(Violation(
                "W2", f"{device.name} did DMA after the teardown began (line {begin}): "
                f"{first.name} at line {first.line}"
                + (f" and {len(device.dma_after) - 1} more" if len(device.dma_after) > 1 else ""),
                culprit=device.driver))
    if unattributed:
        first = unattributed[0]
        found.append(Violation(
            "W2", f"a device the trace does not name did DMA after the teardown began "
            f"(line {begin}): {first.name} at line {first.line} ({first.text()})"))
    return found


def _quiesced_by(device: Device, begin: int) -> str:
    """How a device with nothing armed at ``begin`` got there."""
    before = [m for m in device.marks if m.line < begin and m.kind in ("arm", "quiesce")]
    if not before:
        return "never armed"
    last = before[-1]
    return f"{last.text} at line {last.line}"


def analyze_device_trace(path: Path | str, log_events: Iterable[Any] = ()) -> DeviceReport:
    """W1 and W2 of the device trace at ``path``; ``log_events``, the same
    boot's firmware trace events, name the adversary's device and the
    volumes the probe read."""
    events = list(log_events)
    memmap, cut = memmap_in_log(events)
    return judge(parse_device_trace(path), owners_in_log(events), canary_reads(events),
                 memmap, cut)


_PCI_PATH_RE = re.compile(r"PciRoot\(0x[0-9A-Fa-f]+\)/Pci\(0x([0-9A-Fa-f]+),0x([0-9A-Fa-f]+)\)")


def canary_reads(events: Iterable[Any]) -> dict[str, bool]:
    """PCI address (on the root bus) to whether the probe read the canary
    through a volume behind that device: its ``EBST probe
    step=canary-device ... match=0|1 ... path=PciRoot(0x0)/Pci(0xD,0xF)/...``
    lines."""
    found: dict[str, bool] = {}
    for event in events:
        if getattr(event, "name", None) != "probe" or event.get("step") != "canary-device":
            continue
        match = _PCI_PATH_RE.match(event.get("path") or "")
        if match is not None:
            bdf = f"00:{int(match.group(1), 16):02x}.{int(match.group(2), 16)}"
            found[bdf] = found.get(bdf, False) or event.get("match") == "1"
    return found


def memmap_in_log(events: Iterable[Any]) -> tuple[list[tuple[int, int, int]], str]:
    """The memory map ExitBootServices() took, as the probe prints it after
    (``EBST probe step=memmap type=T start=0x.. pages=0x..`` each, then
    ``step=memmap-end count=N``): (type, start, pages) each, and why it
    cannot be judged ("" when it can): a map whose end line is missing or
    counts other lines is cut, and judging part of it would miss pages."""
    events = [e for e in events if getattr(e, "step", None) in ("memmap", "memmap-end")]
    found = [(int(e.get("type") or "0"), int(e.get("start") or "0", 16),
              int(e.get("pages") or "0", 16))
             for e in events if e.step == "memmap"]
    ends = [e for e in events if e.step == "memmap-end"]
    if not found and not ends:
        return [], ""
    if len(ends) != 1 or int(ends[0].get("count") or "-1") != len(found):
        said = ends[0].get("count") if len(ends) == 1 else "no count"
        return [], (f"the probe's memory map in the debug log is cut: {len(found)} "
                    f"descriptor line(s), the end line says {said}")
    return found, ""


def owners_in_log(events: Iterable[Any]) -> dict[str, str]:
    """Devices the firmware log says a test driver armed: the adversary's
    ``EBST adversary-nic state=armed pci=BB:DD.F`` line."""
    found = {}
    for event in events:
        if getattr(event, "name", None) == "adversary-nic" and event.get("state") == "armed":
            pci = event.get("pci") or ""
            bus, _, rest = pci.partition(":")
            found[f"{bus.lower()}:{rest.lower()}"] = "EbsAdversaryDxe"
    return found


def driven(report: DeviceReport) -> Iterator[Device]:
    """The devices the firmware made bus masters (the chipset's left out)."""
    return (d for d in report.devices if d.ever_master and d.qom not in NO_DMA_ENGINE)


def render_text(report: DeviceReport, ebs_images: Sequence[str] = ()) -> str:
    """The device side as text: one line per device the firmware drove, the
    markers, then W1/W2.

    :param ebs_images: images whose notification functions ran during the
        successful ExitBootServices() (from the firmware timeline): a device
        driver among them had an EBS handler.
    """
    out = [f"device trace: {report.path} ({report.events} events"
           + (f", QEMU {report.qemu}" if report.qemu else "") + ")"]
    if report.begin_line is not None:
        out.append(f"teardown: begin at line {report.begin_line}, end at line "
                   f"{report.end_line if report.end_line is not None else '(none)'}")
    for device in driven(report):
        handler = ""
        if device.canary is not None:
            handler += f"; canary read through it: {'yes' if device.canary else 'NO'}"
        if device.owner is not None:
            handler += f"; armed by {device.owner}"
        elif device.model is not None and ebs_images:
            ran = device.model.image in ebs_images
            handler += f"; EBS handler of {device.model.driver}: {'ran' if ran else 'none'}"
        state = device.quiesce_text or "ARMED"
        later = (f" ({device.dma_os} by the OS once it touched the device at line "
                 f"{device.touched_after})" if device.touched_after is not None else "")
        out.append(f"  {device.name}: DMA {device.dma_before} before, {len(device.dma_after)} "
                   f"after{later}; at the teardown: {state}{handler}")
    if report.page_states is not None:
        out.append(report.page_states.summary())
    for note in report.notes:
        out.append(f"note: {note}")
    held = report.held()
    if report.violations:
        out.append(f"FAIL: {len(report.violations)} device violation(s)")
        out += [f"  {v.check}: {v.detail}" for v in report.violations]
        if held:
            out.append(f"held: {held}")
    elif held:
        out.append(f"PASS: {held} held")
    return "\n".join(out) + "\n"
