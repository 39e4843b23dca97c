"""harness.vm.runner's local process: its wait, woken by the exit itself."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from harness.vm import runner


def _process(tmp_path: Path, script: str) -> runner.LocalProcess:
    return runner.LocalProcess(["sh", "-c", script], tmp_path / "stderr.log")


@pytest.fixture(params=["pidfd", "polled"])
def waits_by(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each way the wait can go: a pidfd, or Popen's polls (a kernel before 5.3)."""
    if request.param == "polled":
        def no_pidfd(pid: int) -> int:
            raise OSError(38, "Function not implemented")
        monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    return str(request.param)


@pytest.mark.usefixtures("waits_by")
def test_wait_returns_the_exit_status(tmp_path: Path) -> None:
    process = _process(tmp_path, "sleep 0.2; echo done; exit 3")
    assert process.wait(30) == 3
    assert process.poll() == 3 and process.stderr_text().strip() == "done"
    assert process.wait(30) == 3    # again, once reaped


@pytest.mark.usefixtures("waits_by")
def test_wait_past_the_timeout_raises_and_leaves_it_running(tmp_path: Path) -> None:
    process = _process(tmp_path, "sleep 30")
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match="still runs after 0.3 s"):
            process.wait(0.3)
        # the time was not waited twice over
        assert 0.3 <= time.monotonic() - started < 10
        assert process.poll() is None
    finally:
        process.kill()
    assert process.poll() is not None
