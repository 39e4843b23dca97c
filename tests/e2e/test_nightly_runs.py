"""The nightly runner end to end: one plan, this host and a "remote" one
(Debian's OpenSSH server on 127.0.0.1), run twice with the firmware broken
in between; and a runner killed mid-plan. Whole ``ebs-harness nightly``
processes, real boots, the history read back."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.build import edk2
from harness.build.progress import StderrProgress
from harness.nightly.history import History
from harness.vm import remote
from harness.vm.ssh import ClientKey

pytestmark = [
    pytest.mark.tcg,
    pytest.mark.sev_emulated,
    pytest.mark.skipif(os.geteuid() != 0, reason="sshd with privilege separation needs root"),
    pytest.mark.skipif(not remote.LocalSshd.SSHD.is_file(),
                       reason="needs /usr/sbin/sshd (Debian's openssh-server, scripts/setup-host)"),
]

DATA = Path(__file__).resolve().parents[1] / "data"
PCD = DATA / "firmware-variants" / "teardown-reads-a-dynamic-pcd.patch"


@pytest.fixture(scope="module")
def far(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """A "remote" host: its URL, a known_hosts file and a key to log in with."""
    key = ClientKey.generate()
    home = tmp_path_factory.mktemp("far")
    with remote.LocalSshd(home / "sshd", key.public_line) as sshd:
        key.write(home / "id_ed25519")
        yield f"ssh://root@127.0.0.1:{sshd.port}", sshd.known_hosts, home / "id_ed25519"


def plan_text(url: str, known_hosts: Path, identity: Path, scenarios: str) -> str:
    return f"""
name = "e2e"
[[host]]
name = "here"
[[host]]
name = "far"
where = "{url}"
known_hosts = "{known_hosts}"
identity = "{identity}"
[[firmware]]
name = "fw"
dir = "fw"
{scenarios}
"""


CALLBACK = """
[[scenario]]
name = "callback-d2"
ebs_mode = "callback"
requeue_depth = 2
sev = ["off", "emulated"]
accel = "tcg"
"""


def nightly(plan: Path, *extra: str) -> tuple[int, dict[str, object]]:
    proc = subprocess.run([sys.executable, "-m", "harness", "nightly", "--plan", str(plan),
                           "--history", str(plan.parent / "history.db"), "--json", *extra],
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.stdout, proc.stderr[-3000:]
    data: dict[str, object] = json.loads(proc.stdout)
    return proc.returncode, data


def test_the_second_night_names_exactly_what_the_broken_firmware_broke(
        far: tuple[str, Path, Path], tmp_path: Path) -> None:
    series = edk2.build_firmware(progress=StderrProgress()).output
    broken = edk2.build_variant(PCD, progress=StderrProgress()).output
    plan = tmp_path / "plan.toml"
    plan.write_text(plan_text(*far, CALLBACK))
    (tmp_path / "fw").symlink_to(series.path)
    status, first = nightly(plan)
    assert status == 0, first
    assert first["counts"] == {"pass": 3, "fail": 0, "not-run": 1, "error": 0}, first["report"]
    # the night's firmware change: the teardown reads a dynamic PCD again
    (tmp_path / "fw").unlink()
    (tmp_path / "fw").symlink_to(broken.path)
    html = tmp_path / "morning.html"
    status, second = nightly(plan, "--html", str(html), "--junit", str(tmp_path / "j.xml"))
    assert status == 1, second["report"]
    regressions = second["regressions"]
    assert isinstance(regressions, list)
    assert [(r["case_key"], r["kind"]) for r in regressions] == [
        ("here/fw/callback-d2/emulated/tcg", "newly failing")], second["report"]
    assert "C1, C3" in regressions[0]["detail"]
    report = str(second["report"])
    assert "far/fw/callback-d2/emulated/tcg: not-run" in report     # the remote's plain QEMU
    assert "here/fw/callback-d2/off/tcg" not in str(second["changes"])   # emulation mode: blind
    # the history names both firmware keys and the kernel; the junit has the failure
    with History(tmp_path / "history.db") as history:
        runs = history.runs("e2e")
        keys = {r.firmware_key for run in runs for r in history.results(run.id).values()
                if r.status in ("pass", "fail")}
        assert keys == {series.key, broken.key}
        assert all(r.kernel == os.uname().release
                   for r in history.results(runs[-1].id).values() if r.status != "not-run")
    assert "C1, C3" in (tmp_path / "j.xml").read_text()
    # the page renders in a real browser, with the regression on it
    shot = tmp_path / "morning.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--no-first-run", f"--user-data-dir={tmp_path / 'chromium'}",
                    f"--screenshot={shot}", "--window-size=1200,700", html.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000
    assert "Regressions" in html.read_text() and "newly failing" in html.read_text()


def test_a_runner_killed_mid_plan_leaves_a_history_that_says_so(
        far: tuple[str, Path, Path], tmp_path: Path) -> None:
    series = edk2.build_firmware(progress=StderrProgress()).output
    plan = tmp_path / "plan.toml"
    many = "".join(f"""
[[scenario]]
name = "callback-{n}"
ebs_mode = "callback"
requeue_depth = {n}
accel = "tcg"
""" for n in range(1, 7))
    plan.write_text(plan_text(*far, many))
    (tmp_path / "fw").symlink_to(series.path)
    db = tmp_path / "history.db"
    runner = subprocess.Popen([sys.executable, "-m", "harness", "-q", "nightly", "--plan",
                               str(plan), "--history", str(db)], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if db.exists():
                with sqlite3.connect(db) as look:
                    try:
                        if look.execute("SELECT COUNT(*) FROM results").fetchone()[0] >= 2:
                            break
                    except sqlite3.OperationalError:
                        pass
            assert runner.poll() is None, "the runner ended before it could be killed"
            time.sleep(0.2)
        os.killpg(runner.pid, signal.SIGKILL)
        runner.wait(30)
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
    deadline = time.monotonic() + 15       # QEMU dies with its worker (PDEATHSIG)
    while (left := subprocess.run(["pgrep", "-f", f"qemu-system.*{tmp_path}"],
                                  capture_output=True, text=True, check=False).stdout.split()) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, "a QEMU outlived the killed runner"
    with History(db) as history:
        assert history.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        (killed,) = history.runs("e2e")
        assert killed.state == "running"
        recorded = len(history.results(killed.id))
        assert 2 <= recorded < 12
    status, after = nightly(plan)
    assert f"run #{killed.id} (" in str(after["report"])
    assert f"was incomplete: incomplete, {recorded} case(s) recorded" in str(after["report"])
    assert after["reaped_incomplete_runs"] == [killed.id]
    assert status == 0, after["report"]
    # what the killed runner left in $TMPDIR went with the next one
    assert not list(Path(tempfile.gettempdir()).glob(f"ebs-{runner.pid}-*"))
