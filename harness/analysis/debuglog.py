"""Reading a debug log: its EBST trace lines, image loads and SEV line.

:func:`parse_log` reads a debug-port or serial log in one pass, in bounded
memory per line, and keeps every ``EBST`` line as a typed event numbered from
1 in log order (``seq``, :mod:`~harness.analysis.events`), every "Loading
driver at" line as an image load, and PlatformPei's C-bit mask; everything
else is passed over. What it refuses, with a
:class:`~harness.errors.TraceFormatError` naming the line: a ``version``
line with another ``v=``, trace lines without a ``version`` line, a trace
line longer than :data:`MAX_LINE_BYTES`, and whatever
:func:`~harness.analysis.events.parse_trace_line` refuses.

A final line without its newline (the capture was cut mid-line) is dropped:
half a field is not evidence. A trace line that the timer interrupt cut in
two (interrupt-time output printed inside it) is rejoined when its rest
comes within a few lines.

:func:`parsing_while_written` reads the log of a guest that still runs, in
a thread, line by line as the firmware writes it: a boot's analysis then
waits only for the lines after its last wait, not for the whole log.
"""

from __future__ import annotations

import gc
import io
import logging
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path
from typing import BinaryIO, Protocol

from harness.analysis.events import (
    TRACE_VERSION,
    WELL_FORMED_RE,
    IommuConfig,
    TraceEvent,
    Version,
    parse_trace_line,
)
from harness.analysis.symbols import ImageLoad, parse_image_load
from harness.errors import TraceFormatError
from harness.logtext import GHCB_PAGES, LEADING_JUNK_RE, SEV_MASK

LOG = logging.getLogger(__name__)

_SEV_MASK_RE = re.compile(rb"^" + SEV_MASK.encode())
_GHCB_PAGES_RE = re.compile(rb"^" + GHCB_PAGES.encode())
#: A log line longer than this is cut to its start (and said so).
MAX_LINE_BYTES = 64 * 1024


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
    :param ghcb: PlatformPei's GHCB pages under SEV-ES, ``(first address,
        page count)``: per CPU a shared GHCB page and a private one.
    """

    path: str
    events: tuple[TraceEvent, ...]
    images: tuple[ImageLoad, ...]
    lines: int
    partial_tail: bool
    sev_mask: int | None = None
    lost: tuple[int, ...] = ()
    ghcb: tuple[int, int] | None = None

    @property
    def ghcb_pages(self) -> tuple[int, ...]:
        """The addresses of the GHCB pages themselves (every other page of
        :attr:`ghcb`, from the first), which SEV-ES shares on purpose."""
        if self.ghcb is None:
            return ()
        base, count = self.ghcb
        return tuple(base + page * 0x1000 for page in range(0, count, 2))

    @property
    def config(self) -> IommuConfig | None:
        """The last ``iommu-config`` line, if any."""
        found = [e for e in self.events if isinstance(e, IommuConfig)]
        return found[-1] if found else None


class LineSource(Protocol):
    """What :func:`split_lines` reads: a binary file, or a :class:`GrowingLog`."""

    def readline(self, limit: int, /) -> bytes: ...


def split_lines(stream: LineSource) -> Iterator[tuple[int, bytes, bool, bool]]:
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
    """A log held in a string (tests, recorded excerpts)."""
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


class GrowingLog:
    """A log file another process still appends to, as a stream for
    :func:`split_lines`: :meth:`readline` waits for a whole line (the file
    may not exist yet) until :meth:`finish` says the writer is done; then it
    returns what is left, the last line's start without its newline
    included, and EOF."""

    #: How long a reader at the end of the data sleeps before looking again.
    POLL = 0.02

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = None
        self._done = threading.Event()

    def finish(self) -> None:
        """The writer is done: read to the end of the file and stop."""
        self._done.set()

    def readline(self, limit: int) -> bytes:
        line = b""
        while True:
            done = self._done.is_set()   # asked before the read: none written after is lost
            if self._file is None:
                try:
                    self._file = open(self.path, "rb")  # noqa: SIM115 - closed in close()
                except FileNotFoundError:
                    if done:
                        return line
            if self._file is not None:
                line += self._file.readline(limit - len(line))
                if line.endswith(b"\n") or len(line) >= limit or done:
                    return line
            self._done.wait(self.POLL)

    def close(self) -> None:
        self.finish()
        if self._file is not None:
            self._file.close()


@contextmanager
def parsing_while_written(path: Path) -> Iterator[Callable[[], Trace]]:
    """Parse the log at ``path`` in a thread while its writer runs; yields
    ``parsed()``, to be called once the writer is done: it reads the rest
    and returns the :class:`Trace` (or raises what :func:`parse_log`
    would). Leaving the block stops the thread, parsed or not."""
    stream = GrowingLog(path)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="log-parse") as pool:
            # Not parse_stream: the collector stays on for the guest's run.
            pending = pool.submit(_parse_stream, stream, str(path))

            def parsed() -> Trace:
                stream.finish()
                return pending.result()

            try:
                yield parsed
            finally:
                stream.finish()     # the pool's exit then waits for the thread
    finally:
        stream.close()


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


def _parse_stream(stream: LineSource, path: str) -> Trace:
    events: list[TraceEvent] = []
    images: list[ImageLoad] = []
    lines = 0
    partial = False
    versions = 0
    sev_mask: int | None = None
    ghcb: tuple[int, int] | None = None
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
        body = LEADING_JUNK_RE.sub(b"", raw, count=1)
        if held is not None and complete and not body.startswith(_MARK):
            # the first line after the interrupt-time ones is the rest, or nothing is
            whole = held[0] + body
            if WELL_FORMED_RE.match(whole[5:].decode("latin-1")) \
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
        elif b"GHCB pages allocated" in body and (found := _GHCB_PAGES_RE.search(body)):
            ghcb = (int(found.group(2), 16), int(found.group(1)))
    release(lines)
    if events and not versions:
        raise TraceFormatError(path, events[0].line,
                               "EBST lines without a 'version' line: cannot tell the "
                               "trace format version")
    return Trace(path, tuple(events), tuple(images), lines, partial, sev_mask, tuple(lost),
                 ghcb)
