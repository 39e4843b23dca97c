"""harness.tools: the one way host tools are run, and scratch directories
that do not outlive a killed harness."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
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


def test_interrupts_held_raise_once_the_block_is_done() -> None:
    steps = []
    with pytest.raises(KeyboardInterrupt), tools.interrupts_held():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)            # the handler runs here: no exception yet
        steps.append("block done")
    assert steps == ["block done"]
    # the usual handler is back
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_interrupts_held_without_a_signal_change_nothing() -> None:
    with tools.interrupts_held():
        value = 1
    assert value == 1 and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_interrupts_held_outside_the_main_thread_hold_nothing() -> None:
    """signal.signal() works in the main thread only: elsewhere it is a no-op."""
    errors: list[BaseException] = []

    def body() -> None:
        try:
            with tools.interrupts_held():
                pass
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    worker = threading.Thread(target=body)
    worker.start()
    worker.join()
    assert errors == []
