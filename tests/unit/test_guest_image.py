"""harness.vm.guest: the FAT image a run boots from, read back with mtools."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from harness.vm import guest

MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


def _read(image: Path, name: str) -> bytes:
    return subprocess.run(["mtype", f"-i{image}", f"::/{name}"], env=MTOOLS_ENV,
                          capture_output=True, check=True).stdout


def _mtools(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=MTOOLS_ENV, capture_output=True, text=True, check=False)


def _files(image: Path) -> list[str]:
    """Every file in the image (directories left out), lower case."""
    listed = _mtools("mdir", "-/", "-b", f"-i{image}", "::/")
    assert listed.returncode == 0, listed.stderr
    return sorted(line.strip().lower() for line in listed.stdout.splitlines()
                  if line.strip() and not line.strip().endswith("/"))


def test_every_file_lands_where_named_with_its_bytes(tmp_path: Path) -> None:
    host_file = tmp_path / "probe.efi"
    host_file.write_bytes(os.urandom(70_000))
    image = guest.make_fat_image(tmp_path / "boot.img", {
        guest.BOOT_PATH: host_file,
        "ebs-probe.cfg": b"canary=canary.bin\n",
        "deep/er/still.bin": b"\x00\xff" * 3000,
    }, size_mib=8)
    assert image.stat().st_size == 8 * 1024 * 1024
    assert _read(image, guest.BOOT_PATH) == host_file.read_bytes()
    assert _read(image, "ebs-probe.cfg") == b"canary=canary.bin\n"
    assert _read(image, "deep/er/still.bin") == b"\x00\xff" * 3000
    assert _files(image) == ["::/deep/er/still.bin", "::/ebs-probe.cfg",
                             "::/efi/boot/bootx64.efi"]


def test_no_files_is_an_empty_volume(tmp_path: Path) -> None:
    image = guest.make_fat_image(tmp_path / "empty.img", {}, size_mib=4)
    assert "EBSHARNESS" in _mtools("mlabel", "-s", f"-i{image}", "::").stdout
    # mdir finds nothing to list in an empty root
    assert _mtools("mdir", "-b", f"-i{image}", "::/").stdout.strip() == ""


def test_a_remade_image_holds_only_the_new_files(tmp_path: Path) -> None:
    path = tmp_path / "probe.img"
    guest.make_fat_image(path, {"old.bin": b"old"}, size_mib=4)
    guest.make_fat_image(path, {"new.bin": b"new"}, size_mib=4)
    assert _files(path) == ["::/new.bin"]


@pytest.mark.parametrize(("files", "why"), [
    ({"/EFI/x": b""}, "relative"),
    ({"EFI/../x": b""}, "relative"),
    ({"EFI//x": b""}, "relative"),
    ({"a.bin": b"", "A.BIN": b""}, "name one file"),
    ({"EFI": b"", "EFI/x": b""}, "is a file, and a directory of"),
])
def test_names_the_image_cannot_hold_are_refused(tmp_path: Path, files: dict[str, bytes],
                                                 why: str) -> None:
    with pytest.raises(ValueError, match=why):
        guest.make_fat_image(tmp_path / "bad.img", files, size_mib=4)
    assert not (tmp_path / "bad.img").exists()
