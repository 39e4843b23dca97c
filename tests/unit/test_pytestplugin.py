"""harness.pytestplugin on inner pytest runs: skips with the probe's reason,
and --require turns a missing capability into a failure."""

from __future__ import annotations

import pytest

from harness.vm.host import HostCaps

SEV_TEST = """
import pytest

@pytest.mark.sev
def test_needs_sev():
    assert True
"""


@pytest.fixture
def no_sev(host_caps: HostCaps) -> None:
    if host_caps.sev.available:
        pytest.skip("this host has SEV: the marked test runs instead of skipping")


def test_missing_capability_skips_with_the_reason(pytester: pytest.Pytester,
                                                  no_sev: None) -> None:
    pytester.makepyfile(SEV_TEST)
    result = pytester.runpytest("-p", "harness.pytestplugin", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*needs sev: *"])


def test_require_turns_the_skip_into_a_failure(pytester: pytest.Pytester,
                                               no_sev: None) -> None:
    pytester.makepyfile(SEV_TEST)
    result = pytester.runpytest("-p", "harness.pytestplugin", "--require", "sev")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*--require sev, but this host lacks it: *"])


def test_require_from_the_environment(pytester: pytest.Pytester,
                                      monkeypatch: pytest.MonkeyPatch, no_sev: None) -> None:
    pytester.makepyfile(SEV_TEST)
    monkeypatch.setenv("EBS_HARNESS_REQUIRE", "sev,sev_es")
    result = pytester.runpytest("-p", "harness.pytestplugin")
    result.assert_outcomes(errors=1)


def test_require_names_are_checked(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(SEV_TEST)
    result = pytester.runpytest("-p", "harness.pytestplugin", "--require", "sevv")
    assert result.ret != 0
    assert "unknown sevv" in str(result.stdout) + str(result.stderr)
