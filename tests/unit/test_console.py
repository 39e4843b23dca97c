"""The expect API over a followed file and over a socket (no QEMU)."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.errors import ConsoleFailure, ConsoleTimeout
from harness.vm.console import (
    Console,
    CrashWatch,
    FileFollower,
    FileWatch,
    debug_console,
    fd_console,
    serial_console,
    tail_lines,
)

COMMAND = ["qemu-system-x86_64", "-machine", "q35", "-name", "with space"]
LOGGER = logging.getLogger("harness.vm.machine.testvm")


def writer(path: Path, lines: list[str], delay: float = 0.05) -> threading.Thread:
    def run() -> None:
        with open(path, "a", encoding="utf-8") as handle:
            for line in lines:
                time.sleep(delay)
                handle.write(line + "\n")
                handle.flush()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def follow(path: Path, alive: bool = True) -> Console:
    return debug_console(path, lambda: alive, LOGGER, {"debugcon.log": path}, COMMAND)


def test_follows_a_growing_file(tmp_path: Path) -> None:
    log = tmp_path / "debugcon.log"  # does not exist yet
    writer(log, ["SecCoreStartupWithStack", ("Loading driver at 0x0000E0C2000 "
                 "EntryPoint=0x0000E0E1A4F Shell.efi"), "after"])
    match = follow(log).expect(r"Loading driver at (0x[0-9A-F]+) .* Shell\.efi", timeout=5)
    assert match.group(1) == "0x0000E0C2000"


def test_failure_pattern_fails_at_once(tmp_path: Path) -> None:
    """The success pattern never comes and the writer stays: only a failure
    seen as it arrives ends the wait as a ConsoleFailure, not a timeout."""
    log = tmp_path / "debugcon.log"
    writer(log, ["booting", "ASSERT [DxeCore] Foo.c(12): Bar != NULL"])
    with pytest.raises(ConsoleFailure) as info:
        follow(log).expect("Shell.efi", timeout=60)
    assert info.value.line == "ASSERT [DxeCore] Foo.c(12): Bar != NULL"
    assert "ASSERT [DxeCore]" in str(info.value)


def test_success_before_failure_wins(tmp_path: Path) -> None:
    log = tmp_path / "debugcon.log"
    log.write_text("Shell.efi\n!!!! X64 Exception Type - 0E\n")
    console = follow(log)
    console.expect("Shell.efi", timeout=2)
    with pytest.raises(ConsoleFailure, match="X64 Exception"):
        console.expect("never", timeout=2)


@pytest.mark.parametrize("offset", [0, FileFollower.READ - 3, FileFollower.WINDOW - 5,
                                    5 * FileFollower.READ + 1])
def test_a_match_anywhere_in_a_large_log_is_found_in_order(tmp_path: Path,
                                                            offset: int) -> None:
    """Expect searches a window, not the whole log: a line split across two
    reads, anywhere in 400 KB written at once, is still found, and the
    matches come in log order."""
    log = tmp_path / "debugcon.log"
    filler = "".join(f"DxeDispatch line {n:06d}\n" for n in range(16000))
    at = filler.index("\n", offset) + 1
    log.write_text(filler[:at] + "EBST probe step=first\n" + filler[at:]
                   + "EBST probe-parked\n" + filler[:300])
    console = follow(log)
    assert console.expect(r"EBST probe step=(\w+)", timeout=5).group(1) == "first"
    console.expect("EBST probe-parked", timeout=5)
    assert console.before.startswith("\nDxeDispatch line")


def test_no_failure_patterns(tmp_path: Path) -> None:
    log = tmp_path / "debugcon.log"
    log.write_text("Kernel panic - not syncing\nok\n")
    follow(log).expect("ok", failure=(), timeout=2)


def test_timeout_names_pattern_and_quotes_tails(tmp_path: Path) -> None:
    log = tmp_path / "debugcon.log"
    log.write_text("".join(f"line {n}\n" for n in range(100)))
    with pytest.raises(ConsoleTimeout) as info:
        follow(log).expect(r"BdsDxe: loading", timeout=0.5)
    err = info.value
    assert err.timeout == 0.5
    assert err.awaited == "'BdsDxe: loading'"
    text = str(err)
    assert text.splitlines()[0] == \
        "timed out after 0.5 s on debugcon waiting for 'BdsDxe: loading'"
    assert "line 99" in text and "line 60" in text and "line 59" not in text
    assert "qemu-system-x86_64 -machine q35 -name 'with space'" in text
    assert err.tails["debugcon.log"].splitlines()[-1] == "line 99"


def test_eof_when_writer_gone(tmp_path: Path) -> None:
    log = tmp_path / "debugcon.log"
    log.write_text("partial\n")
    with pytest.raises(ConsoleTimeout, match="QEMU exited"):
        follow(log, alive=False).expect("never", timeout=10)
    # the machine says how it ended, and its stderr is quoted
    stderr = tmp_path / "qemu-stderr.log"
    stderr.write_text("qemu-system-x86_64: terminating on signal 15\n")
    console = debug_console(log, lambda: False, LOGGER,
                            {"debugcon.log": log, "qemu-stderr.log": stderr}, COMMAND,
                            ended=lambda: "QEMU was killed by SIGKILL")
    with pytest.raises(ConsoleTimeout) as info:
        console.expect("never", timeout=10)
    first, *rest = str(info.value).splitlines()
    assert first.endswith("(the console ended: QEMU was killed by SIGKILL)")
    assert "    qemu-system-x86_64: terminating on signal 15" in rest


def test_lines_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = tmp_path / "debugcon.log"
    log.write_text("first line\r\n\x1b[1mbold\x1b[0m\nlast\n")
    with caplog.at_level(logging.DEBUG, logger="harness.vm.machine.testvm"):
        follow(log).expect("last", timeout=2)
    messages = [r.getMessage() for r in caplog.records
                if r.name == "harness.vm.machine.testvm.debugcon"]
    assert messages[:2] == ["debugcon: first line", "debugcon: bold"]


def test_serial_console_follows_log_sends_and_drains(tmp_path: Path) -> None:
    ours, qemu = socket.socketpair()  # qemu: QEMU's end of the chardev socket
    log = tmp_path / "serial.log"
    console = serial_console(ours, log, lambda: True, LOGGER, {"serial.log": log}, COMMAND)
    # QEMU writes every byte to the socket and to the chardev's logfile. A
    # reader that never drained the socket would block QEMU after ~200 KiB.
    blob = b"x" * (4 * 1024 * 1024)
    sender = threading.Thread(target=qemu.sendall, args=(blob,), daemon=True)
    sender.start()
    sender.join(10)
    assert not sender.is_alive(), "the chardev socket was not drained"
    log.write_bytes(b"\x1b[2J\x1b[01;01HPress ESC in 5 seconds to skip startup.nsh\r\n")
    console.expect(r"Press .*ESC.* in \d+ seconds", timeout=2)
    console.send("\x1b")
    assert qemu.recv(16) == b"\x1b"
    with open(log, "ab") as handle:
        handle.write(b"Shell> ")
    console.expect("Shell> ", timeout=2)
    with pytest.raises(ConsoleTimeout, match="on serial waiting for 'never'"):
        console.expect("never", timeout=0.3)
    console.close()
    qemu.close()


def test_fd_console_over_socket(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    console = fd_console(ours.detach(), LOGGER, {"serial.log": tmp_path / "serial.log"},
                         COMMAND)
    theirs.sendall(b"BdsDxe: loading Boot0001\r\n")
    console.expect(r"BdsDxe: loading (Boot\d+)", timeout=2)
    console.send("\r")
    assert theirs.recv(16) == b"\r"
    console.close()
    theirs.close()


def test_tail_lines(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    path.write_text("".join(f"{n}\n" for n in range(50)))
    assert tail_lines(path, 3) == "47\n48\n49"
    assert tail_lines(tmp_path / "missing.log") == ""


def test_file_follower_timeout_and_eof(tmp_path: Path) -> None:
    import pexpect

    alive = [True]
    spawn = FileFollower(tmp_path / "nothing", lambda: alive[0])
    with pytest.raises(pexpect.TIMEOUT):
        spawn.read_nonblocking(100, 0.1)
    alive[0] = False
    with pytest.raises(pexpect.EOF):
        spawn.read_nonblocking(100, 0.1)


def test_data_written_just_before_the_writer_died_is_read(tmp_path: Path) -> None:
    """The writer flushes its last line and exits between the follower's
    read and its liveness check: the line must still come, then EOF."""
    import pexpect

    path = tmp_path / "log"
    path.write_text("first\n")

    def flush_and_die() -> bool:
        if "parked" not in path.read_text():
            with open(path, "a") as handle:
                handle.write("EBST probe-parked\n")
        return False

    spawn = FileFollower(path, flush_and_die)
    received = ""
    with pytest.raises(pexpect.EOF):
        while True:
            received += spawn.read_nonblocking(100, 0.1)
    assert received == "first\nEBST probe-parked\n"


def test_serial_port_without_input_refuses_to_send(tmp_path: Path) -> None:
    from harness.errors import UsageError
    from harness.vm.console import serial_console

    console = serial_console(None, tmp_path / "serial.log", lambda: True, LOGGER,
                             {}, ["qemu-system-x86_64"])
    with pytest.raises(UsageError, match="takes no input"):
        console.send("\x1b")


def test_a_wait_is_woken_by_the_write_not_a_timer(tmp_path: Path) -> None:
    """inotify wakes an armed watch for a write to its file, or for its
    creation while it does not exist; not for a write to a neighbour (QEMU
    writes its VARS copy beside the logs), nor for a write while disarmed."""
    log = tmp_path / "debugcon.log"
    watch = FileWatch(log)
    try:
        watch.arm()                         # no file yet: the directory, for its creation
        (tmp_path / "OVMF_VARS.fd").write_bytes(b"\0" * 64)
        assert watch.wait(0.2) is False, "woken by another file's write"
        creator = threading.Timer(0.05, log.write_text, args=("EBST ...\n",))
        creator.start()
        assert watch.wait(60.0) is True
        creator.join()                      # its last write and close are events too
        watch.disarm()
        log.write_text("while nobody waits\n")
        watch.arm()                         # the file now
        (tmp_path / "OVMF_VARS.fd").write_bytes(b"\1" * 64)
        assert watch.wait(0.2) is False, "a disarmed watch kept an event, or a neighbour woke it"
        writer = threading.Timer(0.05, lambda: log.open("a").write("more\n"))
        writer.start()
        assert watch.wait(60.0) is True
        writer.join()
    finally:
        watch.close()


def test_the_follower_waits_on_inotify(tmp_path: Path) -> None:
    """A follower whose writer appends in another thread sees each line
    through the watch (the control: the watch is what it waits on)."""
    log = tmp_path / "debugcon.log"
    follower = FileFollower(log, lambda: True)
    assert follower._watch is not None
    thread = writer(log, [f"line {n}" for n in range(3)], delay=0.02)
    console = Console("debugcon", follower, LOGGER, {"debugcon.log": log}, COMMAND)
    assert console.expect(r"line (2)", timeout=60).group(1) == "2"
    thread.join()
    console.close()
    assert follower._watch is None, "close releases the inotify descriptor"


#: A writer like QEMU's debug port: a byte every 20 us, without a pause,
#: for half a second; in a process of its own, as QEMU is.
NEVER_PAUSES = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
writes, end = 0, time.monotonic() + 0.5
while time.monotonic() < end:
    os.write(fd, b"x" if writes % 80 else b"\\n")
    writes += 1
    spin = time.perf_counter() + 20e-6
    while time.perf_counter() < spin:
        pass
os.write(fd, b"\\nEBST probe-parked\\n")
print(writes)
"""


def test_a_writer_that_never_pauses_is_read_at_most_every_gather(tmp_path: Path) -> None:
    """Each read is searched: the follower reads what gathered every GATHER
    seconds, not whenever a byte came (the control: the writer's count of
    writes, hundreds of times more)."""
    log = tmp_path / "debugcon.log"
    follower = FileFollower(log, lambda: True)
    reads = 0
    plain = follower.read_nonblocking

    def counted(size: int = 1, timeout: float | None = -1) -> str:
        nonlocal reads
        reads += 1
        return str(plain(size, timeout))

    follower.read_nonblocking = counted
    console = Console("debugcon", follower, LOGGER, {"debugcon.log": log}, COMMAND)
    writer = subprocess.Popen([sys.executable, "-c", NEVER_PAUSES, str(log)],
                              stdout=subprocess.PIPE, text=True)
    started = time.monotonic()
    console.expect(r"probe-parked", timeout=60)
    seconds = time.monotonic() - started
    writes = int(writer.communicate()[0])
    console.close()
    assert writes > 20 * reads
    # paced reads, and full reads of whatever backlog a loaded machine left
    assert reads <= seconds / FileFollower.GATHER + writes / FileFollower.READ + 5


def test_crash_watch_sees_a_complete_exception_line_of_another_log(tmp_path: Path) -> None:
    """The serial port's CPU exception dump, read as it grows: only a whole
    line counts, and a log without one never does (the control)."""
    serial = tmp_path / "serial.log"
    watch = CrashWatch(serial)
    assert watch.seen() is None                       # no file yet
    serial.write_bytes(b"BdsDxe: loading Boot0001\r\n!!!! X64 Exception Type - 0D(#GP")
    assert watch.seen() is None                       # the line is not finished
    with serial.open("ab") as log:
        log.write(b" - General Protection)  CPU Apic ID - 00000000 !!!!\r\nRIP - 0\r\n")
    assert watch.seen() == ("!!!! X64 Exception Type - 0D(#GP - General Protection)  "
                            "CPU Apic ID - 00000000 !!!!")
    quiet = tmp_path / "quiet.log"
    quiet.write_bytes(b"X64 is fine\r\n" * 100)
    assert CrashWatch(quiet).seen() is None


def test_crash_watch_keeps_a_long_exception_line_read_in_pieces(tmp_path: Path) -> None:
    serial = tmp_path / "serial.log"
    watch = CrashWatch(serial)
    line = b"!!!! X64 Exception Type - 0E(#PF - Page-Fault)" + b" " * 300 + b"!!!!"
    serial.write_bytes(b"x" * 100 + line[:20])
    assert watch.seen() is None
    with serial.open("ab") as log:
        log.write(line[20:])
    assert watch.seen() is None
    with serial.open("ab") as log:
        log.write(b"\r\n")
    assert watch.seen() == line.decode().strip()


def test_a_debug_console_wait_fails_on_the_serial_ports_exception(tmp_path: Path) -> None:
    """The debug log goes quiet while the dump is on the serial port: the
    wait fails at once, naming the serial port's line (a failure, not a
    timeout); with no failure patterns it ends as a timeout (the control)."""
    serial, debug = tmp_path / "serial.log", tmp_path / "debugcon.log"
    debug.write_text("Loading driver at 0x0 EntryPoint=0x0 TdxDxe.efi\n")
    serial.write_text("!!!! X64 Exception Type - 0D(#GP - General Protection)  !!!!\r\nRIP\r\n")
    logger = logging.getLogger("test")
    console = debug_console(debug, lambda: True, logger, {}, COMMAND, crash=CrashWatch(serial))
    started = time.monotonic()
    with pytest.raises(ConsoleFailure) as caught:
        console.expect("never printed", timeout=30)
    assert time.monotonic() - started < 5
    assert caught.value.console == "serial" and "0D(#GP" in caught.value.line
    quiet = debug_console(debug, lambda: True, logger, {}, COMMAND, crash=CrashWatch(serial))
    with pytest.raises(ConsoleTimeout):
        quiet.expect("never printed", failure=(), timeout=30)
