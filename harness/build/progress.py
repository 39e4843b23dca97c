"""Where long work reports its phases: progress lines of the builds.

A build says what it is doing (``[  12.3s] patch: 7 patches``) through a
:class:`Progress`: on stderr for a person (:class:`StderrProgress`), to the
debug log otherwise (:class:`QuietProgress`); :func:`counter` turns a
build's output lines into ``"174 modules so far"``.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable
from typing import IO, Protocol

LOG = logging.getLogger(__name__)


class Progress(Protocol):
    """Where long work reports its phases."""

    def phase(self, name: str, detail: str = "") -> None: ...


class StderrProgress:
    """Phase lines with elapsed seconds on stderr: ``[  12.3s] patch: 7 patches``."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream or sys.stderr
        self._start = time.monotonic()

    def phase(self, name: str, detail: str = "") -> None:
        elapsed = time.monotonic() - self._start
        text = f"{name}: {detail}" if detail else name
        print(f"[{elapsed:6.1f}s] {text}", file=self._stream, flush=True)


class QuietProgress:
    """Phases go to the debug log only."""

    def phase(self, name: str, detail: str = "") -> None:
        LOG.debug("%s: %s", name, detail)


def counter(pattern: str, unit: str) -> Callable[[str], str | None]:
    """A ``progress_of`` for :meth:`harness.build.cache.CachedBuilder._stream` that counts the
    lines matching ``pattern``: ``"174 modules so far"``."""
    regex = re.compile(pattern)
    count = 0

    def progress_of(line: str) -> str | None:
        nonlocal count
        if regex.search(line):
            count += 1
            return f"{count} {unit} so far"
        return None

    return progress_of
