"""What the probe's steps printed, read from a boot's result (the probe's
trace lines: docs/trace-format.md)."""

from __future__ import annotations

from harness import scenario
from harness.analysis import trace


def large_maps(result: scenario.RunResult) -> tuple[str | None, str | None]:
    """The device addresses of the probe's two concurrent 512 KiB mappings
    (step ``large-maps``), each mapped in full."""
    step, = (e for e in result.log.timeline.trace.events
             if isinstance(e, trace.Probe) and e.step == "large-maps")
    assert step.get("status0") == "0x0" and step.get("status1") == "0x0", step.text
    assert step.get("bytes0") == step.get("bytes1") == step.get("bytes"), step.text
    return step.get("dev0"), step.get("dev1")
