"""A durable directory queue (after CPython's mailbox.Maildir and persist-queue's ack queue).

Layout under the queue's root:

    tmp/         records being written (never read as jobs)
    pending/     waiting; a record with `not_before` in the future waits longer
    processing/  claimed by a worker (claim = one atomic rename: one winner)
    done/        finished
    failed/      finished without success (attempts spent or definitive error)
    quarantine/  records that could not be read; reported, never retried blindly

Every write is: create tmp/<name> with O_EXCL, write, flush, fsync, then
rename (or link) into its state dir and fsync both directories. A record
that reaches a state dir is never edited in place: a new version is
written to tmp/ and renamed over it. When a step is interrupted between
writing the next state and unlinking the previous one, `recover()` keeps the
later state (done/failed > pending > processing).

The same class serves the job queue and the outgoing mail queue.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dispatcher.errors import QueueError

log = logging.getLogger(__name__)

STATES = ("pending", "processing", "done", "failed")
_DIRS = ("tmp", *STATES, "quarantine")
_SUFFIX = ".json"
INTERRUPTED = "a execução foi interrompida (o serviço parou) e as tentativas se esgotaram"


def new_request_id(now: float | None = None) -> str:
    """Sortable and unique: 20251111_171215_482913_a1 (UTC, microseconds, random byte).

    UTC keeps the order across DST and time-zone changes of the controller."""
    now = time.time() if now is None else now
    stamp = datetime.fromtimestamp(now, tz=timezone.utc)
    return f"{stamp:%Y%m%d_%H%M%S}_{stamp.microsecond:06d}_{secrets.token_hex(1)}"


def _crash_point(name: str) -> None:
    """Test hook: ATHOME_CRASH_AT=<name> kills the process here, as a power cut would."""
    if os.environ.get("ATHOME_CRASH_AT") == name:
        os._exit(77)


@dataclass
class Job:
    id: str
    payload: dict[str, Any]
    state: str = "pending"
    created: float = field(default_factory=time.time)
    attempts: int = 0
    max_attempts: int = 3
    not_before: float = 0.0
    result: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def note(self, event: str, **detail: Any) -> None:
        self.history.append({"at": round(time.time(), 3), "event": event, **detail})

    def to_json(self) -> bytes:
        data = asdict(self)
        data.pop("state")
        return json.dumps(data, ensure_ascii=False, sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, raw: bytes, state: str) -> Job:
        data = json.loads(raw)
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            raise ValueError("not a job record")
        return cls(state=state, **data)


class DirQueue:
    def __init__(self, root: str | os.PathLike, max_attempts: int = 3):
        self.root = Path(root)
        self.max_attempts = max_attempts
        for d in _DIRS:
            (self.root / d).mkdir(parents=True, exist_ok=True)
        st = self.root.stat()
        self._owner = (st.st_uid, st.st_gid)

    # ------------------------------------------------------------- low level

    def _path(self, state: str, job_id: str) -> Path:
        return self.root / state / f"{job_id}{_SUFFIX}"

    def _write_tmp(self, job: Job) -> Path:
        tmp = self.root / "tmp" / f"{job.id}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if os.geteuid() == 0 and self._owner[0] != 0:
                # root (an operator's sudo) writes records the service user can still read
                os.fchown(fd, *self._owner)
            os.write(fd, job.to_json())
            os.fsync(fd)
        finally:
            os.close(fd)
        return tmp

    def _fsync_dir(self, *states: str) -> None:
        for state in states:
            fd = os.open(self.root / state, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _replace_into(self, job: Job, state: str) -> None:
        """Write job as the new version of state/<id> (atomic rename)."""
        tmp = self._write_tmp(job)
        os.replace(tmp, self._path(state, job.id))
        self._fsync_dir("tmp", state)

    def _move(self, job: Job, from_state: str, to_state: str, crash_name: str) -> None:
        self._replace_into(job, to_state)
        _crash_point(crash_name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(from_state, job.id))
        self._fsync_dir(from_state)
        job.state = to_state

    def _read(self, state: str, job_id: str) -> Job:
        path = self._path(state, job_id)
        raw = path.read_bytes()
        try:
            return Job.from_json(raw, state)
        except (ValueError, TypeError) as exc:
            self._quarantine(path, exc)
            raise QueueError(f"record {path.name} is corrupt and was quarantined: {exc}") from exc

    def _quarantine(self, path: Path, exc: Exception) -> None:
        target = self.root / "quarantine" / f"{path.name}.{int(time.time())}"
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, target)
        log.error("quarantined corrupt queue record %s: %s", path.name, exc)

    # ------------------------------------------------------------ operations

    def put(self, payload: dict[str, Any], job_id: str | None = None, max_attempts: int | None = None) -> Job:
        """Store a new pending job. With an explicit id, putting it twice is a no-op
        that returns the existing job (idempotent enqueue); otherwise a fresh id."""
        while True:
            job = Job(
                id=job_id or new_request_id(),
                payload=payload,
                max_attempts=max_attempts or self.max_attempts,
            )
            existing = self.find(job.id)
            if existing is not None:
                if job_id:
                    return existing
                continue
            job.note("queued")
            tmp = self._write_tmp(job)
            _crash_point("enqueue-after-tmp")
            try:
                os.link(tmp, self._path("pending", job.id))
            except FileExistsError:
                os.unlink(tmp)
                if job_id:
                    return self.get(job.id)
                continue
            os.unlink(tmp)
            self._fsync_dir("tmp", "pending")
            log.debug("queued %s", job.id)
            return job

    def claim(self, now: float | None = None) -> Job | None:
        """Take the oldest due pending job into processing/ (one winner per job)."""
        now = time.time() if now is None else now
        for name in sorted(os.listdir(self.root / "pending")):
            if not name.endswith(_SUFFIX):
                continue
            job_id = name[: -len(_SUFFIX)]
            try:
                job = self._read("pending", job_id)
            except FileNotFoundError:
                continue
            except QueueError:
                continue
            except OSError as exc:  # e.g. a record another user wrote 0600
                log.error("cannot read queue record %s: %s; skipped", name, exc)
                continue
            if job.not_before > now:
                continue
            try:
                os.rename(self._path("pending", job_id), self._path("processing", job_id))
            except FileNotFoundError:
                continue  # another worker won
            self._fsync_dir("pending", "processing")
            _crash_point("claim-after-rename")
            job.state = "processing"
            job.attempts += 1
            job.note("claimed", attempt=job.attempts)
            self._replace_into(job, "processing")
            return job
        return None

    def checkpoint(self, job: Job) -> None:
        """Persist the job's current fields (e.g. its result) while it stays in processing/."""
        self._replace_into(job, job.state)

    def finish(self, job: Job, success: bool = True, **detail: Any) -> None:
        target = "done" if success else "failed"
        job.note(target, **detail)
        self._move(job, job.state, target, f"finish-{target}")

    def retry_later(self, job: Job, delay: float, reason: str) -> None:
        job.not_before = time.time() + delay
        job.note("retry", reason=reason, delay=delay)
        self._move(job, job.state, "pending", "retry")

    def release(self, job: Job, reason: str) -> None:
        """Give a claimed job back without spending an attempt (e.g. shutting down)."""
        job.attempts = max(0, job.attempts - 1)
        job.note("released", reason=reason)
        self._move(job, job.state, "pending", "release")

    def retry_failed(self, job_id: str) -> Job:
        """Ops: put a failed job back to pending with a fresh set of attempts."""
        job = self._read("failed", job_id)
        job.attempts = 0
        job.not_before = 0.0
        job.result = None
        job.note("requeued by operator")
        self._move(job, "failed", "pending", "requeue")
        return job

    def recover(self, min_age: float = 0.0) -> list[str]:
        """At start: settle what a crash left in processing/. Returns what was done, for the log.

        Records younger than min_age seconds are left alone (another process may be
        working on them: the outbox is flushed by both intake and work)."""
        actions = []
        young = time.time() - min_age
        for name in sorted(os.listdir(self.root / "processing")):
            if not name.endswith(_SUFFIX):
                continue
            with contextlib.suppress(FileNotFoundError):
                if min_age and os.stat(self.root / "processing" / name).st_mtime > young:
                    continue
            job_id = name[: -len(_SUFFIX)]
            later = next((s for s in ("done", "failed", "pending") if self._path(s, job_id).exists()), None)
            if later:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path("processing", job_id))
                actions.append(f"{job_id}: already {later}, dropped the stale processing copy")
                continue
            try:
                job = self._read("processing", job_id)
            except QueueError as exc:
                actions.append(str(exc))
                continue
            if job.result is not None:
                actions.append(f"{job_id}: finished before the crash, left for completion")
                continue  # the worker completes it (reply + finish) without running again
            if job.attempts >= job.max_attempts:
                # Record the outcome; the worker completes it (failure reply, failed/).
                job.result = {
                    "outcome": "failed",
                    "interrupted": True,
                    "playbook": {"status": "failed", "hosts": {}, "errors": [INTERRUPTED]},
                }
                job.note("interrupted with attempts spent")
                self.checkpoint(job)
                actions.append(f"{job_id}: interrupted with attempts spent -> completed as failed")
            else:
                job.note("recovered after interruption")
                self._move(job, "processing", "pending", "recover")
                actions.append(f"{job_id}: interrupted -> pending")
        stale = time.time() - max(min_age, 3600)
        for tmp in (self.root / "tmp").iterdir():
            # never renamed into place: a write that did not complete (not one under way now)
            with contextlib.suppress(FileNotFoundError):
                if tmp.stat().st_mtime < stale:
                    tmp.unlink()
        for action in actions:
            log.warning("queue recovery: %s", action)
        return actions

    def completed_in_processing(self) -> list[Job]:
        """Jobs whose result was saved before a crash but that were not finished."""
        jobs = []
        for name in sorted(os.listdir(self.root / "processing")):
            if name.endswith(_SUFFIX):
                with contextlib.suppress(FileNotFoundError, QueueError):
                    job = self._read("processing", name[: -len(_SUFFIX)])
                    if job.result is not None:
                        jobs.append(job)
        return jobs

    # --------------------------------------------------------------- reading

    def find(self, job_id: str) -> Job | None:
        for state in STATES:
            try:
                return self._read(state, job_id)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        return None

    def get(self, job_id: str) -> Job:
        job = self.find(job_id)
        if job is None:
            raise QueueError(f"no job {job_id}")
        return job

    def list(self, state: str) -> list[Job]:
        jobs = []
        for name in sorted(os.listdir(self.root / state)):
            if name.endswith(_SUFFIX):
                with contextlib.suppress(FileNotFoundError, QueueError):
                    jobs.append(self._read(state, name[: -len(_SUFFIX)]))
        return jobs

    def count(self, state: str) -> int:
        return sum(1 for n in os.listdir(self.root / state) if n.endswith(_SUFFIX))

    def position(self, job_id: str) -> int:
        """1-based place of a pending job in FIFO order (0 if not pending)."""
        names = sorted(n for n in os.listdir(self.root / "pending") if n.endswith(_SUFFIX))
        try:
            return names.index(f"{job_id}{_SUFFIX}") + 1
        except ValueError:
            return 0

    def prune(self, states: tuple[str, ...], max_age_days: float) -> int:
        """Remove finished records older than max_age_days (by file time); returns how many."""
        cutoff = time.time() - max_age_days * 86400
        removed = 0
        for state in states:
            for entry in os.scandir(self.root / state):
                with contextlib.suppress(FileNotFoundError):
                    if entry.name.endswith(_SUFFIX) and entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
        return removed

    def quarantined(self) -> list[str]:
        return sorted(os.listdir(self.root / "quarantine"))
