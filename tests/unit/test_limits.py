"""The locked-memory limit of a SEV launch, QEMU's SEV refusals explained,
and the host probe's proof that SEV really launches.

The limit is tested on the real ``setrlimit`` in a child process (which may
lower its own limits); QEMU's refusals are the messages of QEMU 7.2's
``target/i386/sev.c``, as it prints them.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.errors import LaunchError
from harness.vm import limits
from harness.vm.config import MachineConfig
from harness.vm.host import Capability, sev_proven
from harness.vm.machine import QemuMachine
from harness.vm.sev import SevConfig, sev_launch_reason

MIB = 1 << 20


def test_a_sev_guest_needs_its_memory_and_some_more() -> None:
    assert limits.sev_memlock_bytes(512) == 512 * MIB + limits.OVERHEAD


@pytest.mark.parametrize(("soft", "hard", "cap", "problem"), [
    (8 * MIB, 8 * MIB, True, False),            # root's CAP_IPC_LOCK: no limit applies
    (limits.UNLIMITED, limits.UNLIMITED, False, False),
    (8 * MIB, limits.UNLIMITED, False, False),  # the soft limit can be raised
    (8 * MIB, 1024 * MIB, False, False),
    (8 * MIB, 64 * MIB, False, True),           # a non-root user with the default hard limit
])
def test_memlock_problem(soft: int, hard: int, cap: bool, problem: bool) -> None:
    found = limits.memlock_problem(limits.Memlock(soft, hard, cap), 576 * MIB)
    assert (found is not None) == problem
    if found:
        assert found.startswith("SEV pins guest memory: this guest needs RLIMIT_MEMLOCK of "
                                "576 MiB, the limit is soft 8 MiB, hard 64 MiB: run QEMU as root")
        assert "limits.conf" in found


def test_cap_ipc_lock_from_proc_status() -> None:
    assert limits.has_cap_ipc_lock("Name:\tx\nCapEff:\t000001ffffffffff\n")
    assert not limits.has_cap_ipc_lock("CapEff:\t0000000000000000\n")
    assert limits.has_cap_ipc_lock(f"CapEff:\t{1 << 14:016x}\n")
    assert not limits.has_cap_ipc_lock("no such line\n")


def _child(code: str) -> dict[str, object]:
    script = textwrap.dedent(code)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout
    return dict(json.loads(out))


def test_ensure_memlock_raises_the_soft_limit_for_qemu() -> None:
    """In a child, as a user without CAP_IPC_LOCK: a low soft limit under an
    ample hard one is raised (QEMU inherits it); a need above the hard limit
    is a one-line problem and nothing changes. (The hard limit is the
    child's own, lowered where needed: raising it would need privileges.)"""
    ours = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    if ours != resource.RLIM_INFINITY and ours < 2 * MIB:
        pytest.skip(f"this process's hard memlock limit ({ours} bytes) leaves no room to "
                    "lower the soft one to 1 MiB and raise it again")
    result = _child("""
        import json, resource
        from harness.vm import limits
        hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
        hard = 8 << 20 if hard == resource.RLIM_INFINITY else min(hard, 8 << 20)
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (1 << 20, hard))
        raised = limits.ensure_memlock(hard, limits.Memlock(1 << 20, hard, False))
        soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (1 << 20, hard))
        refused = limits.ensure_memlock(hard + (300 << 20), limits.Memlock(1 << 20, hard, False))
        print(json.dumps({"hard": hard, "raised": raised, "soft": soft, "refused": refused,
                          "after": resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]}))
        """)
    assert result["raised"] is None and result["soft"] == result["hard"]
    assert isinstance(result["refused"], str)
    assert "this guest needs RLIMIT_MEMLOCK of" in result["refused"]
    assert result["after"] == MIB, "a refused raise changes nothing"


@pytest.mark.parametrize(("stderr", "reason"), [
    (("qemu-system-x86_64: sev_ram_block_added: failed to register region "
     "(0x7f3c00000000+0x20000000) error 'Cannot allocate memory'"), "RLIMIT_MEMLOCK is too low"),
    ("qemu-system-x86_64: sev_kvm_init: Failed to open /dev/sev 'Permission denied'",
     "/dev/sev is not read/writable by this user"),
    ("qemu-system-x86_64: sev_kvm_init: failed to initialize ret=-16 fw_error=0 ''",
     "no free SEV ASID"),
    (("qemu-system-x86_64: sev_kvm_init: guest policy requires SEV-ES, but host SEV-ES support "
     "unavailable"), "no SEV-ES (CONFIG_ES)"),
    ("qemu-system-x86_64: sev_kvm_init: cbitpos check failed, host '51' requested '47'",
     "does not match the host's C-bit"),
], ids=["memlock", "permissions", "asids", "no-es-firmware", "cbitpos"])
def test_qemu_sev_refusals_are_explained(stderr: str, reason: str) -> None:
    found = sev_launch_reason(f"some earlier line\n{stderr}\n")
    assert found is not None and reason in found


def test_an_unknown_refusal_is_left_to_qemus_own_words() -> None:
    assert sev_launch_reason("qemu-system-x86_64: something else entirely\n") is None


YES = Capability(True, "kvm_amd sev=Y, /dev/sev, CPU and QEMU agree")


def test_sev_is_proven_only_by_a_booted_guest() -> None:
    booted = Capability(True, "booted firmware to serial output in 1.2 s")
    assert sev_proven(YES, None, booted) == Capability(True, f"{YES.reason}; {booted.reason}")
    failed = Capability(False, "QEMU failed under kvm: KVM_SEV_INIT got EBUSY: no free SEV ASID")
    proven = sev_proven(YES, None, failed)
    assert not proven.available and proven.reason.endswith(f"did not boot: {failed.reason}")
    memlock = "SEV pins guest memory: this guest needs RLIMIT_MEMLOCK of 576 MiB, ..."
    assert sev_proven(YES, memlock, None) == Capability(False, memlock)
    absent = Capability(False, "kvm_amd sev=N")
    assert sev_proven(absent, memlock, None) is absent


def test_a_sev_launch_over_the_limit_fails_before_qemu_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user whose hard limit cannot cover the guest: one line with the
    remedy, an environment failure (exit 3), and no QEMU process at all."""
    monkeypatch.setattr(limits, "current", lambda: limits.Memlock(8 * MIB, 64 * MIB, False))
    (tmp_path / "VARS.fd").write_bytes(b"\0" * 4096)
    config = MachineConfig(code=tmp_path / "CODE.fd", vars_template=tmp_path / "VARS.fd",
                           accel="kvm", sev=SevConfig("sev", 51, 1), memory_mib=512,
                           qemu="/nonexistent/qemu-system-x86_64")
    vm = QemuMachine(config, tmp_path / "vm")
    with pytest.raises(LaunchError) as failed:
        vm.launch()
    assert str(failed.value).startswith("SEV pins guest memory: this guest needs RLIMIT_MEMLOCK "
                                        "of 576 MiB, the limit is soft 8 MiB, hard 64 MiB")
    assert failed.value.exit_status == 3 and "\n" not in str(failed.value)
    assert vm.process is None, "QEMU was never started"
    # The emulated SEV pins nothing: the same limits do not stop it.
    emulated = MachineConfig(code=tmp_path / "CODE.fd", vars_template=tmp_path / "VARS.fd",
                             accel="tcg", sev=SevConfig("emulated", 47, 1), memory_mib=512,
                             qemu="/nonexistent/qemu-system-x86_64")
    with pytest.raises(LaunchError) as other:
        QemuMachine(emulated, tmp_path / "vm2").launch()
    assert "RLIMIT_MEMLOCK" not in str(other.value)
