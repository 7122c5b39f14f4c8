"""The durable directory queue: state machine, one winner per claim, crash recovery.

Crash tests run the queue in a child process that kills itself (os._exit) at a
named step, as a power cut would, then check that a fresh process finds every
job exactly once and in a consistent state.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from dispatcher.jobqueue import STATES, DirQueue, new_request_id
from tests.servers import wait_for


def files(q: DirQueue) -> dict[str, list[str]]:
    return {s: sorted(os.listdir(q.root / s)) for s in (*STATES, "tmp", "quarantine")}


def test_request_ids_are_unique_and_sortable():
    ids = [new_request_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    stamps = [i.rsplit("_", 1)[0] for i in ids]
    assert stamps == sorted(stamps)


def test_put_claim_finish_moves_one_record_through_the_states(tmp_path):
    q = DirQueue(tmp_path)
    job = q.put({"command": "CHECKIP"})
    assert files(q)["pending"] == [f"{job.id}.json"]
    claimed = q.claim()
    assert claimed.id == job.id and claimed.attempts == 1
    assert files(q)["pending"] == [] and files(q)["processing"] == [f"{job.id}.json"]
    claimed.result = {"outcome": "success"}
    q.finish(claimed)
    f = files(q)
    assert f["done"] == [f"{job.id}.json"] and f["processing"] == [] and f["tmp"] == []
    stored = q.get(job.id)
    assert stored.state == "done" and [h["event"] for h in stored.history] == ["queued", "claimed", "done"]


def test_claim_is_fifo_and_respects_not_before(tmp_path):
    q = DirQueue(tmp_path)
    a, b = q.put({"n": 1}), q.put({"n": 2})
    first = q.claim()
    q.retry_later(first, delay=3600, reason="unreachable")
    assert first.id == a.id
    assert q.claim().id == b.id
    assert q.claim() is None, "a job waiting for its retry time is not due"
    assert q.claim(now=time.time() + 7200).id == a.id


def test_put_with_the_same_id_is_idempotent(tmp_path):
    q = DirQueue(tmp_path)
    one = q.put({"x": 1}, job_id="r-1")
    two = q.put({"x": 2}, job_id="r-1")
    assert one.id == two.id == "r-1" and two.payload == {"x": 1}
    assert q.count("pending") == 1


def _claim_all(root: str) -> list[str]:
    q = DirQueue(root)
    got = []
    while (job := q.claim()) is not None:
        got.append(job.id)
    return got


def test_concurrent_workers_never_claim_the_same_job(tmp_path):
    q = DirQueue(tmp_path)
    ids = {q.put({"n": i}).id for i in range(200)}
    with ProcessPoolExecutor(4) as pool:
        results = list(pool.map(_claim_all, [str(tmp_path)] * 4))
    claimed = [i for r in results for i in r]
    assert sorted(claimed) == sorted(ids), "every job claimed exactly once"


def test_corrupt_record_is_quarantined_and_the_rest_continue(tmp_path):
    q = DirQueue(tmp_path)
    good = q.put({"ok": True})
    (q.root / "pending" / "00000000_000000_000000_00.json").write_text("{not json")
    assert q.claim().id == good.id
    assert len(q.quarantined()) == 1
    assert q.claim() is None


def test_retry_failed_puts_a_job_back_with_fresh_attempts(tmp_path):
    q = DirQueue(tmp_path, max_attempts=1)
    job = q.claim() if q.put({"n": 1}) else None
    q.finish(job, success=False)
    again = q.retry_failed(job.id)
    assert again.state == "pending" and again.attempts == 0
    assert q.claim().id == job.id


CHILD = textwrap.dedent(
    """
    import sys
    from dispatcher.jobqueue import DirQueue
    q = DirQueue(sys.argv[1], max_attempts=int(sys.argv[3]))
    step = sys.argv[2]
    if step == "enqueue":
        q.put({"n": 1}, job_id="job-1")
    elif step == "claim":
        q.claim()
    elif step == "finish":
        j = q.claim(); j.result = {"outcome": "success"}; q.checkpoint(j); q.finish(j)
    elif step == "retry":
        j = q.claim(); q.retry_later(j, 0, "unreachable")
    """
)


def run_child(root, step, crash_at, max_attempts=3):
    env = dict(os.environ, ATHOME_CRASH_AT=crash_at)
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(root), step, str(max_attempts)], env=env
    ).returncode


@pytest.mark.parametrize(
    ("step", "crash_at", "expect_state", "expect_attempts"),
    [
        ("enqueue", "enqueue-after-tmp", None, 0),  # never acknowledged: nothing queued, nothing half-written
        ("claim", "claim-after-rename", "pending", 0),  # claimed, never ran: back to pending
        ("finish", "finish-done", "done", 1),  # done written, processing copy left: done wins
        ("retry", "retry", "pending", 1),  # pending written, processing copy left: pending wins
    ],
)
def test_a_crash_at_each_step_loses_nothing_and_duplicates_nothing(
    tmp_path, step, crash_at, expect_state, expect_attempts
):
    q = DirQueue(tmp_path)
    if step != "enqueue":
        q.put({"n": 1}, job_id="job-1")
    assert run_child(tmp_path, step, crash_at) == 77, "the child died at the crash point"
    q = DirQueue(tmp_path)
    for leftover in (q.root / "tmp").iterdir():  # as if the crash was over an hour ago
        os.utime(leftover, (time.time() - 7200, time.time() - 7200))
    q.recover()
    f = files(q)
    everywhere = [n for s in STATES for n in f[s]]
    assert f["tmp"] == [], "half-written records are cleaned"
    if expect_state is None:
        assert everywhere == []
        return
    assert everywhere == ["job-1.json"], f"exactly one copy of the job: {f}"
    job = q.get("job-1")
    assert job.state == expect_state
    assert job.attempts == expect_attempts


def test_a_job_interrupted_with_its_attempts_spent_is_completed_as_failed(tmp_path):
    q = DirQueue(tmp_path, max_attempts=1)
    q.put({"n": 1}, job_id="job-1")
    q.claim()  # the worker died during the playbook
    assert q.recover() == ["job-1: interrupted with attempts spent -> completed as failed"]
    [job] = q.completed_in_processing()
    assert job.id == "job-1" and job.result["outcome"] == "failed" and job.result["interrupted"]
    assert q.claim() is None, "not run again"


def test_a_job_whose_result_was_saved_is_completed_not_rerun(tmp_path):
    q = DirQueue(tmp_path)
    q.put({"n": 1}, job_id="job-1")
    job = q.claim()
    job.result = {"outcome": "success"}
    q.checkpoint(job)
    q.recover()
    assert [j.id for j in q.completed_in_processing()] == ["job-1"]
    assert q.claim() is None, "it is not offered to run again"


def test_records_are_plain_json_readable_by_ops(tmp_path):
    q = DirQueue(tmp_path)
    job = q.put({"command": "CHECKIP", "params": {"ip": "3.3.3.3"}})
    data = json.loads((q.root / "pending" / f"{job.id}.json").read_text())
    assert data["payload"]["params"] == {"ip": "3.3.3.3"}
    assert oct((q.root / "pending" / f"{job.id}.json").stat().st_mode & 0o777) == "0o600"


def test_a_run_that_reached_no_host_is_not_a_success():
    from dispatcher.runner import HostResult, PlaybookResult

    assert not PlaybookResult("x.yml", "successful", 0).succeeded
    assert PlaybookResult("x.yml", "successful", 0, {"h": HostResult("h")}).succeeded


def test_records_written_by_root_stay_readable_by_the_service_user():
    """An operator's `sudo athome queue retry` must not lock the service user out of the queue.

    The test runs as root (as CI does) and plays the service user with a child
    process that drops to `nobody`."""
    import json as _json
    import shutil

    assert os.geteuid() == 0, "this test needs root to play two users"
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="atq-", dir="/tmp"))  # pytest's tmp_path is root-only
    base.chmod(0o755)
    root = base / "q"
    root.mkdir()
    shutil.chown(root, "nobody", "nogroup")
    DirQueue(root)  # creates the state dirs
    for sub in root.iterdir():
        shutil.chown(sub, "nobody", "nogroup")
    q = DirQueue(root)
    good = q.put({"n": 1})
    assert (root / "pending" / f"{good.id}.json").stat().st_uid == 65534, "root wrote it for the owner"
    stray = root / "pending" / "00000000_000000_000000_00.json"
    stray.write_text(_json.dumps({"id": "00000000_000000_000000_00", "payload": {}}))
    stray.chmod(0o600)  # written by hand as root: unreadable for the service user
    child = textwrap.dedent(
        """
        import os, sys
        os.setgid(65534); os.setuid(65534)
        from dispatcher.jobqueue import DirQueue
        job = DirQueue(sys.argv[1]).claim()
        print(job.id if job else "none")
        """
    )
    # The system Python: the venv's interpreter may live where `nobody` cannot read (/root).
    # And a readable copy of the package: the checkout may live where `nobody` cannot read
    # (a clone in a 0700 temporary directory or home directory).
    lib = base / "lib"
    package = Path(__file__).resolve().parent.parent / "dispatcher"
    shutil.copytree(package, lib / "dispatcher", ignore=shutil.ignore_patterns("__pycache__"))
    for path in [lib, *lib.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    out = subprocess.run(
        ["/usr/bin/python3", "-c", child, str(root)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(lib), "PATH": "/usr/bin:/bin"},
        cwd=str(base),
    )
    shutil.rmtree(base)
    assert out.stdout.strip() == good.id, out.stderr
    assert "cannot read queue record" in out.stderr


# ---------------------------------------------------------------- faults on disk


def _poison(path: Path, kind: str) -> None:
    """Spoil a stored record on disk the way a fault or a person can."""
    good = path.read_bytes()
    if kind == "truncated":  # what a write cut short by a full disk used to store
        path.write_bytes(good[: len(good) // 2])
    elif kind == "wrong type":
        data = json.loads(good)
        data["attempts"] = "1"
        path.write_text(json.dumps(data))
    elif kind == "another id":  # a copy under the wrong name: its writes would go elsewhere
        data = json.loads(good)
        data["id"] = "../pending/other"
        path.write_text(json.dumps(data))
    elif kind == "directory":  # cannot be read, even by root
        path.unlink()
        path.mkdir()
    elif kind == "fifo":  # reading it would block forever
        path.unlink()
        os.mkfifo(path)
    elif kind == "symlink":
        path.unlink()
        path.symlink_to("/etc/hostname")


POISONS = ["truncated", "wrong type", "another id", "directory", "fifo", "symlink"]


@pytest.mark.parametrize("kind", POISONS)
def test_a_pending_record_that_cannot_be_read_is_quarantined_and_the_next_is_claimed(tmp_path, kind):
    q = DirQueue(tmp_path)
    bad, good = q.put({"n": 1}), q.put({"n": 2})
    _poison(q.root / "pending" / f"{bad.id}.json", kind)
    assert q.claim().id == good.id
    [quarantined] = q.quarantined()
    assert quarantined.startswith(f"{bad.id}.json.")
    assert files(q)["pending"] == [] and q.claim() is None


@pytest.mark.parametrize("kind", POISONS)
def test_a_processing_record_that_cannot_be_read_does_not_stop_recovery(tmp_path, kind):
    q = DirQueue(tmp_path)
    q.put({"n": 1}, job_id="a-bad")
    q.put({"n": 2}, job_id="b-interrupted")
    q.put({"n": 3}, job_id="c-finished")
    bad, interrupted, finished = q.claim(), q.claim(), q.claim()
    finished.result = {"outcome": "success"}
    q.checkpoint(finished)
    _poison(q.root / "processing" / "a-bad.json", kind)
    actions = q.recover()
    assert "b-interrupted: interrupted -> pending" in actions
    assert [j.id for j in q.completed_in_processing()] == ["c-finished"]
    assert [n.split(".json.")[0] for n in q.quarantined()] == [bad.id]
    assert q.claim().id == interrupted.id


def test_a_record_root_wrote_by_hand_is_readable_again_once_quarantined(tmp_path):
    """Quarantine moves the file as it is, so an operator can repair it and put it back."""
    q = DirQueue(tmp_path)
    job = q.put({"n": 1})
    path = q.root / "pending" / f"{job.id}.json"
    original = path.read_bytes()
    _poison(path, "truncated")
    assert q.claim() is None
    [name] = q.quarantined()
    (q.root / "quarantine" / name).write_bytes(original)  # repaired
    os.rename(q.root / "quarantine" / name, path)
    assert q.claim().id == job.id


def _tmp_files(q: DirQueue) -> list[str]:
    return sorted(os.listdir(q.root / "tmp"))


def test_on_a_full_disk_put_fails_cleanly_and_claim_puts_the_job_back(workdir):
    from tests.disk import small_disk

    with small_disk(workdir / "disk", "1m") as disk:
        q = DirQueue(disk.path / "queue")
        waiting = q.put({"n": 1})
        disk.fill()
        with pytest.raises(OSError) as info:
            q.put({"n": 2})
        assert info.value.errno == errno.ENOSPC
        assert _tmp_files(q) == [], "the failed write removed its temp file"
        for _ in range(2):  # and again: nothing moves, nothing is spent
            with pytest.raises(OSError):
                q.claim()
            f = files(q)
            assert f["pending"] == [f"{waiting.id}.json"] and f["processing"] == [] and f["tmp"] == []
        assert q.get(waiting.id).attempts == 0 and q.get(waiting.id).state == "pending"
        disk.free()
        claimed = q.claim()
        assert claimed.id == waiting.id and claimed.attempts == 1


def test_a_record_larger_than_the_space_left_is_never_stored_cut_short(workdir):
    """The kernel takes part of a write when the disk is nearly full (a short write)."""
    from tests.disk import small_disk

    with small_disk(workdir / "disk", "1m") as disk:
        q = DirQueue(disk.path / "queue")
        disk.fill()
        disk.leave(4096)
        with pytest.raises(OSError) as info:
            q.put({"blob": "x" * 20000})
        assert info.value.errno == errno.ENOSPC
        f = files(q)
        assert f["pending"] == [] and f["tmp"] == [] and f["quarantine"] == []
        small = q.put({"n": 1})  # fits only because the failed write gave its page back
        assert files(q)["pending"] == [f"{small.id}.json"] and q.get(small.id).payload == {"n": 1}


def test_recovery_on_a_full_disk_puts_an_interrupted_job_back_without_writing(workdir):
    from tests.disk import small_disk

    with small_disk(workdir / "disk", "1m") as disk:
        q = DirQueue(disk.path / "queue")
        q.put({"n": 1}, job_id="job-1")
        q.claim()  # the worker stopped here (its give-back failed, or it died)
        disk.fill()
        assert q.recover() == ["job-1: interrupted -> pending (disk full: moved as it was)"]
        f = files(q)
        assert f["pending"] == ["job-1.json"] and f["processing"] == [] and f["tmp"] == []
        assert q.get("job-1").attempts == 1, "the claimed attempt still counts"


def test_a_finished_job_reaches_its_final_state_even_on_a_full_disk(workdir):
    """Else a reply already sent would be sent again when its claim is recovered."""
    from tests.disk import small_disk

    with small_disk(workdir / "disk", "1m") as disk:
        q = DirQueue(disk.path / "queue")
        q.put({"n": 1}, job_id="job-1")
        job = q.claim()
        disk.fill()
        q.finish(job)
        f = files(q)
        assert f["done"] == ["job-1.json"] and f["processing"] == [] and f["tmp"] == []
        assert q.get("job-1").state == "done"


def test_a_confirmation_and_the_expiry_sweep_cannot_both_take_a_waiting_job(tmp_path):
    """Two processes race for one waiting job (a CONFIRMAR and the sweep at its expiry):
    the one that holds it resumes it, the other then finds it gone, never a second copy."""
    q = DirQueue(tmp_path)
    job = q.put({"command": "MACCHANGE"})
    q.wait(q.claim())
    other = textwrap.dedent(
        f"""
        import sys
        from dispatcher.jobqueue import DirQueue
        q = DirQueue({str(tmp_path)!r})
        print("started", flush=True)
        with q.waiting({job.id!r}) as job:
            if job is not None:
                q.finish(job, success=False, reason="expired")
        print("expired" if job is not None else "gone", flush=True)
        """
    )
    with q.waiting(job.id) as held:
        assert held is not None
        sweep = subprocess.Popen(
            [sys.executable, "-c", other], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent
        )
        assert sweep.stdout.readline() == "started\n"
        # it now waits on the lock we hold: /proc/locks lists its request as "-> FLOCK ... pid"
        inode = (tmp_path / "waiting.lock").stat().st_ino

        def blocked():
            for line in Path("/proc/locks").read_text().splitlines():
                fields = line.split()
                if "->" in fields and fields[-4] == str(sweep.pid) and fields[-3].endswith(f":{inode}"):
                    return True
            return False

        wait_for(blocked, "the sweep blocked on the waiting lock", 60, proc=sweep)
        q.resume(held, by="confirm-message")
    out, _ = sweep.communicate(timeout=60)
    assert out == "gone\n"
    f = files(q)
    assert f["pending"] == [f"{job.id}.json"] and f["failed"] == [] and f["waiting"] == []
