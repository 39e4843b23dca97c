"""explain-log on real logs other people posted (tests/data/explain/wild/).

The facts each log is checked on are the ones an engineer reads out of it by
hand; they are written in the ``facts`` block of its section of the README
beside the logs, as the JSON keys of docs/explain-log.md, and this module
reads them from there: a fact written down once, next to the log's source,
and never copied from the tool's own output. One test per class of mistake
that real logs showed (the gate, older wordings, TDX, where a hang is, the
OS after the firmware, Arm, SEV-ES from the #VC handler) names the log that
shows it, and every log of the corpus goes through the command itself.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from harness import cli
from harness.analysis import explain, explain_facts, explain_reader
from harness.errors import LogFormatError

WILD = Path(__file__).resolve().parents[1] / "data" / "explain" / "wild"
README = WILD / "README.md"

_SECTION = re.compile(r"^### `([^`]+\.log)`\n(.*?)(?=^### |\Z)", re.MULTILINE | re.DOTALL)
_FACTS_BLOCK = re.compile(r"```facts\n(.*?)```", re.DOTALL)
_STEP = re.compile(r"([a-z0-9_]+)(?:\[(-?\d+)\])?")


def hand_read() -> dict[str, dict[str, Any]]:
    """log file -> {key: value} from the README's ``facts`` blocks."""
    out: dict[str, dict[str, Any]] = {}
    for name, body in _SECTION.findall(README.read_text(encoding="utf-8")):
        block = _FACTS_BLOCK.search(body)
        assert block is not None, f"{name}: no facts block in the README"
        facts: dict[str, Any] = {}
        for raw in block.group(1).splitlines():
            line = raw.split("  #", 1)[0].strip()
            if not line:
                continue
            key, _, value = line.partition(":")
            facts[key.strip()] = _value(value.strip())
        out[name] = facts
    return out


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def lookup(data: Any, path: str) -> Any:
    """``end.milestone.kind``, ``images[0].name``, ``images.len`` in the JSON."""
    for step in path.split("."):
        if step == "len":
            return len(data)
        match = _STEP.fullmatch(step)
        assert match is not None, path
        data = data[match.group(1)]
        if match.group(2) is not None:
            data = data[int(match.group(2))]
    return data


FACTS = hand_read()


def test_the_corpus_is_what_the_readme_lists() -> None:
    """Every log has its section (source, what it is, facts) and every
    section its log; at least 15, the three kinds of non-OVMF log among them."""
    logs = {p.name for p in WILD.glob("*.log")}
    assert logs == set(FACTS)
    assert len(logs) >= 15
    refused = {name for name, facts in FACTS.items() if facts.get("exit") == 2}
    assert {FACTS[n]["refusal~"] for n in refused} >= {
        "looks like a Linux kernel log", "looks like a SeaBIOS log", "looks like a U-Boot log"}
    text = README.read_text(encoding="utf-8")
    for name, body in _SECTION.findall(text):
        assert "Source:" in body and "Kept:" in body, name


def explained(name: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, Any, str]:
    status = cli.main(["explain-log", str(WILD / name), "--json"])
    out = capsys.readouterr()
    data = json.loads(out.out)
    return status, data.get("explanation"), out.err


@pytest.mark.parametrize("name", sorted(FACTS))
def test_each_log_says_what_was_read_by_hand(name: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """No log crashes the command (exit 4); each exits as the README says
    and its JSON holds every fact the README's block lists."""
    facts = FACTS[name]
    status, data, err = explained(name, capsys)
    assert status == facts["exit"], err
    if status == 2:
        assert err.count("\n") == 1 and facts["refusal~"] in err
        assert data is None
        return
    for key, want in facts.items():
        if key == "exit":
            continue
        if key.endswith("~"):
            assert want in lookup(data, key[:-1]), (key, lookup(data, key[:-1]))
        else:
            assert lookup(data, key) == want, (key, lookup(data, key))


def test_every_key_the_nightly_queries_is_there(capsys: pytest.CaptureFixture[str]) -> None:
    """firmware, facts, confidential, end, crash: every documented key on
    every log read, null where the log does not say."""
    for name, facts in FACTS.items():
        if facts["exit"] != 0:
            continue
        _, data, _ = explained(name, capsys)
        assert set(data["firmware"]) == set(explain_reader.FIRMWARE_KEYS)
        assert set(data["facts"]) == set(explain_facts.FACT_KEYS)
        assert all(set(v) == {"value", "line"} for v in data["facts"].values())
        assert data["confidential"]["kind"] in (None, *explain_reader.CONFIDENTIAL_KINDS)
        assert data["end"]["kind"] in explain_reader.END_KINDS
        assert data["crash"] is None or data["crash"]["line"] == data["crashes"][-1]["line"]


# ------------------------------------------------ one test per class of mistake


@pytest.mark.parametrize(("name", "shared"), [
    ("linux-dmesg-arch-2017.log", "Loading compiled-in X.509 certificates"),
    ("seabios-onie-2018.log", "SeaBIOS (version"),
    ("uboot-gk7102-2012.log", "U-Boot 2012.10"),
])
def test_a_file_that_is_no_ovmf_log_is_refused(name: str, shared: str) -> None:
    """The kernel log has the very line that used to pass the gate."""
    assert shared in (WILD / name).read_text(encoding="latin-1")
    with pytest.raises(LogFormatError, match="no line of an OVMF boot log"):
        explain.explain_log(WILD / name)


def test_one_shared_line_is_not_enough(tmp_path: Path) -> None:
    """The control: the kernel log with one real edk2 line is still refused;
    with a second, distinct one it is read."""
    kernel = (WILD / "linux-dmesg-arch-2017.log").read_text(encoding="latin-1")
    load = "Loading driver at 0x0007FEAC000 EntryPoint=0x0007FEB3B3B DevicePathDxe.efi\n"
    path = tmp_path / "one.log"
    path.write_text(kernel + load + load, encoding="latin-1")
    with pytest.raises(LogFormatError, match="only one line of an OVMF boot log"):
        explain.explain_log(path)
    path.write_text(kernel + load + "[Bds]Booting UEFI Misc Device\n", encoding="latin-1")
    assert [i.name for i in explain.explain_log(path).boot.images] == ["DevicePathDxe"]


def test_older_wording_gives_the_cpus_and_the_address_width() -> None:
    """2017 OVMF: ``QEMU reports 4 processor(s)`` and ``mPhysMemAddressWidth``."""
    path = WILD / "kvmgt-2017-gvtg-pci-hang.log"
    text = path.read_text(encoding="latin-1")
    cpus = re.search(r"MaxCpuCountInitialization: QEMU reports (\d+) processor", text)
    width = re.search(r"PublishPeiMemory: mPhysMemAddressWidth=(\d+)", text)
    assert cpus is not None and width is not None
    values = explain.explain_log(path).boot.values
    assert values["cpus_boot"][0] == int(cpus.group(1))
    assert values["phys_address_bits"][0] == int(width.group(1))


def test_a_td_guest_says_tdx() -> None:
    """TDVF's start line, the shared-bit mask and TdxDxe's CC attribute."""
    exp = explain.explain_log(WILD / "tdx-td-guest-lazy-accept.log")
    cc = explain.confidential(exp.boot)
    assert cc.kind == "tdx"
    said = " ".join(what for what, _ in cc.evidence)
    assert "GPAW 52" in said and "0x8000000000000" in said and "CCAttr=0x200" in said
    # the control: a stock boot loads TdxDxe too, which proves nothing
    stock = explain.explain_log(WILD.parent / "stock-empty-disk.log")
    assert any(i.name == "TdxDxe" for i in stock.boot.images)
    assert explain.confidential(stock.boot).kind == "none"


def test_a_hang_is_where_the_last_progress_line_is() -> None:
    """The KVMGT log stops in BDS while PCI enumeration probes the vGPU,
    long after the last driver's entry point returned."""
    path = WILD / "kvmgt-2017-gvtg-pci-hang.log"
    exp = explain.explain_log(path)
    last = path.read_text(encoding="latin-1").rstrip("\n").splitlines()[-1]
    assert last.startswith("PciBus: Discovered")
    assert exp.end.kind == "stopped" and exp.end.phase == "BDS"
    assert exp.end.milestone is not None and exp.end.milestone.kind == "pci"
    assert exp.end.milestone.text == last
    assert "while the PCI bus was being enumerated" in exp.end.summary
    assert exp.boot.last_image is not None and exp.boot.last_image.line < exp.boot.phases["BDS"]
    assert "hang in its entry point" not in exp.end.summary


@pytest.mark.parametrize("name", ["flashbots-25-tdx-td-kernel.log",
                                  "qemu-1801-armhf-efi-stub.log"])
def test_the_os_after_the_firmware_is_a_hand_off(name: str) -> None:
    """The kernel's first lines, or the EFI stub exiting boot services: the
    firmware's part is over, not "in BDS with the option started"."""
    path = WILD / name
    exp = explain.explain_log(path)
    os_lines = [line for line in path.read_text(encoding="latin-1").splitlines()
                if line.startswith(("EFI stub: ", "[ "))]
    assert exp.end.kind == "handed-off"
    assert exp.boot.os_lines == len(os_lines)
    assert not exp.end.summary.startswith("the log ends in BDS")
    if "Exiting boot services" in os_lines[-1]:
        assert "exiting boot services" in exp.end.summary


def test_arm_firmware_is_named_and_a_nameless_image_is_kept() -> None:
    """ArmVirtQemu's build paths and version banner name it; the OS loader
    loaded without a name stays in the load map, once (Arm prints it twice)."""
    pei = explain.explain_log(WILD / "coreos-1746-aarch64-pei.log")
    assert pei.firmware["family"] == "ArmVirtQemu" and pei.firmware["arch"] == "AARCH64"
    banner = explain.explain_log(WILD / "qemu-1801-armhf-efi-stub.log")
    assert banner.firmware["version"] == "edk2-stable202302-for-qemu"
    path = WILD / "coreos-1746-aarch64-bds.log"
    loads = re.findall(r"Loading driver at 0x([0-9A-F]+) EntryPoint=0x([0-9A-F]+)\s*$",
                       path.read_text(encoding="latin-1"), re.MULTILINE)
    assert len(loads) == 2 and len(set(loads)) == 1
    (image,) = explain.explain_log(path).boot.images
    assert (image.name, image.base) == ("", int(loads[0][0], 16))


def test_sev_es_is_inferred_from_the_vc_handler() -> None:
    """The #VC handler's own message before the #GP it injected."""
    exp = explain.explain_log(WILD / "amdsev-92-snp-vc-mmio-gp.log")
    assert explain.confidential(exp.boot).kind == "sev-es"
    (crash,) = exp.boot.crashes
    assert "MMIO through encrypted memory" in crash.cause
    # the control: the same #GP without the handler's line says nothing of SEV-ES
    assert "MMIO" not in (WILD / "launchpad-1624096-serial-gp.log").read_text()
    other = explain.explain_log(WILD / "launchpad-1624096-serial-gp.log")
    assert explain.confidential(other.boot).kind is None
    assert not other.boot.crashes[0].cause


def test_the_biggest_log_is_read_quickly() -> None:
    """The corpus's biggest OVMF log, explained many times over in a second."""
    path = max((WILD / n for n, f in FACTS.items() if f["exit"] == 0),
               key=lambda p: p.stat().st_size)
    start = time.perf_counter()
    explain.explain_log(path)
    assert time.perf_counter() - start < 1.0
