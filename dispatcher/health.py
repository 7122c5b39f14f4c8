"""Is the service well? What `athome status` reads, for people and for monitoring.

The running service notes in `state/health.json` when each loop last completed a
pass (intake: the mailbox was read; work: the queue was worked), its last
error, the hosts its workers hold locked (by which job, since when), whether
the outgoing mail limit holds replies back and whether the SMTP server fails.
`status()` adds what the state directory shows: whether a process holds the
service's locks, queue depths, the age of the oldest pending job, records set
aside, lock-outs in force, recipients sent in the last hour and day.
`verdict()` turns that into 0 healthy, 1 degraded or 2 down, the exit code of
`athome status` (Nagios, Zabbix, a timer).
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
LOCK_MARGIN = 120  # seconds a host lock may outlast the longest run timeout (settling the job)
SMTP_FAILURES_DEGRADED = 3  # SMTP failures in a row before status says so (one 451 is routine)


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


def _service_pid(path: Path) -> int | None:
    """The pid the service wrote into its work.lock, if readable."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def longest_run(cfg) -> int:
    """The longest a playbook may run (the worker's timeout or a command's own)."""
    from dispatcher import commands

    return max([cfg.playbook_timeout, *(s.run_timeout or 0 for s in commands.COMMANDS.values())])


def locked_hosts(notes: dict[str, Any], work_running: bool, pid: int | None, now: float) -> list[dict]:
    """The host locks the running service published; none when it is not running, and
    none from an earlier process (a service killed with its locks held)."""
    locks = notes.get("locks")
    if not work_running or not isinstance(locks, dict) or (pid is not None and notes.get("locks_pid") != pid):
        return []
    found = []
    for host, lock in sorted(locks.items()):
        if isinstance(lock, dict) and isinstance(lock.get("since"), (int, float)):
            found.append(
                {"host": host, "job": str(lock.get("job", "")), "held_for": round(now - lock["since"])}
            )
    return found


def outgoing_mail(cfg, notes: dict[str, Any], now: float) -> dict[str, Any]:
    """Recipients sent in the last hour and day against the limits, replies the limit holds
    back, and an SMTP server that keeps failing (from the service's notes)."""
    from dispatcher.mail import DAY, HOUR, SendLedger

    smtp = cfg.smtp
    usage = SendLedger(cfg.state_dir / "outbox-ledger.json", 0, 0)
    try:
        entries = usage.usage(now).entries if usage.path.exists() else ()
    except OSError:
        entries = ()
    held = notes.get("outbox_held") if isinstance(notes.get("outbox_held"), dict) else {}
    failing = notes.get("smtp_failing") if isinstance(notes.get("smtp_failing"), dict) else {}
    limited = cfg.transport == "imap"
    return {
        "limit_per_hour": smtp.max_recipients_per_hour if limited else 0,
        "limit_per_day": smtp.max_recipients_per_day if limited else 0,
        "sent_last_hour": sum(n for t, n in entries if t > now - HOUR),
        "sent_last_day": sum(n for t, n in entries if t > now - DAY),
        "held_replies": int(held.get("replies", 0) or 0),
        "held_since_ago": _ago(held.get("since"), now),
        "next_send_in": max(0, round(held["next_at"] - now))
        if isinstance(held.get("next_at"), (int, float))
        else None,
        "smtp_failures": int(failing.get("failures", 0) or 0),
        "smtp_failing_since_ago": _ago(failing.get("since"), now),
        "smtp_retry_in": max(0, round(failing["retry_at"] - now))
        if isinstance(failing.get("retry_at"), (int, float))
        else None,
        "smtp_error": str(failing.get("error", "")),
    }


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
    work_running = lock_held(cfg.state_dir / "work.lock")
    service_up = work_running and lock_held(cfg.state_dir / "intake.lock")
    return {
        "service": {
            "intake_running": lock_held(cfg.state_dir / "intake.lock"),
            "work_running": work_running,
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
        "locked_hosts": locked_hosts(notes, work_running, _service_pid(cfg.state_dir / "work.lock"), now),
        "longest_run": longest_run(cfg),
        "outgoing_mail": outgoing_mail(cfg, notes if service_up else {}, now),
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
    too_long = report["longest_run"] + LOCK_MARGIN
    for lock in report["locked_hosts"]:
        if lock["held_for"] > too_long:
            degraded.append(
                f"host {lock['host']} locked by {lock['job']} for {_minutes(lock['held_for'])} "
                f"(longer than the longest run timeout, {report['longest_run']} s, + {LOCK_MARGIN} s)"
            )
    mail = report["outgoing_mail"]
    if mail["held_replies"]:
        degraded.append(
            f"{mail['held_replies']} repl(ies) held back by the outgoing mail limit ("
            + limit_text(mail)
            + f"); the next can go in {_minutes(mail['next_send_in'])}"
        )
    if mail["smtp_failures"] >= SMTP_FAILURES_DEGRADED:
        degraded.append(
            f"the SMTP server failed {mail['smtp_failures']} times in a row "
            f"(for {_minutes(mail['smtp_failing_since_ago'])}): {mail['smtp_error']}"
        )
    if down:
        return DOWN, down + degraded
    return (DEGRADED, degraded) if degraded else (HEALTHY, [])


def _minutes(seconds) -> str:
    return "ever" if seconds is None else f"{seconds / 60:.0f} min"


def limit_text(mail: dict[str, Any]) -> str:
    """'12/150 recipients in the last hour, 40/450 in the last day' (limits in force only)."""
    parts = [
        f"{mail[f'sent_last_{w}']}/{mail[f'limit_per_{w}']}"
        + (" recipients" if not i else "")
        + f" in the last {w}"
        for i, w in enumerate(w for w in ("hour", "day") if mail[f"limit_per_{w}"])
    ]
    return ", ".join(parts) or "no limit"
