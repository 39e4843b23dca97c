"""Running the host tools the harness drives (apt, dpkg, patch, mtools, ...).

One rule for all of them: a tool that is not installed is a
:class:`~harness.errors.DependencyError` naming it and how to get it; a tool
that fails is an :class:`~harness.errors.EnvironmentFailure` naming what was
being done, the exit status and the last line the tool printed.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Mapping, Sequence
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
