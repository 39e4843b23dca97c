"""harness.build.edk2: cache keys, the patch series, sources and the build cache.

The Builder tests run the real pipeline (copy, patch, BaseTools make, build,
publish, locks) on a tiny fake edk2 tree whose ``build`` command writes the
outputs a real OVMF build writes; the real build is tests/integration.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness.build import cache, edk2
from harness.build import series as patch_series
from harness.build.debian import DebianSourcePackage
from harness.build.progress import StderrProgress
from harness.cli import main
from harness.errors import BuildError, PatchError, SeriesError, SourceError, UsageError

FAKE_BUILD = r"""#!/bin/bash
# Fake edk2 'build': writes what OvmfPkgX64 writes, from the tree's sources.
set -e
out="$WORKSPACE/Build/OvmfX64/DEBUG_GCC5"
mkdir -p "$out/FV" "$out/X64/OvmfPkg/IoMmuDxe/IoMmuDxe/DEBUG"
echo "Building ... $WORKSPACE/OvmfPkg/IoMmuDxe/IoMmuDxe.inf [X64]"
if [ -n "$FAKE_BUILD_SLEEP" ]; then echo started > "$FAKE_BUILD_STARTED"; sleep "$FAKE_BUILD_SLEEP"; fi
if grep -q BROKEN "$WORKSPACE/OvmfPkg/IoMmuDxe/IoMmuDxe.c"; then echo "error: BROKEN" >&2; exit 1; fi
cat "$WORKSPACE/OvmfPkg/IoMmuDxe/IoMmuDxe.c" > "$out/FV/OVMF_CODE.fd"
echo vars > "$out/FV/OVMF_VARS.fd"
echo all > "$out/FV/OVMF.fd"
echo efi > "$out/X64/IoMmuDxe.efi"
echo elf > "$out/X64/IoMmuDxe.debug"
echo map > "$out/X64/OvmfPkg/IoMmuDxe/IoMmuDxe/DEBUG/IoMmuDxe.map"
echo "$@" >> "$WORKSPACE/../build-calls"
"""


@pytest.fixture
def fake_edk2(tmp_path: Path) -> Path:
    tree = tmp_path / "edk2"
    for marker in edk2.EDK2_MARKERS:
        (tree / marker).parent.mkdir(parents=True, exist_ok=True)
    (tree / "BaseTools" / "Makefile").write_text("all:\n\t@echo basetools > built\n")
    (tree / "BaseTools" / "BinWrappers").mkdir()
    build = tree / "BaseTools" / "BinWrappers" / "build"
    build.write_text(FAKE_BUILD)
    build.chmod(0o755)
    (tree / "edksetup.sh").write_text('export PATH="$WORKSPACE/BaseTools/BinWrappers:$PATH"\n')
    (tree / "MdePkg" / "MdePkg.dec").write_text("[Defines]\n")
    (tree / "OvmfPkg" / "OvmfPkgX64.dsc").write_text("[Defines]\n")
    source = tree / "OvmfPkg" / "IoMmuDxe" / "IoMmuDxe.c"
    source.parent.mkdir(parents=True)
    source.write_text("line one\nline two\nline three\n")
    (tree / "OvmfPkg" / "Other.c").write_text("untouched\n")
    return tree


def _patch(old: str, new: str, path: str = "OvmfPkg/IoMmuDxe/IoMmuDxe.c") -> str:
    return textwrap.dedent(f"""\
        From: A Developer <dev@example.org>
        Subject: [PATCH] OvmfPkg/IoMmuDxe: test change

        ---
        --- a/{path}
        +++ b/{path}
        @@ -1,3 +1,3 @@
         line one
        -{old}
        +{new}
         line three
        """)


def _series(directory: Path, *patches: tuple[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in patches:
        (directory / name).write_text(text)
    (directory / "series").write_text("".join(f"{name}\n" for name, _ in patches))
    return directory


def _builder(fake_edk2: Path, tmp_path: Path, series: Path, **kwargs: object) -> edk2.Builder:
    source = edk2.TreeSource(fake_edk2)
    return edk2.Builder(source, baseline=edk2.Baseline("test", source, series),
                        cache=tmp_path / "cache", jobs=1, **kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------- cache key


def test_key_changes_with_any_patch_byte_flag_or_source(fake_edk2: Path, tmp_path: Path) -> None:
    series = _series(tmp_path / "s1", ("0001-a.patch", _patch("line two", "line 2")))
    base = _builder(fake_edk2, tmp_path, series).inputs.key
    assert _builder(fake_edk2, tmp_path, series).inputs.key == base, "key is not stable"

    (series / "0001-a.patch").write_text(_patch("line two", "line 2!"))
    one_byte = _builder(fake_edk2, tmp_path, series).inputs.key
    assert one_byte != base

    flags = edk2.BuildFlags(debug_on_serial=True)
    assert _builder(fake_edk2, tmp_path, series, flags=flags).inputs.key != one_byte

    (fake_edk2 / "OvmfPkg" / "Other.c").write_text("changed\n")
    assert _builder(fake_edk2, tmp_path, series).inputs.key != one_byte


def test_key_changes_with_overlay_and_compiler(fake_edk2: Path) -> None:
    source = edk2.TreeSource(fake_edk2)
    flags = edk2.BuildFlags()
    tools = {"gcc": "gcc 12.2.0", "nasm": "2.16", "iasl": "20200925"}
    base = cache.build_inputs(edk2.Builder.RECIPE, source, [], {"EbsProbe/a.c": b"x"}, flags, tools).key
    assert cache.build_inputs(edk2.Builder.RECIPE, source, [], {"EbsProbe/a.c": b"y"}, flags, tools).key != base
    newer = dict(tools, gcc="gcc 13.1.0")
    assert cache.build_inputs(edk2.Builder.RECIPE, source, [], {"EbsProbe/a.c": b"x"}, flags, newer).key != base


def test_series_reads_order_and_skips_comments(tmp_path: Path) -> None:
    directory = _series(tmp_path / "s", ("0002-b.patch", "b"), ("0001-a.patch", "a"))
    (directory / "series").write_text("# comment\n0002-b.patch\n\n0001-a.patch  # why\n")
    assert [p.name for p in patch_series.read_series(directory)] == ["0002-b.patch", "0001-a.patch"]


def test_missing_series_file_is_a_patch_error(tmp_path: Path) -> None:
    with pytest.raises(SeriesError, match="series file is missing"):
        patch_series.read_series(tmp_path)


def test_series_naming_a_missing_patch_is_a_series_error(tmp_path: Path) -> None:
    directory = _series(tmp_path / "s", ("0001-a.patch", "a"))
    (directory / "series").write_text("0001-a.patch\n0002-gone.patch\n")
    with pytest.raises(SeriesError, match=r"0002-gone.patch.*series:2"):
        patch_series.read_series(directory)


# ------------------------------------------------------------- patches


def test_corrupt_patch_names_patch_file_and_hunk(fake_edk2: Path, tmp_path: Path) -> None:
    good = _patch("line two", "line 2")
    bad = _patch("line TWO that is not there", "line X")
    series = _series(tmp_path / "s", ("0001-good.patch", good), ("0002-bad.patch", bad))
    patches = patch_series.read_series(series)
    with pytest.raises(PatchError) as caught:
        patch_series.apply_series(fake_edk2, patches, {})
    error = caught.value
    assert error.patch.name == "0002-bad.patch"
    assert error.target == "OvmfPkg/IoMmuDxe/IoMmuDxe.c"
    assert error.hunk == 1
    assert "0002-bad.patch" in str(error) and "hunk #1" in str(error)


def test_garbage_patch_is_a_patch_error(fake_edk2: Path, tmp_path: Path) -> None:
    text = _patch("line two", "line 2").replace("@@ -1,3 +1,3 @@", "@@ -1,3 +1,3 @@\n?garbage")
    series = _series(tmp_path / "s", ("0001-garbage.patch", text))
    with pytest.raises(PatchError, match="0001-garbage.patch"):
        patch_series.apply_series(fake_edk2, patch_series.read_series(series), {})


def test_failed_patch_leaves_the_workspace_untouched(fake_edk2: Path, tmp_path: Path) -> None:
    good = _series(tmp_path / "good", ("0001-a.patch", _patch("line two", "line 2")))
    _builder(fake_edk2, tmp_path, good).firmware()
    builder = _builder(fake_edk2, tmp_path, good)
    workspace_file = builder.workspace_dir / "tree" / "OvmfPkg/IoMmuDxe/IoMmuDxe.c"
    before = workspace_file.read_bytes()
    bad = _series(tmp_path / "bad", ("0001-a.patch", _patch("line two", "line 2")),
                  ("0002-b.patch", _patch("no such line", "x")))
    with pytest.raises(PatchError):
        _builder(fake_edk2, tmp_path, bad).firmware()
    assert workspace_file.read_bytes() == before


def test_workspace_writes_only_changed_files(fake_edk2: Path, tmp_path: Path) -> None:
    other_patch = _patch("untouched", "touched", "OvmfPkg/Other.c").replace(
        "@@ -1,3 +1,3 @@\n line one\n-untouched\n+touched\n line three\n",
        "@@ -1 +1 @@\n-untouched\n+touched\n")
    series = _series(tmp_path / "s", ("0001-a.patch", _patch("line two", "line 2")),
                     ("0002-b.patch", other_patch))
    _builder(fake_edk2, tmp_path, series).firmware()
    tree = _builder(fake_edk2, tmp_path, series).workspace_dir / "tree"
    other = tree / "OvmfPkg" / "Other.c"
    assert other.read_text() == "touched\n"
    mtime = other.stat().st_mtime_ns
    # Edit patch 1 only: Other.c keeps its bytes and its mtime.
    (series / "0001-a.patch").write_text(_patch("line two", "line II"))
    result = _builder(fake_edk2, tmp_path, series).firmware()
    assert not result.cache_hit
    assert other.stat().st_mtime_ns == mtime
    assert (tree / "OvmfPkg/IoMmuDxe/IoMmuDxe.c").read_text() == "line one\nline II\nline three\n"
    # Drop patch 2: Other.c goes back to pristine.
    (series / "series").write_text("0001-a.patch\n")
    _builder(fake_edk2, tmp_path, series).firmware()
    assert other.read_text() == "untouched\n"


# ------------------------------------------------------------- sources


def test_wrong_tarball_checksum_is_refused(tmp_path: Path) -> None:
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / edk2.DEBIAN_ORIG).write_bytes(b"not the edk2 tarball")
    (downloads / f"edk2_{edk2.DEBIAN_VERSION}.dsc").write_text("Format: 3.0 (quilt)\n")
    source = DebianSourcePackage(edk2.DEBIAN_PACKAGE, edk2.DEBIAN_VERSION, edk2.DEBIAN_RELEASE,
                                 edk2.DEBIAN_ORIG, edk2.DEBIAN_ORIG_SHA256, downloads=downloads)
    with pytest.raises(SourceError, match="sha256 .* is not the expected 64257dd8"):
        source.extract(tmp_path / "tree", StderrProgress())
    assert not (tmp_path / "tree").exists()


def test_not_an_edk2_tree_is_refused(tmp_path: Path) -> None:
    (tmp_path / "edksetup.sh").write_text("")
    with pytest.raises(SourceError, match="MdePkg/MdePkg.dec is missing"):
        edk2.TreeSource(tmp_path)


def test_cli_bad_edk2_src_exits_2_with_one_line(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["-q", "build", "--edk2-src", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and "is not an edk2 tree" in err


@pytest.mark.parametrize("argv", [["build", "--edk2", "2099.01"],
                                  ["boot", "--edk2", "2099.01", "--accel", "tcg"],
                                  ["demo", "--edk2", "2099.01"]])
def test_cli_unknown_edk2_exits_2_listing_the_known_ones(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["-q", *argv])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and "'2099.01'" in err and err.endswith(
        "known: 2025.02, 2022.11\n"), err


def test_the_edk2_variable_chooses_the_baseline(monkeypatch: pytest.MonkeyPatch) -> None:
    assert edk2.baseline_named().name == edk2.DEFAULT_BASELINE == "2025.02"
    monkeypatch.setenv("EBS_HARNESS_EDK2", "2022.11")
    assert edk2.baseline_named().name == "2022.11"
    assert edk2.baseline_named("2025.02").name == "2025.02", "the option wins"
    monkeypatch.setenv("EBS_HARNESS_EDK2", "1.0")
    with pytest.raises(UsageError, match="'1.0'"):
        edk2.baseline_named()


def test_tree_source_is_copied_never_modified(fake_edk2: Path, tmp_path: Path) -> None:
    series = _series(tmp_path / "s", ("0001-a.patch", _patch("line two", "line 2")))
    before = edk2.TreeSource(fake_edk2).identity()
    _builder(fake_edk2, tmp_path, series).firmware()
    assert edk2.TreeSource(fake_edk2).identity() == before
    assert not (fake_edk2 / "Build").exists()
    assert (_builder(fake_edk2, tmp_path, series).workspace_dir / "tree" / "Conf").is_dir()
    assert "line two" in (fake_edk2 / "OvmfPkg/IoMmuDxe/IoMmuDxe.c").read_text()


# --------------------------------------------------------------- cache


def test_build_publishes_outputs_and_manifest_then_hits(fake_edk2: Path, tmp_path: Path) -> None:
    series = _series(tmp_path / "s", ("0001-a.patch", _patch("line two", "line 2")))
    first = _builder(fake_edk2, tmp_path, series).firmware()
    assert not first.cache_hit
    firmware = first.output
    assert firmware.code.read_text() == "line one\nline 2\nline three\n"
    for suffix in (".efi", ".debug", ".map"):
        assert firmware.module_file("IoMmuDxe", suffix).is_file()
    manifest = firmware.manifest
    assert manifest["key"] == firmware.key
    assert manifest["patches"] == [["0001-a.patch", cache.sha256_bytes(
        (series / "0001-a.patch").read_bytes())]]
    assert "gcc" in manifest["toolchain"]  # type: ignore[operator]
    assert manifest["edk2"] == firmware.baseline == "test"
    assert (firmware.path / "build.log").read_text().count("Building ...") == 1
    second = _builder(fake_edk2, tmp_path, series).firmware()
    assert second.cache_hit and second.output == firmware


def test_rebuild_builds_again(fake_edk2: Path, tmp_path: Path) -> None:
    series = _series(tmp_path / "s")
    _builder(fake_edk2, tmp_path, series).firmware()
    assert not _builder(fake_edk2, tmp_path, series).firmware(rebuild=True).cache_hit
    calls = (tmp_path / "cache" / "work").glob("*/build-calls")
    assert sum(len(f.read_text().splitlines()) for f in calls) == 2


def test_compile_error_is_a_build_error_with_log(fake_edk2: Path, tmp_path: Path) -> None:
    series = _series(tmp_path / "s", ("0001-a.patch", _patch("line two", "BROKEN")))
    with pytest.raises(BuildError) as caught:
        _builder(fake_edk2, tmp_path, series).firmware()
    assert caught.value.step == "OVMF"
    assert "error: BROKEN" in caught.value.tail
    assert caught.value.log.is_file()
    assert not list((tmp_path / "cache" / "firmware").glob("[!.]*"))


def _build_in_child(fake_edk2: Path, tmp_path: Path, series: Path, env: dict[str, str]) -> \
        subprocess.Popen[bytes]:
    code = textwrap.dedent(f"""
        from pathlib import Path
        from harness.build import edk2
        source = edk2.TreeSource(Path({str(fake_edk2)!r}))
        edk2.Builder(source, baseline=edk2.Baseline("test", source, Path({str(series)!r})),
                     cache=Path({str(tmp_path / 'cache')!r}), jobs=1).firmware()
        """)
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env})


def _wait_for(path: Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` runs (zombies do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def test_killed_build_is_not_reused(fake_edk2: Path, tmp_path: Path) -> None:
    series = _series(tmp_path / "s", ("0001-a.patch", _patch("line two", "line 2")))
    started = tmp_path / "started"
    child = _build_in_child(fake_edk2, tmp_path, series,
                            {"FAKE_BUILD_SLEEP": "60", "FAKE_BUILD_STARTED": str(started)})
    _wait_for(started)
    child.send_signal(signal.SIGKILL)
    child.wait()
    builder = _builder(fake_edk2, tmp_path, series)
    assert not builder.firmware_dir.exists()
    state = json.loads((builder.workspace_dir / "state.json").read_text())
    assert state["dirty"] and state["pgid"]
    result = builder.firmware()
    assert not result.cache_hit
    assert result.output.code.read_text() == "line one\nline 2\nline three\n"
    deadline = time.monotonic() + 5           # the orphaned build was stopped
    while _group_alive(state["pgid"]):
        assert time.monotonic() < deadline, "the killed build's processes still run"
        time.sleep(0.05)


def test_concurrent_builders_build_once(fake_edk2: Path, tmp_path: Path) -> None:
    series = _series(tmp_path / "s", ("0001-a.patch", _patch("line two", "line 2")))
    started = tmp_path / "started"
    env = {"FAKE_BUILD_SLEEP": "2", "FAKE_BUILD_STARTED": str(started)}
    first = _build_in_child(fake_edk2, tmp_path, series, env)
    _wait_for(started)
    second = _build_in_child(fake_edk2, tmp_path, series, env)
    assert first.wait(60) == 0 and second.wait(60) == 0
    calls = list((tmp_path / "cache" / "work").glob("*/build-calls"))
    assert len(calls) == 1 and len(calls[0].read_text().splitlines()) == 1


def test_firmware_load_refuses_a_non_firmware_dir(tmp_path: Path) -> None:
    (tmp_path / "OVMF_CODE.fd").write_bytes(b"")
    with pytest.raises(UsageError, match="OVMF_VARS.fd, manifest.json missing"):
        edk2.Firmware.load(tmp_path)


def test_build_flags_argv_has_debug_level_and_serial_option() -> None:
    argv = edk2.BuildFlags(debug_on_serial=True).argv(jobs=2)
    assert argv[:4] == ["build", "-p", "OvmfPkg/OvmfPkgX64.dsc", "-a"]
    assert "-n" in argv and argv[argv.index("-n") + 1] == "2"
    assert "DEBUG_ON_SERIAL_PORT=TRUE" in argv
    assert "gEfiMdePkgTokenSpaceGuid.PcdDebugPrintErrorLevel=0x8000004f" in argv


def test_prune_keeps_the_most_recently_used(tmp_path: Path) -> None:
    """Firmware here; workspaces and pristine trees go the same way."""
    root = tmp_path / "firmware"
    for age, key in enumerate(["new", "mid", "old", "oldest", "recent"]):
        (root / key).mkdir(parents=True)
        when = time.time() - (100 * age if key != "recent" else 10)
        os.utime(root / key, (when, when))
    (root / ".tmp-partial-1").mkdir()
    removed = cache.prune(tmp_path, "firmware", keep=1, spare="oldest", min_age=50)
    # "recent" is within min_age (it may be booting elsewhere); "oldest" is spared.
    assert sorted(removed) == ["mid", "old"]
    assert sorted(p.name for p in root.iterdir()) == [".tmp-partial-1", "new", "oldest", "recent"]


def test_a_saved_group_id_of_someone_else_is_not_killed(tmp_path: Path) -> None:
    """The pgid in state.json may be reused by an unrelated process group:
    only processes working inside the workspace are stopped."""
    workspace = tmp_path / "work"
    (workspace / "tree").mkdir(parents=True)
    outsider = subprocess.Popen(["sleep", "30"], cwd=tmp_path, start_new_session=True)
    insider = subprocess.Popen(["sleep", "30"], cwd=workspace / "tree", start_new_session=True)
    try:
        cache.stop_build(outsider.pid, workspace)
        assert outsider.poll() is None
        cache.stop_build(insider.pid, workspace)
        assert insider.wait(5) == -signal.SIGKILL
    finally:
        for proc in (outsider, insider):
            proc.kill()
            proc.wait()


def test_remembered_answers_once_then_again_when_stale_or_unreadable(tmp_path: Path) -> None:
    calls: list[int] = []

    def compute() -> dict[str, str]:
        calls.append(1)
        return {"gcc": f"gcc {len(calls)}"}

    path = tmp_path / "versions" / "x.json"
    get = lambda: cache.remembered(path, 60.0, compute, dict, dict)
    assert get() == get() == {"gcc": "gcc 1"} and len(calls) == 1
    old = time.time() - 120
    os.utime(path, (old, old))
    assert get() == {"gcc": "gcc 2"}                 # stale: asked again
    path.write_text("{not json")
    assert get() == {"gcc": "gcc 3"}                 # unreadable: asked again
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert cache.remembered(blocked / "x.json", 60.0, compute, dict, dict) == {"gcc": "gcc 4"}
    # lifetime 0 (host-check): asked afresh, and what the next reader gets
    assert cache.remembered(path, 0.0, compute, dict, dict) == {"gcc": "gcc 5"}
    assert get() == {"gcc": "gcc 5"} and len(calls) == 5


def test_remembered_versions_key_moves_with_the_tools(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EBS_HARNESS_CACHE", str(tmp_path / "cache"))
    tool = tmp_path / "bin" / "gcc"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\necho 'gcc (Debian 12.2.0-14) 12.2.0'\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}:{os.environ['PATH']}")
    asked: list[str] = []

    def versions() -> dict[str, str]:
        asked.append("x")
        return cache.tool_versions({"gcc": ["gcc", "--version"]}, "install gcc")

    first = cache.remembered_versions("t", ["gcc"], versions)
    assert first == {"gcc": "gcc (Debian 12.2.0-14) 12.2.0"}
    assert cache.remembered_versions("t", ["gcc"], versions) == first and len(asked) == 1
    tool.write_text("#!/bin/sh\necho 'gcc (Debian 14.2.0-19) 14.2.0.1'\n")   # upgraded
    assert cache.remembered_versions("t", ["gcc"], versions)["gcc"].endswith("14.2.0.1")


# ------------------------------------------------------- series prefixes


def test_every_prefix_is_compiled_once_and_the_first_broken_one_named(
        fake_edk2: Path, tmp_path: Path) -> None:
    series = _series(tmp_path / "s", ("0001-a.patch", _patch("line two", "line 2")),
                     ("0002-b.patch", _patch("line 2", "BROKEN")),
                     ("0003-c.patch", _patch("BROKEN", "line two")))
    baseline = edk2.Baseline("test", edk2.TreeSource(fake_edk2), series)
    cache_root = tmp_path / "cache"
    built = edk2.build_prefixes(baseline, patches=["0001-a.patch"], cache=cache_root)
    assert [(name, c.remembered) for name, c in built] == [("0001-a.patch", False)]
    again = edk2.build_prefixes(baseline, patches=["0001-a.patch"], cache=cache_root)
    assert again[0][1].remembered and again[0][1].key == built[0][1].key
    with pytest.raises(BuildError, match="error: BROKEN"):
        edk2.build_prefixes(baseline, cache=cache_root)
    assert not list((cache_root / "firmware").glob("[!.]*")), "a prefix is never published"


def test_a_build_step_past_its_deadline_is_stopped(fake_edk2: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """edk2's build can hang after an AutoGen error: the step is stopped."""
    monkeypatch.setenv("FAKE_BUILD_SLEEP", "60")
    monkeypatch.setenv("FAKE_BUILD_STARTED", str(tmp_path / "started"))
    monkeypatch.setenv("EBS_HARNESS_BUILD_TIMEOUT", "1.5")
    series = _series(tmp_path / "s", ("0001-a.patch", _patch("line two", "line 2")))
    start = time.monotonic()
    with pytest.raises(BuildError, match="no end after 1.5 s: stopped"):
        _builder(fake_edk2, tmp_path, series).firmware()
    assert time.monotonic() - start < 30
    assert "ebs-harness: stopped after 1.5 s" in (tmp_path / "cache" / "work").rglob(
        "build.log").__next__().read_text()


def test_a_manifest_without_a_baseline_is_named_by_its_debian_source(tmp_path: Path) -> None:
    """Firmware published before manifests named the baseline."""
    for name in ("OVMF_CODE.fd", "OVMF_VARS.fd"):
        (tmp_path / name).write_bytes(b"")
    manifest = {"key": tmp_path.name, "source": edk2.BASELINES["2025.02"].source.identity()}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert edk2.Firmware.load(tmp_path).baseline == "2025.02"
    manifest["source"] = "tree:/src/edk2"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert edk2.Firmware.load(tmp_path).baseline == "tree:/src/edk2"


def test_a_variant_applies_to_the_baseline_its_directory_names() -> None:
    variants = Path(__file__).resolve().parents[1] / "data" / "firmware-variants"
    assert edk2.variant_baseline(variants / "teardown-reads-a-dynamic-pcd.patch") == \
        edk2.VARIANT_BASELINE
    assert edk2.variant_baseline(variants / "edk2-2025.02" / "mmconfig-keeps-its-cbit.patch") \
        == "2025.02"
    for patch in (variants / "edk2-2025.02").glob("*.patch"):
        assert edk2.variant_baseline(patch) in edk2.BASELINES


# ------------------------------------------------------------ baseline fixes


def test_a_baselines_fixes_are_applied_under_the_series(fake_edk2: Path, tmp_path: Path) -> None:
    """The fixes the harness carries for a baseline make its pristine tree
    (the series applies on top of them, and the key changes with them);
    without_fixes() is the tree as Debian ships it (the control)."""
    fixes = _series(tmp_path / "base", ("0001-fix.patch", _patch("line two", "line 2")))
    series = _series(tmp_path / "s", ("0001-a.patch", _patch("line 2", "line II")))
    fixed = edk2.FixedSource(edk2.TreeSource(fake_edk2), fixes)
    baseline = edk2.Baseline("test", fixed, series)
    before = fixed.identity()
    assert before.startswith(edk2.TreeSource(fake_edk2).identity() + ":fixes=")
    builder = edk2.Builder(fixed, baseline=baseline, cache=tmp_path / "cache", jobs=1)
    firmware = builder.firmware().output
    tree = builder.workspace_dir / "tree"
    assert (tree / "OvmfPkg/IoMmuDxe/IoMmuDxe.c").read_text().splitlines()[1] == "line II"
    assert "line two" in (fake_edk2 / "OvmfPkg/IoMmuDxe/IoMmuDxe.c").read_text()
    unfixed = baseline.without_fixes()
    assert unfixed.source == edk2.TreeSource(fake_edk2)
    with pytest.raises(PatchError, match="0001-a.patch"):    # the series needs the fix
        edk2.Builder(unfixed.source, baseline=unfixed, cache=tmp_path / "cache",
                     jobs=1).firmware()
    (fixes / "0001-fix.patch").write_text(_patch("line two", "line 2") + "\n")
    assert fixed.identity() != before, "the key follows the fixes"
    assert firmware.path.is_dir()


def test_a_fix_that_does_not_apply_names_itself_and_its_hunk(fake_edk2: Path,
                                                             tmp_path: Path) -> None:
    fixes = _series(tmp_path / "base", ("0001-stale.patch", _patch("no such line", "x")))
    fixed = edk2.FixedSource(edk2.TreeSource(fake_edk2), fixes)
    with pytest.raises(PatchError, match=r"0001-stale\.patch") as caught:
        fixed.materialize(tmp_path / "tree", StderrProgress())
    assert caught.value.target == "OvmfPkg/IoMmuDxe/IoMmuDxe.c" and caught.value.hunk == 1


@pytest.mark.parametrize(("header", "subject", "test_only"), [
    ((b"Subject: [PATCH 07/12] OvmfPkg: add the EBS_HARNESS_TEST build define [test\n"
      b" only]\n"), "OvmfPkg: add the EBS_HARNESS_TEST build define [test only]", True),
    (b"Subject: [PATCH 2/9] MdeModulePkg: the feature\n", "MdeModulePkg: the feature", False),
    # git format-patch encodes a subject that is not ASCII
    (b"Subject: [PATCH 08/12] =?UTF-8?q?OvmfPkg:=20caf=C3=A9=20=E2=86=92=20[test=20only]?=\n",
     "OvmfPkg: caf\u00e9 \u2192 [test only]", True),
])
def test_a_patch_subject_unfolded_and_decoded(tmp_path: Path, header: bytes, subject: str,
                                              test_only: bool) -> None:
    data = b"From 0 Mon Sep 17 00:00:00 2001\nFrom: A <a@b.example>\n" + header + \
        b"\n    an indented first line of the body\n"
    patch = patch_series.Patch(tmp_path / "0001-x.patch", data)
    assert (patch.subject, patch.test_only) == (subject, test_only)


def test_a_patch_without_a_subject_is_refused_naming_it(tmp_path: Path) -> None:
    patch = patch_series.Patch(tmp_path / "0001-x.patch", b"diff --git a/x b/x\n")
    with pytest.raises(SeriesError, match="0001-x.patch.*no Subject header"):
        _ = patch.subject
