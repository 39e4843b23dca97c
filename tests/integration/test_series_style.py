"""Each baseline's firmware series against that baseline's own patch
checker: edk2's ``BaseTools/Scripts/PatchCheck.py`` of 2022.11 and of
2025.02 (which also refuses ``__FUNCTION__``) must pass every patch, commit
message and code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.build import edk2, series
from harness.build.progress import StderrProgress

PATCHES = [(name, patch) for name, baseline in edk2.BASELINES.items()
           for patch in series.read_series(baseline.series_dir)]


def patchcheck(baseline: str, patch: Path) -> subprocess.CompletedProcess[str]:
    script = edk2.pristine_tree(baseline, StderrProgress()) / "BaseTools" / "Scripts" / \
        "PatchCheck.py"
    return subprocess.run([sys.executable, str(script), str(patch)], capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.mark.parametrize(("baseline", "patch"), PATCHES,
                         ids=[f"{name}-{p.name[:4]}" for name, p in PATCHES])
def test_every_patch_passes_its_baselines_patchcheck(baseline: str,
                                                     patch: series.Patch) -> None:
    proc = patchcheck(baseline, patch.path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "The commit message format passed all checks." in proc.stdout
    assert "The code passed all checks." in proc.stdout


def test_the_checker_refuses_what_it_should(tmp_path: Path) -> None:
    """The control: the first patch with ``__func__`` turned back into
    ``__FUNCTION__`` fails 2025.02's checker."""
    first = next(p for _, p in PATCHES if "__func__" in p.path.read_text())
    old = tmp_path / first.path.name
    old.write_text(first.path.read_text().replace("__func__", "__FUNCTION__"))
    proc = patchcheck("2025.02", old)
    assert proc.returncode != 0
    assert "__FUNCTION__ was used, but __func__ is now recommended" in proc.stdout
