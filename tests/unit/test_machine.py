"""MachineConfig validation and the QEMU argv (TCG, KVM, SEV, SEV-ES)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest

from harness.errors import LaunchError, UsageError
from harness.vm import host
from harness.vm.config import MachineConfig, RuntimePaths, build_argv, reproduce_script
from harness.vm.devices import (
    E1000E_ROM,
    STORAGE_KINDS,
    BlockDevice,
    NetDevice,
    RngDevice,
    ScsiController,
    parse_devices,
)
from harness.vm.machine import QemuMachine
from harness.vm.sev import (
    POLICY_ES,
    POLICY_NODBG,
    POLICY_NOKS,
    SEV_STATE_PAUSED,
    SEV_STATE_RUNNING,
    SevConfig,
    sev_es_termination,
    sev_info_problem,
)

QMP_DATA = Path(__file__).resolve().parents[1] / "data" / "qmp"

PATHS = RuntimePaths(qmp_socket=Path("/run/x/qmp.sock"),
                     serial_socket=Path("/run/x/serial.sock"),
                     serial_log=Path("/art/serial.log"),
                     debugcon_log=Path("/art/debugcon.log"),
                     vars_copy=Path("/art/OVMF_VARS.fd"))

ALL_DEVICES = (BlockDevice(Path("/img/boot.img"), bootindex=0), NetDevice(),
               ScsiController(), RngDevice())


def reply(name: str) -> dict[str, object]:
    data: dict[str, object] = json.loads((QMP_DATA / name).read_text())
    return data


def config(**kwargs: object) -> MachineConfig:
    base: dict[str, object] = {"code": Path("/fw/OVMF_CODE.fd"),
                               "vars_template": Path("/fw/OVMF_VARS.fd")}
    base.update(kwargs)
    return MachineConfig(**base)  # type: ignore[arg-type]


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == option]


def sev_from_caps(mode: str, reply_name: str, policy: int | None = None) -> SevConfig:
    caps = host.parse_sev_capabilities(reply(reply_name))
    return SevConfig(mode=mode, cbitpos=caps.cbitpos,
                     reduced_phys_bits=caps.reduced_phys_bits, policy=policy)


# ---------------------------------------------------------------- TCG


def test_tcg_argv_basics() -> None:
    argv = build_argv(config(devices=ALL_DEVICES), PATHS)
    assert argv[0] == "qemu-system-x86_64"
    assert option_values(argv, "-accel") == ["tcg"]
    assert option_values(argv, "-machine") == ["q35"]
    assert "-cpu" not in argv
    assert option_values(argv, "-m") == ["256"]
    assert argv[-1] == "-S"
    drives = option_values(argv, "-drive")
    assert "if=pflash,format=raw,unit=0,readonly=on,file=/fw/OVMF_CODE.fd" in drives
    # the VM runs on its copy of VARS, never on the template
    assert "if=pflash,format=raw,unit=1,file=/art/OVMF_VARS.fd" in drives
    assert not any("/fw/OVMF_VARS.fd" in arg for arg in argv)
    assert ("socket,id=qmp0,path=/run/x/qmp.sock,server=on,wait=off"
            in option_values(argv, "-chardev"))
    assert option_values(argv, "-mon") == ["chardev=qmp0,mode=control"]
    assert option_values(argv, "-serial") == ["chardev:serial0"]
    assert option_values(argv, "-debugcon") == ["file:/art/debugcon.log"]
    assert "isa-debugcon.iobase=0x402" in option_values(argv, "-global")
    assert not any("sev-guest" in arg or "iommu_platform" in arg for arg in argv)


def test_serial_without_input_is_a_plain_file() -> None:
    with_input = option_values(build_argv(config(), PATHS), "-chardev")
    assert any(c.startswith("socket,id=serial0,path=/run/x/serial.sock") and
               "logfile=/art/serial.log" in c for c in with_input)
    without = option_values(build_argv(config(serial_input=False), PATHS), "-chardev")
    assert "file,id=serial0,path=/art/serial.log" in without
    assert not any("serial.sock" in c or "logfile=" in c for c in without)


def test_devices_argv() -> None:
    argv = build_argv(config(devices=ALL_DEVICES), PATHS)
    devices = option_values(argv, "-device")
    assert "virtio-blk-pci,drive=disk0,id=blk0,bootindex=0" in devices
    assert "if=none,id=disk0,format=raw,file=/img/boot.img" in option_values(argv, "-drive")
    assert option_values(argv, "-netdev") == ["user,id=net1,restrict=on"]
    assert "virtio-net-pci,netdev=net1,id=nic1,romfile=" in devices
    assert "virtio-scsi-pci,id=scsi2" in devices
    assert "virtio-rng-pci,rng=rng3,id=vrng3" in devices
    assert "rng-random,id=rng3,filename=/dev/urandom" in option_values(argv, "-object")


def test_hostfwd_on_restricted_user_net() -> None:
    argv = build_argv(config(devices=(NetDevice(hostfwd=((2222, 22), (8080, 80))),)), PATHS)
    assert option_values(argv, "-netdev") == [
        "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=tcp:127.0.0.1:8080-:80"]


def test_kernel_initrd_append() -> None:
    argv = build_argv(config(kernel=Path("/g/vmlinuz"), initrd=Path("/g/initrd.img"),
                             append="console=ttyS0 ebs.authkey=ssh-ed25519:AAAA"), PATHS)
    assert option_values(argv, "-kernel") == ["/g/vmlinuz"]
    assert option_values(argv, "-initrd") == ["/g/initrd.img"]
    # one argv element: QEMU gets the command line whole, spaces and all
    assert option_values(argv, "-append") == ["console=ttyS0 ebs.authkey=ssh-ed25519:AAAA"]
    assert "-kernel" not in build_argv(config(), PATHS)


def test_kernel_paths_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    resolved = config(kernel=Path("vmlinuz"), initrd=Path("initrd.img")).resolved()
    assert resolved.kernel == tmp_path / "vmlinuz"
    assert resolved.initrd == tmp_path / "initrd.img"


def test_fw_cfg_and_comma_escaping() -> None:
    argv = build_argv(config(
        code=Path("/odd,dir/OVMF_CODE.fd"),
        fw_cfg={"opt/org.ebs-harness/ebs-mode": "legacy",
                "opt/org.ebs-harness/requeue-depth": "2"}), PATHS)
    assert option_values(argv, "-fw_cfg") == [
        "name=opt/org.ebs-harness/ebs-mode,string=legacy",
        "name=opt/org.ebs-harness/requeue-depth,string=2"]
    assert any(arg.endswith("file=/odd,,dir/OVMF_CODE.fd") for arg in argv)


def test_not_paused_and_no_debugcon() -> None:
    argv = build_argv(config(debugcon=False), PATHS, paused=False)
    assert "-S" not in argv
    assert "-debugcon" not in argv


# ---------------------------------------------------------------- KVM


def test_kvm_argv() -> None:
    argv = build_argv(config(accel="kvm", qemu="/opt/qemu/bin/qemu-system-x86_64"), PATHS)
    assert argv[0] == "/opt/qemu/bin/qemu-system-x86_64"
    assert option_values(argv, "-accel") == ["kvm"]
    assert "-cpu" not in argv  # QEMU's default model: no host-MSR surprises
    assert option_values(argv, "-machine") == ["q35"]


# ---------------------------------------------------------------- SEV


def test_sev_argv_from_query_sev_capabilities() -> None:
    sev = sev_from_caps("sev", "query-sev-capabilities.json")
    argv = build_argv(config(accel="kvm", sev=sev, devices=ALL_DEVICES), PATHS)
    assert option_values(argv, "-machine") == ["q35,confidential-guest-support=sev0"]
    assert ("sev-guest,id=sev0,cbitpos=47,reduced-phys-bits=5,policy=0x3"
            in option_values(argv, "-object"))
    assert option_values(argv, "-cpu") == ["host"]
    virtio = [d for d in option_values(argv, "-device") if d.startswith("virtio-")]
    assert len(virtio) == 4
    assert all(d.endswith(",disable-legacy=on,iommu_platform=on") for d in virtio)


def test_sev_es_argv_policy_has_es_bit() -> None:
    sev = sev_from_caps("sev-es", "query-sev-capabilities-milan.json")
    assert sev.effective_policy == POLICY_NODBG | POLICY_NOKS | POLICY_ES == 0x7
    argv = build_argv(config(accel="kvm", sev=sev), PATHS)
    assert ("sev-guest,id=sev0,cbitpos=51,reduced-phys-bits=1,policy=0x7"
            in option_values(argv, "-object"))


def test_sev_policy_bits() -> None:
    assert SevConfig("sev", 47, 1).effective_policy == 0x3
    assert SevConfig("sev", 47, 1).effective_policy & POLICY_ES == 0
    assert SevConfig("sev", 47, 1, policy=0x1).effective_policy == 0x1
    assert SevConfig("sev-es", 47, 1, policy=0x5).effective_policy == 0x5


@pytest.mark.parametrize(("mode", "policy"), [("sev", 0x7), ("sev-es", 0x3)])
def test_sev_policy_must_agree_with_mode(mode: str, policy: int) -> None:
    with pytest.raises(ValueError, match="ES bit"):
        SevConfig(mode, 47, 1, policy=policy)


def test_sev_needs_kvm_and_emulated_sev_tcg() -> None:
    with pytest.raises(ValueError, match="SEV mode sev needs accel kvm"):
        config(accel="tcg", sev=SevConfig("sev", 47, 1))
    with pytest.raises(ValueError, match="SEV mode emulated needs accel tcg"):
        config(accel="kvm", sev=SevConfig("emulated", 47, 1))


def test_emulated_sev_argv() -> None:
    argv = build_argv(config(accel="tcg", sev=SevConfig("emulated", 47, 1),
                             devices=(RngDevice(),)), PATHS)
    assert "q35,confidential-guest-support=sev0" in argv
    assert "sev-emulated,id=sev0,cbitpos=47,reduced-phys-bits=1,policy=0x3" in argv
    assert argv[argv.index("-cpu") + 1] == "qemu64,+rdrand", "TCG's CPU with RDRAND, not host"
    assert any("disable-legacy=on,iommu_platform=on" in arg for arg in argv)


def test_emulated_sev_is_plain_sev_and_reduces_bits() -> None:
    with pytest.raises(ValueError, match="ES bit .* must be clear for emulated"):
        SevConfig("emulated", 47, 1, policy=0x7)
    with pytest.raises(ValueError, match="reduced-phys-bits 0: not in 1..63"):
        SevConfig("sev", 47, 0)


def test_emulated_sev_es_argv_and_its_limits() -> None:
    argv = build_argv(config(accel="tcg", sev=SevConfig("emulated-es", 47, 1)), PATHS)
    assert "sev-emulated,id=sev0,cbitpos=47,reduced-phys-bits=1,policy=0x7" in argv
    assert argv[argv.index("-smp") + 1] == "1"
    with pytest.raises(ValueError, match="smp 2: SEV mode emulated-es runs at most 1 vCPU"):
        config(accel="tcg", sev=SevConfig("emulated-es", 47, 1), smp=2)
    with pytest.raises(ValueError, match="ES bit .* must be set for emulated-es"):
        SevConfig("emulated-es", 47, 1, policy=0x3)
    mismatched = SevConfig("emulated-es", 47, 1, vc_mismatch="cpuid")
    assert "sev-emulated,id=sev0,cbitpos=47,reduced-phys-bits=1,policy=0x7,x-vc-mismatch=cpuid" \
        in build_argv(config(accel="tcg", sev=mismatched), PATHS)
    with pytest.raises(ValueError, match="a switch of the emulated SEV-ES, not of emulated"):
        SevConfig("emulated", 47, 1, vc_mismatch="ioio")
    with pytest.raises(ValueError, match="vc_mismatch 'msr': one of ioio, cpuid"):
        SevConfig("emulated-es", 47, 1, vc_mismatch="msr")


def test_emulated_snp_argv_and_its_limits() -> None:
    """sev-emulated's switch with the u64 policy, the firmware as one -bios
    image, no memfd backend (that is KVM's guest_memfd); one vCPU."""
    argv = build_argv(config(accel="tcg", sev=SevConfig("emulated-snp", 47, 1)), PATHS)
    assert "sev-emulated,id=sev0,cbitpos=47,reduced-phys-bits=1,snp=on,snp-policy=0x30000" \
        in argv
    assert argv[argv.index("-bios") + 1] == str(config().code)
    assert not any(a.startswith("memory-backend") or "memory-backend=" in a for a in argv)
    assert "if=pflash" not in " ".join(argv)
    real = build_argv(config(accel="kvm", sev=SevConfig("snp", 51, 1)), PATHS)   # the control
    assert "q35,confidential-guest-support=sev0,memory-backend=ram0" in real
    with pytest.raises(ValueError, match="smp 2: SEV mode emulated-snp runs at most 1 vCPU"):
        config(accel="tcg", sev=SevConfig("emulated-snp", 47, 1), smp=2)
    with pytest.raises(ValueError, match="SNP policy 0x0: a u64 with bit 17 set"):
        SevConfig("emulated-snp", 47, 1, policy=0)


def test_query_sev_of_an_emulated_snp_guest() -> None:
    """Recorded from the harness's QEMU: type sev-snp, its u64 policy, emulated;
    a real SNP guest is not one (the control), nor is another policy."""
    info = json.loads((QMP_DATA / "query-sev-emulated-snp-paused.json").read_text())["return"]
    assert sev_info_problem(info, 0x30000, emulated=True, snp=True) is None
    assert sev_info_problem(info, 0x30000, snp=True) == \
        "query-sev says the SEV is emulated (sev-emulated), not real"
    assert sev_info_problem(info, 0x30001, emulated=True, snp=True) == \
        "query-sev snp-policy 0x30000, expected 0x30001"
    assert sev_info_problem(info, 0x30000, emulated=True) == \
        "query-sev policy None, expected 0x30000"


def test_sev_es_termination_from_stderr() -> None:
    """The emulated hypervisor's line (as QEMU words it) becomes the reason."""
    stderr = ("qemu-system-x86_64: warning: TCG doesn't support requested feature\n"
              "qemu-system-x86_64: sev-es: the guest asked for termination: reason set 1, "
              "code 0x01; the guest is terminated\n")
    assert sev_es_termination(stderr) == ("SEV-ES guest terminated: the guest asked for "
                                          "termination: reason set 1, code 0x01")
    assert sev_es_termination("qemu-system-x86_64: terminating on signal 15\n") is None


def test_iommu_platform_explicit_without_sev() -> None:
    argv = build_argv(config(iommu_platform=True, devices=(RngDevice(),)), PATHS)
    assert option_values(argv, "-device") == [
        "virtio-rng-pci,rng=rng0,id=vrng0,disable-legacy=on,iommu_platform=on"]
    assert "-object" in argv and not any("sev-guest" in a for a in argv)


@pytest.mark.parametrize("name", ["query-sev-sev.json"])
def test_query_sev_accepted(name: str) -> None:
    info = reply(name)["return"]
    assert isinstance(info, dict)
    assert sev_info_problem(info, 0x3) is None


def test_query_sev_es_accepted() -> None:
    info = reply("query-sev-sev-es.json")["return"]
    assert isinstance(info, dict)
    assert sev_info_problem(info, 0x7) is None


def test_query_sev_disabled_refused() -> None:
    info = reply("query-sev-disabled.json")["return"]
    assert isinstance(info, dict)
    assert sev_info_problem(info, 0x3) == "query-sev says enabled=false"


def test_query_sev_wrong_policy_refused() -> None:
    info = reply("query-sev-doc-example.json")["return"]  # enabled, policy 0
    assert isinstance(info, dict)
    assert sev_info_problem(info, 0x7) == "query-sev policy 0x0, expected 0x7"


# ------------------------------------------------------- validation


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"accel": "hvf"}, "accel"),
    ({"memory_mib": 8}, "memory"),
    ({"fw_cfg": {"etc/ebs-mode": "x"}}, "fw_cfg name"),
    ({"fw_cfg": {"opt/" + "x" * 60: "x"}}, "fw_cfg name"),
    ({"devices": (BlockDevice(Path("a"), bootindex=0),
                  BlockDevice(Path("b"), bootindex=0))}, "duplicate bootindex"),
    ({"qemu": ""}, "no QEMU"),
    ({"initrd": Path("initrd.img")}, "need a kernel"),
    ({"append": "console=ttyS0"}, "need a kernel"),
])
def test_config_rejects(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config(**kwargs)


def test_sev_config_rejects_bad_cbitpos() -> None:
    with pytest.raises(ValueError, match="cbitpos"):
        SevConfig("sev", 7, 1)
    with pytest.raises(ValueError, match="mode"):
        SevConfig("sev-snp", 51, 1)
    with pytest.raises(ValueError, match="mode"):
        SevConfig("off", 51, 1)


def test_device_rejects() -> None:
    with pytest.raises(ValueError, match="MAC"):
        NetDevice(mac="nope")
    with pytest.raises(ValueError, match="format"):
        BlockDevice(Path("x"), format="vmdk")
    with pytest.raises(ValueError, match="hostfwd"):
        NetDevice(hostfwd=((0, 22),))
    with pytest.raises(ValueError, match="hostfwd"):
        NetDevice(hostfwd=((2222,),))  # type: ignore[arg-type]


def test_config_is_frozen() -> None:
    cfg = config()
    with pytest.raises(AttributeError):
        cfg.accel = "kvm"  # type: ignore[misc]


# ------------------------------------------------------- reproduce.sh


def test_reproduce_script(tmp_path: Path) -> None:
    cfg = config(devices=(BlockDevice(Path("/img/boot.img"), bootindex=0),)).resolved()
    script = reproduce_script(cfg, Path("/fw/OVMF_VARS.fd"))
    path = tmp_path / "reproduce.sh"
    path.write_text(script)
    assert subprocess.run(["sh", "-n", str(path)], check=False).returncode == 0
    assert "cp /fw/OVMF_VARS.fd repro/OVMF_VARS.fd" in script
    assert "path=repro/qmp.sock,server=on,wait=off" in script
    assert "stdio,id=serial0" in script
    assert "file=repro/OVMF_VARS.fd" in script
    assert "-S" not in script.split()
    # the script is the same QEMU: everything but the run-time paths agrees
    argv = build_argv(cfg, PATHS)
    for option in ("-machine", "-accel", "-m", "-device"):
        for value in option_values(argv, option):
            assert value in script


# ------------------------------------------------------------ --devices


def test_parse_devices_in_order() -> None:
    devices = parse_devices("virtio-net, virtio-blk,virtio-rng,virtio-scsi", Path("/b.img"))
    assert devices == (NetDevice(), BlockDevice(Path("/b.img"), bootindex=0), RngDevice(),
                       ScsiController())


@pytest.mark.parametrize(("names", "message"), [
    ("virtio-vsock", "unknown device"),
    ("nvme", "needs a disk image"),
    ("virtio-rng,virtio-rng", "twice"),
    ("virtio-blk", "needs a boot image"),
])
def test_parse_devices_rejects(names: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_devices(names, None)


@pytest.mark.parametrize("name", ["query-sev-emulated-paused.json",
                                  "query-sev-emulated-running.json"])
def test_query_sev_of_an_emulated_guest(name: str) -> None:
    """Recorded from the harness's QEMU: accepted as emulated SEV, refused as
    real SEV; and a real SEV reply (no emulated mark) refused as emulated."""
    info = json.loads((QMP_DATA / name).read_text())["return"]
    assert sev_info_problem(info, 0x3, emulated=True) is None
    assert sev_info_problem(info, 0x3) == ("query-sev says the SEV is emulated "
                                           "(sev-emulated), not real")
    real = json.loads((QMP_DATA / "query-sev-sev.json").read_text())["return"]
    assert sev_info_problem(real, 0x3, emulated=True) == "query-sev does not say emulated=true"


def test_query_sev_of_an_emulated_sev_es_guest() -> None:
    """Recorded from the harness's QEMU: the ES policy, emulated; the plain
    emulated SEV's policy is not it (the control)."""
    info = json.loads((QMP_DATA / "query-sev-emulated-es-paused.json").read_text())["return"]
    assert sev_info_problem(info, 0x7, emulated=True, state=SEV_STATE_PAUSED) is None
    assert sev_info_problem(info, 0x3, emulated=True) == "query-sev policy 0x7, expected 0x3"


def test_query_sev_state_is_checked_before_and_after_cont() -> None:
    """Recorded from the harness's QEMU: launch-secret while paused after
    machine creation, running after ``cont``; the other way round is refused."""
    paused = json.loads((QMP_DATA / "query-sev-emulated-paused.json").read_text())["return"]
    running = json.loads((QMP_DATA / "query-sev-emulated-running.json").read_text())["return"]
    assert sev_info_problem(paused, 0x3, emulated=True, state=SEV_STATE_PAUSED) is None
    assert sev_info_problem(running, 0x3, emulated=True, state=SEV_STATE_RUNNING) is None
    assert sev_info_problem(paused, 0x3, emulated=True, state=SEV_STATE_RUNNING) == \
        "query-sev state 'launch-secret', expected 'running'"
    real = json.loads((QMP_DATA / "query-sev-sev.json").read_text())["return"]
    assert sev_info_problem(real, 0x3, state=SEV_STATE_PAUSED) is None


def test_snp_argv_uses_a_memfd_backend_and_bios() -> None:
    """KVM's SNP VM type has no read-only memslots (no pflash) and takes its
    private memory from guest_memfd beside a shared memfd backend."""
    argv = build_argv(config(accel="kvm", sev=SevConfig("snp", 51, 1), memory_mib=512), PATHS)
    assert "q35,confidential-guest-support=sev0,memory-backend=ram0" in argv
    assert "memory-backend-memfd,id=ram0,size=512M,share=true" in argv
    assert "sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1,policy=0x30000" in argv
    assert argv[argv.index("-bios") + 1].endswith("OVMF_CODE.fd")
    assert not any("if=pflash" in arg for arg in argv)
    assert argv[argv.index("-cpu") + 1] == "host"
    with pytest.raises(ValueError, match="SNP policy 0x10000: a u64 with bit 17 set"):
        SevConfig("snp", 51, 1, policy=0x10000)


def test_query_sev_of_an_snp_guest() -> None:
    """QEMU 9.1 made SevInfo a union on sev-type (QEMU 10.0's query-qmp-schema:
    ``sev`` -> policy, handle; ``sev-snp`` -> snp-policy)."""
    snp = {"enabled": True, "api-major": 1, "api-minor": 55, "build-id": 21,
           "state": "running", "sev-type": "sev-snp", "snp-policy": 0x30000}
    assert sev_info_problem(snp, 0x30000, snp=True) is None
    assert sev_info_problem(snp, 0x30001, snp=True) == \
        "query-sev snp-policy 0x30000, expected 0x30001"
    plain = dict(snp, **{"sev-type": "sev", "policy": 3})
    assert sev_info_problem(plain, 0x30000, snp=True) == \
        "query-sev sev-type 'sev', expected 'sev-snp'"


class _Answers(QemuMachine):
    """A machine whose QMP answers from a table (the launch-time check alone)."""

    def __init__(self, replies: dict[str, object]) -> None:
        super().__init__(MachineConfig(code=Path("/fw/CODE.fd"), vars_template=Path("/fw/V.fd")),
                         Path("/nonexistent"))
        self.replies = replies

    def qmp(self, command: str, arguments: object = None, *, timeout: float | None = None
            ) -> object:
        return self.replies[command]


def test_the_launch_check_takes_an_snp_guest_as_qemu_describes_it() -> None:
    """The check after launch reads the SNP reply's snp-policy (an SNP reply
    has no policy key), and still refuses one that differs."""
    snp = {"enabled": True, "api-major": 1, "api-minor": 55, "build-id": 21,
           "state": "running", "sev-type": "sev-snp", "snp-policy": 0x30000}
    _Answers({"query-sev": snp})._check_sev(SevConfig("snp", 51, 1), SEV_STATE_RUNNING)
    with pytest.raises(LaunchError, match="snp-policy 0x30000, expected 0x30001"):
        _Answers({"query-sev": snp})._check_sev(SevConfig("snp", 51, 1, policy=0x30001),
                                                SEV_STATE_RUNNING)


def test_query_sev_with_no_firmware_version_is_not_real_sev() -> None:
    """A real launch carries the SEV firmware's API version; 0.0 means none answered."""
    info = dict(json.loads((QMP_DATA / "query-sev-sev.json").read_text())["return"])
    assert sev_info_problem(info, 0x3) is None
    info.update({"api-major": 0, "api-minor": 0})
    assert sev_info_problem(info, 0x3) == ("query-sev says SEV API 0.0: no SEV firmware "
                                           "answered the launch")


def test_zoo_argv() -> None:
    disks = {kind: Path(f"/img/{kind}.img") for kind in STORAGE_KINDS}
    devices = parse_devices(
        "virtio-blk,nvme,ahci,xhci-storage,usb-kbd,pvscsi,mptsas,lsi,virtio-gpu,e1000e",
        Path("/img/boot.img"), disks.__getitem__)
    paths = dataclasses.replace(PATHS, nic_socket=Path("/run/x/adv.sock"))
    argv = build_argv(MachineConfig(code=Path("/fw/CODE.fd"), vars_template=Path("/fw/V.fd"),
                                    devices=devices), paths)
    text = " ".join(argv)
    assert "nvme,id=znvme1,serial=EBS0001,drive=zdisk1,bootindex=1" in text
    assert "ide-hd,bus=ide.0,drive=zdisk2,bootindex=2" in text
    assert argv.count("qemu-xhci,id=xhci") == 1     # one controller for both USB devices
    assert "usb-storage,bus=xhci.0,drive=zdisk3,bootindex=3" in text
    assert "usb-kbd,bus=xhci.0" in text
    for qom, index in (("pvscsi", 5), ("mptsas1068", 6), ("lsi53c895a", 7)):
        assert f"{qom},id=zhba{index} -device scsi-hd,bus=zhba{index}.0,drive=zdisk{index}" in text
    assert "virtio-gpu-pci,id=zgpu8" in text
    assert f"e1000e,netdev=znet9,id=znic9,romfile={E1000E_ROM},bootindex=9" in text
    assert "-trace" not in argv


def test_adversary_nic_and_trace_argv() -> None:
    devices = parse_devices("virtio-blk,adversary-nic", Path("/img/boot.img"))
    paths = dataclasses.replace(PATHS, nic_socket=Path("/run/x/adv.sock"),
                                trace_log=Path("/art/device-trace.raw"))
    config = MachineConfig(code=Path("/fw/CODE.fd"), vars_template=Path("/fw/V.fd"),
                           devices=devices, trace_events=("fw_cfg_select", "pci_cfg_write"))
    argv = build_argv(config, paths)
    text = " ".join(argv)
    assert ("dgram,id=znet1,local.type=unix,local.path=/run/x/adv.sock,remote.type=unix,"
            "remote.path=/run/x/adv.sock.out") in text
    # legacy only: no OVMF driver connects it, only the adversary driver arms it
    assert "disable-legacy=off,disable-modern=on,iommu_platform=off,romfile=" in text
    assert ",bootindex" not in text.split("advnic")[1]
    assert text.endswith("-trace enable=fw_cfg_select -trace enable=pci_cfg_write "
                         "-trace file=/art/device-trace.raw -S")
    with pytest.raises(ValueError, match="trace event"):
        MachineConfig(code=Path("/fw/CODE.fd"), vars_template=Path("/fw/V.fd"),
                      trace_events=("x,file=/etc/passwd",))
