"""The cached-build engine: every build the harness makes from source (the
patched OVMF, the emulated-SEV QEMU) goes through it.

Data flows one way::

    source provider  ->  pristine tree  ->  workspace (series applied)  ->  build  ->  published dir
                         (<src>/ID)         (<work>/WS, incremental)                   (<kind>/KEY)

- A *source provider* knows its identity and how to make a pristine tree
  (:mod:`harness.build.debian` for Debian source packages; a user's tree is
  copied, never modified).
- The *workspace* is one copy of the pristine tree per (source identity,
  build flags, toolchain). Each build re-applies the patch series onto
  pristine files in a staging directory first
  (:func:`harness.build.series.apply_series`); a patch that does not apply
  raises :class:`~harness.errors.PatchError` and leaves the workspace as it
  was. Then only the files whose content changed are written, so the
  recipe's incremental build recompiles only what the changed patches touch.
- The *published directory* for a cache key is assembled in a temporary
  directory and renamed into place (:func:`publishing`): a directory that
  exists under its key is complete. A file lock per key makes concurrent
  builders (xdist workers, two terminals) build once; the second waits and
  reuses.
- A build killed mid-way leaves its workspace marked dirty with its process
  group: the next builder stops what is left of that group and has the recipe
  discard its partial output (:meth:`CachedBuilder._discard_partial`).
- Old directories are pruned by last use (:func:`prune`), never one used in
  the last hour or locked by another builder.

A recipe (:class:`harness.build.edk2.Builder`,
:class:`harness.build.qemu.QemuBuilder`) subclasses :class:`CachedBuilder`
and supplies the build and what to publish.

The module is longer than most (about 760 lines): it holds the engine and
the few things every recipe asks of it (the cache root, the tools' versions a
key is made of, remembered answers), which have no user but the engine and
its recipes. Progress lines are :mod:`harness.build.progress`'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar, Generic, Protocol, Self, TypeVar

from harness.build.progress import Progress, QuietProgress
from harness.build.series import (
    Patch,
    apply_series,
    read_overlays,
    read_patch,
    read_series,
    sync_workspace,
)
from harness.errors import BuildError, DependencyError, EnvironmentFailure, PatchError, UsageError

LOG = logging.getLogger(__name__)


def cache_root() -> Path:
    """``EBS_HARNESS_CACHE``, or ``~/.cache/ovmf-ebs-harness``."""
    env = os.environ.get("EBS_HARNESS_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "ovmf-ebs-harness"


T = TypeVar("T")


def remembered(path: Path, lifetime: float, compute: Callable[[], T],
               dump: Callable[[T], Any], load: Callable[[Any], T]) -> T:
    """``compute()``, kept as JSON in ``path`` for ``lifetime`` seconds.

    For answers that cost processes to get and hardly change (tool versions,
    the host probe): a series of commands asks once. ``path`` names the
    answer's inputs (a hash of them), so a change of input is a new file; a
    file that does not read back is computed again; one that cannot be
    written costs only the next command's time.
    """
    try:
        if time.time() - path.stat().st_mtime < lifetime:
            return load(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        LOG.debug("%s: %s", path, exc)
    value = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(dump(value)))
        os.replace(tmp, path)
    except OSError as exc:
        LOG.debug("%s not written: %s", path, exc)
    return value


def identity(paths: Sequence[str | Path], extra: str = "") -> str:
    """A hash of what each of ``paths`` is (size, mtime, mode; or absent),
    and of ``extra``."""
    parts = [extra]
    for item in paths:
        try:
            st = os.stat(item)
            parts.append(f"{item}:{st.st_size}:{st.st_mtime_ns}:{st.st_mode}")
        except OSError:
            parts.append(f"{item}:absent")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_label(identity: str) -> str:
    """A source identity as a person names it: ``debian:edk2=2022.11-6+deb12u2``,
    ``debian-tarballs:edk2=2025.02-8+deb13u1``, ``tree:/path/to/edk2``."""
    return ":".join(identity.split(":")[:2])


def short_hash(text: str) -> str:
    return sha256_bytes(text.encode())[:16]


# ------------------------------------------------------ sources, inputs


class SourceProvider(Protocol):
    def identity(self) -> str:
        """A string that changes whenever the source's content does."""

    def materialize(self, dest: Path, progress: Progress) -> None:
        """Make a pristine, buildable tree at ``dest`` (which does not exist)."""


class Flags(Protocol):
    """A recipe's build flags: part of the key, and of the workspace's identity."""

    def as_dict(self) -> dict[str, object]: ...

    def workspace_dict(self) -> dict[str, object]: ...


#: How long tool versions are remembered (their binaries and dpkg's
#: database unchanged).
TOOL_VERSIONS_LIFETIME_S = 3600.0


def remembered_versions(name: str, binaries: Sequence[str],
                        compute: Callable[[], dict[str, str]]) -> dict[str, str]:
    """``compute()`` (a recipe's tool versions: several processes, 0.1-0.2 s
    a command), remembered under ``cache_root()/tool-versions/`` for
    :data:`TOOL_VERSIONS_LIFETIME_S` while the tools' binaries and dpkg's
    package database (which moves with any package installed) are the same."""
    found = [shutil.which(b) or b for b in binaries]
    key = identity([*found, "/var/lib/dpkg/status"])
    path = cache_root() / "tool-versions" / f"{name}-{key}.json"

    def load(data: Any) -> dict[str, str]:
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise TypeError("not a map of versions")
        return data

    return remembered(path, TOOL_VERSIONS_LIFETIME_S, compute, dict, load)


def system_python_env() -> dict[str, str]:
    """This process's environment without the harness's virtualenv: a
    build's own Python tools (edk2's BaseTools, QEMU's meson) run on the
    system's Python and its packages."""
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":")
                           if ".venv" not in p and "pyenv" not in p)
    return env


def tool_versions(tools: Mapping[str, list[str]], hint: str) -> dict[str, str]:
    """First version line of each tool whose output lands in a build.

    :param tools: tool name -> the argv that prints its version.
    :param hint: how to install them, for the error when one is missing.
    """
    versions: dict[str, str] = {}
    for tool, argv in tools.items():
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        except FileNotFoundError as exc:
            raise DependencyError(f"{tool} not found: {hint}") from exc
        lines = [line.strip() for line in (proc.stdout + proc.stderr).splitlines()
                 if line.strip() and ("version" in line.lower() or tool in line.lower())]
        versions[tool] = lines[0] if lines else "unknown"
    return versions


@dataclass(frozen=True)
class BuildInputs:
    """Everything a build depends on; :attr:`key` hashes it.

    :param recipe: the recipe's name and version (bumped when the way a build
        is made changes in a way the other inputs cannot see).
    """

    recipe: str
    source_identity: str
    patches: tuple[tuple[str, str], ...]       # (name, sha256)
    overlays: tuple[tuple[str, str], ...]      # (path, sha256)
    flags: Flags
    toolchain: tuple[tuple[str, str], ...]

    def describe(self) -> dict[str, object]:
        return {
            "recipe": self.recipe,
            "source": self.source_identity,
            "patches": [list(p) for p in self.patches],
            "overlays": [list(o) for o in self.overlays],
            "flags": self.flags.as_dict(),
            "toolchain": dict(self.toolchain),
        }

    @property
    def key(self) -> str:
        blob = json.dumps(self.describe(), sort_keys=True).encode()
        return sha256_bytes(blob)[:20]

    @property
    def workspace_id(self) -> str:
        blob = json.dumps({"recipe": self.recipe, "source": self.source_identity,
                           "flags": self.flags.workspace_dict(),
                           "toolchain": dict(self.toolchain)}, sort_keys=True)
        return short_hash(blob)


def build_inputs(recipe: str, source: SourceProvider, patches: list[Patch],
                 overlays: Mapping[str, bytes], flags: Flags,
                 toolchain: Mapping[str, str]) -> BuildInputs:
    return BuildInputs(
        recipe=recipe,
        source_identity=source.identity(),
        patches=tuple((p.name, sha256_bytes(p.data)) for p in patches),
        overlays=tuple((name, sha256_bytes(data)) for name, data in sorted(overlays.items())),
        flags=flags,
        toolchain=tuple(sorted(toolchain.items())),
    )


@dataclass(frozen=True)
class Compiled:
    """What :meth:`CachedBuilder.compiles` remembers of a build it did not
    publish: its key and inputs, seconds, and the last lines of its log."""

    key: str
    inputs: dict[str, object]
    seconds: float
    log_tail: list[str]
    remembered: bool


# ----------------------------------------------------- publish and lock


@contextmanager
def publishing(final: Path) -> Iterator[Path]:
    """A temporary directory beside ``final``, renamed to it when the block
    succeeds and removed when it does not: ``final`` appears whole or not at
    all. Leftovers of killed earlier attempts are removed first."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".tmp-{final.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        # A reader of the old directory keeps a whole one until the rename:
        # move it aside first, never delete it in place.
        old = None
        if final.exists():
            old = final.with_name(f".tmp-{final.name}-old-{os.getpid()}")
            os.rename(final, old)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def locked(lock_path: Path, progress: Progress, what: str) -> Iterator[None]:
    """Hold the file lock ``lock_path``, saying so when another holder makes us wait."""
    from filelock import FileLock, Timeout  # only where a cache entry is made

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        progress.phase("wait", f"{what} is held by another build ({lock_path})")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


#: A directory used this recently may be in use in another process (a
#: firmware booting, readers take no lock): never pruned.
PRUNE_MIN_AGE_S = 3600.0


def prune(cache: Path, kind: str, keep: int, spare: str,
          min_age: float = PRUNE_MIN_AGE_S) -> list[str]:
    """Remove all but the ``keep`` most recently used directories of
    ``cache/kind``: never ``spare``, never one used in the last ``min_age``
    seconds, never one whose lock another builder holds. :returns: the names
    removed."""
    from filelock import FileLock, Timeout

    root = cache / kind
    used: dict[Path, float] = {}
    for directory in root.iterdir() if root.is_dir() else []:
        try:
            if directory.is_dir() and not directory.name.startswith("."):
                used[directory] = directory.stat().st_mtime
        except FileNotFoundError:   # pruned by another builder meanwhile
            continue
    entries = sorted(used, key=lambda d: used[d], reverse=True)
    now = time.time()
    removed: list[str] = []
    for directory in entries[keep:]:
        if directory.name == spare or now - used[directory] < min_age:
            continue
        lock = FileLock(str(cache / "locks" / f"{kind}-{directory.name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue
        try:
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory.name)
        finally:
            lock.release()
    if removed:
        LOG.info("pruned %d old %s directories: %s", len(removed), kind, ", ".join(removed))
    return removed


# ------------------------------------------------------------ processes


def _group_members(pgid: int, workspace: Path) -> list[int]:
    """Live processes of group ``pgid`` working inside ``workspace``: a group
    id saved by a killed build may belong to someone else by now."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid or fields[0] == "Z":
                continue
            cwd = Path(os.readlink(stat.parent / "cwd"))
        except (OSError, ValueError, IndexError):
            continue
        if cwd == workspace or workspace in cwd.parents:
            members.append(int(stat.parent.name))
    return members


#: How long one build step may run before it is stopped as hung.
STEP_DEADLINE = 1800.0
STEP_DEADLINE_ENV = "EBS_HARNESS_BUILD_TIMEOUT"


def stop_build(pgid: object, workspace: Path, timeout: float = 10.0) -> None:
    """SIGKILL what is left of a build's process group and wait until it is
    gone, so that nothing writes into the workspace afterwards."""
    if not isinstance(pgid, int) or pgid <= 1:
        return
    deadline = time.monotonic() + timeout
    members = _group_members(pgid, workspace)
    if members:
        LOG.warning("stopping the leftover build processes %s", members)
    while members:
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if time.monotonic() > deadline:
            raise EnvironmentFailure(f"{workspace}: processes {members} of an earlier, "
                                     f"killed build would not die in {timeout:g} s (stop "
                                     "them, then retry)")
        time.sleep(0.05)
        members = _group_members(pgid, workspace)


# ------------------------------------------------------------ published


@dataclass(frozen=True)
class PublishedDir:
    """A directory a recipe published: its path and key, read back from its
    ``manifest.json``. Subclasses name the files that make one whole."""

    path: Path
    key: str

    #: Files that must exist, relative to the directory.
    REQUIRED: ClassVar[tuple[str, ...]] = ("manifest.json",)
    #: What the directory is, and which command makes it, for errors.
    WHAT: ClassVar[str] = "build directory"
    MADE_BY: ClassVar[str] = "ebs-harness"

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """The directory at ``path``; UsageError if it is not a whole one."""
        directory = Path(path).expanduser().resolve()
        missing = [name for name in cls.REQUIRED if not (directory / name).is_file()]
        if missing:
            raise UsageError(f"{directory} is not a {cls.WHAT} from '{cls.MADE_BY}': "
                             f"{', '.join(missing)} missing")
        try:
            key = str(json.loads((directory / "manifest.json").read_text())["key"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{directory}/manifest.json is unreadable: {exc}") from exc
        return cls(directory, key)

    @property
    def manifest(self) -> dict[str, object]:
        data: dict[str, object] = json.loads((self.path / "manifest.json").read_text())
        return data


# -------------------------------------------------------------- builder


P = TypeVar("P", bound=PublishedDir)


@dataclass(frozen=True)
class Built(Generic[P]):
    """What a build call gives, whatever the recipe: its published directory,
    loaded as the recipe's type (a firmware, a QEMU), whether the cache had
    it, and the seconds the whole call took."""

    output: P
    cache_hit: bool
    seconds: float


class CachedBuilder(Generic[P]):
    """One recipe's build of one set of inputs under one cache root.

    Subclasses set the class attributes and implement :meth:`_compile` and
    :meth:`_publish_into` (and :meth:`_discard_partial` if an interrupted
    build can leave outputs that look newer than their sources).

    :param source: where the pristine tree comes from.
    :param flags: the build flags (key and workspace identity).
    :param series_dir: the patch series (``series`` + patches), or None for
        the source as it is.
    :param overlays: workspace path -> repository directory copied in.
    :param toolchain: tool -> version line, part of the key.
    :param extra_patches: applied after the series (test variants).
    """

    #: The recipe's name and version, in the key.
    RECIPE: ClassVar[str]
    #: Cache subdirectories: published builds, workspaces, pristine trees.
    PUBLISHED: ClassVar[str]
    WORK: ClassVar[str]
    SRC: ClassVar[str]
    #: How many of each are kept (by last use). A workspace is several
    #: hundred MB, so few are kept.
    KEEP: ClassVar[Mapping[str, int]]

    def __init__(self, source: SourceProvider, *, flags: Flags, series_dir: Path | None,
                 overlays: Mapping[str, Path], toolchain: Mapping[str, str],
                 cache: Path | None = None, jobs: int | None = None,
                 progress: Progress | None = None,
                 extra_patches: Sequence[Path] = ()) -> None:
        self.source = source
        self.flags = flags
        self.cache = cache or cache_root()
        self.jobs = jobs or os.cpu_count() or 1
        self.progress: Progress = progress or QuietProgress()
        self._state: dict[str, object] = {"touched": [], "dirty": False, "pgid": None}
        self.patches = read_series(series_dir) if series_dir is not None else []
        self.patches += [read_patch(path) for path in extra_patches]
        self.overlays = read_overlays(overlays)
        self.inputs = build_inputs(self.RECIPE, source, self.patches, self.overlays, flags,
                                   toolchain)

    # Paths -------------------------------------------------------------

    @property
    def published_dir(self) -> Path:
        return self.cache / self.PUBLISHED / self.inputs.key

    @property
    def pristine_dir(self) -> Path:
        return self.cache / self.SRC / short_hash(self.inputs.source_identity)

    @property
    def workspace_dir(self) -> Path:
        return self.cache / self.WORK / self.inputs.workspace_id

    def _lock(self, name: str) -> Path:
        return self.cache / "locks" / f"{name}.lock"

    # Steps -------------------------------------------------------------

    def build(self, rebuild: bool = False) -> Built[P]:
        """The published directory for these inputs, from the cache or built,
        loaded (:meth:`load`)."""
        start = time.monotonic()
        key = self.inputs.key
        final = self.published_dir
        if not rebuild and final.is_dir():
            os.utime(final)             # most recently used: pruned last
            return Built(self.load(final), True, time.monotonic() - start)
        with locked(self._lock(f"{self.PUBLISHED}-{key}"), self.progress,
                    f"{self.PUBLISHED} {key}"):
            if not rebuild and final.is_dir():
                self.progress.phase("cache", f"another build published {key}")
                return Built(self.load(final), True, time.monotonic() - start)
            pristine = self._pristine()
            with locked(self._lock(f"{self.WORK}-{self.inputs.workspace_id}"), self.progress,
                        "the build workspace"):
                tree = self._workspace(pristine)
                seconds = self._compile(tree)
                with publishing(final) as tmp:
                    self._publish_into(tree, tmp)
                    shutil.copy2(tree.parent / "build.log", tmp / "build.log")
                    manifest = {
                        "key": key,
                        **self.inputs.describe(),
                        **self._manifest_extra(),
                        "build_seconds": round(seconds, 1),
                        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    }
                    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
                self.progress.phase("publish", str(final))
        prune(self.cache, self.PUBLISHED, self.KEEP["published"], spare=key)
        prune(self.cache, self.WORK, self.KEEP["work"], spare=self.inputs.workspace_id)
        prune(self.cache, self.SRC, self.KEEP["src"], spare=self.pristine_dir.name)
        return Built(self.load(final), False, time.monotonic() - start)

    def compiles(self) -> Compiled:
        """Compile these inputs in the workspace without publishing anything
        (does a prefix of a series build?). Remembered by key, so asking
        again is free.

        :raises BuildError: it does not compile (the log names the step).
        """
        stamp = self.cache / "compiled" / f"{self.inputs.key}.json"
        if stamp.exists():
            return Compiled(**json.loads(stamp.read_text()), remembered=True)
        pristine = self._pristine()
        with locked(self._lock(f"{self.WORK}-{self.inputs.workspace_id}"), self.progress,
                    "the build workspace"):
            tree = self._workspace(pristine)
            seconds = self._compile(tree)
            lines = (tree.parent / "build.log").read_text(errors="replace").splitlines()
        record = {"key": self.inputs.key, "inputs": self.inputs.describe(),
                  "seconds": round(seconds, 1), "log_tail": lines[-5:]}
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(record, indent=2) + "\n")
        return Compiled(**record, remembered=False)  # type: ignore[arg-type]

    def pristine(self) -> Path:
        """The source's pristine tree (made once per identity): read it, never
        write to it."""
        return self._pristine()

    def _pristine(self) -> Path:
        """The source's pristine tree, made once per identity."""
        final = self.pristine_dir
        with locked(self._lock(f"{self.SRC}-{final.name}"), self.progress, "the source tree"):
            if (final / "tree").is_dir():
                os.utime(final)             # most recently used: pruned last
                return final / "tree"
            with publishing(final) as tmp:
                self.source.materialize(tmp / "tree", self.progress)
                (tmp / "identity").write_text(self.inputs.source_identity + "\n")
        return final / "tree"

    def _workspace(self, pristine: Path) -> Path:
        """The workspace tree with this series applied (only changed files written)."""
        self.progress.phase("patch", f"{len(self.patches)} patches, "
                                     f"{len(self.overlays)} overlay files")
        try:
            # before any workspace is made: a series that does not apply costs nothing
            desired = apply_series(pristine, self.patches, self.overlays)
        except PatchError as exc:
            exc.baseline = source_label(self.inputs.source_identity)
            raise
        work = self.workspace_dir
        tree = work / "tree"
        state_file = work / "state.json"
        if not (work / "ready").exists():
            self.progress.phase("workspace", f"copying the pristine tree to {work}")
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            shutil.copytree(pristine, tree, symlinks=True)
            state_file.write_text(json.dumps({"touched": [], "dirty": False}))
            (work / "ready").touch()
        os.utime(work)                      # most recently used: pruned last
        state = json.loads(state_file.read_text())
        if state.get("dirty"):
            # An earlier build was killed: its processes may still run, and its
            # half-written outputs could look newer than their sources.
            self.progress.phase("workspace", "an earlier build was interrupted: "
                                             "removing its output")
            stop_build(state.get("pgid"), work)
            self._discard_partial(tree)
        previous = set(state["touched"])
        # Recorded before writing: a sync cut short must still be undone next time.
        self._state = {"touched": sorted(previous | set(desired)), "dirty": False, "pgid": None}
        self._save_state(tree)
        changed = sync_workspace(tree, pristine, previous, desired)
        LOG.info("workspace %s: %d files changed", tree, len(changed))
        self._state["touched"] = sorted(desired)
        self._save_state(tree)
        return tree

    def _save_state(self, tree: Path) -> None:
        state_file = tree.parent / "state.json"
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state))
        os.replace(tmp, state_file)

    def _stream(self, argv: list[str], cwd: Path, env: Mapping[str, str], log: IO[str],
                step: str, progress_of: Callable[[str], str | None] | None = None,
                workspace: Path | None = None) -> None:
        """Run one build step, copying its output to ``log``; every 10 s the
        latest ``progress_of(line)`` is reported.

        :param workspace: the tree whose ``state.json`` records the step's
            process group while it runs (default: ``cwd``).
        :raises BuildError: the step exited non-zero, or ran past
            :meth:`step_deadline` (edk2's ``build`` can hang after an error
            in one of its AutoGen workers), naming the log.
        """
        tree = workspace or cwd
        deadline = self.step_deadline()
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(argv, cwd=cwd, env=dict(env), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, errors="replace",
                                    start_new_session=True)
        except FileNotFoundError as exc:
            raise DependencyError(f"{argv[0]} not found: run ./run setup as root") from exc
        # Until the step ends the workspace is dirty: a harness killed now
        # leaves the group id for the next builder to stop.
        self._state.update(dirty=True, pgid=proc.pid)
        self._save_state(tree)
        tail: list[str] = []
        latest: str | None = None
        last_report = time.monotonic()
        assert proc.stdout is not None
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            stop_build(proc.pid, tree.parent)
        watchdog = threading.Timer(deadline, expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            for line in proc.stdout:
                log.write(line)
                tail = (tail + [line.rstrip()])[-30:]
                if progress_of is not None:
                    latest = progress_of(line) or latest
                now = time.monotonic()
                if latest is not None and now - last_report >= 10:
                    last_report = now
                    self.progress.phase(step, latest)
            status = proc.wait()
        except BaseException:
            stop_build(proc.pid, tree.parent)
            proc.wait()
            raise
        finally:
            watchdog.cancel()
        log.flush()
        if expired.is_set():
            log.write(f"ebs-harness: stopped after {deadline:g} s\n")
            stopped = (f"no end after {deadline:g} s: stopped (set {STEP_DEADLINE_ENV} "
                       "for a longer deadline)")
            raise BuildError(step, argv, Path(log.name), "\n".join([*tail, stopped]))
        # Exited by itself (success or a compile error): make, ninja and gcc
        # leave no half-written target behind, so the workspace stays usable.
        self._state.update(dirty=False, pgid=None)
        self._save_state(tree)
        if status != 0:
            raise BuildError(step, argv, Path(log.name), "\n".join(tail))

    @staticmethod
    def step_deadline() -> float:
        """Seconds a build step may take: ``EBS_HARNESS_BUILD_TIMEOUT``, else
        :data:`STEP_DEADLINE` (a cold OVMF or QEMU build takes minutes)."""
        raw = os.environ.get(STEP_DEADLINE_ENV, "")
        try:
            return float(raw) if raw else STEP_DEADLINE
        except ValueError:
            raise UsageError(f"{STEP_DEADLINE_ENV}={raw!r}: seconds, a number") from None

    # Recipe ------------------------------------------------------------

    def load(self, path: Path) -> P:
        """The published directory at ``path`` as this recipe's type."""
        raise NotImplementedError

    def _compile(self, tree: Path) -> float:
        """Build in ``tree``, logging to ``tree.parent / "build.log"``; seconds taken."""
        raise NotImplementedError

    def _publish_into(self, tree: Path, tmp: Path) -> None:
        """Copy the build's outputs from ``tree`` into ``tmp`` (published as a whole)."""
        raise NotImplementedError

    def _manifest_extra(self) -> dict[str, object]:
        """Recipe-specific entries of ``manifest.json``."""
        return {}

    def _discard_partial(self, tree: Path) -> None:
        """Remove what an interrupted build may have left half-written."""


def as_flag_dict(flags: object) -> dict[str, object]:
    """A frozen dataclass of flags as a JSON-able dict (tuples of pairs become dicts)."""
    assert dataclasses.is_dataclass(flags) and not isinstance(flags, type)
    data = dataclasses.asdict(flags)
    for name, value in data.items():
        if isinstance(value, tuple) and all(isinstance(v, tuple) and len(v) == 2
                                            for v in value):
            data[name] = dict(value)
    return data
