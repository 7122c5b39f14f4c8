"""Per-host locks of the parallel workers (`worker.concurrency`), inside one process.

A job may start only when every host it touches is free, and it takes all its
locks at once, under one mutex: no worker ever holds some locks while waiting
for others, so there is no deadlock. Claiming walks the due pending jobs
oldest first; a job that cannot start reserves its hosts for the rest of that
walk, so a newer job that needs any of them does not overtake it (a CHECKIP on
every fail2ban server is not starved by a stream of single-host jobs), while
jobs on other hosts still start.

The same mutex covers the recovery of stale `processing/` records: a job held
here (running, or being settled) is in flight and is never recovered from under
its worker. The work lock (`state/work.lock`) keeps other processes out.

Which job holds which host, and since when, is published on every change (`publish`,
the service's health notes), so that `athome status`, another process, can show it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dispatcher.jobqueue import DirQueue, Job

log = logging.getLogger(__name__)


class HostLocks:
    def __init__(self, publish: Callable[[dict[str, dict]], None] | None = None) -> None:
        self._cond = threading.Condition()
        self._held: dict[str, frozenset[str]] = {}  # job id -> the hosts it locks
        self._since: dict[str, float] = {}  # job id -> when it took its locks (time.time())
        self._generation = 0  # bumped whenever locks are released or work arrives
        self._publish = publish

    def _changed(self) -> None:
        """Publish the locks (under the mutex, so notes are never written out of order)."""
        if self._publish is None:
            return
        try:
            self._publish(self._locks())
        except Exception:  # a note for monitoring must never stop a worker
            log.warning("could not publish the host locks", exc_info=True)

    def _locks(self) -> dict[str, dict]:
        return {
            host: {"job": job_id, "since": self._since.get(job_id, 0.0)}
            for job_id, hosts in self._held.items()
            for host in sorted(hosts)
        }

    def claim(self, queue: DirQueue, hosts_of: Callable[[Job], frozenset[str]]) -> Job | None:
        """Claim the oldest due job whose hosts are all free (and not reserved by an older
        job that waits for them), with all its host locks; None when none can start."""
        with self._cond:
            busy = set().union(*self._held.values())
            reserved: set[str] = set()
            chosen: dict[str, frozenset[str]] = {}

            def accept(job: Job) -> bool:
                hosts = hosts_of(job)
                if hosts & busy or hosts & reserved:
                    reserved.update(hosts)  # newer jobs on these hosts wait behind this one
                    return False
                chosen[job.id] = hosts
                return True

            job = queue.claim(accept=accept)
            if job is not None:
                self._held[job.id] = chosen[job.id]
                self._since[job.id] = time.time()
                if chosen[job.id]:
                    self._changed()
            return job

    @contextlib.contextmanager
    def quiet(self) -> Iterator[frozenset[str]]:
        """Hold the mutex (no claim or release meanwhile); yields the ids in flight."""
        with self._cond:
            yield frozenset(self._held)

    def hold(self, job_id: str, hosts: frozenset[str] = frozenset()) -> None:
        """Mark a job in flight (inside `quiet()`): e.g. a recovered one being settled."""
        with self._cond:
            self._held[job_id] = hosts
            self._since[job_id] = time.time()
            if hosts:
                self._changed()

    def release(self, job_id: str) -> None:
        with self._cond:
            hosts = self._held.pop(job_id, None)
            self._since.pop(job_id, None)
            self._generation += 1
            self._cond.notify_all()
            if hosts:
                self._changed()

    def poke(self) -> None:
        """Wake the idle workers (new work queued, or stopping)."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    @property
    def generation(self) -> int:
        with self._cond:
            return self._generation

    def wait(self, since: int, timeout: float) -> None:
        """Until a lock is released or work arrives after `since` (a generation), or timeout."""
        with self._cond:
            self._cond.wait_for(lambda: self._generation != since, timeout)

    def busy(self) -> dict[str, str]:
        """host -> id of the job that holds it (for logs and status)."""
        with self._cond:
            return {host: job_id for job_id, hosts in self._held.items() for host in hosts}

    def locks(self) -> dict[str, dict]:
        """host -> {"job": id, "since": time.time() when it was taken}: what is published."""
        with self._cond:
            return self._locks()
