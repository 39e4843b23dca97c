"""harness.pytestplugin on inner pytest runs, against a stubbed host probe:
a test runs where its capability is, skips with the probe's reason where it
is not, and --ebs-require turns that skip into a failure. The plugin comes
from the installed package's entry point (no ``-p``, no conftest)."""

from __future__ import annotations

import pytest

from harness.vm import host
from harness.vm.host import Capability, HostCaps

SEV_TEST = """
import pytest

@pytest.mark.sev
def test_needs_sev(ebs_host_caps):
    assert ebs_host_caps.sev.available
"""

NO = Capability(False, "stubbed: this host has none")
YES = Capability(True, "stubbed: proven")


def _stub(monkeypatch: pytest.MonkeyPatch, sev: Capability) -> None:
    """The host probe answers ``sev`` (the inner run is in this process)."""
    caps = HostCaps(qemu="qemu-system-x86_64", qemu_version="7.2.22", tcg=YES, kvm=sev,
                    sev=sev, sev_es=NO, snp=NO)
    monkeypatch.setattr(host, "cached_probe", lambda qemu=host.DEFAULT_QEMU: caps)


def test_a_capability_the_host_has_runs_the_test(pytester: pytest.Pytester,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _stub(monkeypatch, YES)
    pytester.makepyfile(SEV_TEST)
    pytester.runpytest("--ebs-require", "sev").assert_outcomes(passed=1)


def test_missing_capability_skips_with_the_reason(pytester: pytest.Pytester,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _stub(monkeypatch, NO)
    pytester.makepyfile(SEV_TEST)
    result = pytester.runpytest("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*needs sev: stubbed: this host has none*"])


def test_require_turns_the_skip_into_a_failure(pytester: pytest.Pytester,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _stub(monkeypatch, NO)
    pytester.makepyfile(SEV_TEST)
    result = pytester.runpytest("--ebs-require", "sev")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([("*sev is required (command line --ebs-require), but this "
                                 "host lacks it: stubbed*")])


def test_require_from_the_environment_and_the_ini(pytester: pytest.Pytester,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _stub(monkeypatch, NO)
    pytester.makepyfile(SEV_TEST)
    monkeypatch.setenv("EBS_HARNESS_REQUIRE", "sev,sev_es")
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*sev is required (env EBS_HARNESS_REQUIRE)*"])
    monkeypatch.delenv("EBS_HARNESS_REQUIRE")
    pytester.makeini("[pytest]\nebs_require = sev\n")
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*sev is required (ini ebs_require)*"])


def test_require_names_are_checked(pytester: pytest.Pytester,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _stub(monkeypatch, NO)
    pytester.makepyfile(SEV_TEST)
    result = pytester.runpytest("--ebs-require", "sevv")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert ("ebs_require = 'sevv' (from command line --ebs-require): unknown sevv"
            in str(result.stdout) + str(result.stderr))


def test_settings_are_checked_once_at_configure_naming_their_source(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong value stops the session before any test, whatever the tests
    need (pytest-timeout's way), and says where it came from."""
    _stub(monkeypatch, YES)
    pytester.makepyfile("def test_plain():\n    pass\n")
    monkeypatch.setenv("EBS_HARNESS_ACCEL", "hvf")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "ebs_accel = 'hvf' (from env EBS_HARNESS_ACCEL): one of auto, tcg, kvm" in \
        str(result.stderr)
    monkeypatch.delenv("EBS_HARNESS_ACCEL")
    pytester.runpytest().assert_outcomes(passed=1)


def test_the_report_header_says_what_the_session_runs_on(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    _stub(monkeypatch, YES)
    pytester.makepyfile("def test_plain():\n    pass\n")
    monkeypatch.setenv("EBS_HARNESS_ACCEL", "tcg")
    result = pytester.runpytest("--ebs-edk2", "2022.11")
    result.stdout.fnmatch_lines([
        ("ebs-harness: firmware: edk2 2022.11 (command line --ebs-edk2) with the series, built "
        "once per session; qemu qemu-system-x86_64; accel tcg (env EBS_HARNESS_ACCEL); "
        "require nothing")])


def test_markers_are_registered_for_strict_markers(pytester: pytest.Pytester,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Our markers pass --strict-markers; a typo of one does not."""
    _stub(monkeypatch, YES)
    pytester.makepyfile(SEV_TEST)
    pytester.runpytest("--strict-markers").assert_outcomes(passed=1)
    pytester.makepyfile(SEV_TEST.replace("mark.sev", "mark.sevv"))
    result = pytester.runpytest("--strict-markers")
    assert result.ret != 0 and "'sevv' not found in `markers`" in str(result.stdout)


ZOO_TEST = """
import pytest

@pytest.mark.zoo
def test_long():
    pass

def test_short():
    pass
"""


def test_zoo_is_deselected_unless_asked_for(pytester: pytest.Pytester,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole zoo runs only with -m naming it; otherwise pytest's summary
    counts it as deselected (not a silent skip)."""
    _stub(monkeypatch, YES)
    pytester.makepyfile(ZOO_TEST)
    result = pytester.runpytest("--strict-markers")
    result.assert_outcomes(passed=1, deselected=1)
    pytester.runpytest("-m", "zoo").assert_outcomes(passed=1, deselected=1)
    pytester.runpytest("-m", "zoo or not zoo").assert_outcomes(passed=2)
