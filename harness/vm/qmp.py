"""The harness's one QMP client: a synchronous session on :mod:`qemu.qmp`.

Every QMP conversation of the harness goes through :class:`QmpSession`:
the machines' (local or remote, see :mod:`harness.vm.runner`) and the host
probes' ``query-sev-capabilities``. It connects to a unix socket path or to
an already connected socket (a remote monitor bridged over SSH), writes a
transcript (``qmp.log``), and keeps the events for :meth:`QmpSession.wait_event`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar

from qemu.qmp import ExecuteError, QMPClient

from harness.errors import QmpError

_T = TypeVar("_T")

#: QMP events logged at INFO (the others at DEBUG).
WATCHED_EVENTS = ("SHUTDOWN", "STOP", "RESUME", "RESET", "GUEST_PANICKED")


class QmpSession:
    """A synchronous QMP session on :class:`qemu.qmp.QMPClient`.

    It owns its event loop, so sessions do not share state; events queue in
    the client while no call runs and are collected on the next call.

    :param transcript: where every message goes, one timestamped line each.
    """

    def __init__(self, name: str, transcript: TextIO, logger: logging.Logger) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(name)
        self._transcript = transcript
        self._log = logger
        self.history: list[dict[str, Any]] = []
        self._pending: list[dict[str, Any]] = []

    def _run(self, coro: Coroutine[Any, Any, _T], timeout: float | None) -> _T:
        return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def _write(self, direction: str, obj: object) -> None:
        stamp = time.strftime("%H:%M:%S") + f".{int(time.time() * 1000) % 1000:03d}"
        self._transcript.write(f"{stamp} {direction} {json.dumps(obj, sort_keys=True)}\n")
        self._transcript.flush()

    def connect(self, path: Path | socket.socket, timeout: float) -> None:
        """Connect to QMP at a unix socket path, or on a connected socket.

        :raises QmpError: no QMP answered there.
        """
        address = path if isinstance(path, socket.socket) else str(path)
        try:
            self._run(self._client.connect(address), timeout)
        except TimeoutError as exc:
            raise QmpError(f"QMP connect: no greeting in {timeout:g} s") from exc
        except Exception as exc:
            # qemu.qmp's ConnectError and friends: QEMU gone, a bridge at EOF
            raise QmpError(f"QMP connect: {type(exc).__name__}: {exc}") from exc
        greeting = self._client.greeting
        self._write("<-", greeting._asdict() if greeting is not None else None)

    def _collect(self) -> None:
        for event in self._client.events.clear():
            self._record(dict(event))

    def _record(self, event: dict[str, Any]) -> None:
        self._write("<-", event)
        self.history.append(event)
        self._pending.append(event)
        level = logging.INFO if event.get("event") in WATCHED_EVENTS else logging.DEBUG
        self._log.log(level, "QMP event %s %s", event.get("event"),
                      json.dumps(event.get("data", {}), sort_keys=True))

    def execute(self, command: str, arguments: Mapping[str, object] | None,
                timeout: float | None) -> Any:
        """Run ``command``; its ``return`` value, or :class:`QmpError`."""
        self._write("->", {"execute": command, "arguments": dict(arguments or {})})
        try:
            result = self._run(self._client.execute(command, arguments), timeout)
        except ExecuteError as exc:
            self._write("<-", {"error": {"class": exc.error_class, "desc": str(exc)}})
            raise QmpError(f"QMP {command}: {exc.error_class}: {exc}") from exc
        except TimeoutError as exc:
            self._write("!!", f"{command}: no reply in {timeout} s")
            raise QmpError(f"QMP {command}: no reply in {timeout:g} s") from exc
        except Exception as exc:
            self._write("!!", f"{command}: {type(exc).__name__}: {exc}")
            raise QmpError(f"QMP {command}: {type(exc).__name__}: {exc}") from exc
        finally:
            self._collect()
        self._write("<-", {"return": result})
        return result

    def take_event(self, names: Iterable[str],
                   match: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """The first pending event of one of ``names`` that ``match`` (consumed)."""
        wanted = set(names)
        for index, event in enumerate(self._pending):
            if event.get("event") in wanted and matches(event, match):
                return self._pending.pop(index)
        return None

    def wait_event(self, names: Sequence[str], timeout: float,
                   match: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The next event of one of ``names`` whose fields hold ``match``
        (consumed), or :class:`QmpError`."""
        self._collect()
        found = self.take_event(names, match)
        if found is not None:
            return found

        async def _wait() -> dict[str, Any]:
            while True:
                event = dict(await self._client.events.get())
                self._record(event)
                if event.get("event") in names and matches(event, match):
                    return self._pending.pop()

        try:
            return self._run(_wait(), timeout)
        except TimeoutError as exc:
            raise QmpError(f"no QMP event {'/'.join(names)}"
                           f"{f' matching {match}' if match else ''} in {timeout:g} s") from exc

    def close(self) -> None:
        try:
            self._run(self._client.disconnect(), 5.0)
        except Exception as exc:  # noqa: BLE001 - closing; QEMU may be gone
            self._log.debug("QMP disconnect: %s", exc)
        finally:
            self._collect()
            self._loop.close()


def matches(event: Mapping[str, Any], match: Mapping[str, Any] | None) -> bool:
    """``event`` holds every field of ``match``, nested dicts compared
    field by field (as QEMU's ``QEMUMachine.event_match``)."""
    if match is None:
        return True
    for key, want in match.items():
        got = event.get(key)
        if isinstance(want, Mapping):
            if not isinstance(got, Mapping) or not matches(got, want):
                return False
        elif got != want:
            return False
    return True
