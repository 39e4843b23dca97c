"""The EBS timeline: a trace's ExitBootServices calls, with the notification
functions dispatched in each and the IOMMU teardowns.

:func:`build_timeline` groups the events of a :class:`~harness.analysis.debuglog.Trace`
into :class:`EbsAttempt` s (``ebs-enter`` .. ``ebs-fail``/``ebs-return``),
each with its :class:`Dispatch` es (``notify-begin`` .. ``notify-end``,
nested) and :class:`Teardown` s (``teardown-begin`` .. ``teardown-end``).
It refuses, with a :class:`~harness.errors.TraceFormatError` naming the
line, begin and end lines that close nothing or the wrong thing, and a log
that ends before its last ExitBootServices returned or failed.
:func:`live_mappings` and :func:`live_at` replay the IOMMU's map and unmap
lines.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from harness.analysis.debuglog import Trace
from harness.analysis.events import (
    EbsEnter,
    EbsFail,
    EbsReturn,
    IommuMap,
    IommuUnmap,
    NotifyBegin,
    NotifyEnd,
    TeardownBegin,
    TeardownEnd,
    TeardownUnmap,
    TraceEvent,
)
from harness.errors import TraceFormatError

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dispatch:
    """One notification function call (``notify-begin`` .. ``notify-end``).

    :param parent: ``seq`` of the dispatch it is nested in, or None.
    :param depth: 0 for a dispatch straight from the core.
    """

    begin: NotifyBegin
    end: NotifyEnd
    depth: int
    parent: int | None


@dataclass(frozen=True)
class Teardown:
    """The IOMMU teardown (``teardown-begin`` .. ``teardown-end``).

    :param host: the dispatch it ran in (``legacy``: IoMmuDxe's re-signalled
        handler), or None when the core called it (``callback``).
    :param end: None when it never ended.
    """

    begin: TeardownBegin
    end: TeardownEnd | None
    unmaps: tuple[TeardownUnmap, ...]
    host: Dispatch | None

    @property
    def last_seq(self) -> int:
        if self.end is not None:
            return self.end.seq
        return self.unmaps[-1].seq if self.unmaps else self.begin.seq


@dataclass(frozen=True)
class EbsAttempt:
    """One ExitBootServices call (``ebs-enter`` .. ``ebs-fail``/``ebs-return``)."""

    index: int
    enter: EbsEnter
    exit: EbsFail | EbsReturn
    dispatches: tuple[Dispatch, ...]
    teardowns: tuple[Teardown, ...]

    @property
    def succeeded(self) -> bool:
        return isinstance(self.exit, EbsReturn)

    def contains(self, seq: int) -> bool:
        return self.enter.seq <= seq <= self.exit.seq


@dataclass(frozen=True)
class Timeline:
    """The EBS attempts of a trace, with dispatches and teardowns.

    :param stray_teardowns: teardowns outside any ExitBootServices call.
    """

    trace: Trace
    attempts: tuple[EbsAttempt, ...]
    stray_teardowns: tuple[Teardown, ...]

    @property
    def teardowns(self) -> tuple[Teardown, ...]:
        out = list(self.stray_teardowns)
        for attempt in self.attempts:
            out.extend(attempt.teardowns)
        return tuple(sorted(out, key=lambda t: t.begin.seq))

    def dispatch_at(self, seq: int) -> Dispatch | None:
        """The innermost dispatch open at ``seq`` (begin and end included)."""
        index = self._innermost()
        return index[seq] if 0 <= seq < len(index) else None

    def _innermost(self) -> list[Dispatch | None]:
        """``seq`` -> innermost open dispatch, made in one pass and kept:
        dispatches nest, so a stack over their begins and ends is enough."""
        cached: list[Dispatch | None] | None = self.__dict__.get("_innermost_index")
        if cached is not None:
            return cached
        count = len(self.trace.events) + 1
        index: list[Dispatch | None] = [None] * count
        edges: list[tuple[int, int, Dispatch]] = []
        for attempt in self.attempts:
            for d in attempt.dispatches:
                edges.append((d.begin.seq, 0, d))
                edges.append((d.end.seq, 1, d))
        edges.sort(key=lambda e: (e[0], e[1]))
        stack: list[Dispatch] = []
        position = 0
        for seq in range(count):
            while position < len(edges) and edges[position][0] == seq \
                    and edges[position][1] == 0:
                stack.append(edges[position][2])
                position += 1
            index[seq] = stack[-1] if stack else None
            while position < len(edges) and edges[position][0] == seq:
                stack.remove(edges[position][2])
                position += 1
        object.__setattr__(self, "_innermost_index", index)
        return index


def build_timeline(trace: Trace) -> Timeline:
    """Group the events of ``trace`` into EBS attempts.

    :raises TraceFormatError: unbalanced begin/end lines, or the log ends
        before the last ExitBootServices returned (or there is none).
    """
    path = trace.path

    def bad(event: TraceEvent | None, reason: str) -> TraceFormatError:
        return TraceFormatError(path, event.line if event else None, reason)

    attempts: list[EbsAttempt] = []
    stray: list[Teardown] = []
    enter: EbsEnter | None = None
    dispatches: list[Dispatch] = []
    teardowns: list[Teardown] = []
    stack: list[tuple[NotifyBegin, int | None]] = []
    open_td: tuple[TeardownBegin, list[TeardownUnmap], NotifyBegin | None] | None = None
    done_dispatch: dict[int, Dispatch] = {}
    pending_host: list[tuple[TeardownBegin, TeardownEnd | None,
                             tuple[TeardownUnmap, ...], NotifyBegin | None]] = []

    def close_teardown(end: TeardownEnd | None) -> None:
        nonlocal open_td
        assert open_td is not None
        begin, unmaps, host = open_td
        pending_host.append((begin, end, tuple(unmaps), host))
        open_td = None

    def flush_teardowns(into: list[Teardown]) -> None:
        for begin, end, unmaps, host in pending_host:
            host_d = done_dispatch.get(host.seq) if host is not None else None
            into.append(Teardown(begin, end, unmaps, host_d))
        pending_host.clear()

    for event in trace.events:
        if isinstance(event, EbsEnter):
            if enter is not None:
                raise bad(event, f"ebs-enter at seq {event.seq} while the ebs-enter "
                                 f"at seq {enter.seq} has not returned")
            if open_td is not None:
                close_teardown(None)
            flush_teardowns(stray)
            enter = event
            dispatches, teardowns, stack = [], [], []
        elif isinstance(event, NotifyBegin):
            if enter is None:
                LOG.debug("%s: notify-begin seq %d outside ExitBootServices", path, event.seq)
                continue
            stack.append((event, stack[-1][0].seq if stack else None))
        elif isinstance(event, NotifyEnd):
            if enter is None:
                continue
            if not stack:
                raise bad(event, f"notify-end at seq {event.seq} with no notify-begin open")
            begin, parent = stack[-1]
            if begin.fn != event.fn or begin.event != event.event:
                raise bad(event, f"notify-end at seq {event.seq} (fn={event.fn:#x}) does not "
                                 f"close the notify-begin at seq {begin.seq} "
                                 f"(fn={begin.fn:#x})")
            stack.pop()
            d = Dispatch(begin, event, len(stack), parent)
            dispatches.append(d)
            done_dispatch[begin.seq] = d
        elif isinstance(event, TeardownBegin):
            if open_td is not None:
                raise bad(event, f"teardown-begin at seq {event.seq} inside the teardown "
                                 f"begun at seq {open_td[0].seq}")
            host = stack[-1][0] if stack else None
            open_td = (event, [], host)
        elif isinstance(event, TeardownUnmap):
            if open_td is None:
                raise bad(event, f"teardown-unmap at seq {event.seq} outside a teardown")
            open_td[1].append(event)
        elif isinstance(event, TeardownEnd):
            if open_td is None:
                raise bad(event, f"teardown-end at seq {event.seq} with no teardown-begin")
            close_teardown(event)
        elif isinstance(event, (EbsFail, EbsReturn)):
            if enter is None:
                raise bad(event, f"{event.name} at seq {event.seq} without ebs-enter")
            if stack:
                begin = stack[-1][0]
                raise bad(event, f"{event.name} at seq {event.seq} while the handler begun "
                                 f"at seq {begin.seq} (fn={begin.fn:#x}) has not returned")
            if open_td is not None:
                close_teardown(None)
            flush_teardowns(teardowns)
            dispatches.sort(key=lambda d: d.begin.seq)
            attempts.append(EbsAttempt(len(attempts) + 1, enter, event,
                                       tuple(dispatches), tuple(teardowns)))
            enter = None
    if enter is not None:
        raise bad(None, f"log ends at line {trace.lines} before ExitBootServices returned "
                        f"(ebs-enter at line {enter.line}, seq {enter.seq})")
    if not attempts:
        raise bad(None, f"no ExitBootServices call in the log (ends at line {trace.lines}; "
                        f"{len(trace.events)} EBST lines)")
    if open_td is not None:
        close_teardown(None)
    flush_teardowns(stray)
    return Timeline(trace, tuple(attempts), tuple(stray))


def live_mappings(events: Iterable[TraceEvent], upto_seq: int | None = None,
                  anomalies: list[str] | None = None) -> dict[int, IommuMap]:
    """Replay map/unmap/teardown-unmap up to ``upto_seq`` (inclusive).

    :returns: live mappings by MAP_INFO address.
    """
    live: dict[int, IommuMap] = {}
    for event in events:
        if upto_seq is not None and event.seq > upto_seq:
            break
        if isinstance(event, IommuMap):
            if anomalies is not None and event.map in live:
                anomalies.append(f"iommu-map seq {event.seq}: map={event.map:#x} is "
                                 f"already live since seq {live[event.map].seq}")
            live[event.map] = event
        elif (isinstance(event, (IommuUnmap, TeardownUnmap))
              and live.pop(event.map, None) is None and anomalies is not None):
            anomalies.append(f"{event.name} seq {event.seq}: map={event.map:#x} was "
                             f"never mapped in this log")
    return live


def live_at(events: Iterable[TraceEvent], seqs: Iterable[int]) -> dict[int, dict[int, IommuMap]]:
    """The live mappings after each of ``seqs`` (inclusive), in one replay."""
    wanted = sorted(set(seqs))
    found: dict[int, dict[int, IommuMap]] = {}
    live: dict[int, IommuMap] = {}
    position = 0
    for event in events:
        while position < len(wanted) and wanted[position] < event.seq:
            found[wanted[position]] = dict(live)
            position += 1
        if position == len(wanted):
            break
        if isinstance(event, IommuMap):
            live[event.map] = event
        elif isinstance(event, (IommuUnmap, TeardownUnmap)):
            live.pop(event.map, None)
    for seq in wanted[position:]:
        found[seq] = dict(live)
    return found
