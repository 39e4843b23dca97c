"""Debian source packages, fetched through an apt configuration of our own.

The harness builds from Debian's source packages (edk2, QEMU), each pinned to
a version and to the sha256 of its upstream tarball. It never writes the
host's apt configuration: it reads the Debian ``deb`` entries the host has
(mirror URIs and signing keys) from ``/etc/apt``, and keeps under the cache
(``apt/``) a ``sources.list`` of ``deb-src`` lines for the releases it needs,
with package lists and archives of its own; ``apt-get`` runs with
``-o Dir::...`` options pointing there. What is checked on the way:

- apt checks the ``.dsc`` against the Sources index of a signed Release file;
- ``dpkg-source -x`` checks every tarball against the ``.dsc``;
- the harness checks the pinned sha256 of the upstream tarball.

Downloaded files stay in the cache's ``downloads/``; a second fetch of the
same version reads nothing from the network.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from harness.build.cache import cache_root, sha256_file
from harness.build.progress import Progress
from harness.errors import DependencyError, SourceError
from harness.tools import run_tool

if TYPE_CHECKING:
    from debian.deb822 import Deb822

LOG = logging.getLogger(__name__)

ETC_APT = Path("/etc/apt")

#: A one-line ``deb [options] URI suite components`` entry.
_ONE_LINE = re.compile(r"^\s*deb\s+(?:\[(?P<options>[^\]]*)\]\s+)?(?P<uri>\S+)\s+\S+")


@dataclass(frozen=True)
class Mirror:
    """A Debian archive the host's apt uses: its URI and signing key.

    :param security: the security archive (suites ``RELEASE-security``).
    """

    uri: str
    signed_by: str | None = None

    @property
    def security(self) -> bool:
        return self.uri.rstrip("/").endswith("-security")

    def suites(self, release: str) -> tuple[str, ...]:
        """The suites of ``release`` this archive serves: a release
        (``bookworm``) with its updates and security suites, or one suite as
        named (``bookworm-backports``, on the main archive only)."""
        if "-" in release:
            return () if self.security else (release,)
        if self.security:
            return (f"{release}-security",)
        return (release, f"{release}-updates")


def host_mirrors(etc_apt: Path = ETC_APT) -> list[Mirror]:
    """The Debian archives of the host's ``deb`` entries (deb822 ``.sources``
    files and the one-line ``sources.list``), in order, each once."""
    found: list[Mirror] = []

    def add(uri: str, signed_by: str | None) -> None:
        if "debian" not in uri:
            return
        mirror = Mirror(uri.rstrip("/"), signed_by)
        if all(m.uri != mirror.uri for m in found):
            found.append(mirror)

    # python-debian and filelock are imported where used: a boot from the
    # cache needs neither.
    from debian.deb822 import Deb822

    parts = etc_apt / "sources.list.d"
    for file in sorted(parts.glob("*.sources")) if parts.is_dir() else []:
        with open(file, encoding="utf-8") as handle:
            for stanza in Deb822.iter_paragraphs(handle):
                if "deb" not in stanza.get("Types", "").split():
                    continue
                if stanza.get("Enabled", "yes").strip().lower() == "no":
                    continue
                for uri in stanza.get("URIs", "").split():
                    add(uri, stanza.get("Signed-By") or None)
    legacy = etc_apt / "sources.list"
    if legacy.is_file():
        for line in legacy.read_text().splitlines():
            match = _ONE_LINE.match(line)
            if match:
                options = dict(opt.partition("=")[::2]
                               for opt in (match.group("options") or "").split())
                add(match.group("uri"), options.get("signed-by") or None)
    return found


class PrivateApt:
    """``apt-get`` on a configuration of our own under ``root``.

    :param mirrors: the archives to ask (default: the host's, from
        :func:`host_mirrors`).
    :param kind: ``deb-src`` (source packages) or ``deb`` (binary packages,
        downloaded and unpacked, never installed).
    """

    def __init__(self, root: Path, mirrors: Sequence[Mirror] | None = None,
                 kind: str = "deb-src") -> None:
        if kind not in ("deb-src", "deb"):
            raise ValueError(f"apt entry kind {kind!r}")
        self.root = root
        self.kind = kind
        self._mirrors = list(mirrors) if mirrors is not None else None

    @property
    def mirrors(self) -> list[Mirror]:
        if self._mirrors is None:
            self._mirrors = host_mirrors()
        if not self._mirrors:
            raise DependencyError(f"apt has no Debian archive in {ETC_APT}: add a 'deb' "
                                  "entry for deb.debian.org (or a mirror) and retry")
        return self._mirrors

    def sources_list(self, releases: Sequence[str]) -> str:
        """``deb-src`` (or ``deb``) lines for ``releases`` on every mirror."""
        lines = []
        for mirror in self.mirrors:
            options = f"[signed-by={mirror.signed_by}] " if mirror.signed_by else ""
            for release in releases:
                for suite in mirror.suites(release):
                    lines.append(f"{self.kind} {options}{mirror.uri} {suite} main")
        return "\n".join(lines) + "\n"

    def options(self) -> list[str]:
        """The ``-o`` options that point apt at this configuration."""
        opts = {
            "Dir::Etc::SourceList": self.root / "sources.list",
            "Dir::Etc::SourceParts": self.root / "sources.list.d",
            "Dir::State::Lists": self.root / "lists",
            "Dir::Cache::Archives": self.root / "archives",
            "Dir::Cache::pkgcache": "",
            "Dir::Cache::srcpkgcache": "",
        }
        argv: list[str] = []
        for name, value in opts.items():
            argv += ["-o", f"{name}={value}"]
        if os.geteuid() == 0:
            # apt's download sandbox user cannot write into our cache.
            argv += ["-o", "APT::Sandbox::User=root"]
        return argv

    def _prepare(self, releases: Sequence[str]) -> bool:
        """Write the sources list; True when it changed (the lists are stale)."""
        for sub in ("sources.list.d", "lists/partial", "archives/partial"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        wanted = set(releases)
        listed = self.root / "releases"
        if listed.is_file():
            wanted |= set(listed.read_text().split())
        text = self.sources_list(sorted(wanted))
        path = self.root / "sources.list"
        if path.is_file() and path.read_text() == text:
            return False
        path.write_text(text)
        listed.write_text("\n".join(sorted(wanted)) + "\n")
        return True

    def has_source(self, package: str, version: str) -> bool:
        return f"\nVersion: {version}\n" in f"\n{self._apt_cache('showsrc', package)}"

    def _has_binary(self, package: str, version: str) -> bool:
        return f"\nVersion: {version}\n" in f"\n{self._apt_cache('show', f'{package}={version}')}"

    def _apt_cache(self, *args: str) -> str:
        """What ``apt-cache ARGS`` on this configuration prints ("" when it
        knows nothing of it)."""
        try:
            proc = subprocess.run(["apt-cache", *self.options(), *args], capture_output=True,
                                  text=True, check=False)
        except FileNotFoundError as exc:
            raise DependencyError("apt-cache not found: the harness fetches Debian's source "
                                  "packages with apt") from exc
        return proc.stdout if proc.returncode == 0 else ""

    def update(self) -> None:
        run_tool(["apt-get", *self.options(), "-q", "update"],
                 what="apt-get update (the harness's own source lists)")

    def download_source(self, package: str, version: str, release: str, dest: Path,
                        progress: Progress) -> None:
        """``apt-get source --download-only package=version`` into ``dest``.

        :raises DependencyError: no archive of the host's has that version.
        """
        spec = f"{package}={version}"
        self._download(release, lambda: [] if self.has_source(package, version)
                       else [f"the source package {spec}"],
                       ["source", "--download-only", spec], dest, progress)

    def download_binaries(self, packages: Sequence[str], version: str, release: str,
                          dest: Path, progress: Progress) -> list[Path]:
        """``apt-get download package=version ...`` into ``dest``: the
        ``.deb`` files, to unpack with ``dpkg-deb -x`` (nothing is installed).

        :raises DependencyError: no archive of the host's has that version.
        """
        return self._download(release, lambda: [f"{p} {version}" for p in packages
                                                if not self._has_binary(p, version)],
                              ["download", *(f"{p}={version}" for p in packages)], dest,
                              progress)

    def _download(self, release: str, missing: Callable[[], list[str]], args: list[str],
                  dest: Path, progress: Progress) -> list[Path]:
        """Under this configuration's lock: the package lists brought up to
        date when the sources changed or ``missing()`` names anything; then
        ``apt-get ARGS`` in a scratch directory of ``dest``, whose files are
        moved into ``dest`` (a fetch cut short leaves nothing there)."""
        from filelock import FileLock

        what = f"apt-get {' '.join(args)}"
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / "lock")):
            if self._prepare([release]) or missing():
                progress.phase("fetch", f"apt-get update ({', '.join(self._release_suites(release))})")
                self.update()
            absent = missing()
            if absent:
                raise DependencyError(
                    f"no Debian archive of this host ({', '.join(m.uri for m in self.mirrors)}) "
                    f"has {', '.join(absent)} ({release})")
            progress.phase("fetch", what)
            dest.mkdir(parents=True, exist_ok=True)
            found: list[Path] = []
            with tempfile.TemporaryDirectory(dir=dest, prefix=".fetch-") as tmp:
                run_tool(["apt-get", *self.options(), "-q", *args], cwd=Path(tmp), what=what)
                for item in sorted(Path(tmp).iterdir()):
                    os.replace(item, dest / item.name)
                    found.append(dest / item.name)
        return found

    def source_files(self, package: str, version: str, release: str,
                     progress: Progress) -> tuple[str, dict[str, str]]:
        """Where ``package`` ``version`` lives in the archive (its ``Directory``)
        and its files' sha256, from ``release``'s Sources index (lists brought
        up to date as needed).

        :raises DependencyError: no archive of the host's has that version.
        """
        from debian.deb822 import Deb822
        from filelock import FileLock

        def record() -> Deb822 | None:
            text = self._apt_cache("showsrc", package)
            for paragraph in Deb822.iter_paragraphs(text.splitlines()):
                if paragraph.get("Version") == version:
                    return paragraph
            return None

        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / "lock")):
            if self._prepare([release]) or record() is None:
                progress.phase("fetch", f"apt-get update ({', '.join(self._release_suites(release))})")
                self.update()
            found = record()
        if found is None:
            raise DependencyError(
                f"no Debian archive of this host ({', '.join(m.uri for m in self.mirrors)}) "
                f"has the source package {package} {version} ({release})")
        files = {}
        for line in str(found.get("Checksums-Sha256", "")).splitlines():
            parts = line.split()
            if len(parts) == 3:
                files[parts[2]] = parts[0]
        return str(found.get("Directory", "")), files

    def download_file(self, path: str, dest: Path, sha256: str) -> None:
        """One archive file (``pool/...``) into ``dest`` by apt's own
        downloader, which checks ``sha256``; tried on each mirror in turn."""
        errors = []
        dest.parent.mkdir(parents=True, exist_ok=True)
        for mirror in self.mirrors:
            with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
                part = Path(tmp) / dest.name
                proc = subprocess.run(
                    ["/usr/lib/apt/apt-helper", *self.options(), "download-file",
                     f"{mirror.uri.rstrip('/')}/{path}", str(part), f"SHA256:{sha256}"],
                    capture_output=True, text=True, check=False)
                if proc.returncode == 0 and part.is_file():
                    os.replace(part, dest)
                    return
                said = proc.stderr.strip().splitlines()
                errors.append(f"{mirror.uri}: {said[-1] if said else f'status {proc.returncode}'}")
        raise DependencyError(f"could not download {path}: {'; '.join(errors)}")

    def _release_suites(self, release: str) -> list[str]:
        return [suite for mirror in self.mirrors for suite in mirror.suites(release)]


@dataclass(frozen=True)
class DebianSourcePackage:
    """One Debian source package, pinned.

    :param package: the source package name (``qemu``).
    :param version: its Debian version, epoch included (``1:7.2+dfsg-7+deb12u18``).
    :param release: the Debian release that has it (``bookworm``).
    :param orig: the upstream tarball's file name.
    :param orig_sha256: its sha256.
    """

    package: str
    version: str
    release: str
    orig: str
    orig_sha256: str
    downloads: Path = field(default_factory=lambda: cache_root() / "downloads")
    apt_root: Path = field(default_factory=lambda: cache_root() / "apt")

    def identity(self) -> str:
        return f"debian:{self.package}={self.version}:orig-sha256={self.orig_sha256}"

    @property
    def dsc(self) -> Path:
        return self.downloads / f"{self.package}_{self.version.split(':')[-1]}.dsc"

    def fetch(self, progress: Progress) -> None:
        """Download the package into ``downloads/`` unless it is there already."""
        if self.dsc.exists() and (self.downloads / self.orig).exists():
            return
        PrivateApt(self.apt_root).download_source(self.package, self.version, self.release,
                                                  self.downloads, progress)

    def extract(self, dest: Path, progress: Progress) -> None:
        """Check the upstream tarball, then ``dpkg-source -x`` (which applies
        Debian's own patches and checks every file against the ``.dsc``)."""
        orig = self.downloads / self.orig
        if not orig.exists():
            raise SourceError(f"{orig} is missing: the source package was not fetched")
        actual = sha256_file(orig)
        if actual != self.orig_sha256:
            raise SourceError(f"{orig}: sha256 {actual} is not the expected {self.orig_sha256}")
        progress.phase("extract", f"dpkg-source -x {self.dsc.name}")
        run_tool(["dpkg-source", "-x", str(self.dsc), str(dest)],
                 cwd=self.downloads, what=f"dpkg-source -x {self.dsc}")

    def materialize(self, dest: Path, progress: Progress) -> None:
        self.fetch(progress)
        self.extract(dest, progress)


@dataclass(frozen=True)
class DebianTarballs:
    """A Debian source package fetched as its two tarballs, for an archive
    that serves them but not the ``.dsc`` (trixie's edk2 on this host's
    mirror answers 404 for it).

    Each tarball's sha256 is pinned here and must equal the one in the
    release's ``Sources`` index, which apt has checked against the signed
    ``Release`` file; apt's own downloader (``apt-helper download-file``,
    through the host's apt transport) fetches it and checks that sha256. The
    tree is then made as ``dpkg-source -x`` would: the upstream tarball, the
    Debian tarball over it, ``debian/patches/series`` applied in order.
    """

    package: str
    version: str
    release: str
    orig: str
    orig_sha256: str
    debian: str
    debian_sha256: str
    downloads: Path = field(default_factory=lambda: cache_root() / "downloads")
    apt_root: Path = field(default_factory=lambda: cache_root() / "apt")

    def identity(self) -> str:
        return (f"debian-tarballs:{self.package}={self.version}:orig-sha256="
                f"{self.orig_sha256}:debian-sha256={self.debian_sha256}")

    def _files(self) -> tuple[tuple[str, str], ...]:
        return ((self.orig, self.orig_sha256), (self.debian, self.debian_sha256))

    def fetch(self, progress: Progress) -> None:
        """Download what ``downloads/`` lacks, each checked twice (index, pin)."""
        missing = [(name, sha) for name, sha in self._files()
                   if not (self.downloads / name).is_file()]
        if not missing:
            return
        apt = PrivateApt(self.apt_root)
        directory, listed = apt.source_files(self.package, self.version, self.release,
                                             progress)
        for name, sha in self._files():
            if name not in listed:
                raise SourceError(f"the {self.release} Sources index lists no {name} for "
                                  f"{self.package} {self.version}")
            if listed[name] != sha:
                raise SourceError(f"{name}: the pinned sha256 {sha} is not the {self.release} "
                                  f"Sources index's {listed[name]}: refusing it")
        for name, sha in missing:
            progress.phase("fetch", f"{name} ({self.release})")
            apt.download_file(f"{directory}/{name}", self.downloads / name, sha)

    def extract(self, dest: Path, progress: Progress) -> None:
        for name, sha in self._files():
            path = self.downloads / name
            actual = sha256_file(path) if path.is_file() else "missing"
            if actual != sha:
                raise SourceError(f"{path}: sha256 {actual} is not the expected {sha}")
        progress.phase("extract", f"{self.orig} + {self.debian}")
        dest.mkdir(parents=True, exist_ok=True)
        run_tool(["tar", "-xf", str(self.downloads / self.orig), "-C", str(dest),
                  "--strip-components=1"], what=f"tar -x {self.orig}")
        run_tool(["tar", "-xf", str(self.downloads / self.debian), "-C", str(dest)],
                 what=f"tar -x {self.debian}")
        series = dest / "debian" / "patches" / "series"
        names = [line.split()[0] for line in series.read_text().splitlines()
                 if line.strip() and not line.lstrip().startswith("#")] \
            if series.is_file() else []
        progress.phase("extract", f"{len(names)} Debian patches")
        for name in names:
            run_tool(["patch", "-p1", "-F0", "--batch", "-s", "-i",
                      str(dest / "debian" / "patches" / name)], cwd=dest,
                     what=f"Debian patch {name} of {self.package} {self.version}")

    def materialize(self, dest: Path, progress: Progress) -> None:
        self.fetch(progress)
        self.extract(dest, progress)
