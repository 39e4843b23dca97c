"""harness.tools.run_tool: the one way host tools are run."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import DependencyError, EnvironmentFailure
from harness.tools import run_tool


def test_output_of_a_good_run(tmp_path: Path) -> None:
    assert run_tool(["sh", "-c", "pwd"], cwd=tmp_path).strip() == str(tmp_path)


def test_missing_tool_names_it_and_how_to_get_it() -> None:
    with pytest.raises(DependencyError, match=r"no-such-tool not found \(needed for "
                                              r"making a thing\): install it"):
        run_tool(["no-such-tool"], what="making a thing", hint="install it")


def test_failure_names_what_status_and_last_line() -> None:
    with pytest.raises(EnvironmentFailure) as caught:
        run_tool(["sh", "-c", "echo first >&2; echo 'E: the reason' >&2; exit 4"],
                 what="fetching the source")
    assert str(caught.value) == "fetching the source failed (exit 4): E: the reason"
