"""Fixtures of the integration tests beside the harness's plugin."""

from __future__ import annotations

import pytest

from harness.pytestplugin import session_emulated_caps
from harness.vm.host import HostCaps


@pytest.fixture(scope="session")
def emulated(pytestconfig: pytest.Config) -> HostCaps:
    """The harness's QEMU, built (cached) and probed once per session: the
    emulated SEV, SEV-ES and SEV-SNP tests boot on it."""
    return session_emulated_caps(pytestconfig)
