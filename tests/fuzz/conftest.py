"""Fuzz tests: deselected by default (``-m 'not fuzz'`` in the pytest addopts);
run them with ``pytest tests/fuzz -m fuzz`` (EBS_FUZZ_EXAMPLES sets the count)."""

from __future__ import annotations

import sys
from pathlib import Path

# The dump writer of the unit tests (tests/unit/coredump.py) builds the seeds.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))
