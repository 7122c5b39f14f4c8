"""Host locks of the parallel workers (pure parts and the queue underneath), and each
command's lock set as the inventory resolves it."""

from __future__ import annotations

import threading
import time

import pytest

from dispatcher.commands import COMMANDS, CONTROLLER, Command, CommandSpec
from dispatcher.hostlocks import HostLocks
from dispatcher.inventory import Host, Inventory
from dispatcher.jobqueue import DirQueue
from tests.test_service import make  # noqa: F401 - the fixture


def hosts_of(job) -> frozenset[str]:
    return frozenset(job.payload["hosts"])


@pytest.fixture
def q(tmp_path):
    return DirQueue(tmp_path / "queue")


def put(q: DirQueue, *hosts: str, job_id: str) -> str:
    return q.put({"hosts": list(hosts)}, job_id=job_id).id


def test_claim_takes_the_oldest_job_whose_hosts_are_free(q):
    locks = HostLocks()
    put(q, "a", job_id="1")
    put(q, "a", job_id="2")
    put(q, "b", job_id="3")
    assert locks.claim(q, hosts_of).id == "1"
    assert locks.claim(q, hosts_of).id == "3", "job 2 waits for a; the job on b starts"
    assert locks.claim(q, hosts_of) is None
    assert locks.busy() == {"a": "1", "b": "3"}
    locks.release("1")
    assert locks.claim(q, hosts_of).id == "2"


def test_every_change_of_the_locks_is_published_with_who_holds_them_since_when(q):
    published: list[dict] = []
    locks = HostLocks(publish=published.append)
    put(q, "a", "b", job_id="1")
    put(q, "c", job_id="2")
    before = time.time()
    locks.claim(q, hosts_of)
    locks.claim(q, hosts_of)
    assert [sorted(p) for p in published] == [["a", "b"], ["a", "b", "c"]]
    assert published[-1]["a"]["job"] == "1" and published[-1]["c"]["job"] == "2"
    assert before <= published[-1]["a"]["since"] <= time.time()
    assert published[-1] == locks.locks()
    locks.release("1")
    assert published[-1] == {"c": published[1]["c"]}, "released: gone from the notes"
    locks.hold("3")  # a recovered job being settled: no host, nothing to publish
    locks.release("3")
    assert len(published) == 3


def test_a_job_waiting_for_busy_hosts_is_not_overtaken_on_any_of_them(q):
    locks = HostLocks()
    put(q, "a", job_id="1")  # running
    put(q, "a", "b", job_id="2")  # every host: waits for a, reserves a and b
    put(q, "b", job_id="3")  # b is free but reserved: must not overtake 2
    put(q, "a", job_id="4")
    put(q, "c", job_id="5")  # another host: runs meanwhile
    assert locks.claim(q, hosts_of).id == "1"
    assert locks.claim(q, hosts_of).id == "5"
    assert locks.claim(q, hosts_of) is None
    locks.release("1")
    assert locks.claim(q, hosts_of).id == "2", "released: the oldest waiting job goes first"
    assert locks.claim(q, hosts_of) is None, "3 and 4 wait for it"
    locks.release("2")
    assert [locks.claim(q, hosts_of).id, locks.claim(q, hosts_of).id] == ["3", "4"]


def test_a_job_that_is_not_due_reserves_nothing(q):
    locks = HostLocks()
    later = q.put({"hosts": ["a"]}, job_id="1")
    job = q.claim()
    q.retry_later(job, 3600, "test")
    put(q, "a", job_id="2")
    assert later.id == "1" and locks.claim(q, hosts_of).id == "2"


def test_claim_passes_over_what_accept_refuses(q):
    put(q, "a", job_id="1")
    put(q, "b", job_id="2")
    asked = []
    job = q.claim(accept=lambda j: asked.append(j.id) or j.id == "2")
    assert job.id == "2" and asked == ["1", "2"]
    assert [j.id for j in q.list("pending")] == ["1"]


def test_recovery_leaves_jobs_in_flight_alone(q):
    put(q, "a", job_id="1")
    put(q, "b", job_id="2")
    q.claim()
    q.claim()
    actions = q.recover(skip={"1"})
    assert actions == ["2: interrupted -> pending"]
    assert [j.id for j in q.list("processing")] == ["1"]


def test_the_workers_recovery_never_takes_a_job_from_under_another_worker(make):  # noqa: F811
    d = make()
    running = d.jobs.put({"command": "CHECKIP"}, job_id="running")
    stale = d.jobs.put({"command": "CHECKIP"}, job_id="stale")
    for _ in (running, stale):
        d.jobs.claim()
    d.host_locks.hold("running", frozenset({"gv1p"}))  # another worker's job
    d._recover_jobs()
    assert d.jobs.get("running").state == "processing"
    assert d.jobs.get("stale").state == "pending"


def test_workers_wait_for_a_release_not_for_the_poll_interval():
    locks = HostLocks()
    since = locks.generation
    woke = threading.Event()

    def idle():
        locks.wait(since, timeout=600)
        woke.set()

    t = threading.Thread(target=idle, daemon=True)
    t.start()
    locks.release("nothing")
    assert woke.wait(60), "a release wakes the idle worker"
    t.join(5)


# ------------------------------------------------------------ lock sets of the commands


def inventory(**hosts: tuple[tuple[str, ...], dict]) -> Inventory:
    return Inventory(None, {n: Host(n, frozenset(g), v) for n, (g, v) in hosts.items()})


FLEET = inventory(
    gv1p=(("sip_servers", "fail2ban_servers", "mac_servers"), {"audios_from": "audio"}),
    gv2p=(("sip_servers", "fail2ban_servers"), {"audios_from": "audio", "recordings_host": "audio2"}),
    gv3p=(("sip_servers", "fail2ban_servers"), {"enabled": False}),
    voip1=(("sip_servers",), {"audios_from": "s3"}),
    audio=(("recordings",), {}),
    audio2=(("recordings",), {}),
)


@pytest.mark.parametrize(
    ("name", "params", "hosts"),
    [
        ("CHECKIP", {"ip": "3.3.3.3"}, {"gv1p", "gv2p"}),  # enabled fail2ban servers only
        ("MACCHANGE", {"server": "gv1p"}, {"gv1p"}),
        ("RAMAIS", {"server": "gv1p"}, {"audio"}),  # audio route: the first recordings host
        ("RAMAIS", {"server": "gv2p"}, {"audio2"}),  # ...or the server's recordings_host
        ("RAMAIS", {"server": "voip1"}, {CONTROLLER}),  # s3: the controller does the work
        ("RAMAIS", {"server": "gone"}, {CONTROLLER}),  # refused on localhost by the play
    ],
)
def test_each_command_locks_the_hosts_its_playbook_touches(name, params, hosts):
    assert COMMANDS[name].hosts(Command(name, params, ""), FLEET) == frozenset(hosts)


def test_every_playbook_command_defines_its_lock_set():
    for spec in COMMANDS.values():
        if spec.playbook is not None:
            assert type(spec).hosts is not CommandSpec.hosts, spec.name
