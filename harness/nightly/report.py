"""The morning report: what changed since the last complete run of a plan.

A **regression** is a case that passed last time and fails now (a verdict
of the firmware), or one that passes but booted to the park more than the
plan's ``slower`` fraction above the median of its last ``window`` runs. A
case that ran last time and could not run now (``not-run``, ``error``: the
host, not the firmware) is a change the report names, not a regression.
Exit status: 0 no regression, 1 a regression, 3 when nothing could run.
"""

from __future__ import annotations

import html
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from harness.errors import EXIT_ENVIRONMENT, EXIT_OK, EXIT_VIOLATION
from harness.nightly.history import History, Result, Run

#: Runs shown in a case's pass/fail strip and sparkline.
STRIP = 14
#: Passing boots a case needs before "slower" is judged (TCG timings are noisy).
MIN_TIMES = 3

REGRESSIONS = ("newly failing", "slower")


@dataclass(frozen=True)
class Change:
    case_key: str
    kind: str       # newly failing / newly passing / newly not run / slower / new case / gone
    detail: str


@dataclass(frozen=True)
class MorningReport:
    plan: str
    run: Run
    results: dict[str, Result]
    previous: Run | None
    incomplete: tuple[tuple[Run, int], ...]     # runs since the previous, with cases recorded
    changes: tuple[Change, ...]
    history: dict[str, list[tuple[int, Result | None]]]   # case -> (run id, result) oldest first

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.changes if c.kind in REGRESSIONS]

    @property
    def nothing_ran(self) -> bool:
        return not any(r.status in ("pass", "fail") for r in self.results.values())

    @property
    def exit_status(self) -> int:
        if self.nothing_ran:
            return EXIT_ENVIRONMENT
        return EXIT_VIOLATION if self.regressions else EXIT_OK

    def counts(self) -> dict[str, int]:
        out = {"pass": 0, "fail": 0, "not-run": 0, "error": 0}
        for result in self.results.values():
            out[result.status] += 1
        return out


def morning_report(history: History, plan: str, run_id: int, slower: float,
                   window: int) -> MorningReport:
    runs = history.runs(plan)
    run = next(r for r in runs if r.id == run_id)
    results = history.results(run_id)
    earlier = [r for r in runs if r.id < run_id]
    previous = next((r for r in reversed(earlier) if r.state == "complete"), None)
    incomplete = tuple((r, len(history.results(r.id))) for r in earlier
                       if r.state != "complete" and (previous is None or r.id > previous.id))
    before = history.results(previous.id) if previous is not None else {}
    complete = [r for r in earlier if r.state == "complete"]
    past = {r.id: history.results(r.id) for r in complete[-max(window, STRIP):]}

    def past_results(run: int) -> dict[str, Result]:
        if run not in past:
            past[run] = history.results(run)
        return past[run]

    changes = []
    for key, now in results.items():
        # against the last complete run in which the case ran (else the previous one)
        was_run, was = next(((r.id, found) for r in reversed(complete)
                             if (found := past_results(r.id).get(key)) is not None
                             and found.status in ("pass", "fail")),
                            (previous.id if previous else 0, before.get(key)))
        times = [seconds for p in past.values() if key in p and p[key].status == "pass"
                 and (seconds := p[key].boot_seconds) is not None]
        changes += _changes(key, now, was, was_run, previous, times[-window:], slower)
    if previous is not None:
        changes += [Change(key, "gone", "in the previous run, not in this one")
                    for key in sorted(set(before) - set(results))]
    shown = [r.id for r in complete[-(STRIP - 1):]] + [run_id]
    strips = {key: [(rid, (past.get(rid) or {}).get(key) if rid != run_id else results[key])
                    for rid in shown] for key in results}
    order = {kind: n for n, kind in enumerate(("newly failing", "slower", "newly not run",
                                               "newly passing", "new case", "gone"))}
    changes.sort(key=lambda c: (order[c.kind], c.case_key))
    return MorningReport(plan, run, results, previous, incomplete, tuple(changes), strips)


def _changes(key: str, now: Result, was: Result | None, was_run: int, previous: Run | None,
             times: list[float], slower: float) -> list[Change]:
    """``was``: the case in the last complete run in which it ran (``was_run``)."""
    if previous is None:
        return []
    if was is None:
        return [Change(key, "new case", f"{now.status} (not in run #{previous.id})")]
    ran = ("pass", "fail")
    if was.status == "pass" and now.status == "fail":
        return [Change(key, "newly failing", f"{', '.join(now.violations) or 'failed'} "
                                             f"(passed in run #{was_run})")]
    if was.status == "fail" and now.status == "pass":
        return [Change(key, "newly passing", f"(failed in run #{was_run}: "
                                             f"{', '.join(was.violations)})")]
    if was.status in ran and now.status not in ran:
        return [Change(key, "newly not run", f"{now.status}: {now.reason} (it ran in run "
                                             f"#{was_run})")]
    if now.status == "pass" and now.boot_seconds is not None and len(times) >= MIN_TIMES:
        median = statistics.median(times)
        if now.boot_seconds > median * (1 + slower):
            return [Change(key, "slower", f"booted to the park in {now.boot_seconds:.2f} s, "
                                          f"median of its last {len(times)}: {median:.2f} s "
                                          f"(+{(now.boot_seconds / median - 1) * 100:.0f} %, "
                                          f"threshold {slower * 100:.0f} %)")]
    return []


def _when(stamp: float | None) -> str:
    return "?" if stamp is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp))


def render_text(report: MorningReport) -> str:
    run = report.run
    counts = report.counts()
    seconds = f" in {run.suite_seconds:.0f} s" if run.suite_seconds else ""
    out = [(f"nightly {report.plan}, run #{run.id} ({_when(run.started)}, {len(report.results)} "
           f"cases{seconds}): {counts['pass']} pass, {counts['fail']} fail, "
           f"{counts['not-run']} not run, {counts['error']} error")]
    if report.previous is None:
        out.append("no earlier complete run of this plan: nothing to compare with")
    else:
        out.append(f"compared with run #{report.previous.id} ({_when(report.previous.started)})")
    for run_before, recorded in report.incomplete:
        if run_before.state == "running":
            out.append(f"run #{run_before.id} ({_when(run_before.started)}, pid "
                       f"{run_before.pid} on {run_before.machine}) is still running, or ran on "
                       f"another machine: {recorded} case(s) recorded so far")
        else:
            out.append(f"run #{run_before.id} ({_when(run_before.started)}, pid "
                       f"{run_before.pid}) was incomplete: {run_before.state}, {recorded} "
                       "case(s) recorded before it stopped")
    regressions = report.regressions
    out.append(f"regressions: {len(regressions)}" if regressions else "regressions: none")
    out += [f"  {c.case_key}: {c.kind}: {c.detail}" for c in regressions]
    others = [c for c in report.changes if c.kind not in REGRESSIONS]
    if others:
        out.append("other changes:")
        out += [f"  {c.case_key}: {c.kind}: {c.detail}" for c in others]
    failing = [r for r in report.results.values() if r.status == "fail"]
    if failing:
        out.append("failing now:")
        out += [f"  {r.case_key}: {', '.join(r.violations)}  ({r.artifacts})" for r in failing]
    idle = [r for r in report.results.values() if r.status in ("not-run", "error")]
    if idle:
        out.append("not run:")
        out += [f"  {r.case_key}: {r.status}: {r.reason}" for r in idle]
    if report.nothing_ran:
        out.append("nothing could run")
    return "\n".join(out) + "\n"


_COLOURS = {"pass": "#2ca02c", "fail": "#d62728", "not-run": "#bbb", "error": "#ff7f0e"}

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; } td, th { padding: 3px 8px; text-align: left; }
tr:nth-child(even) { background: #f6f6f6; } .reg { color: #b00; font-weight: 600; }
code { font: 12px ui-monospace, monospace; }
"""


def render_html(report: MorningReport) -> str:
    """A self-contained page: the summary, the regressions, and per case its
    status strip over the last runs, a boot-time sparkline and its artifacts."""
    esc = html.escape
    parts = [(f"<!doctype html><meta charset=utf-8><title>nightly {esc(report.plan)} "
             f"#{report.run.id}</title><style>{_CSS}</style>"),
             "<h1>" + esc(render_text(report).splitlines()[0]) + "</h1>"]
    parts += [f"<p>{esc(line)}</p>" for line in render_text(report).splitlines()[1:3]]
    if report.regressions:
        parts.append("<h2 class=reg>Regressions</h2><ul>")
        parts += [f"<li class=reg><code>{esc(c.case_key)}</code>: {esc(c.kind)}: "
                  f"{esc(c.detail)}</li>" for c in report.regressions]
        parts.append("</ul>")
    parts.append("<h2>Cases</h2><table><tr><th>case</th><th>now</th><th>last runs</th>"
                 "<th>boot to park</th><th>detail</th><th>artifacts</th></tr>")
    changed = {c.case_key: c for c in report.changes}
    for key, result in sorted(report.results.items()):
        change = changed.get(key)
        detail = (f"<span class={'reg' if change.kind in REGRESSIONS else 'chg'}>"
                  f"{esc(change.kind)}: {esc(change.detail)}</span>" if change
                  else esc(result.reason or ", ".join(result.violations)))
        link = (f"<a href=\"{esc(Path(result.artifacts).as_uri())}\">artifacts</a>"
                if result.artifacts else "")
        parts.append(f"<tr><td><code>{esc(key)}</code></td>"
                     f"<td style=\"color:{_COLOURS[result.status]}\">{result.status}</td>"
                     f"<td>{_strip(report.history[key])}</td>"
                     f"<td>{_sparkline(report.history[key])}</td>"
                     f"<td>{detail}</td><td>{link}</td></tr>")
    parts.append("</table>")
    return "\n".join(parts) + "\n"


def _strip(runs: list[tuple[int, Result | None]]) -> str:
    cells = []
    for n, (run_id, result) in enumerate(runs):
        colour = "#fff" if result is None else _COLOURS[result.status]
        title = f"run #{run_id}: {'absent' if result is None else result.status}"
        cells.append(f'<rect x="{n * 12}" y="0" width="10" height="14" fill="{colour}" '
                     f'stroke="#999" stroke-width="0.5"><title>{title}</title></rect>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{len(runs) * 12}" height="14">'
            + "".join(cells) + "</svg>")


def _sparkline(runs: list[tuple[int, Result | None]]) -> str:
    points = [(n, r.boot_seconds) for n, (_, r) in enumerate(runs)
              if r is not None and r.boot_seconds is not None]
    if not points:
        return ""
    low = min(v for _, v in points)
    high = max(v for _, v in points)
    span = (high - low) or 1.0
    coords = " ".join(f"{n * 12 + 5},{16 - (v - low) / span * 14:.1f}" for n, v in points)
    last = points[-1][1]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{len(runs) * 12}" height="18">'
            f'<polyline points="{coords}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>'
            f"<title>{low:.2f} s .. {high:.2f} s</title></svg> {last:.2f} s")
