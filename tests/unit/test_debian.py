"""harness.build.debian: the host's archives read, our own apt configuration
written under the cache, pinned tarballs checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.build.debian import DebianSourcePackage, Mirror, PrivateApt, host_mirrors
from harness.build.progress import QuietProgress
from harness.errors import DependencyError, SourceError

KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def _etc_apt(root: Path) -> Path:
    parts = root / "sources.list.d"
    parts.mkdir(parents=True)
    (parts / "debian.sources").write_text(
        "Types: deb\n# a comment, as Debian's images have\nURIs: http://deb.debian.org/debian\n"
        f"Suites: bookworm bookworm-updates\nComponents: main\nSigned-By: {KEYRING}\n\n"
        "Types: deb\nURIs: http://deb.debian.org/debian-security\n"
        f"Suites: bookworm-security\nComponents: main\nSigned-By: {KEYRING}\n\n"
        "Types: deb-src\nURIs: http://src-only.example/debian\nSuites: bookworm\n"
        "Components: main\n\n"
        "Types: deb\nURIs: https://example.org/other\nSuites: stable\nComponents: main\n")
    (parts / "old.sources").write_text(
        "Types: deb\nEnabled: no\nURIs: http://disabled.example/debian\nSuites: x\n"
        "Components: main\n")
    (root / "sources.list").write_text(
        "deb [arch=amd64 signed-by=/etc/apt/mirror.gpg] http://mirror.example/debian "
        "bookworm main contrib\n# deb http://commented.example/debian bookworm main\n"
        "deb http://deb.debian.org/debian bookworm main\n")
    return root


def test_host_mirrors_reads_both_formats_once_each(tmp_path: Path) -> None:
    mirrors = host_mirrors(_etc_apt(tmp_path / "etc-apt"))
    assert mirrors == [
        Mirror("http://deb.debian.org/debian", KEYRING),
        Mirror("http://deb.debian.org/debian-security", KEYRING),
        Mirror("http://mirror.example/debian", "/etc/apt/mirror.gpg"),
    ]


def test_sources_list_asks_every_suite_of_the_release(tmp_path: Path) -> None:
    apt = PrivateApt(tmp_path / "apt", host_mirrors(_etc_apt(tmp_path / "etc-apt"))[:2])
    lines = apt.sources_list(["bookworm", "trixie"]).splitlines()
    assert lines == [
        f"deb-src [signed-by={KEYRING}] http://deb.debian.org/debian bookworm main",
        f"deb-src [signed-by={KEYRING}] http://deb.debian.org/debian bookworm-updates main",
        f"deb-src [signed-by={KEYRING}] http://deb.debian.org/debian trixie main",
        f"deb-src [signed-by={KEYRING}] http://deb.debian.org/debian trixie-updates main",
        (f"deb-src [signed-by={KEYRING}] http://deb.debian.org/debian-security "
         "bookworm-security main"),
        (f"deb-src [signed-by={KEYRING}] http://deb.debian.org/debian-security "
         "trixie-security main"),
    ]


def test_apt_runs_on_our_directories_only(tmp_path: Path) -> None:
    apt = PrivateApt(tmp_path / "apt", [Mirror("http://deb.debian.org/debian")])
    options = apt.options()
    values = dict(opt.split("=", 1) for opt in options[1::2])
    for name in ("Dir::Etc::SourceList", "Dir::Etc::SourceParts", "Dir::State::Lists",
                 "Dir::Cache::Archives"):
        assert values[name].startswith(str(tmp_path / "apt")), name
    assert not any("/etc/apt" in value for value in values.values())


def test_no_debian_archive_is_a_dependency_error(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    apt = PrivateApt(tmp_path / "apt", host_mirrors(tmp_path))
    with pytest.raises(DependencyError, match="no Debian archive"):
        apt.sources_list(["bookworm"])


def test_wrong_tarball_checksum_is_refused_before_extracting(tmp_path: Path) -> None:
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    package = DebianSourcePackage("qemu", "1:7.2+dfsg-7+deb12u18", "bookworm",
                                  "qemu_7.2+dfsg.orig.tar.xz", "ab" * 32, downloads=downloads)
    (downloads / package.orig).write_bytes(b"not the tarball")
    package.dsc.write_text("Format: 3.0 (quilt)\n")
    assert package.dsc.name == "qemu_7.2+dfsg-7+deb12u18.dsc"   # no epoch in file names
    with pytest.raises(SourceError, match="sha256 .* is not the expected abab"):
        package.materialize(tmp_path / "tree", QuietProgress())
    assert not (tmp_path / "tree").exists()
