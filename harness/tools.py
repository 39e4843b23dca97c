"""Running the host tools the harness drives (apt, dpkg, patch, mtools, ...).

One rule for all of them: a tool that is not installed is a
:class:`~harness.errors.DependencyError` naming it and how to get it; a tool
that fails is an :class:`~harness.errors.EnvironmentFailure` naming what was
being done, the exit status and the last line the tool printed.

And one rule for the scratch directories the harness makes in the system's
temporary directory (QEMU's sockets, the host probe's VARS copies, FAT
images): :func:`scratch_dir` names them after the process that made them,
and sweeps those whose process is gone, so that nothing a killed harness
left outlives the next run.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from harness.errors import DependencyError, EnvironmentFailure

SETUP_HINT = "run ./run setup as root"


def run_tool(argv: Sequence[str], *, what: str | None = None, cwd: Path | None = None,
             env: Mapping[str, str] | None = None, hint: str = SETUP_HINT) -> str:
    """Run ``argv`` to completion; its stdout.

    :param what: what the command is for, in errors (default: the command).
    :param hint: how to install the tool, when it is missing.
    """
    what = what or shlex.join(argv)
    try:
        proc = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True,
                              check=False, env=None if env is None else dict(env))
    except FileNotFoundError as exc:
        raise DependencyError(f"{argv[0]} not found (needed for {what}): {hint}") from exc
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        last = lines[-1] if lines else ""
        raise EnvironmentFailure(f"{what} failed (exit {proc.returncode}): {last}")
    return proc.stdout


#: ``ebs-PID-WHAT-XXXXXXXX`` in the system's temporary directory (short: QEMU's
#: sockets live there, and a socket path has at most 107 bytes).
SCRATCH_PREFIX = "ebs-"
_SCRATCH_RE = re.compile(re.escape(SCRATCH_PREFIX) + r"(\d+)-")


def scratch_dir(what: str) -> Path:
    """A new private (0700) directory of this process for ``what``; the
    caller removes it. Orphans of dead processes are swept first (once per
    process and temporary directory)."""
    _sweep_once(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-{what}-"))


@contextmanager
def scratch(what: str) -> Iterator[Path]:
    """:func:`scratch_dir` as a context: removed on the way out."""
    path = scratch_dir(what)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def sweep_scratch(root: Path | None = None) -> list[Path]:
    """Remove the scratch directories of this user whose process is gone
    (``root``: the temporary directory); the ones removed."""
    root = Path(tempfile.gettempdir()) if root is None else root
    swept: list[Path] = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return swept
    for entry in entries:
        match = _SCRATCH_RE.match(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != os.geteuid():
                continue
        except OSError:
            continue
        if pid_alive(int(match.group(1))):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        swept.append(Path(entry.path))
    return swept


@functools.cache
def _sweep_once(root: str) -> None:
    sweep_scratch(Path(root))


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block ends, then raise it: imports
    broken half-way by a KeyboardInterrupt leave modules half made (a
    dataclass's ``__set_name__`` fails, the interpreter ends on the signal).
    Outside the main thread, which gets no KeyboardInterrupt, it holds
    nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: held.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


def pid_alive(pid: int) -> bool:
    """A process ``pid`` exists on this machine (perhaps another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
