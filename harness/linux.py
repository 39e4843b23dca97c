"""The Linux guest: its recipe (a cached kernel + initramfs) and its boot.

The recipe (``guests/linux/``: ``recipe.toml`` and ``init``) makes a small
guest from Debian packages only, without root: ``apt-get download`` of the
candidate versions, ``dpkg-deb -x`` into a temporary directory, and an
initramfs (cpio newc, gzip) written here in Python, so file owners and
device nodes need no privileges. What goes in:

- busybox (static) as ``/bin/busybox`` and every applet it has;
- dropbear (SSH server) with the shared libraries it needs (``DT_NEEDED``,
  followed through the unpacked packages, never the host's), and
  openssh's ``sftp-server`` where dropbear looks for it (``/usr/lib/sftp-server``);
- the kernel modules named in the recipe and their ``depends=`` closure
  (Debian's 6.1 kernel builds virtio as modules), loaded in dependency order;
- a host key made by the recipe with the package's ``dropbearkey``; its
  public half is kept next to the image and pinned by the SSH client.

The result is cached under ``EBS_HARNESS_CACHE/linux/<key>/`` (``vmlinuz``,
``initrd.img``, ``host_ed25519.pub``, ``manifest.json``), keyed by a hash of
the recipe files and the resolved package versions.

The guest boots from a per-run FAT ESP: the firmware's own UEFI shell as
``BOOTX64.EFI`` runs ``startup.nsh``, which sets the NIC's address and starts
the kernel's EFI stub with its command line; the stub calls
ExitBootServices, the same patched path the probe exercises, after the
firmware really drove the virtio disks (guests/linux/README.md says what
the NIC does, and why not QEMU's ``-kernel``). The per-run SSH key travels on the kernel
command line (``ebs.authkey=TYPE:BASE64``); sshd is reached through a
``hostfwd`` on 127.0.0.1 (:mod:`harness.vm.ssh`).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from filelock import FileLock

from harness import scenario, shared
from harness.build.cache import cache_root, publishing
from harness.build.edk2 import Firmware
from harness.errors import DependencyError, EnvironmentFailure, UsageError
from harness.tools import run_tool
from harness.vm import guest, host, machine, remote, ssh
from harness.vm.config import MachineConfig
from harness.vm.devices import BlockDevice, NetDevice

LOG = logging.getLogger(__name__)

RECIPE_DIR = shared("guests", "linux")
#: Bump when this module changes what it puts in the image.
RECIPE_FORMAT = 1
#: Files of ``guests/linux`` whose content is part of the key.
RECIPE_FILES = ("recipe.toml", "init")

LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib")
GUEST_LIB_DIR = "lib/x86_64-linux-gnu"
HOST_KEY_GUEST_PATH = "etc/dropbear/dropbear_ed25519_host_key"

#: The guest's user-mode network (QEMU's defaults, static in ``init``).
GUEST_ADDRESS = "10.0.2.15"
GATEWAY = "10.0.2.2"

#: Kernel log lines that mean trouble for the devices the firmware handed over.
_DMESG_SUBJECT = re.compile(r"dma|iommu|AMD-Vi|virtio|swiotlb|\bvd[a-z]\b|\beth\d\b|blk_update_request|"
                            r"I/O error|sev\b", re.IGNORECASE)
_DMESG_TROUBLE = re.compile(r"error|fail|timed? ?out|corrupt|\bbad\b|unable|cannot|"
                            r"stall|hung|\bdenied\b|\bfault|PAGE_FAULT", re.IGNORECASE)
_DMESG_ALWAYS = re.compile(r"\bBUG:|\bWARNING: CPU|Oops|Kernel panic|Call Trace")


# ------------------------------------------------------------- recipe


@dataclass(frozen=True)
class Recipe:
    """``guests/linux/recipe.toml``."""

    kernel: str
    packages: tuple[str, ...]
    modules: tuple[str, ...]
    binaries: Mapping[str, str]
    directory: Path

    @classmethod
    def load(cls, directory: Path = RECIPE_DIR) -> Recipe:
        path = directory / "recipe.toml"
        try:
            data = tomllib.loads(path.read_text())
            return cls(kernel=str(data["kernel"]),
                       packages=tuple(str(p) for p in data["packages"]),
                       modules=tuple(str(m) for m in data["modules"]),
                       binaries={str(k): str(v) for k, v in data["binaries"].items()},
                       directory=directory)
        except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
            raise UsageError(f"{path}: not a guest recipe: {exc}") from exc

    def file_digests(self) -> dict[str, str]:
        return {name: hashlib.sha256((self.directory / name).read_bytes()).hexdigest()
                for name in RECIPE_FILES}


def _apt_records(packages: Sequence[str]) -> dict[str, dict[str, str]]:
    """Each package's candidate ``apt-cache show`` stanza (one apt call)."""
    try:
        proc = subprocess.run(["apt-cache", "show", "--no-all-versions", *packages],
                              capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise DependencyError("apt-cache not found: the Linux guest recipe needs Debian's "
                              "apt") from exc
    records = {r.get("Package", ""): r for r in
               (parse_control(stanza) for stanza in proc.stdout.split("\n\n"))}
    missing = [p for p in packages if p not in records]
    if proc.returncode != 0 or missing:
        raise DependencyError(f"apt has no candidate for {', '.join(missing) or packages} "
                              f"(run apt-get update): {proc.stderr.strip()}")
    return records


def parse_control(text: str) -> dict[str, str]:
    """The first stanza of a Debian control text (continuation lines joined)."""
    fields: dict[str, str] = {}
    last = None
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        if line[0] in " \t" and last is not None:
            fields[last] += "\n" + line.strip()
            continue
        name, _, value = line.partition(":")
        last = name.strip()
        fields[last] = value.strip()
    return fields


def kernel_package(record: Mapping[str, str]) -> str:
    """The versioned image package a ``linux-image-amd64`` record depends on."""
    for dep in record.get("Depends", "").split(","):
        name = dep.strip().split(" ", 1)[0]
        if re.fullmatch(r"linux-image-\d[\w.+-]*", name):
            return name
    if re.fullmatch(r"linux-image-\d[\w.+-]*", record.get("Package", "")):
        return record["Package"]
    raise DependencyError(f"{record.get('Package')}: no linux-image-<version> dependency")


def resolve_packages(recipe: Recipe) -> dict[str, str]:
    """Package name to the candidate version apt would download."""
    image = kernel_package(_apt_records([recipe.kernel])[recipe.kernel])
    records = _apt_records([image, *recipe.packages])
    return {package: records[package]["Version"] for package in [image, *recipe.packages]}


def recipe_key(recipe: Recipe, versions: Mapping[str, str]) -> str:
    identity = {"format": RECIPE_FORMAT, "files": recipe.file_digests(),
                "packages": dict(sorted(versions.items()))}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class LinuxImage:
    """A built guest: kernel, initramfs, and the public host key to pin."""

    path: Path
    key: str
    kernel_version: str
    host_key: str   # "ssh-ed25519 AAAA..."

    @property
    def kernel(self) -> Path:
        return self.path / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.path / "initrd.img"

    @classmethod
    def load(cls, path: Path) -> LinuxImage:
        path = Path(path)
        try:
            manifest = json.loads((path / "manifest.json").read_text())
            image = cls(path, manifest["key"], manifest["kernel_version"],
                        (path / "host_ed25519.pub").read_text().strip())
        except (OSError, ValueError, KeyError) as exc:
            raise UsageError(f"{path}: not a Linux guest image: {exc}") from exc
        for needed in (image.kernel, image.initrd):
            if not needed.is_file():
                raise UsageError(f"{path}: no {needed.name}")
        return image


def build_image(recipe: Recipe | None = None, *, cache: Path | None = None,
                rebuild: bool = False) -> LinuxImage:
    """The guest for ``recipe`` from the cache, built first if missing."""
    recipe = recipe or Recipe.load()
    versions = resolve_packages(recipe)
    key = recipe_key(recipe, versions)
    root = (cache or cache_root()) / "linux"
    target = root / key
    (root / "locks").mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / "locks" / f"{key}.lock")):
        if target.is_dir() and not rebuild:
            with contextlib.suppress(UsageError):
                image = LinuxImage.load(target)
                LOG.info("Linux guest %s from the cache", key)
                return image
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"build-{key}-", dir=root) as tmp, \
                publishing(target) as out:
            kernel_version = _build(recipe, versions, Path(tmp), out)
            manifest = {"key": key, "kernel_version": kernel_version, "format": RECIPE_FORMAT,
                        "packages": versions, "recipe": recipe.file_digests(),
                        "modules": (out / "modules.txt").read_text().split()}
            (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        LOG.info("Linux guest %s built in %.1f s", key, time.monotonic() - started)
        return LinuxImage.load(target)


def _build(recipe: Recipe, versions: Mapping[str, str], work: Path, out: Path) -> str:
    debs = work / "debs"
    debs.mkdir()
    LOG.info("downloading %s", ", ".join(f"{p}={v}" for p, v in versions.items()))
    run_tool(["apt-get", "download", "-q", *(f"{p}={v}" for p, v in versions.items())],
             cwd=debs)
    staging = work / "staging"
    for deb in sorted(debs.glob("*.deb")):
        run_tool(["dpkg-deb", "-x", str(deb), str(staging)])
    kernels = sorted((staging / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise EnvironmentFailure(f"expected one vmlinuz in the kernel package, found {kernels}")
    kernel_version = kernels[0].name.removeprefix("vmlinuz-")
    shutil.copyfile(kernels[0], out / "vmlinuz")

    files: dict[str, bytes] = {}   # guest path -> content
    for source, dest in recipe.binaries.items():
        files[dest] = (staging / source).read_bytes()
    for soname, lib in shared_libraries([staging / s for s in recipe.binaries],
                                        staging).items():
        files[f"{GUEST_LIB_DIR}/{soname}"] = lib.read_bytes()
    # the dynamic loader, where binaries look for it
    files["lib64/ld-linux-x86-64.so.2"] = \
        _resolve_in(staging, "lib64/ld-linux-x86-64.so.2").read_bytes()

    module_root = staging / "lib" / "modules" / kernel_version
    order = module_order(recipe.modules, module_index(module_root))
    for name, path in order:
        files[f"lib/modules/{name}.ko"] = path.read_bytes()
    modules_txt = "\n".join(name for name, _ in order) + "\n"
    files["etc/ebs-modules"] = modules_txt.encode()
    (out / "modules.txt").write_text(modules_txt)

    host_key = work / "host_key"
    dropbearkey = staging / "usr" / "bin" / "dropbearkey"
    env = {"PATH": "/usr/bin:/bin",
           "LD_LIBRARY_PATH": str(staging / "usr" / "lib" / "x86_64-linux-gnu")}
    run_tool([str(dropbearkey), "-t", "ed25519", "-f", str(host_key)], env=env)
    public = run_tool([str(dropbearkey), "-y", "-f", str(host_key)], env=env)
    line = next((ln for ln in public.splitlines() if ln.startswith("ssh-ed25519 ")), None)
    if line is None:
        raise EnvironmentFailure(f"dropbearkey -y printed no ssh-ed25519 key: {public!r}")
    (out / "host_ed25519.pub").write_text(" ".join(line.split()[:2]) + "\n")
    files[HOST_KEY_GUEST_PATH] = host_key.read_bytes()

    files["init"] = (recipe.directory / "init").read_bytes()
    files["etc/passwd"] = b"root:x:0:0:root:/root:/bin/sh\n"
    files["etc/shadow"] = b"root:*:19000:0:99999:7:::\n"
    files["etc/group"] = b"root:x:0:\n"
    files["etc/shells"] = b"/bin/sh\n"
    (out / "initrd.img").write_bytes(gzip.compress(initramfs(files), compresslevel=6,
                                                   mtime=0))
    return kernel_version


def _resolve_in(root: Path, relative: str) -> Path:
    """``relative`` in the tree at ``root``, following symlinks inside it
    (absolute link targets are taken relative to ``root``)."""
    path = root / relative
    for _ in range(16):
        if not path.is_symlink():
            if not path.exists():
                raise EnvironmentFailure(f"{relative}: missing in the unpacked packages")
            return path
        target = os.readlink(path)
        path = root / target.lstrip("/") if target.startswith("/") else path.parent / target
    raise EnvironmentFailure(f"{relative}: symlink loop")


def _elf_needed(path: Path) -> list[str]:
    try:
        with open(path, "rb") as handle:
            elf = ELFFile(handle)
            for section in elf.iter_sections():
                if isinstance(section, DynamicSection):
                    return [str(tag.needed) for tag in section.iter_tags()  # type: ignore[attr-defined]
                            if tag.entry.d_tag == "DT_NEEDED"]
    except ELFError as exc:
        raise EnvironmentFailure(f"{path}: not an ELF file: {exc}") from exc
    return []


def shared_libraries(binaries: Sequence[Path], root: Path) -> dict[str, Path]:
    """The ``DT_NEEDED`` closure of ``binaries`` within the tree at ``root``:
    soname to the (symlink-resolved) file. Static binaries need none."""
    found: dict[str, Path] = {}
    todo = [name for binary in binaries for name in _elf_needed(binary)]
    while todo:
        soname = todo.pop()
        if soname in found:
            continue
        for directory in LIB_DIRS:
            candidate = root / directory / soname
            if candidate.exists() or candidate.is_symlink():
                resolved = _resolve_in(root, f"{directory}/{soname}")
                found[soname] = resolved
                todo += _elf_needed(resolved)
                break
        else:
            raise DependencyError(f"shared library {soname} is in none of the recipe's "
                                  "packages: add its package to guests/linux/recipe.toml")
    return dict(sorted(found.items()))


def module_depends(path: Path) -> list[str]:
    """A kernel module's ``depends=`` list from its ``.modinfo`` section."""
    with open(path, "rb") as handle:
        section = ELFFile(handle).get_section_by_name(".modinfo")
        data = b"" if section is None else section.data()
    for entry in data.split(b"\0"):
        if entry.startswith(b"depends="):
            return [name for name in entry[8:].decode().split(",") if name]
    return []


def module_index(module_root: Path) -> dict[str, Path]:
    """Module name (``-`` as ``_``) to its ``.ko`` file."""
    return {path.name.removesuffix(".ko").replace("-", "_"): path
            for path in module_root.rglob("*.ko")}


def module_order(wanted: Sequence[str], index: Mapping[str, Path],
                 depends: Callable[[Path], list[str]] = module_depends,
                 ) -> list[tuple[str, Path]]:
    """``wanted`` and their dependencies (``depends`` of a module file), each
    after what it depends on."""
    order: list[tuple[str, Path]] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise EnvironmentFailure(f"module dependency cycle: {' -> '.join(chain)}")
        if name not in index:
            raise DependencyError(f"kernel module {name} not in the kernel package"
                                  f" (needed by {' -> '.join(chain) or 'the recipe'})")
        state[name] = "visiting"
        for dep in depends(index[name]):
            visit(dep.replace("-", "_"), (*chain, name))
        state[name] = "done"
        order.append((name, index[name]))

    for name in wanted:
        visit(name.replace("-", "_"), ())
    return order


def initramfs(files: Mapping[str, bytes]) -> bytes:
    """A cpio (newc) archive of ``files`` (guest path to bytes), every
    parent directory, and ``/dev/console``; all owned by root. ``init``
    and files under ``bin``, ``sbin``, ``usr/*bin``, ``usr/lib/sftp-server``
    and shared objects are executable."""
    out = io.BytesIO()
    inode = 0

    def entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        nonlocal inode
        inode += 1
        encoded = name.encode() + b"\0"
        fields = [inode, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
                  0, 0, rdev[0], rdev[1], len(encoded), 0]
        out.write(b"070701" + b"".join(b"%08X" % value for value in fields))
        out.write(encoded)
        out.write(b"\0" * (-(110 + len(encoded)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))

    directories = {"dev", "proc", "sys", "run", "tmp", "root"}
    for name in files:
        directories.update(str(p) for p in PurePosixPath(name).parents if str(p) != ".")
    for name in sorted(directories):
        entry(name, stat.S_IFDIR | (0o700 if name == "root" else 0o755))
    entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    for name, content in sorted(files.items()):
        executable = (name == "init" or ".so" in name
                      or re.match(r"(usr/)?s?bin/|usr/lib/sftp-server$", name) is not None)
        entry(name, stat.S_IFREG | (0o755 if executable else 0o644), content)
    entry("TRAILER!!!", 0)
    return out.getvalue()


# --------------------------------------------------------------- boot


@dataclass(frozen=True)
class LinuxBoot:
    """What one Linux boot asks for.

    :param ebs_mode: the IOMMU's teardown scheme (fw_cfg ``ebs-mode``).
    :param emulation: IOMMU emulation mode (default: when SEV is off).
    :param sev: ``off``, ``sev``, ``sev-es`` or ``emulated`` (the harness's QEMU:
        pass its ``caps``).
    :param accel: ``auto``, ``tcg`` or ``kvm``.
    :param memory_mib: guest RAM.
    :param start_sshd: False boots a guest whose init skips dropbear
        (``ebs.nosshd=1``): the negative control of the SSH deadline.
    :param ssh_timeout: seconds from QEMU's start until sshd must answer.
    :param cmdline: extra kernel command line words.
    """

    ebs_mode: str = "callback"
    iommu_emulation: bool | None = None
    sev: str = "off"
    accel: str = "auto"
    memory_mib: int = 512
    start_sshd: bool = True
    ssh_timeout: float = 150.0
    cmdline: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "cmdline", tuple(self.cmdline))
        if self.ssh_timeout <= 0:
            raise UsageError(f"ssh timeout {self.ssh_timeout}: must be positive")

    def scenario(self) -> scenario.Scenario:
        """The firmware side as a probe Scenario (for its fw_cfg knobs)."""
        return scenario.Scenario(ebs_mode=self.ebs_mode, devices=("virtio-blk", "virtio-net"),
                                 iommu_emulation=self.iommu_emulation, accel=self.accel, sev=self.sev,
                                 memory_mib=self.memory_mib)

    def kernel_cmdline(self, client_key: ssh.ClientKey) -> str:
        words = ["console=ttyS0", "panic=-1", "rdinit=/init",
                 f"ebs.authkey={client_key.key_type}:{client_key.public_base64}"]
        if not self.start_sshd:
            words.append("ebs.nosshd=1")
        return " ".join([*words, *self.cmdline])


@dataclass
class LinuxRun:
    """A running Linux guest and its SSH session."""

    vm: machine.QemuMachine
    session: ssh.GuestSsh
    canary: bytes
    canary_image: Path
    accel: str
    ready_seconds: float
    artifacts: Path

    @property
    def debug_log(self) -> Path:
        return self.vm.debugcon_log


def write_canary_disk(path: Path, canary: bytes, size: int = 1 << 20) -> Path:
    """A raw disk image with ``canary`` at offset 0, zero-padded to ``size``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as disk:
        disk.write(canary)
        disk.truncate(size)
    return path


#: OVMF's shell before it runs startup.nsh; any key but ESC goes on at once.
SHELL_COUNTDOWN = r"seconds to skip"   # between ANSI colour codes: keep it plain


def startup_script(cmdline: str) -> str:
    """``startup.nsh``: set the NIC's address (an OS loader's network setup;
    QEMU's device trace shows that it does not start the NIC), then start
    the kernel's EFI stub with ``cmdline`` and its initrd."""
    lines = [f"ifconfig -s eth0 static {GUEST_ADDRESS} 255.255.255.0 {GATEWAY}",
             f"fs0:\\vmlinuz {cmdline} initrd=\\initrd.img"]
    return "\r\n".join(lines) + "\r\n"


def write_esp(path: Path, firmware: Firmware, image: LinuxImage, cmdline: str) -> Path:
    """The boot disk: the firmware's own UEFI shell as the default boot
    file, the kernel, the initramfs and ``startup.nsh``."""
    shell = firmware.module_file("Shell", ".efi")
    if not shell.is_file():
        raise UsageError(f"{firmware.path} has no modules/Shell.efi: the Linux guest boots "
                         "through the firmware's UEFI shell")
    return guest.make_fat_image(path, {guest.BOOT_PATH: shell, "vmlinuz": image.kernel,
                                       "initrd.img": image.initrd,
                                       "startup.nsh": startup_script(cmdline).encode()},
                                size_mib=32)


def machine_config(firmware: Firmware, boot: LinuxBoot, esp: Path, canary_image: Path,
                   ssh_port: int, caps: host.HostCaps, canary: bytes) -> MachineConfig:
    # All three in QEMU's boot order, which OVMF's BDS also reads as the list
    # of devices to connect: its virtio drivers map through the IOMMU before
    # EBS, and their EBS handlers reset the devices.
    devices = (BlockDevice(esp, bootindex=0),
               BlockDevice(canary_image, bootindex=1, readonly=True),
               NetDevice(hostfwd=((ssh_port, 22),), bootindex=2))
    # The harness types into the firmware shell: the serial port takes input.
    # QEMU's device trace comes with it: W1, W2 until the kernel first
    # touches each device.
    return scenario.machine_config(firmware, boot.scenario(), devices, caps, canary,
                                   no_reboot=True, serial_input=True)


@contextlib.contextmanager
def boot_linux(firmware: Firmware, image: LinuxImage, boot: LinuxBoot, artifacts: Path, *,
               caps: host.HostCaps | None = None,
               remote_host: tuple[remote.RemoteHost, ssh.GuestSsh] | None = None,
               ) -> Iterator[LinuxRun]:
    """Boot the Linux guest and yield it once SSH answers; QEMU ends on exit.

    :param remote_host: run QEMU on that host (:mod:`harness.vm.remote`) and
        reach the guest's sshd through the session (``caps`` should then be
        :func:`harness.vm.remote.remote_caps`).
    :raises ConsoleTimeout: sshd did not answer by ``boot.ssh_timeout`` (the
        error quotes the serial and debug log tails); QEMU is gone by then.
    """
    artifacts = Path(artifacts).absolute()
    artifacts.mkdir(parents=True, exist_ok=True)
    if caps is None:
        caps = host.cached_probe() if remote_host is None else \
            remote.remote_caps(remote_host[1])
    canary = scenario.make_canary()
    canary_image = write_canary_disk(artifacts / "canary.img", canary)
    (artifacts / "canary.bin").write_bytes(canary)
    client_key = ssh.ClientKey.generate()
    client_key.write(artifacts / "id_ed25519")
    launcher: Callable[..., machine.QemuMachine] = machine.QemuMachine
    channel = None
    if remote_host is None:
        port = ssh.free_port()
    else:
        # a port that was free there a moment ago
        _, out, _ = remote_host[1].run(
            "for p in $(shuf -i 20000-60999 -n 20); do ss -Htln sport = :$p | grep -q . "
            "|| { echo $p; break; }; done", timeout=30)
        if not out.split():
            raise EnvironmentFailure(f"no free TCP port found on {remote_host[0].url} "
                                     "for the guest's ssh forward")
        port = int(out.split()[0])
        launcher = remote_host[0].launcher(remote_host[1])
        channel = remote_host[0].tunnel(remote_host[1], port)
    esp = write_esp(artifacts / "esp.img", firmware, image, boot.kernel_cmdline(client_key))
    config = machine_config(firmware, boot, esp, canary_image, port, caps, canary)
    LOG.info("Linux guest %s under %s, ssh on 127.0.0.1:%d%s", image.key, config.accel, port,
             "" if remote_host is None else f" of {remote_host[0].url}")
    with launcher(config, artifacts / "vm", name="linux") as vm:
        started = time.monotonic()
        # skip the shell's 5 s countdown
        vm.serial.expect(SHELL_COUNTDOWN, timeout=boot.ssh_timeout)
        vm.serial.send("\r")
        # A dropped connection is made again: the guest's sshd is ours.
        session = ssh.GuestSsh("127.0.0.1", port, host_key=image.host_key, client_key=client_key,
                               channel=channel, reconnect=True)
        try:
            session.connect(deadline=started + boot.ssh_timeout, alive=vm.is_running,
                            tails=vm.tails, command=vm.command)
            ready = time.monotonic() - started
            LOG.info("Linux guest: SSH ready %.1f s after QEMU's start", ready)
            yield LinuxRun(vm, session, canary, canary_image, config.accel, ready, artifacts)
        finally:
            session.close()


def dmesg_problems(text: str) -> list[str]:
    """Kernel log lines about DMA, the IOMMU, virtio or SEV that report an
    error, and any BUG/WARNING/Oops line."""
    found = []
    for line in text.splitlines():
        if _DMESG_ALWAYS.search(line) or (_DMESG_SUBJECT.search(line)
                                          and _DMESG_TROUBLE.search(line)):
            found.append(line.strip())
    return found


SEV_ACTIVE = {
    "sev": "Memory Encryption Features active: AMD SEV",
    "emulated": "Memory Encryption Features active: AMD SEV",
    "emulated-es": "Memory Encryption Features active: AMD SEV SEV-ES",
    "sev-es": "Memory Encryption Features active: AMD SEV SEV-ES",
    "snp": "Memory Encryption Features active: AMD SEV SEV-ES SEV-SNP",
    "emulated-snp": "Memory Encryption Features active: AMD SEV SEV-ES SEV-SNP",
}
