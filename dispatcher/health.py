"""Is the service well? What `athome status` reads, for people and for monitoring.

The running service notes in `state/health.json` when each loop last completed a
pass (intake: the mailbox was read; work: the queue was worked) and its last
error. `status()` adds what the state directory shows: whether a process holds
the service's locks, queue depths, the age of the oldest pending job, records
set aside, lock-outs in force. `verdict()` turns that into 0 healthy, 1
degraded or 2 down, the exit code of `athome status` (Nagios, Zabbix, a timer).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

HEALTHY, DEGRADED, DOWN = 0, 1, 2
VERDICTS = {HEALTHY: "healthy", DEGRADED: "degraded", DOWN: "down"}


class Health:
    """The service's notes on itself (`state/health.json`), written atomically."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()

    def read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (FileNotFoundError, ValueError):
            return {}

    def note(self, **fields: Any) -> None:
        with self._lock:
            data = {**self.read(), **fields}
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            try:
                tmp.write_text(json.dumps(data))
                os.replace(tmp, self.path)
            except OSError:  # a full disk must not stop a loop over a health note
                tmp.unlink(missing_ok=True)

    def ok(self, loop: str) -> None:
        self.note(**{f"{loop}_ok": time.time()})

    def error(self, loop: str, message: str) -> None:
        self.note(last_error=f"{loop}: {message}"[:500], last_error_at=time.time())


def lock_held(path: Path) -> bool:
    """Another process holds this flock (the service's intake.lock / work.lock)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def status(cfg, now: float | None = None) -> dict[str, Any]:
    from dispatcher.jobqueue import STATES, DirQueue

    now = now or time.time()
    jobs, outbox = DirQueue(cfg.queue_dir), DirQueue(cfg.outbox_dir)
    pending = jobs.list("pending")
    unsent = outbox.list("pending")
    notes = Health(cfg.state_dir / "health.json").read()
    lockouts = 0
    senders = cfg.throttle_dir / "senders"
    if senders.is_dir():
        for path in senders.iterdir():
            try:
                lockouts += float(json.loads(path.read_text()).get("locked_until", 0)) > now
            except (OSError, ValueError, AttributeError, TypeError):
                continue
    return {
        "service": {
            "intake_running": lock_held(cfg.state_dir / "intake.lock"),
            "work_running": lock_held(cfg.state_dir / "work.lock"),
            "mailbox_read_ago": _ago(notes.get("intake_ok"), now),
            "queue_worked_ago": _ago(notes.get("work_ok"), now),
            "last_error": notes.get("last_error", ""),
            "last_error_ago": _ago(notes.get("last_error_at"), now),
        },
        "jobs": {state: jobs.count(state) for state in STATES},
        "oldest_pending_age": round(now - min(j.created for j in pending)) if pending else None,
        "quarantined": {"jobs": len(jobs.quarantined()), "replies": len(outbox.quarantined())},
        "replies_unsent": len(unsent),
        "oldest_unsent_reply_age": round(now - min(j.created for j in unsent)) if unsent else None,
        "lockouts": lockouts,
        "inventory": _inventory(cfg, now),
    }


def _inventory(cfg, now: float) -> dict[str, Any]:
    """The inventory revision in force and, from git, the last fetch."""
    from dispatcher import gitinventory

    if cfg.inventory_git is None:
        return {"source": str(cfg.inventory), "revision": gitinventory.revision(cfg.inventory)}
    git = gitinventory.GitInventory(cfg.inventory_git, cfg.state_dir / "inventory")
    state = git.state()
    rejected = state.get("rejected", {})
    return {
        "source": f"git {cfg.inventory_git.branch}",
        "revision": git.revision(),
        "revision_described": state.get("revision_described", ""),
        "last_fetch_ago": _ago(state.get("last_fetch"), now),
        "last_fetch_error": state.get("last_fetch_error", ""),
        "remote_revision": state.get("remote_revision", ""),
        "remote_refused": state.get("remote_revision", "") in rejected,
    }


def _ago(stamp, now: float) -> int | None:
    return round(now - stamp) if isinstance(stamp, (int, float)) else None


def verdict(report: dict[str, Any], cfg) -> tuple[int, list[str]]:
    """(code, reasons): DOWN when the service is not running or has not read the mailbox
    for `monitoring.down_after_minutes`; DEGRADED when work or replies lag behind, records
    were set aside, an error is recent or a sender is locked out."""
    down, degraded = [], []
    svc = report["service"]
    if not (svc["intake_running"] and svc["work_running"]):
        down.append("the service is not running (no process holds its locks)")
    read_ago = svc["mailbox_read_ago"]
    if read_ago is None or read_ago > cfg.down_after_minutes * 60:
        down.append(f"the mailbox has not been read for {_minutes(read_ago)}")
    if (report["oldest_pending_age"] or 0) > cfg.degraded_after_minutes * 60:
        degraded.append(f"a job has waited {_minutes(report['oldest_pending_age'])}")
    if (report["oldest_unsent_reply_age"] or 0) > cfg.degraded_after_minutes * 60:
        degraded.append(f"a reply has waited {_minutes(report['oldest_unsent_reply_age'])} to be sent")
    if report["quarantined"]["jobs"] or report["quarantined"]["replies"]:
        degraded.append(f"records set aside in quarantine: {report['quarantined']}")
    if svc["last_error_ago"] is not None and svc["last_error_ago"] < cfg.degraded_after_minutes * 60:
        degraded.append(f"recent error: {svc['last_error']}")
    if report["lockouts"]:
        degraded.append(f"{report['lockouts']} sender(s) locked out after bad tokens")
    inv = report.get("inventory") or {}
    if inv.get("source", "").startswith("git"):
        if not inv.get("revision"):
            down.append("no inventory revision in force (nothing fetched, or every one refused)")
        if inv.get("remote_refused"):
            degraded.append(f"the newest inventory commit {inv['remote_revision'][:12]} was refused")
        fetched = inv.get("last_fetch_ago")
        if fetched is None or fetched > cfg.degraded_after_minutes * 60:
            degraded.append(f"the inventory has not been fetched for {_minutes(fetched)}")
    if down:
        return DOWN, down + degraded
    return (DEGRADED, degraded) if degraded else (HEALTHY, [])


def _minutes(seconds) -> str:
    return "ever" if seconds is None else f"{seconds / 60:.0f} min"
