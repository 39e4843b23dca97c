"""harness.analysis.report and the analyze-log / analyze-dump commands."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html import unescape as html_unescape
from pathlib import Path

import pytest
from coredump import Core
from htmltags import start_tags

from harness import cli
from harness.analysis import devices, report, trace
from harness.analysis.trace import analyze_log
from harness.vm.sev import SEV_MODES

DATA = Path(__file__).resolve().parent.parent / "data"
FW = DATA / "fw-ref"
GOOD = DATA / "synthetic-callback-depth2.log"
BAD = DATA / "synthetic-legacy-depth2.log"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


# --------------------------------------------------------------- text


def test_text_timeline_folds_iommu_and_marks_teardown() -> None:
    rep, sym = analyze_log(GOOD, FW)
    text = report.render_text(rep, sym)
    assert re.search(r"^\s+\d+-\d+\s+\d+\s+iommu: 1 alloc, 4 map, 3 unmap$", text, re.MULTILINE)
    assert re.search(r"==\s+teardown-begin scheme=callback", text)
    assert "begin VirtioBlkDxe!VirtioBlkExitBoot" in text
    # nested TPL_NOTIFY dispatch is indented one level deeper, with its TPL
    assert re.search(r"\s16\s+begin DxeCore!CoreExitBootServices", text)
    assert text.rstrip().endswith("PASS: V1 order, V2 once, V3 quiet, V4 empty, "
                                  "V6 own bounce pages all held")


def test_text_timeline_lists_violations_last() -> None:
    rep, sym = analyze_log(BAD, FW)
    lines = report.render_text(rep, sym).rstrip().splitlines()
    idx = next(i for i, line in enumerate(lines) if line.startswith("FAIL:"))
    assert all(re.match(r"  V[1-4]: ", line) for line in lines[idx + 1:])
    assert any("!!" in line and "device-access" in line for line in lines[:idx])


# --------------------------------------------------------------- HTML


def test_html_is_self_contained_with_svg_bars_and_red_violations(tmp_path: Path) -> None:
    rep, sym = analyze_log(BAD, FW)
    page = report.render_html(rep, sym)
    found = start_tags(page)
    tags = [t for t, _ in found]
    assert "svg" in tags and "script" not in tags
    assert not any(a.get("src") or (a.get("href") or "").startswith("http")
                   for _, a in found)
    bars = [a for t, a in found if t == "rect" and a.get("rx") == "3"]
    dispatches = sum(len(a.dispatches) for a in rep.timeline.attempts)
    assert len(bars) == dispatches
    assert any(a.get("fill") == "#d62728" for a in bars)        # the late adversary stage
    assert ">teardown<" in page
    assert page.count('<li>V') == len(rep.violations)


def test_html_of_passing_log_has_no_red(tmp_path: Path) -> None:
    rep, sym = analyze_log(GOOD, FW)
    page = report.render_html(rep, sym)
    assert "#d62728" not in page and "PASS" in page


# ---------------------------------------------------------------- CLI


def test_analyze_log_pass_and_fail_exit_codes(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    status, out, err = run(capsys, "analyze-log", str(GOOD), "--firmware", str(FW))
    assert status == 0 and "PASS" in out and err == ""
    html_file = tmp_path / "t.html"
    status, out, _ = run(capsys, "analyze-log", str(BAD), "--json", "--html", str(html_file))
    assert status == 1
    obj = json.loads(out)
    assert obj["verdict"] == "fail"
    assert {v["check"] for v in obj["violations"]} == {"V1", "V3"}
    assert all(set(v) >= {"check", "detail"} for v in obj["violations"])
    assert html_file.read_text().startswith("<!DOCTYPE html>")


@pytest.mark.parametrize("content, needle", [
    ("EBST version v=1 module=X\nEBST ebs-enter mapkey=0x1\n", "before ExitBootServices returned"),
    ("EBST version v=9 module=X\n", "trace format version 9"),
    ("EBST version v=1 module=X\nEBST ebs-enter mapkey=zz\n", ":2: EBST ebs-enter"),
])
def test_analyze_log_bad_input_is_exit_2_one_line(capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path, content: str,
                                                  needle: str) -> None:
    log = tmp_path / "x.log"
    log.write_text(content)
    status, out, err = run(capsys, "analyze-log", str(log), "--json")
    assert status == 2 and json.loads(out)["error"]["kind"] == "usage"
    assert needle in json.loads(out)["error"]["message"]
    assert err.count("\n") == 1 and needle in err and err.startswith("ebs-harness analyze-log: ")


def test_analyze_log_missing_file_and_bad_firmware(capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path) -> None:
    status, _, err = run(capsys, "analyze-log", str(tmp_path / "nope.log"))
    assert status == 2 and "no such file" in err
    status, _, err = run(capsys, "analyze-log", str(GOOD), "--firmware", str(tmp_path))
    assert status == 2 and "no modules/ directory" in err


def test_analyze_dump_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from test_dump import CANARY, LOG, guest

    log = tmp_path / "boot.log"
    log.write_text(LOG)
    canary = tmp_path / "canary.bin"
    canary.write_bytes(CANARY)
    core: Core = guest(records=1, shared=(0x100,), canary_at=(0x100010,))
    dump = core.write(tmp_path / "d.elf")
    status, out, _ = run(capsys, "analyze-dump", str(dump), "--log", str(log),
                         "--canary", str(canary), "--json")
    assert status == 1
    obj = json.loads(out)
    assert obj["verdict"] == "fail"
    assert {v["check"] for v in obj["violations"]} == {"D1", "D2", "D3"}
    assert obj["live_mappings"][0]["map"] == "0x6000"
    assert obj["shared_pages"] == [{"vaddr": "0x100000", "paddr": "0x100000", "bytes": 4096}]
    assert obj["canary_hits"] == [{"paddr": "0x100010", "shared": True}]
    good = guest().write(tmp_path / "g.elf")
    status, out, _ = run(capsys, "analyze-dump", str(good), "--log", str(log),
                         "--canary", str(canary))
    assert status == 0 and "PASS" in out
    (tmp_path / "trunc.elf").write_bytes(good.read_bytes()[:5000])
    status, out, err = run(capsys, "analyze-dump", str(tmp_path / "trunc.elf"), "--log",
                           str(log))
    assert status == 2 and err.count("\n") == 1 and "truncated dump" in err


# ------------------------------------------------------ browser rendering


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (apt-get install chromium)")
def test_html_renders_in_headless_chromium(tmp_path: Path) -> None:
    rep, sym = analyze_log(BAD, FW)
    page = tmp_path / "timeline.html"
    page.write_text(report.render_html(rep, sym), encoding="utf-8")
    shot = tmp_path / "shot.png"
    profile = tmp_path / "profile"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                    f"--screenshot={shot}", "--window-size=1200,800", page.as_uri()],
                   check=True, capture_output=True, timeout=60)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 800)
    assert len(data) > 20_000          # a drawn page, not a blank one


#: Run in the page: the text of every picture label that sticks out of its
#: picture, as the browser lays it out.
_CUT_LABELS = """<script>
const cut = [];
for (const svg of document.querySelectorAll("svg")) {
  const box = svg.getBoundingClientRect();
  for (const text of svg.querySelectorAll("text")) {
    const r = text.getBoundingClientRect();
    if (r.left < box.left - 0.5 || r.right > box.right + 0.5) cut.push(text.textContent);
  }
}
document.body.dataset.cut = JSON.stringify(cut);
document.body.dataset.labels = document.querySelectorAll("svg text").length;
</script>"""


def _cut_labels(page: str, tmp_path: Path) -> tuple[list[str], int]:
    """The labels Chromium draws outside their picture, and how many it drew;
    a screenshot of the page is kept beside it."""
    path = tmp_path / "timeline.html"
    path.write_text(page.replace("</body>", _CUT_LABELS + "</body>"), encoding="utf-8")
    argv = ["chromium", "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1600,1000"]
    subprocess.run([*argv, f"--screenshot={tmp_path / 'shot.png'}", path.as_uri()],
                   check=True, capture_output=True, timeout=60)
    dom = subprocess.run([*argv, "--dump-dom", path.as_uri()], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    found = re.search(r'data-cut="([^"]*)" data-labels="(\d+)"', dom)
    assert found is not None, dom[-500:]
    return json.loads(html_unescape(found.group(1))), int(found.group(2))


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (apt-get install chromium)")
def test_no_timeline_label_is_cut_in_the_browser(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Handler names as long as ``ReportStatusCodeRouterRuntimeDxe!RuntimeLibExitBootServicesEvent``
    and the device lane's names are drawn whole; the control is the old fixed
    label column, which Chromium shows cutting them."""
    rep, sym = analyze_log(DATA / "emulated-sev-callback-depth2.log", DATA / "fw-sev")
    side = devices.analyze_device_trace(DATA / "devices" / "zoo-callback.log")
    page = report.render_html(rep, sym, side)
    assert "ReportStatusCodeRouterRuntimeDxe!RuntimeLibExitBootServicesEvent tpl 16" in page
    cut, drawn = _cut_labels(page, tmp_path)
    assert drawn > 40 and cut == []
    assert (tmp_path / "shot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setattr(report, "_label_width", lambda labels: 330)
    cut, _ = _cut_labels(report.render_html(rep, sym, side), tmp_path)
    assert "ReportStatusCodeRouterRuntimeDxe!RuntimeLibExitBootServicesEvent tpl 16" in cut


def test_a_bug_of_ours_exits_4_naming_the_traceback(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Never 1 (a firmware violation): an unexpected exception is exit 4, one
    line, the traceback kept in the cache's crashes/ directory."""
    monkeypatch.setenv("EBS_HARNESS_CACHE", str(tmp_path))

    def broken(*_args: object, **_kwargs: object) -> object:
        raise RuntimeError("an internal inconsistency")

    monkeypatch.setattr(trace, "analyze_log", broken)
    status = cli.main(["analyze-log", str(DATA / "callback-depth2.log")])
    err = capsys.readouterr().err
    assert status == 4 and err.count("\n") == 1
    assert err.startswith("ebs-harness analyze-log: internal error (RuntimeError: an internal "
                          "inconsistency); a bug of ebs-harness, traceback in ")
    saved = Path(err.rsplit("traceback in ", 1)[1].strip())
    assert saved.parent == tmp_path / "crashes" and "Traceback" in saved.read_text()


def test_interrupted_exits_130(monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(*_args: object, **_kwargs: object) -> object:
        raise KeyboardInterrupt

    monkeypatch.setattr(trace, "analyze_log", interrupted)
    assert cli.main(["analyze-log", str(DATA / "callback-depth2.log")]) == 130
    assert capsys.readouterr().err == "ebs-harness analyze-log: interrupted\n"


def test_quiet_and_verbose_go_before_or_after_the_command(
        capsys: pytest.CaptureFixture[str]) -> None:
    log = str(DATA / "callback-depth2.log")
    assert cli.main(["analyze-log", log, "-q"]) == cli.main(["-q", "analyze-log", log]) == 0
    assert cli._parser().parse_args(["analyze-log", log, "-v"]).verbose is True
    assert cli._parser().parse_args(["-v", "analyze-log", log]).verbose is True
    assert cli._parser().parse_args(["analyze-log", log]).quiet is False


def test_json_output_carries_the_schema_and_errors_are_json_too(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["analyze-log", str(DATA / "callback-depth2.log"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["schema"] == cli.JSON_SCHEMA
    # a refused option (argparse), and a bad input found later: both exit 2,
    # one line on stderr, one JSON object on stdout
    assert cli.main(["boot", "--sev", "bogus", "--json"]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out) == {"schema": cli.JSON_SCHEMA, "verdict": "error", "error": {
        "status": 2, "kind": "usage",
        "message": "error: argument --sev: invalid choice: 'bogus' (choose from "
                   + ", ".join(repr(mode) for mode in SEV_MODES) + ")"}}
    assert err.splitlines()[-1].startswith("ebs-harness boot: error: argument --sev")
    truncated = tmp_path / "cut.log"
    truncated.write_text("EBST version v=1 module=DxeCore\nEBST ebs-enter mapkey=0x1\n")
    assert cli.main(["analyze-log", str(truncated), "--json"]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out)["error"]["kind"] == "usage" and err.count("\n") == 1
    # without --json, nothing on stdout
    assert cli.main(["analyze-log", str(truncated)]) == 2
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("target", ["missing-dir/t.html", "."], ids=["no-dir", "a-dir"])
def test_an_unwritable_output_is_refused_before_any_work(
        target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    analysed: list[str] = []
    monkeypatch.setattr(trace, "analyze_log", lambda *a, **k: analysed.append("x"))
    html = tmp_path / target
    assert cli.main(["analyze-log", str(DATA / "callback-depth2.log"), "--html", str(html)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ebs-harness analyze-log: --html {html}: ") and err.count("\n") == 1
    assert analysed == []
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["boot", "--artifacts", str(blocker / "run"), "--firmware", "/x"]) == 2
    assert "--artifacts" in capsys.readouterr().err


def test_html_device_lane(tmp_path: Path) -> None:
    """The recorded zoo trace beside a log: one row per device the firmware
    made a bus master, the two armed ones named in red, a zoomed lane around
    the teardown, and the page's verdict counting the device violations."""
    rep, sym = analyze_log(GOOD, FW)
    side = devices.analyze_device_trace(DATA / "devices" / "zoo-callback.log")
    page = report.render_html(rep, sym, side)
    lanes = [a for t, a in start_tags(page) if t == "svg"]
    assert [a.get("aria-label") for a in lanes] == ["EBS timeline", "device lane",
                                                    "device lane"]
    for device in devices.driven(side):
        assert f">{device.name}</text>" in page
    assert page.count('fill="#c00">nvme 00:02.0') == 2        # both lanes
    assert page.count('fill="#c00">ahci 00:1f.2') == 2
    assert "Around the teardown, from device trace line 2801" in page
    assert f'FAIL: {len(side.violations)} violation(s)' in page
    assert page.count("<li>W1") == 2 * len(side.violations)   # the list and the section
