"""Guest images made per run: a FAT disk image the firmware boots from.

The image is written with mtools (``mformat``, ``mmd``, ``mcopy``), so no
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


def make_fat_image(path: Path, files: Mapping[str, bytes | Path],
                   size_mib: int = 16) -> Path:
    """Write a FAT image at ``path`` holding ``files``.

    :param files: image path (``EFI/BOOT/BOOTX64.EFI``, forward slashes) to
        the file's bytes or a host file to copy.
    :param size_mib: image size; FAT12/16 is chosen by ``mformat``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as image:
        image.truncate(size_mib * 1024 * 1024)
    target = f"-i{path}"
    _mtool(["mformat", target, "-v", "EBSHARNESS", "::"])
    made: set[str] = set()
    with scratch("fat") as tmp:
        for index, (name, content) in enumerate(sorted(files.items())):
            dest = PurePosixPath(name)
            for parent in reversed(dest.parents[:-1]):
                if str(parent) not in made:
                    _mtool(["mmd", target, f"::/{parent}"])
                    made.add(str(parent))
            if isinstance(content, Path):
                source = content
            else:
                source = Path(tmp) / f"file{index}"
                source.write_bytes(content)
            _mtool(["mcopy", target, str(source), f"::/{dest}"])
    LOG.debug("FAT image %s: %s", path, ", ".join(sorted(files)))
    return path
