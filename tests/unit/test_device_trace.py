"""harness.analysis.devices: QEMU's device trace, W1 and W2.

The recorded trace (tests/data/devices/, see its README.md) is a real boot
of the zoo; the small traces here are written in QEMU 7.2's own line
formats, each a negative control that makes exactly one verdict fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import cli
from harness.analysis import device_models, devices, devicetrace, trace
from harness.analysis.devices import analyze_device_trace
from harness.analysis.devicetrace import DeviceTraceError, parse_device_trace

DATA = Path(__file__).resolve().parent.parent / "data" / "devices"
ZOO = DATA / "zoo-callback.log"

HEADER = "# ebs-harness device trace v1 qemu=7.2.22\n"
BEGIN = "fw_cfg_select 0x55c33853ec70 key 0x3eb1 'unknown', ret: 0\n"
END = "fw_cfg_select 0x55c33853ec70 key 0x3eb2 'unknown', ret: 0\n"
# virtio-net at 00:04.0 as OVMF drives it: enabled, reset, DRIVER_OK, a kick
NET_UP = ("virtio_set_status vdev 0x5600000a0000 val 0\n"        # machine reset: not ours yet
          "pci_cfg_write virtio-net-pci 00:04.0 @0x4 <- 0x7\n"
          "virtio_set_status vdev 0x5600000a0000 val 0\n"
          "virtio_set_status vdev 0x5600000a0000 val 15\n"
          "virtio_queue_notify vdev 0x5600000a0000 n 0 vq 0x5600000b0000\n"
          "virtqueue_pop vq 0x5600000b0000 elem 0x560000ee0000 in_num 1 out_num 0\n"
          "virtqueue_flush vq 0x5600000b0000 count 1\n")
NET_RESET = "virtio_set_status vdev 0x5600000a0000 val 0\n"
NET_DMA = "virtqueue_pop vq 0x5600000b0000 elem 0x560000ee0100 in_num 1 out_num 0\n"


def write(tmp_path: Path, text: str, name: str = "device-trace.log") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def checks(report: devices.DeviceReport) -> list[str]:
    return [v.check for v in report.violations]


# ------------------------------------------------------------ verdicts


def test_quiesced_device_holds(tmp_path: Path) -> None:
    report = analyze_device_trace(write(tmp_path, HEADER + NET_UP + NET_RESET + BEGIN + END))
    assert report.judged and report.violations == ()
    (net,) = devices.driven(report)
    assert (net.bdf, net.qom, net.kind) == ("00:04.0", "virtio-net-pci", "virtio-net")
    assert net.quiesce_text == "virtio reset (status 0) at line 9"
    assert net.dma_before == 2 and net.dma_after == []


def test_w1_device_still_armed(tmp_path: Path) -> None:
    report = analyze_device_trace(write(tmp_path, HEADER + NET_UP + BEGIN + END))
    assert checks(report) == ["W1"]
    detail = report.violations[0].detail
    assert "virtio-net 00:04.0 (virtio-net-pci)" in detail and "queues since line 5" in detail
    assert report.violations[0].culprit == "VirtioNetDxe"


def test_w1_bus_mastering_off_counts_as_quiesced(tmp_path: Path) -> None:
    off = "pci_cfg_write virtio-net-pci 00:04.0 @0x4 <- 0x3\n"
    report = analyze_device_trace(write(tmp_path, HEADER + NET_UP + off + BEGIN + END))
    assert report.violations == ()
    assert next(devices.driven(report)).quiesce_text == "bus mastering off"


def test_w2_dma_after_the_teardown_began(tmp_path: Path) -> None:
    report = analyze_device_trace(write(
        tmp_path, HEADER + NET_UP + NET_RESET + BEGIN + NET_DMA + END + NET_DMA))
    assert checks(report) == ["W2"]
    assert "virtqueue_pop at line 11 and 1 more" in report.violations[0].detail


def test_w2_window_ends_when_the_os_touches_the_device(tmp_path: Path) -> None:
    linux = "pci_cfg_write virtio-net-pci 00:04.0 @0x4 <- 0x7\n"
    report = analyze_device_trace(write(
        tmp_path, HEADER + NET_UP + NET_RESET + BEGIN + END + linux + NET_DMA))
    assert report.violations == ()


def test_w1_and_w2_unjudged_without_a_marker(tmp_path: Path) -> None:
    report = analyze_device_trace(write(tmp_path, HEADER + NET_UP + NET_DMA))
    assert not report.judged and report.violations == ()
    assert "no teardown-begin marker" in report.notes[0]


def test_chipset_functions_are_not_counted(tmp_path: Path) -> None:
    mch = "pci_cfg_write mch 00:00.0 @0x4 <- 0x106\n"
    report = analyze_device_trace(write(tmp_path, HEADER + mch + BEGIN))
    assert report.violations == () and list(devices.driven(report)) == []


def test_unknown_bus_master_fails_w1(tmp_path: Path) -> None:
    other = "pci_cfg_write some-dma-device 00:09.0 @0x4 <- 0x6\n"
    report = analyze_device_trace(write(tmp_path, HEADER + other + BEGIN))
    assert checks(report) == ["W1"]
    assert "no quiesce event the harness knows of some-dma-device" in report.violations[0].detail


def test_recorded_zoo_boot() -> None:
    """The real boot: NVMe stays enabled and AHCI keeps FIS receive on for
    its empty ports (neither driver has an EBS handler), every other device
    is quiesced, nothing DMAs after the teardown began."""
    report = analyze_device_trace(ZOO)
    assert report.qemu == "7.2.22" and report.judged
    assert checks(report) == ["W1", "W1"]
    nvme, ahci = report.violations
    assert nvme.detail.startswith("nvme 00:02.0 (nvme) still armed")
    assert ahci.detail.startswith("ahci 00:1f.2 (ich9-ahci) still armed")
    assert "port 1 since line 2576" in ahci.detail and "port 5 since line 2608" in ahci.detail
    assert "port 0" not in ahci.detail       # FRE cleared after its last command
    kinds = {d.kind: d for d in devices.driven(report)}
    assert set(kinds) == {"virtio-blk", "nvme", "xhci", "virtio-net", "virtio-gpu", "e1000e",
                          "ahci"}
    assert all(not d.dma_after for d in kinds.values())
    assert kinds["xhci"].quiesce_text.startswith("usb_xhci_stop")
    assert kinds["e1000e"].quiesce_text.startswith("RCTL=0x0")
    for storage in ("virtio-blk", "nvme", "xhci", "ahci"):
        assert kinds[storage].dma_before > 0, storage


# ------------------------------------------------------------- bad input


@pytest.mark.parametrize(("text", "line", "reason"), [
    (HEADER + NET_UP[:-1], 8, "cut: the last line has no newline"),
    (HEADER + "virtio_set_status vdev 0x1 val \x01\n", 2, "non-printable"),
    (HEADER + "\xff\xfe garbage\n", 2, "non-ASCII"),
    (HEADER + "not a trace line at all\n", 2, "none the harness enables"),
    # QEMU 6.2's pci_cfg_write had no bus number: "%s %02u:%u @0x%x <- 0x%x"
    (HEADER + "pci_cfg_write virtio-net-pci 04:0 @0x4 <- 0x7\n", 2,
     "does not have QEMU 7.2.22's format (the trace says qemu=7.2.22)"),
    ("# ebs-harness device trace v9 qemu=7.2.22\n", 1, "not a v1 device trace"),
])
def test_bad_traces_are_refused(tmp_path: Path, text: str, line: int, reason: str) -> None:
    path = tmp_path / "t.log"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DeviceTraceError) as caught:
        parse_device_trace(path)
    assert caught.value.line == line
    assert reason in str(caught.value)


def test_empty_trace_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DeviceTraceError, match="empty"):
        parse_device_trace(write(tmp_path, ""))


def test_raw_qemu_trace_without_header_is_read(tmp_path: Path) -> None:
    parsed = parse_device_trace(write(tmp_path, NET_UP + BEGIN))
    assert parsed.qemu is None and len(parsed.events) == 8


def test_cli_refuses_a_cut_trace_in_one_line(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    log = Path(__file__).resolve().parent.parent / "data" / "callback-depth2.log"
    cut = write(tmp_path, HEADER + NET_UP[:-5])
    assert cli.main(["analyze-log", str(log), "--device-trace", str(cut)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{cut}:8: cut" in err[0]


def test_cli_device_verdicts_decide_the_exit_status(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    log = Path(__file__).resolve().parent.parent / "data" / "callback-depth2.log"
    armed = write(tmp_path, HEADER + NET_UP + BEGIN + END)
    assert cli.main(["analyze-log", str(log), "--device-trace", str(armed)]) == 1
    out = capsys.readouterr().out
    assert "W1: virtio-net 00:04.0 (virtio-net-pci) still armed" in out
    quiet = write(tmp_path, HEADER + NET_UP + NET_RESET + BEGIN + END, "quiet.log")
    assert cli.main(["analyze-log", str(log), "--device-trace", str(quiet), "--json",
                     "--html", str(tmp_path / "t.html")]) == 0
    assert "device lane" in (tmp_path / "t.html").read_text()


def test_trace_events_per_kind() -> None:
    events = device_models.trace_events(["virtio-blk", "nvme", "xhci"])
    assert events[:2] == ("fw_cfg_select", "pci_cfg_write")
    assert "virtio_blk_handle_read" in events and "pci_nvme_map_prp" in events
    assert len(events) == len(set(events))
    assert all(e in devicetrace.FORMATS for e in events)


def test_fields_are_read_in_their_formats_base(tmp_path: Path) -> None:
    """``<- 0x%x`` is hex: 0x13 has bus mastering off (decimal 13 would have
    it on), 0x24 on (decimal 24 off)."""
    off = "pci_cfg_write some-dma-device 00:09.0 @0x4 <- 0x13\n"
    report = analyze_device_trace(write(tmp_path, HEADER + off + BEGIN))
    assert report.violations == () and list(devices.driven(report)) == []
    on = "pci_cfg_write some-dma-device 00:09.0 @0x4 <- 0x24\n"
    report = analyze_device_trace(write(tmp_path, HEADER + on + BEGIN))
    assert checks(report) == ["W1"]


def test_the_firmware_log_names_the_adversarys_nic_and_the_probes_volumes(
        tmp_path: Path) -> None:
    """From the boot's EBST lines: who armed a device, and whether the probe
    read the canary through it (match=0 on a volume is a no, not a yes)."""
    lines = ["EBST version v=1 module=EbsAdversaryDxe",
             "EBST adversary-nic state=armed pci=00:04.0 rx=8 ring=0xE47D000",
             "EBST adversary-nic state=absent",
             ("EBST probe step=canary-device n=0 match=1 bytes=59 status=0x0 "
              "path=PciRoot(0x0)/Pci(0x4,0x0)/NVMe(0x1,00-00-00-00-00-00-00-00)"),
             ("EBST probe step=canary-device n=1 match=0 bytes=0 status=0x800000000000000E "
              "path=PciRoot(0x0)/Pci(0x1F,0x2)/Sata(0x0,0xFFFF,0x0)"),
             "EBST probe step=canary-devices count=2 matched=1"]
    events = trace.parse_text("\n".join(lines) + "\n").events
    assert devices.owners_in_log(events) == {"00:04.0": "EbsAdversaryDxe"}
    assert devices.canary_reads(events) == {"00:04.0": True, "00:1f.2": False}
    report = analyze_device_trace(write(tmp_path, HEADER + NET_UP + BEGIN + END), events)
    (w1,) = report.violations
    assert w1.culprit == "EbsAdversaryDxe"
    text = devices.render_text(report)
    assert "canary read through it: yes; armed by EbsAdversaryDxe" in text
