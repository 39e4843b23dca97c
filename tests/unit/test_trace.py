"""harness.analysis.trace and harness.analysis.symbols on trimmed real logs and logs derived from them.

The logs come from tests/data/ (see its README.md): real OVMF boot output
with trace lines. Negative controls are derived from a passing log by small
edits, one per verdict, and each asserts that exactly its check fails.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from harness.analysis import symbols, trace
from harness.analysis.checks import State
from harness.analysis.symbols import (
    ImageLoad,
    Symbolizer,
    parse_image_load,
    parse_map,
    write_index,
)
from harness.analysis.trace import (
    EbsEnter,
    IommuMap,
    NotifyBegin,
    TeardownBegin,
    analyze_log,
    build_timeline,
    check_timeline,
    parse_text,
    parsing_while_written,
)
from harness.errors import TraceFormatError

DATA = Path(__file__).resolve().parent.parent / "data"
FW = DATA / "fw-ref"


CALLBACK = DATA / "callback-depth2.log"          # real captures (README.md here)
LEGACY2 = DATA / "legacy-depth2.log"
LEGACY1 = DATA / "synthetic-legacy-depth1.log"
STALE = DATA / "synthetic-callback-stale.log"
NONE_LEAK = DATA / "synthetic-none-leak.log"


def text_of(path: Path) -> str:
    return path.read_bytes().decode("latin-1")


def checks(text: str, name: str = "<derived>") -> list[str]:
    tl = build_timeline(parse_text(text, name))
    return sorted({v.check for v in check_timeline(tl)})


def edit(text: str, old: str, new: str, count: int = 1) -> str:
    """Replace ``old`` (a regex) once; the test fails if it is not there."""
    out, n = re.subn(old, new, text, count=count, flags=re.MULTILINE)
    assert n == count, f"derivation did not apply: {old!r}"
    return out


# ------------------------------------------------------------------ parsing


def test_parse_keeps_trace_lines_in_order_and_ignores_the_rest() -> None:
    t = trace.parse_log(CALLBACK)
    assert t.events and [e.seq for e in t.events] == list(range(1, len(t.events) + 1))
    assert t.lines > len(t.events)          # unrelated lines were there, and skipped
    assert all(not e.describe().startswith("EBST") for e in t.events)
    enter = next(e for e in t.events if isinstance(e, EbsEnter))
    assert enter.mapkey > 0
    assert any(i.name == "IoMmuDxe" for i in t.images)
    cfg = t.config
    assert cfg is not None and cfg.maphead > 0 and cfg.sharedbit in (0, 52)


def test_crlf_and_escape_prefix_and_partial_last_line() -> None:
    text = ("junk\r\n\x1b[0m\x1b[37m\x1b[40mEBST version v=1 module=DxeCore\r\n"
            "\rEBST ebs-enter mapkey=0x10\r\nEBST ebs-return status=0x0\r\nEBST probe-par")
    t = parse_text(text)
    assert [e.name for e in t.events] == ["version", "ebs-enter", "ebs-return"]
    assert t.partial_tail and t.lines == 5
    assert build_timeline(t).attempts[0].succeeded


def test_typed_fields() -> None:
    t = parse_text("EBST version v=1 module=IoMmuDxe\n"
                   "EBST iommu-map map=0x1e5f0018 op=5 host=0x1000 dev=0x2000 pages=3 live=1 "
                   "extra=kept\n")
    m = t.events[1]
    assert isinstance(m, IommuMap)
    assert (m.map, m.op, m.host, m.dev, m.pages, m.live) == (0x1E5F0018, 5, 0x1000, 0x2000, 3, 1)
    assert m.get("extra") == "kept" and m.line == 2 and m.seq == 2
    # A key is found whole, not inside another key or the event name.
    assert m.get("ap") is None and m.get("iommu") is None and m.get("map") == "0x1e5f0018"
    assert m.fields[0] == ("map", "0x1e5f0018") and len(m.fields) == 7
    assert m.describe() == ("iommu-map map=0x1e5f0018 op=5 host=0x1000 dev=0x2000 pages=3 "
                            "live=1 extra=kept")


def test_unknown_event_is_kept_as_plain_event() -> None:
    t = parse_text("EBST version v=1 module=X\nEBST brand-new thing=1\n")
    assert type(t.events[1]) is trace.TraceEvent and t.events[1].get("thing") == "1"


@pytest.mark.parametrize("line, reason", [
    ("EBST version v=2 module=DxeCore", "trace format version 2"),
    ("EBST iommu-map map=0x1 op=1 host=0x1 dev=0x2 pages=1", "missing field 'live'"),
    ("EBST iommu-map map=zz op=1 host=0x1 dev=0x2 pages=1 live=1", "is not a number"),
    ("EBST notify-begin event=0x1 fn=0x2 ctx=0x3 tpl=8 garbage", "malformed field"),
    ("EBST ebs-enter mapkey=0x1 mapkey=0x2", "given twice"),
    ("EBST Ebs-Enter mapkey=0x1", "malformed event name"),
    ("EBST ebs-enter mapkey=0x1\x07", "non-printable"),
    ("EBST ebs-enter mapkey=0x1\tx=1", "non-printable"),
    ("EBST ebs-enter  mapkey=0x1", "malformed field ''"),
    ("EBST ebs-enter mapkey=", "malformed field 'mapkey='"),
    ("EBST ebs-enter Mapkey=0x1", "malformed field 'Mapkey=0x1'"),
])
def test_garbage_in_a_trace_line_is_an_error_naming_the_line(line: str, reason: str) -> None:
    text = "boot\nEBST version v=1 module=DxeCore\n" + line + "\n"
    with pytest.raises(TraceFormatError) as info:
        parse_text(text, "x.log")
    assert info.value.line == 3
    assert reason in str(info.value) and str(info.value).startswith("x.log:3: ")
    assert "\n" not in str(info.value)


def test_trace_lines_without_version_are_refused() -> None:
    with pytest.raises(TraceFormatError, match="without a 'version' line"):
        parse_text("EBST ebs-enter mapkey=0x1\nEBST ebs-return status=0x0\n")


def test_log_ending_before_ebs_returned_is_an_error_not_a_pass() -> None:
    text = text_of(CALLBACK)
    cut = text[:text.index("EBST ebs-return")]
    n_lines = cut.count("\n")
    with pytest.raises(TraceFormatError) as info:
        build_timeline(parse_text(cut, "cut.log"))
    assert f"log ends at line {n_lines} before ExitBootServices returned" in str(info.value)
    assert info.value.exit_status == 2


def test_log_without_ebs_is_an_error() -> None:
    with pytest.raises(TraceFormatError, match="no ExitBootServices call"):
        build_timeline(parse_text("EBST version v=1 module=DxeCore\n"))


def test_unbalanced_notify_end_is_an_error() -> None:
    text = edit(text_of(CALLBACK), r"^EBST notify-end event=(\S+) fn=\S+",
                r"EBST notify-end event=\1 fn=0xdead")
    with pytest.raises(TraceFormatError, match="does not close the notify-begin"):
        build_timeline(parse_text(text))


# ----------------------------------------------------------------- timeline


def test_timeline_nesting_and_attempts() -> None:
    # The real scenarios have no nested dispatch; the synthetic log has one.
    tl = build_timeline(trace.parse_log(DATA / "synthetic-callback-depth2.log"))
    (attempt,) = tl.attempts
    assert attempt.succeeded and len(attempt.teardowns) == 1
    nested = [d for d in attempt.dispatches if d.depth == 1]
    assert nested, "the TPL_NOTIFY dispatch inside a TPL_CALLBACK handler"
    outer = next(d for d in attempt.dispatches if d.begin.seq == nested[0].parent)
    assert outer.begin.seq < nested[0].begin.seq < nested[0].end.seq < outer.end.seq
    assert nested[0].begin.tpl > outer.begin.tpl
    assert attempt.teardowns[0].host is None        # the core called it


def test_stale_mapkey_gives_a_failed_then_a_successful_attempt() -> None:
    tl = build_timeline(trace.parse_log(STALE))
    assert [a.succeeded for a in tl.attempts] == [False, True]
    assert not tl.attempts[0].teardowns and len(tl.attempts[1].teardowns) == 1


def test_legacy_teardown_runs_in_iommu_handler() -> None:
    sym = Symbolizer(trace.parse_log(LEGACY1).images, FW)
    tl = build_timeline(trace.parse_log(LEGACY1))
    host = tl.attempts[0].teardowns[0].host
    assert host is not None
    assert sym.symbolize(host.begin.fn) == "IoMmuDxe!IoMmuUnmapAllMappings"


# ----------------------------------------------------------------- verdicts


@pytest.mark.parametrize("path", [CALLBACK, LEGACY1, STALE], ids=lambda p: p.name)
def test_good_logs_pass(path: Path) -> None:
    report, _ = analyze_log(path, FW)
    assert report.violations == (), [v.detail for v in report.violations]


REAL = {  # real captures of the patched firmware (tests/data/make_real_logs.py)
    "callback-depth2.log": set(),
    "callback-stale.log": set(),
    # the stock scheme: the adversary's late Map() allocates (V5)
    "legacy-depth1.log": {"V5"},
    "legacy-depth2.log": {"V1", "V3", "V4", "V5"},
    "none-leak.log": {"V2", "V4"},
    "stock-noknobs.log": set(),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_logs_give_the_design_verdicts(name: str) -> None:
    report, _ = analyze_log(DATA / name)
    assert {v.check for v in report.violations} == REAL[name], \
        [v.detail for v in report.violations]


def test_real_logs_symbolize_with_their_builds_symbols() -> None:
    report, sym = analyze_log(DATA / "legacy-depth2.log", DATA / "fw-emu")
    (td,) = report.timeline.teardowns
    assert td.host is not None
    assert sym.symbolize(td.host.begin.fn) == "IoMmuDxe!IoMmuUnmapAllMappings"
    v1 = [v for v in report.violations if v.check == "V1"]
    assert v1 and v1[0].detail.startswith("handler EbsAdversaryDxe!")
    cfg = report.timeline.trace.config
    assert cfg is not None and sym.symbol_address("IoMmuDxe", "mMapInfos") == cfg.maphead


def test_stock_boot_without_iommu_expects_no_teardown() -> None:
    report, _ = analyze_log(DATA / "stock-noknobs.log")
    assert report.timeline.trace.config is None
    assert any("no teardown is expected" in a for a in report.anomalies)


def test_legacy_depth2_fails_v1_and_v3_naming_the_adversary() -> None:
    report, _ = analyze_log(LEGACY2, FW)
    found = {v.check for v in report.violations}
    # The real adversary leaves its late CommonBuffer mapped: V4 as well;
    # the stock scheme let it allocate after the memory map was terminated: V5.
    assert found == {"V1", "V3", "V4", "V5"}
    v1 = next(v for v in report.violations if v.check == "V1")
    assert "EbsAdversaryDxe" in v1.detail and "began after teardown-begin seq" in v1.detail
    assert any("device-access by EbsAdversaryDxe" in v.detail for v in report.violations)


def test_none_with_leak_fails_v2_and_v4() -> None:
    report, _ = analyze_log(NONE_LEAK, FW)
    assert sorted({v.check for v in report.violations}) == ["V2", "V4"]
    v4 = next(v for v in report.violations if v.check == "V4")
    assert "still live at ebs-return" in v4.detail and "map=0x" in v4.detail


def test_v1_negative_control_handler_open_at_teardown() -> None:
    # Move the callback teardown into the last handler: it is still running.
    text = text_of(CALLBACK)
    block = re.search(r"^EBST ebs-callback.*?EBST teardown-end[^\n]*\n", text, re.MULTILINE | re.DOTALL)
    assert block
    text = text.replace(block.group(0), "")
    ends = list(re.finditer(r"^EBST notify-end[^\n]*\n", text, re.MULTILINE))
    last = ends[-1]
    text = text[:last.start()] + block.group(0) + text[last.start():]
    report = check_timeline(build_timeline(parse_text(text)))
    assert {v.check for v in report} == {"V1"}
    assert "was still running at teardown-begin" in report[0].detail


def test_v2_negative_control_two_teardowns() -> None:
    text = text_of(CALLBACK)
    block = re.search(r"^EBST teardown-begin.*?EBST teardown-end[^\n]*\n", text, re.MULTILINE | re.DOTALL)
    assert block
    second = re.sub(r"live=\d+", "live=0", block.group(0))
    second = re.sub(r"^EBST teardown-unmap[^\n]*\n", "", second, flags=re.MULTILINE)
    second = second.replace("unmapped=" + re.search(r"unmapped=(\d+)", second)[1],  # type: ignore[index]
                            "unmapped=0")
    text = text.replace(block.group(0), block.group(0) + second)
    assert checks(text) == ["V2"]


def test_v2_negative_control_teardown_in_failed_ebs() -> None:
    text = edit(text_of(STALE), r"^(EBST ebs-fail)",
                r"EBST teardown-begin scheme=callback live=0\n"
                r"EBST teardown-end unmapped=0 live=0\n\1")
    # V2 is the check; the probe's recheck mapping after this (bogus) teardown
    # is also a V3 finding, and the teardown that unmapped nothing a V4 one.
    assert checks(text) == ["V2", "V3", "V4"]
    v2 = [v for v in check_timeline(build_timeline(parse_text(text))) if v.check == "V2"]
    assert len(v2) == 1 and v2[0].detail.startswith("failed EBS attempt 1")


def test_v2_negative_control_teardown_outside_exit_boot_services() -> None:
    # A teardown before the first ebs-enter: no ExitBootServices call holds it.
    text = edit(text_of(CALLBACK), r"^(EBST ebs-enter)",
                r"EBST teardown-begin scheme=callback live=0\n"
                r"EBST teardown-end unmapped=0 live=0\n\1")
    # (The adversary's maps after it are V3 findings too: V3 counts from the
    # first teardown-begin.)
    assert checks(text) == ["V2", "V3"]
    v2 = [v for v in check_timeline(build_timeline(parse_text(text))) if v.check == "V2"]
    assert len(v2) == 1 and "outside any ExitBootServices call" in v2[0].detail


def test_v4_negative_control_teardown_never_ended() -> None:
    text = edit(text_of(CALLBACK), r"^EBST teardown-end[^\n]*\n", "")
    found = check_timeline(build_timeline(parse_text(text)))
    assert [v.check for v in found] == ["V4"]
    assert "never ended" in found[0].detail


def test_v3_negative_control_device_access_after_teardown() -> None:
    text = edit(text_of(CALLBACK), r"^(EBST ebs-return)",
                r"EBST device-access module=EbsAdversaryDxe kind=io map=0x0 host=0x0 dev=0x0 "
                r"pages=0\n\1")
    assert checks(text) == ["V3"]


def test_v3_ignores_the_teardowns_own_unmaps() -> None:
    # A firmware whose teardown also logs iommu-unmap for each entry is still quiet.
    text = edit(text_of(CALLBACK), r"^EBST teardown-unmap (map=\S+ op=\S+ host=\S+ dev=\S+ "
                                   r"pages=\S+)",
                r"EBST iommu-unmap \1 live=0\nEBST teardown-unmap \1")
    assert "V3" not in checks(text)


def test_v4_negative_control_teardown_leaves_a_mapping() -> None:
    text = edit(text_of(CALLBACK), r"^EBST teardown-end unmapped=(\d+) live=0",
                r"EBST teardown-end unmapped=\1 live=1")
    assert checks(text) == ["V4"]


def test_v4_negative_control_unmapped_entry_missing_from_teardown() -> None:
    text = edit(text_of(CALLBACK), r"^EBST teardown-unmap[^\n]*\n", "")
    assert checks(text) == ["V4"]
    details = [v.detail for v in check_timeline(build_timeline(parse_text(text)))]
    assert any("reports live=0 but the log leaves 1 mapping(s) live" in d for d in details)
    assert any("still live at ebs-return" in d for d in details)


def test_v6_negative_control_a_live_mappings_bounce_page_given_again() -> None:
    """The log maps, unmaps and maps dev=0xE46C000 again (reuse after the
    unmap: no violation); a second live mapping given that page is V6, and
    only V6."""
    text = text_of(CALLBACK)
    assert checks(text) == []
    text = edit(text, r"^(EBST iommu-map map=0xE2F0D98 op=1 host=0xE2A2000) dev=0xE46E000",
                r"\1 dev=0xE46C000")
    assert checks(text) == ["V6"]
    [found] = [v for v in check_timeline(build_timeline(parse_text(text))) if v.check == "V6"]
    assert "bounce pages 0xe46c000..0xe46cfff while map=0xe2f0c98" in found.detail
    events = parse_text(text).events
    assert [events[s - 1].name for s in found.seqs] == ["iommu-map", "iommu-map"]


def test_v6_counts_no_common_buffer_mapped_in_place() -> None:
    """A mapping whose device address is its host address has no bounce
    pages: a common buffer at a live bounce buffer's address is not V6's."""
    text = edit(text_of(CALLBACK),
                r"^EBST iommu-map map=0xE2F0B18 op=2 host=0xE486000 dev=0xE486000",
                "EBST iommu-map map=0xE2F0B18 op=2 host=0xE46C000 dev=0xE46C000")
    assert "V6" not in checks(text)


def test_violation_texts_quote_seq_numbers_that_exist() -> None:
    report, _ = analyze_log(LEGACY2, FW)
    events = report.timeline.trace.events
    for v in report.violations:
        assert v.seqs
        for s in v.seqs:
            assert 1 <= s <= len(events)
            assert f"seq {s}" in v.detail or isinstance(events[s - 1], (NotifyBegin,
                                                                        TeardownBegin))


# -------------------------------------------------------------- symbolizing


def test_image_load_line() -> None:
    load = parse_image_load(
        "Loading driver at 0x0001ECC7000 EntryPoint=0x0001ECCA876 IoMmuDxe.efi", 7)
    assert load == ImageLoad("IoMmuDxe", 0x1ECC7000, 0x1ECCA876, 7)
    assert parse_image_load("Loading driver 9B680FCE-AD6B-4F3A-B60B-F59899003443", 1) is None


def test_symbolize_from_debug_and_map_files() -> None:
    # fw-ref holds symbols of the reference build the synthetic logs load.
    images = trace.parse_log(DATA / "synthetic-callback-depth2.log").images
    sym = Symbolizer(images, FW)
    iommu = next(i for i in images if i.name == "IoMmuDxe")
    core = next(i for i in images if i.name == "DxeCore")
    assert sym.symbolize(iommu.base + 0x12AC) == "IoMmuDxe!IoMmuExitBoot"      # .debug
    assert sym.symbolize(iommu.base + 0x12AC + 4) == "IoMmuDxe!IoMmuExitBoot+0x4"
    assert sym.symbolize(core.base + 0x10AED) == "DxeCore!CoreExitBootServices"  # .map
    assert sym.symbol_address("IoMmuDxe", "mMapInfos") == iommu.base + 0x57B0
    # Without symbol files: Image+offset; outside every image: the raw address.
    bare = Symbolizer(images)
    assert bare.symbolize(iommu.base + 0x12AC) == "IoMmuDxe+0x12ac"
    assert bare.symbolize(0x1234) == "0x1234"


def test_symbols_of_another_build_are_not_used() -> None:
    # The entry point in the log disagrees with _ModuleEntryPoint's RVA.
    sym = Symbolizer([ImageLoad("IoMmuDxe", 0x100000, 0x100240, 1)], FW)
    assert sym.symbolize(0x100000 + 0x12AC) == "IoMmuDxe+0x12ac"
    assert sym.symbol_address("IoMmuDxe", "mMapInfos") is None


def test_an_index_entry_is_read_when_asked_and_a_malformed_one_falls_back(
        tmp_path: Path) -> None:
    """symbols.json gives the modules it names; an entry that is not
    well-formed gives way to the module's own .debug file (the control: the
    same entry, well-formed, is what is used)."""
    modules = tmp_path / "modules"
    shutil.copytree(FW / "modules", modules)
    write_index(modules)
    images = trace.parse_log(DATA / "synthetic-callback-depth2.log").images
    iommu = next(i for i in images if i.name == "IoMmuDxe")
    index = json.loads((modules / "symbols.json").read_text())
    index["modules"]["IoMmuDxe"]["symbols"] = [
        [n, v + 0x10 if n == "IoMmuExitBoot" else v, z, f]
        for n, v, z, f in index["modules"]["IoMmuDxe"]["symbols"]]
    (modules / "symbols.json").write_text(json.dumps(index))
    assert Symbolizer(images, tmp_path).symbolize(iommu.base + 0x12BC) == \
        "IoMmuDxe!IoMmuExitBoot"                    # the index's (moved) symbol
    index["modules"]["IoMmuDxe"]["symbols"] = "not a list of symbols"
    (modules / "symbols.json").write_text(json.dumps(index))
    assert Symbolizer(images, tmp_path).symbolize(iommu.base + 0x12AC) == \
        "IoMmuDxe!IoMmuExitBoot"                    # IoMmuDxe.debug's


def test_preload_builds_each_module_once(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """What a boot builds while the guest runs is what the judgement uses:
    symbolizing after preload() builds no module again."""
    modules = tmp_path / "modules"
    shutil.copytree(FW / "modules", modules)
    write_index(modules)
    built: list[str] = []

    class Counted(symbols.ModuleSymbols):
        def __post_init__(self) -> None:
            built.append(self.name)
            super().__post_init__()

    monkeypatch.setattr(symbols, "ModuleSymbols", Counted)
    symbols.preload(tmp_path)
    named = json.loads((modules / "symbols.json").read_text())["modules"]
    assert sorted(built) == sorted(named) and len(named) > 1
    images = trace.parse_log(DATA / "synthetic-callback-depth2.log").images
    iommu = next(i for i in images if i.name == "IoMmuDxe")
    assert Symbolizer(images, tmp_path).symbolize(iommu.base + 0x12AC) == \
        "IoMmuDxe!IoMmuExitBoot"
    assert len(built) == len(named)     # nothing built twice


def written_slowly(path: Path, data: bytes, pieces: int = 40) -> threading.Thread:
    """A writer appending ``data`` to ``path`` in pieces cut anywhere,
    lines included, as QEMU's debug port writes a log."""
    step = -(-len(data) // pieces)

    def run() -> None:
        with open(path, "ab") as log:
            for at in range(0, len(data), step):
                log.write(data[at:at + step])
                log.flush()
                time.sleep(0.005)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_log_parsed_while_written_is_the_log_parsed_at_the_end(tmp_path: Path) -> None:
    """Lines cut across writes, the file created after the parse began, a
    last line without its newline: the trace is the one parse_log reads
    from the finished file."""
    data = CALLBACK.read_bytes() + b"EBST probe step=cu"
    log = tmp_path / "debugcon.log"
    with parsing_while_written(log) as parsed:
        time.sleep(0.05)
        written_slowly(log, data).join()
        following = parsed()
    whole = trace.parse_log(log)
    assert following.partial_tail and whole.partial_tail
    assert following.lines == whole.lines > 100
    assert following.events == whole.events
    assert following.images == whole.images


def test_a_bad_line_written_late_fails_the_parse_naming_it(tmp_path: Path) -> None:
    log = tmp_path / "debugcon.log"
    good = CALLBACK.read_bytes()
    bad_line = good.count(b"\n") + 1
    with parsing_while_written(log) as parsed:
        written_slowly(log, good + b"EBST iommu-map map=zz\n").join()
        with pytest.raises(TraceFormatError, match=f":{bad_line}:"):
            parsed()


def test_leaving_the_block_ends_the_parse_without_a_file(tmp_path: Path) -> None:
    """A boot that failed before its log existed: the block ends at once."""
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="the boot failed"), \
            parsing_while_written(tmp_path / "never.log"):
        raise RuntimeError("the boot failed")
    assert time.monotonic() - started < 5


def test_parse_map_sections() -> None:
    text = (" .text.IoMmuMap\n                0x0000000000003161      0x3b5 x.o\n"
            " .data.rel.local.mMapInfos\n                0x00000000000057b0       0x10 x.o\n"
            " .text.Short    0x0000000000000100       0x10 x.o\n")
    got = {(s.name, s.value, s.size, s.is_function) for s in parse_map(text)}
    assert got == {("IoMmuMap", 0x3161, 0x3B5, True), ("mMapInfos", 0x57B0, 0x10, False),
                   ("Short", 0x100, 0x10, True)}


# ------------------------------------------------- the ExitBootServices contract

SEV_LOG = DATA / "emulated-sev-callback-depth2.log"
PCD_LOG = DATA / "emulated-sev-pcd-in-teardown.log"
MEMBER = "IoMmuDxe!IoMmuExitBootServicesTeardown"


def _contract(text: str, fw: str = "fw-sev") -> trace.LogReport:
    path = Path("/dev/null")
    parsed = parse_text(text, str(path))
    timeline = build_timeline(parsed)
    sym = Symbolizer(parsed.images, DATA / fw)
    return trace.judge_log(timeline, sym)


def test_sev_callback_log_holds_the_contract_and_names_other_drivers() -> None:
    """BdsDxe's handler frees pool after the memory map was terminated: a C2
    finding about it. The adversary's late Map() was refused (iommu-late),
    so it allocated nothing: no finding about it, and V5 holds."""
    report = _contract(SEV_LOG.read_text(encoding="latin-1"))
    assert report.contract_judged and report.violations == ()
    assert {f.culprit for f in report.findings} == {"BdsDxe!UnregisterAtExitBootServices"}
    assert all(f.check == "C2" and "free-pool" in f.detail for f in report.findings)
    late = [e for e in report.timeline.trace.events if isinstance(e, trace.IommuLate)]
    assert [(e.call, e.status) for e in late] == [("map", 0x8000000000000009)]
    assert report.outcomes["V5"].state is State.HELD


def test_v5_names_a_late_maps_allocation_and_its_handler() -> None:
    """The stock scheme's real log: the adversary's Map() from its
    ExitBootServices() handler (depth 1: before the teardown) allocated its
    MAP_INFO; V5 fails on that alone, naming the allocation, the IOMMU
    driver as culprit and the handler it ran in. The control: the callback
    log of the same build, where it was refused."""
    report, _ = analyze_log(DATA / "legacy-depth1.log", DATA / "fw-emu")
    v5, = report.violations
    assert v5.check == "V5" and v5.culprit.startswith("IoMmuDxe!IoMmuMap"), v5.detail
    assert re.search(r"^iommu-map map=0x\w+ op=2 .* in handler EbsAdversaryDxe!AdversaryStage "
                     r".* succeeded after the memory map was terminated \(memmap-terminated "
                     r"seq \d+\), allocating: allocate-pool of 0x\w+ bytes from "
                     r"IoMmuDxe!IoMmuMap", v5.detail), v5.detail
    events = report.timeline.trace.events
    assert [events[s - 1].name for s in v5.seqs] == ["memmap-terminated", "mem-call", "iommu-map"]
    good, _ = analyze_log(CALLBACK, DATA / "fw-emu")
    assert good.outcomes["V5"].state is State.HELD
    assert any(isinstance(e, trace.IommuLate) for e in good.timeline.trace.events)


def test_v5_negative_control_a_late_allocate_buffer() -> None:
    """AllocateBuffer() is judged as Map() is: the callback log with the
    refused Map() turned into a successful AllocateBuffer()."""
    text = edit(text_of(CALLBACK), r"^EBST iommu-late call=map host=(0x\w+) pages=1 .*$",
                r"EBST iommu-alloc host=\1 pages=1")
    # V5 is a contract check: the LOG checks alone find nothing, judge_log does
    assert checks(text) == []
    report = trace.judge_log(build_timeline(parse_text(text)))
    v5, = report.violations
    assert v5.check == "V5" and v5.detail.startswith("iommu-alloc host=0x")
    assert v5.culprit == "IoMmuDxe", "no allocation traced before it to blame"


def test_pcd_in_teardown_fails_c1_and_c3_naming_the_member() -> None:
    """The real log of the negative-control firmware variant under emulated SEV."""
    report = _contract(PCD_LOG.read_text(encoding="latin-1"), "fw-sev-pcd")
    assert {v.check for v in report.violations} == {"C1", "C3"}
    c1, = (v for v in report.violations if v.check == "C1")
    assert c1.culprit == MEMBER
    assert re.search(r"ints=1\): RestoreTPL\(4\) from PcdDxe!GetWorker\S* in the IOMMU "
                     rf"ExitBootServices\(\) member {MEMBER}", c1.detail)
    c3 = [v for v in report.violations if v.check == "C3"]
    assert len(c3) >= 2 and all(v.culprit == MEMBER for v in c3)
    assert any("RaiseTPL(16) from PcdDxe!EfiAcquireLock" in v.detail for v in c3)


def test_c1_negative_control_interrupts_on_at_return() -> None:
    text = SEV_LOG.read_text(encoding="latin-1").replace(" ints=0\n", " ints=1\n")
    report = _contract(text)
    assert [v.check for v in report.violations] == ["C1"]
    assert report.violations[0].culprit == "", "no RestoreTPL after ints-off to blame"


def _insert_after(text: str, anchor: str, line: str) -> str:
    index = text.index(anchor) + len(anchor)
    index = text.index("\n", index) + 1
    return text[:index] + line + text[index:]


def test_c2_c3_negative_control_allocation_in_the_member() -> None:
    text = _insert_after(SEV_LOG.read_text(encoding="latin-1"), "EBST ebs-callback ",
                         "EBST mem-call op=allocate-pool caller=0x0 addr=0x1000 size=0x40 "
                         "status=0x0\n")
    report = _contract(text)
    assert sorted(v.check for v in report.violations) == ["C2", "C3"]
    assert all(v.culprit == MEMBER for v in report.violations)


def test_c2_negative_control_the_core_allocates() -> None:
    text = _insert_after(SEV_LOG.read_text(encoding="latin-1"), "EBST ints-off",
                         "EBST mem-call op=free-pages caller=0x0 addr=0x1000 size=0x1000 "
                         "status=0x0\n")
    report = _contract(text)
    assert [(v.check, v.culprit) for v in report.violations] == [("C2", "DxeCore")]


def test_logs_without_the_contract_lines_are_not_judged(tmp_path: Path) -> None:
    """A trace of a firmware without the core's contract lines (an older
    build, a log trimmed by hand): the real capture with those lines cut."""
    full, _ = analyze_log(CALLBACK, FW)
    assert full.contract_judged, "the control: the capture as made is judged"
    text = re.sub(r"^EBST (memmap-terminated|ints-off)\b[^\n]*\n", "",
                  text_of(CALLBACK), flags=re.MULTILINE)
    cut = tmp_path / "no-contract.log"
    cut.write_text(text, encoding="latin-1")
    report, _ = analyze_log(cut, FW)
    assert not report.contract_judged
    assert not any(v.check.startswith("C") for v in report.violations)
    assert any(n.startswith("C1..C3 and V5 not judged") for n in report.anomalies)


def test_sev_mask_comes_from_platformpei() -> None:
    assert trace.parse_log(SEV_LOG).sev_mask == 1 << 47
    assert trace.parse_log(CALLBACK).sev_mask is None


# ------------------------------------------- lines cut by interrupt-time output


def test_a_trace_line_cut_by_the_timer_interrupt_is_rejoined() -> None:
    """A real capture (tests/data/README.md): the timer interrupt came while
    the debug port printed "EBST ebs-enter ...", two bytes in, and its handler
    printed seven trace lines of its own there. The line is whole again, in
    its place before them, and the verdicts are the legacy scheme's."""
    path = DATA / "interleaved-legacy-depth2.log"
    raw = text_of(path)
    assert "\nEBEBST tpl-change" in raw and "\nST ebs-enter" in raw     # as captured
    parsed = trace.parse_log(path)
    (enter,) = [e for e in parsed.events if e.name == "ebs-enter"]
    following = parsed.events[enter.seq]                 # seq counts from 1
    assert following.name == "tpl-change" and following.line == enter.line
    report, _ = analyze_log(path)
    assert {v.check for v in report.violations} == {"V1", "V3", "V4", "V5"}


@pytest.mark.parametrize("cut", [1, 2, 5, 12, 20])
def test_an_interrupt_anywhere_in_a_line_changes_nothing(cut: int) -> None:
    """Derived from callback-depth2.log: the timer's raise/restore pair
    printed inside the ebs-enter line after ``cut`` bytes (or at its end,
    before the newline) gives the same events and verdicts; the control is
    the unrepaired reading, which is refused."""
    text = text_of(CALLBACK)
    line = re.search(r"^EBST ebs-enter [^\r\n]*", text, re.MULTILINE)
    assert line is not None
    cut = min(cut, len(line.group(0)))
    timer = ("EBST tpl-change op=raise tpl=31 caller=0xF0\r\n"
             "EBST tpl-change op=restore tpl=4 caller=0xF1\r\n")
    spliced = (text[:line.start() + cut] + timer + text[line.start() + cut:])
    clean = [(e.name, e.fields) for e in trace.parse_text(text).events]
    repaired = [(e.name, e.fields) for e in trace.parse_text(spliced).events]
    at = next(i for i, e in enumerate(clean) if e[0] == "ebs-enter")
    assert repaired[:at + 1] == clean[:at + 1]
    assert [e[0] for e in repaired[at + 1:at + 3]] == ["tpl-change", "tpl-change"]
    assert repaired[at + 3:] == clean[at + 1:]
    assert check_timeline(build_timeline(trace.parse_text(spliced))) == []
    unrepaired = spliced.replace(timer, "\r\n" + timer)     # the fragment stands alone
    with pytest.raises(TraceFormatError):
        build_timeline(trace.parse_text(unrepaired))


def test_a_rest_that_does_not_fit_is_not_forced(tmp_path: Path) -> None:
    """Only the first line after the interrupt-time ones may complete the cut
    line, and only if the whole parses: an interrupt-time "Done." is not
    taken as the rest of ``mapkey=0x7`` (the event is reported lost), and a
    load line a trace line was printed into keeps its image."""
    text = ("EBST version v=1 module=DxeCore\n"
            "EBST ebs-enter mapkey=0x7EBST tpl-change op=raise tpl=31 caller=0xF0\n"
            "Done.\n"
            "A7\n"
            "Loading driver at 0x0001ECC7000 EntryPoint=0x0001ECCA876 IoMmuDxe.efi"
            "EBST tpl-change op=restore tpl=4 caller=0xF1\n")
    parsed = trace.parse_text(text)
    assert [e.name for e in parsed.events] == ["version", "tpl-change", "tpl-change"]
    assert parsed.lost == (2,)
    assert [i.name for i in parsed.images] == ["IoMmuDxe"]
    path = tmp_path / "lost.log"
    path.write_text(text + "EBST ebs-enter mapkey=0x8\nEBST ebs-return status=0x0 ints=0\n")
    report, _ = analyze_log(path)
    assert any("whose rest never came" in note and "line(s) 2" in note
               for note in report.anomalies)
