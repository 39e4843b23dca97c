"""Hypothesis fuzzing of the trace parser, the log explainer and the dump reader.

Whatever the input, the parsers end with a result or with their one-line
error (TraceFormatError / DumpFormatError); never another exception, a hang
or a read past the file. The examples hypothesis found are kept in
tests/fuzz/corpus (its example database) and replayed first on every run.
``EBS_FUZZ_EXAMPLES`` sets the number of examples per test (conftest.py: a
smoke of 40 in the default run, 3000 with ``-m fuzz``).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from coredump import Core, map_info
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from harness.analysis import explain, explain_render
from harness.analysis.memdump import QemuDump, shared_ranges, walk_map_list, walk_page_tables
from harness.analysis.trace import build_timeline, check_timeline, parse_text
from harness.errors import DumpFormatError, LogFormatError, TraceFormatError

pytestmark = pytest.mark.fuzz

CORPUS = DirectoryBasedExampleDatabase(str(Path(__file__).resolve().parent / "corpus"))
FUZZ = settings(max_examples=int(os.environ["EBS_FUZZ_EXAMPLES"]),
                deadline=None, database=CORPUS,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

EVENTS = ["version", "iommu-config", "ebs-enter", "notify-begin", "notify-end", "ebs-fail",
          "ebs-callback", "ebs-return", "iommu-map", "iommu-unmap", "iommu-alloc",
          "iommu-free", "teardown-begin", "teardown-unmap", "teardown-end", "device-access",
          "adversary-stage", "probe", "probe-parked", "brand-new"]
KEYS = ["v", "module", "scheme", "emulation", "sharedbit", "maphead", "mapkey", "event",
        "fn", "ctx", "tpl", "status", "revision", "map", "op", "host", "dev", "pages", "live",
        "unmapped", "kind", "n", "of", "step"]
VALUES = st.one_of(st.sampled_from(["0x0", "0x1", "0x1ECC5660", "1", "8", "16", "callback",
                                    "legacy", "IoMmuDxe", "zz", ""]),
                   st.integers(0, 2**64).map(hex), st.text(max_size=6))


@st.composite
def trace_line(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(EVENTS))
    fields = draw(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=7))
    text = "EBST " + " ".join([name] + [f"{k}={v}" for k, v in fields])
    if name == "version" and draw(st.booleans()):
        text = "EBST version v=1 module=X"
    return text


LINES = st.lists(st.one_of(trace_line(), st.text(max_size=40),
                           st.just("Loading driver at 0x0001ECC7000 EntryPoint=0x0001ECCA876 "
                                   "IoMmuDxe.efi")), max_size=60)
ENDINGS = st.sampled_from(["\n", "\r\n", "\r"])

GOOD_LOG = ("EBST version v=1 module=DxeCore\nEBST ebs-enter mapkey=0x1\n"
            "EBST notify-begin event=0x1 fn=0x2 ctx=0x0 tpl=8\n"
            "EBST teardown-begin scheme=legacy live=0\nEBST teardown-end unmapped=0 live=0\n"
            "EBST notify-end event=0x1 fn=0x2\nEBST ebs-return status=0x0\n")


def judge(text: str) -> None:
    try:
        timeline = build_timeline(parse_text(text))
    except TraceFormatError as exc:
        assert "\n" not in str(exc)
        return
    for violation in check_timeline(timeline):
        assert violation.check in ("V1", "V2", "V3", "V4") and violation.detail


@FUZZ
@given(LINES, ENDINGS, st.booleans())
@example(GOOD_LOG.splitlines(), "\n", True)
@example(["EBST version v=1 module=X", "EBST notify-end event=0x1 fn=0x2"], "\n", True)
def test_trace_parser_never_crashes(lines: list[str], ending: str, final_newline: bool) -> None:
    judge(ending.join(lines) + (ending if final_newline else ""))


@FUZZ
@given(st.binary(max_size=2000))
@example(b"EBST version v=1 module=X\nEBST ebs-enter mapkey=0x1\xff\n")
def test_trace_parser_on_raw_bytes(data: bytes) -> None:
    judge(data.decode("utf-8", "surrogateescape"))


@FUZZ
@given(st.permutations(GOOD_LOG.splitlines()))
def test_trace_parser_on_shuffled_good_log(lines: list[str]) -> None:
    judge("\n".join(lines) + "\n")


def _seed_dump() -> bytes:
    core = Core(cr3=0x1000)
    core.ram(0, 0x10000)
    core.ram(0x20000, 0x2000)
    core.u64(0x1000, 0x2003)
    core.u64(0x2000, 0x3003)
    core.u64(0x3000, 0x4003)
    for i in range(16):
        core.u64(0x4000 + 8 * i, i * 0x1000 | 3 | (1 << 52 if i == 7 else 0))
    core.u64(0x5000, 0x6008)
    core.u64(0x5008, 0x6008)
    core.poke(0x6000, map_info(0x6000, 0x5000, 0x5000))
    return core.image()


SEED = _seed_dump()


def examine(path: Path) -> None:
    try:
        dump = QemuDump(path)
    except DumpFormatError as exc:
        assert "\n" not in str(exc)
        return
    with dump:
        findings: list[str] = []
        for leaf in walk_page_tables(dump, dump.cpus[0].cr3 if dump.cpus else 0x1000, findings):
            assert leaf.size in (0x1000, 1 << 21, 1 << 30)
        shared_ranges(dump, 0x1000, 52)
        walk_map_list(dump, 0x5000)
        dump.scan(b"MAP_INFO")
        dump.read(0, 0x100)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(SEED) - 1), st.integers(0, 255)), max_size=12),
       st.integers(0, len(SEED)))
@example([], len(SEED))
def test_dump_reader_never_crashes(tmp_path_factory: pytest.TempPathFactory,
                                   flips: list[tuple[int, int]], keep: int) -> None:
    data = bytearray(SEED)
    for offset, value in flips:
        data[offset] = value
    path = tmp_path_factory.mktemp("fuzz") / "d.elf"
    path.write_bytes(bytes(data[:keep]))
    examine(path)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(range(64, 64 + 56 * 3, 8)),
                          st.integers(0, 2**64 - 1)), min_size=1, max_size=6))
def test_dump_reader_on_hostile_program_headers(tmp_path_factory: pytest.TempPathFactory,
                                                patches: list[tuple[int, int]]) -> None:
    data = bytearray(SEED)
    for offset, value in patches:
        struct.pack_into("<Q", data, offset, value)
    path = tmp_path_factory.mktemp("fuzz") / "d.elf"
    path.write_bytes(bytes(data))
    examine(path)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(range(0x1000, 0x7000, 8)),
                          st.integers(0, 2**64 - 1)), min_size=1, max_size=40))
def test_guest_memory_walks_end(tmp_path_factory: pytest.TempPathFactory,
                                patches: list[tuple[int, int]]) -> None:
    """Hostile page tables and list links: the walks end, with findings."""
    core_image = bytearray(SEED)
    ram = len(SEED) - 0x10000 - 0x2000            # file offset of paddr 0
    for paddr, value in patches:
        struct.pack_into("<Q", core_image, ram + paddr, value)
    path = tmp_path_factory.mktemp("fuzz") / "d.elf"
    path.write_bytes(bytes(core_image))
    examine(path)


EXPLAIN_SEED = (Path(__file__).resolve().parents[1] / "data" / "explain" /
                "fault-pf-serial.log").read_bytes() + (
    b"Loading driver at 0x0000EC55000 EntryPoint=0x0000EC56E49 EbsAdversaryDxe.efi\r\n"
    b"Error: Image at 0000EC55000 start failed: Not Found\r\n[Bds]Booting X\r\n"
    b"[Bds] Expand A -> <null string>\r\nASSERT [M] f.c(1): x\r\n")


def explained(data: bytes, tmp: Path) -> None:
    path = tmp / "log"
    path.write_bytes(data)
    try:
        exp = explain.explain_log(path)
    except LogFormatError as exc:
        assert "\n" not in str(exc)
        return
    explain_render.render_text(exp)
    explain_render.render_html(exp)
    explain_render.to_json(exp)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(EXPLAIN_SEED) - 1), st.integers(0, 255)),
                max_size=16), st.integers(0, len(EXPLAIN_SEED)))
@example([], len(EXPLAIN_SEED))
def test_explain_never_crashes(tmp_path_factory: pytest.TempPathFactory,
                               flips: list[tuple[int, int]], keep: int) -> None:
    """explain-log on a real crash log with bytes flipped and cut anywhere:
    an explanation (rendered three ways) or its one-line error."""
    data = bytearray(EXPLAIN_SEED)
    for offset, value in flips:
        data[offset] = value
    explained(bytes(data[:keep]), tmp_path_factory.mktemp("explain"))
