"""Patch series: reading them, applying them without fuzz in a staging copy,
and bringing a build workspace to exactly the files they describe.

A series directory holds a ``series`` file naming the patches in order
(blank lines and ``#`` comments skipped), as quilt's does. Patches are
applied with ``patch -p1 -F0`` in a staging copy of the pristine files they
touch, so a patch that does not apply raises
:class:`~harness.errors.PatchError` naming the patch, the file and the hunk,
and nothing outside the staging directory is written. Overlays (directories
of this repository copied into the tree, such as the probe application) are
keyed like patches.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from harness.errors import DependencyError, PatchError, SeriesError
from harness.tools import scratch

#: What a series puts at the end of the subject of a patch of its test apparatus.
TEST_ONLY = "[test only]"


@dataclass(frozen=True)
class Patch:
    path: Path
    data: bytes

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def subject(self) -> str:
        """Its mail's subject (unfolded, decoded), without ``[PATCH n/m]``.

        :raises SeriesError: it has no Subject header (not a mail of
            ``git format-patch``).
        """
        import email.policy  # 10 ms of every boot's start otherwise
        from email.parser import BytesHeaderParser

        header = BytesHeaderParser(policy=email.policy.default).parsebytes(self.data)
        subject = header.get("Subject")
        if subject is None:
            raise SeriesError(self.path, "no Subject header: not a git format-patch mail")
        return re.sub(r"^\[PATCH[^\]]*\]\s*", "", " ".join(str(subject).split()))

    @property
    def test_only(self) -> bool:
        """A patch of the test apparatus (its subject ends with :data:`TEST_ONLY`)."""
        return self.subject.endswith(TEST_ONLY)

    def files(self) -> list[str]:
        """The tree paths this patch touches (p1), in order of appearance."""
        found: list[str] = []
        for line in self.data.decode("utf-8", "replace").splitlines():
            if line.startswith(("--- ", "+++ ")):
                target = line[4:].split("\t")[0].strip()
                if target == "/dev/null" or "/" not in target:
                    continue
                rel = target.split("/", 1)[1]
                if rel not in found:
                    found.append(rel)
        return found


def read_series(directory: Path) -> list[Patch]:
    """The patches named in ``directory/series``, in order.

    Blank lines and ``#`` comments are skipped; a missing series file or
    named patch is a :class:`SeriesError`.
    """
    series = directory / "series"
    if not series.is_file():
        raise SeriesError(series, "the series file is missing (an empty file means no "
                                  "patches)")
    patches: list[Patch] = []
    for number, line in enumerate(series.read_text().splitlines(), 1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        path = directory / name
        if not path.is_file():
            raise SeriesError(path, f"listed in {series}:{number} but the file is missing")
        patches.append(Patch(path, path.read_bytes()))
    return patches


def apply_in_place(tree: Path, patch: Patch) -> None:
    """Apply ``patch`` to ``tree`` itself (no fuzz), as Debian applies its
    own patches to its source.

    :raises PatchError: naming the patch, file and hunk.
    """
    try:
        proc = subprocess.run(
            ["patch", "-p1", "-F0", "--batch", "--forward", "--no-backup-if-mismatch",
             "-r", "-", "-d", str(tree)],
            input=patch.data, capture_output=True, check=False)
    except FileNotFoundError as exc:
        raise DependencyError("patch not found: run ./run setup as root "
                              "(installs Debian's patch package)") from exc
    if proc.returncode != 0:
        raise _patch_failure(patch, (proc.stdout + proc.stderr).decode("utf-8", "replace"))


def read_patch(path: Path) -> Patch:
    """One patch file outside a series (a test variant applied on top)."""
    if not path.is_file():
        raise SeriesError(path, "the patch file is missing")
    return Patch(path, path.read_bytes())


def read_overlays(overlays: Mapping[str, Path]) -> dict[str, bytes]:
    """Workspace path -> content of every file of the overlay directories."""
    files: dict[str, bytes] = {}
    for dest, source in sorted(overlays.items()):
        if not source.is_dir():
            continue
        for file in sorted(source.rglob("*")):
            # What the build reads: not the directory's own documentation.
            if file.is_file() and "__pycache__" not in file.parts and file.suffix != ".md":
                files[f"{dest}/{file.relative_to(source).as_posix()}"] = file.read_bytes()
    return files


_HUNK_FAILED = re.compile(r"Hunk #(\d+) FAILED")
_PATCHING = re.compile(r"^(?:patching|checking) file '?([^'\n]+)'?", re.MULTILINE)
_CANT_FIND = re.compile(r"can't find file to patch at input line (\d+)")
_MALFORMED = re.compile(r"malformed patch at line (\d+)")


def _patch_failure(patch: Patch, output: str) -> PatchError:
    """Turn ``patch``'s output into an error naming the file and hunk."""
    target: str | None = None
    hunk: int | None = None
    for match in _PATCHING.finditer(output):
        tail = output[match.end():]
        next_file = _PATCHING.search(tail)
        segment = tail[:next_file.start()] if next_file else tail
        failed = _HUNK_FAILED.search(segment)
        if failed or "No file to patch" in segment or "Reversed" in segment:
            target = match.group(1).strip()
            hunk = int(failed.group(1)) if failed else None
            break
    if target is None and (found := _CANT_FIND.search(output)):
        target = f"(file named near patch line {found.group(1)})"
    if target is None and (found := _MALFORMED.search(output)):
        target = f"(malformed at patch line {found.group(1)})"
    interesting = [line for line in output.splitlines()
                   if "FAILED" in line or "malformed" in line or "can't find" in line
                   or "Reversed" in line or "No such file" in line or "garbage" in line]
    return PatchError(patch.path, target, hunk, "\n".join(interesting or output.splitlines()))


def apply_series(pristine: Path, patches: list[Patch],
                 overlays: Mapping[str, bytes]) -> dict[str, bytes | None]:
    """The content every touched file must have: the series applied in a
    staging copy of the pristine files (no fuzz), then the overlays.

    :returns: tree path -> new content, or None for a file the series deletes.
    :raises PatchError: naming the patch, file and hunk; nothing is written
        outside the staging directory.
    """
    touched: list[str] = []
    for patch in patches:
        touched += [f for f in patch.files() if f not in touched]
    with scratch("series") as staging:
        for rel in touched:
            source = pristine / rel
            if source.is_file():
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, staging / rel)
        for patch in patches:
            apply_in_place(staging, patch)
        result: dict[str, bytes | None] = {}
        for rel in touched:
            staged = staging / rel
            result[rel] = staged.read_bytes() if staged.is_file() else None
    result.update(overlays)
    return result


def sync_workspace(tree: Path, pristine: Path, previous: set[str],
                   desired: Mapping[str, bytes | None]) -> list[str]:
    """Make ``tree`` hold ``desired`` plus pristine content for files an
    earlier series touched and this one does not. Writes only files whose
    content differs, so their mtimes (and edk2's incremental build) see
    exactly what changed. :returns: the paths written or removed."""
    changed: list[str] = []
    for rel in sorted(previous | set(desired)):
        if rel in desired:
            want = desired[rel]
        else:
            source = pristine / rel
            want = source.read_bytes() if source.is_file() else None
        target = tree / rel
        have = target.read_bytes() if target.is_file() else None
        if have == want:
            continue
        if want is None:
            target.unlink()
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.ebs-tmp")
            tmp.write_bytes(want)
            os.replace(tmp, target)
        changed.append(rel)
    return changed


