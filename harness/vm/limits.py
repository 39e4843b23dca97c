"""The locked-memory limit a SEV guest needs.

KVM pins every RAM block of a SEV guest (``KVM_MEMORY_ENCRYPT_REG_REGION``
-> ``sev_pin_memory``), which the kernel refuses beyond ``RLIMIT_MEMLOCK``
unless the process has ``CAP_IPC_LOCK``; QEMU then exits with "failed to
register region ... Cannot allocate memory". Before a SEV launch the harness
raises its own soft limit (QEMU inherits it) when the hard limit allows, and
otherwise fails at once with one line saying what is needed and how to grant
it. The emulated SEV pins nothing.

:func:`memlock_problem` is the pure decision; :func:`ensure_memlock` applies
it to this process; :func:`ulimit_command` raises the limit in a remote
shell.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20
#: RAM blocks beside the guest's memory that QEMU registers too (the pflash
#: images, option ROMs), with room to spare.
OVERHEAD = 64 * MIB
CAP_IPC_LOCK = 14
UNLIMITED = resource.RLIM_INFINITY

HOW_TO_GRANT = ("run QEMU as root, give it CAP_IPC_LOCK (setcap cap_ipc_lock+ep on the "
                "QEMU binary), or raise 'memlock' in /etc/security/limits.conf and log in "
                "again")


def sev_memlock_bytes(memory_mib: int) -> int:
    """What RLIMIT_MEMLOCK a SEV guest of ``memory_mib`` needs."""
    return memory_mib * MIB + OVERHEAD


@dataclass(frozen=True)
class Memlock:
    """The locked-memory limits of a process, and whether they bind it."""

    soft: int
    hard: int
    cap_ipc_lock: bool

    def covers(self, needed: int) -> bool:
        return self.cap_ipc_lock or self.soft == UNLIMITED or self.soft >= needed

    def describe(self) -> str:
        if self.cap_ipc_lock:
            return "CAP_IPC_LOCK (no limit)"
        return f"soft {_size(self.soft)}, hard {_size(self.hard)}"


def _size(value: int) -> str:
    return "unlimited" if value == UNLIMITED else f"{value // MIB} MiB"


def has_cap_ipc_lock(status: str) -> bool:
    """``CapEff`` of ``/proc/<pid>/status`` text holds CAP_IPC_LOCK."""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_IPC_LOCK & 1)
    return False


def current() -> Memlock:
    """This process's limits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    try:
        cap = has_cap_ipc_lock(Path("/proc/self/status").read_text())
    except OSError:
        cap = False
    return Memlock(soft, hard, cap)


def memlock_problem(limits: Memlock, needed: int) -> str | None:
    """Why a SEV guest needing ``needed`` locked bytes cannot start under
    ``limits`` even after raising the soft limit, or None."""
    if limits.covers(needed) or limits.hard == UNLIMITED or limits.hard >= needed:
        return None
    return (f"SEV pins guest memory: this guest needs RLIMIT_MEMLOCK of {_size(needed)}, "
            f"the limit is {limits.describe()}: {HOW_TO_GRANT}")


def ensure_memlock(needed: int, limits: Memlock | None = None) -> str | None:
    """Raise this process's soft limit to ``needed`` where it binds and the
    hard limit allows (QEMU, started next, inherits it). :returns: why it
    cannot be done, or None.

    :param limits: this process's limits (default: :func:`current`).
    """
    limits = limits or current()
    problem = memlock_problem(limits, needed)
    if problem is None and not limits.covers(needed):
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (needed, limits.hard))
    return problem


def ulimit_command(needed: int) -> str:
    """A shell line for a remote wrapper: raise the soft limit to ``needed``
    where the hard limit allows. Where it cannot, QEMU's own refusal follows,
    which :func:`harness.vm.sev.sev_launch_reason` explains."""
    return f"ulimit -l {needed // 1024} 2>/dev/null || true"
