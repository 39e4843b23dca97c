"""harness.build.qemu on a tiny fake QEMU source tree.

The recipe runs for real (copy, patch, ``../configure`` in the build
directory, ninja, publish, cache) on a tree whose ``configure`` writes a
``build.ninja`` that compiles one C file into ``qemu-system-x86_64``: the
real 2.5-minute build is the session's (tests/integration). What a user
would meet is checked here: a cache hit, a patch that does not apply
(naming patch, file and hunk, nothing published), a compile error (naming
build.log, nothing published), and the CLI's one line for each.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from harness.build import qemu
from harness.build.progress import Progress, QuietProgress
from harness.cli import main
from harness.errors import BuildError, PatchError, SourceError

FAKE_CONFIGURE = r"""#!/bin/bash
# Fake QEMU configure: run in the build directory, write build.ninja.
set -e
echo "configure $*" > configure-args
cat > build.ninja <<'EOF'
rule cc
  command = cc -o $out $in
rule cat
  command = cat $in > $out
build qemu-system-x86_64: cc ../main.c
build trace/trace-events-all: cat ../main.c
EOF
"""

MAIN_C = "#include <stdio.h>\nint main(void)\n{\n    return puts(\"fake qemu\") < 0;\n}\n"


class FakeSource:
    """A source provider that makes the fake tree (as DebianSourcePackage
    would extract Debian's)."""

    def identity(self) -> str:
        return "fake-qemu:1"

    def materialize(self, dest: Path, progress: Progress) -> None:
        dest.mkdir(parents=True)
        (dest / "configure").write_text(FAKE_CONFIGURE)
        (dest / "configure").chmod(0o755)
        (dest / "main.c").write_text(MAIN_C)


def _series(directory: Path, body: str | None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    if body is not None:
        (directory / "0001-change.patch").write_text(body)
        names.append("0001-change.patch")
    (directory / "series").write_text("".join(f"{n}\n" for n in names))
    return directory


def _patch(old: str, new: str) -> str:
    return textwrap.dedent(f"""\
        From: A Developer <dev@example.org>
        Subject: [PATCH] fake: a change

        ---
        --- a/main.c
        +++ b/main.c
        @@ -3,3 +3,3 @@
         {{
        -{old}
        +{new}
         }}
        """)


def _builder(tmp_path: Path, series: Path) -> qemu.QemuBuilder:
    return qemu.QemuBuilder(FakeSource(), series_dir=series, cache=tmp_path / "cache", jobs=1,
                            progress=QuietProgress())


def test_builds_publishes_then_hits(tmp_path: Path) -> None:
    series = _series(tmp_path / "s", _patch('    return puts("fake qemu") < 0;',
                                            '    return puts("patched") < 0;'))
    first = _builder(tmp_path, series).qemu()
    assert not first.cache_hit and first.output.binary.is_file()
    assert (first.output.path / "share" / "trace-events-all").is_file()
    assert first.output.manifest["configure_argv"][0] == "../configure"  # type: ignore[index]
    tree = _builder(tmp_path, series).workspace_dir / "tree"
    assert "--target-list=x86_64-softmmu" in (tree / qemu.BUILD_DIR / "configure-args").read_text()
    assert 'puts("patched")' in (tree / "main.c").read_text()
    second = _builder(tmp_path, series).qemu()
    assert second.cache_hit and second.output == first.output
    assert qemu.QemuBuild.load(first.output.path).key == first.output.key


def test_a_patch_that_does_not_apply_names_patch_and_hunk(tmp_path: Path) -> None:
    series = _series(tmp_path / "s", _patch("    no such line;", "    other;"))
    with pytest.raises(PatchError, match=r"0001-change.patch does not apply to fake-qemu:1: "
                                         r"main.c hunk #1"):
        _builder(tmp_path, series).qemu()
    published = tmp_path / "cache" / "qemu"
    assert not published.exists() or list(published.iterdir()) == []


def test_a_compile_error_names_the_log_and_publishes_nothing(tmp_path: Path) -> None:
    series = _series(tmp_path / "s", _patch('    return puts("fake qemu") < 0;',
                                            "    return BROKEN;"))
    with pytest.raises(BuildError) as caught:
        _builder(tmp_path, series).qemu()
    assert caught.value.step == "QEMU" and caught.value.log.name == "build.log"
    assert "BROKEN" in caught.value.log.read_text()
    published = tmp_path / "cache" / "qemu"
    assert not published.exists() or list(published.iterdir()) == []


def test_cli_build_qemu_failures_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """``ebs-harness build-qemu``: a bad series is exit 2, a compile error exit
    3, each one line on stderr (the recipe's source is the fake tree)."""
    monkeypatch.setattr(qemu, "debian_source", FakeSource)
    monkeypatch.setenv("EBS_HARNESS_CACHE", str(tmp_path / "cache"))
    bad = _series(tmp_path / "bad", _patch("    no such line;", "    other;"))
    monkeypatch.setattr(qemu, "SERIES_DIR", bad)
    assert main(["-q", "build-qemu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "0001-change.patch does not apply" in err
    broken = _series(tmp_path / "broken", _patch('    return puts("fake qemu") < 0;',
                                                 "    return BROKEN;"))
    monkeypatch.setattr(qemu, "SERIES_DIR", broken)
    assert main(["-q", "build-qemu", "--json"]) == 3
    out, err = capsys.readouterr()
    assert err.startswith("ebs-harness build-qemu: QEMU build failed (log: ")
    assert json.loads(out)["error"]["kind"] == "environment"
    good = _series(tmp_path / "good", None)
    monkeypatch.setattr(qemu, "SERIES_DIR", good)
    assert main(["-q", "build-qemu", "--json"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert Path(reply["qemu"]).is_file() and reply["cache_hit"] is False


# ------------------------------------------- the meson wheel of the +ds repack


class FakePackage:
    """Stands for DebianSourcePackage: a tree without ``python/wheels/``'s wheel."""

    def identity(self) -> str:
        return "debian:qemu=fake"

    def materialize(self, dest: Path, progress: Progress) -> None:
        (dest / "python" / "wheels").mkdir(parents=True)


def _fake_pip(monkeypatch: pytest.MonkeyPatch, content: bytes) -> list[list[str]]:
    """``pip download`` as qemu.py runs it, writing ``content`` as the wheel."""
    calls: list[list[str]] = []
    real_run = subprocess.run

    def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        if argv[1:4] != ["-m", "pip", "download"]:
            return real_run(argv, **kwargs)  # type: ignore[call-overload,no-any-return]
        calls.append(argv)
        directory = Path(argv[argv.index("-d") + 1])
        (directory / qemu.MESON_WHEEL).write_bytes(content)
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(qemu.subprocess, "run", run)
    return calls


def test_the_meson_wheel_is_fetched_once_and_put_where_mkvenv_looks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EBS_HARNESS_CACHE", str(tmp_path / "cache"))
    wheel = b"the meson wheel"
    monkeypatch.setattr(qemu, "MESON_WHEEL_SHA256", hashlib.sha256(wheel).hexdigest())
    calls = _fake_pip(monkeypatch, wheel)
    source = qemu.QemuSource(FakePackage())  # type: ignore[arg-type]
    assert source.identity() == ("debian:qemu=fake:meson-wheel-sha256="
                                 f"{hashlib.sha256(wheel).hexdigest()}")
    for tree in (tmp_path / "a", tmp_path / "b"):
        source.materialize(tree, QuietProgress())
        assert (tree / "python" / "wheels" / qemu.MESON_WHEEL).read_bytes() == wheel
    assert len(calls) == 1, "the second tree reads the cached wheel"
    assert qemu.MESON_REQUIREMENT in calls[0] and "--only-binary=:all:" in calls[0]


def test_a_wheel_that_is_not_the_pinned_one_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EBS_HARNESS_CACHE", str(tmp_path / "cache"))
    _fake_pip(monkeypatch, b"something else")
    with pytest.raises(SourceError, match=r"meson-1.5.0-py3-none-any.whl from PyPI: sha256 "):
        qemu.fetch_meson_wheel(QuietProgress())
    assert not (tmp_path / "cache" / "downloads" / "wheels" / qemu.MESON_WHEEL).exists()


def test_the_key_moves_with_the_source_and_the_patches(tmp_path: Path) -> None:
    series = _series(tmp_path / "s", _patch('    return puts("fake qemu") < 0;',
                                            '    return puts("patched") < 0;'))
    key = _builder(tmp_path, series).inputs.key
    other = _series(tmp_path / "t", _patch('    return puts("fake qemu") < 0;',
                                           '    return puts("other") < 0;'))
    assert _builder(tmp_path, other).inputs.key != key

    class OtherSource(FakeSource):
        def identity(self) -> str:
            return "fake-qemu:2"

    moved = qemu.QemuBuilder(OtherSource(), series_dir=series, cache=tmp_path / "cache",
                             jobs=1, progress=QuietProgress())
    assert moved.inputs.key != key
    assert qemu.debian_source().identity().startswith(
        "debian:qemu=1:10.0.13+ds-0+deb13u1:orig-sha256=")
