"""The scenario suite: real boots of the patched OVMF, each with its expected verdicts.

Every case boots the probe guest, dumps its memory once it parked after
ExitBootServices, and asserts exactly which checks hold and which fail:
the callback cases must pass everything, and each negative control must fail
the checks the README's verdict table says it fails, and no others. Each case
runs in these modes:

- ``plain``: TCG, IoMmuDxe's own emulation mode (shared pages marked with
  page-table bit 52);
- ``emulated-sev`` and ``emulated-sev-es``: TCG on the harness's QEMU with
  an emulated SEV or SEV-ES, so that OVMF takes its real SEV (or SEV-ES:
  #VC, the GHCB) code path (D2 walks for C-bit-clear pages);
- ``sev``/``sev-es``/``snp``: real encryption on a SEV host (SNP with a
  QEMU >= 9.1, ``--qemu``), where the dump is ciphertext for private pages
  (D1 and D2 are skipped, D3 scans the whole dump); they skip elsewhere
  with the host probe's reason.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from harness.analysis import trace
from harness.scenario import RunResult, Scenario
from harness.vm.sev import MODES

#: ExitBootServices()'s status for a stale map key.
EFI_INVALID_PARAMETER = 0x8000000000000002

Run = Callable[[Scenario], RunResult]

DEVICE_SETS = {
    "blk": ("virtio-blk",),
    "blk+net": ("virtio-blk", "virtio-net"),
    "blk+scsi+rng": ("virtio-blk", "virtio-scsi", "virtio-rng"),
}

SEV_MODES = [
    pytest.param("off", marks=pytest.mark.tcg, id="plain"),
    pytest.param("emulated", marks=pytest.mark.sev_emulated, id="emulated-sev"),
    pytest.param("emulated-es", marks=pytest.mark.sev_es_emulated, id="emulated-sev-es"),
    pytest.param("emulated-snp", marks=pytest.mark.snp_emulated, id="emulated-snp"),
    pytest.param("sev", marks=pytest.mark.sev, id="sev"),
    pytest.param("sev-es", marks=pytest.mark.sev_es, id="sev-es"),
    pytest.param("snp", marks=pytest.mark.snp, id="snp"),
]


def _plaintext(sev: str) -> bool:
    """The dump shows guest memory as the guest sees it (D1, D2 judged)."""
    return sev == "off" or not MODES[sev].encrypted


#: IoMmuDxe's line when it sets up CcIoMmu's reserved shared-memory pool for
#: DMA (edk2 2025.02), which every teardown makes private again.
POOL_LINE = "Feature of reserved memory for DMA is supported"


def _pooled(result: RunResult) -> bool:
    """The firmware set up the reserved pool for DMA: the adversary's buffer
    (AllocateBuffer before ExitBootServices) came from it, already shared."""
    return POOL_LINE in result.debug_log.read_text(errors="replace")


def _checks(result: RunResult) -> set[str]:
    return result.failed_checks()


def _detail(result: RunResult) -> str:
    return "\n".join(f"{v.check}: {v.detail}" for v in result.violations) + \
        f"\n(artifacts: {result.artifacts})"


def _handlers_after_teardown(result: RunResult) -> list[str]:
    """Handlers whose dispatch began after the teardown began (V1's subject)."""
    names = []
    for attempt in result.log.timeline.attempts:
        for teardown in attempt.teardowns:
            for dispatch in attempt.dispatches:
                if dispatch.begin.seq > teardown.begin.seq:
                    names.append(result.judgement.symbolizer.symbolize(dispatch.begin.fn))
    return names


@pytest.mark.parametrize("sev", SEV_MODES)
@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("devices", list(DEVICE_SETS), ids=list(DEVICE_SETS))
def test_callback_holds_every_verdict(ebs_run_probe: Run, devices: str, depth: int,
                                      sev: str) -> None:
    result = ebs_run_probe(Scenario(ebs_mode="callback", requeue_depth=depth,
                                devices=DEVICE_SETS[devices], sev=sev, dump=True))
    assert result.passed, _detail(result)
    *failed, attempt = result.log.timeline.attempts
    assert attempt.succeeded and len(attempt.teardowns) == 1
    # Under SNP, AmdSevDxe's BeforeExitBootServices handler ("Accepting all
    # memory") runs first; with the adversary's stages the memory map can
    # change then, and the first call fails with the stale map key: the
    # probe calls again, as an OS loader must.
    assert len(failed) <= (1 if sev == "emulated-snp" else 0)
    assert all(a.exit.status == EFI_INVALID_PARAMETER for a in failed)
    assert not any(a.teardowns for a in failed), "no teardown in a call that fails"
    # Every adversary stage ran before the teardown; its Map(), after the
    # memory map was terminated, was refused (V5's subject).
    events = result.log.timeline.trace.events
    stages = [e for e in events if isinstance(e, trace.AdversaryStage)]
    assert [s.n for s in stages] == list(range(depth + 1))
    assert all(s.seq < attempt.teardowns[0].begin.seq for s in stages)
    assert [e.call for e in events if isinstance(e, trace.IommuLate)] == ["map"]
    assert result.dump is not None
    if _plaintext(sev):
        assert result.dump.live is not None and result.dump.live.records == ()


@pytest.mark.parametrize("sev", SEV_MODES)
def test_legacy_lets_a_handler_map_late(ebs_run_probe: Run, sev: str) -> None:
    """The adversary maps from its ExitBootServices() handler without
    re-signalling: under the stock scheme the teardown still comes after it
    (V1..V4 and the dump hold), but IoMmuDxe cannot tell that the memory map
    is terminated and allocates the mapping (V5). Under ``callback`` the same
    Map() is refused (test_callback_holds_every_verdict, depth 0)."""
    result = ebs_run_probe(Scenario(ebs_mode="legacy", requeue_depth=0, sev=sev, dump=True))
    assert _checks(result) == {"V5"}, _detail(result)
    v5, = result.violations
    assert "EbsAdversaryDxe!AdversaryStage" in v5.detail, v5.detail


@pytest.mark.parametrize("sev", SEV_MODES)
@pytest.mark.parametrize("depth", [2, 3])
def test_legacy_loses_to_an_adversary_that_requeues_twice(ebs_run_probe: Run, depth: int,
                                                          sev: str) -> None:
    """The 2017 failure: the adversary's last stage comes after the teardown,
    maps its buffer (allocated after the memory map was terminated: V5), and
    the mapping survives into the OS.

    Without the reserved DMA pool (edk2 2022.11) the late Map() decrypts the
    buffer: its page stays shared, canary and all (D2, D3), a leak. With the
    pool (2025.02) the buffer came from the pool, which the teardown has
    already made private, and Map() changes no page state for it: the
    mapping is live (V4, D1) but its page is private, so under SEV the
    device would read ciphertext, corruption rather than a leak, and D2 and
    D3 hold."""
    result = ebs_run_probe(Scenario(ebs_mode="legacy", requeue_depth=depth, sev=sev, dump=True))
    pooled = _pooled(result)
    # D1 and D2 read the mapping list and page tables, private under real SEV.
    expected = {"V1", "V3", "V4", "V5"} | (set() if pooled else {"D3"})
    if _plaintext(sev):
        expected |= {"D1"} | (set() if pooled else {"D2"})
    assert _checks(result) == expected, _detail(result)
    assert "EbsAdversaryDxe!AdversaryStage" in _handlers_after_teardown(result)
    v1 = next(v for v in result.violations if v.check == "V1")
    assert "EbsAdversaryDxe!AdversaryStage" in v1.detail
    access, = (e for e in result.log.timeline.trace.events if isinstance(e, trace.DeviceAccess))
    assert result.dump is not None
    if _plaintext(sev):
        assert result.dump.live is not None
        assert [r.addr for r in result.dump.live.records] == [access.map]
    if pooled:
        # Its page is private: nothing shared holds it or the canary.
        assert not result.dump.canary_hits
        assert not any(r.paddr <= access.host < r.paddr + r.size
                       for r in result.dump.shared or ()), _detail(result)
        return
    if _plaintext(sev):
        # The adversary's page is what D2 found still shared.
        d2, = (v for v in result.violations if v.check == "D2")
        assert f"{access.host:#x}+0x1000" in d2.detail
    # The canary the adversary mapped is in that page.
    assert result.dump.canary_hits and result.dump.canary_hits[0].paddr == access.host


@pytest.mark.parametrize("sev", SEV_MODES)
def test_no_teardown_with_a_leaked_mapping_is_caught(ebs_run_probe: Run, sev: str) -> None:
    """Negative control for V4 and D1..D3: no teardown at all, and the probe
    leaves a mapping holding the canary live."""
    result = ebs_run_probe(Scenario(ebs_mode="none", leak_mapping=True, sev=sev, dump=True))
    expected = {"V2", "V4", "D3"} | ({"D1", "D2"} if _plaintext(sev) else set())
    if sev == "emulated-snp":
        # With no teardown the DMA pool and the bounce buffers stay shared,
        # and the OS is handed them as its memory.
        expected.add("S3")
    assert _checks(result) == expected, _detail(result)
    assert result.dump is not None
    assert result.dump.canary_hits, "the canary must be found in a shared page"
    leak = next(e for e in result.log.timeline.trace.events
                if isinstance(e, trace.Probe) and e.step == "leak")
    assert leak.get("map") is not None
    if _plaintext(sev):
        assert result.dump.live is not None
        assert int(leak.get("map") or "0", 16) in {r.addr for r in result.dump.live.records}


@pytest.mark.parametrize("sev", SEV_MODES)
def test_stale_mapkey_fails_without_teardown_then_succeeds_once(ebs_run_probe: Run,
                                                                sev: str) -> None:
    result = ebs_run_probe(Scenario(ebs_mode="callback", stale_mapkey=True, sev=sev, dump=True))
    assert result.passed, _detail(result)
    failed, succeeded = result.log.timeline.attempts
    assert not failed.succeeded and failed.teardowns == ()
    assert succeeded.succeeded and len(succeeded.teardowns) == 1
    recheck = [e for e in result.log.timeline.trace.events
               if isinstance(e, trace.Probe) and e.step == "recheck"]
    assert [e.get("ok") for e in recheck] == ["1"], "mappings must work between the attempts"


@pytest.mark.tcg
def test_without_emulation_the_firmware_is_stock(ebs_run_probe: Run) -> None:
    """No emulation knob on a guest without SEV: no IOMMU protocol, no
    teardown, nothing to tear down (stock OVMF behaviour)."""
    result = ebs_run_probe(Scenario(ebs_mode="callback", iommu_emulation=False))
    events = result.log.timeline.trace.events
    assert result.log.timeline.trace.config is None
    assert not any(isinstance(e, (trace.IommuMap, trace.TeardownBegin)) for e in events)
    assert result.passed, _detail(result)
