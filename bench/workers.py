"""Throughput of the parallel workers: 100 queued MACCHANGE jobs across 4 loopback hosts.

    python -m bench.workers [--jobs 100] [--workers 1,2,4]

Each host is an inventory alias of ONE real sshd on loopback with its own
endpoint files (tests.test_macchange_playbook.MacHost). The jobs go straight
into the queue (no mail), round robin over the hosts, each one undoing the one
before on its host (forward, back, forward...), so they succeed only when the
jobs of a host run one at a time and in order. The same jobs are run with 1, 2
and 4 workers (`Dispatcher.work_forever`, as `athome run` does) from a fresh
state and fresh files; jobs/min is printed beside the 1-worker run of the same
invocation. Every target shares this machine's cores with the controller.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path

from tests import servers
from tests.test_dispatch_commands import REQUESTER, Site
from tests.test_macchange_playbook import MacHost

HOSTS = ("gv1p", "gv2p", "gv3p", "voip1")
MACS = ("010203040506", "010203040599")


def job_payload(n: int) -> dict:
    host = HOSTS[n % len(HOSTS)]
    turn = n // len(HOSTS)
    current, new = MACS[turn % 2], MACS[(turn + 1) % 2]
    text = f"MACCHANGE=3010 MACATUAL={current} MACFUTURO={new} SERVER={host}"
    params = {
        "extension": "3010",
        "mac_current": current,
        "mac_new": new,
        "server": host,
        "operation": "replace",
    }
    return {"command": "MACCHANGE", "params": params, "command_text": text, "requester": REQUESTER}


def mac_inventory(sshd: servers.SSHD, root) -> Path:
    """An inventory of the MAC servers HOSTS under root (fresh endpoint files each), all
    aliases of one sshd; its hosts.yml."""
    python = servers.target_python()
    macs = {name: MacHost(root, name) for name in HOSTS}
    return servers.write_inventory(
        root / "inventory" / "hosts.yml",
        {
            "sip_servers": {name: {"audios_from": "audio"} for name in HOSTS},
            "mac_servers": {name: host.hostvars(python) for name, host in macs.items()},
            "fail2ban_servers": {},
            "recordings": {"audio": {}},
        },
        dict(sshd.ansible_vars(), ansible_python_interpreter=python),
    )


def measure(sshd: servers.SSHD, base, workers: int, jobs: int) -> tuple[float, int, int]:
    """Seconds from start to the last job finished, jobs done, jobs failed."""
    root = base / f"w{workers}"
    root.mkdir()
    site = Site(root, mac_inventory(sshd, root))
    site.cfg.concurrency = workers
    site.cfg.poll_interval = 0.5
    queue = site.dispatcher.jobs
    for n in range(jobs):
        queue.put(job_payload(n))
    stop = threading.Event()
    thread = threading.Thread(target=site.dispatcher.work_forever, args=(stop,), daemon=True)
    started = time.monotonic()
    thread.start()
    while queue.count("done") + queue.count("failed") < jobs:
        time.sleep(0.1)
    elapsed = time.monotonic() - started
    stop.set()
    thread.join()
    return elapsed, queue.count("done"), queue.count("failed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100, help="queued jobs per run (default 100)")
    parser.add_argument("--workers", default="1,2,4", help="worker counts to run (default 1,2,4)")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.workers.split(",")]
    base = servers.short_tmpdir("bwk-")
    keys = servers.SSHKeys(base / "ssh")
    sshd = servers.SSHD(keys).start()
    try:
        print(f"{args.jobs} queued MACCHANGE jobs over {len(HOSTS)} loopback hosts (one sshd)")
        baseline = None
        for workers in counts:
            elapsed, done, failed = measure(sshd, base, workers, args.jobs)
            rate = done * 60 / elapsed
            baseline = baseline or rate
            print(
                f"  {workers} worker(s): {elapsed:6.1f} s, {rate:6.1f} jobs/min"
                f"  ({rate / baseline:.2f}x the {counts[0]}-worker run)  done {done}, failed {failed}",
                flush=True,
            )
        return 0
    finally:
        sshd.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
