"""The pump that joins a local socket to a remote unix socket's SSH channel
(harness.vm.remote): it must not depend on paramiko waking select() for
every piece of data (tests/e2e/test_remote.py runs it over a real sshd)."""

from __future__ import annotations

import os
import socket

from harness.vm import remote

GREETING = b'{"QMP": {"version": {}, "capabilities": []}}\r\n'


class _QuietChannel:
    """A channel whose select() handle never becomes readable, as paramiko's
    pipe does when it misses an event; what it holds is in ``data``."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = data
        self.eof_received = False
        self.sent = b""
        self.closed = False
        self._pipe_r, self._pipe_w = os.pipe()     # never written

    def fileno(self) -> int:
        return self._pipe_r

    def recv_ready(self) -> bool:
        return bool(self.data)

    def recv(self, size: int) -> bytes:
        data, self.data = self.data[:size], self.data[size:]
        return data

    def sendall(self, data: bytes) -> None:
        self.sent += data

    def close(self) -> None:
        self.closed = True
        os.close(self._pipe_r)
        os.close(self._pipe_w)


def _pumped(channel: _QuietChannel) -> bytes:
    """What the pump hands the local side within two of its passes."""
    ours, theirs = socket.socketpair()
    with ours:
        remote._Pump(theirs, channel).start()   # type: ignore[arg-type]
        ours.settimeout(1.5)
        try:
            return ours.recv(65536)
        except TimeoutError:
            return b""
        finally:
            ours.shutdown(socket.SHUT_RDWR)     # the pump ends


def test_data_the_channel_holds_is_pumped_without_a_wakeup() -> None:
    assert _pumped(_QuietChannel(GREETING)) == GREETING


def test_a_channel_holding_nothing_gives_nothing() -> None:
    """The control: nothing is made up while the channel is silent."""
    assert _pumped(_QuietChannel()) == b""


def test_an_ended_channel_ends_the_local_side() -> None:
    channel = _QuietChannel()
    channel.eof_received = True
    ours, theirs = socket.socketpair()
    with ours:
        pump = remote._Pump(theirs, channel)     # type: ignore[arg-type]
        pump.start()
        ours.settimeout(1.5)
        assert ours.recv(1) == b""      # EOF, not a timeout
        pump.join(1.5)
    assert not pump.is_alive() and channel.closed
