"""The nightly history: one SQLite file of runs and their cases.

Each case's result is its own transaction, so a runner killed mid-plan
leaves every case it finished and a run still marked ``running``; the next
runner marks such a run ``incomplete`` when its process is gone (same
machine) and the report says so. Two runners may write one file at once
(WAL journal, a busy timeout). The schema is versioned in ``meta`` and
migrated forward on open; a file that is not a SQLite database, is torn,
or belongs to something else is refused with one line.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from harness.errors import UsageError
from harness.tools import pid_alive

APPLICATION = "ovmf-ebs-harness nightly history"
SCHEMA_VERSION = 2

#: version -> the statements that take a file from the version before to it.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE runs (
               id INTEGER PRIMARY KEY,
               plan TEXT NOT NULL,
               plan_digest TEXT NOT NULL,
               started REAL NOT NULL,
               finished REAL,
               state TEXT NOT NULL CHECK (state IN ('running', 'complete', 'incomplete')),
               machine TEXT NOT NULL,
               pid INTEGER NOT NULL,
               artifacts TEXT NOT NULL)""",
        """CREATE TABLE results (
               run_id INTEGER NOT NULL REFERENCES runs(id),
               case_key TEXT NOT NULL,
               host TEXT NOT NULL,
               firmware TEXT NOT NULL,
               scenario TEXT NOT NULL,
               sev TEXT NOT NULL,
               accel TEXT NOT NULL,
               status TEXT NOT NULL CHECK (status IN ('pass', 'fail', 'not-run', 'error')),
               reason TEXT NOT NULL DEFAULT '',
               violations TEXT NOT NULL DEFAULT '[]',
               firmware_key TEXT NOT NULL DEFAULT '',
               qemu_version TEXT NOT NULL DEFAULT '',
               boot_seconds REAL,
               artifacts TEXT NOT NULL DEFAULT '',
               recorded REAL NOT NULL,
               PRIMARY KEY (run_id, case_key))""",
    ),
    # 2: what a morning report needs to name a change: the baseline and the
    # kernel of each case, and the time of the whole suite.
    2: (
        "ALTER TABLE results ADD COLUMN baseline TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE results ADD COLUMN kernel TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE runs ADD COLUMN suite_seconds REAL",
    ),
}

STATUSES = ("pass", "fail", "not-run", "error")


@dataclass(frozen=True)
class Result:
    """One case of one run."""

    case_key: str
    host: str
    firmware: str
    scenario: str
    sev: str
    accel: str
    status: str
    reason: str = ""
    violations: tuple[str, ...] = ()
    firmware_key: str = ""
    baseline: str = ""
    qemu_version: str = ""
    kernel: str = ""
    boot_seconds: float | None = None
    artifacts: str = ""


@dataclass(frozen=True)
class Run:
    id: int
    plan: str
    started: float
    finished: float | None
    state: str
    machine: str
    pid: int
    artifacts: str
    suite_seconds: float | None


class History:
    """The history file, opened (created and migrated as needed).

    :raises UsageError: not a history file (another SQLite database, a torn
        or truncated file, a newer schema).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        try:
            self.db.execute("PRAGMA busy_timeout = 60000")
            self._check_and_migrate()
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise UsageError(f"history {self.path}: not a usable SQLite file ({exc}); "
                             "refused, nothing written") from exc
        except BaseException:
            self.db.close()
            raise

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _version(self) -> int:
        """The file's schema version (0: empty); refuses anything not a history,
        before writing to it."""
        tables = {row[0] for row in self.db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return 0
        if "meta" not in tables:
            raise UsageError(f"history {self.path}: a SQLite database of something else "
                             f"(tables {', '.join(sorted(tables))}); refused")
        meta = dict(self.db.execute("SELECT key, value FROM meta"))
        if meta.get("application") != APPLICATION:
            raise UsageError(f"history {self.path}: a SQLite database of something else "
                             f"(application {meta.get('application')!r}); refused")
        version = int(meta.get("schema_version", "0"))
        if version > SCHEMA_VERSION:
            raise UsageError(f"history {self.path}: schema version {version}, newer than "
                             f"this harness's {SCHEMA_VERSION}; refused")
        return version

    def _check_and_migrate(self) -> None:
        quick = self.db.execute("PRAGMA quick_check").fetchone()[0]
        if quick != "ok":
            raise UsageError(f"history {self.path}: damaged ({quick}); refused")
        if self._version() == SCHEMA_VERSION:
            return
        self.db.execute("PRAGMA journal_mode = WAL")      # not inside a transaction
        with self._transaction():
            # again under the write lock: another runner may have migrated meanwhile
            for target in range(self._version() + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target]:
                    self.db.execute(statement)
                if target == 1:
                    self.db.execute("INSERT INTO meta VALUES ('application', ?)", (APPLICATION,))
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                                (str(target),))

    def _transaction(self) -> _Transaction:
        return _Transaction(self.db)

    @property
    def schema_version(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0])

    # ------------------------------------------------------------ runs

    def begin_run(self, plan: str, digest: str, artifacts_root: Path) -> int:
        """A new run, ``running``, its artifacts in ``artifacts_root/run-ID``."""
        with self._transaction():
            cursor = self.db.execute(
                "INSERT INTO runs (plan, plan_digest, started, state, machine, pid, artifacts) "
                "VALUES (?, ?, ?, 'running', ?, ?, '')",
                (plan, digest, time.time(), socket.gethostname(), os.getpid()))
            run_id = cursor.lastrowid
            assert run_id is not None
            self.db.execute("UPDATE runs SET artifacts = ? WHERE id = ?",
                            (str(Path(artifacts_root).absolute() / f"run-{run_id}"), run_id))
        return run_id

    def finish_run(self, run_id: int, suite_seconds: float) -> None:
        with self._transaction():
            self.db.execute("UPDATE runs SET state = 'complete', finished = ?, "
                            "suite_seconds = ? WHERE id = ?",
                            (time.time(), suite_seconds, run_id))

    def abandon_run(self, run_id: int) -> None:
        """A run that could not finish: ``incomplete`` now, not at the next reap."""
        with self._transaction():
            self.db.execute("UPDATE runs SET state = 'incomplete', finished = ? WHERE id = ?",
                            (time.time(), run_id))

    def reap(self) -> list[Run]:
        """Runs left ``running`` by a runner of this machine that is gone:
        marked ``incomplete`` and returned."""
        found = []
        with self._transaction():
            for run in self._runs("state = 'running' AND machine = ?", (socket.gethostname(),)):
                # this process has no run yet: one with its PID had a PID reused
                if run.pid == os.getpid() or not pid_alive(run.pid):
                    self.db.execute("UPDATE runs SET state = 'incomplete', finished = ? "
                                    "WHERE id = ?", (time.time(), run.id))
                    found.append(run)
        return found

    def run(self, run_id: int) -> Run:
        (run,) = self._runs("id = ?", (run_id,))
        return run

    def runs(self, plan: str) -> list[Run]:
        """Every run of ``plan``, oldest first."""
        return self._runs("plan = ?", (plan,))

    def _runs(self, where: str, args: Sequence[Any]) -> list[Run]:
        rows = self.db.execute(
            "SELECT id, plan, started, finished, state, machine, pid, artifacts, suite_seconds "
            f"FROM runs WHERE {where} ORDER BY id", args)
        return [Run(*row) for row in rows]

    # --------------------------------------------------------- results

    def record(self, run_id: int, result: Result) -> None:
        with self._transaction():
            self.db.execute(
                "INSERT OR REPLACE INTO results (run_id, case_key, host, firmware, scenario, "
                "sev, accel, status, reason, violations, firmware_key, baseline, qemu_version, "
                "kernel, boot_seconds, artifacts, recorded) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, result.case_key, result.host, result.firmware, result.scenario,
                 result.sev, result.accel, result.status, result.reason,
                 json.dumps(list(result.violations)), result.firmware_key, result.baseline,
                 result.qemu_version, result.kernel, result.boot_seconds, result.artifacts,
                 time.time()))

    def results(self, run_id: int) -> dict[str, Result]:
        rows = self.db.execute(
            "SELECT case_key, host, firmware, scenario, sev, accel, status, reason, violations, "
            "firmware_key, baseline, qemu_version, kernel, boot_seconds, artifacts "
            "FROM results WHERE run_id = ? ORDER BY case_key", (run_id,))
        out = {}
        for row in rows:
            values = list(row)
            values[8] = tuple(json.loads(values[8]))
            out[row[0]] = Result(*values)
        return out

    def prune_artifacts(self, older_than_days: float) -> list[Path]:
        """Remove the artifact directories of runs that started more than
        ``older_than_days`` ago (the history rows stay); the removed paths."""
        import shutil

        cutoff = time.time() - older_than_days * 86400
        removed = []
        for run in self._runs("started < ? AND state != 'running'", (cutoff,)):
            directory = Path(run.artifacts)
            if directory.name == f"run-{run.id}" and directory.is_dir():
                shutil.rmtree(directory, ignore_errors=True)
                removed.append(directory)
        return removed


class _Transaction:
    """``BEGIN IMMEDIATE`` .. ``COMMIT`` (``ROLLBACK`` on an exception):
    a writer takes the lock before it reads, so two runners never deadlock."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *rest: object) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
