"""edk2 source, the patch series, and cached OVMF builds.

Data flows one way::

    source provider  ->  pristine tree  ->  workspace (series applied)  ->  build  ->  firmware dir
    (Debian package      (cache/src/ID)     (cache/work/WS, incremental)            (cache/firmware/KEY)
     or --edk2-src)

- A *source provider* (:class:`DebianSource`, :class:`TreeSource`) knows its
  identity and how to make a pristine tree from it. A user's tree is copied,
  never modified.
- The *workspace* is one copy of the pristine tree per (source identity,
  build flags, compiler). Each build re-applies the series onto pristine
  files in a staging directory first; a patch that does not apply raises
  :class:`PatchError` and leaves the workspace as it was. Then only the files
  whose content changed are written, so edk2's incremental build recompiles
  only the modules the changed patches touch.
- The *firmware directory* for a cache key is assembled in a temporary
  directory and published with one ``rename``: a directory that exists under
  its key is complete. A file lock per key makes concurrent builders (xdist
  workers, two terminals) build once; the second waits and reuses.

The key hashes the source identity, every patch's and overlay file's bytes,
the build flags and the compiler versions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from filelock import FileLock, Timeout

from harness.errors import (
    BuildError,
    DependencyError,
    PatchError,
    SourceError,
    UsageError,
)
from harness.tools import run_tool

LOG = logging.getLogger(__name__)

# Bump when the way a build is made changes in a way the key cannot see.
RECIPE_VERSION = 1

REPO_ROOT = Path(__file__).resolve().parent.parent
SERIES_DIR = REPO_ROOT / "ovmf-patches"
#: Directories of this repository copied into the edk2 workspace, keyed
#: like patches: workspace path -> repository path.
OVERLAYS: Mapping[str, Path] = {"EbsProbe": REPO_ROOT / "guests" / "ebs-probe"}

DEBIAN_PACKAGE = "edk2"
DEBIAN_VERSION = "2022.11-6+deb12u2"
DEBIAN_ORIG = "edk2_2022.11.orig.tar.xz"
DEBIAN_ORIG_SHA256 = "64257dd8a2778c969b8a869cd3b6eda2db2a346bfcf24dc729859745968f1fd6"
#: Debian patches reversed after extraction, with why.
DEBIAN_REVERSED_PATCHES = {
    "Disable-the-Shell-when-SecureBoot-is-enabled.patch":
        "makes Shell.inf need SecureBootVariableLib, which a non-secure-boot "
        "OvmfPkgX64 build does not provide",
}

#: The files that make a directory an edk2 tree we can build OVMF from.
EDK2_MARKERS = ("edksetup.sh", "MdePkg/MdePkg.dec", "OvmfPkg/OvmfPkgX64.dsc",
                "BaseTools/Makefile")

#: Never copied from a user's tree, never part of its identity.
TREE_IGNORED = ("Build", ".git", "Conf")

PYTHON_FOR_EDK2 = "/usr/bin/python3"


def cache_root() -> Path:
    """``EBS_HARNESS_CACHE``, or ``~/.cache/ovmf-ebs-harness``."""
    env = os.environ.get("EBS_HARNESS_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "ovmf-ebs-harness"


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _short(text: str) -> str:
    return _sha256_bytes(text.encode())[:16]


# ------------------------------------------------------------- progress


class Progress(Protocol):
    """Where long work reports its phases."""

    def phase(self, name: str, detail: str = "") -> None: ...


class StderrProgress:
    """Phase lines with elapsed seconds on stderr: ``[  12.3s] patch: 7 patches``."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream or sys.stderr
        self._start = time.monotonic()

    def phase(self, name: str, detail: str = "") -> None:
        elapsed = time.monotonic() - self._start
        text = f"{name}: {detail}" if detail else name
        print(f"[{elapsed:6.1f}s] {text}", file=self._stream, flush=True)


class _Quiet:
    def phase(self, name: str, detail: str = "") -> None:
        LOG.debug("%s: %s", name, detail)


# ---------------------------------------------------------- build flags


@dataclass(frozen=True)
class BuildFlags:
    """What the OVMF build is asked for; part of the cache key."""

    platform: str = "OvmfPkg/OvmfPkgX64.dsc"
    arch: str = "X64"
    toolchain: str = "GCC5"
    target: str = "DEBUG"
    defines: tuple[tuple[str, str], ...] = (
        ("FD_SIZE_4MB", "TRUE"),
        ("NETWORK_HTTP_BOOT_ENABLE", "FALSE"),
        ("TPM2_ENABLE", "FALSE"),
        # Patch 0007: the fw_cfg test knobs, EbsAdversaryDxe and EbsProbe
        # exist only in builds with this define (never in production OVMF).
        ("EBS_HARNESS_TEST", "TRUE"),
    )
    #: DEBUG_ERROR|WARN|INFO|LOAD|FS|... (0x8000004F): shows the DEBUG_INFO
    #: trace lines, hides the noisy DEBUG_VERBOSE.
    debug_level: int = 0x8000004F
    #: Debug output on the serial port instead of the 0x402 debug port.
    debug_on_serial: bool = False

    def __post_init__(self) -> None:
        if self.target not in ("DEBUG", "NOOPT"):
            raise UsageError(f"build target {self.target} prints no trace: use DEBUG or NOOPT")
        for name, value in self.defines:
            if not re.fullmatch(r"[A-Z0-9_]+", name) or " " in value:
                raise UsageError(f"bad build define {name}={value}")

    @property
    def output_dir(self) -> str:
        """``Build/OvmfX64/DEBUG_GCC5``, relative to the workspace."""
        return f"Build/Ovmf{self.arch}/{self.target}_{self.toolchain}"

    def argv(self, jobs: int) -> list[str]:
        argv = ["build", "-p", self.platform, "-a", self.arch, "-t", self.toolchain,
                "-b", self.target, "-n", str(jobs)]
        defines = dict(self.defines)
        if self.debug_on_serial:
            defines["DEBUG_ON_SERIAL_PORT"] = "TRUE"
        for name, value in sorted(defines.items()):
            argv += ["-D", f"{name}={value}"]
        argv += ["--pcd", f"gEfiMdePkgTokenSpaceGuid.PcdDebugPrintErrorLevel={self.debug_level:#x}"]
        return argv

    def as_dict(self) -> dict[str, object]:
        data = dataclasses.asdict(self)
        data["defines"] = dict(self.defines)
        return data

    def workspace_dict(self) -> dict[str, object]:
        """The flags that shape a workspace: everything but the series."""
        return self.as_dict()


# -------------------------------------------------------------- sources


def is_edk2_tree(path: Path) -> str | None:
    """None if ``path`` is an edk2 tree we can build, else why not."""
    if not path.is_dir():
        return f"{path} is not a directory"
    for marker in EDK2_MARKERS:
        if not (path / marker).exists():
            return f"{path} is not an edk2 tree: {marker} is missing"
    return None


class SourceProvider(Protocol):
    def identity(self) -> str:
        """A string that changes whenever the source's content does."""

    def materialize(self, dest: Path, progress: Progress) -> None:
        """Make a pristine, buildable tree at ``dest`` (which does not exist)."""


@dataclass(frozen=True)
class TreeSource:
    """An existing edk2 tree of the user's (``--edk2-src``). Copied, never modified."""

    path: Path

    def __post_init__(self) -> None:
        why = is_edk2_tree(self.path)
        if why:
            raise SourceError(why)

    def _files(self) -> Iterator[Path]:
        for root, dirs, files in os.walk(self.path):
            if Path(root) == self.path:
                dirs[:] = [d for d in dirs if d not in TREE_IGNORED]
            dirs.sort()
            for name in sorted(files):
                yield Path(root) / name

    def identity(self) -> str:
        """The tree's path plus a hash of every file's name, size and mtime."""
        digest = hashlib.sha256()
        for file in self._files():
            try:
                stat = file.lstat()
            except FileNotFoundError:
                continue
            rel = file.relative_to(self.path)
            digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return f"tree:{self.path.resolve()}:{digest.hexdigest()}"

    def materialize(self, dest: Path, progress: Progress) -> None:
        progress.phase("copy", f"{self.path} -> {dest}")
        shutil.copytree(self.path, dest, symlinks=True,
                        ignore=lambda d, names: [n for n in names
                                                 if Path(d) == self.path and n in TREE_IGNORED])
        # edksetup.sh writes its tools_def.txt and target.txt into Conf/.
        (dest / "Conf").mkdir(exist_ok=True)


@dataclass(frozen=True)
class DebianSource:
    """Debian's ``edk2`` source package, pinned to a version and checksum."""

    version: str = DEBIAN_VERSION
    orig_sha256: str = DEBIAN_ORIG_SHA256
    downloads: Path = field(default_factory=lambda: cache_root() / "downloads")

    def identity(self) -> str:
        reversed_ = ",".join(sorted(DEBIAN_REVERSED_PATCHES))
        return (f"debian:{DEBIAN_PACKAGE}={self.version}:orig-sha256={self.orig_sha256}"
                f":reversed={reversed_}")

    @property
    def dsc(self) -> Path:
        return self.downloads / f"{DEBIAN_PACKAGE}_{self.version.split(':')[-1]}.dsc"

    def fetch(self, progress: Progress) -> None:
        """``apt-get source --download-only`` into the downloads directory."""
        if self.dsc.exists() and (self.downloads / DEBIAN_ORIG).exists():
            return
        ensure_deb_src(DEBIAN_PACKAGE, self.version)
        progress.phase("fetch", f"apt-get source {DEBIAN_PACKAGE}={self.version}")
        self.downloads.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.downloads, prefix=".fetch-") as tmp:
            run_tool(["apt-get", "source", "--download-only", "-q",
                      f"{DEBIAN_PACKAGE}={self.version}"], cwd=Path(tmp),
                     what=f"apt-get source {DEBIAN_PACKAGE}={self.version}")
            for item in Path(tmp).iterdir():
                os.replace(item, self.downloads / item.name)

    def extract(self, dest: Path, progress: Progress) -> None:
        """Check the orig tarball, ``dpkg-source -x``, reverse the patches that break us."""
        orig = self.downloads / DEBIAN_ORIG
        if not orig.exists():
            raise SourceError(f"{orig} is missing: the source package was not fetched")
        actual = sha256_file(orig)
        if actual != self.orig_sha256:
            raise SourceError(f"{orig}: sha256 {actual} is not the expected {self.orig_sha256}")
        progress.phase("extract", f"dpkg-source -x {self.dsc.name}")
        run_tool(["dpkg-source", "-x", str(self.dsc), str(dest)],
                 cwd=self.downloads, what="dpkg-source -x")
        for name, why in DEBIAN_REVERSED_PATCHES.items():
            patch = dest / "debian" / "patches" / name
            LOG.info("reversing Debian patch %s: %s", name, why)
            run_tool(["patch", "-R", "-p1", "-F0", "--batch", "-i", str(patch)],
                     cwd=dest, what=f"reversing Debian patch {name}")

    def materialize(self, dest: Path, progress: Progress) -> None:
        self.fetch(progress)
        self.extract(dest, progress)


def source_from_option(path: str | None) -> SourceProvider:
    """``--edk2-src DIR`` / ``EBS_HARNESS_EDK2_SRC``, else Debian's package."""
    path = path or os.environ.get("EBS_HARNESS_EDK2_SRC") or None
    if path:
        return TreeSource(Path(path).expanduser().resolve())
    return DebianSource()


DEB_SRC_FILE = Path("/etc/apt/sources.list.d/ebs-harness-src.sources")


def ensure_deb_src(package: str, version: str) -> None:
    """Make ``apt-get source package=version`` possible: add deb-src entries
    mirroring the configured ``deb`` ones when apt knows no source for it."""
    if _apt_has_source(package, version):
        return
    entries = _deb_src_entries()
    if not entries:
        raise DependencyError("apt has no Debian 'deb' entries to derive a deb-src from; "
                              f"add one for {package} and retry")
    if os.geteuid() != 0:
        raise DependencyError(
            f"apt knows no source package {package}={version}: as root, add a deb-src "
            f"entry (or run ./run setup) and 'apt-get update'")
    DEB_SRC_FILE.write_text(entries)
    LOG.info("wrote %s", DEB_SRC_FILE)
    update = subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True,
                            check=False)
    if update.returncode != 0:
        last = (update.stderr.strip().splitlines() or [""])[-1]
        raise DependencyError(f"apt-get update failed after adding {DEB_SRC_FILE} "
                              f"(exit {update.returncode}): {last}")
    if not _apt_has_source(package, version):
        raise DependencyError(
            f"apt still finds no source package {package}={version} after adding "
            f"{DEB_SRC_FILE}: is the version still in the archive?")


def _apt_has_source(package: str, version: str) -> bool:
    try:
        proc = subprocess.run(["apt-cache", "showsrc", package], capture_output=True,
                              text=True, check=False)
    except FileNotFoundError as exc:
        raise DependencyError("apt-cache not found: the Debian source package needs "
                              "apt; use --edk2-src DIR on other systems") from exc
    return f"Version: {version}" in proc.stdout


def _deb_src_entries(etc_apt: Path = Path("/etc/apt")) -> str:
    """deb822 deb-src stanzas for every Debian ``deb`` entry apt has."""
    stanzas: list[str] = []
    sources = etc_apt / "sources.list.d"
    for file in sorted(sources.glob("*.sources")) if sources.is_dir() else []:
        if file.name == DEB_SRC_FILE.name:
            continue
        for stanza in file.read_text().split("\n\n"):
            lines = [line for line in stanza.splitlines()
                     if line.strip() and not line.startswith("#")]
            fields = dict(line.split(":", 1) for line in lines if ":" in line)
            fields = {k.strip(): v.strip() for k, v in fields.items()}
            if "deb" in fields.get("Types", "").split() and "debian" in fields.get("URIs", ""):
                fields["Types"] = "deb-src"
                stanzas.append("\n".join(f"{k}: {v}" for k, v in fields.items()))
    legacy = etc_apt / "sources.list"
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[0] == "deb" and "debian" in parts[1]:
                stanzas.append(f"Types: deb-src\nURIs: {parts[1]}\nSuites: {parts[2]}\n"
                               f"Components: {' '.join(parts[3:])}")
    return "\n\n".join(stanzas) + ("\n" if stanzas else "")


# ---------------------------------------------------------- patch series


@dataclass(frozen=True)
class Patch:
    path: Path
    data: bytes

    @property
    def name(self) -> str:
        return self.path.name

    def files(self) -> list[str]:
        """The tree paths this patch touches (p1), in order of appearance."""
        found: list[str] = []
        for line in self.data.decode("utf-8", "replace").splitlines():
            if line.startswith(("--- ", "+++ ")):
                target = line[4:].split("\t")[0].strip()
                if target == "/dev/null" or "/" not in target:
                    continue
                rel = target.split("/", 1)[1]
                if rel not in found:
                    found.append(rel)
        return found


def read_series(directory: Path = SERIES_DIR) -> list[Patch]:
    """The patches named in ``directory/series``, in order.

    Blank lines and ``#`` comments are skipped; a named patch that is
    missing is a :class:`PatchError`.
    """
    series = directory / "series"
    if not series.is_file():
        raise PatchError(series, None, None,
                         "the series file is missing: an empty file means no patches")
    patches: list[Patch] = []
    for number, line in enumerate(series.read_text().splitlines(), 1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        path = directory / name
        if not path.is_file():
            raise PatchError(path, None, None,
                             f"listed in {series}:{number} but the file is missing")
        patches.append(Patch(path, path.read_bytes()))
    return patches


def read_overlays(overlays: Mapping[str, Path] = OVERLAYS) -> dict[str, bytes]:
    """Workspace path -> content of every file of the overlay directories."""
    files: dict[str, bytes] = {}
    for dest, source in sorted(overlays.items()):
        if not source.is_dir():
            continue
        for file in sorted(source.rglob("*")):
            # What the build reads: not the directory's own documentation.
            if file.is_file() and "__pycache__" not in file.parts and file.suffix != ".md":
                files[f"{dest}/{file.relative_to(source).as_posix()}"] = file.read_bytes()
    return files


_HUNK_FAILED = re.compile(r"Hunk #(\d+) FAILED")
_PATCHING = re.compile(r"^(?:patching|checking) file '?([^'\n]+)'?", re.MULTILINE)
_CANT_FIND = re.compile(r"can't find file to patch at input line (\d+)")
_MALFORMED = re.compile(r"malformed patch at line (\d+)")


def _patch_failure(patch: Patch, output: str) -> PatchError:
    """Turn ``patch``'s output into an error naming the file and hunk."""
    target: str | None = None
    hunk: int | None = None
    for match in _PATCHING.finditer(output):
        tail = output[match.end():]
        next_file = _PATCHING.search(tail)
        segment = tail[:next_file.start()] if next_file else tail
        failed = _HUNK_FAILED.search(segment)
        if failed or "No file to patch" in segment or "Reversed" in segment:
            target = match.group(1).strip()
            hunk = int(failed.group(1)) if failed else None
            break
    if target is None and (found := _CANT_FIND.search(output)):
        target = f"(file named near patch line {found.group(1)})"
    if target is None and (found := _MALFORMED.search(output)):
        target = f"(malformed at patch line {found.group(1)})"
    interesting = [line for line in output.splitlines()
                   if "FAILED" in line or "malformed" in line or "can't find" in line
                   or "Reversed" in line or "No such file" in line or "garbage" in line]
    return PatchError(patch.path, target, hunk, "\n".join(interesting or output.splitlines()))


def apply_series(pristine: Path, patches: list[Patch],
                 overlays: Mapping[str, bytes]) -> dict[str, bytes | None]:
    """The content every touched file must have: the series applied in a
    staging copy of the pristine files (no fuzz), then the overlays.

    :returns: tree path -> new content, or None for a file the series deletes.
    :raises PatchError: naming the patch, file and hunk; nothing is written
        outside the staging directory.
    """
    touched: list[str] = []
    for patch in patches:
        touched += [f for f in patch.files() if f not in touched]
    with tempfile.TemporaryDirectory(prefix="ebs-series-") as tmp:
        staging = Path(tmp)
        for rel in touched:
            source = pristine / rel
            if source.is_file():
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, staging / rel)
        for patch in patches:
            try:
                proc = subprocess.run(
                    ["patch", "-p1", "-F0", "--batch", "--forward", "--no-backup-if-mismatch",
                     "-r", "-", "-d", str(staging)],
                    input=patch.data, capture_output=True, check=False)
            except FileNotFoundError as exc:
                raise DependencyError("patch not found: run ./run setup as root "
                                      "(installs Debian's patch package)") from exc
            if proc.returncode != 0:
                output = (proc.stdout + proc.stderr).decode("utf-8", "replace")
                raise _patch_failure(patch, output)
        result: dict[str, bytes | None] = {}
        for rel in touched:
            staged = staging / rel
            result[rel] = staged.read_bytes() if staged.is_file() else None
    result.update(overlays)
    return result


def sync_workspace(tree: Path, pristine: Path, previous: set[str],
                   desired: Mapping[str, bytes | None]) -> list[str]:
    """Make ``tree`` hold ``desired`` plus pristine content for files an
    earlier series touched and this one does not. Writes only files whose
    content differs, so their mtimes (and edk2's incremental build) see
    exactly what changed. :returns: the paths written or removed."""
    changed: list[str] = []
    for rel in sorted(previous | set(desired)):
        if rel in desired:
            want = desired[rel]
        else:
            source = pristine / rel
            want = source.read_bytes() if source.is_file() else None
        target = tree / rel
        have = target.read_bytes() if target.is_file() else None
        if have == want:
            continue
        if want is None:
            target.unlink()
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.ebs-tmp")
            tmp.write_bytes(want)
            os.replace(tmp, target)
        changed.append(rel)
    return changed


# --------------------------------------------------------- compilers, key


def toolchain_versions() -> dict[str, str]:
    """First version line of each tool whose output lands in the firmware."""
    versions: dict[str, str] = {}
    for tool, argv in (("gcc", ["gcc", "--version"]), ("nasm", ["nasm", "-v"]),
                       ("iasl", ["iasl", "-v"])):
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        except FileNotFoundError as exc:
            raise DependencyError(f"{tool} not found: run ./run setup as root "
                                  "(installs build-essential, nasm, acpica-tools)") from exc
        lines = [line.strip() for line in (proc.stdout + proc.stderr).splitlines()
                 if line.strip() and ("version" in line.lower() or tool in line.lower())]
        versions[tool] = lines[0] if lines else "unknown"
    return versions


@dataclass(frozen=True)
class BuildInputs:
    """Everything the firmware depends on; :attr:`key` hashes it."""

    source_identity: str
    patches: tuple[tuple[str, str], ...]       # (name, sha256)
    overlays: tuple[tuple[str, str], ...]      # (path, sha256)
    flags: BuildFlags
    toolchain: tuple[tuple[str, str], ...]

    def describe(self) -> dict[str, object]:
        return {
            "recipe": RECIPE_VERSION,
            "source": self.source_identity,
            "patches": [list(p) for p in self.patches],
            "overlays": [list(o) for o in self.overlays],
            "flags": self.flags.as_dict(),
            "toolchain": dict(self.toolchain),
        }

    @property
    def key(self) -> str:
        blob = json.dumps(self.describe(), sort_keys=True).encode()
        return _sha256_bytes(blob)[:20]

    @property
    def workspace_id(self) -> str:
        blob = json.dumps({"recipe": RECIPE_VERSION, "source": self.source_identity,
                           "flags": self.flags.workspace_dict(),
                           "toolchain": dict(self.toolchain)}, sort_keys=True)
        return _short(blob)


def build_inputs(source: SourceProvider, patches: list[Patch], overlays: Mapping[str, bytes],
                 flags: BuildFlags, toolchain: Mapping[str, str]) -> BuildInputs:
    return BuildInputs(
        source_identity=source.identity(),
        patches=tuple((p.name, _sha256_bytes(p.data)) for p in patches),
        overlays=tuple((name, _sha256_bytes(data)) for name, data in sorted(overlays.items())),
        flags=flags,
        toolchain=tuple(sorted(toolchain.items())),
    )


# -------------------------------------------------------------- firmware


@dataclass(frozen=True)
class Firmware:
    """A built firmware directory (see the module docstring for its layout)."""

    path: Path
    key: str

    REQUIRED = ("OVMF_CODE.fd", "OVMF_VARS.fd", "manifest.json")

    @classmethod
    def load(cls, path: str | Path) -> Firmware:
        """A firmware directory made by ``ebs-harness build``; UsageError if it is not one."""
        directory = Path(path).expanduser().resolve()
        missing = [name for name in cls.REQUIRED if not (directory / name).is_file()]
        if missing:
            raise UsageError(f"{directory} is not a firmware directory from "
                             f"'ebs-harness build': {', '.join(missing)} missing")
        try:
            manifest = json.loads((directory / "manifest.json").read_text())
            key = str(manifest["key"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{directory}/manifest.json is unreadable: {exc}") from exc
        return cls(directory, key)

    @property
    def code(self) -> Path:
        return self.path / "OVMF_CODE.fd"

    @property
    def vars(self) -> Path:
        return self.path / "OVMF_VARS.fd"

    @property
    def manifest(self) -> dict[str, object]:
        data: dict[str, object] = json.loads((self.path / "manifest.json").read_text())
        return data

    @property
    def debug_on_serial(self) -> bool:
        """Built with ``-D DEBUG_ON_SERIAL_PORT``: the trace is on the serial port."""
        flags = self.manifest.get("flags")
        return isinstance(flags, dict) and bool(flags.get("debug_on_serial"))

    def module_file(self, name: str, suffix: str) -> Path:
        """``modules/<name><suffix>``, e.g. ``module_file("IoMmuDxe", ".debug")``."""
        return self.path / "modules" / f"{name}{suffix}"


@dataclass(frozen=True)
class BuildResult:
    firmware: Firmware
    cache_hit: bool
    seconds: float


# ----------------------------------------------------------------- build


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
def _locked(lock_path: Path, progress: Progress, what: str) -> Iterator[None]:
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


class Builder:
    """Builds OVMF for one set of inputs under one cache root."""

    def __init__(self, source: SourceProvider, *, flags: BuildFlags | None = None,
                 series_dir: Path = SERIES_DIR, overlays: Mapping[str, Path] = OVERLAYS,
                 cache: Path | None = None, jobs: int | None = None,
                 progress: Progress | None = None) -> None:
        self.source = source
        self.flags = flags or BuildFlags()
        self.cache = cache or cache_root()
        self.jobs = jobs or os.cpu_count() or 1
        self.progress: Progress = progress or _Quiet()
        self._state: dict[str, object] = {"touched": [], "dirty": False, "pgid": None}
        self.patches = read_series(series_dir)
        self.overlays = read_overlays(overlays)
        self.inputs = build_inputs(source, self.patches, self.overlays, self.flags,
                                   toolchain_versions())

    # Paths -------------------------------------------------------------

    @property
    def firmware_dir(self) -> Path:
        return self.cache / "firmware" / self.inputs.key

    @property
    def pristine_dir(self) -> Path:
        return self.cache / "src" / _short(self.inputs.source_identity)

    @property
    def workspace_dir(self) -> Path:
        return self.cache / "work" / self.inputs.workspace_id

    def _lock(self, name: str) -> Path:
        return self.cache / "locks" / f"{name}.lock"

    # Steps -------------------------------------------------------------

    def build(self, rebuild: bool = False) -> BuildResult:
        start = time.monotonic()
        key = self.inputs.key
        if not rebuild and self.firmware_dir.is_dir():
            os.utime(self.firmware_dir)     # most recently used: pruned last
            return BuildResult(Firmware.load(self.firmware_dir), True, time.monotonic() - start)
        with _locked(self._lock(f"firmware-{key}"), self.progress, f"firmware {key}"):
            if not rebuild and self.firmware_dir.is_dir():
                self.progress.phase("cache", f"another build published {key}")
                return BuildResult(Firmware.load(self.firmware_dir), True,
                                   time.monotonic() - start)
            pristine = self._pristine()
            with _locked(self._lock(f"work-{self.inputs.workspace_id}"), self.progress,
                         "the build workspace"):
                tree = self._workspace(pristine)
                seconds = self._build(tree)
                self._publish(tree, seconds)
        prune(self.cache, "firmware", KEEP["firmware"], spare=key)
        prune(self.cache, "work", KEEP["work"], spare=self.inputs.workspace_id)
        prune(self.cache, "src", KEEP["src"], spare=self.pristine_dir.name)
        return BuildResult(Firmware.load(self.firmware_dir), False, time.monotonic() - start)

    def _pristine(self) -> Path:
        """The source's pristine tree, made once per identity."""
        final = self.pristine_dir
        with _locked(self._lock(f"src-{final.name}"), self.progress, "the edk2 source"):
            if (final / "tree").is_dir():
                os.utime(final)             # most recently used: pruned last
                return final / "tree"
            with publishing(final) as tmp:
                self.source.materialize(tmp / "tree", self.progress)
                (tmp / "identity").write_text(self.inputs.source_identity + "\n")
        return final / "tree"

    def _workspace(self, pristine: Path) -> Path:
        """The workspace tree with this series applied (only changed files written)."""
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
            # half-written objects could look newer than their sources. Stop
            # them and start the platform build afresh.
            self.progress.phase("workspace", "an earlier build was interrupted: "
                                             "removing its output")
            _stop_build(state.get("pgid"), work)
            shutil.rmtree(tree / "Build", ignore_errors=True)
        self.progress.phase("patch", f"{len(self.patches)} patches, "
                                     f"{len(self.overlays)} overlay files")
        desired = apply_series(pristine, self.patches, self.overlays)
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

    def _env(self, tree: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "WORKSPACE": str(tree),
            "EDK_TOOLS_PATH": str(tree / "BaseTools"),
            "PYTHON_COMMAND": PYTHON_FOR_EDK2,
            "PACKAGES_PATH": str(tree),
        })
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":")
                               if ".venv" not in p and "pyenv" not in p)
        return env

    def _build(self, tree: Path) -> float:
        start = time.monotonic()
        log_path = tree.parent / "build.log"
        env = self._env(tree)
        with open(log_path, "w") as log:
            stamp = tree.parent / "basetools-built"
            if not stamp.exists():
                self.progress.phase("BaseTools", f"make -C BaseTools -j{self.jobs}")
                self._stream(["make", "-C", "BaseTools", f"-j{self.jobs}"], tree, env, log,
                             "BaseTools")
                stamp.touch()
            argv = self.flags.argv(self.jobs)
            self.progress.phase("OVMF", " ".join(argv))
            # edksetup.sh reads "$@": source it with no arguments.
            script = 'argv=("$@"); set --; . ./edksetup.sh && exec "${argv[@]}"'
            self._stream(["bash", "-c", script, "edk2-build", *argv], tree, env, log, "OVMF")
        seconds = time.monotonic() - start
        self.progress.phase("OVMF", f"built in {seconds:.0f} s")
        return seconds

    def _stream(self, argv: list[str], cwd: Path, env: Mapping[str, str], log: IO[str],
                step: str) -> None:
        """Run ``argv``, copying its output to ``log`` and counting modules."""
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
        self._save_state(cwd)
        tail: list[str] = []
        modules = 0
        last_report = time.monotonic()
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(line)
                tail = (tail + [line.rstrip()])[-30:]
                if line.startswith("Building ... "):
                    modules += 1
                now = time.monotonic()
                if now - last_report >= 10:
                    last_report = now
                    self.progress.phase(step, f"{modules} modules so far")
            status = proc.wait()
        except BaseException:
            _stop_build(proc.pid, cwd.parent)
            proc.wait()
            raise
        log.flush()
        # Exited by itself (success or a compile error): make and gcc leave
        # no half-written target behind, so the workspace stays usable.
        self._state.update(dirty=False, pgid=None)
        self._save_state(cwd)
        if status != 0:
            raise BuildError(step, argv, Path(log.name), "\n".join(tail))

    def _publish(self, tree: Path, seconds: float) -> None:
        """Copy the outputs into a temporary directory, then rename it to the key."""
        out = tree / self.flags.output_dir
        final = self.firmware_dir
        with publishing(final) as tmp:
            for name in ("OVMF_CODE.fd", "OVMF_VARS.fd", "OVMF.fd"):
                shutil.copy2(out / "FV" / name, tmp / name)
            modules = tmp / "modules"
            modules.mkdir()
            arch = out / self.flags.arch
            for file in sorted(arch.glob("*.efi")) + sorted(arch.glob("*.debug")):
                shutil.copy2(file, modules / file.name)
            for mapfile in sorted(arch.glob("**/DEBUG/*.map")):
                shutil.copy2(mapfile, modules / mapfile.name)
            shutil.copy2(tree.parent / "build.log", tmp / "build.log")
            manifest = {
                "key": self.inputs.key,
                **self.inputs.describe(),
                "build_argv": self.flags.argv(self.jobs),
                "build_seconds": round(seconds, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "modules": len(list(modules.glob("*.efi"))),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        self.progress.phase("publish", str(final))


#: How many of each kind of cache directory are kept; older ones (by last
#: use) go. A workspace is ~700 MB, a pristine tree ~170 MB, a firmware ~110 MB.
KEEP = {"firmware": 8, "work": 2, "src": 2}

#: A directory used this recently may be in use in another process (a
#: firmware booting, readers take no lock): never pruned.
PRUNE_MIN_AGE_S = 3600.0


def prune(cache: Path, kind: str, keep: int, spare: str,
          min_age: float = PRUNE_MIN_AGE_S) -> list[str]:
    """Remove all but the ``keep`` most recently used directories of
    ``cache/kind`` (``firmware``, ``work`` or ``src``): never ``spare``, never
    one used in the last ``min_age`` seconds, never one whose lock another
    builder holds. :returns: the names removed."""
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


def _stop_build(pgid: object, workspace: Path, timeout: float = 10.0) -> None:
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
            raise BuildError("workspace", ["kill", *map(str, members)], workspace / "build.log",
                             f"processes {members} of an earlier build would not die")
        time.sleep(0.05)
        members = _group_members(pgid, workspace)


def build_firmware(source: SourceProvider | None = None, *, rebuild: bool = False,
                   progress: Progress | None = None, **kwargs: object) -> BuildResult:
    """Build (or reuse from the cache) the patched OVMF; ``seconds`` counts
    everything, the key's inputs (patches, toolchain versions) included."""
    start = time.monotonic()
    builder = Builder(source or DebianSource(), progress=progress, **kwargs)  # type: ignore[arg-type]
    result = builder.build(rebuild=rebuild)
    return dataclasses.replace(result, seconds=time.monotonic() - start)
