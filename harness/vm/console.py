"""Expect over a guest's consoles: the serial port and the debug log.

Both consoles are :mod:`pexpect` spawns, so both have one API,
:meth:`Console.expect`, in the form of QEMU's
``wait_for_console_pattern(success, failure)``:

- the **serial console** is a QEMU chardev socket with a ``logfile``:
  expect follows the log file QEMU writes (:class:`FileFollower`), input goes
  to the socket (:meth:`Console.send`, e.g. ESC to skip the shell's
  countdown), and a thread drains the socket all the time. QEMU's 16550
  waits for a full chardev to drain, so a serial port nobody reads would
  stall the guest once the socket buffer (about 200 KiB) is full: a debug
  build with its log on the serial port gets there.
  :func:`fd_console` is plain :class:`pexpect.fdpexpect.fdspawn` over any fd
  (a pty, a socket the caller keeps reading);
- the **debug log** (isa-debugcon at 0x402) is a file QEMU writes; it is
  followed like ``tail -f`` by :class:`FileFollower`, which inotify wakes
  when QEMU writes (:class:`FileWatch`).

A failure pattern (defaults :data:`DEFAULT_FAILURES`) fails the wait at
once with :class:`ConsoleFailure`; the deadline raises
:class:`ConsoleTimeout` naming what was awaited and quoting the last lines
of every log and the command line. Every line read is logged on the VM's
logger.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import pexpect
import pexpect.fdpexpect
import pexpect.spawnbase

from harness.errors import ConsoleFailure, ConsoleTimeout, UsageError
from harness.logtext import strip_ansi

LOG = logging.getLogger(__name__)

#: Failure patterns every wait watches unless told otherwise (regexes).
DEFAULT_FAILURES: tuple[str, ...] = (
    r"\bASSERT\b",            # edk2 DebugAssert: "ASSERT [Module] file(line): expr"
    r"!!!! X64 Exception",    # edk2 CpuExceptionHandlerLib
    # ... whose dump goes to the serial port; in PEI this line of it goes to
    # the debug log (seen under the emulated SEV-ES)
    r"!!!! Find image based on IP",
    r"Kernel panic",          # Linux
)

#: How many lines of each log a timeout or failure quotes.
TAIL_LINES = 40

Pattern = str | re.Pattern[str]


def tail_lines(path: Path, count: int = TAIL_LINES) -> str:
    """The last ``count`` lines of a text file ("" if it does not exist)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 256 * 1024))
            data = handle.read()
    except OSError:
        return ""
    text = strip_ansi(data.decode("utf-8", "replace")).replace("\r", "")
    return "\n".join(text.splitlines()[-count:])


class _LineLogger:
    """A file-like sink for pexpect's ``logfile_read``: logs whole lines."""

    def __init__(self, logger: logging.Logger, console: str) -> None:
        self._logger = logger
        self._console = console
        self._partial = ""
        self.lines: deque[str] = deque(maxlen=TAIL_LINES)

    def write(self, data: str) -> None:
        self._partial += data
        *complete, self._partial = re.split(r"\r?\n", self._partial)
        for raw in complete:
            line = strip_ansi(raw).replace("\r", "")
            self.lines.append(line)
            self._logger.debug("%s: %s", self._console, line)

    def flush(self) -> None:
        pass


class FileWatch:
    """Wakes a reader when a file is written: Linux inotify (through libc)
    on the file, or, while it does not exist, on its directory for its
    creation (a directory watch for writes would wake for every file there:
    QEMU writes the VARS copy beside the logs).

    The watch is armed only while a reader waits (:meth:`arm`,
    :meth:`disarm`): QEMU writes a log byte by byte, and every write to a
    watched file costs the writer an event, so a watch left armed while the
    reader reads would slow the guest down.

    :raises OSError: inotify is not available (the caller polls instead).
    """

    _IN_MODIFY = 0x002
    _IN_CLOSE_WRITE = 0x008
    _IN_MOVED_TO = 0x080
    _IN_CREATE = 0x100
    _FILE_MASK = _IN_MODIFY | _IN_CLOSE_WRITE
    _DIR_MASK = _IN_CREATE | _IN_MOVED_TO
    _EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len

    def __init__(self, path: Path) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._path = path
        self._name = os.fsencode(path.name)
        self._wd = -1
        self._on_file = False

    def arm(self) -> None:
        """Watch from now on (a reader should look at the file once more
        after this: what was written before is no event)."""
        if self._wd >= 0:
            return
        for target, mask, on_file in ((self._path, self._FILE_MASK, True),
                                      (self._path.parent, self._DIR_MASK, False)):
            self._wd = self._libc.inotify_add_watch(self._fd, os.fsencode(target), mask)
            if self._wd >= 0:
                self._on_file = on_file
                return
        raise OSError(ctypes.get_errno(), f"inotify_add_watch {self._path.parent}")

    def disarm(self) -> None:
        if self._wd >= 0:
            self._libc.inotify_rm_watch(self._fd, self._wd)
            self._wd = -1
        with contextlib.suppress(BlockingIOError):
            while os.read(self._fd, 65536):
                pass

    def wait(self, timeout: float) -> bool:
        """Whether the file changed within ``timeout`` seconds (armed)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._fd], [], [], remaining)[0]:
                return False
            if self._ours(os.read(self._fd, 65536)):
                return True

    def _ours(self, data: bytes) -> bool:
        if self._on_file:
            return bool(data)
        offset = 0
        while offset + self._EVENT.size <= len(data):
            _, _, _, length = self._EVENT.unpack_from(data, offset)
            start = offset + self._EVENT.size
            if data[start:start + length].rstrip(b"\0") == self._name:
                return True
            offset = start + length
        return False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class FileFollower(pexpect.spawnbase.SpawnBase):  # type: ignore[misc]
    """A pexpect spawn reading a file that another process appends to.

    Reads from the start of the file (it may not exist yet). At the end of
    the data it waits for the writer (:class:`FileWatch`: woken by the
    write itself, not by a timer; then :data:`GATHER` seconds more, so a
    burst of writes is one read), asking ``alive()`` at least every
    :data:`ALIVE` seconds; when ``alive()`` says the writer is gone and the
    file is read to the end, it reports EOF. A writer that never stops (the
    debug port, a byte at a time) is read at most every :data:`GATHER`
    seconds too: each read is searched, and hundreds of tiny reads a second
    took a fifth of a core from the guest they wait on.

    Expect searches a window of :data:`WINDOW` characters, never less than
    what the last read brought (a read is at most :data:`READ` bytes) plus
    the lines before it: a debug log of a SEV boot is 400 KB, and searching
    the whole of it after every read made waiting quadratic.
    """

    ALIVE = 0.1
    GATHER = 0.005
    READ = 4096
    WINDOW = 4 * READ

    def __init__(self, path: Path, alive: Callable[[], bool],
                 timeout: float = 30.0) -> None:
        super().__init__(timeout=timeout, maxread=self.READ, searchwindowsize=self.WINDOW,
                         encoding="utf-8", codec_errors="replace")
        self.path = Path(path)
        self.name = f"<file {path}>"
        self._alive = alive
        self.delayafterread = None      # pexpect's pause for ttys: reads pace themselves
        self._file: BinaryIO | None = None
        self._next_read = 0.0
        self._watch: FileWatch | None = None
        try:
            self._watch = FileWatch(self.path)
        except OSError as exc:
            LOG.debug("%s: no inotify (%s): polling", self.path, exc)

    def _read_some(self, size: int) -> bytes:
        if self._file is None:
            try:
                self._file = open(self.path, "rb")  # noqa: SIM115 - closed in close()
            except FileNotFoundError:
                return b""
        return self._file.read(size)

    def read_nonblocking(self, size: int = 1, timeout: float | None = -1) -> str:
        if timeout == -1:
            timeout = self.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            return self._read_or_wait(size, deadline)
        finally:
            if self._watch is not None:
                self._watch.disarm()

    def _read_or_wait(self, size: int, deadline: float | None) -> str:
        watch = self._watch
        armed = False
        while True:
            alive = self._alive()
            # Read after asking: what the writer flushed before it died is
            # still returned, and EOF comes only once that is read too.
            if (early := self._next_read - time.monotonic()) > 0:
                time.sleep(early)
            data = self._read_some(size)
            if len(data) < size:
                self._next_read = time.monotonic() + self.GATHER
            if data:
                text: str = self._decoder.decode(data, final=False)
                self._log(text, "read")
                return text
            if not alive:
                self.flag_eof = True
                raise pexpect.EOF(f"{self.path}: the writer exited")
            left = self.ALIVE if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise pexpect.TIMEOUT(f"no new data in {self.path}")
            if watch is None:
                time.sleep(min(left, 0.01))
            elif not armed:
                try:
                    watch.arm()     # then read once more: an earlier write is no event
                except OSError as exc:      # no watch left (max_user_watches), dir gone
                    LOG.debug("%s: inotify: %s: polling", self.path, exc)
                    watch.close()
                    self._watch = watch = None
                    continue
                armed = True
            elif watch.wait(min(left, self.ALIVE)):
                watch.disarm()
                armed = False
                time.sleep(self.GATHER)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._watch is not None:
            self._watch.close()
            self._watch = None

    def isalive(self) -> bool:
        return bool(self._alive())


class CrashWatch:
    """Whether a log another console writes (the serial port) shows the
    guest's CPU exception dump: the console being waited on (the debug log)
    would otherwise only time out. Reads what is new on each call.

    :param name: the console the log is of, for the error.
    """

    PATTERN = re.compile(rb"!!!! X64 Exception[^\r\n]*")
    #: What is kept of the log's end between calls, where no dump began.
    TAIL = 64

    def __init__(self, path: Path, name: str = "serial") -> None:
        self.path = Path(path)
        self.name = name
        self._offset = 0
        self._tail = b""
        self.line: str | None = None

    def seen(self) -> str | None:
        """The exception line, once the log has all of it."""
        if self.line is None:
            try:
                with open(self.path, "rb") as log:
                    log.seek(self._offset)
                    data = log.read()
            except OSError:
                return None
            self._offset += len(data)
            text = self._tail + data
            found = self.PATTERN.search(text)
            if found is None:
                self._tail = text[-self.TAIL:]
            elif found.end() < len(text):     # its line ended
                self.line = found[0].decode("latin-1").strip()
            else:                             # the line goes on: keep it whole
                self._tail = text[found.start():]
        return self.line


def _describe(pattern: Pattern) -> str:
    return repr(pattern.pattern if isinstance(pattern, re.Pattern) else pattern)


class Console:
    """One console of a VM, with the expect API.

    :param name: "serial" or "debugcon" (used in logs and errors).
    :param spawn: the pexpect spawn that reads it.
    :param logger: the VM's logger; every line is logged on a child of it.
    :param logs: log name to file, quoted (tails) in errors.
    :param command: QEMU's argv, quoted in errors.
    :param ended: why the console ended, when it does (QEMU's exit status or
        signal, a broken stream), for the error.
    :param crash: another console's watch (:class:`CrashWatch`) that ends
        this one: its line fails a wait whose failure patterns match it.
    """

    def __init__(self, name: str, spawn: pexpect.spawnbase.SpawnBase,
                 logger: logging.Logger, logs: Mapping[str, Path],
                 command: Sequence[str], link: ChardevLink | None = None,
                 ended: Callable[[], str] | None = None,
                 crash: CrashWatch | None = None) -> None:
        self.name = name
        self._spawn = spawn
        self._link = link
        self._ended = ended
        self._crash = crash
        self._lines = _LineLogger(logger.getChild(name), name)
        self._spawn.logfile_read = self._lines
        self._logs = dict(logs)
        self._command = list(command)

    @property
    def before(self) -> str:
        """What the last :meth:`expect` read before its match."""
        return str(self._spawn.before or "")

    @property
    def match(self) -> re.Match[str] | None:
        """The last :meth:`expect`'s match object."""
        match = self._spawn.match
        return match if isinstance(match, re.Match) else None

    def tails(self) -> dict[str, str]:
        """The last lines of every log this console knows about."""
        return {name: tail_lines(path) for name, path in self._logs.items()}

    def expect(self, success: Pattern | Iterable[Pattern],
               failure: Iterable[Pattern] | None = None,
               timeout: float = 30.0) -> re.Match[str]:
        """Wait for ``success`` (a regex, or any of several).

        :param failure: regexes that fail the wait at once; default
            :data:`DEFAULT_FAILURES`; ``()`` for none.
        :returns: the match of the success pattern.
        :raises ConsoleFailure: a failure pattern came first.
        :raises ConsoleTimeout: nothing matched before the deadline, or the
            console ended (QEMU exited).
        """
        wanted = [success] if isinstance(success, (str, re.Pattern)) else list(success)
        if not wanted:
            raise ValueError("expect needs at least one success pattern")
        failures = list(DEFAULT_FAILURES if failure is None else failure)
        compiled = [p if isinstance(p, re.Pattern) else re.compile(p)
                    for p in [*wanted, *failures]]
        awaited = " or ".join(_describe(p) for p in wanted)
        started = time.monotonic()
        try:
            index = self._spawn.expect_list(compiled, timeout=timeout)
        except pexpect.TIMEOUT as exc:
            raise ConsoleTimeout(self.name, awaited, timeout, self.tails(),
                                 self._command) from exc
        except pexpect.EOF as exc:
            crash = self._crash
            line = crash.seen() if crash is not None else None
            matched = [p for p in compiled[len(wanted):] if line and p.search(line)]
            if crash is not None and line is not None and matched:
                raise ConsoleFailure(crash.name, _describe(matched[0]), line,
                                     self.tails(), self._command) from exc
            why = self._ended() if self._ended is not None else "QEMU exited"
            raise ConsoleTimeout(
                self.name, f"{awaited} (the console ended: {why})",
                time.monotonic() - started, self.tails(), self._command) from exc
        match = self._spawn.match
        assert isinstance(match, re.Match)
        if index >= len(wanted):
            line = self._line_around(match)
            raise ConsoleFailure(self.name, _describe(compiled[index]), line,
                                 self.tails(), self._command)
        LOG.debug("%s: matched %s after %.2f s", self.name,
                  _describe(compiled[index]), time.monotonic() - started)
        return match

    def _line_around(self, match: re.Match[str]) -> str:
        before = str(self._spawn.before or "").rsplit("\n", 1)[-1]
        after = str(self._spawn.buffer or "").split("\n", 1)[0]
        return strip_ansi(before + match.group(0) + after).replace("\r", "")

    def send(self, text: str) -> None:
        """Write ``text`` to the console (the guest's serial input)."""
        if self._link is not None:
            self._link.send(text.encode())
        elif isinstance(self._spawn, FileFollower):
            raise UsageError(f"{self.name}: this guest's serial port takes no input "
                             "(MachineConfig serial_input=False)")
        else:
            self._spawn.send(text)

    def close(self) -> None:
        self._spawn.close()
        if self._link is not None:
            self._link.close()


class ChardevLink:
    """A connected chardev socket: input to the guest, output drained.

    The output is discarded here because QEMU also writes it to the
    chardev's ``logfile``, which the console follows.
    """

    def __init__(self, sock: socket.socket, name: str = "serial") -> None:
        self._sock = sock
        self.drained = 0
        self._thread = threading.Thread(target=self._drain, name=f"drain-{name}",
                                        daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        try:
            while True:
                data = self._sock.recv(65536)
                if not data:
                    return
                self.drained += len(data)
        except OSError:
            return

    def send(self, data: bytes) -> None:
        self._sock.sendall(data)

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the drain thread
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=5)


def serial_console(sock: socket.socket | None, log: Path, alive: Callable[[], bool],
                   logger: logging.Logger, logs: Mapping[str, Path],
                   command: Sequence[str], ended: Callable[[], str] | None = None) -> Console:
    """The serial console: expect on the chardev's ``log``, input to ``sock``
    (None: a port that takes no input)."""
    return Console("serial", FileFollower(log, alive), logger, logs, command,
                   link=None if sock is None else ChardevLink(sock), ended=ended)


def fd_console(fd: int, logger: logging.Logger, logs: Mapping[str, Path],
               command: Sequence[str], name: str = "serial") -> Console:
    """A console read straight from an fd (pty master, socket)."""
    spawn = pexpect.fdpexpect.fdspawn(fd, timeout=30, maxread=65536,
                                      encoding="utf-8", codec_errors="replace")
    return Console(name, spawn, logger, logs, command)


def debug_console(path: Path, alive: Callable[[], bool], logger: logging.Logger,
                  logs: Mapping[str, Path], command: Sequence[str],
                  ended: Callable[[], str] | None = None,
                  crash: CrashWatch | None = None) -> Console:
    """A console following the debug log file QEMU writes; ``crash``, the
    serial port's watch, ends it too."""
    alive_and_well = alive if crash is None else (lambda: alive() and crash.seen() is None)
    return Console("debugcon", FileFollower(path, alive_and_well), logger, logs, command,
                   ended=ended, crash=crash)
