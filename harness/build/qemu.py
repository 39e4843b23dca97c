"""The harness's own QEMU: Debian's QEMU 7.2 source package with the series
in ``qemu-patches/`` (an emulated SEV for TCG, ``sev-emulated-guest``),
configured for what the harness runs, cached by key like the firmware.

Why 7.2: it is the QEMU Debian 12 runs, so the emulated-SEV binary differs
from the system's only by the series (same device models, trace events and
QMP replies), and it builds from the source package as it is.
``docs/emulated-sev.md`` says more.

A QEMU directory holds ``bin/qemu-system-x86_64``, ``build.log`` and
``manifest.json``. The binary finds its ROMs (SeaBIOS, option ROMs: the +dfsg
source ships none) where Debian's own QEMU does, in the directories of
:data:`FIRMWARE_PATH`, which ``setup-host`` fills with Debian's packages.

The key hashes the source identity, every patch's bytes, the configure
flags, and the versions of the compiler, meson, ninja and the libraries the
binary links (glib, pixman, slirp).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from harness import shared
from harness.build.cache import (
    CachedBuilder,
    Progress,
    PublishedDir,
    QuietProgress,
    SourceProvider,
    as_flag_dict,
    cache_root,
    locked,
    publishing,
    remembered_versions,
    short_hash,
    system_python_env,
    tool_versions,
)
from harness.build.debian import DebianSourcePackage, PrivateApt
from harness.errors import UsageError
from harness.tools import run_tool

LOG = logging.getLogger(__name__)

SERIES_DIR = shared("qemu-patches")

DEBIAN_PACKAGE = "qemu"
DEBIAN_VERSION = "1:7.2+dfsg-7+deb12u18"
DEBIAN_RELEASE = "bookworm"
DEBIAN_ORIG = "qemu_7.2+dfsg.orig.tar.xz"
DEBIAN_ORIG_SHA256 = "91aca71520040edc40b8d437aa3004dae614f58e286cf653ee8996c07af2962f"

BINARY = "qemu-system-x86_64"
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
    uses (TCG; KVM too, since QEMU builds ``sev.c`` only with it; slirp for
    the Linux guest's network; the system's libfdt)."""

    target_list: str = "x86_64-softmmu"
    options: tuple[str, ...] = (
        "--disable-docs",
        "--disable-werror",
        "--without-default-features",
        "--enable-tcg",
        "--enable-kvm",
        "--enable-slirp",
        "--enable-fdt=system",
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
    """Compiler, meson and ninja versions, and the linked libraries'
    (remembered: :func:`remembered_versions`)."""
    return remembered_versions("qemu", ["gcc", "meson", "ninja", "pkg-config"],
                               _toolchain_versions)


def _toolchain_versions() -> dict[str, str]:
    hint = ("run ./run setup as root (installs build-essential, meson, ninja-build, "
            "libglib2.0-dev, libpixman-1-dev, libslirp-dev, libfdt-dev)")
    versions = tool_versions({"gcc": ["gcc", "--version"], "meson": ["meson", "--version"],
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


def debian_source() -> DebianSourcePackage:
    return DebianSourcePackage(DEBIAN_PACKAGE, DEBIAN_VERSION, DEBIAN_RELEASE, DEBIAN_ORIG,
                               DEBIAN_ORIG_SHA256)


@dataclass(frozen=True)
class QemuBuild(PublishedDir):
    """A built QEMU directory (see the module docstring for its layout)."""

    REQUIRED: ClassVar[tuple[str, ...]] = (f"bin/{BINARY}", "manifest.json")
    WHAT: ClassVar[str] = "QEMU directory"
    MADE_BY: ClassVar[str] = "ebs-harness build-qemu"

    @property
    def binary(self) -> Path:
        return self.path / "bin" / BINARY


@dataclass(frozen=True)
class QemuBuildResult:
    qemu: QemuBuild
    cache_hit: bool
    seconds: float


_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]")


def _ninja_progress(line: str) -> str | None:
    match = _NINJA_STEP.match(line)
    return f"{match.group(1)}/{match.group(2)} steps" if match else None


class QemuBuilder(CachedBuilder):
    """Builds the harness's QEMU for one set of inputs under one cache root."""

    RECIPE: ClassVar[str] = "qemu/1"
    PUBLISHED: ClassVar[str] = "qemu"
    WORK: ClassVar[str] = "qemu-work"
    SRC: ClassVar[str] = "qemu-src"
    #: A workspace is ~520 MB (source and objects), a pristine tree ~300 MB,
    #: a published QEMU ~60 MB.
    KEEP: ClassVar[Mapping[str, int]] = {"published": 4, "work": 1, "src": 1}

    def __init__(self, source: SourceProvider | None = None, *, flags: QemuFlags | None = None,
                 series_dir: Path = SERIES_DIR, cache: Path | None = None,
                 jobs: int | None = None, progress: Progress | None = None) -> None:
        self.flags: QemuFlags = flags or QemuFlags()
        super().__init__(source or debian_source(), flags=self.flags, series_dir=series_dir,
                         overlays={}, toolchain=toolchain_versions(), cache=cache, jobs=jobs,
                         progress=progress)

    def qemu(self, rebuild: bool = False) -> QemuBuildResult:
        published = self.build(rebuild)
        return QemuBuildResult(QemuBuild.load(published.path), published.cache_hit,
                               published.seconds)

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
            argv = ["ninja", "-j", str(self.jobs), BINARY]
            self.progress.phase("QEMU", " ".join(argv))
            self._stream(argv, build, env, log, "QEMU", _ninja_progress, workspace=tree)
        seconds = time.monotonic() - start
        self.progress.phase("QEMU", f"built in {seconds:.0f} s")
        return seconds

    def _publish_into(self, tree: Path, tmp: Path) -> None:
        (tmp / "bin").mkdir()
        shutil.copy2(tree / BUILD_DIR / BINARY, tmp / "bin" / BINARY)

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
