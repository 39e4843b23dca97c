"""The patched OVMF: edk2 from Debian's source package (or a tree of the
user's), the series for its baseline in ``ovmf-patches/edk2-VERSION/``, a
DEBUG build, cached by key.

Two baselines (:data:`BASELINES`, chosen with ``--edk2 VERSION``): 2025.02,
Debian 13's (the default), and 2022.11, Debian 12's.

The engine (:mod:`harness.build.cache`) does the caching, locking and
publishing; this module is the recipe: which source, which patches, the
``build`` command line, and what a firmware directory holds::

    OVMF_CODE.fd  OVMF_VARS.fd  OVMF.fd
    modules/<Module>.efi|.debug|.map     every module (symbols for the analysis)
    build.log  manifest.json             (source identity, patch hashes, flags,
                                          toolchain versions, build seconds)

The key hashes the source identity, every patch's bytes, the build flags and
the gcc/nasm/iasl versions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from harness import shared
from harness.build.cache import (
    Built,
    CachedBuilder,
    Compiled,
    PublishedDir,
    SourceProvider,
    as_flag_dict,
    remembered_versions,
    source_label,
    system_python_env,
    tool_versions,
)
from harness.build.debian import DebianSourcePackage, DebianTarballs
from harness.build.progress import Progress, counter
from harness.build.series import Patch, apply_in_place, read_series
from harness.errors import SourceError, UsageError
from harness.tools import run_tool

LOG = logging.getLogger(__name__)

SERIES_ROOT = shared("ovmf-patches")

DEBIAN_PACKAGE = "edk2"
DEBIAN_VERSION = "2022.11-6+deb12u2"
DEBIAN_RELEASE = "bookworm"
DEBIAN_ORIG = "edk2_2022.11.orig.tar.xz"
DEBIAN_ORIG_SHA256 = "64257dd8a2778c969b8a869cd3b6eda2db2a346bfcf24dc729859745968f1fd6"
#: Debian patches reversed after extraction, with why.
DEBIAN_REVERSED_PATCHES = {
    "Disable-the-Shell-when-SecureBoot-is-enabled.patch":
        "makes Shell.inf need SecureBootVariableLib, which a non-secure-boot "
        "OvmfPkgX64 build does not provide",
}

#: Debian 13's edk2 (CcIoMmu.c, the reserved shared-memory pool,
#: BeforeExitBootServices signalled once): the next baseline of the series.
#: Its .dsc is not served by this host's mirror; the tarballs are
#: (:class:`harness.build.debian.DebianTarballs`).
TRIXIE = DebianTarballs(
    "edk2", "2025.02-8+deb13u1", "trixie",
    "edk2_2025.02.orig.tar.xz",
    "b63b6053d6d89c74d9291f9e96fde1584be99e6fb9c169ba9511505129d6b049",
    "edk2_2025.02-8+deb13u1.debian.tar.xz",
    "e2a7f6fc58640818416a028d6d5e9dfc255697a7cdc60c14566c236df6bd9b08")

#: The files that make a directory an edk2 tree we can build OVMF from.
EDK2_MARKERS = ("edksetup.sh", "MdePkg/MdePkg.dec", "OvmfPkg/OvmfPkgX64.dsc",
                "BaseTools/Makefile")

#: Never copied from a user's tree, never part of its identity.
TREE_IGNORED = ("Build", ".git", "Conf")

PYTHON_FOR_EDK2 = "/usr/bin/python3"


# ---------------------------------------------------------- build flags


#: The SCSI HBA drivers OVMF has but does not build by default: test builds
#: have them, for the device zoo (docs/devices.md).
ZOO_DEFINES = (("PVSCSI_ENABLE", "TRUE"), ("MPT_SCSI_ENABLE", "TRUE"),
               ("LSI_SCSI_ENABLE", "TRUE"))


@dataclass(frozen=True)
class BuildFlags:
    """What the OVMF build is asked for; part of the cache key."""

    platform: str = "OvmfPkg/OvmfPkgX64.dsc"
    #: ``X64``, or ``IA32,X64`` for OvmfPkgIa32X64.dsc (PEI in IA32, DXE in
    #: X64); modules are published from the last one.
    arch: str = "X64"
    toolchain: str = "GCC5"
    target: str = "DEBUG"
    defines: tuple[tuple[str, str], ...] = (
        ("FD_SIZE_4MB", "TRUE"),
        ("NETWORK_HTTP_BOOT_ENABLE", "FALSE"),
        ("TPM2_ENABLE", "FALSE"),
        # The series' first [test only] patch: the trace, the fw_cfg test
        # knobs, IoMmuDxeTest.inf, EbsAdversaryDxe and EbsProbe exist only
        # in builds with this define (never in production OVMF).
        ("EBS_HARNESS_TEST", "TRUE"),
        *ZOO_DEFINES,
    )
    #: DEBUG_ERROR|WARN|INFO|LOAD|FS|... (0x8000004F): shows the DEBUG_INFO
    #: trace lines, hides the noisy DEBUG_VERBOSE.
    debug_level: int = 0x8000004F
    #: Debug output on the serial port instead of the 0x402 debug port.
    debug_on_serial: bool = False

    def __post_init__(self) -> None:
        if self.target not in ("DEBUG", "NOOPT", "RELEASE"):
            raise UsageError(f"build target {self.target}: DEBUG, NOOPT or RELEASE")
        if self.target == "RELEASE" and self.test_build:
            raise UsageError("a RELEASE build prints no trace: use DEBUG or NOOPT for a test "
                             "build (EBS_HARNESS_TEST)")
        for name, value in self.defines:
            if not re.fullmatch(r"[A-Z0-9_]+", name) or " " in value:
                raise UsageError(f"bad build define {name}={value}")

    @property
    def test_build(self) -> bool:
        """Built with the series' test apparatus (``-D EBS_HARNESS_TEST``)."""
        return dict(self.defines).get("EBS_HARNESS_TEST") == "TRUE"

    @property
    def output_dir(self) -> str:
        """``Build/OvmfX64/DEBUG_GCC5``, relative to the workspace."""
        platform = {"IA32,X64": "3264"}.get(self.arch, self.arch)
        return f"Build/Ovmf{platform}/{self.target}_{self.toolchain}"

    @property
    def module_arch(self) -> str:
        """The architecture whose modules (DXE's) are published."""
        return self.arch.split(",")[-1]

    def argv(self, jobs: int) -> list[str]:
        argv = ["build", "-p", self.platform]
        for arch in self.arch.split(","):
            argv += ["-a", arch]
        argv += ["-t", self.toolchain, "-b", self.target, "-n", str(jobs)]
        defines = dict(self.defines)
        if self.debug_on_serial:
            defines["DEBUG_ON_SERIAL_PORT"] = "TRUE"
        for name, value in sorted(defines.items()):
            argv += ["-D", f"{name}={value}"]
        argv += ["--pcd", f"gEfiMdePkgTokenSpaceGuid.PcdDebugPrintErrorLevel={self.debug_level:#x}"]
        return argv

    def as_dict(self) -> dict[str, object]:
        return as_flag_dict(self)

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
    """Debian's ``edk2`` source package, pinned to a version and checksum,
    with the Debian patches that break a non-secure-boot build reversed."""

    package: DebianSourcePackage = dataclasses.field(default_factory=lambda: DebianSourcePackage(
        DEBIAN_PACKAGE, DEBIAN_VERSION, DEBIAN_RELEASE, DEBIAN_ORIG, DEBIAN_ORIG_SHA256))

    def identity(self) -> str:
        reversed_ = ",".join(sorted(DEBIAN_REVERSED_PATCHES))
        return f"{self.package.identity()}:reversed={reversed_}"

    def materialize(self, dest: Path, progress: Progress) -> None:
        self.package.materialize(dest, progress)
        for name, why in DEBIAN_REVERSED_PATCHES.items():
            patch = dest / "debian" / "patches" / name
            LOG.info("reversing Debian patch %s: %s", name, why)
            run_tool(["patch", "-R", "-p1", "-F0", "--batch", "-i", str(patch)],
                     cwd=dest, what=f"reversing Debian patch {name}")


@dataclass(frozen=True)
class DebianTarballSource:
    """A Debian edk2 fetched as tarballs (:data:`TRIXIE`), as Debian patches it."""

    package: DebianTarballs = TRIXIE

    def identity(self) -> str:
        return self.package.identity()

    def materialize(self, dest: Path, progress: Progress) -> None:
        self.package.materialize(dest, progress)
        (dest / "Conf").mkdir(exist_ok=True)    # edksetup.sh writes its tools_def.txt there


@dataclass(frozen=True)
class FixedSource:
    """A source with the baseline's own fixes applied, as Debian applies its
    patches: upstream commits the harness carries because a bug of the
    baseline would make a result wrong for a reason that is not the
    series'. ``fixes/series`` names them; they are listed apart from the
    series, which applies on top."""

    source: SourceProvider
    fixes: Path

    def identity(self) -> str:
        digest = hashlib.sha256()
        for patch in read_series(self.fixes):
            digest.update(patch.name.encode() + b"\0" + patch.data)
        return f"{self.source.identity()}:fixes={digest.hexdigest()[:16]}"

    def materialize(self, dest: Path, progress: Progress) -> None:
        self.source.materialize(dest, progress)
        for patch in read_series(self.fixes):
            progress.phase("fix", patch.name)
            apply_in_place(dest, patch)


@dataclass(frozen=True)
class Baseline:
    """An edk2 release the harness builds: Debian's source of it, and the
    series that applies to it (which adds everything the harness builds,
    the probe application included: nothing is copied into the tree)."""

    name: str
    source: SourceProvider
    series_dir: Path

    def without_fixes(self) -> Baseline:
        """This baseline as Debian ships it, without the fixes the harness
        carries (a negative control: the bug they fix shows)."""
        source = self.source.source if isinstance(self.source, FixedSource) else self.source
        return dataclasses.replace(self, source=source)


#: The edk2 releases the harness builds, by name (``--edk2``).
BASELINES: Mapping[str, Baseline] = {
    # Each series adds the probe application to the tree (OvmfPkg/EbsProbe).
    "2025.02": Baseline("2025.02", FixedSource(DebianTarballSource(),
                                               SERIES_ROOT / "edk2-2025.02" / "base"),
                        SERIES_ROOT / "edk2-2025.02"),
    "2022.11": Baseline("2022.11", DebianSource(), SERIES_ROOT / "edk2-2022.11"),
}
DEFAULT_BASELINE = "2025.02"


def baseline_named(name: str | None = None) -> Baseline:
    """``--edk2 VERSION`` / ``EBS_HARNESS_EDK2``, else :data:`DEFAULT_BASELINE`.

    :raises UsageError: an unknown version (the message lists the known ones).
    """
    name = name or os.environ.get("EBS_HARNESS_EDK2") or DEFAULT_BASELINE
    if name not in BASELINES:
        raise UsageError(f"edk2 baseline {name!r} (--edk2, EBS_HARNESS_EDK2): the series has "
                         f"none for it; known: {', '.join(BASELINES)}")
    return BASELINES[name]


def source_from_option(path: str | None, baseline: Baseline | None = None
                       ) -> SourceProvider:
    """``--edk2-src DIR`` / ``EBS_HARNESS_EDK2_SRC``, else Debian's source
    of ``baseline`` (default :data:`DEFAULT_BASELINE`)."""
    path = path or os.environ.get("EBS_HARNESS_EDK2_SRC") or None
    if path:
        return TreeSource(Path(path).expanduser().resolve())
    return (baseline or baseline_named()).source


def toolchain_versions() -> dict[str, str]:
    """The versions of the tools whose output lands in the firmware
    (remembered: :func:`remembered_versions`)."""
    return remembered_versions("edk2", ["gcc", "nasm", "iasl"], lambda: tool_versions(
        {"gcc": ["gcc", "--version"], "nasm": ["nasm", "-v"], "iasl": ["iasl", "-v"]},
        "run ./run setup as root (installs build-essential, nasm, acpica-tools)"))


# -------------------------------------------------------------- firmware


@dataclass(frozen=True)
class Firmware(PublishedDir):
    """A built firmware directory (see the module docstring for its layout)."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("OVMF_CODE.fd", "OVMF_VARS.fd", "manifest.json")
    WHAT: ClassVar[str] = "firmware directory"
    MADE_BY: ClassVar[str] = "ebs-harness build"

    @property
    def code(self) -> Path:
        return self.path / "OVMF_CODE.fd"

    @property
    def vars(self) -> Path:
        return self.path / "OVMF_VARS.fd"

    @property
    def combined(self) -> Path:
        """OVMF.fd, code and variables in one image (SEV-SNP boots it with ``-bios``)."""
        return self.path / "OVMF.fd"

    @property
    def baseline(self) -> str:
        """The edk2 baseline the series was built on (``2025.02``). A
        manifest written before it recorded one names it by its Debian
        source; failing that, the source's label (``tree:/path``)."""
        named = self.manifest.get("edk2")
        if named:
            return str(named)
        source = str(self.manifest.get("source", ""))
        return next((name for name, b in BASELINES.items() if b.source.identity() == source),
                    source_label(source))

    @property
    def debug_on_serial(self) -> bool:
        """Built with ``-D DEBUG_ON_SERIAL_PORT``: the trace is on the serial port."""
        flags = self.manifest.get("flags")
        return isinstance(flags, dict) and bool(flags.get("debug_on_serial"))

    def module_file(self, name: str, suffix: str) -> Path:
        """``modules/<name><suffix>``, e.g. ``module_file("IoMmuDxe", ".debug")``."""
        return self.path / "modules" / f"{name}{suffix}"


#: A firmware build's outcome (``.output`` is the :class:`Firmware`).
BuildResult = Built[Firmware]


# ----------------------------------------------------------------- build


class Builder(CachedBuilder[Firmware]):
    """Builds OVMF for one set of inputs under one cache root."""

    RECIPE: ClassVar[str] = "edk2-ovmf/2"     # 2: modules/symbols.json
    PUBLISHED: ClassVar[str] = "firmware"
    WORK: ClassVar[str] = "work"
    SRC: ClassVar[str] = "src"
    #: A workspace is ~700 MB, a pristine tree ~170 MB, a firmware ~110 MB.
    #: Per baseline: the test build, stock (shared with production DEBUG),
    #: production RELEASE, OvmfPkgIa32X64 and the serial-port build each
    #: have a workspace (and firmware) of their own.
    KEEP: ClassVar[Mapping[str, int]] = {"published": 13, "work": 9, "src": 3}

    def __init__(self, source: SourceProvider, *, flags: BuildFlags | None = None,
                 baseline: Baseline | None = None, series: bool = True,
                 cache: Path | None = None, jobs: int | None = None,
                 progress: Progress | None = None,
                 extra_patches: Sequence[Path] = ()) -> None:
        """Build ``source`` with ``baseline``'s series (none with
        ``series=False``: stock OVMF)."""
        self.flags: BuildFlags = flags or BuildFlags()
        self.baseline = baseline or baseline_named()
        super().__init__(source, flags=self.flags,
                         series_dir=self.baseline.series_dir if series else None,
                         overlays={},
                         toolchain=toolchain_versions(), cache=cache, jobs=jobs,
                         progress=progress, extra_patches=extra_patches)

    @property
    def firmware_dir(self) -> Path:
        return self.published_dir

    def firmware(self, rebuild: bool = False) -> BuildResult:
        """The firmware of these inputs, from the cache or built."""
        return self.build(rebuild)

    def load(self, path: Path) -> Firmware:
        return Firmware.load(path)

    def _env(self, tree: Path) -> dict[str, str]:
        env = system_python_env()
        env.update({
            "WORKSPACE": str(tree),
            "EDK_TOOLS_PATH": str(tree / "BaseTools"),
            "PYTHON_COMMAND": PYTHON_FOR_EDK2,
            "PACKAGES_PATH": str(tree),
        })
        return env

    def _compile(self, tree: Path) -> float:
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
            self._stream(["bash", "-c", script, "edk2-build", *argv], tree, env, log, "OVMF",
                         counter(r"^Building \.\.\. ", "modules"))
        seconds = time.monotonic() - start
        self.progress.phase("OVMF", f"built in {seconds:.0f} s")
        return seconds

    def _publish_into(self, tree: Path, tmp: Path) -> None:
        out = tree / self.flags.output_dir
        for name in ("OVMF_CODE.fd", "OVMF_VARS.fd", "OVMF.fd"):
            shutil.copy2(out / "FV" / name, tmp / name)
        modules = tmp / "modules"
        modules.mkdir()
        arch = out / self.flags.module_arch
        for file in sorted(arch.glob("*.efi")) + sorted(arch.glob("*.debug")):
            shutil.copy2(file, modules / file.name)
        for mapfile in sorted(arch.glob("**/DEBUG/*.map")):
            shutil.copy2(mapfile, modules / mapfile.name)
        # The analysis is imported by the build alone: a boot from the cache
        # starts QEMU without it.
        from harness.analysis import teardown_static
        from harness.analysis.symbols import write_index

        self.progress.phase("publish", "indexing the modules' symbols")
        write_index(modules)
        # Recorded, not enforced (docs/static-check.md): a finding does not fail the build.
        self._static_c3 = teardown_static.build_record(modules)
        self.progress.phase("static C3", str(self._static_c3.get("summary")))

    def _manifest_extra(self) -> dict[str, object]:
        from harness.analysis import teardown_static

        modules = self.workspace_dir / "tree" / self.flags.output_dir / self.flags.module_arch
        return {"edk2": self.baseline.name,
                "build_argv": self.flags.argv(self.jobs),
                "modules": len(list(modules.glob("*.efi"))),
                teardown_static.MANIFEST_KEY: getattr(self, "_static_c3", None)}

    def _discard_partial(self, tree: Path) -> None:
        # edk2's build has no notion of a half-written object: build afresh.
        shutil.rmtree(tree / "Build", ignore_errors=True)


def build_unpatched(progress: Progress | None = None, baseline: str | None = None
                    ) -> BuildResult:
    """A baseline as the series builds on it (:data:`BASELINES`: Debian's
    tree, and the fixes the harness carries where it has any), a DEBUG build
    without the series, the probe or the test define: stock OVMF, e.g. the
    control that it takes the SEV path the harness emulates, or the stock
    logs ``explain-log`` reads. The default
    baseline unless ``baseline`` names one; in a workspace shared with the
    production DEBUG build of the series (same flags).

    :raises UsageError: an unknown baseline (the message lists the known ones).
    """
    chosen = baseline_named(baseline)
    return Builder(chosen.source, flags=production_flags(), baseline=chosen,
                   series=False, progress=progress).firmware()


def build_production(target: str = "DEBUG", baseline: str | None = None,
                     progress: Progress | None = None, *,
                     feature_only: bool = False) -> BuildResult:
    """The series built as a platform would ship it: without the test define
    (no trace, knobs, test driver or probe), ``DEBUG`` or ``RELEASE``. DEBUG
    shares the stock build's workspace (same flags), so it is incremental.

    :param feature_only: the feature patches alone, those before the
        series' first ``[test only]`` patch: what the test apparatus must
        leave a production build as.
    """
    chosen = baseline_named(baseline)
    flags = production_flags(target=target)
    if not feature_only:
        return Builder(chosen.source, flags=flags, baseline=chosen, progress=progress).firmware()
    patches = read_series(chosen.series_dir)
    feature = patches[:next((n for n, p in enumerate(patches) if p.test_only), len(patches))]
    with tempfile.TemporaryDirectory(prefix="ebs-feature-") as scratch:
        return Builder(chosen.source, flags=flags, progress=progress,
                       baseline=_with_series(chosen, feature, Path(scratch))).firmware()


def _with_series(baseline: Baseline, patches: Sequence[Patch], directory: Path) -> Baseline:
    """``baseline`` with ``patches`` alone as its series, written to
    ``directory`` (a part of its own series: a prefix, the feature)."""
    for patch in patches:
        shutil.copy2(patch.path, directory / patch.name)
    (directory / "series").write_text("".join(f"{patch.name}\n" for patch in patches))
    return dataclasses.replace(baseline, series_dir=directory)


def production_flags(**changes: Any) -> BuildFlags:
    """The test build's flags without ``EBS_HARNESS_TEST`` and the zoo's
    SCSI drivers (OVMF's own defaults), with ``changes``."""
    defines = tuple(d for d in BuildFlags().defines
                    if d[0] != "EBS_HARNESS_TEST" and d not in ZOO_DEFINES)
    return dataclasses.replace(BuildFlags(defines=defines), **changes)


def compiles_ia32x64(baseline: str | None = None, progress: Progress | None = None
                     ) -> Compiled:
    """The series (without the test define) builds OvmfPkgIa32X64.dsc:
    PEI in IA32, DXE in X64. Nothing is published.

    :raises BuildError: it does not build.
    """
    chosen = baseline_named(baseline)
    flags = production_flags(platform="OvmfPkg/OvmfPkgIa32X64.dsc", arch="IA32,X64")
    return Builder(chosen.source, flags=flags, baseline=chosen, progress=progress).compiles()


def build_prefixes(baseline: str | Baseline | None = None, progress: Progress | None = None,
                   patches: Sequence[str] | None = None, cache: Path | None = None
                   ) -> list[tuple[str, Compiled]]:
    """Compile every prefix of ``baseline``'s series (or of the ``patches``
    named, in order), the test build's flags, incrementally in the test
    build's workspace, nothing published: ``(last patch, what was compiled)``
    per prefix, in series order. A series a maintainer can bisect builds at
    every patch. The longest prefix is compiled first: the workspace usually
    holds the whole series already, and walking back from it rebuilds less
    than walking forward from the first patch.

    :raises BuildError: the longest prefix that does not build (its log says
        what failed).
    """
    chosen = baseline if isinstance(baseline, Baseline) else baseline_named(baseline)
    every = {p.name: p for p in read_series(chosen.series_dir)}
    names = list(patches) if patches is not None else list(every)
    results: list[tuple[str, Compiled]] = []
    with tempfile.TemporaryDirectory(prefix="ebs-prefix-") as scratch:
        for count in range(len(names), 0, -1):
            prefix = Path(scratch, str(count))
            prefix.mkdir()
            if progress:
                progress.phase("prefix", f"{count}/{len(names)}: {names[count - 1]}")
            builder = Builder(chosen.source, progress=progress, cache=cache,
                              baseline=_with_series(chosen, [every[n] for n in names[:count]],
                                                    prefix))
            results.append((names[count - 1], builder.compiles()))
    return results[::-1]


def pristine_tree(baseline: str, progress: Progress | None = None) -> Path:
    """A baseline's tree as Debian ships it (fetched and made once): its
    own tools read the series, e.g. ``BaseTools/Scripts/PatchCheck.py``."""
    chosen = baseline_named(baseline)
    return Builder(chosen.source, baseline=chosen, series=False,
                   progress=progress).pristine()


#: The baseline the test variants (``tests/data/firmware-variants``) are
#: written against, unless they sit in a directory named for theirs
#: (``edk2-2025.02/``).
VARIANT_BASELINE = "2022.11"


def variant_baseline(patch: Path) -> str:
    """The baseline a test variant applies to: its directory's
    (``edk2-VERSION``), else :data:`VARIANT_BASELINE`."""
    parent = Path(patch).parent.name
    return parent.removeprefix("edk2-") if parent.startswith("edk2-") else VARIANT_BASELINE


def build_variant(patch: Path, progress: Progress | None = None) -> BuildResult:
    """The patched firmware of the variant's baseline (:func:`variant_baseline`)
    with one test variant ``patch`` on top."""
    chosen = baseline_named(variant_baseline(patch))
    return Builder(chosen.source, baseline=chosen, extra_patches=(patch,),
                   progress=progress).firmware()


def build_firmware(source: SourceProvider | None = None, *, baseline: Baseline | None = None,
                   rebuild: bool = False, progress: Progress | None = None,
                   **kwargs: object) -> BuildResult:
    """Build (or reuse from the cache) the patched OVMF of ``baseline``
    (default :func:`baseline_named`), from its Debian source or ``source``;
    ``seconds`` counts everything, the key's inputs (patches, toolchain
    versions) included."""
    start = time.monotonic()
    baseline = baseline or baseline_named()
    builder = Builder(source or baseline.source, baseline=baseline, progress=progress,
                      **kwargs)  # type: ignore[arg-type]
    result = builder.firmware(rebuild=rebuild)
    return dataclasses.replace(result, seconds=time.monotonic() - start)
