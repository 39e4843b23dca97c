"""The debug log's verdicts: one function per check, V1..V6 and C1..C3.

Each function takes the :class:`LogEvidence` (the timeline and the
symbolizer) and returns what it :class:`Judged`: its violations, and for C2
the *findings* (another driver's allocation after the memory map was
terminated: a fact about that driver, reported but not a failed verdict),
and notes on what it could not judge. The functions register themselves
with :func:`judges` under their check's id in
:data:`~harness.analysis.checks.CHECKS`; :func:`judge_log` runs them all in
the registry's order. V5 and C1..C3 read the DXE core's contract lines
(``memmap-terminated``, ``ints-off``): a trace without them (an older
build) leaves them not judged.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from harness.analysis import checks
from harness.analysis.checks import Evidence, Outcome, Violation
from harness.analysis.debuglog import Trace, parse_log
from harness.analysis.events import (
    IOMMU_EVENTS,
    DeviceAccess,
    EbsCallback,
    EbsCallbackEnd,
    IntsOff,
    IommuAlloc,
    IommuMap,
    IommuUnmap,
    MemCall,
    MemmapTerminated,
    NotifyBegin,
    TeardownUnmap,
    TplChange,
    TraceEvent,
)
from harness.analysis.memdump import PAGE
from harness.analysis.symbols import Symbolizer
from harness.analysis.timeline import EbsAttempt, Timeline, build_timeline, live_at, live_mappings

#: TPL_HIGH_LEVEL: restoring any TPL below it enables interrupts.
TPL_HIGH_LEVEL = 31

CORE = "the DXE core (outside any notification function)"

CONTRACT_MISSING = ("C1..C3 and V5 not judged: the trace has no memmap-terminated or "
                    "ints-off line (a firmware without the contract trace)")


@dataclass(frozen=True)
class LogEvidence:
    """What the log checks read: the timeline, and names for its addresses."""

    timeline: Timeline
    sym: Symbolizer

    @property
    def events(self) -> tuple[TraceEvent, ...]:
        return self.timeline.trace.events

    @cached_property
    def iommu_in_use(self) -> bool:
        """The IOMMU protocol was installed: an ``iommu-config`` line or
        IOMMU events (without either, a plain guest without emulation)."""
        return self.timeline.trace.config is not None or any(
            isinstance(e, IOMMU_EVENTS) for e in self.events)

    @cached_property
    def contract_traced(self) -> bool:
        """The core wrote the lines C1..C3 read."""
        return any(isinstance(e, (MemmapTerminated, IntsOff)) for e in self.events)

    def hooks(self, attempt: EbsAttempt) -> list[tuple[EbsCallback, int]]:
        """The IOMMU member's calls in ``attempt``: its ``ebs-callback`` line
        and the seq where it returned (``ebs-callback-end``, else the
        attempt's end)."""
        spans: list[tuple[EbsCallback, int]] = []
        for event in self.span(attempt):
            if isinstance(event, EbsCallback):
                spans.append((event, attempt.exit.seq))
            elif isinstance(event, EbsCallbackEnd) and spans:
                spans[-1] = (spans[-1][0], event.seq)
        return spans

    def succeeded(self) -> Iterator[tuple[EbsAttempt, list[tuple[EbsCallback, int]]]]:
        """Each successful ExitBootServices() call, with the IOMMU member's
        calls in it (what the contract checks judge)."""
        for attempt in self.timeline.attempts:
            if attempt.succeeded:
                yield attempt, self.hooks(attempt)

    def span(self, attempt: EbsAttempt) -> tuple[TraceEvent, ...]:
        """The events of ``attempt``, ``ebs-enter`` to its exit."""
        return self.events[attempt.enter.seq - 1:attempt.exit.seq]

    def handler(self, begin: NotifyBegin) -> str:
        return f"{self.sym.symbolize(begin.fn)} (tpl {begin.tpl}, notify-begin seq {begin.seq})"

    def context(self, seq: int, hooks: list[tuple[EbsCallback, int]]) -> tuple[str, str, bool]:
        """Where the event at ``seq`` ran, its culprit (``Image!function`` or
        ``DxeCore``), and whether that is the system under test (the core or
        the IOMMU driver) rather than another driver."""
        sym = self.sym
        for hook in hooks:
            if hook[0].seq < seq < hook[1]:
                fn = hook[0].get("fn")
                culprit = sym.symbolize(int(fn, 16)) if fn else "IoMmuDxe"
                return _iommu_member(hook, sym), culprit, True
        running = self.timeline.dispatch_at(seq)
        if running is None:
            return CORE, "DxeCore", True
        image = sym.image_for(running.begin.fn)
        owner_is_iommu = image is not None and image.name == "IoMmuDxe"
        return (f"handler {self.handler(running.begin)}", sym.symbolize(running.begin.fn),
                owner_is_iommu)


def _iommu_member(span: tuple[EbsCallback, int], sym: Symbolizer) -> str:
    fn = span[0].get("fn")
    name = sym.symbolize(int(fn, 16)) if fn else "(address not traced)"
    return f"the IOMMU ExitBootServices() member {name} (ebs-callback seq {span[0].seq})"


def _span(attempt: EbsAttempt) -> str:
    return (f"EBS attempt {attempt.index} (ebs-enter seq {attempt.enter.seq} .. "
            f"{attempt.exit.name} seq {attempt.exit.seq})")


@dataclass(frozen=True)
class Judged:
    """What one check found in one log.

    :param findings: facts about other drivers under this check, reported
        but not failed verdicts (C2).
    :param notes: what it could not judge, and why; with no violation, the
        check counts as skipped for the first of them.
    """

    violations: tuple[Violation, ...] = ()
    findings: tuple[Violation, ...] = ()
    notes: tuple[str, ...] = ()


LogCheck = Callable[[LogEvidence], Judged]
#: Check id -> its function, filled by :func:`judges`.
LOG_CHECKS: dict[str, LogCheck] = {}


def judges(check: str) -> Callable[[LogCheck], LogCheck]:
    """Register the function that judges ``check`` on a debug log."""
    if checks.CHECKS[check].evidence not in (Evidence.LOG, Evidence.CONTRACT):
        raise ValueError(f"{check} does not read the debug log")

    def register(function: LogCheck) -> LogCheck:
        if check in LOG_CHECKS:
            raise ValueError(f"{check} is judged twice")
        LOG_CHECKS[check] = function
        return function
    return register


# --------------------------------------------------------------- V1..V4


@judges("V1")
def order(ev: LogEvidence) -> Judged:
    """Every notification function of an ExitBootServices() call returned
    before its teardown began (``legacy``'s own host handler excepted)."""
    found: list[Violation] = []
    for attempt in ev.timeline.attempts:
        for td in attempt.teardowns:
            tb = td.begin.seq
            host = td.host if td.begin.scheme == "legacy" else None
            for d in attempt.dispatches:
                if d is host:
                    continue
                if d.begin.seq < tb < d.end.seq:
                    found.append(Violation(
                        "V1", f"handler {ev.handler(d.begin)} was still running at "
                              f"teardown-begin seq {tb} (it returned at seq {d.end.seq}) in "
                              f"{_span(attempt)}", (d.begin.seq, tb, d.end.seq)))
                elif tb < d.begin.seq:
                    found.append(Violation(
                        "V1", f"handler {ev.handler(d.begin)} began after teardown-begin "
                              f"seq {tb} in {_span(attempt)}", (tb, d.begin.seq)))
    return Judged(tuple(found))


@judges("V2")
def once(ev: LogEvidence) -> Judged:
    """One teardown per successful ExitBootServices() (none where the IOMMU
    protocol was never installed), none in a failed one or outside any."""
    found = [Violation("V2", f"teardown-begin at seq {td.begin.seq} outside any "
                             f"ExitBootServices call", (td.begin.seq,))
             for td in ev.timeline.stray_teardowns]
    for attempt in ev.timeline.attempts:
        span = _span(attempt)
        if not attempt.succeeded:
            for td in attempt.teardowns:
                found.append(Violation("V2", f"failed {span} ran a teardown at seq "
                                             f"{td.begin.seq}; a failed EBS must not tear "
                                             f"down", (td.begin.seq, attempt.exit.seq)))
        elif not attempt.teardowns and not ev.iommu_in_use:
            pass  # no IOMMU protocol in this boot: nothing to tear down
        elif len(attempt.teardowns) != 1:
            seqs = tuple(t.begin.seq for t in attempt.teardowns)
            at = f" (teardown-begin at seq {', '.join(map(str, seqs))})" if seqs else ""
            found.append(Violation("V2", f"successful {span} ran {len(attempt.teardowns)} "
                                         f"teardowns{at}; expected exactly 1",
                                   (attempt.enter.seq, attempt.exit.seq) + seqs))
    return Judged(tuple(found))


@judges("V3")
def quiet(ev: LogEvidence) -> Judged:
    """No IOMMU event and no device access from the first teardown-begin to
    the end of the log, but the teardown's own Unmap() calls."""
    all_td = ev.timeline.teardowns
    if not all_td:
        return Judged()
    found: list[Violation] = []
    first = all_td[0]
    own = {u.seq for t in all_td for u in t.unmaps}
    # Teardown spans are disjoint and sorted: the one holding a seq is the
    # last that begins before it.
    span_begins = [t.begin.seq for t in all_td]
    span_ends = [t.last_seq for t in all_td]
    for event in ev.events[first.begin.seq:]:
        if not isinstance(event, IOMMU_EVENTS + (DeviceAccess,)) or event.seq in own:
            continue
        held = bisect.bisect_left(span_begins, event.seq) - 1
        inside = ((span_begins[held], span_ends[held])
                  if held >= 0 and event.seq <= span_ends[held] else None)
        running = ev.timeline.dispatch_at(event.seq)
        if inside is not None and (running is None or running.begin.seq < inside[0]):
            continue  # the teardown's own Unmap() calls
        where = f" in handler {ev.handler(running.begin)}" if running is not None else ""
        what = (f"device-access by {event.module} kind={event.kind}"
                if isinstance(event, DeviceAccess) else event.name)
        addr = f" map={event.get('map')}" if event.get("map") else ""
        found.append(Violation("V3", f"{what}{addr} at seq {event.seq}{where}, after "
                                     f"teardown-begin seq {first.begin.seq}",
                               (first.begin.seq, event.seq)))
    return Judged(tuple(found))


@judges("V4")
def empty(ev: LogEvidence) -> Judged:
    """No mapping live at each teardown's end (by its own count and by the
    log's replay) nor at each successful return."""
    attempts = ev.timeline.attempts
    # The live mappings where V4 looks, in one replay of the log.
    checkpoints = [td.end.seq for a in attempts for td in a.teardowns if td.end is not None]
    checkpoints += [a.exit.seq for a in attempts if a.succeeded]
    replays = live_at(ev.events, checkpoints)
    found: list[Violation] = []
    for attempt in attempts:
        for td in attempt.teardowns:
            if td.end is None:
                found.append(Violation("V4", f"teardown begun at seq {td.begin.seq} never "
                                             f"ended (no teardown-end before "
                                             f"{attempt.exit.name} seq {attempt.exit.seq})",
                                       (td.begin.seq,)))
                continue
            replay = replays[td.end.seq]
            if td.end.live != 0:
                found.append(Violation("V4", f"teardown-end seq {td.end.seq} reports live="
                                             f"{td.end.live} mapping(s) left",
                                       (td.begin.seq, td.end.seq)))
            elif replay:
                found.append(Violation("V4", f"teardown-end seq {td.end.seq} reports live=0 "
                                             f"but the log leaves {len(replay)} mapping(s) "
                                             f"live: " + _list_maps(replay), (td.end.seq,)))
        if attempt.succeeded:
            replay = replays[attempt.exit.seq]
            if replay:
                found.append(Violation(
                    "V4", f"{len(replay)} mapping(s) still live at ebs-return seq "
                          f"{attempt.exit.seq} of {_span(attempt)}: " + _list_maps(replay),
                    (attempt.exit.seq,) + tuple(m.seq for m in replay.values())))
    return Judged(tuple(found))


@judges("V5")
def late_maps_refused(ev: LogEvidence) -> Judged:
    """No IOMMU Map() or AllocateBuffer() succeeds once the memory map is
    terminated: the pages it would allocate (its MAP_INFO, bounce pages, a
    buffer) are free in the memory map the OS loader holds, and the OS
    reuses them while the device does DMA into them. A refused one
    (``iommu-late``) holds; a successful one is named with the allocation
    the IOMMU driver made for it."""
    terminated = next((e for e in ev.events if isinstance(e, MemmapTerminated)), None)
    if terminated is None:
        return Judged()
    hooks = [hook for _, spans in ev.succeeded() for hook in spans]
    found: list[Violation] = []
    for event in ev.events[terminated.seq:]:
        if not isinstance(event, (IommuMap, IommuAlloc)):
            continue
        where, _, _ = ev.context(event.seq, hooks)
        allocations = _allocations_before(ev, event.seq)
        how = "; ".join(f"{a.op} of {a.size:#x} bytes from {ev.sym.symbolize(a.caller)} at "
                        f"seq {a.seq}" for a in allocations)
        culprit = ev.sym.symbolize(allocations[0].caller) if allocations else "IoMmuDxe"
        what = (f"iommu-map map={event.map:#x} op={event.op} host={event.host:#x} "
                f"pages={event.pages}" if isinstance(event, IommuMap)
                else f"iommu-alloc host={event.host:#x} pages={event.pages}")
        found.append(Violation(
            "V5", f"{what} at seq {event.seq} in {where} succeeded after the memory map was "
                  f"terminated (memmap-terminated seq {terminated.seq})"
                  + (f", allocating: {how}" if how else "") + "; it must be refused",
            (terminated.seq, *(a.seq for a in allocations), event.seq), culprit))
    return Judged(tuple(found))


def _allocations_before(ev: LogEvidence, seq: int) -> list[MemCall]:
    """The allocations traced right before the event at ``seq`` (the IOMMU
    driver's line comes after what it allocated for the call), back to the
    previous event that is neither an allocation nor a TPL change."""
    found: list[MemCall] = []
    for event in reversed(ev.events[:seq - 1]):
        if isinstance(event, MemCall):
            if event.op.startswith("allocate"):
                found.append(event)
        elif not isinstance(event, TplChange):
            break
    return found[::-1]


@judges("V6")
def own_bounce_pages(ev: LogEvidence) -> Judged:
    """No mapping is given bounce pages a live mapping still holds: two
    transfers would share one buffer, and each device would read or write
    the other's data. A mapping whose device address is its host address
    (a common buffer, mapped in place) has no bounce pages."""
    found: list[Violation] = []
    live: dict[int, IommuMap] = {}
    for event in ev.events:
        if isinstance(event, IommuMap):
            if event.dev != event.host:
                for other in live.values():
                    if other.dev != other.host and _share_pages(event, other):
                        found.append(Violation(
                            "V6", f"iommu-map seq {event.seq} (map={event.map:#x}) was given "
                                  f"bounce pages {_pages(event)} while map={other.map:#x} "
                                  f"(iommu-map seq {other.seq}) still holds "
                                  f"{_pages(other)}", (other.seq, event.seq)))
            live[event.map] = event
        elif isinstance(event, (IommuUnmap, TeardownUnmap)):
            live.pop(event.map, None)
    return Judged(tuple(found))


def _share_pages(one: IommuMap, other: IommuMap) -> bool:
    return one.dev < other.dev + other.pages * PAGE and other.dev < one.dev + one.pages * PAGE


def _pages(mapping: IommuMap) -> str:
    return f"{mapping.dev:#x}..{mapping.dev + mapping.pages * PAGE - 1:#x}"


def _list_maps(live: dict[int, IommuMap]) -> str:
    parts = [f"map={m.map:#x} op={m.op} pages={m.pages} (iommu-map seq {m.seq})"
             for m in list(live.values())[:8]]
    if len(live) > 8:
        parts.append(f"and {len(live) - 8} more")
    return ", ".join(parts)


# --------------------------------------------------------------- C1..C3


@judges("C1")
def interrupts_off(ev: LogEvidence) -> Judged:
    """Interrupts are disabled when ExitBootServices() returns success;
    names the RestoreTPL() that turned them back on, its caller and where
    it ran."""
    found: list[Violation] = []
    notes: list[str] = []
    for attempt, hooks in ev.succeeded():
        ints = attempt.exit.get("ints")
        if ints is None:
            notes.append(f"C1 not judged for ebs-return seq {attempt.exit.seq}: no ints= field")
            continue
        if ints == "0":
            continue
        span_events = ev.span(attempt)
        off = [e for e in span_events if isinstance(e, IntsOff)]
        after = off[-1].seq if off else attempt.enter.seq
        enabling = [e for e in span_events if isinstance(e, TplChange)
                    and e.op == "restore" and e.tpl < TPL_HIGH_LEVEL and e.seq > after]
        how, who = "", ""
        if enabling:
            last = enabling[-1]
            where, who, _ = ev.context(last.seq, hooks)
            how = (f": RestoreTPL({last.tpl}) from {ev.sym.symbolize(last.caller)} in "
                   f"{where} turned them back on at seq {last.seq}")
        found.append(Violation(
            "C1", f"interrupts were enabled when ExitBootServices() returned success "
                  f"(ebs-return seq {attempt.exit.seq} ints={ints}){how}",
            (attempt.exit.seq,) + tuple(e.seq for e in enabling[-1:]), who))
    return Judged(tuple(found), notes=tuple(notes))


@judges("C2")
def no_allocation(ev: LogEvidence) -> Judged:
    """Nothing allocated or freed once the memory map is terminated: by the
    core or the IOMMU driver a violation, by another driver a finding."""
    found: list[Violation] = []
    findings: list[Violation] = []
    for attempt, hooks in ev.succeeded():
        for event in ev.span(attempt):
            if not isinstance(event, MemCall):
                continue
            where, culprit, under_test = ev.context(event.seq, hooks)
            size = f" of {event.size:#x} bytes" if event.size else ""
            detail = (f"{event.op}{size} at {event.addr:#x} (status {event.status:#x}) from "
                      f"{ev.sym.symbolize(event.caller)} in {where}, at seq {event.seq}, "
                      f"after the memory map was terminated")
            (found if under_test else findings).append(
                Violation("C2", detail, (event.seq,), culprit))
    return Judged(tuple(found), tuple(findings))


@judges("C3")
def hook_enters_no_boot_service(ev: LogEvidence) -> Judged:
    """The IOMMU member ``CoreExitBootServices()`` calls changes no TPL and
    calls no memory service."""
    found: list[Violation] = []
    for attempt, hooks in ev.succeeded():
        for event in ev.span(attempt):
            if not isinstance(event, (TplChange, MemCall)):
                continue
            for hook in hooks:
                if hook[0].seq < event.seq < hook[1]:
                    what = (f"{'RaiseTPL' if event.op == 'raise' else 'RestoreTPL'}"
                            f"({event.tpl})" if isinstance(event, TplChange)
                            else f"a memory service ({event.op})")
                    where, culprit, _ = ev.context(event.seq, hooks)
                    found.append(Violation(
                        "C3", f"{where} entered {what} from "
                              f"{ev.sym.symbolize(event.caller)} at seq {event.seq}; it may "
                              f"call no boot service", (hook[0].seq, event.seq), culprit))
    return Judged(tuple(found))


# ---------------------------------------------------------------- the log


@dataclass(frozen=True)
class LogReport:
    """Everything ``analyze-log`` prints.

    :param findings: facts about other drivers (C2 by their notification
        functions), reported but not failed verdicts.
    :param outcomes: each log check's outcome (held, failed, skipped, not
        judged), by check id.
    """

    timeline: Timeline
    violations: tuple[Violation, ...]
    anomalies: tuple[str, ...]
    findings: tuple[Violation, ...] = ()
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    @property
    def contract_judged(self) -> bool:
        """The trace had the lines C1..C3 need."""
        c1 = self.outcomes.get("C1")
        return c1 is not None and c1.state is not checks.State.NOT_JUDGED

    @property
    def passed(self) -> bool:
        return not self.violations

    def held(self) -> str:
        """The checks a passing log held, as ``V1 order, V2 once, ...``."""
        return ", ".join(checks.CHECKS[c].title for c, o in self.outcomes.items()
                         if o.state is checks.State.HELD)


def judge_log(timeline: Timeline, sym: Symbolizer | None = None,
              notes: tuple[str, ...] = ()) -> LogReport:
    """Every registered log check on ``timeline``, in registry order;
    ``notes`` go first among the report's anomalies."""
    ev = LogEvidence(timeline, sym or Symbolizer(timeline.trace.images))
    violations: list[Violation] = []
    findings: list[Violation] = []
    anomalies = list(notes)
    skipped: dict[str, str] = {}
    judged: list[str] = []
    contract_missing = False
    for check in checks.CHECKS:
        function = LOG_CHECKS.get(check)
        if function is None:
            continue
        if checks.CHECKS[check].evidence is Evidence.CONTRACT and not ev.contract_traced:
            contract_missing = True
            continue
        result = function(ev)
        judged.append(check)
        violations += result.violations
        findings += result.findings
        anomalies += result.notes
        if result.notes:
            skipped[check] = result.notes[0]
    outcomes = checks.outcomes(judged, violations, skipped)
    if contract_missing:
        anomalies.append(CONTRACT_MISSING)
        outcomes.update(checks.not_judged(checks.of(Evidence.CONTRACT), CONTRACT_MISSING))
    return LogReport(timeline, tuple(violations), tuple(anomalies), tuple(findings), outcomes)


def check_timeline(timeline: Timeline, symbolizer: Symbolizer | None = None) -> list[Violation]:
    """The violations of the LOG checks (V1..V4, V6) alone, in check order."""
    ev = LogEvidence(timeline, symbolizer or Symbolizer(timeline.trace.images))
    return [v for check in checks.of(Evidence.LOG) for v in LOG_CHECKS[check](ev).violations]


def analyze_log(path: Path | str, firmware_dir: Path | None = None
                ) -> tuple[LogReport, Symbolizer]:
    """Parse, build the timeline, judge every log check."""
    return analyze_trace(parse_log(path), firmware_dir)


def analyze_trace(trace: Trace, firmware_dir: Path | None = None
                  ) -> tuple[LogReport, Symbolizer]:
    """Build the timeline of a parsed log, judge every log check."""
    timeline = build_timeline(trace)
    sym = Symbolizer(trace.images, firmware_dir)
    anomalies: list[str] = []
    live_mappings(trace.events, None, anomalies)
    if not LogEvidence(timeline, sym).iommu_in_use:
        anomalies.append("no iommu-config line and no IOMMU events: the IOMMU protocol was "
                         "not installed, so no teardown is expected (V2)")
    if trace.lost:
        anomalies.append("trace line(s) cut by interrupt-time output whose rest never came, "
                         f"their events missing: line(s) {', '.join(map(str, trace.lost))}")
    if trace.partial_tail:
        anomalies.append(f"the last line ({trace.lines}) had no newline and was dropped")
    return judge_log(timeline, sym, tuple(anomalies)), sym


def with_notes(report: LogReport, *notes: str) -> LogReport:
    """``report`` with ``notes`` added to its anomalies."""
    return dataclasses.replace(report, anomalies=(*report.anomalies, *notes))
