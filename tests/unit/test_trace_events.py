"""harness.analysis.trace_events: QEMU's trace-event formats, from its
``trace-events-all``, and the device trace read with them."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.analysis import devicetrace, trace_events

SNIPPET = r'''
# hw/ide/trace-events
ahci_mem_write_host(void *s, unsigned size, const char *reg, uint64_t addr, uint64_t val) "ahci(%p) write%u [reg:%s] @ 0x%"PRIx64": 0x%016"PRIx64
disable pci_nvme_admin_cmd(uint16_t cid, uint16_t sqid, uint8_t opcode, const char *opname) "cid %"PRIu16" sqid %"PRIu16" opc 0x%"PRIx8" opname '%s'"
e1000e_rx_written_to_guest(int queue_idx) "Received packet written to guest (queue %d)"
quoted(const char *s) "say \"%s\""
'''

DEBIAN_72 = Path("/usr/share/qemu/trace-events-all")


def test_formats_spell_out_the_pri_macros() -> None:
    formats = trace_events.parse_trace_events(SNIPPET)
    assert formats == {
        "ahci_mem_write_host": "ahci(%p) write%u [reg:%s] @ 0x%lx: 0x%016lx",
        "pci_nvme_admin_cmd": "cid %u sqid %u opc 0x%x opname '%s'",
        "e1000e_rx_written_to_guest": "Received packet written to guest (queue %d)",
        "quoted": 'say "%s"',
    }


@pytest.mark.skipif(not DEBIAN_72.is_file(), reason=f"no {DEBIAN_72} (Debian's qemu-system-data)")
def test_debians_72_formats_are_the_fallback() -> None:
    """Read from Debian 12's QEMU 7.2, every format the harness knows is
    the one :data:`devicetrace.FORMATS` keeps as the fallback."""
    formats = trace_events.load(DEBIAN_72)
    assert {name: formats[name] for name in devicetrace.FORMATS} == \
        {name: fmt for name, (fmt, _) in devicetrace.FORMATS.items()}
    assert trace_events.events_file("/usr/bin/qemu-system-x86_64") == DEBIAN_72


def test_a_lacking_event_is_named_in_one_line() -> None:
    formats = trace_events.parse_trace_events(SNIPPET)
    line = trace_events.lacking(formats, ["e1000e_rx_written_to_guest", "lsi_reset",
                                          "lsi_do_dma"], "9.9.9")
    assert line == ("QEMU 9.9.9 has no trace event lsi_do_dma, lsi_reset: not traced, its "
                    "device judged without it")
    assert trace_events.lacking(formats, ["quoted"], "9.9.9") is None


def test_a_trace_of_an_unknown_qemu_is_read_with_72s_formats(tmp_path: Path) -> None:
    trace = tmp_path / "t.log"
    trace.write_text(devicetrace.header("0.0.1") + "virtio_set_status vdev 0x55d0 val 15\n")
    parsed = devicetrace.parse_device_trace(trace)
    assert parsed.events[0].fields == {"vdev": "0x55d0", "val": "15"}
    (note,) = parsed.notes
    assert note == ("no trace-events-all of QEMU 0.0.1 (the trace names none): read with "
                    "QEMU 7.2's formats")


def test_the_header_names_the_formats_it_was_written_with(tmp_path: Path) -> None:
    events = tmp_path / "trace-events-all"
    events.write_text(SNIPPET)
    trace = tmp_path / "t.log"
    line = "e1000e_rx_written_to_guest Received packet written to guest (queue 1)\n"
    trace.write_text(devicetrace.header("9.9.9", events) + line)
    assert trace.read_text().splitlines()[0] == \
        f"# ebs-harness device trace v1 qemu=9.9.9 events={events}"
    parsed = devicetrace.parse_device_trace(trace)
    assert parsed.events[0].num("causes") == 1
    (note,) = parsed.notes   # the snippet lacks most of the harness's events
    assert note.startswith("QEMU 9.9.9 has no trace event ahci_cmd_done, ")
    events.unlink()
    with pytest.raises(devicetrace.DeviceTraceError, match="does not have QEMU 9.9.9's format"):
        devicetrace.parse_device_trace(trace)
