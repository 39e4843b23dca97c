"""The emulated SEV of the harness's QEMU (``qemu-patches/``), on real boots.

Unpatched firmware is the first control: Debian's packaged OVMF must reach
its shell under emulated SEV with the C-bit set in its page tables, and an
unpatched DEBUG build of the baseline must print that SEV is enabled. Then
the patched firmware installs its IOMMU driver because SEV is on, and the
probe sees the SEV platform. The EBS contract checks catch, under emulated
SEV only, a teardown that reads a dynamic PCD (a firmware variant that
brings the bug back). The monitor's ``info tlb`` and a paging
``dump-guest-memory`` read the C-bit guest's page tables as the harness's
own walk does. And the QEMU refuses what it cannot emulate, with a message,
answers ``query-sev`` as the recorded replies say, is discovered through
its QOM types, and still refuses ``query-sev-capabilities`` under TCG.
"""

from __future__ import annotations

import bisect
import json
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from probe_steps import large_maps

from harness import scenario
from harness.analysis import trace
from harness.analysis.memdump import (
    QemuDump,
    split_by_design,
    unencrypted_ranges,
    walk_page_tables,
)
from harness.build import edk2
from harness.build.progress import StderrProgress
from harness.errors import QmpError
from harness.tools import scratch
from harness.vm import host
from harness.vm.config import MachineConfig
from harness.vm.host import HostCaps, bare_qemu_qmp, query_sev_capabilities
from harness.vm.machine import QemuMachine
from harness.vm.runner import LocalRunner

pytestmark = pytest.mark.sev_emulated

STOCK_CODE = Path("/usr/share/OVMF/OVMF_CODE.fd")
STOCK_VARS = Path("/usr/share/OVMF/OVMF_VARS.fd")
QMP_DATA = Path(__file__).resolve().parents[1] / "data" / "qmp"
#: Test variants of the firmware: a patch on top of the series, each a
#: negative control that some check must catch.
VARIANTS = Path(__file__).resolve().parents[1] / "data" / "firmware-variants"
CBIT = 1 << 47
EFI_OUT_OF_RESOURCES = 0x8000000000000009
#: The adversary's ExitBootServices() handler, where its late Map() runs.
ADVERSARY = "EbsAdversaryDxe!AdversaryStage"


def _config(caps: HostCaps, firmware_code: Path, firmware_vars: Path,
            **kwargs: object) -> MachineConfig:
    sev = host.sev_config("emulated", caps)
    assert sev is not None
    return MachineConfig(code=firmware_code, vars_template=firmware_vars, accel="tcg", sev=sev,
                         qemu=caps.qemu, serial_input=False, **kwargs)  # type: ignore[arg-type]


def test_stock_ovmf_reaches_its_shell_with_the_cbit_in_its_page_tables(
        emulated: HostCaps, ebs_artifacts: Path) -> None:
    config = _config(emulated, STOCK_CODE, STOCK_VARS, debugcon=False)
    with QemuMachine(config, ebs_artifacts / "vm") as vm:
        vm.serial.expect(r"UEFI Interactive Shell", timeout=90)
        assert vm.qmp("query-sev")["emulated"] is True
        path = vm.dump(ebs_artifacts / "memory.elf")
    with QemuDump(path) as dump:
        cpu = dump.cpus[0]
        findings: list[str] = []
        leaves = list(walk_page_tables(dump, cpu.cr3, findings, cbit=CBIT))
        private = sum(leaf.size for leaf in leaves if leaf.entry & CBIT)
        assert findings == [] and private >= 200 << 20, "the C-bit marks RAM private"
        judged, by_design = split_by_design(unencrypted_ranges(dump, cpu.cr3, CBIT))
        # 0xA0000..0xDFFFF: QEMU 10.0 maps 0xE0000..0xFFFFF as an alias of
        # the flash (7.2: a ROM of its own, which stock OVMF left shared too).
        assert [(r.paddr, r.size) for r, _ in by_design] == [(0xA0000, 0x40000)]
        # Before ExitBootServices the firmware's live DMA buffers are shared
        # (the IOMMU's bounce buffers): a little, never most of RAM.
        assert sum(r.size for r in judged) < 8 << 20
        # Negative control: read as an address bit, the C-bit leads nowhere.
        assert list(walk_page_tables(dump, cpu.cr3, [])) == []


def test_unpatched_debug_build_prints_sev_enabled(emulated: HostCaps,
                                                  ebs_artifacts: Path) -> None:
    firmware = edk2.build_unpatched(progress=StderrProgress()).output
    assert not firmware.module_file("EbsProbe", ".efi").exists()
    config = _config(emulated, firmware.code, firmware.vars)
    with QemuMachine(config, ebs_artifacts / "sev") as vm:
        vm.debugcon.expect(r"SEV is enabled \(mask 0x800000000000\)", timeout=60)
        vm.debugcon.expect(r"Loading driver at \S+ EntryPoint=\S+ IoMmuDxe\.efi", timeout=60)
    # Negative control: the same firmware without the emulation says nothing of SEV.
    plain = MachineConfig(code=firmware.code, vars_template=firmware.vars, accel="tcg",
                          qemu=emulated.qemu, serial_input=False)
    with QemuMachine(plain, ebs_artifacts / "plain") as vm:
        vm.debugcon.expect(r"Loading driver at \S+ EntryPoint=\S+ IoMmuDxe\.efi", timeout=60)
    assert "SEV is enabled" not in (ebs_artifacts / "plain" / "debugcon.log").read_text(
        errors="replace")


def test_the_firmware_takes_its_sev_path_without_a_knob(ebs_run_probe) -> None:  # type: ignore[no-untyped-def]
    result = ebs_run_probe(scenario.Scenario(ebs_mode="callback", sev="emulated"))
    assert "opt/org.ebs-harness/emulation" not in result.scenario.fw_cfg(b"x")
    events = result.log.timeline.trace.events
    config = result.log.timeline.trace.config
    assert config is not None and config.emulation == 0, "IoMmuDxe installed through SEV"
    assert result.log.timeline.trace.sev_mask == CBIT
    cpu, = (e for e in events if isinstance(e, trace.Probe) and e.step == "cpu")
    assert int(cpu.get("leaf-eax") or "0", 16) & 0x2, "CPUID 0x8000001F says SEV"
    assert cpu.get("cbitpos") == "47" and cpu.get("sev-msr") == "1"
    assert cpu.get("sev-status") == "0x1", "SEV_STATUS: SEV on, SEV-ES off"
    # V6's positive control (its negative one: tests/integration/test_bounce_pages.py):
    # the probe's two concurrent 512 KiB mappings got bounce buffers of their own.
    dev0, dev1 = large_maps(result)
    assert dev0 != dev1
    assert result.passed, [v.detail for v in result.violations]


def test_the_contract_catches_a_teardown_that_reads_a_dynamic_pcd(
        emulated: HostCaps, ebs_host_caps: HostCaps, ebs_artifacts: Path) -> None:
    """The negative control of C1 and C3: the series before its fix, as a
    firmware variant. The bug lives on the SEV path only: the IOMMU
    emulation mode of a plain TCG guest does not see it."""
    variant = edk2.build_variant(VARIANTS / "teardown-reads-a-dynamic-pcd.patch",
                                 progress=StderrProgress()).output
    chosen = scenario.Scenario(ebs_mode="callback", requeue_depth=2, sev="emulated")
    result = scenario.run_scenario(variant, chosen, ebs_artifacts / "sev", caps=emulated)
    assert result.failed_checks() == {"C1", "C3"}, [v.detail for v in result.violations]
    c1 = next(v for v in result.violations if v.check == "C1")
    assert c1.culprit == "IoMmuDxe!IoMmuExitBootServicesTeardown"
    assert re.search(r"RestoreTPL\(\d+\) from PcdDxe!", c1.detail)
    assert all(v.culprit == "IoMmuDxe!IoMmuExitBootServicesTeardown"
               for v in result.violations if v.check == "C3")
    plain = scenario.run_scenario(variant, scenario.Scenario(ebs_mode="callback", requeue_depth=2,
                                                             accel="tcg"),
                                  ebs_artifacts / "plain", caps=ebs_host_caps)
    assert plain.passed, [v.detail for v in plain.violations]


def test_a_late_map_is_refused_where_the_core_says_the_map_is_terminated(
        ebs_run_probe) -> None:  # type: ignore[no-untyped-def]
    """V5 and its negative control. Under ``callback`` the DXE core tells
    IoMmuDxe that the memory map is terminated, and the adversary's Map()
    from its ExitBootServices() handler is refused: nothing is allocated,
    so C2 has no finding about that handler either. Under ``legacy`` (the
    stock scheme: no registration, so IoMmuDxe cannot tell) the same Map()
    allocates its MAP_INFO: V5 fails naming the allocation, and C2 reports
    it as a finding about the adversary's handler, not a failure."""
    refused = ebs_run_probe(scenario.Scenario(ebs_mode="callback", requeue_depth=2,
                                              sev="emulated"))
    assert refused.passed, [v.detail for v in refused.violations]
    events = refused.log.timeline.trace.events
    late = [e for e in events if isinstance(e, trace.IommuLate)]
    assert [(e.call, e.status) for e in late] == [("map", EFI_OUT_OF_RESOURCES)]
    access, = (e for e in events if isinstance(e, trace.DeviceAccess))
    assert access.map == 0 and access.get("status") == hex(EFI_OUT_OF_RESOURCES)
    assert late[0].host == access.host
    assert ADVERSARY not in {f.culprit for f in refused.log.findings}

    stock = ebs_run_probe(scenario.Scenario(ebs_mode="legacy", requeue_depth=2, sev="emulated"))
    assert "V5" in stock.failed_checks() and "C2" not in stock.failed_checks()
    v5, = (v for v in stock.violations if v.check == "V5")
    assert v5.culprit.startswith("IoMmuDxe!IoMmuMap"), v5.detail
    assert f"in handler {ADVERSARY}" in v5.detail and "allocating: allocate-pool" in v5.detail
    assert not [e for e in stock.log.timeline.trace.events if isinstance(e, trace.IommuLate)]
    assert ADVERSARY in {f.culprit for f in stock.log.findings if f.check == "C2"}
    assert [f for f in stock.as_json()["findings"] if f["culprit"] == ADVERSARY]


# ----------------------------------------------------------- the QEMU itself


#: ``info tlb``: ``VADDR: PADDR FLAGS``, one line per present leaf.
_TLB_LINE = re.compile(r"^([0-9a-f]{16}): ([0-9a-f]{16}) [-XGPDACTUW]{9}$")


def _hmp(sock: Path, command: str, timeout: float = 300.0) -> str:
    """``command``'s output on the human monitor at ``sock`` (``info tlb``
    of a guest that maps a terabyte is tens of megabytes: more than one QMP
    reply line may carry)."""
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(timeout)
        conn.connect(str(sock))
        data = b""
        while not data.endswith(b"(qemu) "):
            data += conn.recv(1 << 16)
        conn.sendall(command.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n(qemu) "):
            chunk = conn.recv(1 << 20)
            assert chunk, "the monitor closed"
            data += chunk
    return data.decode(errors="replace").replace("\r", "")


def test_info_tlb_and_a_paging_dump_read_the_cbit_guests_tables(
        emulated: HostCaps, ebs_artifacts: Path) -> None:
    """QEMU's own walks (``info tlb``, ``dump-guest-memory`` with paging)
    agree with the harness's walk of the same tables (the C-bit stripped),
    leaf by leaf; the tables really carry the C-bit, so an address bit
    read as such would lead nowhere (the control)."""
    with scratch("hmp") as short:
        monitor = short / "hmp.sock"
        config = _config(emulated, STOCK_CODE, STOCK_VARS, debugcon=False,
                         extra_args=("-monitor", f"unix:{monitor},server=on,wait=off"))
        with QemuMachine(config, ebs_artifacts / "vm") as vm:
            vm.serial.expect(r"UEFI Interactive Shell", timeout=90)
            flat = vm.dump(ebs_artifacts / "memory.elf")
            tlb = _hmp(monitor, "info tlb")
            mem = _hmp(monitor, "info mem")
            paged = ebs_artifacts / "paged.elf"
            vm.qmp("dump-guest-memory", {"paging": True, "protocol": f"file:{paged}"},
                   timeout=300)
    with QemuDump(flat) as dump:
        cr3 = dump.cpus[0].cr3
        findings: list[str] = []
        leaves = list(walk_page_tables(dump, cr3, findings, cbit=CBIT))
    assert findings == [] and sum(leaf.size for leaf in leaves if leaf.entry & CBIT) >= 200 << 20
    ours = {(leaf.vaddr, leaf.paddr) for leaf in leaves}
    lines = [m.groups() for m in map(_TLB_LINE.match, tlb.splitlines()) if m]
    assert len(lines) == len(leaves), tlb[:2000]
    assert {(int(v, 16), int(p, 16)) for v, p in lines} == ours
    # info mem: the same mapped total, in ranges of one protection
    ranges = re.findall(r"^[0-9a-f]{16}-[0-9a-f]{16} ([0-9a-f]{16}) [-urw]{3}$", mem,
                        re.MULTILINE)
    assert ranges
    assert sum(int(size, 16) for size in ranges) == sum(leaf.size for leaf in leaves)
    # The paging dump: one PT_LOAD per run of mapped RAM, at its virtual
    # address (QEMU writes the lower half with bits 63..48 set: cut them).
    starts = sorted(leaf.vaddr for leaf in leaves)
    by_start = {leaf.vaddr: leaf for leaf in leaves}
    mapped = 0
    with open(paged, "rb") as handle:
        for segment in ELFFile(handle).iter_segments("PT_LOAD"):
            vaddr = segment["p_vaddr"] & ((1 << 48) - 1)
            paddr, size = segment["p_paddr"], segment["p_memsz"]
            assert paddr & CBIT == 0, f"PT_LOAD at paddr {paddr:#x} has the C-bit"
            index = bisect.bisect_right(starts, vaddr) - 1
            leaf = by_start[starts[index]] if index >= 0 else None
            assert leaf is not None and vaddr < leaf.vaddr + leaf.size, \
                f"PT_LOAD at vaddr {vaddr:#x} is in no leaf"
            assert paddr == leaf.paddr + vaddr - leaf.vaddr
            mapped += size
    assert mapped >= 200 << 20


#: A 64 KiB ``-bios`` in real mode: point the #GP vector at a HLT of its own,
#: read SEV_STATUS into ESI, write it, HLT. EIP after a HLT says which one:
#: 0x24 the write went through, 0x27 it raised #GP.
SEV_STATUS_BIOS = bytes.fromhex(
    "31C0" "8ED8"                       # xor ax,ax; mov ds,ax
    "C70634002600" "C706360000F0"       # IVT[13] = F000:0026
    "66B9310101C0" "0F32" "6689C6"      # mov ecx,0xC0010131; rdmsr; mov esi,eax
    "6631C0" "6631D2" "0F30"            # xor eax,eax; xor edx,edx; wrmsr
    "F4EBFD"                            # 0x23: hlt (no #GP)
    "F4EBFD")                           # 0x26: hlt (the #GP handler)


def _sev_status_run(qemu: str, directory: Path, *args: str) -> tuple[int, int]:
    """ESI (what RDMSR read) and EIP (which HLT) after :data:`SEV_STATUS_BIOS`."""
    image = bytearray(b"\xf4" * 0x10000)
    image[:len(SEV_STATUS_BIOS)] = SEV_STATUS_BIOS
    image[0xFFF0:0xFFF5] = bytes.fromhex("EA000000F0")   # reset: jmp F000:0000
    bios = directory / "sev-status.bin"
    bios.write_bytes(bytes(image))
    proc = subprocess.Popen([qemu, "-accel", "tcg", "-display", "none", "-nodefaults",
                             "-bios", str(bios), "-monitor", "stdio", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1.5)     # the guest runs into its HLT long before
        out, _ = proc.communicate("info registers\nquit\n", timeout=30)
    finally:
        proc.kill()
    esi, eip = re.search(r"ESI=([0-9a-f]{8})", out), re.search(r"EIP=([0-9a-f]{8})", out)
    assert esi and eip, out
    return int(esi.group(1), 16), int(eip.group(1), 16)


def test_sev_status_reads_1_and_a_write_raises_gp(emulated: HostCaps, ebs_host_caps: HostCaps,
                                                  tmp_path: Path) -> None:
    sev = ("-machine", "q35,confidential-guest-support=sev0", "-object", "sev-emulated,id=sev0")
    assert _sev_status_run(emulated.qemu, tmp_path, *sev) == (1, 0x27)
    # without the emulation the MSR reads 0, and is still read-only
    assert _sev_status_run(emulated.qemu, tmp_path) == (0, 0x27)
    # the control: Debian's QEMU ignores the write
    assert _sev_status_run(ebs_host_caps.qemu, tmp_path) == (0, 0x24)


def _qemu_error(qemu: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([qemu, "-S", "-accel", "tcg", "-display", "none", "-nodefaults",
                           "-machine", "q35,confidential-guest-support=sev0", *args],
                          capture_output=True, text=True, timeout=30, check=False)


def _qemu_accepts(qemu: str, *args: str) -> subprocess.CompletedProcess[str]:
    """QEMU created the machine (paused) and quit when the monitor said so."""
    return subprocess.run([qemu, "-S", "-accel", "tcg", "-display", "none", "-nodefaults",
                           "-machine", "q35,confidential-guest-support=sev0",
                           "-monitor", "stdio", *args],
                          input="quit\n", capture_output=True, text=True, timeout=30,
                          check=False)


@pytest.mark.parametrize(("args", "message"), [
    (("-object", "sev-guest,id=sev0,cbitpos=47,reduced-phys-bits=1"),
     "accelerator does not support confidential guest sev-guest"),
    (("-smp", "2", "-object", "sev-emulated,id=sev0,policy=0x7"),
     "sev-emulated: SEV-ES is emulated with one vCPU only"),
    (("-object", "sev-emulated,id=sev0,policy=0x7,x-vc-mismatch=msr"),
     "sev-emulated: x-vc-mismatch 'msr' is not ioio or cpuid"),
    (("-object", "sev-emulated,id=sev0,cbitpos=60"),
     "sev-emulated: cbitpos 60 is not in 32..51"),
    (("-object", "sev-emulated,id=sev0,reduced-phys-bits=0"),
     "sev-emulated: reduced-phys-bits 0 is not in 1..63"),
    (("-cpu", "qemu64,phys-bits=48", "-object", "sev-emulated,id=sev0"),
     "sev-emulated: phys-bits 48 reach the C-bit (cbitpos 47)"),
    (("-cpu", "qemu64,vendor=GenuineIntel", "-object", "sev-emulated,id=sev0"),
     "sev-emulated needs an AMD CPU model"),
    (("-object", "sev-emulated,id=sev0,sev-device=/dev/sev"),
     "Invalid parameter 'sev-device'"),
], ids=["sev-guest-without-kvm", "sev-es-smp", "vc-mismatch", "cbitpos", "reduced-phys-bits",
        "phys-bits", "intel-model", "no-sev-device"])
def test_the_qemu_refuses_what_it_cannot_emulate(emulated: HostCaps, args: tuple[str, ...],
                                                 message: str) -> None:
    proc = _qemu_error(emulated.qemu, *args)
    assert proc.returncode == 1, "an error exit, not an abort"
    assert message in proc.stderr


def test_the_geometry_cannot_change_once_the_guest_is_set_up(emulated: HostCaps,
                                                             ebs_artifacts: Path) -> None:
    """The CPUs took their copy of the C-bit when TCG set the object up: a
    later ``qom-set`` (which a hot-plugged CPU would read) is refused."""
    config = _config(emulated, STOCK_CODE, STOCK_VARS, debugcon=False)
    vm = QemuMachine(config, ebs_artifacts / "vm")
    try:
        vm.launch(start=False)
        with pytest.raises(QmpError, match="cbitpos cannot change once the guest is set up"):
            vm.qmp("qom-set", {"path": "/objects/sev0", "property": "cbitpos", "value": 100})
        assert vm.qmp("qom-get", {"path": "/objects/sev0", "property": "cbitpos"}) == 47
    finally:
        vm.shutdown()


def test_reduced_phys_bits_do_not_shrink_the_guest(emulated: HostCaps) -> None:
    """The control of the phys-bits refusal: the guest may use every address
    bit below the C-bit, whatever reduced-phys-bits says."""
    proc = _qemu_accepts(emulated.qemu, "-cpu", "qemu64,phys-bits=47", "-object",
                         "sev-emulated,id=sev0,cbitpos=47,reduced-phys-bits=5")
    assert proc.returncode == 0, proc.stderr


def test_discovery_is_by_type_and_query_sev_capabilities_fails_as_before(
        emulated: HostCaps, ebs_host_caps: HostCaps) -> None:
    """``query-sev-capabilities`` describes a host's SEV firmware: under TCG
    it fails in the harness's QEMU as in Debian's, so a management stack
    never reads "this host has SEV" from it; ``qom-list-types`` lists the
    emulation in ours only."""
    ours = query_sev_capabilities(LocalRunner(), emulated.qemu, "tcg")
    debians = query_sev_capabilities(LocalRunner(), ebs_host_caps.qemu, "tcg")
    assert isinstance(ours, str) and "KVM not enabled" in ours, ours
    assert isinstance(debians, str) and "KVM not enabled" in debians, debians

    def types(qemu: str) -> set[str]:
        return {t["name"] for t in bare_qemu_qmp(LocalRunner(), qemu, "tcg", "qom-list-types")}
    assert "sev-emulated" in types(emulated.qemu)
    assert "sev-emulated" not in types(ebs_host_caps.qemu)
    geometry = emulated.emulated_geometry
    assert emulated.sev_emulated.available and geometry is not None
    assert (geometry.cbitpos, geometry.reduced_phys_bits) == (47, 1)


def test_debians_qemu_has_no_emulated_sev(ebs_host_caps: HostCaps) -> None:
    """The control: the system's QEMU refuses the object and the host probe says so."""
    proc = _qemu_error(ebs_host_caps.qemu, "-object", "sev-emulated,id=sev0")
    assert proc.returncode == 1
    assert "does not accept value 'sev-emulated'" in proc.stderr
    assert not ebs_host_caps.sev_emulated.available
    assert "has no emulated SEV" in ebs_host_caps.sev_emulated.reason


def test_query_sev_is_what_the_recorded_replies_say(emulated: HostCaps,
                                                    ebs_artifacts: Path) -> None:
    """The replies the unit tests read (recorded by qmp/record-emulated.py)
    are what this QEMU answers now: launch-secret while paused, running after
    ``cont``, emulated throughout."""
    paused = json.loads((QMP_DATA / "query-sev-emulated-paused.json").read_text())["return"]
    running = json.loads((QMP_DATA / "query-sev-emulated-running.json").read_text())["return"]
    config = _config(emulated, STOCK_CODE, STOCK_VARS, debugcon=False)
    vm = QemuMachine(config, ebs_artifacts / "vm")
    try:
        vm.launch(start=False)
        assert vm.qmp("query-sev") == paused
        assert paused["state"] == "launch-secret" and paused["emulated"] is True
        vm.qmp("cont")
        assert vm.qmp("query-sev") == running
        assert running["state"] == "running"
    finally:
        vm.shutdown()
