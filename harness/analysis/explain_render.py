"""``explain-log``'s output: the JSON with its stable keys
(``docs/explain-log.md``), the text, and the HTML page with the load map."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from harness.analysis import symbols
from harness.analysis.explain import Explanation, confidential, platform_facts
from harness.analysis.explain_facts import FACT_KEYS
from harness.analysis.explain_reader import PHASES, Crash, LoadedImage

# ------------------------------------------------------------ rendering


def _hex(value: int | None) -> str:
    return "" if value is None else f"{value:#x}"


def _crash_json(crash: Crash) -> dict[str, Any]:
    return {"kind": crash.kind, "line": crash.line, "summary": crash.summary,
            "rip": _hex(crash.rip), "where": crash.where, "source": crash.source,
            "module_path": crash.module_path, "module": crash.module,
            "functions": list(crash.functions), "function": crash.function,
            "expression": crash.expression, "last_image": crash.last_image,
            "error_code": crash.error_code, "cause": crash.cause, "during": crash.during,
            "registers": {k: _hex(v) for k, v in crash.registers.items()}}


def to_json(exp: Explanation) -> dict[str, Any]:
    """The explanation as JSON. ``firmware``, ``facts``, ``confidential``,
    ``end`` and ``crash`` have the stable keys of docs/explain-log.md (every
    key always there, null when the log does not say) for scripts and the
    nightly; the other keys mirror the text."""
    boot = exp.boot
    cc = confidential(boot)
    last_crash = boot.crashes[-1] if boot.crashes else None
    milestone = exp.end.milestone
    return {
        "log": exp.path, "lines": exp.lines, "crlf": exp.crlf, "ansi": exp.ansi,
        "identity": list(exp.identity),
        "firmware": dict(exp.firmware),
        "facts": {key: ({"value": boot.values[key][0], "line": boot.values[key][1]}
                        if key in boot.values else {"value": None, "line": None})
                  for key in FACT_KEYS},
        "confidential": {"kind": cc.kind,
                         "evidence": [{"says": what, "line": line} for what, line in cc.evidence]},
        "platform": [{"fact": f, "value": v, "line": n} for f, v, n in platform_facts(boot)],
        "phases": [{"phase": phase, "line": boot.phases[phase]} for phase in PHASES
                   if phase in boot.phases],
        "images": [{"order": i.order, "name": i.name, "file": i.file, "base": _hex(i.base),
                    "entry": _hex(i.entry), "line": i.line, "phase": i.phase,
                    "start_failed": i.start_failed} for i in boot.images],
        "images_not_listed": boot.images_dropped,
        "boot_options": [{"line": a.line, "option": a.option, "description": a.description,
                          "device_path": a.device_path, "image": a.image,
                          "outcome": a.outcome} for a in boot.options],
        "crashes": [_crash_json(c) for c in boot.crashes],
        "crash": None if last_crash is None else
        dict(_crash_json(last_crash), ended_log=exp.end.kind == "crash"),
        "earlier_runs": list(exp.earlier_boots),
        "end": {"kind": exp.end.kind, "phase": exp.end.phase, "summary": exp.end.summary,
                "cut_mid_line": exp.end.cut_mid_line,
                "milestone": None if milestone is None else
                {"line": milestone.line, "kind": milestone.kind, "text": milestone.text},
                "last_firmware_line": exp.end.last_firmware[0] or None,
                "last_firmware_text": exp.end.last_firmware[1] or None,
                "os_lines": boot.os_lines,
                "last_image": None if boot.last_image is None else
                {"file": boot.last_image.file, "line": boot.last_image.line},
                "last_lines": list(exp.end.last_lines)},
        "notes": list(exp.notes),
        "traced": exp.traced,
    }


def render_text(exp: Explanation, *, all_images: bool = True) -> str:
    boot = exp.boot
    out = [f"{exp.path}: {exp.lines} lines" + (", CRLF" if exp.crlf else "")
           + (", with console escape sequences" if exp.ansi else "")]
    out.append("")
    out.append("Firmware:")
    out += [f"  {line}" for line in exp.identity] or ["  not stated in this log"]
    facts = platform_facts(boot)
    if facts:
        out.append("Platform:")
        out += [f"  {fact:<11} {value}" + (f"  (line {line})" if line else "")
                for fact, value, line in facts]
    out.append("Phases: " + (", ".join(f"{p} from line {boot.phases[p]}" for p in PHASES
                                        if p in boot.phases) or "none recognized"))
    for earlier in exp.earlier_boots:
        out.append(f"  earlier run, {earlier}")
    failed = [i for i in boot.images if i.start_failed]
    out.append("")
    out.append(f"Images: {len(boot.images) + boot.images_dropped} loaded, {len(failed)} failed "
               "to start")
    if all_images:
        out.append(f"  {'#':>4} {'phase':<5} {'base':>12} {'entry':>12} {'line':>7}  image")
        for image in boot.images:
            status = f"  start failed: {image.start_failed}" if image.start_failed else ""
            out.append(f"  {image.order:>4} {image.phase:<5} {image.base:>#12x} "
                       f"{image.entry:>#12x} {image.line:>7}  {image.file}{status}")
    else:
        out += [f"  #{i.order} {i.file} (line {i.line}): start failed: {i.start_failed}"
                for i in failed]
    if boot.options:
        out.append("")
        out.append("Boot options tried:")
        for attempt in boot.options:
            option = f"{attempt.option} " if attempt.option else ""
            path = f" from {attempt.device_path}" if attempt.device_path else ""
            out.append(f"  line {attempt.line}: {option}\"{attempt.description}\"{path}: "
                       f"{attempt.outcome}")
    out.append("")
    if boot.crashes:
        out.append("Crashes:")
        for crash in boot.crashes:
            out += ["  " + line for line in _crash_lines(crash)]
    else:
        out.append("Crashes: no CPU exception dump and no ASSERT in the log")
    out.append("")
    out.append("End: " + exp.end.summary)
    out += [f"  | {line}" for line in exp.end.last_lines]
    for note in exp.notes:
        out.append(f"Note: {note}")
    return "\n".join(out) + "\n"


def _crash_lines(crash: Crash) -> list[str]:
    if crash.kind == "assert":
        module = f" in {crash.module}" if crash.module else ""
        lines = [f"line {crash.line}: ASSERT{module} at {crash.source}: {crash.expression}"]
        if crash.during:
            lines.append(f"  {crash.during}")
        elif crash.last_image and not crash.module:
            lines.append(f"  the last image loaded before it: {crash.last_image}")
        return lines
    lines = [f"line {crash.line}: CPU exception {crash.summary}"
             + (f", error code {crash.error_code}" if crash.error_code else "")]
    if crash.rip is not None:
        lines.append(f"  RIP {crash.rip:#x} = {crash.where or 'not in any image of the log'}"
                     + (f"  ({crash.source})" if crash.source else ""))
    if len(crash.functions) > 1:
        lines.append("  in " + ", inlined into ".join(crash.functions))
    if "CR2" in crash.registers:
        lines.append(f"  CR2 (the faulting address) {crash.registers['CR2']:#x}")
    if crash.module_path:
        lines.append(f"  image as the log names it: {crash.module_path}")
    if crash.cause:
        lines.append(f"  cause: {crash.cause}")
    if crash.during:
        lines.append(f"  {crash.during}")
    return lines


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
table { border-collapse: collapse; } td, th { padding: 2px 8px; text-align: left; }
tr:nth-child(even) { background: #f4f4f4; } .failed { color: #b00; }
.crash { border-left: 4px solid #b00; padding-left: 8px; }
pre { background: #f6f6f6; padding: 8px; overflow-x: auto; }
code, pre, td.mono { font-family: ui-monospace, monospace; font-size: 12px; }
"""


def render_html(exp: Explanation) -> str:
    """One self-contained page: facts, the load map drawn, crashes, the end."""
    esc = html.escape
    boot = exp.boot
    parts = [f"<!doctype html><meta charset=utf-8><title>{esc(exp.path)}</title>",
             f"<style>{_CSS}</style><h1>{esc(exp.path)}</h1>",
             f"<p>{exp.lines} lines. {esc(exp.end.summary)}</p>", "<h2>Firmware</h2>"]
    parts.append("<ul>" + "".join(f"<li>{esc(line)}</li>" for line in exp.identity) + "</ul>"
                 if exp.identity else "<p>Not stated in this log.</p>")
    parts.append("<h2>Platform</h2>")
    facts = platform_facts(boot)
    parts.append("<table>" + "".join(
        f"<tr><th>{esc(f)}</th><td>{esc(v)}</td><td>{'' if n is None else n}</td></tr>"
        for f, v, n in facts) + "</table>" if facts else "<p>Not stated in this log.</p>")
    parts += ["<h2>Load map</h2>", _svg_map(exp)]
    if boot.images:
        parts.append("<table><tr><th>#</th><th>phase</th><th>image</th><th>base</th>"
                     "<th>entry</th><th>line</th><th>start</th></tr>")
        for image in boot.images:
            failed = (f"<td class=failed>{esc(image.start_failed)}</td>" if image.start_failed
                      else "<td></td>")
            parts.append(f"<tr><td>{image.order}</td><td>{image.phase}</td>"
                         f"<td>{esc(image.file)}</td><td class=mono>{image.base:#x}</td>"
                         f"<td class=mono>{image.entry:#x}</td><td>{image.line}</td>{failed}"
                         "</tr>")
        parts.append("</table>")
    if boot.options:
        parts.append("<h2>Boot options tried</h2><table>")
        parts += [f"<tr><td>{a.line}</td><td>{esc(a.option)}</td><td>{esc(a.description)}</td>"
                  f"<td class=mono>{esc(a.device_path)}</td><td>{esc(a.outcome)}</td></tr>"
                  for a in boot.options]
        parts.append("</table>")
    parts.append("<h2>Crashes</h2>")
    if not boot.crashes:
        parts.append("<p>No CPU exception dump and no ASSERT in the log.</p>")
    for crash in boot.crashes:
        regs = " ".join(f"{k}={v:#x}" for k, v in crash.registers.items())
        parts.append("<div class=crash>" + "<br>".join(esc(line) for line in _crash_lines(crash))
                     + (f"<pre>{esc(regs)}</pre>" if regs else "") + "</div>")
    parts.append("<h2>End of the log</h2><pre>"
                 + esc("\n".join(exp.end.last_lines)) + "</pre>")
    parts += [f"<p>Note: {esc(note)}</p>" for note in exp.notes]
    return "\n".join(parts) + "\n"


#: Address gaps wider than this are drawn as a fixed break in the load map.
MAP_GAP = 16 << 20


def _svg_map(exp: Explanation, width: int = 1000) -> str:
    """The images of each phase as bars at their addresses (a gap of more
    than :data:`MAP_GAP` is drawn as a break, so the flash and RAM copies of
    PEI both show), failed ones red, the crashes' RIPs as red marks."""
    boot = exp.boot
    placed = list(boot.images)
    for crash in boot.crashes:
        if crash.image_base is not None and not any(i.base == crash.image_base for i in placed):
            placed.append(LoadedImage(0, Path(crash.module_path).stem or "image",
                                      crash.image_base, crash.image_entry or crash.image_base,
                                      crash.line, "dump"))
    rows = [p for p in ("PEI", "DXE", "dump") if any(i.phase == p for i in placed)]
    if not rows:
        return "<p>No image loads in the log.</p>"
    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + 60}" '
            f'height="{len(rows) * 80 + 10}" role="img" aria-label="load map">')]
    for row, phase in enumerate(rows):
        images = sorted((i for i in placed if i.phase == phase), key=lambda i: i.base)
        sizes = {id(i): _size(exp.symbolizer, i, images) for i in images}
        where = _Axis([(i.base, i.base + sizes[id(i)]) for i in images], width)
        y = row * 80 + 10
        out.append(f'<text x="0" y="{y + 25}" font-size="12">{phase}</text>')
        for image in images:
            x = where.x(image.base)
            w = max(1.5, where.x(image.base + sizes[id(image)]) - x)
            colour = "#d66" if image.start_failed else "#69c"
            out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="40" '
                       f'fill="{colour}" stroke="#fff" stroke-width="0.5"><title>'
                       f'#{image.order} {html.escape(image.file)} {image.base:#x}'
                       f'</title></rect>')
        for x, label in where.labels():
            out.append(f'<text x="{x:.1f}" y="{y + 54}" font-size="10">{label}</text>')
        for crash in boot.crashes:
            if crash.rip is not None and where.holds(crash.rip):
                x = where.x(crash.rip)
                name = html.escape(crash.function or hex(crash.rip))
                out.append(f'<line x1="{x:.1f}" y1="{y - 5}" x2="{x:.1f}" y2="{y + 46}" '
                           f'stroke="#b00" stroke-width="2"><title>{html.escape(crash.summary)}'
                           f' at {crash.rip:#x} {name}</title></line>')
                out.append(f'<text x="{x + 3:.1f}" y="{y + 68}" font-size="11" fill="#b00">'
                           f'{html.escape(crash.summary)} in {name}</text>')
    out.append("</svg>")
    return "\n".join(out)


class _Axis:
    """Addresses to x: the ranges' clusters side by side, each as wide as its
    span, with a fixed break between clusters."""

    BREAK = 24.0

    def __init__(self, ranges: list[tuple[int, int]], width: int) -> None:
        clusters: list[list[int]] = []
        for low, high in sorted(ranges):
            if clusters and low - clusters[-1][1] <= MAP_GAP:
                clusters[-1][1] = max(clusters[-1][1], high)
            else:
                clusters.append([low, high])
        spans = sum(high - low for low, high in clusters) or 1
        scale = (width - self.BREAK * (len(clusters) - 1)) / spans
        self._segments: list[tuple[int, int, float]] = []
        x = 40.0
        for low, high in clusters:
            self._segments.append((low, high, x))
            x += (high - low) * scale + self.BREAK
        self._scale = scale

    def holds(self, address: int) -> bool:
        return any(low <= address < high for low, high, _ in self._segments)

    def x(self, address: int) -> float:
        for low, high, start in self._segments:
            if address <= high:
                return start + (max(address, low) - low) * self._scale
        low, high, start = self._segments[-1]
        return start + (high - low) * self._scale

    def labels(self) -> list[tuple[float, str]]:
        return [(start, f"{low:#x}") for low, _, start in self._segments]


def _size(sym: symbols.Symbolizer, image: LoadedImage, images: list[LoadedImage]) -> int:
    module = sym.module(image.name)
    if module is not None and module.image_size:
        return module.image_size
    # Without symbols: up to the next image, unless that is far (another region).
    gap = min((i.base for i in images if i.base > image.base), default=0) - image.base
    return gap if 0 < gap <= 0x100000 else 0x10000
