"""The package as another project gets it: a wheel built from this checkout,
installed into a fresh virtualenv outside it, whose pytest plugin drives an
external project's own tests (no conftest.py of ours) through a firmware
build, a boot and the verdicts, and whose command works from anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.build import cache, edk2

pytestmark = pytest.mark.tcg

REPO = Path(__file__).resolve().parents[2]
#: What the wheel is built from: the package and what it ships.
WHEEL_SOURCES = ("pyproject.toml", "README.md", "harness", "ovmf-patches", "qemu-patches",
                 "guests")

EXTERNAL_TEST = '''
import json
import pytest
from harness.scenario import Scenario


@pytest.mark.tcg
def test_the_callback_holds_against_a_requeueing_driver(ebs_run_probe, ebs_firmware):
    result = ebs_run_probe(Scenario(ebs_mode="callback", requeue_depth=2))
    assert result.passed, sorted(result.failed_checks())
    with open("firmware.json", "w") as out:
        json.dump({"path": str(ebs_firmware.path), "key": ebs_firmware.key}, out)


@pytest.mark.tcg
def test_no_teardown_with_a_leak_fails_v2_and_v4(ebs_run_probe):
    result = ebs_run_probe(Scenario(ebs_mode="none", leak_mapping=True))
    assert {"V2", "V4"} <= result.failed_checks()
'''


def _run(argv: list[str], cwd: Path, timeout: float = 600,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, f"{argv}: exit {proc.returncode}\n{proc.stdout[-3000:]}" \
                                 f"\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv outside the checkout with the wheel of this checkout."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    for name in WHEEL_SOURCES:
        item = REPO / name
        if item.is_dir():
            shutil.copytree(item, source / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(item, source / name)
    dist = root / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist),
          str(source)], cwd=root)
    wheels = list(dist.glob("ovmf_ebs_harness-*.whl"))
    assert len(wheels) == 1, wheels
    venv = root / "venv"
    _run(["/usr/bin/python3", "-m", "venv", str(venv)], cwd=root)
    _run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "-c",
          str(REPO / "constraints.txt"), str(wheels[0]), "pytest"], cwd=root)
    return venv


def test_the_wheel_ships_what_the_harness_reads(installed: Path) -> None:
    site = subprocess.run([str(installed / "bin/python"), "-c",
                           "import harness, sys; print(harness.__file__)"],
                          capture_output=True, text=True, check=True, cwd="/").stdout.strip()
    package = Path(site).parent
    assert not str(package).startswith(str(REPO))
    for item in ("share/ovmf-patches/edk2-2025.02/series",
                 "share/ovmf-patches/edk2-2022.11/series", "share/qemu-patches/series",
                 "share/guests/ebs-probe/EbsProbe.c", "share/guests/linux/recipe.toml"):
        path = package / item
        assert path.is_file() and not path.is_symlink(), item
    shipped = sorted(str(p.relative_to(package / "share/ovmf-patches"))
                     for p in (package / "share/ovmf-patches").rglob("*"))
    assert shipped == sorted(str(p.relative_to(REPO / "ovmf-patches"))
                             for p in (REPO / "ovmf-patches").rglob("*"))


def test_the_installed_command_works_outside_the_checkout(installed: Path,
                                                          tmp_path: Path) -> None:
    proc = _run([str(installed / "bin/ebs-harness"), "analyze-log",
                 str(REPO / "tests/data/callback-depth2.log"), "--json"], cwd=tmp_path,
                timeout=120)
    reply = json.loads(proc.stdout)
    assert reply["schema"] == 1 and reply["verdict"] == "pass"


def test_an_external_project_builds_boots_and_judges_with_the_plugin(
        installed: Path, ebs_firmware: edk2.Firmware, tmp_path: Path) -> None:
    """The external project's own tests, with only the installed package:
    the fixtures find the firmware the same as this session built (the same
    key from the shipped series: a cache hit), boot it and judge it."""
    project = tmp_path / "project"
    (project / "tests").mkdir(parents=True)
    (project / "tests" / "test_ebs.py").write_text(EXTERNAL_TEST)
    (project / "pytest.ini").write_text(textwrap.dedent("""\
        [pytest]
        addopts = --strict-markers -p no:cacheprovider
        ebs_accel = tcg
        """))
    env = {**os.environ, "EBS_HARNESS_CACHE": str(cache.cache_root()),
           "EBS_HARNESS_EDK2": ebs_firmware.baseline}     # this session's baseline
    env.pop("PYTHONPATH", None)
    proc = _run([str(installed / "bin/python"), "-m", "pytest", "-q"], cwd=project, env=env)
    assert "2 passed" in proc.stdout, proc.stdout
    built = json.loads((project / "firmware.json").read_text())
    assert built == {"path": str(ebs_firmware.path), "key": ebs_firmware.key}


def test_the_installed_demo_runs_outside_the_checkout(installed: Path, ebs_firmware: edk2.Firmware,
                                                      tmp_path: Path) -> None:
    """``pip install`` and ``ebs-harness demo``: the demo's QEMU and firmware
    come from the shipped series (cache hits here), its story holds."""
    env = {**os.environ, "EBS_HARNESS_CACHE": str(cache.cache_root()),
           "EBS_HARNESS_EDK2": ebs_firmware.baseline}
    proc = _run([str(installed / "bin/ebs-harness"), "-q", "demo"], cwd=tmp_path, env=env,
                timeout=900)
    assert "the 2017 scheme lost the race and the callback won it, as predicted" in proc.stdout
    results = list((tmp_path / "artifacts").glob("demo-*/*/result.json"))
    assert len(results) == 2
    for result in results:
        assert json.loads(result.read_text())["firmware_key"] == ebs_firmware.key
