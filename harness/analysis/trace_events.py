"""QEMU's trace-event formats, read from the QEMU that ran.

Every QEMU build lists its trace events, with the printf format of each, in
``trace-events-all`` (the ``trace-events`` files of its tree, concatenated).
An installed QEMU has it in its data directory (Debian:
``/usr/share/qemu/trace-events-all``), a build tree beside the binary, and
the harness's own QEMU in ``share/`` of its published directory
(``ebs-harness build-qemu``). The device trace's header names the file of
the QEMU that wrote it (:func:`events_file`, found when the harness keeps
the trace), and :mod:`harness.analysis.devices` reads each line against that
QEMU's format of its event (:func:`formats_for_trace`): a QEMU whose formats
changed is read as it writes, and an event it lacks is named in one line
(:func:`lacking`) rather than misread.

A line of the file::

    name(type arg, ...) "format"
    disable name(...) "format" "
    ahci_mem_write(void *s, unsigned size, uint64_t addr, uint64_t val) "ahci(%p): write%u @ 0x%"PRIx64": 0x%016"PRIx64

The ``PRI*`` macros are spelled out as glibc on x86-64 defines them (what a
Debian QEMU prints): ``PRIx64`` is ``lx``, ``PRIu32`` is ``u``.
"""

from __future__ import annotations

import functools
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

FILE_NAME = "trace-events-all"

_DECLARATION = re.compile(r'^(?:disable\s+|vcpu\s+|tcg\s+)*([A-Za-z0-9_]+)\(([^)]*)\)\s*(".*)$')
#: A C string literal, or a ``PRI*`` macro between two.
_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"|PRI([diouxX])(8|16|32|64|PTR)')


def _format(literal: str) -> str:
    """The C string literals and ``PRI*`` macros of a declaration as one
    format string."""
    out: list[str] = []
    for match in _TOKEN.finditer(literal):
        if match.group(2):
            out.append(("l" if match.group(3) in ("64", "PTR") else "") + match.group(2))
        else:
            out.append(match.group(1).replace('\\"', '"').replace("\\\\", "\\"))
    return "".join(out)


def parse_trace_events(text: str, names: Iterable[str] | None = None) -> dict[str, str]:
    """Event name -> its format, from the text of a ``trace-events`` file;
    only the events of ``names``, when given (a whole file has thousands)."""
    wanted = None if names is None else frozenset(names)
    formats: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if wanted is not None and line.split("(", 1)[0].split()[-1] not in wanted:
            continue
        match = _DECLARATION.match(line)
        if match:
            formats.setdefault(match.group(1), _format(match.group(3)))
    return formats


def events_file(qemu: str | Path) -> Path | None:
    """The ``trace-events-all`` of the QEMU binary ``qemu`` (a path, or a name
    on ``PATH``), or None: beside it (a build tree), in ``../share/`` (the
    harness's published QEMU) or ``../share/qemu/`` (an installed QEMU)."""
    found = shutil.which(str(qemu)) or str(qemu)
    binary = Path(found).resolve()
    for candidate in (binary.parent / FILE_NAME, binary.parent.parent / "share" / FILE_NAME,
                      binary.parent.parent / "share" / "qemu" / FILE_NAME):
        if candidate.is_file():
            return candidate
    return None


@functools.lru_cache(maxsize=16)
def _load(path: Path, mtime_ns: int, names: frozenset[str] | None) -> dict[str, str]:
    del mtime_ns    # part of the cache key only
    return parse_trace_events(path.read_text(errors="replace"), names)


def load(path: Path, names: Iterable[str] | None = None) -> dict[str, str]:
    """:func:`parse_trace_events` of the file at ``path`` (read once while
    it is unchanged)."""
    return _load(path, path.stat().st_mtime_ns, None if names is None else frozenset(names))


def lacking(formats: Mapping[str, str], names: Iterable[str], qemu: str) -> str | None:
    """One line naming the events of ``names`` that ``formats`` (QEMU
    ``qemu``'s) lacks, or None when it has them all."""
    missing = sorted({name for name in names if name not in formats})
    if not missing:
        return None
    return (f"QEMU {qemu} has no trace event {', '.join(missing)}: not traced, its device "
            "judged without it")


def formats_for_trace(qemu: str | None, events: Path | None,
                      fallback: Mapping[str, tuple[str, object]]
                      ) -> tuple[Mapping[str, str], tuple[str, ...]]:
    """The formats to read a trace of QEMU version ``qemu`` with: those of
    its ``trace-events-all`` at ``events`` (the trace's header names it), or
    ``fallback``'s (event -> (format, ...), QEMU 7.2's in
    :mod:`harness.analysis.devices`) with a note saying so; and a note
    naming the events of ``fallback`` that QEMU lacks."""
    if events is None or not events.is_file():
        where = f"{events} is gone" if events is not None else "the trace names none"
        note = (f"no trace-events-all of QEMU {qemu or '(unknown)'} ({where}): read with "
                "QEMU 7.2's formats")
        return {name: fmt for name, (fmt, _) in fallback.items()}, (note,)
    formats = load(events, fallback)
    lacks = lacking(formats, fallback, qemu or "unknown")
    return formats, (lacks,) if lacks else ()
