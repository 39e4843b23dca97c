"""The EBST trace lines as typed events (``docs/trace-format.md``, version 1).

:func:`parse_trace_line` turns one line (without ``EBST``) into a frozen
:class:`TraceEvent` subclass named for its event, or refuses it with a
:class:`~harness.errors.TraceFormatError` naming the line: a line that is not
``EBST <event> key=value ...`` in printable ASCII, has a key twice, lacks a
field its event needs, or has a field that is not a number where one is
needed (garbage inside a trace line is an error, not a finding: a log that
lies about itself cannot be judged). Events the parser does not know are kept
as plain :class:`TraceEvent` (new events keep the version), as are extra
fields.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from harness.errors import TraceFormatError

TRACE_VERSION = 1

_EVENT_RE = re.compile(r"[a-z][a-z0-9-]*\Z")
_KEY_RE = re.compile(r"[a-z][a-z0-9_-]*\Z")
_INT_RE = re.compile(r"(?:0x[0-9a-fA-F]+|[0-9]+)\Z")
#: A whole trace line: the event name, then printable ``key=value`` pairs.
WELL_FORMED_RE = re.compile(r"[a-z][a-z0-9-]*(?: [a-z][a-z0-9_-]*=[!-~]+)*\Z")
_PAIR_RE = re.compile(r" ([a-z][a-z0-9_-]*)=([!-~]+)")
_MAX_TRACE_LINE = 4096



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
class IommuLate(TraceEvent):
    """A Map() or AllocateBuffer() the IOMMU driver refused because the
    memory map was terminated."""

    call: str
    host: int
    pages: int
    status: int


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
    "iommu-late": IommuLate,
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
    if not WELL_FORMED_RE.match(text):
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
