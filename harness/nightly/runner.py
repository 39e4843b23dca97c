"""``ebs-harness nightly``: the plan's cases through pytest, the history, the report."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness.errors import DependencyError, EnvironmentFailure
from harness.nightly.history import History
from harness.nightly.plan import Plan, load_plan
from harness.nightly.report import MorningReport, morning_report
from harness.tools import scratch


@dataclass(frozen=True)
class NightlyRun:
    plan: Plan
    run_id: int
    report: MorningReport
    reaped: tuple[int, ...]
    pruned: tuple[Path, ...]


def run_nightly(plan_path: Path, history_path: Path, artifacts: Path, *,
                junit: Path | None = None, keep_days: float | None = None,
                quiet: bool = True) -> NightlyRun:
    """Run every case of the plan (pytest-xdist, one worker per host), each
    recorded in the history as it ends; then compare with the last complete
    run of the plan. Checks the plan and the history before anything runs."""
    plan = load_plan(plan_path)
    try:
        import pytest
        if len(plan.hosts) > 1:
            import xdist  # noqa: F401 - one worker per host
    except ImportError as exc:
        raise DependencyError(f"ebs-harness nightly runs its cases with pytest and "
                              f"pytest-xdist ({exc.name} is missing): pip install "
                              "'ovmf-ebs-harness[nightly]'") from exc
    with History(history_path) as history:
        reaped = tuple(run.id for run in history.reap())
        pruned = tuple(history.prune_artifacts(keep_days)) if keep_days is not None else ()
        run_id = history.begin_run(plan.name, plan.digest, artifacts)
        run_dir = Path(history.run(run_id).artifacts)
        run_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        # a scratch directory of this process: one a killed runner leaves, the next sweeps
        with scratch("nightly") as tmp:
            ini = tmp / "pytest.ini"
            ini.write_text("[pytest]\n")
            args = ["-c", str(ini), "--rootdir", str(plan.path.resolve().parent), "--noconftest",
                    "-W", "ignore::pytest.PytestAssertRewriteWarning", "-p", "no:cacheprovider",
                    "-p", "no:ebs_harness", "-p", "harness.nightly.cases",
                    "--ebs-nightly-plan", str(plan.path.resolve()),
                    "--ebs-nightly-history", str(history_path.resolve()),
                    "--ebs-nightly-run", str(run_id),
                    "--ebs-nightly-artifacts", str(run_dir.resolve()),
                    "-rA", "-q" if quiet else "-v"]
            workers = len(plan.hosts)
            args += ["-n", str(workers), "--dist", "loadgroup"] if workers > 1 else \
                ["-p", "no:xdist"]
            if junit is not None:
                args += ["--junitxml", str(junit)]
            try:
                # pytest's progress to stderr: stdout is the report's (or its JSON)
                with contextlib.redirect_stdout(sys.stderr):
                    status = pytest.main([*args, str(plan.path.resolve())])
            except BaseException:
                history.abandon_run(run_id)
                raise
        if status == pytest.ExitCode.INTERRUPTED:
            history.abandon_run(run_id)
            raise KeyboardInterrupt
        if status not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
            history.abandon_run(run_id)
            raise EnvironmentFailure(f"the nightly's pytest run ended with status {int(status)} "
                                     f"({status.name if hasattr(status, 'name') else status}); "
                                     f"run #{run_id} stays incomplete")
        history.finish_run(run_id, time.monotonic() - started)
        report = morning_report(history, plan.name, run_id, plan.slower, plan.window)
    return NightlyRun(plan, run_id, report, reaped, pruned)
