"""Each baseline's series as a maintainer receives it: ``git am`` applies it,
patch by patch, to the files of the pristine tree, the cover letter counts
its patches and puts the feature before the test apparatus, and the probe
application it adds is ``guests/ebs-probe``.

The builds run for the session's baseline (``--ebs-edk2``, default
2025.02; the nightly passes the other): every prefix of the series builds,
the whole series builds OvmfPkgIa32X64, and an image built without
``-D EBS_HARNESS_TEST`` (DEBUG and RELEASE) holds the feature and nothing
of the test apparatus: a RELEASE image is byte for byte the build of the
feature patches alone, a DEBUG one differs only in the line numbers
``ASSERT()`` passes (``imagediff``). (The last prefix, the whole series, is
the firmware the rest of the suite boots.)
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from imagediff import SAME_CODE, difference

from harness import shared
from harness.build import edk2, series
from harness.build.progress import StderrProgress
from harness.pytestplugin import session_baseline

pytestmark = pytest.mark.build

BASELINES = list(edk2.BASELINES)

#: What only the test apparatus puts into DxeCore and IoMmuDxe.
TEST_STRINGS = {"DxeCore": (b"EBST ",), "IoMmuDxe": (b"EBST ", b"org.ebs-harness")}
TEST_SYMBOLS = {
    "DxeCore": ("gExitBootServicesInProgress", "CoreTraceMemoryService",
                "CoreBootServiceRaiseTpl"),
    "IoMmuDxe": ("mIoMmuEbsScheme", "IoMmuFwCfgReadString", "mIoMmuEmulation", "mMapCount"),
}
TEST_MODULES = ("EbsAdversaryDxe", "EbsProbe")
#: What the feature (the patches before the first [test only]) puts there.
FEATURE_SYMBOLS = {
    "DxeCore": ("CoreRegisterIoMmuTeardown", "CoreUnregisterIoMmuTeardown", "mIoMmuTeardowns"),
    "IoMmuDxe": ("IoMmuExitBootServicesTeardown", "mCcGuestAttr"),
}


def patches(baseline: str) -> list[series.Patch]:
    return series.read_series(edk2.BASELINES[baseline].series_dir)


def subject(patch: series.Patch) -> str:
    """The patch's subject, unfolded, without ``[PATCH n/m]``."""
    assert patch.subject, patch.name
    return patch.subject


def git(repo: Path, *argv: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=ebs-harness test",
                           "-c", "user.email=test@ebs-harness.invalid", *argv],
                          capture_output=True, text=True, check=True, timeout=120).stdout


@pytest.fixture(scope="module", params=BASELINES)
def applied(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A baseline, and a scratch git repository of the pristine files its
    series touches, with the series applied by ``git am``."""
    baseline: str = request.param
    pristine = edk2.pristine_tree(baseline, StderrProgress())
    repo = tmp_path_factory.mktemp(f"am-{baseline}")
    git(repo, "init", "-q")
    for name in sorted({f for patch in patches(baseline) for f in patch.files()}):
        if (pristine / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(pristine / name, repo / name)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", f"pristine edk2 {baseline} files")
    git(repo, "am", "-q", "--keep-cr", *[str(p.path) for p in patches(baseline)])
    return baseline, repo


def test_git_am_applies_every_patch_as_a_commit(applied: tuple[str, Path]) -> None:
    baseline, repo = applied
    wanted = patches(baseline)
    subjects = git(repo, "log", "--reverse", "--format=%s", f"HEAD~{len(wanted)}..HEAD")
    assert subjects.splitlines() == [subject(p) for p in wanted]
    assert git(repo, "status", "--porcelain") == ""


def test_a_patch_that_no_longer_applies_fails_git_am(applied: tuple[str, Path]) -> None:
    """The control of the git am test: the first patch again, on top."""
    baseline, repo = applied
    proc = subprocess.run(["git", "-C", str(repo), "am", "--keep-cr",
                           str(patches(baseline)[0].path)],
                          capture_output=True, text=True, check=False, timeout=60)
    subprocess.run(["git", "-C", str(repo), "am", "--abort"], check=False, timeout=60)
    assert proc.returncode != 0


def test_the_probe_the_series_adds_is_guests_ebs_probe(applied: tuple[str, Path]) -> None:
    """Byte for byte, CRLF included: edit ``guests/ebs-probe`` and
    regenerate the patch, or this fails."""
    _, repo = applied
    for name in ("EbsProbe.c", "EbsProbe.inf"):
        assert (repo / "OvmfPkg" / "EbsProbe" / name).read_bytes() == \
            (shared("guests", "ebs-probe") / name).read_bytes(), name


#: What only IoMmuDxeTest.inf lists, by section: what the test code uses.
TEST_INF_EXTRA = {"[LibraryClasses]": ["IoLib"], "[Sources.X64]": ["EmulatedPageState.c"]}


def inf_sections(text: str) -> dict[str, list[str]]:
    """An INF's entries by section, comments and blank lines left out."""
    sections: dict[str, list[str]] = {}
    current = ""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("["):
            current = line
            sections.setdefault(current, [])
        elif line:
            sections.setdefault(current, []).append(line)
    return sections


def beyond(test_inf: str, inf: str) -> dict[str, list[str]]:
    """What ``test_inf`` lists that ``inf`` does not, by section; or, under
    ``"missing"``, what ``inf`` lists that ``test_inf`` lacks."""
    ours, theirs = inf_sections(test_inf), inf_sections(inf)
    extra = {name: [e for e in entries if e not in theirs.get(name, [])]
             for name, entries in ours.items()}
    missing = [f"{name} {e}" for name, entries in theirs.items() for e in entries
               if e not in ours.get(name, [])]
    found = {name: entries for name, entries in extra.items() if entries}
    return {**found, "missing": missing} if missing else found


def test_the_test_inf_is_iommudxe_inf_and_the_test_code_s_needs(
        applied: tuple[str, Path]) -> None:
    """IoMmuDxeTest.inf, which test builds build instead of IoMmuDxe.inf,
    keeps in step with it: a feature patch reworked to change IoMmuDxe.inf
    (a library, a PCD, a protocol) fails here rather than leaving the test
    build a differently made module."""
    _, repo = applied
    directory = repo / "OvmfPkg" / "IoMmuDxe"
    assert beyond((directory / "IoMmuDxeTest.inf").read_text(),
                  (directory / "IoMmuDxe.inf").read_text()) == TEST_INF_EXTRA


def test_a_drift_between_the_two_infs_is_seen(applied: tuple[str, Path]) -> None:
    """The control: IoMmuDxe.inf with one more PCD than its test copy."""
    _, repo = applied
    directory = repo / "OvmfPkg" / "IoMmuDxe"
    drifted = (directory / "IoMmuDxe.inf").read_text().replace(
        "[Pcd]\n", "[Pcd]\n  gEfiMdePkgTokenSpaceGuid.PcdPciExpressBaseAddress\n")
    assert beyond((directory / "IoMmuDxeTest.inf").read_text(), drifted) == {
        **TEST_INF_EXTRA, "missing": ["[Pcd] gEfiMdePkgTokenSpaceGuid.PcdPciExpressBaseAddress"]}


@pytest.mark.parametrize("baseline", BASELINES)
def test_cover_letter_counts_the_series_and_puts_the_feature_first(baseline: str) -> None:
    wanted = patches(baseline)
    text = (edk2.BASELINES[baseline].series_dir / "0000-cover-letter.patch").read_text()
    assert f"Subject: [PATCH 00/{len(wanted)}] " in text
    assert "*** SUBJECT HERE ***" not in text and "*** BLURB HERE ***" not in text
    test_only = [subject(p).endswith("[test only]") for p in wanted]
    assert test_only == sorted(test_only) and 0 < sum(test_only) < len(wanted), \
        "the test apparatus comes last, after the feature"


@pytest.fixture(scope="module")
def baseline(pytestconfig: pytest.Config) -> str:
    """The session's baseline, whose series the builds below check."""
    return session_baseline(pytestconfig).name


def test_every_prefix_of_the_series_builds(baseline: str) -> None:
    """Incrementally, in the test build's workspace (remembered by key).
    The control, a prefix that does not build, is in ``tests/unit/test_edk2.py``
    on a fake tree: a real one costs two full rebuilds, and edk2's build
    can hang on an AutoGen error (the harness stops it at its deadline)."""
    built = edk2.build_prefixes(baseline, StderrProgress())
    assert [name for name, _ in built] == [p.name for p in patches(baseline)]
    for name, compiled in built:
        assert any(line.startswith("Build total time") for line in compiled.log_tail), name


def test_the_series_builds_ovmfpkgia32x64(baseline: str) -> None:
    """PEI in IA32, DXE in X64, without the test define (the apparatus is
    for OvmfPkgX64 only, and the emulation backend for X64 only)."""
    compiled = edk2.compiles_ia32x64(baseline, StderrProgress())
    flags = compiled.inputs["flags"]
    assert isinstance(flags, dict) and flags["platform"] == "OvmfPkg/OvmfPkgIa32X64.dsc"
    assert any(line.startswith("Build total time") for line in compiled.log_tail), \
        compiled.log_tail


def symbols(firmware: edk2.Firmware, module: str) -> set[str]:
    with open(firmware.module_file(module, ".debug"), "rb") as handle:
        table = ELFFile(handle).get_section_by_name(".symtab")
        # LTO renames file-local symbols (name.lto_priv.0): compare the stem
        return {symbol.name.split(".")[0] for symbol in table.iter_symbols()}


def apparatus_in(firmware: edk2.Firmware) -> list[str]:
    found = [f"module {m}" for m in TEST_MODULES if firmware.module_file(m, ".efi").exists()]
    for module, names in TEST_SYMBOLS.items():
        image = firmware.module_file(module, ".efi").read_bytes()
        found += [f"{module}.efi string {s!r}" for s in TEST_STRINGS[module] if s in image]
        found += [f"{module} symbol {n}" for n in sorted(set(names) & symbols(firmware, module))]
    return found


@pytest.mark.parametrize("target", ["DEBUG", "RELEASE"])
def test_a_production_build_has_the_feature_and_no_apparatus(baseline: str,
                                                             target: str) -> None:
    firmware = edk2.build_production(target, baseline, StderrProgress()).output
    assert apparatus_in(firmware) == []
    for module, names in FEATURE_SYMBOLS.items():
        assert set(names) <= symbols(firmware, module), module


#: The modules whose sources the apparatus adds lines to (under
#: ``#ifdef EBS_HARNESS_TEST``): in a DEBUG build, the line numbers of the
#: ASSERT()s below them move.
LINES_MOVED = {"DxeCore", "IoMmuDxe"}


@pytest.mark.parametrize("target", ["DEBUG", "RELEASE"])
def test_without_the_define_the_series_builds_what_its_feature_patches_build(
        baseline: str, target: str) -> None:
    """The apparatus changes nothing a production build ships: the modules
    and the flash image of the whole series are those of the feature
    patches alone; in DEBUG, only the line numbers ASSERT() passes differ,
    and only in the modules whose sources the apparatus adds lines to."""
    whole = edk2.build_production(target, baseline, StderrProgress()).output
    feature = edk2.build_production(target, baseline, StderrProgress(),
                                    feature_only=True).output
    assert feature.key != whole.key
    names = sorted(p.stem for p in whole.path.joinpath("modules").glob("*.efi"))
    assert names == sorted(p.stem for p in feature.path.joinpath("modules").glob("*.efi"))
    assert "IoMmuDxe" in names and "EbsProbe" not in names
    differ = {name: difference(feature.module_file(name, ".debug"),
                               whole.module_file(name, ".debug"))
              for name in names
              if feature.module_file(name, ".efi").read_bytes()
              != whole.module_file(name, ".efi").read_bytes()}
    # the same code; padding that two links of any module may fill apart
    assert set(differ.values()) <= SAME_CODE, differ
    lines_moved = {name for name, how in differ.items() if "line numbers" in how}
    if target == "RELEASE":
        assert lines_moved == set(), differ
        if not differ:
            assert feature.code.read_bytes() == whole.code.read_bytes()
    else:
        assert lines_moved <= LINES_MOVED, differ


def test_the_test_build_has_the_apparatus(
        baseline: str, ebs_baseline_firmware: Callable[[str], edk2.Firmware]) -> None:
    """The control: the same checks find every piece in the test build."""
    found = apparatus_in(ebs_baseline_firmware(baseline))
    expected = (len(TEST_MODULES) + sum(len(s) for s in TEST_STRINGS.values())
                + sum(len(n) for n in TEST_SYMBOLS.values()))
    assert len(found) == expected, found
