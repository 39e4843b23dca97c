"""The Linux guest recipe: apt records, module order, libraries, cpio, dmesg."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from harness import linux
from harness.build import edk2
from harness.errors import DependencyError, EnvironmentFailure, UsageError
from harness.vm import ssh

DATA = Path(__file__).resolve().parents[1] / "data" / "linux"


def read_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """A cpio newc archive: name -> (mode, data, (rdevmajor, rdevminor))."""
    entries: dict[str, tuple[int, bytes, tuple[int, int]]] = {}
    offset = 0
    while True:
        assert data[offset:offset + 6] == b"070701", offset
        fields = [int(data[offset + 6 + 8 * i:offset + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name_start = offset + 110
        name = data[name_start:name_start + namesize - 1].decode()
        offset = name_start + namesize
        offset += -offset % 4
        body = data[offset:offset + size]
        offset += size
        offset += -offset % 4
        if name == "TRAILER!!!":
            assert offset == len(data)
            return entries
        entries[name] = (mode, body, (rmaj, rmin))


def test_parse_control_and_kernel_package() -> None:
    record = linux.parse_control((DATA / "apt-cache-linux-image-amd64.txt").read_text())
    assert record["Package"] == "linux-image-amd64"
    assert linux.kernel_package(record).startswith("linux-image-6.1.0-")
    assert linux.kernel_package({"Package": "linux-image-6.1.0-9-amd64"}) == \
        "linux-image-6.1.0-9-amd64"
    with pytest.raises(DependencyError, match="no linux-image"):
        linux.kernel_package({"Package": "busybox-static", "Depends": "libc6 (>= 2.34)"})


def test_parse_control_joins_continuations_and_stops_at_the_first_stanza() -> None:
    text = "Package: a\nDescription: one\n two\n\nPackage: b\n"
    assert linux.parse_control(text) == {"Package": "a", "Description": "one\ntwo"}


def test_recipe_in_the_tree_loads_and_keys_change_with_inputs(tmp_path: Path) -> None:
    recipe = linux.Recipe.load()
    assert "virtio_net" in recipe.modules and "dropbear-bin" in recipe.packages
    versions = {"linux-image-6.1.0-56-amd64": "6.1.192-2", "busybox-static": "1"}
    key = linux.recipe_key(recipe, versions)
    assert key == linux.recipe_key(recipe, dict(reversed(versions.items())))
    assert key != linux.recipe_key(recipe, {**versions, "busybox-static": "2"})
    copy = tmp_path / "recipe"
    shutil.copytree(linux.RECIPE_DIR, copy)
    (copy / "init").write_text((copy / "init").read_text() + "# changed\n")
    assert linux.recipe_key(linux.Recipe.load(copy), versions) != key


def test_bad_recipe_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "recipe.toml").write_text("kernel = 1\n")
    with pytest.raises(UsageError, match="not a guest recipe"):
        linux.Recipe.load(tmp_path)


def test_module_order_puts_dependencies_first() -> None:
    deps = {"virtio_net": ["net_failover", "virtio", "virtio_ring"],
            "net_failover": ["failover"], "failover": [], "virtio": [], "virtio_ring": [],
            "virtio_blk": ["virtio", "virtio_ring"]}
    index = {name: Path(f"/m/{name}.ko") for name in deps}
    order = [name for name, _ in linux.module_order(
        ["virtio_blk", "virtio_net"], index, lambda p: deps[p.stem])]
    assert sorted(order) == sorted(deps)   # each once
    for module, needs in deps.items():
        assert all(order.index(n) < order.index(module) for n in needs)
    with pytest.raises(DependencyError, match="nope not in the kernel package"):
        linux.module_order(["nope"], index, lambda p: deps[p.stem])
    cyclic = {"a": ["b"], "b": ["a"]}
    with pytest.raises(EnvironmentFailure, match="cycle"):
        linux.module_order(["a"], {n: Path(f"/m/{n}.ko") for n in cyclic},
                           lambda p: cyclic[p.stem])


@pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("objcopy") is None,
                    reason="needs gcc and objcopy (build-essential, from scripts/setup-host)")
def test_module_depends_reads_modinfo(tmp_path: Path) -> None:
    (tmp_path / "m.c").write_text("int x;\n")
    (tmp_path / "modinfo").write_bytes(b"license=GPL\0depends=virtio,virtio_ring\0vermagic=6\0")
    subprocess.run(["gcc", "-c", "-o", str(tmp_path / "m.ko"), str(tmp_path / "m.c")],
                   check=True)
    subprocess.run(["objcopy", "--add-section", f".modinfo={tmp_path / 'modinfo'}",
                    str(tmp_path / "m.ko")], check=True)
    assert linux.module_depends(tmp_path / "m.ko") == ["virtio", "virtio_ring"]
    (tmp_path / "modinfo").write_bytes(b"license=GPL\0depends=\0")
    subprocess.run(["objcopy", "--update-section", f".modinfo={tmp_path / 'modinfo'}",
                    str(tmp_path / "m.ko")], check=True)
    assert linux.module_depends(tmp_path / "m.ko") == []


def test_shared_libraries_follow_needed_within_the_tree(tmp_path: Path) -> None:
    # A real dynamic binary and libc from this host, in a package-like tree.
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    shutil.copy("/usr/bin/true", root / "usr/bin/true")
    with pytest.raises(DependencyError, match="libc.so.6 is in none"):
        linux.shared_libraries([root / "usr/bin/true"], root)
    libdir = root / "lib/x86_64-linux-gnu"
    libdir.mkdir(parents=True)
    shutil.copy(Path("/lib/x86_64-linux-gnu/libc.so.6").resolve(), libdir / "libc.so.6.real")
    (libdir / "libc.so.6").symlink_to("libc.so.6.real")
    shutil.copy(Path("/lib64/ld-linux-x86-64.so.2").resolve(), libdir / "ld-linux-x86-64.so.2")
    (root / "lib64").mkdir()
    # an absolute link, as libc6 ships it: resolved inside the tree, not on the host
    (root / "lib64/ld-linux-x86-64.so.2").symlink_to("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    found = linux.shared_libraries([root / "usr/bin/true"], root)
    assert found["libc.so.6"] == libdir / "libc.so.6.real"
    assert set(found) == {"libc.so.6", "ld-linux-x86-64.so.2"}
    assert all(path.is_relative_to(root) for path in found.values())


def test_gnu_cpio_reads_the_initramfs_as_we_wrote_it(tmp_path: Path) -> None:
    """Not only our own reader: GNU cpio lists the archive (names, modes,
    the console's device numbers) and extracts the same bytes."""
    files = {"init": b"#!/bin/busybox sh\n", "bin/busybox": b"\x7fELF" + bytes(5),
             "etc/passwd": b"root:x:0:0::/root:/bin/sh\n"}
    archive = tmp_path / "initramfs.cpio"
    archive.write_bytes(linux.initramfs(files))
    listing = subprocess.run(["cpio", "-tv", "--quiet", "-F", str(archive)], capture_output=True,
                             text=True, check=True).stdout.splitlines()
    by_name = {line.split()[-1]: line for line in listing}
    assert set(files) | {"bin", "etc", "dev", "dev/console"} <= set(by_name)
    assert by_name["init"].startswith("-rwxr-xr-x") and by_name["etc/passwd"].startswith("-rw-")
    assert by_name["dev/console"].startswith("crw") and " 5,   1 " in by_name["dev/console"]
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames", "-F", str(archive),
                    "init", "bin/busybox", "etc/passwd"], cwd=out, check=True)
    for name, data in files.items():
        assert (out / name).read_bytes() == data, name


def test_initramfs_is_newc_with_parents_console_and_modes() -> None:
    archive = linux.initramfs({"init": b"#!/bin/busybox sh\n", "bin/busybox": b"\x7fELF",
                               "lib/x86_64-linux-gnu/libc.so.6": b"lib",
                               "etc/passwd": b"root:x:0:0::/root:/bin/sh\n",
                               "usr/lib/sftp-server": b"sftp"})
    entries = read_newc(archive)
    for directory in ("bin", "etc", "lib", "lib/x86_64-linux-gnu", "usr", "usr/lib", "dev",
                      "proc", "sys", "root"):
        assert stat.S_ISDIR(entries[directory][0]), directory
    # every parent comes before its children (the kernel unpacks in order)
    names = list(entries)
    assert names.index("lib") < names.index("lib/x86_64-linux-gnu") < \
        names.index("lib/x86_64-linux-gnu/libc.so.6")
    mode, _, rdev = entries["dev/console"]
    assert stat.S_ISCHR(mode) and rdev == (5, 1)
    assert entries["init"][1] == b"#!/bin/busybox sh\n"
    for name, executable in (("init", True), ("bin/busybox", True), ("usr/lib/sftp-server", True),
                             ("lib/x86_64-linux-gnu/libc.so.6", True), ("etc/passwd", False)):
        assert bool(entries[name][0] & 0o111) == executable, name
    assert stat.S_IMODE(entries["root"][0]) == 0o700


def test_dmesg_of_a_real_boot_is_clean_and_trouble_is_found() -> None:
    clean = (DATA / "serial-callback.log").read_text()
    assert "virtio_blk virtio0" in clean
    assert linux.dmesg_problems(clean) == []
    trouble = [
        "[    3.1] blk_update_request: I/O error, dev vda, sector 0 op 0x0:(READ)",
        "[    3.2] virtio_net virtio1 eth0: failed to enable queue",
        "[    3.3] AMD-Vi: Event logged [IO_PAGE_FAULT domain=0x0000 address=0x1000]",
        "[    3.4] DMAR: DRHD: handling fault status reg 2",
        "[    3.5] WARNING: CPU: 0 PID: 1 at drivers/virtio/virtio_ring.c:2100",
        "[    3.6] swiotlb buffer is full (sz: 4096 bytes)... cannot allocate",
    ]
    found = linux.dmesg_problems(clean + "\n".join(trouble) + "\n")
    assert [line.split("] ", 1)[1] for line in found] == \
        [line.split("] ", 1)[1] for line in trouble]


def test_kernel_cmdline_carries_the_run_key_and_knobs() -> None:
    key = ssh.ClientKey.generate()
    line = linux.LinuxBoot().kernel_cmdline(key)
    assert "console=ttyS0" in line and "panic=-1" in line
    assert f"ebs.authkey=ssh-ed25519:{key.public_base64}" in line.split()
    assert "ebs.nosshd=1" not in line
    assert "ebs.nosshd=1" in linux.LinuxBoot(start_sshd=False).kernel_cmdline(key).split()
    assert linux.LinuxBoot(cmdline=("quiet",)).kernel_cmdline(key).endswith(" quiet")


def test_linux_boot_fw_cfg_is_the_scenarios() -> None:
    knobs = linux.LinuxBoot(ebs_mode="legacy").scenario().fw_cfg(b"EBS-CANARY-x")
    assert knobs == {"opt/org.ebs-harness/ebs-mode": "legacy",
                     "opt/org.ebs-harness/emulation": "1"}
    with pytest.raises(UsageError):
        linux.LinuxBoot(ebs_mode="bogus").scenario()
    with pytest.raises(UsageError):
        linux.LinuxBoot(ssh_timeout=0)


def test_canary_disk(tmp_path: Path) -> None:
    disk = linux.write_canary_disk(tmp_path / "c.img", b"EBS-CANARY-abc")
    data = disk.read_bytes()
    assert len(data) == 1 << 20 and data.startswith(b"EBS-CANARY-abc")
    assert data[14:] == bytes(len(data) - 14)


def test_image_load_refuses_incomplete_dirs(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not a Linux guest image"):
        linux.LinuxImage.load(tmp_path)
    (tmp_path / "manifest.json").write_text('{"key": "k", "kernel_version": "6.1"}')
    (tmp_path / "host_ed25519.pub").write_text("ssh-ed25519 AAAA\n")
    with pytest.raises(UsageError, match="no vmlinuz"):
        linux.LinuxImage.load(tmp_path)


def test_startup_script_configures_the_nic_then_starts_the_stub() -> None:
    script = linux.startup_script("console=ttyS0 ebs.authkey=ssh-ed25519:AAAA")
    lines = script.split("\r\n")
    assert lines[0] == "ifconfig -s eth0 static 10.0.2.15 255.255.255.0 10.0.2.2"
    assert lines[1] == r"fs0:\vmlinuz console=ttyS0 ebs.authkey=ssh-ed25519:AAAA initrd=\initrd.img"
    assert lines[2:] == [""]


@pytest.mark.skipif(shutil.which("mcopy") is None, reason="needs mtools (scripts/setup-host)")
def test_esp_holds_the_shell_kernel_initrd_and_script(tmp_path: Path) -> None:
    firmware_dir = tmp_path / "fw"
    (firmware_dir / "modules").mkdir(parents=True)
    image = linux.LinuxImage(tmp_path / "img", "k", "6.1.0-56-amd64", "ssh-ed25519 AAAA")
    image.path.mkdir()
    image.kernel.write_bytes(b"MZ kernel")
    image.initrd.write_bytes(b"\x1f\x8b initrd")
    firmware = edk2.Firmware(firmware_dir, "key")
    with pytest.raises(UsageError, match="Shell.efi"):
        linux.write_esp(tmp_path / "esp.img", firmware, image, "console=ttyS0")
    (firmware_dir / "modules" / "Shell.efi").write_bytes(b"MZ shell")
    esp = linux.write_esp(tmp_path / "esp.img", firmware, image, "console=ttyS0")
    listing = subprocess.run(["mdir", "-i", str(esp), "-/", "-b", "::/"], capture_output=True,
                             text=True, check=True, env={"MTOOLS_SKIP_CHECK": "1"}).stdout
    assert {"::/EFI/BOOT/BOOTX64.EFI", "::/vmlinuz", "::/initrd.img", "::/startup.nsh"} <= \
        {line.strip() for line in listing.splitlines()}
    script = subprocess.run(["mtype", "-i", str(esp), "::/startup.nsh"], capture_output=True,
                            check=True, env={"MTOOLS_SKIP_CHECK": "1"}).stdout.decode()
    assert "console=ttyS0" in script
