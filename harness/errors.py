"""The harness's exceptions, one tree.

::

    HarnessError                    anything the harness raises on purpose
     +-- UsageError                 bad input from the user (exit 2)
     |    +-- SettingError          a setting's value (by field name) is refused
     |    +-- SourceError           --edk2-src is not an edk2 tree, bad checksum
     |    +-- PatchError            a patch of the series does not apply
     |    +-- SeriesError           a series file or a patch it names is missing
     |    +-- TraceFormatError      a debug log the trace parser cannot read
     |    |    +-- DeviceTraceError QEMU's device trace, cut, garbled or foreign
     |    +-- DumpFormatError       a memory dump that is not QEMU's ELF core
     +-- EnvironmentFailure         the machine could not do it (exit 3)
          +-- DependencyError       a tool or package is missing
          +-- BuildError            BaseTools or the OVMF build failed
          +-- LaunchError           QEMU would not start or died early
          +-- AbnormalShutdown      QEMU crashed, or had to be killed, at the end
          +-- ConsoleTimeout        an awaited pattern did not come in time
          +-- ConsoleFailure        a failure pattern came instead
          +-- QmpError              a QMP command failed
          +-- GuestCommandError     a command in the guest failed

Every error carries its data as attributes and a one-line ``str()`` that a
user can act on; the CLI prints that line and exits with ``exit_status``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

EXIT_OK = 0
EXIT_VIOLATION = 1
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 3
#: A bug of the harness's own: never 1, which says the firmware broke a rule.
EXIT_INTERNAL = 4
EXIT_INTERRUPTED = 130


class HarnessError(Exception):
    """Base of every error the harness raises on purpose."""

    exit_status = EXIT_ENVIRONMENT


class UsageError(HarnessError):
    """The user's input is wrong; nothing on this machine is to blame."""

    exit_status = EXIT_USAGE


class SettingError(UsageError):
    """A setting's value is refused. The setting is named by its field
    (``requeue_depth``), as the nightly's plans and the pytest options spell
    it; the command line names its flag instead (:attr:`setting` maps).

    :param setting: the field's name.
    :param value: the value refused, as given.
    :param reason: why, in the domain's words.
    """

    def __init__(self, setting: str, value: object, reason: str) -> None:
        super().__init__(f"{setting}={value}: {reason}")
        self.setting = setting
        self.value = value
        self.reason = reason

    def spelled(self, name: str) -> str:
        """The message with the setting spelled ``name`` (a flag)."""
        return f"{name} {self.value}: {self.reason}"


class SourceError(UsageError):
    """An edk2 source that cannot be used (not a tree, wrong checksum)."""


class PatchError(UsageError):
    """A patch of the series does not apply.

    :param patch: the patch file.
    :param target: the file in the edk2 tree the failing hunk is for.
    :param hunk: the number of the failing hunk (1-based), or None.
    :param output: what ``patch`` printed.
    """

    def __init__(self, patch: Path, target: str | None, hunk: int | None,
                 output: str) -> None:
        self.patch = patch
        self.target = target
        self.hunk = hunk
        self.output = output
        #: The tree it was applied to (set by the build: ``debian:edk2=...``).
        self.baseline: str | None = None
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"{self.target}" if self.target else "(no file)"
        if self.hunk is not None:
            where += f" hunk #{self.hunk}"
        first = next((line for line in self.output.splitlines() if line.strip()), "")
        onto = f" to {self.baseline}" if self.baseline else ""
        return f"patch {self.patch.name} does not apply{onto}: {where}: {first}"

    def __str__(self) -> str:
        return self._message()


class SeriesError(UsageError):
    """A patch series that cannot be read: its ``series`` file, or a patch
    it names, is missing. ``str()`` names the full path."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        super().__init__(f"{path}: {reason}")


class LogFormatError(UsageError):
    """A file that is not a boot log: missing, a directory, empty, binary,
    or without one line of an OVMF boot log."""


class TraceFormatError(LogFormatError):
    """A debug log that cannot be read as an EBS trace."""

    def __init__(self, path: Path | str, line: int | None, reason: str) -> None:
        self.path = path
        self.line = line
        self.reason = reason
        at = f":{line}" if line is not None else ""
        super().__init__(f"{path}{at}: {reason}")


class DumpFormatError(UsageError):
    """A memory dump that is not a complete QEMU ELF core."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class EnvironmentFailure(HarnessError):
    """This machine could not do what was asked."""

    exit_status = EXIT_ENVIRONMENT


class DependencyError(EnvironmentFailure):
    """A required tool or package is missing."""


class BuildError(EnvironmentFailure):
    """A build step failed.

    :param step: what was being built ("BaseTools", "OVMF").
    :param command: the argv that failed.
    :param log: where the full output is.
    :param tail: the last lines of that output.
    """

    def __init__(self, step: str, command: Sequence[str], log: Path,
                 tail: str) -> None:
        self.step = step
        self.command = list(command)
        self.log = log
        self.tail = tail
        last = next((line for line in reversed(tail.splitlines())
                     if line.strip()), "")
        super().__init__(f"{step} build failed (log: {log}): {last}")


class LaunchError(EnvironmentFailure):
    """QEMU did not start, or died before it was of use.

    :param exitcode: QEMU's exit status, or None if it was still running.
    :param command: QEMU's argv.
    :param log: QEMU's own output (stderr), as far as there was any.
    """

    def __init__(self, reason: str, exitcode: int | None = None,
                 command: Sequence[str] = (), log: str = "") -> None:
        self.reason = reason
        self.exitcode = exitcode
        self.command = list(command)
        self.log = log
        detail = next((line for line in log.splitlines() if line.strip()), "")
        text = reason if not detail else f"{reason}: {detail}"
        super().__init__(text)


def _tails_text(tails: dict[str, str], command: Sequence[str]) -> str:
    import shlex  # only needed for the report
    parts = []
    for name, tail in tails.items():
        body = "\n".join("    " + line for line in tail.splitlines()) or "    (empty)"
        parts.append(f"--- last lines of {name}:\n{body}")
    if command:
        parts.append("--- command line:\n    " + shlex.join(command))
    return "\n".join(parts)


class AbnormalShutdown(EnvironmentFailure):
    """QEMU did not end by the harness's ``quit``: it crashed or exited with
    an error on its own, or did not quit in time and was killed.

    :param reason: how it ended.
    :param log: the tail of QEMU's stderr.
    """

    def __init__(self, reason: str, log: str = "") -> None:
        super().__init__(f"QEMU ended abnormally: {reason}"
                         + (f"\n{log}" if log else ""))
        self.reason = reason
        self.log = log


class ConsoleTimeout(EnvironmentFailure):
    """An awaited pattern did not appear before the deadline.

    The first line of ``str()`` names what was awaited; the following lines
    quote the log tails and the command line, so a test failure shows them.

    :param console: which console was read ("serial", "debugcon").
    :param awaited: the pattern(s) waited for.
    :param timeout: the deadline in seconds.
    :param tails: log name to its last lines (debug log, serial log).
    :param command: QEMU's argv.
    """

    def __init__(self, console: str, awaited: str, timeout: float,
                 tails: dict[str, str] | None = None,
                 command: Sequence[str] = ()) -> None:
        self.console = console
        self.awaited = awaited
        self.timeout = timeout
        self.tails = dict(tails or {})
        self.command = list(command)
        super().__init__(
            f"timed out after {timeout:g} s on {console} waiting for {awaited}\n"
            + _tails_text(self.tails, self.command))


class ConsoleFailure(EnvironmentFailure):
    """A failure pattern (ASSERT, exception, panic) appeared.

    :param console: which console showed it.
    :param pattern: the failure pattern that matched.
    :param line: the line it matched in.
    :param tails: log name to its last lines.
    :param command: QEMU's argv.
    """

    def __init__(self, console: str, pattern: str, line: str,
                 tails: dict[str, str] | None = None,
                 command: Sequence[str] = ()) -> None:
        self.console = console
        self.pattern = pattern
        self.line = line
        self.tails = dict(tails or {})
        self.command = list(command)
        super().__init__(
            f"failure pattern {pattern} on {console}: {line.strip()}\n"
            + _tails_text(self.tails, self.command))


class QmpError(EnvironmentFailure):
    """A QMP command failed or QMP could not be reached."""


class GuestCommandError(EnvironmentFailure):
    """A command run in the guest failed.

    :param command: the command line.
    :param status: its exit status.
    :param stdout: what it printed.
    :param stderr: what it printed on stderr.
    """

    def __init__(self, command: str, status: int, stdout: str,
                 stderr: str) -> None:
        self.command = command
        self.status = status
        self.stdout = stdout
        self.stderr = stderr
        last = next((line for line in reversed(stderr.splitlines())
                     if line.strip()), "")
        super().__init__(f"guest command {command!r} exited {status}: {last}")
