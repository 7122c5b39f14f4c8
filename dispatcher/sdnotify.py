"""systemd's notify protocol (Type=notify, WatchdogSec=) with the standard library only.

`Notifier` sends `READY=1`, `STATUS=...`, `STOPPING=1` and `WATCHDOG=1` as datagrams
to `$NOTIFY_SOCKET` (a path, or an abstract socket written `@name`), as sd_notify(3)
does. Outside systemd (no `NOTIFY_SOCKET`) every call does nothing. The variables are
taken out of the environment when read, so the playbooks the service starts never
see them (with NotifyAccess=main systemd would ignore them anyway).

`Progress` is how the service's loops show that they move: each loop thread beats at
its progress points, promising to beat again within the watchdog interval, or later
when it starts something legitimately long (a playbook, up to its run timeout). The
service pings the watchdog only while no loop has broken its promise: a loop stuck
anywhere stops the pings, and systemd restarts the service after `WatchdogSec=`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping

log = logging.getLogger(__name__)

ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Messages to systemd's notify socket; inert without one."""

    def __init__(self, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval: float | None = None  # seconds, when systemd expects pings
        try:
            usec = int(env.get("WATCHDOG_USEC", ""))
            pid = int(env.get("WATCHDOG_PID") or os.getpid())
        except ValueError:
            usec, pid = 0, 0
        if usec > 0 and pid == os.getpid():
            self.watchdog_interval = usec / 1_000_000
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """Read the variables and remove them (sd_notify's unset_environment)."""
        env = os.environ if environ is None else environ
        notifier = cls(env)
        for name in ENV_VARS:
            env.pop(name, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """One datagram of newline-separated KEY=value fields; False when not sent."""
        if self.address is None:
            return False
        data = "\n".join(f.replace("\n", " ") for f in fields).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(data, self.address)
                return True
            except OSError as exc:  # systemd gone or restarting: the service goes on
                log.debug("sd_notify %r failed: %s", fields, exc)
                return False

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def stopping(self, status: str = "") -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):  # abstract namespace: a leading NUL byte
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # unset, or a kind of address we do not speak (vsock)


class Progress:
    """When each loop thread last moved, and when it promised to move again.

    `beat()` is called by the loop's own thread (the loop is named after it: intake,
    work-1, ...). `allowance` is how long a loop may go between beats by default;
    `bounded()` caps the loops' waits (an IDLE, an idle worker) well below it."""

    def __init__(self, allowance: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.allowance = allowance
        self._clock = clock
        self._cond = threading.Condition()
        self._due: dict[str, float] = {}
        self._last: dict[str, float] = {}
        self._doing: dict[str, str] = {}

    def beat(self, doing: str | None = None, busy_for: float = 0.0, loop: str | None = None) -> None:
        """This loop moved; it will again within `busy_for` + the allowance. `doing` is
        what it does now (for STATUS=)."""
        name = loop or threading.current_thread().name
        now = self._clock()
        with self._cond:
            self._due[name] = now + busy_for + (self.allowance or 0.0)
            self._last[name] = now
            if doing is not None:
                self._doing[name] = doing
            self._cond.notify_all()

    def retire(self, loop: str | None = None) -> None:
        """The loop ended on purpose (shutdown): no longer expected to beat."""
        name = loop or threading.current_thread().name
        with self._cond:
            for notes in (self._due, self._last, self._doing):
                notes.pop(name, None)
            self._cond.notify_all()

    def bounded(self, seconds: float) -> float:
        """A wait that leaves a loop time to beat again within the allowance."""
        return min(seconds, self.allowance / 2) if self.allowance else seconds

    def stalled(self) -> dict[str, float]:
        """The loops past their promise, each with the seconds since it last moved
        (none without an allowance: nobody watches)."""
        if not self.allowance:
            return {}
        now = self._clock()
        with self._cond:
            return {name: now - self._last[name] for name, due in self._due.items() if now > due}

    def doing(self) -> dict[str, str]:
        with self._cond:
            return {name: self._doing.get(name, "") for name in sorted(self._due)}

    def wait_started(self, ready: Callable[[set[str]], bool], stop: threading.Event) -> bool:
        """Wait until `ready(names of the loops that beat)` holds, or `stop` is set."""
        with self._cond:
            while not stop.is_set():
                if ready(set(self._due)):
                    return True
                self._cond.wait(0.2)
        return False


class Watchdog:
    """Pings systemd's watchdog while every loop keeps its promise; otherwise says which
    loop is stuck (log, STATUS=) and stops pinging, so systemd restarts the service."""

    def __init__(self, notifier: Notifier, progress: Progress, describe: Callable[[], str] = str):
        self.notifier = notifier
        self.progress = progress
        self.describe = describe
        self.stuck: dict[str, float] = {}
        self.pings = 0

    @property
    def interval(self) -> float:
        """How often to tick: half the watchdog interval (sd_watchdog_enabled(3)), and
        at most 30 s, so STATUS= stays current."""
        wd = self.notifier.watchdog_interval
        return min(wd / 2, 30.0) if wd else 30.0

    def tick(self) -> bool:
        """One check: ping if no loop is stuck; True when pinged (or nothing to ping)."""
        stalled = self.progress.stalled()
        if stalled:
            text = ", ".join(f"{name} silent for {quiet:.0f} s" for name, quiet in sorted(stalled.items()))
            if set(stalled) != set(self.stuck):
                log.error("watchdog: no progress in %s; not pinging systemd (it restarts the service)", text)
            self.stuck = stalled
            self.notifier.status(f"STUCK: {text}; watchdog pings stopped")
            return False
        if self.stuck:
            log.warning("watchdog: every loop moves again (%s was stuck)", ", ".join(self.stuck))
            self.stuck = {}
        with contextlib.suppress(Exception):  # a status text never stops the pings
            self.notifier.status(self.describe())
        if self.notifier.watchdog_interval:
            self.pings += self.notifier.watchdog()
        return True
