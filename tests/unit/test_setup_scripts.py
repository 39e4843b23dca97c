"""scripts/setup-host: only what is missing, and one line when it cannot install."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _fake_bin(tmp_path: Path, installed: set[str], uid: int) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dpkg-query").write_text(
        "#!/bin/bash\n"
        f"case \" {' '.join(sorted(installed))} \" in *\" ${{@: -1}} \"*) echo installed ;; "
        "*) exit 1 ;; esac\n")
    (bin_dir / "id").write_text(f"#!/bin/bash\necho {uid}\n")
    (bin_dir / "apt-get").write_text(f"#!/bin/bash\necho \"$@\" >> {tmp_path}/apt-calls\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}


def _packages() -> list[str]:
    text = (REPO / "scripts" / "setup-host").read_text()
    block = text.split("packages=(", 1)[1].split(")", 1)[0]
    return block.split()


def test_nothing_missing_installs_nothing(tmp_path: Path) -> None:
    env = _fake_bin(tmp_path, set(_packages()), uid=0)
    proc = subprocess.run([REPO / "scripts" / "setup-host"], env=env, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0 and proc.stderr == ""
    assert not (tmp_path / "apt-calls").exists()


def test_missing_as_root_installs_only_the_missing(tmp_path: Path) -> None:
    env = _fake_bin(tmp_path, set(_packages()) - {"nasm", "mtools"}, uid=0)
    proc = subprocess.run([REPO / "scripts" / "setup-host"], env=env, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "apt-calls").read_text().splitlines()
    assert calls[0].startswith("update")
    assert calls[1].startswith("install") and calls[1].split()[-2:] == ["nasm", "mtools"]


def test_missing_without_root_is_one_line_and_exit_3(tmp_path: Path) -> None:
    env = _fake_bin(tmp_path, set(_packages()) - {"qemu-system-x86"}, uid=1000)
    proc = subprocess.run([REPO / "scripts" / "setup-host"], env=env, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 3
    assert proc.stderr.count("\n") == 1
    assert "qemu-system-x86" in proc.stderr and "apt-get install qemu-system-x86" in proc.stderr
    assert not (tmp_path / "apt-calls").exists()


def test_test_packages_only_with_the_test_flag(tmp_path: Path) -> None:
    env = _fake_bin(tmp_path, set(_packages()), uid=0)
    script = REPO / "scripts" / "setup-host"
    assert subprocess.run([script], env=env, check=False).returncode == 0
    assert not (tmp_path / "apt-calls").exists()
    assert subprocess.run([script, "--test"], env=env, check=False).returncode == 0
    installed = (tmp_path / "apt-calls").read_text().splitlines()[1].split()
    assert installed[-3:] == ["openssh-server", "chromium", "cpio"]
