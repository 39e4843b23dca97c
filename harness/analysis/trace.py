"""Debug log -> typed trace events -> EBS timeline -> verdicts V1..V4.

The trace lines are specified in ``docs/trace-format.md`` (version 1). The
parser keeps every ``EBST`` line as a frozen event numbered from 1 in log
order (``seq``) and every "Loading driver at" line as an image load;
everything else in the log is ignored. What it refuses, with a
:class:`~harness.errors.TraceFormatError` naming the line:

- a ``version`` line with another ``v=``;
- an ``EBST`` line that is not ``EBST <event> key=value ...`` in printable
  ASCII, has a key twice, or lacks a field its event needs or has a field
  that is not a number where one is needed (garbage inside a trace line is
  an error, not a finding: a log that lies about itself cannot be judged);
- ``notify-end``/``teardown-end`` lines that close nothing, or close the
  wrong thing;
- a log that ends before its last ExitBootServices returned or failed.

A final line without its newline (the capture was cut mid-line) is dropped:
half a field is not evidence. Events the parser does not know are kept as
plain :class:`TraceEvent` (new events keep the version), as are extra
fields.

The verdicts (the README's verdict table) are computed from the :class:`Timeline`
by :func:`check_timeline`; each :class:`Violation` names its check, the
handler (symbolized) and the sequence numbers involved.
"""

from __future__ import annotations

import bisect
import dataclasses
import gc
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path
from typing import Any, BinaryIO

from harness.analysis.symbols import ImageLoad, Symbolizer, parse_image_load
from harness.errors import TraceFormatError

LOG = logging.getLogger(__name__)

TRACE_VERSION = 1

_LEADING_JUNK_RE = re.compile(rb"^(?:\r|\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-Za-z])*")
_EVENT_RE = re.compile(r"[a-z][a-z0-9-]*\Z")
_KEY_RE = re.compile(r"[a-z][a-z0-9_-]*\Z")
_INT_RE = re.compile(r"(?:0x[0-9a-fA-F]+|[0-9]+)\Z")
#: A whole trace line: the event name, then printable ``key=value`` pairs.
_WELL_FORMED_RE = re.compile(r"[a-z][a-z0-9-]*(?: [a-z][a-z0-9_-]*=[!-~]+)*\Z")
_PAIR_RE = re.compile(r" ([a-z][a-z0-9_-]*)=([!-~]+)")
#: PlatformPei (OvmfPkg AmdSev.c) under SEV: "SEV is enabled (mask 0x800000000000)".
_SEV_MASK_RE = re.compile(rb"^SEV is enabled \(mask 0x([0-9a-fA-F]{1,16})\)")
_MAX_TRACE_LINE = 4096
#: A log line longer than this is cut to its start (and said so).
MAX_LINE_BYTES = 64 * 1024


# ----------------------------------------------------------------- events


@dataclass(frozen=True, kw_only=True, slots=True)
class TraceEvent:
    """One ``EBST`` line.

    :param seq: number of the trace line, from 1, in log order.
    :param line: line number in the log file, from 1.
    :param name: the event word (``ebs-enter``).
    :param text: the line after ``EBST``: the name, then its ``key=value``
        pairs, one space apart (kept as one string: a log holds 100,000s).
    """

    seq: int
    line: int
    name: str
    text: str

    @property
    def fields(self) -> tuple[tuple[str, str], ...]:
        """All ``key=value`` pairs as written."""
        return tuple((k, v) for k, _, v in
                     (token.partition("=") for token in self.text.split(" ")[1:]))

    def get(self, key: str) -> str | None:
        at = self.text.find(f" {key}=")
        if at < 0:
            return None
        start = at + len(key) + 2
        end = self.text.find(" ", start)
        return self.text[start:] if end < 0 else self.text[start:end]

    def describe(self) -> str:
        """The event as the log wrote it, without ``EBST``."""
        return self.text


@dataclass(frozen=True, kw_only=True, slots=True)
class Version(TraceEvent):
    v: int
    module: str


@dataclass(frozen=True, kw_only=True, slots=True)
class IommuConfig(TraceEvent):
    scheme: str
    emulation: int
    sharedbit: int
    maphead: int


@dataclass(frozen=True, kw_only=True, slots=True)
class IommuRefused(TraceEvent):
    reason: str


@dataclass(frozen=True, kw_only=True, slots=True)
class EbsEnter(TraceEvent):
    mapkey: int


@dataclass(frozen=True, kw_only=True, slots=True)
class NotifyBegin(TraceEvent):
    event: int
    fn: int
    ctx: int
    tpl: int


@dataclass(frozen=True, kw_only=True, slots=True)
class NotifyEnd(TraceEvent):
    event: int
    fn: int


@dataclass(frozen=True, kw_only=True, slots=True)
class EbsFail(TraceEvent):
    status: int


@dataclass(frozen=True, kw_only=True, slots=True)
class EbsCallback(TraceEvent):
    revision: int


@dataclass(frozen=True, kw_only=True, slots=True)
class EbsReturn(TraceEvent):
    status: int


@dataclass(frozen=True, kw_only=True, slots=True)
class IommuMap(TraceEvent):
    map: int
    op: int
    host: int
    dev: int
    pages: int
    live: int


@dataclass(frozen=True, kw_only=True, slots=True)
class IommuUnmap(TraceEvent):
    map: int
    op: int
    host: int
    dev: int
    pages: int
    live: int


@dataclass(frozen=True, kw_only=True, slots=True)
class IommuAlloc(TraceEvent):
    host: int
    pages: int


@dataclass(frozen=True, kw_only=True, slots=True)
class IommuFree(TraceEvent):
    host: int
    pages: int


@dataclass(frozen=True, kw_only=True, slots=True)
class TeardownBegin(TraceEvent):
    scheme: str
    live: int


@dataclass(frozen=True, kw_only=True, slots=True)
class TeardownUnmap(TraceEvent):
    map: int
    op: int
    host: int
    dev: int
    pages: int


@dataclass(frozen=True, kw_only=True, slots=True)
class TeardownEnd(TraceEvent):
    unmapped: int
    live: int


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceAccess(TraceEvent):
    module: str
    kind: str
    map: int
    host: int
    dev: int
    pages: int


@dataclass(frozen=True, kw_only=True, slots=True)
class AdversaryStage(TraceEvent):
    n: int
    of: int


@dataclass(frozen=True, kw_only=True, slots=True)
class MemmapTerminated(TraceEvent):
    """ExitBootServices() terminated the memory map: no allocations from here."""


@dataclass(frozen=True, kw_only=True, slots=True)
class IntsOff(TraceEvent):
    """The core disabled interrupts, after every notification function."""


@dataclass(frozen=True, kw_only=True, slots=True)
class EbsCallbackEnd(TraceEvent):
    """The IOMMU protocol's ExitBootServices() member returned."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TplChange(TraceEvent):
    """A RaiseTPL()/RestoreTPL() boot service call during ExitBootServices()."""

    op: str
    tpl: int
    caller: int


@dataclass(frozen=True, kw_only=True, slots=True)
class MemCall(TraceEvent):
    """A memory allocation service call after the memory map was terminated."""

    op: str
    caller: int
    addr: int
    size: int
    status: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Probe(TraceEvent):
    step: str


@dataclass(frozen=True, kw_only=True, slots=True)
class ProbeParked(TraceEvent):
    pass


EVENT_TYPES: dict[str, type[TraceEvent]] = {
    "version": Version,
    "iommu-config": IommuConfig,
    "iommu-refused": IommuRefused,
    "ebs-enter": EbsEnter,
    "notify-begin": NotifyBegin,
    "notify-end": NotifyEnd,
    "ebs-fail": EbsFail,
    "ebs-callback": EbsCallback,
    "ebs-return": EbsReturn,
    "iommu-map": IommuMap,
    "iommu-unmap": IommuUnmap,
    "iommu-alloc": IommuAlloc,
    "iommu-free": IommuFree,
    "teardown-begin": TeardownBegin,
    "teardown-unmap": TeardownUnmap,
    "teardown-end": TeardownEnd,
    "device-access": DeviceAccess,
    "adversary-stage": AdversaryStage,
    "probe": Probe,
    "probe-parked": ProbeParked,
    "memmap-terminated": MemmapTerminated,
    "ints-off": IntsOff,
    "ebs-callback-end": EbsCallbackEnd,
    "tpl-change": TplChange,
    "mem-call": MemCall,
}

_BASE_FIELDS = {f.name for f in dataclasses.fields(TraceEvent)}
_SCHEMAS: dict[str, tuple[tuple[str, bool], ...]] = {
    name: tuple((f.name, f.type == "int") for f in dataclasses.fields(cls)
                if f.name not in _BASE_FIELDS)
    for name, cls in EVENT_TYPES.items()
}

#: IOMMU events folded into counts in the timeline; V3 forbids them after a
#: teardown began (the teardown's own ``teardown-unmap`` lines excepted).
IOMMU_EVENTS = (IommuMap, IommuUnmap, IommuAlloc, IommuFree)


def parse_trace_line(text: str, seq: int, line: int, path: str = "<log>") -> TraceEvent:
    """One ``EBST`` line (without ``EBST``) -> its typed event."""

    def bad(reason: str) -> TraceFormatError:
        return TraceFormatError(path, line, reason)

    if len(text) > _MAX_TRACE_LINE:
        raise bad(f"EBST line longer than {_MAX_TRACE_LINE} characters")
    text = text.rstrip(" ")
    tokens = text.split(" ")
    name = tokens[0]
    if not _WELL_FORMED_RE.match(text):
        raise _malformed(text, tokens, bad)
    fields = dict(_PAIR_RE.findall(text))
    if len(fields) != len(tokens) - 1:
        raise _malformed(text, tokens, bad)
    cls = EVENT_TYPES.get(name, TraceEvent)
    kwargs: dict[str, Any] = {"seq": seq, "line": line, "name": name, "text": text}
    for key, is_int in _SCHEMAS.get(name, ()):
        value = fields.get(key)
        if value is None:
            raise bad(f"EBST {name}: missing field {key!r}")
        if is_int:
            if not _INT_RE.match(value):
                raise bad(f"EBST {name}: field {key}={value[:40]!r} is not a number")
            kwargs[key] = int(value, 16 if value.startswith("0x") else 10)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def _malformed(text: str, tokens: list[str],
               bad: Callable[[str], TraceFormatError]) -> TraceFormatError:
    """What is wrong with a line the fast check refused."""
    if not text.isascii() or not text.isprintable():
        return bad("EBST line holds non-printable characters")
    name = tokens[0]
    if not _EVENT_RE.match(name):
        return bad(f"EBST line with a malformed event name {name[:40]!r}")
    seen: set[str] = set()
    for token in tokens[1:]:
        key, eq, value = token.partition("=")
        if not eq or not _KEY_RE.match(key) or not value:
            return bad(f"EBST {name}: malformed field {token[:40]!r}")
        if key in seen:
            return bad(f"EBST {name}: field {key!r} given twice")
        seen.add(key)
    return bad("EBST line is malformed")


@dataclass(frozen=True)
class Trace:
    """A parsed debug log.

    :param path: where it came from (for messages).
    :param events: the trace events in log order.
    :param images: the "Loading driver at" lines.
    :param lines: number of lines in the log.
    :param partial_tail: the log's last line had no newline and was dropped.
    :param sev_mask: the C-bit mask from PlatformPei's "SEV is enabled (mask
        0x...)" line, when the firmware ran with SEV.
    :param lost: lines where a trace line was cut by interrupt-time output
        and its rest never came: that event is missing.
    """

    path: str
    events: tuple[TraceEvent, ...]
    images: tuple[ImageLoad, ...]
    lines: int
    partial_tail: bool
    sev_mask: int | None = None
    lost: tuple[int, ...] = ()

    @property
    def config(self) -> IommuConfig | None:
        """The last ``iommu-config`` line, if any."""
        found = [e for e in self.events if isinstance(e, IommuConfig)]
        return found[-1] if found else None


def split_lines(stream: BinaryIO) -> Iterator[tuple[int, bytes, bool, bool]]:
    """``(line number, content, complete, cut)`` in bounded memory.

    ``complete``: the line ended with a newline; ``cut``: it was longer than
    ``MAX_LINE_BYTES`` bytes and only its start is given.
    """
    number = 0
    while raw := stream.readline(MAX_LINE_BYTES):
        number += 1
        cut = False
        if not raw.endswith(b"\n") and len(raw) == MAX_LINE_BYTES:
            cut = True
            while (rest := stream.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                pass
        yield number, raw.rstrip(b"\r\n"), raw.endswith(b"\n") or cut, cut


@contextmanager
def opened_log(path: Path | str) -> Iterator[BufferedReader]:
    """``path`` open for reading, or :class:`TraceFormatError` (bad input,
    exit 2) for a missing file, a directory or one this user cannot read."""
    try:
        stream = open(path, "rb")  # noqa: SIM115 - closed below
    except IsADirectoryError as exc:
        raise TraceFormatError(path, None, "is a directory, not a log") from exc
    except FileNotFoundError as exc:
        raise TraceFormatError(path, None, "no such file") from exc
    except PermissionError as exc:
        raise TraceFormatError(path, None, "permission denied") from exc
    with stream:
        yield stream


def parse_log(path: Path | str) -> Trace:
    """Read a debug log (debug port or serial capture)."""
    with opened_log(path) as stream:
        return parse_stream(stream, str(path))


def parse_text(text: str, path: str = "<log>") -> Trace:
    import io

    return parse_stream(io.BytesIO(text.encode("utf-8", "surrogateescape")), path)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: a log's 100,000s of events hold no
    cycles, and its passes over them cost a fifth of an analysis."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def parse_stream(stream: BinaryIO, path: str = "<log>") -> Trace:
    """Read a log from ``stream``."""
    with gc_paused():
        return _parse_stream(stream, path)


_MARK = b"EBST "


def _interleaved(body: bytes) -> tuple[bytes, bytes, bool] | None:
    """``(fragment, line, ours)`` when a trace line was printed inside
    another line: from interrupt time, while the debug port's ``rep outsb``
    was stopped halfway (the timer's handler, through the traced
    ``RaiseTPL()``, prints whole lines of its own there). ``ours``: the
    fragment is the start of a trace line, whose rest comes as a later line;
    else it is another module's text. None for an ordinary line."""
    at = body.find(_MARK, 1)
    if at < 0:
        return None
    fragment = body[:at]
    return fragment, body[at:], fragment.startswith(_MARK) or _MARK.startswith(fragment)


#: How many lines an interrupted trace line's rest may come after its start.
_REJOIN_WITHIN = 64


def _parse_stream(stream: BinaryIO, path: str) -> Trace:
    events: list[TraceEvent] = []
    images: list[ImageLoad] = []
    lines = 0
    partial = False
    versions = 0
    sev_mask: int | None = None
    lost: list[int] = []
    #: An interrupted trace line's start and its line number; the trace
    #: lines printed from interrupt time inside it wait in ``inner`` and are
    #: recorded after it once it is whole (it began first).
    held: tuple[bytes, int] | None = None
    inner: list[tuple[bytes, int]] = []

    def record(body: bytes, number: int, tentative: bool = False) -> bool:
        """Parse and keep a trace line; ``tentative``: a rejoined line, which
        must parse (else False and nothing kept)."""
        nonlocal versions
        try:
            event = parse_trace_line(body[5:].decode("latin-1"), len(events) + 1, number, path)
        except TraceFormatError:
            if tentative:
                return False
            raise
        if isinstance(event, Version):
            versions += 1
            if event.v != TRACE_VERSION:
                raise TraceFormatError(
                    path, number, f"trace format version {event.v} (module "
                    f"{event.module}); this harness reads version {TRACE_VERSION}")
        events.append(event)
        return True

    def release(number: int) -> None:
        nonlocal held
        if held is not None:
            LOG.warning("%s:%d: the start of a trace line cut by interrupt-time output "
                        "never went on by line %d: %r", path, held[1], number, held[0])
            lost.append(held[1])
        held = None
        for body, where in inner:
            record(body, where)
        inner.clear()

    for number, raw, complete, cut in split_lines(stream):
        lines = number
        body = _LEADING_JUNK_RE.sub(b"", raw, count=1)
        if held is not None and complete and not body.startswith(_MARK):
            # the first line after the interrupt-time ones is the rest, or nothing is
            whole = held[0] + body
            if _WELL_FORMED_RE.match(whole[5:].decode("latin-1")) \
                    and record(whole, held[1], tentative=True):
                LOG.info("%s:%d: trace line of line %d rejoined around interrupt-time output",
                         path, number, held[1])
                held = None
                release(number)
                continue
            release(number)
        if held is not None and number - held[1] > _REJOIN_WITHIN:
            release(number)
        split = _interleaved(body) if _MARK in body else None
        if body.startswith(_MARK) or split is not None:
            if cut:
                raise TraceFormatError(path, number,
                                       f"EBST line longer than {MAX_LINE_BYTES} bytes")
            if not complete:
                LOG.info("%s:%d: dropping the partial last line", path, number)
                partial = True
                continue
            if split is not None:
                fragment, body, ours = split
                if ours and held is None:
                    held = (fragment, number)
                elif ours:
                    lost.append(number)     # a second cut line while one waits: rare
                elif b"Loading " in fragment and (
                        load := parse_image_load(fragment.decode("latin-1"), number)):
                    images.append(load)     # a load line the trace line was printed into
            if held is not None:
                inner.append((body, number))
            else:
                record(body, number)
        elif b"Loading " in body:
            load = parse_image_load(body.decode("latin-1"), number)
            if load is not None:
                images.append(load)
        elif b"SEV is enabled" in body and (found := _SEV_MASK_RE.search(body)):
            sev_mask = int(found.group(1), 16)
    release(lines)
    if events and not versions:
        raise TraceFormatError(path, events[0].line,
                               "EBST lines without a 'version' line: cannot tell the "
                               "trace format version")
    return Trace(path, tuple(events), tuple(images), lines, partial, sev_mask, tuple(lost))


# --------------------------------------------------------------- timeline


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


# --------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Violation:
    """A failed check.

    :param check: ``V1``..``V4`` (log) or ``D1``..``D3`` (dump).
    :param detail: one line a firmware engineer can act on.
    :param seqs: the trace lines involved (for highlighting).
    :param culprit: who broke the rule, where a check names one: the handler
        (``Image!function``), the IOMMU member, or the DXE core.
    """

    check: str
    detail: str
    seqs: tuple[int, ...] = ()
    culprit: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[VD][1-4]|C[1-3]|W[12]", self.check):
            raise ValueError(f"unknown check {self.check!r}")

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"check": self.check, "detail": self.detail,
                                "seqs": list(self.seqs)}
        if self.culprit:
            data["culprit"] = self.culprit
        return data


LOG_CHECKS = ("V1", "V2", "V3", "V4", "C1", "C2", "C3")

#: TPL_HIGH_LEVEL: restoring any TPL below it enables interrupts.
TPL_HIGH_LEVEL = 31


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


def _handler(sym: Symbolizer, begin: NotifyBegin) -> str:
    return f"{sym.symbolize(begin.fn)} (tpl {begin.tpl}, notify-begin seq {begin.seq})"


def check_timeline(timeline: Timeline, symbolizer: Symbolizer | None = None) -> list[Violation]:
    """V1..V4 (the README's verdict table), in check order."""
    sym = symbolizer or Symbolizer(timeline.trace.images)
    events = timeline.trace.events
    v1: list[Violation] = []
    v2: list[Violation] = []
    v3: list[Violation] = []
    v4: list[Violation] = []

    # The live mappings where V4 looks: each teardown's end, each successful
    # return; one replay of the log for all of them.
    checkpoints = [td.end.seq for a in timeline.attempts for td in a.teardowns
                   if td.end is not None]
    checkpoints += [a.exit.seq for a in timeline.attempts if a.succeeded]
    replays = live_at(events, checkpoints)

    # Without an iommu-config line and IOMMU events the protocol was never
    # installed (a plain guest without emulation): V2 does not ask for a teardown.
    iommu_in_use = timeline.trace.config is not None or any(
        isinstance(e, IOMMU_EVENTS) for e in events)
    for td in timeline.stray_teardowns:
        v2.append(Violation("V2", f"teardown-begin at seq {td.begin.seq} outside any "
                                  f"ExitBootServices call", (td.begin.seq,)))

    for attempt in timeline.attempts:
        span = (f"EBS attempt {attempt.index} (ebs-enter seq {attempt.enter.seq} .. "
                f"{attempt.exit.name} seq {attempt.exit.seq})")
        # V2 once
        if not attempt.succeeded:
            for td in attempt.teardowns:
                v2.append(Violation("V2", f"failed {span} ran a teardown at seq "
                                          f"{td.begin.seq}; a failed EBS must not tear down",
                                    (td.begin.seq, attempt.exit.seq)))
        elif not attempt.teardowns and not iommu_in_use:
            pass  # no IOMMU protocol in this boot: nothing to tear down
        elif len(attempt.teardowns) != 1:
            seqs = tuple(t.begin.seq for t in attempt.teardowns)
            at = f" (teardown-begin at seq {', '.join(map(str, seqs))})" if seqs else ""
            v2.append(Violation("V2", f"successful {span} ran {len(attempt.teardowns)} "
                                      f"teardowns{at}; expected exactly 1",
                                (attempt.enter.seq, attempt.exit.seq) + seqs))
        # V1 order
        for td in attempt.teardowns:
            tb = td.begin.seq
            host = td.host if td.begin.scheme == "legacy" else None
            for d in attempt.dispatches:
                if d is host:
                    continue
                if d.begin.seq < tb < d.end.seq:
                    v1.append(Violation(
                        "V1", f"handler {_handler(sym, d.begin)} was still running at "
                              f"teardown-begin seq {tb} (it returned at seq {d.end.seq}) in "
                              f"{span}", (d.begin.seq, tb, d.end.seq)))
                elif tb < d.begin.seq:
                    v1.append(Violation(
                        "V1", f"handler {_handler(sym, d.begin)} began after teardown-begin "
                              f"seq {tb} in {span}", (tb, d.begin.seq)))
        # V4 empty
        for td in attempt.teardowns:
            if td.end is None:
                v4.append(Violation("V4", f"teardown begun at seq {td.begin.seq} never ended "
                                          f"(no teardown-end before {attempt.exit.name} seq "
                                          f"{attempt.exit.seq})", (td.begin.seq,)))
                continue
            replay = replays[td.end.seq]
            if td.end.live != 0:
                v4.append(Violation("V4", f"teardown-end seq {td.end.seq} reports live="
                                          f"{td.end.live} mapping(s) left",
                                    (td.begin.seq, td.end.seq)))
            elif replay:
                v4.append(Violation("V4", f"teardown-end seq {td.end.seq} reports live=0 but "
                                          f"the log leaves {len(replay)} mapping(s) live: "
                                          + _list_maps(replay), (td.end.seq,)))
        if attempt.succeeded:
            replay = replays[attempt.exit.seq]
            if replay:
                v4.append(Violation("V4", f"{len(replay)} mapping(s) still live at ebs-return "
                                          f"seq {attempt.exit.seq} of {span}: "
                                          + _list_maps(replay),
                                    (attempt.exit.seq,) + tuple(m.seq for m in replay.values())))

    # V3 quiet: from the first teardown-begin to the end of the log.
    all_td = timeline.teardowns
    if all_td:
        first = all_td[0]
        own = {u.seq for t in all_td for u in t.unmaps}
        # Teardown spans are disjoint and sorted: the one holding a seq is the
        # last that begins before it.
        span_begins = [t.begin.seq for t in all_td]
        span_ends = [t.last_seq for t in all_td]
        for event in events[first.begin.seq:]:
            if not isinstance(event, IOMMU_EVENTS + (DeviceAccess,)) or event.seq in own:
                continue
            held = bisect.bisect_left(span_begins, event.seq) - 1
            inside = ((span_begins[held], span_ends[held])
                      if held >= 0 and event.seq <= span_ends[held] else None)
            running = timeline.dispatch_at(event.seq)
            if inside is not None and (running is None or running.begin.seq < inside[0]):
                continue  # the teardown's own Unmap() calls
            where = (f" in handler {_handler(sym, running.begin)}"
                     if running is not None else "")
            what = (f"device-access by {event.module} kind={event.kind}"
                    if isinstance(event, DeviceAccess) else event.name)
            addr = f" map={event.get('map')}" if event.get("map") else ""
            v3.append(Violation("V3", f"{what}{addr} at seq {event.seq}{where}, after "
                                      f"teardown-begin seq {first.begin.seq}",
                                (first.begin.seq, event.seq)))
    return v1 + v2 + v3 + v4


@dataclass(frozen=True)
class Contract:
    """The ExitBootServices contract checks C1..C3 of one log.

    :param violations: C1, C3, and C2 by the core or the IOMMU driver.
    :param findings: C2 by another driver's notification function: a fact
        about that driver, reported but not a failed verdict.
    :param notes: what could not be judged, and why.
    """

    violations: tuple[Violation, ...]
    findings: tuple[Violation, ...]
    notes: tuple[str, ...]
    judged: bool = True


def _hook_spans(events: tuple[TraceEvent, ...], attempt: EbsAttempt
                ) -> list[tuple[EbsCallback, int]]:
    """The IOMMU member's calls in ``attempt``: its ``ebs-callback`` line and
    the seq where it returned (``ebs-callback-end``, else the attempt's end)."""
    spans: list[tuple[EbsCallback, int]] = []
    for event in events[attempt.enter.seq - 1:attempt.exit.seq]:
        if isinstance(event, EbsCallback):
            spans.append((event, attempt.exit.seq))
        elif isinstance(event, EbsCallbackEnd) and spans:
            spans[-1] = (spans[-1][0], event.seq)
    return spans


CORE = "the DXE core (outside any notification function)"


def _iommu_member(span: tuple[EbsCallback, int], sym: Symbolizer) -> str:
    fn = span[0].get("fn")
    name = sym.symbolize(int(fn, 16)) if fn else "(address not traced)"
    return f"the IOMMU ExitBootServices() member {name} (ebs-callback seq {span[0].seq})"


def _contract_context(seq: int, hooks: list[tuple[EbsCallback, int]], timeline: Timeline,
                      sym: Symbolizer) -> tuple[str, str, bool]:
    """Where the event at ``seq`` ran, its culprit (``Image!function`` or
    ``DxeCore``), and whether that is the system under test (the core or the
    IOMMU driver) rather than another driver."""
    for hook in hooks:
        if hook[0].seq < seq < hook[1]:
            fn = hook[0].get("fn")
            culprit = sym.symbolize(int(fn, 16)) if fn else "IoMmuDxe"
            return _iommu_member(hook, sym), culprit, True
    running = timeline.dispatch_at(seq)
    if running is None:
        return CORE, "DxeCore", True
    image = sym.image_for(running.begin.fn)
    owner_is_iommu = image is not None and image.name == "IoMmuDxe"
    return (f"handler {_handler(sym, running.begin)}", sym.symbolize(running.begin.fn),
            owner_is_iommu)


def check_contract(timeline: Timeline, symbolizer: Symbolizer | None = None) -> Contract:
    """C1..C3 from the core's own trace: interrupts off at a successful
    ExitBootServices() return (C1), no memory allocated or freed after the
    memory map was terminated (C2), no boot service entered by the IOMMU
    protocol's ExitBootServices() member (C3). Each names the culprit: the
    caller of the service, and the handler (or the IOMMU member, or the core)
    it ran in."""
    sym = symbolizer or Symbolizer(timeline.trace.images)
    events = timeline.trace.events
    violations: list[Violation] = []
    findings: list[Violation] = []
    notes: list[str] = []
    instrumented = any(isinstance(e, (MemmapTerminated, IntsOff)) for e in events)
    if not instrumented:
        notes.append("C1..C3 not judged: the trace has no memmap-terminated or ints-off "
                     "line (a firmware without the contract trace)")
        return Contract((), (), tuple(notes), judged=False)

    for attempt in timeline.attempts:
        if not attempt.succeeded:
            continue
        hooks = _hook_spans(events, attempt)
        span_events = events[attempt.enter.seq - 1:attempt.exit.seq]

        def context(seq: int, hooks: list[tuple[EbsCallback, int]] = hooks
                    ) -> tuple[str, str, bool]:
            return _contract_context(seq, hooks, timeline, sym)

        # C3: the IOMMU member enters no boot service.
        for event in span_events:
            if not isinstance(event, (TplChange, MemCall)):
                continue
            for hook in hooks:
                if hook[0].seq < event.seq < hook[1]:
                    what = (f"{'RaiseTPL' if event.op == 'raise' else 'RestoreTPL'}"
                            f"({event.tpl})" if isinstance(event, TplChange)
                            else f"a memory service ({event.op})")
                    where, culprit, _ = context(event.seq)
                    violations.append(Violation(
                        "C3", f"{where} entered {what} from "
                              f"{sym.symbolize(event.caller)} at seq {event.seq}; it may "
                              f"call no boot service", (hook[0].seq, event.seq), culprit))
        # C2: nothing allocated or freed once the memory map is terminated.
        for event in span_events:
            if not isinstance(event, MemCall):
                continue
            where, culprit, under_test = context(event.seq)
            size = f" of {event.size:#x} bytes" if event.size else ""
            detail = (f"{event.op}{size} at {event.addr:#x} (status {event.status:#x}) from "
                      f"{sym.symbolize(event.caller)} in {where}, at seq {event.seq}, after "
                      f"the memory map was terminated")
            (violations if under_test else findings).append(
                Violation("C2", detail, (event.seq,), culprit))
        # C1: interrupts are disabled when ExitBootServices() returns success.
        ints = attempt.exit.get("ints")
        if ints is None:
            notes.append(f"C1 not judged for ebs-return seq {attempt.exit.seq}: no ints= field")
        elif ints != "0":
            off = [e for e in span_events if isinstance(e, IntsOff)]
            after = off[-1].seq if off else attempt.enter.seq
            enabling = [e for e in span_events if isinstance(e, TplChange)
                        and e.op == "restore" and e.tpl < TPL_HIGH_LEVEL and e.seq > after]
            how, who = "", ""
            if enabling:
                last = enabling[-1]
                where, who, _ = context(last.seq)
                how = (f": RestoreTPL({last.tpl}) from {sym.symbolize(last.caller)} in "
                       f"{where} turned them back on at seq {last.seq}")
            violations.append(Violation(
                "C1", f"interrupts were enabled when ExitBootServices() returned success "
                      f"(ebs-return seq {attempt.exit.seq} ints={ints}){how}",
                (attempt.exit.seq,) + tuple(e.seq for e in enabling[-1:]), who))
    order = {"C1": 0, "C2": 1, "C3": 2}
    violations.sort(key=lambda v: order[v.check])
    return Contract(tuple(violations), tuple(findings), tuple(notes))


def _list_maps(live: dict[int, IommuMap]) -> str:
    parts = [f"map={m.map:#x} op={m.op} pages={m.pages} (iommu-map seq {m.seq})"
             for m in list(live.values())[:8]]
    if len(live) > 8:
        parts.append(f"and {len(live) - 8} more")
    return ", ".join(parts)


@dataclass(frozen=True)
class LogReport:
    """Everything ``analyze-log`` prints.

    :param findings: facts about other drivers (C2 by their notification
        functions), reported but not failed verdicts.
    :param contract_judged: the trace had the lines C1..C3 need.
    """

    timeline: Timeline
    violations: tuple[Violation, ...]
    anomalies: tuple[str, ...]
    findings: tuple[Violation, ...] = ()
    contract_judged: bool = False

    @property
    def passed(self) -> bool:
        return not self.violations


def analyze_log(path: Path | str, firmware_dir: Path | None = None
                ) -> tuple[LogReport, Symbolizer]:
    """Parse, build the timeline, check V1..V4."""
    trace = parse_log(path)
    timeline = build_timeline(trace)
    sym = Symbolizer(trace.images, firmware_dir)
    anomalies: list[str] = []
    live_mappings(trace.events, None, anomalies)
    if trace.config is None and not any(isinstance(e, IOMMU_EVENTS) for e in trace.events):
        anomalies.append("no iommu-config line and no IOMMU events: the IOMMU protocol was "
                         "not installed, so no teardown is expected (V2)")
    if trace.lost:
        anomalies.append("trace line(s) cut by interrupt-time output whose rest never came, "
                         f"their events missing: line(s) {', '.join(map(str, trace.lost))}")
    if trace.partial_tail:
        anomalies.append(f"the last line ({trace.lines}) had no newline and was dropped")
    violations = check_timeline(timeline, sym)
    contract = check_contract(timeline, sym)
    anomalies.extend(contract.notes)
    return LogReport(timeline, tuple(violations) + contract.violations, tuple(anomalies),
                     contract.findings, contract.judged), sym
