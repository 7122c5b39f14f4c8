"""Counters that keep a flood cheap: bad-token lock-outs and caps on the mail we send about it.

Per sender: failures within `window` seconds; at `limit` the sender is locked
out for `cooldown` seconds (its commands are refused without checking a token)
and the lock-out is reported once. In total: failures of every sender within
the window, so a flood spread over many addresses is seen too.

State lives in small JSON files named by an HMAC of the sender (no address
in clear on disk), written atomically but without fsync: a crash loses at
most a few counts, never a command.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Failure:
    """What one more failure did: `locked_until` (0 when not locked) and whether this very
    failure started the lock-out (report it once)."""

    count: int
    locked_until: float
    started_lockout: bool
    total: int


class Throttle:
    def __init__(
        self,
        root: str | os.PathLike,
        name: Callable[[str], str],
        limit: int = 5,
        window: float = 900,
        cooldown: float = 900,
    ):
        self.root = Path(root)
        self.name = name  # sender -> file name (an HMAC under the server key)
        self.limit, self.window, self.cooldown = limit, window, cooldown
        self._total: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[int, dict]] = {}  # path -> (mtime_ns, data): a stat, not a read
        (self.root / "senders").mkdir(parents=True, exist_ok=True)
        (self.root / "caps").mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------- storage
    def _read(self, path: Path) -> dict:
        try:
            data = json.loads(path.read_text())
            return data if isinstance(data, dict) else {}
        except (FileNotFoundError, ValueError):
            return {}

    def _write(self, path: Path, data: dict) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        try:
            tmp.write_text(json.dumps(data))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    # ----------------------------------------------------------- lock-outs
    def locked_until(self, sender: str, now: float | None = None) -> float:
        """When the sender's lock-out ends, or 0 when it is not locked out."""
        now = now or time.time()
        until = float(self._read(self.root / "senders" / self.name(sender)).get("locked_until", 0))
        return until if until > now else 0.0

    def failure(self, sender: str, now: float | None = None) -> Failure:
        now = now or time.time()
        with self._lock:
            path = self.root / "senders" / self.name(sender)
            data = self._read(path)
            recent = [t for t in data.get("failures", []) if now - t < self.window][-self.limit * 4 :]
            recent.append(now)
            locked = float(data.get("locked_until", 0))
            started = False
            if locked <= now and len(recent) >= self.limit:
                locked, started = now + self.cooldown, True
                recent = []  # a new lock-out needs `limit` new failures after this one ends
            self._write(path, {"failures": recent, "locked_until": locked})
            self._total.append(now)
            while self._total and now - self._total[0] >= self.window:
                self._total.popleft()
            return Failure(len(recent), locked if locked > now else 0.0, started, len(self._total))

    def total(self, now: float | None = None) -> int:
        now = now or time.time()
        with self._lock:
            return sum(1 for t in self._total if now - t < self.window)

    def clear(self, sender: str) -> None:
        """An operator's `athome token unlock ADDRESS`."""
        (self.root / "senders" / self.name(sender)).unlink(missing_ok=True)

    # ---------------------------------------------------------------- caps
    def allow(self, kind: str, who: str, limit: int, per: float = 3600, now: float | None = None) -> bool:
        """At most `limit` events of `kind` for `who` within `per` seconds (mails we send)."""
        now = now or time.time()
        with self._lock:
            path = self.root / "caps" / self.name(f"{kind}\0{who}")
            recent = [t for t in self._read(path).get("at", []) if now - t < per]
            if len(recent) >= limit:
                return False
            self._write(path, {"at": [*recent, now]})
            return True

    def prune(self, older_than: float, now: float | None = None) -> int:
        """Remove counter files untouched for `older_than` seconds."""
        now = now or time.time()
        removed = 0
        for sub in ("senders", "caps"):
            for path in (self.root / sub).iterdir():
                try:
                    if now - path.stat().st_mtime > older_than:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    pass
        return removed
