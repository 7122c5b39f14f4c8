"""The audit trail: an append-only, hash-chained JSON Lines file per month."""

from __future__ import annotations

import json
import threading

from dispatcher.audit import GENESIS, AuditLog


def test_records_chain_and_verify(tmp_path):
    trail = AuditLog(tmp_path / "audit")
    first = trail.record("message", sender="ana@example.test", outcome="queued", request_id="r1")
    second = trail.record("token", action="add", token_id="t1")
    assert first["prev"] == GENESIS and second["prev"] != GENESIS
    [path] = trail.files()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert trail.verify() == (2, [])


def test_an_edited_or_removed_line_breaks_the_chain(tmp_path):
    trail = AuditLog(tmp_path / "audit")
    for i in range(4):
        trail.record("message", sender=f"s{i}@example.test", outcome="queued")
    [path] = trail.files()
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:1] + [lines[1].replace("s1@", "eve@")] + lines[2:]))
    count, problems = trail.verify()
    assert count == 4 and len(problems) == 1 and f"{path.name}:3" in problems[0]
    path.write_text("".join(lines[:2] + lines[3:]))
    assert trail.verify()[1], "a removed line is found too"
    path.write_text("".join(lines))
    assert trail.verify() == (4, [])


def test_the_chain_continues_across_month_files(tmp_path):
    trail = AuditLog(tmp_path / "audit")
    trail.record("message", outcome="queued")
    [path] = trail.files()
    path.rename(path.with_name("audit-2000-01.jsonl"))  # as if written in an earlier month
    trail.record("message", outcome="replied")
    assert [p.name for p in trail.files()][0] == "audit-2000-01.jsonl" and len(trail.files()) == 2
    assert trail.verify() == (2, [])


def test_concurrent_writers_keep_one_chain(tmp_path):
    def write(n: int) -> None:
        trail = AuditLog(tmp_path / "audit")  # each writer its own object, as processes would
        for i in range(25):
            trail.record("message", writer=n, i=i)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    trail = AuditLog(tmp_path / "audit")
    assert trail.verify() == (100, [])


def test_search_filters_by_sender_command_and_time(tmp_path):
    trail = AuditLog(tmp_path / "audit")
    trail.record("message", sender="ana@example.test", command_name="CHECKIP", outcome="queued")
    trail.record("message", sender="bob@example.test", command_name="RAMAIS", outcome="queued")
    assert [r["sender"] for r in trail.search(sender="ANA@example.test")] == ["ana@example.test"]
    assert [r["command_name"] for r in trail.search(command="ramais")] == ["RAMAIS"]
    assert list(trail.search(since=4102444800)) == []  # 2100-01-01
    assert json.loads(trail.files()[0].read_text().splitlines()[0])["event"] == "message"


def test_a_record_cut_short_by_a_full_disk_is_taken_back_and_the_chain_stays_whole(workdir):
    """A real nearly-full tmpfs: the kernel takes part of a large record (a short write),
    then refuses the rest. The record is taken back whole, the error reaches the caller,
    and once there is room again the chain verifies with no half line in it."""
    import errno

    import pytest

    from tests.disk import small_disk

    with small_disk(workdir / "disk", "1m") as disk:
        log = AuditLog(disk.path / "audit")
        log.record("message", n=1)
        [path] = log.files()
        before = path.read_bytes()
        disk.fill()
        disk.leave(4096)
        with pytest.raises(OSError) as info:
            log.record("message", note="x" * 20000)
        assert info.value.errno == errno.ENOSPC
        assert path.read_bytes() == before, "no part of the failed record is left"
        disk.free()
        log.record("message", n=3)
        assert log.verify() == (2, [])
