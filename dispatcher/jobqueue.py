"""A durable directory queue (after CPython's mailbox.Maildir and persist-queue's ack queue).

Layout under the queue's root:

    tmp/         records being written (never read as jobs)
    pending/     waiting; a record with `not_before` in the future waits longer
    processing/  claimed by a worker (claim = one atomic rename: one winner)
    done/        finished
    failed/      finished without success (attempts spent or definitive error)
    quarantine/  records that cannot be handled (unreadable, corrupt, or refused by
                 the worker); reported, never retried blindly

Every write is: create tmp/<name> with O_EXCL, write it all, fsync, then
rename (or link) into its state dir and fsync both directories. A write that
fails (a full disk) removes its temp file. A record that reaches a state dir
is never edited in place: a new version is written to tmp/ and renamed over
it. When a step is interrupted between writing the next state and unlinking
the previous one, `recover()` keeps the later state (done/failed > pending >
processing).

Faults are told apart by whose they are. A record that cannot be read for a
reason of its own (not JSON, not a job, fields of the wrong type, not a
regular file, permissions) is quarantined and the others go on. A fault of
the file system or the process as a whole (no space, no file descriptors) is
raised: nothing is quarantined for it, and what it interrupted is put back
(a claim whose rewrite fails returns to pending/) or settled by the next
`recover()`, which needs no free space to put a job back.

The same class serves the job queue and the outgoing mail queue.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dispatcher.errors import QueueError

log = logging.getLogger(__name__)

STATES = ("pending", "processing", "waiting", "done", "failed")  # waiting: for a CONFIRMAR
_DIRS = ("tmp", *STATES, "quarantine")
_SUFFIX = ".json"
INTERRUPTED = "a execução foi interrompida (o serviço parou) e as tentativas se esgotaram"
# Read errors that belong to one record (its permissions, its file type): it is
# quarantined. Any other OSError is the system's and is raised.
_RECORD_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ELOOP, errno.EISDIR, errno.ENXIO})
# Writes that fail for want of space: a record may still be moved as it is (a rename).
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "payload": (dict,),
    "created": (int, float),
    "attempts": (int,),
    "max_attempts": (int,),
    "not_before": (int, float),
    "result": (dict, type(None)),
    "history": (list,),
}


def new_request_id(now: float | None = None) -> str:
    """Sortable and unique: 20251111_171215_482913_a1 (UTC, microseconds, random byte).

    UTC keeps the order across DST and time-zone changes of the controller."""
    now = time.time() if now is None else now
    stamp = datetime.fromtimestamp(now, tz=timezone.utc)
    return f"{stamp:%Y%m%d_%H%M%S}_{stamp.microsecond:06d}_{secrets.token_hex(1)}"


def disk_full(exc: BaseException) -> bool:
    """A write refused for want of space (or quota): the system's fault, not a record's."""
    return isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS


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
        """Parse a record; ValueError for anything the queue could not work with safely."""
        try:
            data = json.loads(raw)
        except RecursionError as exc:
            raise ValueError("nested too deeply") from exc
        if not isinstance(data, dict) or not isinstance(data.get("id"), str) or "payload" not in data:
            raise ValueError("not a job record")
        for key, value in data.items():
            kinds = _FIELDS.get(key)
            if kinds is None:
                raise ValueError(f"unknown field {key!r}")
            if not isinstance(value, kinds) or isinstance(value, bool):
                raise ValueError(f"field {key!r} is a {type(value).__name__}")
        if not all(isinstance(h, dict) for h in data.get("history", [])):
            raise ValueError("a history entry is not a mapping")
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
        """The whole record in a new file under tmp/, fsync'd; on any failure the file is removed."""
        data = memoryview(job.to_json())
        tmp = self.root / "tmp" / f"{job.id}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                if os.geteuid() == 0 and self._owner[0] != 0:
                    # root (an operator's sudo) writes records the service user can still read
                    os.fchown(fd, *self._owner)
                while data:  # a nearly full disk takes part of a write: never a truncated record
                    data = data[os.write(fd, data) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
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
        try:
            os.replace(tmp, self._path(state, job.id))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._fsync_dir("tmp", state)

    def _move(self, job: Job, from_state: str, to_state: str, crash_name: str) -> None:
        self._replace_into(job, to_state)
        _crash_point(crash_name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(from_state, job.id))
        self._fsync_dir(from_state)
        job.state = to_state

    def _move_as_is(self, job: Job, from_state: str, to_state: str) -> None:
        """Rename the stored record unchanged (needs no free space): the fallback of a full disk."""
        os.rename(self._path(from_state, job.id), self._path(to_state, job.id))
        self._fsync_dir(from_state, to_state)
        job.state = to_state

    def _read(self, state: str, job_id: str) -> Job:
        path = self._path(state, job_id)
        # O_NONBLOCK: a FIFO in place of a record must not hang the reader; O_NOFOLLOW: no symlinks.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
            raw = b"".join(iter(lambda: os.read(fd, 1 << 16), b"")) if regular else b""
        finally:
            os.close(fd)
        try:
            if not regular:
                raise ValueError("not a regular file")
            job = Job.from_json(raw, state)
            if job.id != job_id:
                raise ValueError(f"its id {job.id!r} is not its file name")
            return job
        except (ValueError, TypeError) as exc:
            self._quarantine(path, f"corrupt: {exc}")
            raise QueueError(f"record {path.name} is corrupt and was quarantined: {exc}") from exc

    def _load(self, state: str, job_id: str) -> Job | None:
        """`_read` for the worker: None when the record is gone or could not be read for a
        reason of its own (then it is quarantined); a fault of the system is raised."""
        try:
            return self._read(state, job_id)
        except (FileNotFoundError, QueueError):
            return None  # taken by another worker meanwhile, or corrupt (quarantined by _read)
        except OSError as exc:
            if exc.errno not in _RECORD_ERRNOS:
                raise
            # e.g. a record root wrote 0600 by hand: the service user cannot read it
            self._quarantine(self._path(state, job_id), f"cannot read queue record: {exc}")
            return None

    def _quarantine(self, path: Path, reason: str) -> None:
        target = self.root / "quarantine" / f"{path.name}.{int(time.time())}"
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, target)
            self._fsync_dir(path.parent.name, "quarantine")
        log.error("quarantined queue record %s (now %s): %s", path.name, target.name, reason)

    def quarantine(self, job: Job, reason: str) -> None:
        """Set aside a record the worker cannot handle (e.g. a payload it does not understand)."""
        self._quarantine(self._path(job.state, job.id), reason)
        job.state = "quarantine"

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
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            os.unlink(tmp)
            self._fsync_dir("tmp", "pending")
            log.debug("queued %s", job.id)
            return job

    def claim(self, now: float | None = None, accept: Callable[[Job], bool] | None = None) -> Job | None:
        """Take the oldest due pending job into processing/ (one winner per job).

        `accept` (the parallel workers' host locks) is asked about each due job, oldest
        first, and may pass over one: the next due job is then considered.
        A record that cannot be read is quarantined and the next one is tried. When
        the claim cannot be recorded (the rewrite with attempts + 1 fails: a full disk),
        the job goes back to pending/ unchanged and the error is raised."""
        now = time.time() if now is None else now
        for name in sorted(os.listdir(self.root / "pending")):
            if not name.endswith(_SUFFIX):
                continue
            job_id = name[: -len(_SUFFIX)]
            job = self._load("pending", job_id)
            if job is None or job.not_before > now:
                continue
            if accept is not None and not accept(job):
                continue
            try:
                os.rename(self._path("pending", job_id), self._path("processing", job_id))
            except FileNotFoundError:
                continue  # another worker won
            try:
                self._fsync_dir("pending", "processing")
                _crash_point("claim-after-rename")
                job.state = "processing"
                job.attempts += 1
                job.note("claimed", attempt=job.attempts)
                self._replace_into(job, "processing")
            except BaseException as exc:
                self._unclaim(job_id, exc)
                raise
            return job
        return None

    def _unclaim(self, job_id: str, exc: BaseException) -> None:
        """Put back a claim that could not be recorded: the stored record is still the pending one."""
        try:
            os.rename(self._path("processing", job_id), self._path("pending", job_id))
            self._fsync_dir("processing", "pending")
        except OSError as again:
            log.error(
                "%s: claim not recorded (%s) and not put back (%s); the next recovery puts it back",
                job_id,
                exc,
                again,
            )
        else:
            log.warning("%s: claim not recorded (%s); back in pending/", job_id, exc)

    def checkpoint(self, job: Job) -> None:
        """Persist the job's current fields (e.g. its result) while it stays in processing/."""
        self._replace_into(job, job.state)

    def finish(self, job: Job, success: bool = True, **detail: Any) -> None:
        """Move the job to done/ or failed/. On a disk too full for its final version the
        record goes there as it is (a rename: its directory says it is finished), so a
        reply already sent is not sent again and a finished job is not completed twice."""
        target = "done" if success else "failed"
        job.note(target, **detail)
        try:
            self._move(job, job.state, target, f"finish-{target}")
        except OSError as exc:
            if not disk_full(exc):
                raise
            log.warning("%s: no space for its final record (%s); moved to %s/ as it was", job.id, exc, target)
            self._move_as_is(job, job.state, target)

    def retry_later(self, job: Job, delay: float, reason: str) -> None:
        job.not_before = time.time() + delay
        job.note("retry", reason=reason, delay=delay)
        self._move(job, job.state, "pending", "retry")

    def release(self, job: Job, reason: str) -> None:
        """Give a claimed job back without spending an attempt (e.g. shutting down)."""
        job.attempts = max(0, job.attempts - 1)
        job.note("released", reason=reason)
        self._move(job, job.state, "pending", "release")

    def wait(self, job: Job, **detail: Any) -> None:
        """A claimed job now waits for its requester's confirmation (processing/ -> waiting/)."""
        job.note("waiting", **detail)
        self._move(job, job.state, "waiting", "wait")

    @contextlib.contextmanager
    def waiting(self, job_id: str) -> Iterator[Job | None]:
        """The job if it still waits for its confirmation (else None), held for the block.

        A confirmation (`resume`) and the expiry sweep (`finish`) both take a job out of
        waiting/; each does it inside this block, under one exclusive flock shared by every
        process, so only one of them can: the other finds the record gone."""
        fd = os.open(self.root / "waiting.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                job = self._read("waiting", job_id)
            except FileNotFoundError:
                job = None
            yield job
        finally:
            os.close(fd)

    def resume(self, job: Job, **detail: Any) -> None:
        """A confirmed job goes back to the queue to run for real (waiting/ -> pending/),
        with a fresh set of attempts. Call it inside `waiting(job.id)`, so a sweep that
        expires the job at the same moment cannot also take it."""
        job.attempts, job.not_before, job.result = 0, 0.0, None
        job.note("confirmed", **detail)
        self._move(job, "waiting", "pending", "resume")

    def retry_failed(self, job_id: str) -> Job:
        """Ops: put a failed job back to pending with a fresh set of attempts."""
        job = self._read("failed", job_id)
        job.attempts = 0
        job.not_before = 0.0
        job.result = None
        job.note("requeued by operator")
        self._move(job, "failed", "pending", "requeue")
        return job

    def recover(self, min_age: float = 0.0, skip: Collection[str] = ()) -> list[str]:
        """Settle what a crash or a failed write left in processing/. Returns what was done,
        for the log.

        Only for a caller that knows no other job in processing/ is being worked on: the
        ids in `skip` (the jobs its own workers hold) and records younger than min_age
        seconds are left alone (the outbox is flushed by intake and work at once). One
        record that cannot be settled now (a full disk) is logged and left for the next
        call; the others go on."""
        actions = []
        young = time.time() - min_age
        for name in sorted(os.listdir(self.root / "processing")):
            if not name.endswith(_SUFFIX):
                continue
            with contextlib.suppress(FileNotFoundError):
                if min_age and os.lstat(self.root / "processing" / name).st_mtime > young:
                    continue
            job_id = name[: -len(_SUFFIX)]
            if job_id in skip:
                continue
            try:
                action = self._recover_one(job_id)
            except OSError as exc:
                log.error("queue recovery: %s: %s; tried again on the next pass", job_id, exc)
                continue
            if action:
                actions.append(action)
        stale = time.time() - max(min_age, 3600)
        for tmp in (self.root / "tmp").iterdir():
            # never renamed into place: a write that did not complete (not one under way now)
            with contextlib.suppress(FileNotFoundError):
                if tmp.stat().st_mtime < stale:
                    tmp.unlink()
        for action in actions:
            log.warning("queue recovery: %s", action)
        return actions

    def _recover_one(self, job_id: str) -> str:
        later = next((s for s in ("done", "failed", "pending") if self._path(s, job_id).exists()), None)
        if later:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path("processing", job_id))
            return f"{job_id}: already {later}, dropped the stale processing copy"
        job = self._load("processing", job_id)
        if job is None:
            return ""  # gone meanwhile, or quarantined (logged)
        if job.result is not None:
            # the worker completes it (reply + finish) without running it again
            return f"{job_id}: finished before the crash, left for completion"
        if job.attempts >= job.max_attempts:
            # Record the outcome; the worker completes it (failure reply, failed/).
            job.result = {
                "outcome": "failed",
                "interrupted": True,
                "playbook": {"status": "failed", "hosts": {}, "errors": [INTERRUPTED]},
            }
            job.note("interrupted with attempts spent")
            self.checkpoint(job)
            return f"{job_id}: interrupted with attempts spent -> completed as failed"
        job.note("recovered after interruption")
        try:
            self._move(job, "processing", "pending", "recover")
        except OSError as exc:
            if not disk_full(exc):
                raise
            # No room for a new version: the stored one goes back as it is (its claimed attempt counts).
            self._move_as_is(job, "processing", "pending")
            return f"{job_id}: interrupted -> pending (disk full: moved as it was)"
        return f"{job_id}: interrupted -> pending"

    def completed_in_processing(self, skip: Collection[str] = ()) -> list[Job]:
        """Jobs whose result was saved before a crash but that were not finished (but
        those in `skip`: held by a worker right now)."""
        jobs = []
        for name in sorted(os.listdir(self.root / "processing")):
            if name.endswith(_SUFFIX) and name[: -len(_SUFFIX)] not in skip:
                job = self._load("processing", name[: -len(_SUFFIX)])
                if job is not None and job.result is not None:
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
