"""The package's layering: data flows build -> vm -> analysis -> report, and
the analysis layer judges logs and dumps without knowing how they were made."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import harness

PACKAGE = Path(harness.__file__).parent


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _offenders(layer: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for path in sorted((PACKAGE / layer).glob("*.py")):
        bad = sorted(name for name in _imports(path) if name.startswith(forbidden))
        if bad:
            out[path.name] = bad
    return out


def test_analysis_imports_nothing_from_vm_or_build() -> None:
    assert _offenders("analysis", ("harness.vm", "harness.build", "harness.scenario",
                                   "harness.cli", "harness.linux")) == {}


def test_vm_does_not_judge() -> None:
    assert _offenders("vm", ("harness.analysis", "harness.scenario", "harness.cli")) == {}


def test_build_needs_no_machine() -> None:
    """A build publishes the symbol index the analysis reads (one format, in
    harness.analysis.symbols); it starts no QEMU and judges nothing."""
    assert _offenders("build", ("harness.vm", "harness.scenario", "harness.analysis.trace",
                                "harness.analysis.dump", "harness.analysis.report")) == {}


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    """Negative control: the scanner finds an import written either way."""
    sample = tmp_path / "sample.py"
    sample.write_text("from harness.vm import machine\nimport harness.vm.host\n")
    assert {"harness.vm.machine", "harness.vm.host"} <= _imports(sample)


def test_test_files_have_unique_basenames() -> None:
    """pytest imports test modules by basename (rootdir-relative, no
    packages): two ``test_x.py`` in different tiers stop the collection."""
    tests = Path(__file__).resolve().parents[1]
    names = [p.name for p in tests.rglob("test_*.py") if "data" not in p.parts]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []


#: What ``ebs-harness boot`` leaves unloaded until QEMU runs (the judging,
#: QMP's asyncio) or never needs from the cache (the builds' python-debian
#: and filelock, the static check, SSH): a whole boot is measured against
#: its bare QEMU (bench/boot), and each of these is milliseconds of its start.
DEFERRED = ("harness.analysis.trace", "harness.analysis.verdicts", "harness.analysis.report",
            "harness.analysis.judgement", "harness.analysis.dump", "harness.analysis.explain",
            "harness.analysis.teardown_static", "harness.analysis.symbols",
            "harness.analysis.devices", "harness.analysis.devicetrace", "harness.demo",
            "asyncio", "qemu.qmp", "filelock", "debian.deb822", "paramiko", "email.parser")


def _loaded_by(statement: str) -> set[str]:
    """The modules of DEFERRED that ``statement`` loads in a fresh interpreter."""
    probe = (f"import sys\n{statement}\n"
             f"print(' '.join(m for m in {DEFERRED!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=PACKAGE.parent).stdout
    return set(out.split())


def test_what_a_boot_loads_before_qemu_starts_leaves_the_judging_out() -> None:
    # Everything cli, scenario and the machine need to reach QEMU's start.
    assert _loaded_by("import harness.cli, harness.scenario, harness.build.qemu, "
                      "harness.vm.machine, harness.vm.host, harness.vm.guest") == set()


def test_the_deferred_check_sees_a_top_level_import() -> None:
    """Negative control: a module that imports the judging at its top."""
    assert _loaded_by("import harness.analysis.judgement") >= {
        "harness.analysis.judgement", "harness.analysis.report", "harness.analysis.verdicts"}
