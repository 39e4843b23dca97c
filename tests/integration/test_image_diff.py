"""imagediff, the judge of test_series_shape's production-equals-feature
test, on modules the host's gcc builds: the same code with its lines moved
differs in line numbers only; changed code is named (the negative control)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from imagediff import difference, padding_only

SOURCE = """\
__attribute__((ms_abi)) void DebugAssert (const char *File, unsigned long long Line,
                                          const char *Description);
#define ASSERT(Expression) \\
  do { if (!(Expression)) DebugAssert (__FILE__, __LINE__, #Expression); } while (0)
@ABOVE@
__attribute__((ms_abi)) int Scale (int Value)
{
  ASSERT (Value > 0);
  ASSERT (Value < 1000);
  Allocate (4, @PAGES@);
  return Value * @FACTOR@;
}

volatile unsigned long long  mLastLine;

__attribute__((ms_abi, noinline)) void Allocate (unsigned long long Type,
                                                 unsigned long long Pages)
{
  mLastLine = Type + Pages;
}

__attribute__((ms_abi, noinline)) void DebugAssert (const char *File,
                                                    unsigned long long Line,
                                                    const char *Description)
{
  mLastLine = Line;
}
"""


def _build(directory: Path, name: str, above: str = "", factor: int = 3,
           pages: int = 2) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("no gcc to build the modules compared")
    source = directory / "Module.c"     # one file name: __FILE__ is the same
    source.write_text(SOURCE.replace("@ABOVE@", above).replace("@FACTOR@", str(factor))
                      .replace("@PAGES@", str(pages)))
    out = directory / f"{name}.elf"
    subprocess.run(["gcc", "-Os", "-nostdlib", "-static", "-no-pie", "-fno-pie",
                    "-fcf-protection=none", "-fno-stack-protector", "-Wl,-e,Scale",
                    "-Wl,--build-id=none", "-o", str(out), str(source)], check=True)
    return out


def test_identical_builds_do_not_differ(tmp_path: Path) -> None:
    first = _build(tmp_path, "first")
    assert difference(first, _build(tmp_path, "again")) == ""


def test_lines_added_above_differ_in_line_numbers_only(tmp_path: Path) -> None:
    feature = _build(tmp_path, "feature")
    apparatus = _build(tmp_path, "apparatus",
                       above="#ifdef EBS_HARNESS_TEST\nint Traced;\n#endif\n\n")
    assert feature.read_bytes() != apparatus.read_bytes()
    assert difference(feature, apparatus) == "line numbers"


def test_changed_code_is_named(tmp_path: Path) -> None:
    feature = _build(tmp_path, "feature")
    changed = _build(tmp_path, "changed", factor=5)
    found = difference(feature, changed)
    assert found.startswith(".text at 0x") and found != "line numbers", found


def test_another_constant_for_edx_is_named(tmp_path: Path) -> None:
    """edx is every EFIAPI call's second argument: only the line number of
    a DebugAssert() call may differ there."""
    feature = _build(tmp_path, "feature")
    changed = _build(tmp_path, "changed", pages=3)
    found = difference(feature, changed)
    assert found.startswith(".text at 0x") and "edx" in found, found


def test_padding_is_the_zero_or_the_prefix_before_a_nopl_only() -> None:
    nopl8 = b"\x0f\x1f\x84\x00\x00\x00\x00\x00"
    assert padding_only(b"str\x00" + b"\x00" + nopl8, b"str\x00" + b"\x66" + nopl8)
    # the 5-byte form, as two RELEASE links of IScsiDxe filled one gap
    nopl5 = b"\x0f\x1f\x44\x00\x00"
    assert padding_only(b"ed1\x00no\x00" + b"\x00" + nopl5 + b"op",
                        b"ed1\x00no\x00" + b"\x66" + nopl5 + b"op")
    # the negative controls: another byte, a 0x66 before anything else, or
    # before 0f 1f with a ModRM that is no nop (reg field 1)
    assert not padding_only(b"str\x00" + b"\x00" + nopl8, b"str\x00" + b"\x67" + nopl8)
    assert not padding_only(b"ab\x00cd", b"ab\x66cd")
    assert not padding_only(b"abc", b"abcd")
    assert not padding_only(b"a\x00\x0f\x1f\x4c\x00\x00", b"a\x66\x0f\x1f\x4c\x00\x00")
