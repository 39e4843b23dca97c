"""Where a QEMU runs: the seam between a machine and its host.

:class:`~harness.vm.machine.QemuMachine` does everything that is the same
wherever QEMU runs (argv, artifacts, QMP, consoles, SEV checks, shutdown);
a :class:`Runner` does the few things that differ: the private working
directory, putting input files where QEMU reads them, starting the
process, reaching its unix sockets, bringing back what it writes. Two
runners exist: :class:`LocalRunner` (this host) and
:class:`harness.vm.remote.SshRunner` (another host, over SSH).

A runner serves one QEMU: :meth:`Runner.open` once, :meth:`Runner.close`
(idempotent) when the machine is done; nothing it made outlives the close.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from harness.errors import DependencyError, LaunchError
from harness.tools import scratch_dir
from harness.vm import limits


class Process(Protocol):
    """A started QEMU, as the machine sees it."""

    def poll(self) -> int | None:
        """Its exit status once it has ended, else None."""

    def wait(self, timeout: float) -> int:
        """Wait for it to end; its exit status. :raises TimeoutError:"""

    def kill(self) -> None:
        """End it now and wait for that (a no-op once it has ended)."""

    def ended(self) -> str:
        """How it ended (exit status, signal, a broken connection), for errors;
        "QEMU is still running" while it runs."""

    def readable(self) -> bool:
        """Its logs may still grow: the consoles wait on."""

    def stderr_text(self) -> str:
        """What it printed so far (stdout and stderr)."""


class Runner(Protocol):
    """The host side of one QEMU run."""

    #: Where QEMU runs, for messages: "" for this host, else ``user@host:port``.
    where: str

    def open(self) -> Path:
        """Make the private (0700) working directory; its path where QEMU runs."""

    def place(self, local: Path, name: str) -> Path:
        """A file QEMU reads, where it can read it (``name`` in the working
        directory if it must be copied there)."""

    def output(self, local: Path) -> Path:
        """Where QEMU writes a log the harness keeps at ``local``: that file
        grows as QEMU writes (the consoles follow it)."""

    def landing(self, local: Path) -> Path:
        """Where QEMU writes a file that :meth:`fetch` then brings to ``local``."""

    def fetch(self, landed: Path, local: Path) -> None:
        """Bring a file QEMU wrote at ``landed`` to ``local``."""

    def start(self, argv: Sequence[str], *, stderr: Path, memlock: int | None) -> Process:
        """Start ``argv`` with its output in ``stderr`` (an :meth:`output` or a
        working-directory path); ``memlock``: the locked-memory limit it needs.

        :raises LaunchError: it cannot be started (a limit this user cannot raise).
        """

    def has_socket(self, path: Path) -> bool:
        """A unix socket QEMU listens on is there."""

    def connect(self, path: Path) -> socket.socket:
        """A connected stream to QEMU's unix socket ``path``. :raises OSError:"""

    def sockets_done(self) -> None:
        """Every socket is connected: their names are of no further use."""

    def close(self) -> None:
        """Remove the working directory and what the run left; idempotent."""


# ------------------------------------------------------------ process


def dies_with_us(argv: Sequence[str]) -> list[str]:
    """``argv`` run so that it gets SIGKILL when the thread that started it
    dies, however that dies: util-linux's ``setpriv`` sets
    ``PR_SET_PDEATHSIG`` and then execs it (same PID), so no Python runs in
    the forked child of this multi-threaded process (``preexec_fn`` would).

    :raises DependencyError: no ``setpriv`` (util-linux) on this host.
    """
    if shutil.which("setpriv") is None:
        raise DependencyError("setpriv not found (it makes QEMU die with the harness): "
                              "install util-linux")
    return ["setpriv", "--pdeathsig", "KILL", "--", *argv]


def describe_exit(code: int | None, *, shell: bool = False) -> str:
    """How a QEMU ended, from its exit status (``shell``: as a shell reports
    it, 128 + the signal's number for a signal)."""
    if code is None:
        return "QEMU is still running"
    number = -code if code < 0 else (code - 128 if shell and code > 128 else 0)
    if number:
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return f"QEMU was killed by {name}"
    return f"QEMU exited with status {code}"


class LocalProcess:
    """A QEMU child of this process. It gets ``PR_SET_PDEATHSIG(SIGKILL)``
    (:func:`dies_with_us`): it dies with the harness, however the harness
    dies. The signal follows the *thread* that started it: start it from a
    thread that outlives the machine."""

    def __init__(self, argv: Sequence[str], stderr: Path) -> None:
        self._stderr = stderr
        with open(stderr, "wb") as out:
            self.popen = subprocess.Popen(dies_with_us(argv), stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=subprocess.STDOUT, close_fds=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float) -> int:
        # Woken by the exit itself (a pidfd), not by Popen.wait()'s polls,
        # whose pauses double up to 50 ms: QEMU quits in about 10.
        timeout = max(0.0, timeout)
        if self.popen.poll() is None:
            try:
                pidfd: int | None = os.pidfd_open(self.popen.pid)
            except OSError:     # a kernel before 5.3: Popen.wait()'s polls
                pidfd = None
            if pidfd is not None:
                try:
                    poller = select.poll()
                    poller.register(pidfd, select.POLLIN)
                    ended = bool(poller.poll(timeout * 1000))
                finally:
                    os.close(pidfd)
                if not ended:
                    raise TimeoutError(f"QEMU {self.pid} still runs after {timeout:g} s")
                return self.popen.wait()    # it has ended: reaped at once
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"QEMU {self.pid} still runs after {timeout:g} s") from exc

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()

    def ended(self) -> str:
        return describe_exit(self.popen.poll())

    def readable(self) -> bool:
        return self.popen.poll() is None

    def stderr_text(self) -> str:
        try:
            return self._stderr.read_text(errors="replace")
        except OSError:
            return ""


class LocalRunner:
    """QEMU on this host: the working directory is a scratch directory of
    this process (:func:`harness.tools.scratch_dir`; one a killed harness
    leaves behind is swept by the next), removed once the sockets are
    connected (the connected sockets live on); QEMU reads the inputs where
    they are and writes the logs straight into the artifacts."""

    where = ""

    def __init__(self) -> None:
        self.directory: Path | None = None

    def open(self) -> Path:
        if self.directory is not None:
            raise LaunchError("a runner serves one QEMU")
        self.directory = scratch_dir("qemu")  # mode 0700
        return self.directory

    def place(self, local: Path, name: str) -> Path:
        return local.absolute()

    def output(self, local: Path) -> Path:
        return local

    def landing(self, local: Path) -> Path:
        return local

    def fetch(self, landed: Path, local: Path) -> None:
        if landed != local:
            shutil.move(landed, local)

    def start(self, argv: Sequence[str], *, stderr: Path, memlock: int | None) -> LocalProcess:
        if memlock is not None:
            problem = limits.ensure_memlock(memlock)
            if problem:
                raise LaunchError(problem, None, argv)
        return LocalProcess(argv, stderr)

    def has_socket(self, path: Path) -> bool:
        return path.exists()

    def connect(self, path: Path) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
        except OSError:
            sock.close()
            raise
        return sock

    def sockets_done(self) -> None:
        self.close()

    def close(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
