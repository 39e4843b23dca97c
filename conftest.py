"""Thin: the harness's pytest plugin (options, markers, fixtures) comes with
the installed package (entry point ``pytest11``); pytester lets tests/unit
check that plugin on inner pytest runs."""

pytest_plugins = ["pytester"]

import re
from collections.abc import Callable
from pathlib import Path

import pytest

FAULTS_PATCH = Path(__file__).parent / "tests" / "data" / "firmware-variants" / \
    "adversary-faults.patch"


@pytest.fixture(scope="session")
def fault_line() -> Callable[[str], int]:
    """The line, in the source file that ``adversary-faults.patch`` makes, of
    the added line carrying a marker (``EBS-FAULT-PF``, ``EBS-FAULT-ASSERT``),
    read from the patch's hunk: what a crash report must name."""
    text = FAULTS_PATCH.read_text()

    def line_of(marker: str) -> int:
        for hunk in re.finditer(r"^@@ -\d+,\d+ \+(\d+),\d+ @@[^\n]*\n(.*?)(?=^@@|\Z)", text,
                                re.MULTILINE | re.DOTALL):
            line = int(hunk.group(1))
            for row in hunk.group(2).splitlines():
                if marker in row:
                    return line
                line += not row.startswith("-")
        raise LookupError(f"{marker} is in no hunk of {FAULTS_PATCH}")

    return line_of
