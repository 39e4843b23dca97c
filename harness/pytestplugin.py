"""pytest plugin: the harness's options and fixtures, kept thin.

Every option is in one group (``ebs-harness``) and has an ini key and an
environment variable, so a nightly job can set it without editing argv:

============================  ======================  ==========================
option                        ini                     environment
============================  ======================  ==========================
``--firmware DIR``            ``ebs_firmware``        ``EBS_HARNESS_FIRMWARE``
``--edk2-src DIR``            ``ebs_edk2_src``        ``EBS_HARNESS_EDK2_SRC``
``--rebuild``                 ``ebs_rebuild``         ``EBS_HARNESS_REBUILD=1``
============================  ======================  ==========================

Fixtures build objects from :mod:`harness` and clean up; the logic lives in
the modules, not here.
"""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from harness import edk2

_OPTIONS: list[tuple[str, str, str, str, bool]] = [
    # (option, ini, env, help, is_flag)
    ("--firmware", "ebs_firmware", "EBS_HARNESS_FIRMWARE",
     "a prebuilt firmware directory (from `ebs-harness build`): skip the build", False),
    ("--edk2-src", "ebs_edk2_src", "EBS_HARNESS_EDK2_SRC",
     "an edk2 tree to build instead of Debian's source package", False),
    ("--rebuild", "ebs_rebuild", "EBS_HARNESS_REBUILD",
     "rebuild the firmware even when the cache has it", True),
]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ebs-harness", "ovmf-ebs-harness")
    for option, ini, env, text, is_flag in _OPTIONS:
        if is_flag:
            group.addoption(option, action="store_true", default=None,
                            help=f"{text} (ini {ini}, env {env})")
            parser.addini(ini, text, type="bool", default=False)
        else:
            group.addoption(option, metavar="DIR", default=None,
                            help=f"{text} (ini {ini}, env {env})")
            parser.addini(ini, text, default="")


def option_value(config: pytest.Config, option: str) -> str | bool | None:
    """The value of one of our options: command line, then env, then ini."""
    for opt, ini, env, _text, is_flag in _OPTIONS:
        if opt != option:
            continue
        value = config.getoption(opt.lstrip("-").replace("-", "_"))
        if value is not None:
            return bool(value) if is_flag else str(value)
        if env in os.environ:
            raw = os.environ[env]
            return raw not in ("", "0", "false", "no") if is_flag else raw
        ini_value = config.getini(ini)
        if is_flag:
            return bool(ini_value)
        return str(ini_value) or None
    raise KeyError(option)


@pytest.fixture(scope="session")
def ovmf_firmware(pytestconfig: pytest.Config) -> Iterator[edk2.Firmware]:
    """The patched OVMF: a prebuilt ``--firmware`` dir, or built (cached)."""
    prebuilt = option_value(pytestconfig, "--firmware")
    if isinstance(prebuilt, str) and prebuilt:
        yield edk2.Firmware.load(prebuilt)
        return
    src = option_value(pytestconfig, "--edk2-src")
    result = edk2.build_firmware(
        source=edk2.source_from_option(src if isinstance(src, str) else None),
        rebuild=bool(option_value(pytestconfig, "--rebuild")),
        progress=edk2.StderrProgress(),
    )
    yield result.firmware
