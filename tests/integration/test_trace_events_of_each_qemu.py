"""The device trace read with the formats of the QEMU that wrote it, for
each QEMU the harness runs: Debian 12's 7.2 (the system's), the harness's
10.0 (``ebs-harness build-qemu``) and bookworm-backports' 10.0.2 (unpacked
under the cache for SEV-SNP)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import scenario
from harness.analysis import devicetrace, trace_events
from harness.build import edk2, qemu
from harness.build.progress import StderrProgress
from harness.pytestplugin import session_emulated_caps
from harness.vm import host
from harness.vm.host import HostCaps

#: 10.0 changed this event's format (7.2: "(ICR causes %u)").
E1000E_RX_10 = "e1000e_rx_written_to_guest Received packet written to guest (queue 0)\n"


@pytest.fixture(scope="session")
def ours(pytestconfig: pytest.Config) -> HostCaps:
    return session_emulated_caps(pytestconfig)


def _formats(binary: str | Path) -> dict[str, str]:
    path = trace_events.events_file(binary)
    assert path is not None, f"{binary} has no trace-events-all"
    return trace_events.load(path)


def test_each_qemu_has_its_formats(ebs_host_caps: HostCaps, ours: HostCaps) -> None:
    newer = qemu.fetch_newer_qemu(StderrProgress())
    debian, harness, backports = (_formats(q) for q in (ebs_host_caps.qemu, ours.qemu, newer))
    wanted = list(devicetrace.FORMATS)
    for formats, version in ((debian, ebs_host_caps.qemu_version),
                             (harness, ours.qemu_version), (backports, "10.0.2")):
        assert trace_events.lacking(formats, wanted, version) is None, version
    assert debian["e1000e_rx_written_to_guest"].endswith("(ICR causes %u)")
    assert harness["e1000e_rx_written_to_guest"].endswith("(queue %d)")
    assert backports["e1000e_rx_written_to_guest"] == harness["e1000e_rx_written_to_guest"]


def test_a_10_0_line_is_read_with_10_0s_format(ebs_host_caps: HostCaps, ours: HostCaps,
                                               tmp_path: Path) -> None:
    trace = tmp_path / "t.log"
    trace.write_text(devicetrace.header(ours.qemu_version, trace_events.events_file(ours.qemu))
                     + E1000E_RX_10)
    parsed = devicetrace.parse_device_trace(trace)
    assert parsed.notes == () and parsed.events[0].num("causes") == 0
    # the control: the same line written by Debian's 7.2 is refused
    trace.write_text(devicetrace.header(ebs_host_caps.qemu_version,
                                    trace_events.events_file(ebs_host_caps.qemu))
                     + E1000E_RX_10)
    with pytest.raises(devicetrace.DeviceTraceError, match="e1000e_rx_written_to_guest does not "
                       f"have QEMU {ebs_host_caps.qemu_version}'s format"):
        devicetrace.parse_device_trace(trace)


def test_a_boot_on_backports_10_0_2_is_judged_with_its_own_formats(
        ebs_firmware: edk2.Firmware, ebs_artifacts: Path) -> None:
    """A real boot on the third QEMU: its device trace names its
    trace-events-all, is read with it, and W1 names the devices the stock
    drivers leave armed (docs/devices.md), as on the other two."""
    newer = qemu.fetch_newer_qemu(StderrProgress())
    caps = host.cached_probe(str(newer), tcg_only=True)
    chosen = scenario.Scenario(devices=("virtio-blk", "nvme", "ahci", "xhci-storage"),
                               requeue_depth=2, accel="tcg")
    result = scenario.run_scenario(ebs_firmware, chosen, ebs_artifacts, caps=caps)
    header = (result.artifacts / scenario.DEVICE_TRACE).read_text().splitlines()[0]
    assert header == (f"# ebs-harness device trace v1 qemu=10.0.2 "
                      f"events={trace_events.events_file(newer)}")
    assert result.devices is not None and result.devices.judged, result.judgement.device_notes
    assert result.devices.notes == ()
    assert {v.detail.split(" ")[0] for v in result.violations if v.check == "W1"} == \
        {"nvme", "ahci"}
    assert result.failed_checks() == {"W1"}
