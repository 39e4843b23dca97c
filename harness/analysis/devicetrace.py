"""Reading QEMU's device trace: the header, every line against its event's
format.

The file the harness keeps is QEMU's trace (the ``log`` backend) behind one
header line, ``# ebs-harness device trace v1 qemu=VERSION events=PATH``.
:func:`parse_device_trace` reads every line against the format of its event
in the QEMU that wrote it (``PATH``, its ``trace-events-all``:
:mod:`harness.analysis.trace_events`; QEMU 7.2's, :data:`FORMATS`, when the
header names none), with each field read in the base its format prints it
in, and refuses (one :class:`DeviceTraceError`, exit 2) a file that is cut,
garbled, not a device trace, or whose lines have another QEMU version's
format. What the events mean is :mod:`harness.analysis.devices`'.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from harness.analysis import trace_events as qemu_events
from harness.errors import TraceFormatError

FORMAT_VERSION = 1
HEADER = "# ebs-harness device trace"
_HEADER_RE = re.compile(r"# ebs-harness device trace v(\d+) qemu=(\S+)(?: events=(\S+))?\Z")

#: fw_cfg keys the firmware's test build selects as markers (invalid keys:
#: QEMU traces the selection and changes nothing).
MARK_TEARDOWN_BEGIN = 0x3EB1
MARK_TEARDOWN_END = 0x3EB2
MARKERS = {MARK_TEARDOWN_BEGIN: "teardown-begin", MARK_TEARDOWN_END: "teardown-end"}

PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4

#: QEMU 7.2's format of each event the harness reads (``hw/*/trace-events``,
#: ``PRIx64`` written out), and the names of its fields.
FORMATS: dict[str, tuple[str, tuple[str, ...]]] = {
    "fw_cfg_select": ("%p key 0x%04x '%s', ret: %d", ("s", "key", "name", "ret")),
    "pci_cfg_write": ("%s %02x:%02x.%x @0x%x <- 0x%x",
                      ("dev", "bus", "slot", "func", "offs", "val")),
    "virtio_set_status": ("vdev %p val %u", ("vdev", "val")),
    "virtio_queue_notify": ("vdev %p n %d vq %p", ("vdev", "n", "vq")),
    "virtqueue_pop": ("vq %p elem %p in_num %u out_num %u", ("vq", "elem", "in", "out")),
    "virtqueue_flush": ("vq %p count %u", ("vq", "count")),
    "virtio_blk_handle_read": ("vdev %p req %p sector %lu nsectors %zu",
                               ("vdev", "req", "sector", "n")),
    "virtio_blk_handle_write": ("vdev %p req %p sector %lu nsectors %zu",
                                ("vdev", "req", "sector", "n")),
    "virtio_rng_pushed": ("rng %p: %zd bytes pushed", ("vdev", "len")),
    "pci_nvme_mmio_start_success": ("setting controller enable bit succeeded", ()),
    "pci_nvme_mmio_stopped": ("cleared controller enable bit", ()),
    "pci_nvme_mmio_shutdown_set": ("shutdown bit set", ()),
    "pci_nvme_admin_cmd": ("cid %u sqid %u opc 0x%x opname '%s'",
                           ("cid", "sqid", "opc", "opname")),
    "pci_nvme_io_cmd": ("cid %u nsid 0x%x sqid %u opc 0x%x opname '%s'",
                        ("cid", "nsid", "sqid", "opc", "opname")),
    "pci_nvme_map_prp": ("trans_len %lu len %u prp1 0x%lx prp2 0x%lx num_prps %d",
                         ("trans_len", "len", "prp1", "prp2", "num")),
    "pci_nvme_enqueue_req_completion": ("cid %u cqid %u dw0 0x%x dw1 0x%x status 0x%x",
                                        ("cid", "cqid", "dw0", "dw1", "status")),
    "usb_xhci_run": ("", ()),
    "usb_xhci_stop": ("", ()),
    "usb_xhci_reset": ("=== RESET ===", ()),
    "usb_xhci_fetch_trb": ("addr 0x%016lx, %s, p 0x%016lx, s 0x%08x, c 0x%08x",
                           ("addr", "trb", "p", "s", "c")),
    "usb_xhci_queue_event": ("v %d, idx %d, %s, %s, p 0x%016lx, s 0x%08x, c 0x%08x",
                             ("v", "idx", "trb", "evt", "p", "s", "c")),
    "ahci_port_write": ("ahci(%p)[%d]: port write [reg:%s] @ 0x%x: 0x%08x",
                        ("s", "port", "reg", "offset", "val")),
    "ahci_mem_write_host": ("ahci(%p) write%u [reg:%s] @ 0x%lx: 0x%016lx",
                            ("s", "size", "reg", "addr", "val")),
    "ahci_reset": ("ahci(%p): HBA reset", ("s",)),
    "ahci_start_dma": ("ahci(%p)[%d]: start dma", ("s", "port")),
    "ahci_dma_rw_buf": ("ahci(%p)[%d] len=0x%x", ("s", "port", "len")),
    "ahci_cmd_done": ("ahci(%p)[%d]: cmd done", ("s", "port")),
    "e1000e_core_ctrl_sw_reset": ("Doing SW reset", ()),
    "e1000e_rx_set_rctl": ("RCTL = 0x%x", ("rctl",)),
    "e1000e_rx_written_to_guest": ("Received packet written to guest (ICR causes %u)",
                                   ("causes",)),
    "e1000e_tx_descr": ("%p : %x %x", ("addr", "lower", "upper")),
    "e1000e_rx_descr": ("Next RX descriptor: ring #%d, PA: 0x%lx, length: %u",
                        ("ring", "pa", "len")),
    "pvscsi_on_cmd_arrived": ("command %s arrived", ("cmd",)),
    "pvscsi_process_req_descr": ("SCSI cmd 0x%x, ctx: 0x%lx", ("cmd", "ctx")),
    "pvscsi_cmp_ring_put": ("got completion descriptor 0x%lx", ("addr",)),
    "mptsas_reset": ("dev %p ", ("s",)),
    "mptsas_process_message": ("dev %p cmd %d context 0x%08x", ("s", "cmd", "ctx")),
    "mptsas_process_scsi_io_request": ("dev %p dev %d:%d:%d length %lu",
                                       ("s", "bus", "target", "lun", "len")),
    "lsi_reset": ("Reset", ()),
    "lsi_do_dma": ("DMA addr=0x%lx len=%d", ("addr", "len")),
}
#: The page-state events of the harness's own QEMU (``qemu-patches/``: an
#: emulated SEV-SNP; :mod:`harness.analysis.pagestates`), which no other
#: QEMU has: read with these formats, whatever QEMU the trace names.
SNP_FORMATS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sev_snp_launch_update": ("gpa 0x%lx len 0x%lx %s", ("gpa", "len", "type")),
    "sev_snp_page_state": ("gpa 0x%lx pages %lu %s by %s", ("gpa", "pages", "state", "how")),
    "sev_snp_pvalidate": ("gpa 0x%lx pages %lu validate %d", ("gpa", "pages", "validate")),
    "sev_snp_pvalidate_no_update": ("gpa 0x%lx addr 0x%lx validate %d",
                                    ("gpa", "addr", "validate")),
    "sev_snp_not_validated": ("addr 0x%lx gpa 0x%lx access %d", ("addr", "gpa", "access")),
}

_CONVERSION_RE = re.compile(r"%(?:0?\d+)?(?:l|z|ll|h|hh)?([dixupsc%])")
_CONVERSIONS = {"d": r"-?[0-9]+", "i": r"-?[0-9]+", "u": r"[0-9]+", "x": r"[0-9a-f]+",
                "p": r"0x[0-9a-f]+|\(nil\)", "s": r"[^\n]*?", "c": r"[^\n]"}


def _format_regex(fmt: str) -> re.Pattern[str]:
    """A printf format of QEMU's trace-events as a full-match regex."""
    out: list[str] = []
    pos = 0
    for match in _CONVERSION_RE.finditer(fmt):
        out.append(re.escape(fmt[pos:match.start()]))
        kind = match.group(1)
        out.append("%" if kind == "%" else f"({_CONVERSIONS[kind]})")
        pos = match.end()
    out.append(re.escape(fmt[pos:]))
    return re.compile("".join(out) + r"\Z")


#: Each field's base: 16 for ``%x`` and ``%p``, 10 for the decimal ones.
#: Every event the harness reads.
KNOWN = {**FORMATS, **SNP_FORMATS}
_BASES = {name: dict(zip(fields, (16 if kind in "xp" else 10
                                  for kind in _CONVERSION_RE.findall(fmt) if kind != "%"),
                         strict=True))
          for name, (fmt, fields) in KNOWN.items()}
# The log backend's line: "NAME ARGS", with -msg timestamp=on "PID@SEC.USEC:NAME ARGS".
_LINE_RE = re.compile(r"(?:[0-9]+@[0-9]+\.[0-9]+:)?([a-z0-9_]+) (.*)\Z")
_MAX_LINE = 4096


class DeviceTraceError(TraceFormatError):
    """A device trace that cannot be read: cut, garbled, or from another
    QEMU version (exit 2)."""


def header(qemu_version: str, events: Path | None = None) -> str:
    """The kept trace's first line; ``events``: the QEMU's ``trace-events-all``."""
    named = f" events={events}" if events is not None and not re.search(r"\s", str(events)) \
        else ""
    return f"{HEADER} v{FORMAT_VERSION} qemu={qemu_version or 'unknown'}{named}\n"


# ------------------------------------------------------------- parsing


@dataclass(frozen=True)
class DeviceEvent:
    """One line of the device trace.

    :param line: its line number in the file (the header is line 1).
    """

    line: int
    name: str
    fields: dict[str, str]
    #: each field's base in the format the line was read with
    bases: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)

    def text(self) -> str:
        return f"{self.name} " + " ".join(f"{k}={v}" for k, v in self.fields.items())

    def num(self, key: str) -> int:
        """A numeric field, in the base its format prints it in."""
        return int(self.fields[key], self.bases.get(key) or _BASES[self.name][key])


@dataclass(frozen=True)
class DeviceTrace:
    path: Path
    qemu: str | None
    events: tuple[DeviceEvent, ...]
    notes: tuple[str, ...] = ()


def parse_device_trace(path: Path | str) -> DeviceTrace:
    """Read a device trace whole, or raise :class:`DeviceTraceError`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DeviceTraceError(path, None, f"cannot read: {exc.strerror}") from exc
    if not data:
        raise DeviceTraceError(path, None, "empty: not a device trace")
    lines = data.split(b"\n")
    if lines[-1]:
        raise DeviceTraceError(path, len(lines), "cut: the last line has no newline (the "
                               "trace ends in the middle of a line)")
    lines.pop()
    qemu: str | None = None
    events_file: Path | None = None
    formats: Mapping[str, str] | None = None
    events: list[DeviceEvent] = []
    for number, raw in enumerate(lines, 1):
        if len(raw) > _MAX_LINE:
            raise DeviceTraceError(path, number, f"line longer than {_MAX_LINE} bytes: "
                                   "garbled, not a device trace")
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise DeviceTraceError(path, number, "non-ASCII bytes: garbled, not a device "
                                   "trace") from None
        if not text.isprintable():
            raise DeviceTraceError(path, number, "non-printable characters: garbled, not a "
                                   "device trace")
        if number == 1 and text.startswith("#"):
            match = _HEADER_RE.match(text)
            if match is None or int(match.group(1)) != FORMAT_VERSION:
                raise DeviceTraceError(path, 1, f"header {text[:60]!r}: not a v{FORMAT_VERSION} "
                                       "device trace of this harness")
            qemu = match.group(2)
            events_file = Path(match.group(3)) if match.group(3) else None
            continue
        if formats is None:
            formats, notes = qemu_events.formats_for_trace(qemu, events_file, FORMATS)
        events.append(_parse_line(path, number, text, qemu, formats))
    if formats is None:
        formats, notes = qemu_events.formats_for_trace(qemu, events_file, FORMATS)
    return DeviceTrace(path, qemu, tuple(events), notes)


def preload(events_file: Path | None) -> None:
    """Read and compile the formats a trace naming ``events_file`` is read
    with, for the traces of this process (a boot does it while the guest
    runs)."""
    formats, _ = qemu_events.formats_for_trace(None, events_file, FORMATS)
    for name in FORMATS:
        if name in formats:
            _compiled(formats[name])
    for fmt, _ in SNP_FORMATS.values():
        _compiled(fmt)


def _parse_line(path: Path, number: int, text: str, qemu: str | None,
                formats: Mapping[str, str]) -> DeviceEvent:
    match = _LINE_RE.match(text) or _LINE_RE.match(text + " ")
    if match is None:
        raise DeviceTraceError(path, number, f"not a QEMU trace line: {text[:60]!r}")
    name, args = match.groups()
    if name in SNP_FORMATS:
        fmt = SNP_FORMATS[name][0]
    elif name in FORMATS and name in formats:
        fmt = formats[name]
    else:
        raise DeviceTraceError(path, number, f"event {name[:40]!r} is none the harness "
                               "enables: garbled, or not a device trace")
    regex, kinds = _compiled(fmt)
    values = regex.match(args)
    if values is None or len(kinds) != len(KNOWN[name][1]):
        made = f" (the trace says qemu={qemu})" if qemu else ""
        raise DeviceTraceError(path, number, f"{name} does not have QEMU {qemu or '7.2'}'s "
                               f"format{made}: garbled, or from another QEMU version: "
                               f"{args[:60]!r}")
    fields = KNOWN[name][1]
    return DeviceEvent(number, name, dict(zip(fields, values.groups(), strict=True)),
                       {f: 16 if kind in "xp" else 10 for f, kind in zip(fields, kinds,
                                                                          strict=True)})


@functools.lru_cache(maxsize=256)
def _compiled(fmt: str) -> tuple[re.Pattern[str], tuple[str, ...]]:
    """A format's regex and the kinds of its fields (``d``, ``x``, ``p``...)."""
    return _format_regex(fmt), tuple(k for k in _CONVERSION_RE.findall(fmt) if k != "%")
