"""What firmware output looks like as text, for every reader of it.

The serial console carries the firmware's terminal escapes (colours, cursor
moves, character-set selections), and a debug log captured from it keeps
them; the console expecter, the trace parser and ``explain-log`` strip the
same set. PlatformPei's line under SEV gives the C-bit mask (its group: ``0x...``); the trace
parser and ``explain-log`` both read it.
"""

from __future__ import annotations

import re

#: A CSI sequence (``ESC [ params letter``), a character-set selection
#: (``ESC ( B``), or an ESC the capture cut from its sequence.
ANSI = r"\x1b\[[0-9;?=]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\x1b"
ANSI_RE = re.compile(ANSI)
#: The same, with carriage returns, at the start of a raw (bytes) log line.
LEADING_JUNK_RE = re.compile(rb"^(?:\r|" + ANSI.encode() + rb")*")

#: OvmfPkg PlatformPei (AmdSev.c) under SEV: ``SEV is enabled (mask 0x800000000000)``.
SEV_MASK = r"SEV is enabled \(mask (0x[0-9a-fA-F]{1,16})\)"
SEV_MASK_RE = re.compile(SEV_MASK)

#: PlatformPei under SEV-ES: ``SEV-ES is enabled, 2 GHCB pages allocated
#: starting at 0x1FF76000``: per CPU a GHCB page, shared with the
#: hypervisor, and a private page of per-CPU variables.
GHCB_PAGES = r"SEV-ES is enabled, (\d+) GHCB pages allocated starting at (0x[0-9a-fA-F]{1,16})"


def strip_ansi(text: str) -> str:
    """``text`` without terminal escapes."""
    return ANSI_RE.sub("", text)
