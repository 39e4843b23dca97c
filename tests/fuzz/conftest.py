"""Fuzz tests. In the default run they are a smoke (a few dozen examples per
test, plus the corpus); asked for with ``-m fuzz`` they run long (3000 per
test). ``EBS_FUZZ_EXAMPLES`` sets the count either way."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# The dump writer of the unit tests (tests/unit/coredump.py) builds the seeds.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))

SMOKE_EXAMPLES = 40
LONG_EXAMPLES = 3000


def pytest_configure(config: pytest.Config) -> None:
    asked = "fuzz" in (config.option.markexpr or "").replace("not fuzz", "")
    os.environ.setdefault("EBS_FUZZ_EXAMPLES", str(LONG_EXAMPLES if asked else SMOKE_EXAMPLES))
