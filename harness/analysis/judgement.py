"""One boot's evidence judged together: the debug log, the dump, QEMU's
device trace.

A :class:`Judgement` is what ``boot``, ``demo``, ``analyze-log`` (with a
device trace) and the nightly report: the violations of every check in
registry order, the findings about other drivers, the notes, each check's
outcome (:mod:`~harness.analysis.checks`: held, failed, skipped with its
reason, or not judged because that evidence was not taken), and the text and
HTML renderings of all of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness.analysis import checks, report
from harness.analysis.checks import Evidence, Outcome, Violation
from harness.analysis.devices import DeviceReport
from harness.analysis.devices import render_text as render_devices
from harness.analysis.dump import DumpReport
from harness.analysis.symbols import Symbolizer
from harness.analysis.verdicts import LogReport

#: Why the dump checks have no outcome when no dump was analysed.
NO_DUMP = "no memory dump was taken"
#: Why W1 and W2 have no outcome when no device trace was read.
NO_DEVICE_TRACE = "no device trace was kept"


@dataclass(frozen=True)
class Judgement:
    """The verdicts of one boot, or of the files of one.

    :param log: the debug log's report (V1..V4, C1..C3).
    :param dump: D1..D3, where a dump was analysed.
    :param devices: W1, W2, where a device trace was read.
    :param device_notes: why there is no device report, or what limits it.
    """

    log: LogReport
    symbolizer: Symbolizer = field(repr=False)
    dump: DumpReport | None = None
    devices: DeviceReport | None = None
    device_notes: tuple[str, ...] = ()

    @property
    def violations(self) -> list[Violation]:
        found = list(self.log.violations)
        if self.dump is not None:
            found += self.dump.violations
        if self.devices is not None:
            found += self.devices.violations
        return found

    @property
    def passed(self) -> bool:
        return not self.violations

    def failed_checks(self) -> set[str]:
        return {v.check for v in self.violations}

    @property
    def outcomes(self) -> dict[str, Outcome]:
        """Every check of the registry, with its outcome in this judgement."""
        found: dict[str, Outcome] = dict(self.log.outcomes)
        found.update(self.dump.outcomes if self.dump is not None else
                     checks.not_judged(checks.of(Evidence.DUMP), NO_DUMP))
        found.update(self.devices.outcomes if self.devices is not None else
                     checks.not_judged((*checks.of(Evidence.DEVICE_TRACE),
                                        *checks.of(Evidence.PAGE_STATES)),
                                       self.device_notes[0] if self.device_notes
                                       else NO_DEVICE_TRACE))
        return found

    def checks_json(self) -> dict[str, Any]:
        return checks.states_json(self.outcomes)

    def log_json(self) -> dict[str, Any]:
        """What ``analyze-log --json`` prints of the log and device trace."""
        data: dict[str, Any] = {
            "verdict": "pass" if self.passed else "fail",
            "violations": [v.as_json() for v in self.violations],
            "ebs_calls": [{"enter_seq": a.enter.seq, "exit_seq": a.exit.seq,
                           "succeeded": a.succeeded,
                           "teardowns": [t.begin.seq for t in a.teardowns]}
                          for a in self.log.timeline.attempts],
            "findings": [f.as_json() for f in self.log.findings],
            "notes": list(self.log.anomalies),
            "checks": self.checks_json(),
        }
        if self.devices is not None:
            data["devices"] = self.devices.as_json()
        return data

    def render_text(self) -> str:
        """The timeline and the log's verdicts, then the dump's and the
        devices', each under its own heading line."""
        out = report.render_text(self.log, self.symbolizer)
        if self.dump is not None:
            out += "\n" + report.render_dump_text(self.dump)
        if self.devices is not None:
            out += "\n" + render_devices(self.devices,
                                         report.ebs_images(self.log, self.symbolizer))
        return out

    def render_html(self) -> str:
        return report.render_html(self.log, self.symbolizer, self.devices)


def summary_checks(failed: set[str]) -> list[str]:
    """Failed check ids in registry order (the demo's and the CLI's summary)."""
    return sorted(failed, key=checks.order)
