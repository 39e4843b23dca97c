"""The debug log's side of the analysis in one import: log -> events ->
timeline -> verdicts.

The pieces live in their own modules, in the order data flows through them:

- :mod:`~harness.analysis.events`: an ``EBST`` line as a typed event
  (``docs/trace-format.md``);
- :mod:`~harness.analysis.debuglog`: a whole log read into a :class:`Trace`
  (events, image loads, the SEV line), cut and interleaved lines handled;
- :mod:`~harness.analysis.timeline`: the ExitBootServices calls with their
  dispatches and teardowns;
- :mod:`~harness.analysis.verdicts`: one function per check, V1..V6 and
  C1..C3 (:mod:`~harness.analysis.checks` is the registry of every check).

This module re-exports the names callers use, so that ``trace.analyze_log``
and ``trace.parse_text`` stay one import away.
"""

from __future__ import annotations

from harness.analysis.checks import Violation
from harness.analysis.debuglog import (
    MAX_LINE_BYTES,
    Trace,
    gc_paused,
    opened_log,
    parse_log,
    parse_stream,
    parse_text,
    parsing_while_written,
    split_lines,
)
from harness.analysis.events import (
    EVENT_TYPES,
    IOMMU_EVENTS,
    TRACE_VERSION,
    AdversaryStage,
    DeviceAccess,
    EbsCallback,
    EbsCallbackEnd,
    EbsEnter,
    EbsFail,
    EbsReturn,
    IntsOff,
    IommuAlloc,
    IommuConfig,
    IommuFree,
    IommuLate,
    IommuMap,
    IommuRefused,
    IommuUnmap,
    MemCall,
    MemmapTerminated,
    NotifyBegin,
    NotifyEnd,
    Probe,
    ProbeParked,
    TeardownBegin,
    TeardownEnd,
    TeardownUnmap,
    TplChange,
    TraceEvent,
    Version,
    parse_trace_line,
)
from harness.analysis.timeline import (
    Dispatch,
    EbsAttempt,
    Teardown,
    Timeline,
    build_timeline,
    live_at,
    live_mappings,
)
from harness.analysis.verdicts import (
    LogReport,
    analyze_log,
    analyze_trace,
    check_timeline,
    judge_log,
    with_notes,
)

__all__ = [
    "EVENT_TYPES", "IOMMU_EVENTS", "MAX_LINE_BYTES", "TRACE_VERSION", "AdversaryStage",
    "DeviceAccess", "Dispatch", "EbsAttempt", "EbsCallback", "EbsCallbackEnd", "EbsEnter",
    "EbsFail", "EbsReturn", "IntsOff", "IommuAlloc", "IommuConfig", "IommuFree", "IommuLate",
    "IommuMap", "IommuRefused", "IommuUnmap", "LogReport", "MemCall", "MemmapTerminated",
    "NotifyBegin", "NotifyEnd", "Probe", "ProbeParked", "Teardown", "TeardownBegin",
    "TeardownEnd", "TeardownUnmap", "Timeline", "TplChange", "Trace", "TraceEvent", "Version",
    "Violation",
    "analyze_log", "analyze_trace", "build_timeline", "check_timeline", "gc_paused", "judge_log", "live_at",
    "live_mappings", "opened_log", "parse_log", "parse_stream", "parse_text",
    "parse_trace_line", "parsing_while_written", "split_lines", "with_notes",
]
