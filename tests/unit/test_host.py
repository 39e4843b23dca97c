"""Host capability parsing on fabricated sysfs/CPUID trees and recorded replies."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import pytest

from harness import demo
from harness.errors import UsageError
from harness.vm import host
from harness.vm.host import Capability, HostCaps

QMP_DATA = Path(__file__).resolve().parents[1] / "data" / "qmp"

YES = Capability(True, "proven")
NO_KVM = Capability(False, "KVM internal error. Suberror: 1 (emulation failure)")

# CPUID Fn8000_001F as EPYC parts report it: EAX SME|SEV|PageFlush|SEV-ES|SNP...,
# EBX C-bit 47 (Rome) / 51 (Milan), 1 physical bit lost.
ROME = (0x0001000F, 0x0000006F)      # SME, SEV, PageFlush, SEV-ES; cbit 47
MILAN = (0x0001F01F, 0x00000073)     # ... + SNP; cbit 51
NO_SEV = (0x0, 0x0)                  # this development machine


def reply(name: str) -> dict[str, object]:
    data: dict[str, object] = json.loads((QMP_DATA / name).read_text())
    return data


def make_tree(root: Path, params: dict[str, str] | None = None,
              cpuid: tuple[int, int] | None = None, max_ext: int = 0x80000021,
              dev_sev: bool = False, cpuinfo_flags: str | None = None) -> Path:
    """A fabricated root: kvm_amd parameters, /dev/cpu/0/cpuid, /dev/sev."""
    if params is not None:
        pdir = root / "sys/module/kvm_amd/parameters"
        pdir.mkdir(parents=True)
        for name, value in params.items():
            (pdir / name).write_text(value + "\n")
    if cpuid is not None:
        cdir = root / "dev/cpu/0"
        cdir.mkdir(parents=True)
        with open(cdir / "cpuid", "wb") as handle:  # sparse: offset = leaf
            handle.seek(0x80000000)
            handle.write(struct.pack("<4I", max_ext, 0x68747541, 0x444D4163, 0x69746E65))
            handle.seek(0x8000001F)
            handle.write(struct.pack("<4I", cpuid[0], cpuid[1], 509, 0))
    if dev_sev:
        (root / "dev").mkdir(exist_ok=True)
        (root / "dev/sev").write_text("")
    if cpuinfo_flags is not None:
        (root / "proc").mkdir()
        (root / "proc/cpuinfo").write_text(
            f"processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: {cpuinfo_flags}\n\n"
            f"processor\t: 1\nflags\t\t: fpu\n")
    return root


# ------------------------------------------------------ module flags


@pytest.mark.parametrize(("text", "value"), [
    ("Y\n", True), ("N\n", False), ("1\n", True), ("0\n", False), ("y", True), (" N ", False)])
def test_module_flag(text: str, value: bool) -> None:
    assert host.parse_module_flag(text) is value


@pytest.mark.parametrize("text", ["", "yes", "2", "-1"])
def test_module_flag_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="boolean"):
        host.parse_module_flag(text)


def test_kvm_amd_not_loaded(tmp_path: Path) -> None:
    assert host.read_kvm_amd_params(make_tree(tmp_path)) is None


def test_kvm_amd_y_n_form(tmp_path: Path) -> None:
    root = make_tree(tmp_path, params={"sev": "Y", "sev_es": "N", "sev_snp": "N"})
    assert host.read_kvm_amd_params(root) == {"sev": True, "sev_es": False, "sev_snp": False}


def test_kvm_amd_1_0_form_and_missing_file(tmp_path: Path) -> None:
    # older kernels: int parameters, and no sev_snp at all
    root = make_tree(tmp_path, params={"sev": "1", "sev_es": "0"})
    assert host.read_kvm_amd_params(root) == {"sev": True, "sev_es": False, "sev_snp": None}


def test_kvm_amd_garbage_is_missing(tmp_path: Path) -> None:
    root = make_tree(tmp_path, params={"sev": "maybe", "sev_es": "Y", "sev_snp": "Y"})
    assert host.read_kvm_amd_params(root) == {"sev": None, "sev_es": True, "sev_snp": True}


# ------------------------------------------------------------- CPUID


def test_cpuid_decode_rome() -> None:
    cpu = host.parse_cpuid_8000001f(*ROME)
    assert (cpu.sme, cpu.sev, cpu.sev_es, cpu.snp) == (True, True, True, False)
    assert (cpu.cbitpos, cpu.reduced_phys_bits) == (47, 1)


def test_cpuid_decode_milan() -> None:
    cpu = host.parse_cpuid_8000001f(*MILAN)
    assert (cpu.sev, cpu.sev_es, cpu.snp) == (True, True, True)
    assert (cpu.cbitpos, cpu.reduced_phys_bits) == (51, 1)


def test_cpuid_decode_none() -> None:
    cpu = host.parse_cpuid_8000001f(*NO_SEV)
    assert not (cpu.sme or cpu.sev or cpu.sev_es or cpu.snp)


def test_read_cpuid_from_tree(tmp_path: Path) -> None:
    root = make_tree(tmp_path, cpuid=MILAN)
    cpu = host.read_sev_cpuid(root)
    assert cpu is not None and cpu.snp and cpu.cbitpos == 51


def test_read_cpuid_leaf_beyond_max(tmp_path: Path) -> None:
    # leaf 0x8000001F above the CPU's maximum extended leaf: no SEV, whatever is there
    root = make_tree(tmp_path, cpuid=MILAN, max_ext=0x8000001E)
    cpu = host.read_sev_cpuid(root)
    assert cpu is not None and not cpu.sev


def test_read_cpuid_no_driver(tmp_path: Path) -> None:
    assert host.read_sev_cpuid(make_tree(tmp_path)) is None


def test_cpuinfo_flags(tmp_path: Path) -> None:
    root = make_tree(tmp_path, cpuinfo_flags="fpu vme sme sev sev_es")
    flags = host.parse_cpuinfo_flags((root / "proc/cpuinfo").read_text())
    assert {"sev", "sev_es"} <= flags
    assert "sev_snp" not in flags
    assert host.parse_cpuinfo_flags("processor : 0\n") == frozenset()


# ------------------------------------------------------ QMP replies


def test_sev_capabilities_doc_example() -> None:
    caps = host.parse_sev_capabilities(reply("query-sev-capabilities.json"))
    assert (caps.cbitpos, caps.reduced_phys_bits) == (47, 5)


def test_sev_capabilities_error_reply() -> None:
    with pytest.raises(ValueError, match="Failed to open /dev/sev"):
        host.parse_sev_capabilities(reply("query-sev-capabilities-error.json"))


def test_sev_capabilities_malformed() -> None:
    with pytest.raises(ValueError, match="SevCapability"):
        host.parse_sev_capabilities({"return": {"pdh": "x"}})
    with pytest.raises(ValueError, match="integers"):
        host.parse_sev_capabilities({"return": {"cbitpos": "47", "reduced-phys-bits": 1}})
    # an answer no launch could follow (QEMU's sev-guest refuses 0): a reason, not a crash
    with pytest.raises(ValueError, match="reduced-phys-bits 0: not a C-bit in 32..63"):
        host.parse_sev_capabilities({"return": {"cbitpos": 47, "reduced-phys-bits": 0}})


def test_qemu_version() -> None:
    text = ("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n"
            "Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n")
    assert host.parse_qemu_version(text) == "7.2.22"
    assert host.parse_qemu_version("QEMU emulator version 9.1.0\n") == "9.1.0"
    with pytest.raises(ValueError):
        host.parse_qemu_version("bash: qemu: command not found")
    assert not host.qemu_has_snp("7.2.22")
    assert host.qemu_has_snp("9.1.0")


def test_kvm_failure_reason_recorded() -> None:
    stderr = (QMP_DATA / "kvm-internal-error.stderr").read_text()
    assert host.kvm_failure_reason(stderr) == \
        "KVM internal error. Suberror: 1 (emulation failure)"
    assert host.kvm_failure_reason(
        "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\n") == \
        "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69"
    assert host.kvm_failure_reason("") is None


# --------------------------------------------------------- decisions


def verdicts(root: Path, kvm: Capability = YES,
             qmp: host.SevCapabilities | str | None = None,
             version: str = "7.2.22") -> tuple[Capability, Capability, Capability]:
    return host.sev_verdicts(
        host.read_kvm_amd_params(root), (root / "dev/sev").exists(),
        host.read_sev_cpuid(root),
        host.parse_cpuinfo_flags((root / "proc/cpuinfo").read_text())
        if (root / "proc/cpuinfo").exists() else frozenset(),
        kvm, qmp, version)


def test_this_machine_no_sev(tmp_path: Path) -> None:
    root = make_tree(tmp_path, cpuid=NO_SEV)
    sev, sev_es, snp = verdicts(root, kvm=NO_KVM)
    assert not sev and "CPUID 0x8000001F" in sev.reason
    assert not sev_es and sev_es.reason.startswith("needs SEV")
    assert not snp


def test_full_sev_es_host(tmp_path: Path) -> None:
    root = make_tree(tmp_path, params={"sev": "Y", "sev_es": "Y", "sev_snp": "N"},
                     cpuid=ROME, dev_sev=True)
    qmp = host.parse_sev_capabilities(reply("query-sev-capabilities.json"))
    sev, sev_es, snp = verdicts(root, qmp=qmp)
    assert sev and sev_es, (sev, sev_es)
    assert "cbitpos 47" in sev.reason
    # QEMU 7.2 rules SNP out before the CPU is asked; a newer QEMU gets the CPU's answer.
    assert not snp and snp.reason.startswith("needs sev-snp-guest (QEMU >= 9.1)")
    snp = verdicts(root, qmp=qmp, version="10.0.2")[2]
    assert not snp and "CPU does not offer SEV-SNP" in snp.reason


def test_snp_needs_new_qemu(tmp_path: Path) -> None:
    root = make_tree(tmp_path, params={"sev": "1", "sev_es": "1", "sev_snp": "1"},
                     cpuid=MILAN, dev_sev=True)
    qmp = host.parse_sev_capabilities(reply("query-sev-capabilities-milan.json"))
    assert not verdicts(root, qmp=qmp)[2]
    assert "sev-snp-guest" in verdicts(root, qmp=qmp)[2].reason
    assert verdicts(root, qmp=qmp, version="9.1.0")[2]


@pytest.mark.parametrize(("tree", "kvm", "qmp", "reason"), [
    ({"params": {"sev": "N", "sev_es": "N"}, "cpuid": ROME, "dev_sev": True},
     YES, None, "kvm_amd sev=N"),
    ({"params": {"sev_es": "Y"}, "cpuid": ROME, "dev_sev": True},
     YES, None, "no sev parameter"),
    ({"cpuid": ROME, "dev_sev": True}, YES, None, "kvm_amd is not loaded"),
    ({"params": {"sev": "Y", "sev_es": "Y"}, "cpuid": ROME},
     YES, None, "no /dev/sev"),
    ({"params": {"sev": "Y", "sev_es": "Y"}, "cpuid": ROME, "dev_sev": True},
     NO_KVM, None, "KVM is not usable: KVM internal error"),
    ({"params": {"sev": "Y", "sev_es": "Y"}, "cpuid": ROME, "dev_sev": True},
     YES, "SEV: Failed to open /dev/sev: Permission denied",
     "query-sev-capabilities failed: SEV: Failed to open /dev/sev"),
    # no cpuid driver: /proc/cpuinfo decides
    ({"params": {"sev": "Y"}, "dev_sev": True, "cpuinfo_flags": "fpu svm"},
     YES, None, "CPU does not offer SEV (/proc/cpuinfo flags)"),
])
def test_sev_missing_reasons(tmp_path: Path, tree: dict[str, object], kvm: Capability,
                             qmp: str | None, reason: str) -> None:
    root = make_tree(tmp_path, **tree)  # type: ignore[arg-type]
    sev = verdicts(root, kvm=kvm, qmp=qmp)[0]
    assert not sev.available
    assert reason in sev.reason


def test_sev_from_cpuinfo_flags(tmp_path: Path) -> None:
    root = make_tree(tmp_path, params={"sev": "Y", "sev_es": "N"}, dev_sev=True,
                     cpuinfo_flags="fpu sme sev sev_es")
    qmp = host.SevCapabilities(cbitpos=47, reduced_phys_bits=1)
    sev, sev_es, _ = verdicts(root, qmp=qmp)
    assert sev
    assert not sev_es and "kvm_amd sev_es=N" in sev_es.reason


# ------------------------------------------------------------ result


def caps(kvm: Capability, **kwargs: object) -> HostCaps:
    no = Capability(False, "no")
    return HostCaps(qemu="/usr/bin/qemu-system-x86_64", qemu_version="7.2.22",
                    tcg=YES, kvm=kvm, sev=no, sev_es=no, snp=no,
                    **kwargs)  # type: ignore[arg-type]


def test_resolve_accel() -> None:
    assert host.resolve_accel("auto", caps(NO_KVM)) == "tcg"
    assert host.resolve_accel("auto", caps(YES)) == "kvm"
    assert host.resolve_accel("tcg", caps(YES)) == "tcg"
    with pytest.raises(UsageError, match="KVM internal error"):
        host.resolve_accel("kvm", caps(NO_KVM))
    with pytest.raises(UsageError, match="auto, tcg or kvm"):
        host.resolve_accel("hvf", caps(YES))


def test_caps_json_and_lookup() -> None:
    result = caps(NO_KVM)
    data = json.loads(json.dumps(result.to_json()))
    assert data["kvm"] == {"available": False, "reason": NO_KVM.reason}
    assert data["tcg"]["available"] is True
    assert result.capability("sev_es") is result.sev_es
    with pytest.raises(KeyError):
        result.capability("tdx")


def test_probe_without_qemu() -> None:
    result = host.probe(qemu="no-such-qemu-binary")
    assert not result.tcg and "not found" in result.tcg.reason


def test_sev_config_from_caps() -> None:
    sev_host = HostCaps(qemu="q", qemu_version="7.2.22", tcg=YES, kvm=YES, sev=YES,
                        sev_es=Capability(False, "kvm_amd sev_es=N"), snp=NO_KVM,
                        sev_geometry=host.SevCapabilities(51, 1))
    assert host.sev_config("off", sev_host) is None
    config = host.sev_config("sev", sev_host)
    assert config is not None
    assert (config.cbitpos, config.reduced_phys_bits, config.effective_policy) == (51, 1, 0x3)
    with pytest.raises(UsageError, match="sev-es: not available here: kvm_amd sev_es=N"):
        host.sev_config("sev-es", sev_host)
    with pytest.raises(UsageError, match="sev=tdx: one of off, sev, sev-es, snp, emulated"):
        host.sev_config("tdx", sev_host)
    with pytest.raises(UsageError, match="sev=snp: not available here"):
        host.sev_config("snp", sev_host)
    with pytest.raises(UsageError, match="not available here"):
        host.sev_config("sev", caps(NO_KVM))


def test_emulated_sev_from_caps() -> None:
    emulated = HostCaps(qemu="ours", qemu_version="7.2.22", tcg=YES, kvm=NO_KVM, sev=NO_KVM,
                        sev_es=NO_KVM, snp=NO_KVM, sev_emulated=YES,
                        emulated_geometry=host.SevCapabilities(47, 1, emulated=True))
    config = host.sev_config("emulated", emulated)
    assert config is not None and config.emulated and config.accel == "tcg"
    assert (config.cbitpos, config.reduced_phys_bits, config.effective_policy) == (47, 1, 0x3)
    with pytest.raises(UsageError, match="sev=emulated: not available here: no emulation here"):
        host.sev_config("emulated", caps(NO_KVM, sev_emulated=Capability(False,
                                                                          "no emulation here")))


def test_emulated_sev_verdict() -> None:
    """From the sev-emulated class's properties, as the harness's QEMU lists
    them (recorded) and as Debian's QEMU, which has no such class, refuses."""
    ours = host.parse_emulated_sev_properties(json.loads(
        (QMP_DATA / "qom-list-properties-sev-emulated.json").read_text()))
    assert ours.emulated and (ours.cbitpos, ours.reduced_phys_bits) == (47, 1)
    cap = host.emulated_sev_verdict(YES, ours, "ours", "10.0.13")
    assert cap.available and "sev-emulated, cbitpos 47" in cap.reason
    debian = host.emulated_sev_verdict(YES, "DeviceNotFound: Class 'sev-emulated' not found",
                                       "/usr/bin/qemu-system-x86_64", "7.2.22")
    assert not debian.available
    assert "has no emulated SEV (no sev-emulated object type: DeviceNotFound: Class " \
           "'sev-emulated' not found); the harness's QEMU has it: ebs-harness build-qemu" \
           in debian.reason
    with pytest.raises(ValueError, match="are not integers"):   # no defaults: not ours
        host.parse_emulated_sev_properties([{"name": "cbitpos", "type": "uint32"}])
    real = host.parse_sev_capabilities(json.loads((QMP_DATA / "query-sev-capabilities.json")
                                                  .read_text()))
    assert not real.emulated
    assert not host.emulated_sev_verdict(YES, real, "q", "7.2.22").available
    assert host.emulated_sev_verdict(NO_KVM, ours, "q", "7.2.22").reason.startswith("needs TCG")


def test_emulated_sev_es_verdict() -> None:
    """SEV-ES from the class's properties: the harness's QEMU now (recorded)
    has it; the same class before SEV-ES (recorded then) is plain SEV only,
    and says why; no emulated SEV at all says that first."""
    now = host.parse_emulated_sev_properties(json.loads(
        (QMP_DATA / "qom-list-properties-sev-emulated.json").read_text()))
    before = host.parse_emulated_sev_properties(json.loads(
        (QMP_DATA / "qom-list-properties-sev-emulated-plain.json").read_text()))
    assert now.es and not before.es
    plain = host.emulated_sev_verdict(YES, before, "ours", "10.0.13")
    assert plain.available, "plain SEV is still emulated"
    assert host.emulated_sev_es_verdict(plain, now, "10.0.13").available
    refused = host.emulated_sev_es_verdict(plain, before, "10.0.13")
    assert not refused.available and "emulates plain SEV only (no x-vc-mismatch" in \
        refused.reason


def test_emulated_snp_verdict() -> None:
    """SNP from the class's ``snp`` property: the harness's QEMU now (recorded)
    has it; the class of SEV-ES alone does not, nor does one without SEV-ES."""
    now = host.parse_emulated_sev_properties(json.loads(
        (QMP_DATA / "qom-list-properties-sev-emulated.json").read_text()))
    assert now.snp and now.es
    es_only = dataclasses.replace(now, snp=False)
    assert host.emulated_snp_verdict(YES, now, "10.0.13").available
    refused = host.emulated_snp_verdict(YES, es_only, "10.0.13")
    assert not refused.available and "has no SEV-SNP (no snp property)" in refused.reason
    no_es = host.emulated_snp_verdict(Capability(False, "plain only"), now, "10.0.13")
    assert not no_es.available and no_es.reason == "needs emulated SEV-ES: plain only"
    none = host.emulated_sev_es_verdict(Capability(False, "no class"), now, "7.2.22")
    assert none.reason == "needs emulated SEV: no class"


def test_probe_cache_round_trip_and_key(tmp_path: Path) -> None:
    """A probe kept on disk reads back equal; its key moves with what the
    answer depends on (here: the kvm_amd parameters)."""
    original = HostCaps(qemu="/usr/bin/qemu-system-x86_64", qemu_version="7.2.22", tcg=YES,
                        kvm=NO_KVM, sev=NO_KVM, sev_es=NO_KVM, snp=NO_KVM,
                        sev_emulated=Capability(False, "no emulation"))
    assert host.caps_from_json(json.loads(json.dumps(original.to_json()))) == original
    root = make_tree(tmp_path, params={"sev": "N"})
    sev = root / "sys/module/kvm_amd/parameters/sev"
    before = host.probe_key("qemu-system-x86_64", root)
    sev.write_text("Y\n")
    after = host.probe_key("qemu-system-x86_64", root)
    sev.write_text("N\n")
    assert before != after and host.probe_key("qemu-system-x86_64", root) == before
    (root / "dev").mkdir()
    (root / "dev/kvm").write_text("")
    assert host.probe_key("qemu-system-x86_64", root) != before


def test_the_demo_takes_emulated_sev_es_where_the_firmware_boots_in_it() -> None:
    """No SEV here: emulated SEV-ES for 2025.02's firmware; for 2022.11's,
    whose OVMF stops in PEI under it, plain emulated SEV, saying why; a QEMU
    without SEV-ES gets plain SEV too (the control)."""
    both = caps(NO_KVM, sev_emulated=YES, sev_es_emulated=YES,
                emulated_geometry=host.SevCapabilities(47, 1, emulated=True, es=True))
    assert demo.choose_platform(both, "2025.02", None).sev == "emulated-es"
    old = demo.choose_platform(both, "2022.11", None)
    assert old.sev == "emulated" and "stops in PEI under the emulated SEV-ES" in old.why
    plain = caps(NO_KVM, sev_emulated=YES, sev_es_emulated=Capability(False, "plain only"))
    chosen = demo.choose_platform(plain, "2025.02", None)
    assert chosen.sev == "emulated" and "plain only" in chosen.why
    with pytest.raises(UsageError, match="stops in PEI"):
        demo.chosen_platform(both, "emulated-es", "2022.11", None)
