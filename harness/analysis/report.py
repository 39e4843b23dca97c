"""The EBS timeline for people: a text table and a self-contained HTML page.

Both show the same rows: sequence number, log line, TPL, the event with
notification functions symbolized (``Image!function``) and indented by
nesting, IOMMU events folded into counts, the teardown marked, and the
violations last. The HTML page draws the timeline as an inline SVG picture
(handlers as bars on the sequence axis, the teardown as a band, violations
in red) with no external resources, so it opens from an artifacts directory
or a CI attachment as it is. Given QEMU's device trace, the page adds the
device lane (:func:`render_device_svg`) and counts W1/W2 in its verdict.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from harness.analysis.checks import Violation
from harness.analysis.devices import DeviceReport, driven
from harness.analysis.dump import DumpReport
from harness.analysis.events import (
    IOMMU_EVENTS,
    DeviceAccess,
    EbsCallback,
    MemCall,
    NotifyBegin,
    NotifyEnd,
    TeardownBegin,
    TeardownEnd,
    TeardownUnmap,
    TplChange,
    TraceEvent,
    Version,
)
from harness.analysis.symbols import Symbolizer
from harness.analysis.verdicts import LogReport

LOG = logging.getLogger(__name__)

_FOLD_NAMES = {"iommu-map": "map", "iommu-unmap": "unmap", "iommu-alloc": "alloc",
               "iommu-free": "free"}


def _fold_kind(event: TraceEvent) -> str | None:
    """How consecutive events of a kind are folded into one row, or None."""
    if isinstance(event, TeardownUnmap):
        return "teardown"
    if isinstance(event, IOMMU_EVENTS):
        return "iommu"
    if isinstance(event, TplChange):
        return "tpl"
    return None


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the timeline.

    :param kind: ``event``, ``fold`` (folded IOMMU events), ``teardown``.
    :param bad: a violation names one of its sequence numbers.
    """

    first: int
    last: int
    line: int | None
    tpl: int | None
    depth: int
    text: str
    kind: str
    bad: bool

    @property
    def seq_label(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


def _describe(event: TraceEvent, sym: Symbolizer) -> str:
    if isinstance(event, NotifyBegin):
        return f"begin {sym.symbolize(event.fn)}"
    if isinstance(event, NotifyEnd):
        return f"end   {sym.symbolize(event.fn)}"
    if isinstance(event, Version):
        return f"version v={event.v} {event.module}"
    if isinstance(event, MemCall):
        return (f"mem-call {event.op} {event.size:#x} bytes at {event.addr:#x} from "
                f"{sym.symbolize(event.caller)}")
    if isinstance(event, TplChange):
        return f"tpl-change {event.op} {event.tpl} from {sym.symbolize(event.caller)}"
    if isinstance(event, EbsCallback) and event.get("fn"):
        return f"ebs-callback {sym.symbolize(int(event.get('fn') or '0', 16))}"
    return event.describe()


def timeline_rows(report: LogReport, sym: Symbolizer) -> list[Row]:
    """The rows of the timeline of ``report`` (kept for the last report, which
    the text and the HTML both render)."""
    global _last_rows
    if _last_rows is not None and _last_rows[0] is report and _last_rows[1] is sym:
        return _last_rows[2]
    rows = _timeline_rows(report, sym)
    _last_rows = (report, sym, rows)
    return rows


_last_rows: tuple[LogReport, Symbolizer, list[Row]] | None = None


def _timeline_rows(report: LogReport, sym: Symbolizer) -> list[Row]:
    bad = {s for v in report.violations for s in v.seqs}
    events = report.timeline.trace.events
    rows: list[Row] = []
    fold: list[TraceEvent] = []
    depth = 0
    tpls: list[int] = []
    in_teardown = False

    def flush() -> None:
        if not fold:
            return
        counts: dict[str, int] = {}
        for e in fold:
            word = e.op if isinstance(e, TplChange) else _FOLD_NAMES.get(e.name, e.name)
            counts[word] = counts.get(word, 0) + 1
        kind_of_fold = _fold_kind(fold[0])
        if kind_of_fold == "teardown":
            text = f"{len(fold)} teardown-unmap"
            kind = "teardown"
        else:
            what = "tpl-change" if kind_of_fold == "tpl" else "iommu"
            text = f"{what}: " + ", ".join(f"{n} {k}" for k, n in counts.items())
            kind = "fold"
        rows.append(Row(fold[0].seq, fold[-1].seq, fold[0].line, tpls[-1] if tpls else None,
                        depth, text, kind, any(e.seq in bad for e in fold)))
        fold.clear()

    for event in events:
        kind_of_fold = _fold_kind(event)
        if kind_of_fold is not None and (kind_of_fold == "teardown" or event.seq not in bad):
            if fold and _fold_kind(fold[0]) != kind_of_fold:
                flush()
            fold.append(event)
            continue
        flush()
        if isinstance(event, NotifyEnd):
            depth = max(depth - 1, 0)
            tpl = tpls.pop() if tpls else None
        else:
            tpl = tpls[-1] if tpls else None
        if isinstance(event, NotifyBegin):
            tpl = event.tpl
        kind = "event"
        if isinstance(event, TeardownBegin):
            in_teardown = True
        if in_teardown or isinstance(event, TeardownEnd):
            kind = "teardown"
        rows.append(Row(event.seq, event.seq, event.line, tpl, depth,
                        _describe(event, sym), kind, event.seq in bad))
        if isinstance(event, TeardownEnd):
            in_teardown = False
        if isinstance(event, NotifyBegin):
            depth += 1
            tpls.append(event.tpl)
    flush()
    return rows


def render_text(report: LogReport, sym: Symbolizer) -> str:
    trace = report.timeline.trace
    cfg = trace.config
    out = [(f"trace: {trace.path} ({trace.lines} lines, {len(trace.events)} EBST lines, "
            f"{len(report.timeline.attempts)} ExitBootServices call(s))")]
    if cfg is not None:
        out.append(f"iommu: scheme={cfg.scheme} emulation={cfg.emulation} "
                   f"sharedbit={cfg.sharedbit} maphead={cfg.maphead:#x}")
    out.append("")
    out.append(f"{'seq':>9} {'line':>6} {'tpl':>3}  event")
    for row in timeline_rows(report, sym):
        mark = "!!" if row.bad else ("==" if row.kind == "teardown" else "  ")
        tpl = "" if row.tpl is None else str(row.tpl)
        line = "" if row.line is None else str(row.line)
        out.append(f"{row.seq_label:>9} {line:>6} {tpl:>3}{mark} {'  ' * row.depth}{row.text}")
    out.append("")
    for note in report.anomalies:
        out.append(f"note: {note}")
    for finding in report.findings:
        out.append(f"finding ({finding.check}, another driver, not a failed verdict): "
                   f"{finding.detail}")
    out += _verdict_lines(report.violations, f"{report.held()} all held")
    return "\n".join(out) + "\n"


def render_dump_text(report: DumpReport) -> str:
    out = [f"dump: {report.path}",
           f"cr3: {report.cr3:#x}" if report.cr3 is not None else "cr3: (none)",
           f"mapping list head: {report.maphead:#x}" if report.maphead is not None
           else "mapping list head: (unknown)"]
    if report.live is not None:
        out.append(f"live mappings: {len(report.live.records)}")
        for r in report.live.records:
            out.append(f"  MAP_INFO {r.addr:#x} {r.op_name} host {r.crypted:#x} "
                       f"dev {r.plain:#x} pages {r.pages}")
    if report.shared is not None:
        out.append(f"shared ranges: {len(report.shared)}")
        for s in report.shared[:32]:
            out.append(f"  paddr {s.paddr:#x} vaddr {s.vaddr:#x} {s.size:#x} bytes")
    for rng, why in report.by_design:
        out.append(f"shared by design: paddr {rng.paddr:#x} {rng.size:#x} bytes: {why}")
    out.append(f"canary hits ({report.scope} scanned): {len(report.canary_hits)}")
    for h in report.canary_hits[:32]:
        out.append(f"  paddr {h.paddr:#x}")
    for note in report.notes:
        out.append(f"note: {note}")
    out += _verdict_lines(report.violations, "D1, D2, D3 held (skipped checks are noted above)")
    return "\n".join(out) + "\n"


def _verdict_lines(violations: Sequence[Violation], held: str) -> list[str]:
    """``FAIL: N violation(s)`` and one line each, or ``PASS: held``."""
    if not violations:
        return [f"PASS: {held}"]
    return [f"FAIL: {len(violations)} violation(s)",
            *(f"  {v.check}: {v.detail}" for v in violations)]


# ------------------------------------------------------------------- HTML


def ebs_section_html(text: str) -> str:
    """The EBS timeline's text as a section of another page (``explain-log``'s)."""
    return "<h2>ExitBootServices trace</h2><pre>" + html.escape(text) + "</pre>\n"

_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
.pass { color: #176f2c; font-weight: bold; } .fail { color: #c00; font-weight: bold; }
table { border-collapse: collapse; font-family: monospace; font-size: 12px; }
td { padding: 1px 8px; white-space: pre; }
tr.teardown td { background: #fff1d6; } tr.bad td { background: #ffd9d9; color: #a00; }
tr.fold td { color: #777; }
ul.violations li { color: #c00; font-family: monospace; }
svg text { font-family: monospace; font-size: 11px; }
"""


#: The plot's width in a picture, right of the labels.
_PLOT_WIDTH = 750
#: Pixels per character of the pictures' 11 px monospace labels: more than
#: any monospace face's advance (0.6 em, 6.6 px), so no label is cut.
_LABEL_CHAR = 7


def _label_width(labels: Sequence[str]) -> int:
    """The label column's width: the longest label whole, and at least 330."""
    return max(330, 16 + _LABEL_CHAR * max(map(len, labels), default=0))


def render_svg(report: LogReport, sym: Symbolizer) -> str:
    timeline = report.timeline
    events = timeline.trace.events
    bad = {s for v in report.violations for s in v.seqs}
    start = max(timeline.attempts[0].enter.seq - 3, 1)
    stop = events[-1].seq + 1
    dispatches = [d for a in timeline.attempts for d in a.dispatches]
    labels = [f"{'> ' * d.depth}{sym.symbolize(d.begin.fn)} tpl {d.begin.tpl}"
              for d in dispatches]
    label_w = _label_width(labels)
    width, row_h = label_w + _PLOT_WIDTH + 20, 18
    top = 40
    lanes = len(dispatches) + 2
    height = top + lanes * row_h + 40
    plot_w = width - label_w - 20

    def x(seq: float) -> float:
        return label_w + (seq - start) / max(stop - start, 1) * plot_w

    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
              f'viewBox="0 0 {width} {height}" role="img" aria-label="EBS timeline">'),
             f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fcfcfc"/>']
    # seq axis
    axis_y = height - 25
    parts.append(f'<line x1="{label_w}" y1="{axis_y}" x2="{width - 20}" y2="{axis_y}" '
                 f'stroke="#444"/>')
    step = max(1, (stop - start) // 12)
    for s in range(start, stop + 1, step):
        parts.append(f'<line x1="{x(s):.1f}" y1="{axis_y}" x2="{x(s):.1f}" y2="{axis_y + 4}" '
                     f'stroke="#444"/><text x="{x(s):.1f}" y="{axis_y + 16}" '
                     f'text-anchor="middle">{s}</text>')
    parts.append(f'<text x="{label_w - 20}" y="{axis_y + 16}" text-anchor="end">seq</text>')
    # teardown bands
    for td in timeline.teardowns:
        x0, x1 = x(td.begin.seq), x(td.last_seq + 1)
        parts.append(f'<rect x="{x0:.1f}" y="{top - 14}" width="{max(x1 - x0, 3):.1f}" '
                     f'height="{axis_y - top + 14}" fill="#ffb84d" fill-opacity="0.35" '
                     f'stroke="#e08a00"><title>teardown seq {td.begin.seq}..{td.last_seq} '
                     f'scheme={html.escape(td.begin.scheme)}</title></rect>')
        # the word inside the picture, however near its right edge the band is
        word_x = min(x0 + 2, width - 2 - _LABEL_CHAR * len("teardown"))
        parts.append(f'<text x="{word_x:.1f}" y="{top - 18}" fill="#b06000">teardown</text>')
    # EBS enter / exit lines
    for a in timeline.attempts:
        for ev, colour in ((a.enter, "#2a5db0"), (a.exit, "#2a5db0" if a.succeeded else "#888")):
            parts.append(f'<line x1="{x(ev.seq):.1f}" y1="{top - 14}" x2="{x(ev.seq):.1f}" '
                         f'y2="{axis_y}" stroke="{colour}" stroke-dasharray="4 3"/>')
            anchor, dx = ("end", -3) if ev is a.exit else ("start", 3)
            parts.append(f'<text x="{x(ev.seq) + dx:.1f}" y="{top - 2}" fill="{colour}" '
                         f'text-anchor="{anchor}">{html.escape(ev.name)} {ev.seq}</text>')
    # handlers
    for i, (d, label) in enumerate(zip(dispatches, labels, strict=True)):
        y = top + (i + 1) * row_h
        name = sym.symbolize(d.begin.fn)
        is_bad = d.begin.seq in bad
        fill = "#d62728" if is_bad else ("#6a8fd0" if d.begin.tpl <= 8 else "#4cae7a")
        parts.append(f'<text x="{label_w - 8}" y="{y + 12}" text-anchor="end" '
                     f'fill="{"#c00" if is_bad else "#222"}">{html.escape(label)}</text>')
        x0, x1 = x(d.begin.seq), x(d.end.seq + 1)
        parts.append(f'<rect x="{x0:.1f}" y="{y + 2}" width="{max(x1 - x0, 3):.1f}" '
                     f'height="{row_h - 4}" rx="3" fill="{fill}"><title>'
                     f'{html.escape(name)} tpl {d.begin.tpl} seq {d.begin.seq}..{d.end.seq}'
                     f'</title></rect>')
    # IOMMU and device events lane
    y = top + (len(dispatches) + 1) * row_h
    parts.append(f'<text x="{label_w - 8}" y="{y + 12}" text-anchor="end">iommu / device</text>')
    for mark in events:
        if mark.seq < start:
            continue
        if isinstance(mark, (DeviceAccess, TeardownUnmap, *IOMMU_EVENTS)):
            colour = "#d62728" if mark.seq in bad else (
                "#e08a00" if isinstance(mark, TeardownUnmap) else "#555")
            cx = x(mark.seq + 0.5)
            if isinstance(mark, DeviceAccess):
                parts.append(f'<path d="M{cx:.1f} {y + 2} l6 7 l-6 7 l-6 -7 z" fill="{colour}">'
                             f'<title>{html.escape(mark.describe())}</title></path>')
            else:
                parts.append(f'<rect x="{cx - 1.5:.1f}" y="{y + 3}" width="3" '
                             f'height="{row_h - 6}" fill="{colour}"><title>'
                             f'seq {mark.seq} {html.escape(mark.describe())}</title></rect>')
    parts.append("</svg>")
    return "\n".join(parts)


def ebs_images(report: LogReport, sym: Symbolizer) -> tuple[str, ...]:
    """The images whose notification functions ran during a successful
    ExitBootServices() call: the drivers that had an EBS handler."""
    names: list[str] = []
    for attempt in report.timeline.attempts:
        if not attempt.succeeded:
            continue
        for dispatch in attempt.dispatches:
            image = sym.image_for(dispatch.begin.fn)
            if image is not None and image.name.removesuffix(".efi") not in names:
                names.append(image.name.removesuffix(".efi"))
    return tuple(names)


_LANE_COLOURS = {"bm": "#c9d8ef", "armed": "#6a8fd0", "dma": "#555", "late": "#d62728",
                 "quiesce": "#176f2c"}


def render_device_svg(devices: DeviceReport, report: LogReport,
                      first: int = 1) -> str:
    """The device lane: one row per device the firmware made a bus master,
    on the device trace's line axis from line ``first`` to its end: bus
    mastering (light), armed engines (blue), quiesce events (green), DMA
    (grey, red after the teardown began), and the teardown between its two
    markers, the same teardown the firmware lane above shows."""
    rows = list(driven(devices))
    label_w = _label_width([device.name for device in rows])
    width, row_h, top = label_w + _PLOT_WIDTH + 20, 18, 40
    height = top + (len(rows) + 1) * row_h + 40
    stop = max(devices.events + 2, first + 1)
    plot_w = width - label_w - 20

    def x(line: float) -> float:
        return label_w + (max(line, first) - first) / (stop - first) * plot_w

    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
              f'viewBox="0 0 {width} {height}" role="img" aria-label="device lane">'),
             f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fcfcfc"/>']
    axis_y = height - 25
    parts.append(f'<line x1="{label_w}" y1="{axis_y}" x2="{width - 20}" y2="{axis_y}" '
                 f'stroke="#444"/><text x="{label_w - 20}" y="{axis_y + 16}" '
                 f'text-anchor="end">device trace line</text>')
    for s in range(first, stop + 1, max(1, (stop - first) // 10)):
        parts.append(f'<text x="{x(s):.1f}" y="{axis_y + 16}" text-anchor="middle">{s}</text>')
    if devices.begin_line is not None:
        end = devices.end_line if devices.end_line is not None else devices.begin_line
        firmware = list(report.timeline.teardowns)
        seqs = (f" (firmware seq {firmware[0].begin.seq}..{firmware[0].last_seq})"
                if firmware else "")
        x0, x1 = x(devices.begin_line), x(end + 1)
        parts.append(f'<rect x="{x0:.1f}" y="{top - 14}" width="{max(x1 - x0, 3):.1f}" '
                     f'height="{axis_y - top + 14}" fill="#ffb84d" fill-opacity="0.35" '
                     f'stroke="#e08a00"><title>teardown: device trace lines '
                     f'{devices.begin_line}..{end}{seqs}</title></rect>'
                     f'<text x="{x0 - 2:.1f}" y="{top - 18}" fill="#b06000" '
                     f'text-anchor="end">teardown{seqs}</text>')
    for i, device in enumerate(rows):
        y = top + i * row_h
        late = {e.line for e in device.dma_after}
        parts.append(f'<text x="{label_w - 8}" y="{y + 12}" text-anchor="end" fill="'
                     f'{"#c00" if late or device.quiesce_text is None else "#222"}">'
                     f'{html.escape(device.name)}</text>')
        open_at: dict[str, int] = {}
        spans: list[tuple[str, int, int]] = []
        for mark in device.marks:
            if mark.kind in ("bm-on", "arm"):
                open_at.setdefault("bm" if mark.kind == "bm-on" else "armed", mark.line)
            elif mark.kind == "bm-off" and "bm" in open_at:
                spans.append(("bm", open_at.pop("bm"), mark.line))
            elif mark.kind == "quiesce" and "armed" in open_at:
                spans.append(("armed", open_at.pop("armed"), mark.line))
        spans += [(kind, line, stop) for kind, line in open_at.items()]
        for kind, start, end in sorted(spans, key=lambda span: span[0] != "bm"):
            inset = 2 if kind == "bm" else 5
            parts.append(f'<rect x="{x(start):.1f}" y="{y + inset}" '
                         f'width="{max(x(end) - x(start), 2):.1f}" height="{row_h - 2 * inset}" '
                         f'fill="{_LANE_COLOURS[kind]}"><title>{kind} lines {start}..{end}'
                         f'</title></rect>')
        for mark in device.marks:
            if (mark.kind == "dma" or mark.kind == "quiesce") and mark.line >= first:
                colour = _LANE_COLOURS["late" if mark.line in late else mark.kind]
                parts.append(f'<rect x="{x(mark.line) - 1:.1f}" y="{y + 1}" width="2" '
                             f'height="{row_h - 2}" fill="{colour}"><title>line {mark.line} '
                             f'{html.escape(mark.text)}</title></rect>')
        for event in [e for e in device.dma_after if e.line >= first][:200]:
            parts.append(f'<rect x="{x(event.line) - 1:.1f}" y="{y + 1}" width="2" '
                         f'height="{row_h - 2}" fill="{_LANE_COLOURS["late"]}"><title>line '
                         f'{event.line} {html.escape(event.name)} after the teardown began'
                         f'</title></rect>')
    parts.append("</svg>")
    return "\n".join(parts)


#: The zoomed device lane starts this many trace lines before the teardown.
_ZOOM_LINES = 60


def _device_section(devices: DeviceReport | None, report: LogReport) -> str:
    if devices is None:
        return ""
    items = "".join(f"<li>{html.escape(v.check)}: {html.escape(v.detail)}</li>"
                    for v in devices.violations)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in devices.notes)
    held = devices.held()
    verdict = (f'<p class="fail">FAIL: {len(devices.violations)} device violation(s)</p>'
               if devices.violations else
               f'<p class="pass">PASS: {html.escape(held)} held</p>' if held else "")
    if devices.page_states is not None:
        verdict += f"\n<p>{html.escape(devices.page_states.summary())}</p>"
    zoom = ""
    if devices.begin_line is not None and devices.begin_line > _ZOOM_LINES:
        zoom = (f"<p>Around the teardown, from device trace line "
                f"{devices.begin_line - _ZOOM_LINES}:</p>\n"
                + render_device_svg(devices, report, devices.begin_line - _ZOOM_LINES))
    return (f"<h2>Devices (QEMU's trace: {html.escape(str(devices.path))})</h2>\n{verdict}\n"
            f"{render_device_svg(devices, report)}\n{zoom}\n"
            f'<ul class="violations">{items}</ul>'
            + (f"<ul>{notes}</ul>" if notes else ""))


def render_html(report: LogReport, sym: Symbolizer,
                devices: DeviceReport | None = None) -> str:
    trace = report.timeline.trace
    every = (*report.violations, *(devices.violations if devices is not None else ()))
    verdict = (f'<p class="pass">PASS: {report.held()} held</p>'
               if not every else
               f'<p class="fail">FAIL: {len(every)} violation(s)</p>')
    rows = []
    for row in timeline_rows(report, sym):
        cls = "bad" if row.bad else row.kind
        rows.append(f'<tr class="{cls}"><td>{row.seq_label}</td><td>{row.line or ""}</td>'
                    f'<td>{"" if row.tpl is None else row.tpl}</td>'
                    f'<td>{html.escape("  " * row.depth + row.text)}</td></tr>')
    violations = "".join(f"<li>{html.escape(v.check)}: {html.escape(v.detail)}</li>"
                         for v in every)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.anomalies)
    findings = "".join(f"<li>{html.escape(f.check)}: {html.escape(f.detail)}</li>"
                       for f in report.findings)
    cfg = trace.config
    cfg_text = (f"scheme={cfg.scheme} emulation={cfg.emulation} sharedbit={cfg.sharedbit} "
                f"maphead={cfg.maphead:#x}" if cfg else "no iommu-config line")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>EBS timeline: {html.escape(str(trace.path))}</title>
<style>{_CSS}</style></head>
<body>
<h1>ExitBootServices timeline</h1>
<p>{html.escape(str(trace.path))}: {trace.lines} log lines, {len(trace.events)} trace
events, {len(report.timeline.attempts)} ExitBootServices call(s); {html.escape(cfg_text)}</p>
{verdict}
{render_svg(report, sym)}
{_device_section(devices, report)}
<h2>Violations</h2>
<ul class="violations">{violations or "<li style='color:#176f2c'>none</li>"}</ul>
{f"<h2>Findings about other drivers (not failed verdicts)</h2><ul>{findings}</ul>"
   if findings else ""}
{f"<h2>Notes</h2><ul>{notes}</ul>" if notes else ""}
<h2>Events</h2>
<table><tr><th>seq</th><th>line</th><th>tpl</th><th>event</th></tr>
{"".join(rows)}
</table>
</body></html>
"""
