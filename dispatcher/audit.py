"""The audit trail: who asked for what, what was decided, what ran, what changed.

Append-only JSON Lines, one file a month (`state_dir/audit/audit-YYYY-MM.jsonl`),
each record fsync'd before the call returns. Every record carries `prev`, the
SHA-256 of the previous record's line (across month files), so a line edited,
removed or inserted breaks the chain: `athome audit verify` finds it.

Writers are the intake and work threads of the service and the CLI (token
changes), possibly at once: an exclusive flock on `audit/.lock` orders them.
Records never hold a token, a password or a confirmation code: callers pass
masked subjects, token ids and hashed message identities only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
_FILE = re.compile(r"audit-(\d{4})-(\d{2})\.jsonl")


def _digest(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


class AuditLog:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._tail: tuple[Path, int, str] | None = None  # (file, its size, digest of its last line)

    def files(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if _FILE.fullmatch(p.name))

    @contextlib.contextmanager
    def _locked(self):
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _last_digest(self) -> str:
        for path in reversed(self.files()):
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 65536))
                lines = [line for line in f.read().split(b"\n") if line.strip()]
            if lines:
                return _digest(lines[-1])
        return GENESIS

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one record (fsync'd) and return it."""
        now = datetime.now(timezone.utc)
        with self._locked():
            path = self.root / f"audit-{now:%Y-%m}.jsonl"
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                size = -1
            # Nobody wrote since our last record (same size): no need to read the file back.
            unchanged = self._tail is not None and self._tail[:2] == (path, size)
            prev = self._tail[2] if unchanged else self._last_digest()
            rec = {"at": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "event": event}
            rec.update({k: v for k, v in fields.items() if v not in (None, "", [], {})})
            rec["prev"] = prev
            line = (json.dumps(rec, ensure_ascii=False, sort_keys=False) + "\n").encode()
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                start = os.fstat(fd).st_size  # under the lock: nobody else appends meanwhile
                try:
                    written = 0
                    while written < len(line):  # a short write (a nearly full disk) goes on
                        written += os.write(fd, line[written:])
                    os.fsync(fd)
                except BaseException:
                    # Never leave half a record: the next one would follow it on the same
                    # line and the chain would read as tampered with from there on.
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, start)
                    self._tail = None
                    raise
                self._tail = (path, os.fstat(fd).st_size, _digest(line))
            finally:
                os.close(fd)
        return rec

    def records(self) -> Iterator[tuple[Path, int, bytes]]:
        for path in self.files():
            with open(path, "rb") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        yield path, n, line

    def verify(self) -> tuple[int, list[str]]:
        """(records checked, problems): every record's `prev` must be the digest of the
        line before it; the first one's, the genesis value."""
        prev, count, problems = GENESIS, 0, []
        for path, n, line in self.records():
            count += 1
            try:
                rec = json.loads(line)
            except ValueError:
                problems.append(f"{path.name}:{n}: not a JSON record")
                prev = _digest(line)
                continue
            if rec.get("prev") != prev:
                problems.append(
                    f"{path.name}:{n}: chain broken (a record before it edited, removed or added)"
                )
            prev = _digest(line)
        return count, problems

    def search(
        self,
        sender: str | None = None,
        command: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> Iterator[dict[str, Any]]:
        for _path, _n, line in self.records():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if sender and rec.get("sender", "").lower() != sender.lower():
                continue
            if command and rec.get("command_name", "").upper() != command.upper():
                continue
            at = _epoch(rec.get("at", ""))
            if since is not None and at < since or until is not None and at > until:
                continue
            yield rec


def _epoch(stamp: str) -> float:
    try:
        return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return 0.0


def parse_day(text: str, end: bool = False) -> float:
    """'2025-11-29' (UTC day; its end with end=True) or '2025-11-29T10:00' -> epoch."""
    for fmt in ("%Y-%m-%dT%H:%M", "%Y-%m-%d"):
        try:
            dt = datetime.strptime(text, fmt).replace(tzinfo=timezone.utc)
        except ValueError:
            continue
        return dt.timestamp() + (86399.999 if end and fmt == "%Y-%m-%d" else 0)
    raise ValueError(f"not a date: {text!r} (YYYY-MM-DD or YYYY-MM-DDTHH:MM, UTC)")
