"""Guest images made per run: a FAT disk image the firmware boots from.

The image is written with mtools (``mformat``, ``mcopy``), so no
loop device or root is needed. OVMF boots ``\\EFI\\BOOT\\BOOTX64.EFI`` from
it directly when the disk has ``bootindex=0``: no shell, no countdown.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from harness.tools import run_tool, scratch

LOG = logging.getLogger(__name__)

BOOT_PATH = "EFI/BOOT/BOOTX64.EFI"


def _mtool(argv: list[str]) -> None:
    run_tool(argv, env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"},
             hint="install Debian's mtools package")


def _check_names(files: Mapping[str, bytes | Path]) -> None:
    seen: dict[str, str] = {}
    for name in files:
        parts = name.split("/")
        if name.startswith("/") or any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"FAT image path {name!r}: it must be relative, without empty, "
                             "'.' or '..' parts")
        folded = name.upper()
        if folded in seen:
            raise ValueError(f"FAT image paths {seen[folded]!r} and {name!r} name one file")
        seen[folded] = name
    for folded, name in seen.items():
        for parent in PurePosixPath(folded).parents[:-1]:
            if str(parent) in seen:
                raise ValueError(f"FAT image path {seen[str(parent)]!r} is a file, and a "
                                 f"directory of {name!r}")


def make_fat_image(path: Path, files: Mapping[str, bytes | Path],
                   size_mib: int = 16) -> Path:
    """Write a FAT image at ``path`` holding ``files``.

    The files are laid out in a scratch directory (a host file as a link to
    it) and copied in by one recursive ``mcopy``: two mtools runs for any
    number of files.

    :param files: image path (``EFI/BOOT/BOOTX64.EFI``, forward slashes) to
        the file's bytes or a host file to copy.
    :param size_mib: image size; FAT12/16 is chosen by ``mformat``.
    :raises ValueError: a name that is absolute, climbs (``..``), has an
        empty part, or names the same file as another, or a directory of
        another, once FAT's case is ignored.
    """
    _check_names(files)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as image:
        image.truncate(size_mib * 1024 * 1024)
    target = f"-i{path}"
    _mtool(["mformat", target, "-v", "EBSHARNESS", "::"])
    with scratch("fat") as tree:
        for name, content in files.items():
            dest = tree / PurePosixPath(name)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                dest.symlink_to(content.absolute())     # mcopy follows it
            else:
                dest.write_bytes(content)
        if files:
            _mtool(["mcopy", "-s", target, *sorted(str(top) for top in tree.iterdir()), "::/"])
    LOG.debug("FAT image %s: %s", path, ", ".join(sorted(files)))
    return path
