"""harness.tools: the one way host tools are run, and scratch directories
that do not outlive a killed harness."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from harness import tools
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


def test_scratch_directories_of_dead_processes_are_swept(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """What a killed harness left is removed by the next one; what a live
    process (this one) or another user holds is not."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = tmp_path / f"ebs-{dead.pid}-qemu-x1"
    (orphan / "sub").mkdir(parents=True)
    (orphan / "sub" / "OVMF_VARS.fd").write_bytes(b"\0" * 16)
    unrelated = tmp_path / "ebs-harness.XXXX"          # a remote directory, not ours
    unrelated.mkdir()
    with tools.scratch("probe-tcg") as mine:
        assert mine.parent == tmp_path and mine.name.startswith(f"ebs-{os.getpid()}-probe-tcg-")
        assert not orphan.exists() and unrelated.exists()
        assert tools.sweep_scratch(tmp_path) == []      # ours is alive: kept
        assert mine.exists()
    assert not mine.exists()
