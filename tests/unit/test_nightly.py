"""The nightly's plan, history and morning report, without booting: plans
with their mistakes, a history migrated, shared, torn and foreign, and the
report's regressions from recorded runs."""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import UsageError
from harness.nightly import history as hist
from harness.nightly.history import History, Result
from harness.nightly.plan import load_plan
from harness.nightly.report import morning_report, render_html, render_text

PLAN = """
name = "lab"
slower = 0.25
window = 3

[[host]]
name = "here"

[[host]]
name = "sevbox"
where = "ssh://root@sevbox:2222"
known_hosts = "known_hosts"

[[firmware]]
name = "series"
build = "series"

[[firmware]]
name = "pcd"
variant = "variants/pcd.patch"

[[scenario]]
name = "callback-d2"
ebs_mode = "callback"
requeue_depth = 2
sev = ["off", "emulated"]
accel = "tcg"

[[scenario]]
name = "none-leak"
ebs_mode = "none"
leak_mapping = true
"""


def write(tmp_path: Path, text: str) -> Path:
    """The plan, and the files it names."""
    (tmp_path / "known_hosts").write_text("")
    (tmp_path / "variants").mkdir(exist_ok=True)
    (tmp_path / "variants" / "pcd.patch").write_text("")
    path = tmp_path / "plan.toml"
    path.write_text(text)
    return path


def test_a_plan_is_the_product_of_hosts_firmware_and_scenarios(tmp_path: Path) -> None:
    plan = load_plan(write(tmp_path, PLAN))
    assert plan.name == "lab" and plan.window == 3 and plan.slower == 0.25
    assert len(plan.cases) == 2 * 2 * (2 + 1)
    keys = {case.key for case in plan.cases}
    assert "sevbox/pcd/callback-d2/emulated/tcg" in keys
    assert "here/series/none-leak/off/auto" in keys
    sevbox = next(h for h in plan.hosts if h.name == "sevbox")
    assert sevbox.known_hosts == tmp_path / "known_hosts"       # relative to the plan
    pcd = next(f for f in plan.firmware if f.name == "pcd")
    assert (pcd.kind, pcd.path) == ("variant", tmp_path / "variants" / "pcd.patch")


def test_a_series_firmware_names_its_edk2_baseline(tmp_path: Path) -> None:
    text = PLAN.replace('build = "series"', 'build = "series"\nedk2 = "2022.11"', 1)
    series = next(f for f in load_plan(write(tmp_path, text)).firmware if f.name == "series")
    assert (series.kind, series.edk2) == ("series", "2022.11")


@pytest.mark.parametrize(("change", "message"), [
    (("name = \"lab\"", ""), "needs name ="),
    (("slower = 0.25", "slower = -1"), "slower = -1: a positive fraction"),
    (("where = \"ssh://root@sevbox:2222\"", "where = \"ftp://x\""), "\"local\" or \"ssh://...\""),
    (("build = \"series\"", "build = \"main\""), "only \"series\""),
    (("leak_mapping = true", "leak_mapping = true\ncolour = 1"), "unknown key(s) colour"),
    (("ebs_mode = \"none\"", "ebs_mode = \"later\""), "ebs_mode=later: one of callback, legacy, none"),
    (("name = \"sevbox\"", "name = \"here\""), "two host tables share a name"),
    (("[[scenario]]\nname = \"callback-d2\"", "[[scenario]]\nname = \"a/b\""),
     "needs a name without '/'"),
    (("window = 3", "window = [3"), "not TOML"),
    (("variants/pcd.patch", "variants/gone.patch"), "gone.patch does not exist"),
    (("ssh://root@sevbox:2222", "ssh://root@sevbox:port"), "bad port"),
    (("build = \"series\"", "build = \"series\"\nedk2 = \"2099.01\""),
     "edk2 = '2099.01': one of 2025.02, 2022.11"),
    (("variant = \"variants/pcd.patch\"", "variant = \"variants/pcd.patch\"\nedk2 = \"2025.02\""),
     "edk2 goes with build = \"series\""),
], ids=["no-name", "slower", "where", "build", "unknown-key", "ebs-mode", "duplicate",
        "slash", "toml", "missing-file", "bad-url", "edk2", "edk2-variant"])
def test_a_wrong_plan_is_one_line(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    assert change[0] in PLAN
    with pytest.raises(UsageError, match=rf".*{__import__('re').escape(message)}") as info:
        load_plan(write(tmp_path, PLAN.replace(change[0], change[1], 1)))
    assert "\n" not in str(info.value)


# ------------------------------------------------------------- history


def result(key: str, status: str, seconds: float | None = 2.0,
           violations: tuple[str, ...] = ()) -> Result:
    host, firmware, scenario, sev, accel = key.split("/")
    return Result(key, host, firmware, scenario, sev, accel, status,
                  reason="" if status in ("pass", "fail") else "no such host",
                  violations=violations, boot_seconds=seconds if status == "pass" else None)


def test_a_version_1_history_is_migrated_and_keeps_its_runs(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    for statement in hist.MIGRATIONS[1]:
        db.execute(statement)
    db.execute("INSERT INTO meta VALUES ('application', ?)", (hist.APPLICATION,))
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute("INSERT INTO runs (plan, plan_digest, started, state, machine, pid, artifacts) "
               "VALUES ('lab', 'x', 1.0, 'complete', 'm', 1, '/a')")
    db.execute("INSERT INTO results (run_id, case_key, host, firmware, scenario, sev, accel, "
               "status, recorded) VALUES (1, 'h/f/s/off/tcg', 'h', 'f', 's', 'off', 'tcg', "
               "'pass', 1.0)")
    db.commit()
    db.close()
    with History(path) as history:
        assert history.schema_version == hist.SCHEMA_VERSION == 2
        (old,) = history.results(1).values()
        assert old.status == "pass" and old.kernel == "" and old.baseline == ""
        history.record(1, result("h/f/t/off/tcg", "fail", violations=("V1",)))
        assert history.results(1)["h/f/t/off/tcg"].violations == ("V1",)


def test_foreign_torn_and_newer_files_are_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.db"
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE songs (title TEXT)")
    db.commit()
    db.close()
    with pytest.raises(UsageError, match="a SQLite database of something else"):
        History(foreign)
    real = tmp_path / "real.db"
    with History(real) as history:
        run = history.begin_run("lab", "x", tmp_path)
        for n in range(400):
            history.record(run, result(f"h/f/s{n}/off/tcg", "pass"))
        history.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    torn = tmp_path / "torn.db"
    torn.write_bytes(real.read_bytes()[:real.stat().st_size // 2])
    with pytest.raises(UsageError, match="refused"):
        History(torn)
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(UsageError, match="not a usable SQLite file"):
        History(junk)
    with History(real) as history:       # the control: the whole file opens
        history.db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(UsageError, match="schema version 99, newer than"):
        History(real)


def _writer(path: str, run: int, prefix: str) -> None:
    with History(Path(path)) as history:
        for n in range(150):
            history.record(run, result(f"h/f/{prefix}{n}/off/tcg", "pass"))


def test_two_nightly_jobs_write_one_history_at_once(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    with History(path) as history:
        runs = [history.begin_run("a", "x", tmp_path), history.begin_run("b", "y", tmp_path)]
    context = multiprocessing.get_context("spawn")
    jobs = [context.Process(target=_writer, args=(str(path), run, prefix))
            for run, prefix in zip(runs, ("a", "b"), strict=True)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(120)
        assert job.exitcode == 0
    with History(path) as history:
        assert [len(history.results(run)) for run in runs] == [150, 150]
        assert history.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_run_whose_runner_died_is_marked_incomplete(tmp_path: Path) -> None:
    """A dead runner's run is reaped; a live one's is not (the control); one
    with this process's PID is a PID reused: this process has no run yet."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with History(tmp_path / "h.db") as history:
            dead, live, reused = (history.begin_run("lab", "x", tmp_path) for _ in range(3))
            for run, pid in ((dead, int(gone.stdout)), (live, other.pid), (reused, os.getpid())):
                history.db.execute("UPDATE runs SET pid = ? WHERE id = ?", (pid, run))
            assert [r.id for r in history.reap()] == [dead, reused]
            assert history.run(dead).state == "incomplete"
            assert history.run(dead).finished is not None
            assert history.run(live).state == "running"
    finally:
        other.kill()
        other.wait()


# -------------------------------------------------------------- report


def runs_of(history: History, tmp_path: Path, *rounds: list[Result]) -> list[int]:
    ids = []
    for results in rounds:
        run = history.begin_run("lab", "x", tmp_path)
        for item in results:
            history.record(run, item)
        history.finish_run(run, 10.0)
        ids.append(run)
    return ids


A, B, C, D = ("here/fw/a/off/tcg", "here/fw/b/emulated/tcg", "far/fw/a/off/tcg",
              "here/fw/slow/off/tcg")


def test_the_report_names_exactly_what_changed(tmp_path: Path) -> None:
    with History(tmp_path / "h.db") as history:
        steady = [result(A, "pass"), result(B, "pass"), result(C, "fail", violations=("V1",)),
                  result(D, "pass", 2.0)]
        ids = runs_of(history, tmp_path, steady, steady, steady,
                      [result(A, "pass"), result(B, "fail", violations=("C1", "C3")),
                       result(C, "pass"), result(D, "pass", 3.1)])
        report = morning_report(history, "lab", ids[-1], 0.25, 3)
    kinds = {(c.case_key, c.kind) for c in report.changes}
    assert kinds == {(B, "newly failing"), (C, "newly passing"), (D, "slower")}
    assert {c.case_key for c in report.regressions} == {B, D}
    assert report.exit_status == 1
    text = render_text(report)
    assert f"{B}: newly failing: C1, C3 (passed in run #{ids[2]})" in text
    assert "+55 %" in text
    page = render_html(report)
    assert page.count("<svg") == 2 * 4 and "newly failing" in page


def test_no_change_exit_0_nothing_ran_exit_3_and_an_incomplete_run_said(
        tmp_path: Path) -> None:
    with History(tmp_path / "h.db") as history:
        ids = runs_of(history, tmp_path, [result(A, "pass")], [result(A, "pass")])
        assert morning_report(history, "lab", ids[-1], 0.25, 3).exit_status == 0
        killed = history.begin_run("lab", "x", tmp_path)
        history.record(killed, result(A, "pass"))
        history.abandon_run(killed)
        (last,) = runs_of(history, tmp_path, [result(A, "not-run"), result(C, "error")])
        report = morning_report(history, "lab", last, 0.25, 3)
    assert report.exit_status == 3 and report.nothing_ran
    assert [c.kind for c in report.changes if c.case_key == A] == ["newly not run"]
    assert report.previous is not None and report.previous.id == ids[-1]
    text = render_text(report)
    assert f"run #{killed} (" in text and "was incomplete: incomplete, 1 case(s) recorded" in text
    assert "nothing could run" in text


def test_the_nightly_json_and_exit_status_through_the_cli(tmp_path: Path) -> None:
    """Bad input before anything runs: exit 2 with one line."""
    plan = write(tmp_path, PLAN.replace("name = \"lab\"", "", 1))
    proc = subprocess.run([sys.executable, "-m", "harness", "nightly", "--plan", str(plan),
                           "--history", str(tmp_path / "h.db"), "--json"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert json.loads(proc.stdout)["error"]["kind"] == "usage"
    assert not (tmp_path / "h.db").exists(), "a wrong plan writes no history"


def test_keep_days_removes_old_artifacts_and_keeps_their_history(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    with History(tmp_path / "h.db") as history:
        old = history.begin_run("lab", "x", root)
        history.record(old, result(A, "pass"))
        history.finish_run(old, 1.0)
        history.db.execute("UPDATE runs SET started = started - 40 * 86400 WHERE id = ?", (old,))
        new = history.begin_run("lab", "x", root)
        history.finish_run(new, 1.0)
        old_dir, new_dir = (Path(history.run(run).artifacts) for run in (old, new))
        assert (old_dir, new_dir) == (root / f"run-{old}", root / f"run-{new}")
        for directory in (old_dir, new_dir):
            (directory / "case").mkdir(parents=True)
        assert history.prune_artifacts(30) == [old_dir]
        assert not old_dir.exists() and new_dir.is_dir() and root.is_dir()
        assert history.results(old)[A].status == "pass"      # the row stays


def _opener(path: str) -> None:
    with History(Path(path)) as history:
        assert history.schema_version == hist.SCHEMA_VERSION


def test_runners_opening_a_new_history_at_once_migrate_it_once(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    context = multiprocessing.get_context("spawn")
    jobs = [context.Process(target=_opener, args=(str(path),)) for _ in range(4)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(120)
    assert [job.exitcode for job in jobs] == [0, 0, 0, 0]


def test_a_refused_foreign_file_is_left_as_it_was(tmp_path: Path) -> None:
    foreign = tmp_path / "other.db"
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE meta (key TEXT, value TEXT)")
    db.execute("INSERT INTO meta VALUES ('application', 'a photo library')")
    db.commit()
    db.close()
    before = foreign.read_bytes()
    with pytest.raises(UsageError, match="application 'a photo library'"):
        History(foreign)
    assert foreign.read_bytes() == before
    assert not list(tmp_path.glob("other.db-*")), "no journal files left beside it"


def test_a_case_that_could_not_run_yesterday_still_regresses_today(tmp_path: Path) -> None:
    """pass, then not run, then fail: newly failing against the night it passed."""
    with History(tmp_path / "h.db") as history:
        ids = runs_of(history, tmp_path, [result(A, "pass")], [result(A, "not-run")],
                      [result(A, "fail", violations=("V2",))])
        report = morning_report(history, "lab", ids[-1], 0.25, 3)
    assert [(c.kind, c.detail) for c in report.regressions] == [
        ("newly failing", f"V2 (passed in run #{ids[0]})")]


def _case_that_boots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                     boot: Exception) -> tuple[Result, Path]:
    """The first case of the plan, run with a stand-in host, firmware and
    boot that raises ``boot``."""
    from harness import scenario as scenarios
    from harness.nightly import cases
    from harness.vm.host import Capability, HostCaps, SevCapabilities

    yes = Capability(True, "stub")
    caps = HostCaps(qemu="q", qemu_version="7.2.22", tcg=yes, kvm=yes, sev=yes, sev_es=yes,
                    snp=yes, sev_emulated=yes,
                    emulated_geometry=SevCapabilities(47, 1, emulated=True))
    place = cases._Place(caps, object(), "6.1")
    firmware = type("Fw", (), {"key": "k", "manifest": {}})()
    worker = cases.Worker()
    monkeypatch.setattr(cases, "_host", lambda worker, spec, sev: place)
    monkeypatch.setattr(cases, "_firmware", lambda spec: firmware)

    def run_scenario(*args: object, **kwargs: object) -> None:
        raise boot
    monkeypatch.setattr(scenarios, "run_scenario", run_scenario)
    case = load_plan(write(tmp_path, PLAN)).cases[0]
    return cases.run_case(case, tmp_path / "artifacts", worker), \
        tmp_path / "artifacts" / case.key.replace("/", "_") / "traceback.txt"


def test_a_bug_of_ours_in_a_case_is_an_internal_error_with_its_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, kept = _case_that_boots(tmp_path, monkeypatch, TypeError("a bug"))
    assert result.status == "error"
    assert result.reason.startswith("internal error (TypeError: a bug); a bug of ebs-harness, "
                                    f"traceback in {kept}")
    assert "TypeError: a bug" in kept.read_text()


def test_the_environment_failing_a_case_is_its_error_without_a_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: the harness's own error is the case's reason, as it says it."""
    from harness.errors import LaunchError
    result, kept = _case_that_boots(tmp_path, monkeypatch, LaunchError("QEMU would not start"))
    assert (result.status, result.reason) == ("error", "QEMU would not start")
    assert not kept.exists()


def test_a_case_whose_firmware_does_not_boot_in_its_sev_mode_is_not_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """2022.11's OVMF under the emulated SEV-ES: not run, saying why, and no
    boot tried; 2025.02's firmware gets to the boot (the control)."""
    from harness import scenario as scenarios
    from harness.nightly import cases
    from harness.vm.host import Capability, HostCaps, SevCapabilities

    yes = Capability(True, "stub")
    caps = HostCaps(qemu="q", qemu_version="10.0.13", tcg=yes, kvm=yes, sev=yes, sev_es=yes,
                    snp=yes, sev_emulated=yes, sev_es_emulated=yes,
                    emulated_geometry=SevCapabilities(47, 1, emulated=True, es=True))
    monkeypatch.setattr(cases, "_host", lambda worker, spec, sev: cases._Place(caps, object(),
                                                                                "6.1"))
    booted: list[str] = []

    def run_scenario(firmware: object, chosen: scenarios.Scenario, *args: object,
                     **kwargs: object) -> None:
        scenarios.check_firmware(chosen, firmware)   # type: ignore[arg-type]
        booted.append(chosen.sev)
        raise TypeError("stop here")
    monkeypatch.setattr(scenarios, "run_scenario", run_scenario)
    case = load_plan(write(tmp_path, PLAN.replace('sev = ["off", "emulated"]',
                                                  'sev = ["emulated-es"]'))).cases[0]
    assert case.scenario.sev == "emulated-es"
    for baseline in ("2022.11", "2025.02"):
        firmware = type("Fw", (), {"key": "k", "manifest": {}, "baseline": baseline})()
        monkeypatch.setattr(cases, "_firmware", lambda spec, firmware=firmware: firmware)
        result = cases.run_case(case, tmp_path / baseline, cases.Worker())
        if baseline == "2022.11":
            assert result.status == "not-run" and "stops in PEI" in result.reason
            assert booted == []
    assert booted == ["emulated-es"]
