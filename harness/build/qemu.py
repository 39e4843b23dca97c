"""The harness's QEMU: Debian's QEMU 10.0 source package with the series in
``qemu-patches/`` (an emulated SEV for TCG, the ``sev-emulated`` object),
configured for what the harness runs, cached by key like the firmware.

Why 10.0 (trixie's ``1:10.0.13+ds-0+deb13u1``): upstream's SEV class split
(``sev-common`` with ``sev-guest`` and ``sev-snp-guest``) and the
confidential-guest hooks live there, so the series is a port toward QEMU's
master rather than a fork of Debian 12's 7.2, and SEV-ES and SNP emulation
can follow on the same base. ``docs/emulated-sev.md`` says more, and what
Debian 12's 7.2 is still used for.

Two catches of Debian's ``+ds`` repack, handled here: configure's ``mkvenv``
installs meson from ``python/wheels/``, which the repack empties, so the
wheel it wants (:data:`MESON_REQUIREMENT`) comes from PyPI through pip, pinned
by sha256 and downloaded once into the cache; and the repack ships no ROMs
(SeaBIOS, option ROMs), so the binary looks for them where Debian's own QEMU
does, in the directories of :data:`FIRMWARE_PATH`, which ``setup-host``
fills with Debian's packages.

A QEMU directory holds ``bin/qemu-system-x86_64``, ``share/trace-events-all``
(the formats of its trace events, which the device trace reads:
:mod:`harness.analysis.trace_events`), ``build.log`` and ``manifest.json``. The key hashes the source identity (Debian's package and
the meson wheel), every patch's bytes, the configure flags, and the versions
of the compiler, ninja and the libraries the binary links (glib, pixman,
slirp).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from harness import shared
from harness.build.cache import (
    Built,
    CachedBuilder,
    PublishedDir,
    SourceProvider,
    as_flag_dict,
    cache_root,
    locked,
    publishing,
    remembered_versions,
    sha256_file,
    short_hash,
    system_python_env,
    tool_versions,
)
from harness.build.debian import DebianSourcePackage, PrivateApt
from harness.build.progress import Progress, QuietProgress
from harness.errors import DependencyError, SourceError, UsageError
from harness.tools import run_tool

LOG = logging.getLogger(__name__)

SERIES_DIR = shared("qemu-patches")

DEBIAN_PACKAGE = "qemu"
DEBIAN_VERSION = "1:10.0.13+ds-0+deb13u1"
DEBIAN_RELEASE = "trixie"
DEBIAN_ORIG = "qemu_10.0.13+ds.orig.tar.xz"
DEBIAN_ORIG_SHA256 = "6a0888e806c2ffc0c5f0733e974f9aea55491950d3c47c98669c8b236dde59ae"

#: What configure's ``mkvenv`` installs from ``python/wheels/`` (the tree's
#: ``pythondeps.toml``), and the wheel's sha256 as PyPI serves it.
MESON_REQUIREMENT = "meson==1.5.0"
MESON_WHEEL = "meson-1.5.0-py3-none-any.whl"
MESON_WHEEL_SHA256 = "52b34f4903b882df52ad0d533146d4b992c018ea77399f825579737672ae7b20"

BINARY = "qemu-system-x86_64"
#: The build's list of trace events and their formats (ninja target).
TRACE_EVENTS = "trace/trace-events-all"
#: Where Debian's QEMU looks for ROMs (qemu-system-data, seabios, ipxe-qemu):
#: its ``debian/rules`` configures ``--firmwarepath`` so.
FIRMWARE_PATH = "/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu"
#: The out-of-tree build directory inside the workspace tree.
BUILD_DIR = "build-ebs"

#: The libraries the binary links, by pkg-config name (their versions are in the key).
LIBRARIES = ("glib-2.0", "pixman-1", "slirp")


@dataclass(frozen=True)
class QemuFlags:
    """``configure``'s options: one target, only the features the harness
    uses (TCG; KVM too, since QEMU builds ``sev.c``, and with it the
    emulated SEV, only with it; slirp for the Linux guest's network; the
    system's libfdt; no ROMs to install, the repack has none)."""

    target_list: str = "x86_64-softmmu"
    options: tuple[str, ...] = (
        "--disable-docs",
        "--disable-werror",
        "--without-default-features",
        "--enable-tcg",
        "--enable-kvm",
        "--enable-slirp",
        "--enable-fdt=system",
        "--disable-install-blobs",
        f"--firmwarepath={FIRMWARE_PATH}",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", tuple(self.options))
        for option in self.options:
            if not option.startswith("--") or " " in option:
                raise UsageError(f"bad configure option {option!r}")

    def argv(self) -> list[str]:
        return ["../configure", f"--target-list={self.target_list}", *self.options]

    def as_dict(self) -> dict[str, object]:
        return as_flag_dict(self)

    def workspace_dict(self) -> dict[str, object]:
        return self.as_dict()


def toolchain_versions() -> dict[str, str]:
    """Compiler and ninja versions, and the linked libraries' (remembered:
    :func:`remembered_versions`). Meson is the pinned wheel's, in the source
    identity."""
    return remembered_versions("qemu10", ["gcc", "ninja", "pkg-config"],
                               _toolchain_versions)


def _toolchain_versions() -> dict[str, str]:
    hint = ("run ./run setup as root (installs build-essential, ninja-build, python3-venv, "
            "libglib2.0-dev, libpixman-1-dev, libslirp-dev, libfdt-dev)")
    versions = tool_versions({"gcc": ["gcc", "--version"],
                              "ninja": ["ninja", "--version"]}, hint)
    for library in LIBRARIES:
        try:
            proc = subprocess.run(["pkg-config", "--modversion", library], capture_output=True,
                                  text=True, check=False)
        except FileNotFoundError:
            versions[library] = "no pkg-config"
            continue
        versions[library] = proc.stdout.strip() if proc.returncode == 0 else "missing"
    return versions


def fetch_meson_wheel(progress: Progress) -> Path:
    """:data:`MESON_WHEEL`, downloaded once with pip (PyPI) into the cache's
    ``downloads/wheels/`` and checked against :data:`MESON_WHEEL_SHA256`.

    :raises DependencyError: pip is missing or could not download it.
    :raises SourceError: what PyPI served is not the pinned wheel.
    """
    root = cache_root()
    dest = root / "downloads" / "wheels" / MESON_WHEEL
    if dest.is_file() and sha256_file(dest) == MESON_WHEEL_SHA256:
        return dest
    with locked(root / "locks" / "meson-wheel.lock", progress, "the meson wheel"):
        if dest.is_file() and sha256_file(dest) == MESON_WHEEL_SHA256:
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        progress.phase("fetch", f"pip download {MESON_REQUIREMENT} (PyPI)")
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                 "--disable-pip-version-check", "-q", "-d", tmp, MESON_REQUIREMENT],
                capture_output=True, text=True, check=False)
            got = Path(tmp) / MESON_WHEEL
            if proc.returncode != 0 or not got.is_file():
                said = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
                raise DependencyError(
                    f"pip download {MESON_REQUIREMENT} (QEMU's configure needs it) failed: "
                    f"{said[-1] if said else f'exit {proc.returncode}, no {MESON_WHEEL}'}")
            actual = sha256_file(got)
            if actual != MESON_WHEEL_SHA256:
                raise SourceError(f"{MESON_WHEEL} from PyPI: sha256 {actual} is not the "
                                  f"pinned {MESON_WHEEL_SHA256}")
            os.replace(got, dest)
    return dest


@dataclass(frozen=True)
class QemuSource:
    """Debian's QEMU source package, made buildable: the pinned meson wheel
    in ``python/wheels/``, where configure's ``mkvenv`` looks for it."""

    package: DebianSourcePackage

    def identity(self) -> str:
        return f"{self.package.identity()}:meson-wheel-sha256={MESON_WHEEL_SHA256}"

    def materialize(self, dest: Path, progress: Progress) -> None:
        wheel = fetch_meson_wheel(progress)
        self.package.materialize(dest, progress)
        wheels = dest / "python" / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        shutil.copy2(wheel, wheels / MESON_WHEEL)


def debian_source() -> QemuSource:
    return QemuSource(DebianSourcePackage(DEBIAN_PACKAGE, DEBIAN_VERSION, DEBIAN_RELEASE,
                                          DEBIAN_ORIG, DEBIAN_ORIG_SHA256))


@dataclass(frozen=True)
class QemuBuild(PublishedDir):
    """A built QEMU directory (see the module docstring for its layout)."""

    REQUIRED: ClassVar[tuple[str, ...]] = (f"bin/{BINARY}", "manifest.json")
    WHAT: ClassVar[str] = "QEMU directory"
    MADE_BY: ClassVar[str] = "ebs-harness build-qemu"

    @property
    def binary(self) -> Path:
        return self.path / "bin" / BINARY


#: A QEMU build's outcome (``.output`` is the :class:`QemuBuild`).
QemuBuildResult = Built[QemuBuild]


_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]")


def _ninja_progress(line: str) -> str | None:
    match = _NINJA_STEP.match(line)
    return f"{match.group(1)}/{match.group(2)} steps" if match else None


class QemuBuilder(CachedBuilder[QemuBuild]):
    """Builds the harness's QEMU for one set of inputs under one cache root."""

    RECIPE: ClassVar[str] = "qemu/3"
    PUBLISHED: ClassVar[str] = "qemu"
    WORK: ClassVar[str] = "qemu-work"
    SRC: ClassVar[str] = "qemu-src"
    #: A workspace is ~700 MB (source and objects), a pristine tree ~400 MB,
    #: a published QEMU ~70 MB.
    KEEP: ClassVar[Mapping[str, int]] = {"published": 4, "work": 1, "src": 1}

    def __init__(self, source: SourceProvider | None = None, *, flags: QemuFlags | None = None,
                 series_dir: Path = SERIES_DIR, cache: Path | None = None,
                 jobs: int | None = None, progress: Progress | None = None) -> None:
        self.flags: QemuFlags = flags or QemuFlags()
        super().__init__(source or debian_source(), flags=self.flags, series_dir=series_dir,
                         overlays={}, toolchain=toolchain_versions(), cache=cache, jobs=jobs,
                         progress=progress)

    def qemu(self, rebuild: bool = False) -> QemuBuildResult:
        """The QEMU of these inputs, from the cache or built."""
        return self.build(rebuild)

    def load(self, path: Path) -> QemuBuild:
        return QemuBuild.load(path)

    def _compile(self, tree: Path) -> float:
        start = time.monotonic()
        build = tree / BUILD_DIR
        env = system_python_env()   # configure's meson
        with open(tree.parent / "build.log", "w") as log:
            if not (build / "build.ninja").is_file():
                shutil.rmtree(build, ignore_errors=True)
                build.mkdir()
                argv = self.flags.argv()
                self.progress.phase("QEMU", "configure " + " ".join(argv[1:]))
                self._stream(argv, build, env, log, "configure", workspace=tree)
            argv = ["ninja", "-j", str(self.jobs), BINARY, TRACE_EVENTS]
            self.progress.phase("QEMU", " ".join(argv))
            self._stream(argv, build, env, log, "QEMU", _ninja_progress, workspace=tree)
        seconds = time.monotonic() - start
        self.progress.phase("QEMU", f"built in {seconds:.0f} s")
        return seconds

    def _publish_into(self, tree: Path, tmp: Path) -> None:
        (tmp / "bin").mkdir()
        shutil.copy2(tree / BUILD_DIR / BINARY, tmp / "bin" / BINARY)
        (tmp / "share").mkdir()
        shutil.copy2(tree / BUILD_DIR / TRACE_EVENTS, tmp / "share" / "trace-events-all")

    def _manifest_extra(self) -> dict[str, object]:
        return {"configure_argv": self.flags.argv(), "binary": f"bin/{BINARY}"}

    def _discard_partial(self, tree: Path) -> None:
        # A killed compiler may leave an object newer than its source: start
        # the build directory afresh.
        shutil.rmtree(tree / BUILD_DIR, ignore_errors=True)


#: A QEMU that can launch SEV-SNP guests (``sev-snp-guest``, QEMU >= 9.1):
#: Debian's from bookworm-backports, unpacked (never installed) under the
#: cache; it runs on Debian 12's libraries.
NEWER_PACKAGES = ("qemu-system-x86", "qemu-system-common", "qemu-system-data")
NEWER_VERSION = "1:10.0.2+ds-2+deb13u1~bpo12+1"
NEWER_RELEASE = "bookworm-backports"


def fetch_newer_qemu(progress: Progress | None = None) -> Path:
    """The ``qemu-system-x86_64`` of :data:`NEWER_VERSION`, downloaded
    through the harness's own apt configuration and unpacked once into
    ``qemu-backports/`` of the cache; its data files sit beside it."""
    progress = progress or QuietProgress()
    root = cache_root()
    final = root / "qemu-backports" / short_hash(NEWER_VERSION)
    binary = final / "usr" / "bin" / BINARY
    if binary.is_file():
        return binary
    with locked(root / "locks" / f"qemu-backports-{final.name}.lock", progress,
                "the newer QEMU"):
        if binary.is_file():
            return binary
        debs = PrivateApt(root / "apt-bin", kind="deb").download_binaries(
            NEWER_PACKAGES, NEWER_VERSION, NEWER_RELEASE, root / "downloads" / "binaries",
            progress)
        with publishing(final) as tmp:
            for deb in debs:
                run_tool(["dpkg-deb", "-x", str(deb), str(tmp)], what=f"unpacking {deb.name}")
            (tmp / "version").write_text(NEWER_VERSION + "\n")
        progress.phase("publish", str(final))
    return binary


def build_qemu(*, rebuild: bool = False, progress: Progress | None = None,
               **kwargs: object) -> QemuBuildResult:
    """Build (or reuse from the cache) the harness's QEMU; ``seconds`` counts
    everything, the key's inputs included."""
    start = time.monotonic()
    kwargs.setdefault("series_dir", SERIES_DIR)
    builder = QemuBuilder(debian_source(), progress=progress, **kwargs)  # type: ignore[arg-type]
    result = builder.qemu(rebuild=rebuild)
    return dataclasses.replace(result, seconds=time.monotonic() - start)
