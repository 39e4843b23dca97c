"""From what a boot left behind to verdicts: :mod:`~harness.analysis.trace`
(debug log -> timeline -> V1..V4), :mod:`~harness.analysis.symbols`,
:mod:`~harness.analysis.dump` (memory dump -> D1..D3) and
:mod:`~harness.analysis.report`. Nothing here starts or talks to QEMU."""
