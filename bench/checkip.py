"""Wall time of playbooks/unban.yml on 1, 4 and 16 loopback hosts.

    python -m bench.checkip [--repeat N]

Each host is an inventory alias of ONE real sshd on loopback with its own real
fail2ban-server (tests.servers); the address is banned in one jail of the first
host before every run. Prints the median wall time per fleet size and the
16/1 ratio against the goal (16 hosts in at most twice the time of 1 host),
beside the same fan-out of playbooks/ping.yml: the floor any playbook pays per
host here (ssh, a Python start on the target), all hosts sharing the same cores.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time

from dispatcher.runner import run_playbook
from tests import servers

IP = "3.3.3.3"
SIZES = (1, 4, 16)
GOAL_RATIO = 2.0


def measure(sshd: servers.SSHD, base, size: int, repeat: int) -> list[float]:
    fleet = [servers.Fail2ban(base / f"n{size}" / f"h{i:02d}").start() for i in range(size)]
    try:
        inv = servers.write_inventory(
            base / f"inv{size}.yml",
            {"fail2ban_servers": {
                f"h{i:02d}": {"fail2ban_whitelist_conf_dir": str(f.dir)} for i, f in enumerate(fleet)
            }},
            {**sshd.ansible_vars(), "ansible_python_interpreter": servers.target_python()},
        )
        times = []
        for _ in range(repeat):
            fleet[0].ban("asterisk", IP)
            started = time.monotonic()
            res = run_playbook("unban.yml", inventory=inv, extravars={"ip": IP})
            times.append(time.monotonic() - started)
            if not res.succeeded or fleet[0].banned_jails(IP):
                raise SystemExit(f"unban.yml failed on {size} hosts: {res.to_dict()}")
        return times
    finally:
        for f in fleet:
            f.stop()


def measure_ping(sshd: servers.SSHD, base, size: int, repeat: int) -> list[float]:
    inv = servers.write_inventory(
        base / f"ping{size}.yml",
        {"fail2ban_servers": {f"h{i:02d}": {} for i in range(size)}},
        {**sshd.ansible_vars(), "ansible_python_interpreter": servers.target_python()},
    )
    times = []
    for _ in range(repeat):
        started = time.monotonic()
        res = run_playbook("ping.yml", inventory=inv, extravars={"athome_targets": "fail2ban_servers"})
        times.append(time.monotonic() - started)
        if not res.succeeded:
            raise SystemExit(f"ping.yml failed on {size} hosts: {res.to_dict()}")
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per fleet size (median kept)")
    args = parser.parse_args(argv)
    base = servers.short_tmpdir("bck-")
    keys = servers.SSHKeys(base / "ssh")
    sshd = servers.SSHD(keys).start()
    try:
        medians = {}
        firsts = {}
        print("unban.yml wall time: the first run (writes the whitelist file, validates it with")
        print(f"fail2ban-client -t on every host) and the median of {args.repeat} runs")
        for size in SIZES:
            times = measure(sshd, base, size, args.repeat)
            firsts[size], medians[size] = times[0], statistics.median(times)
            runs = ", ".join(f"{t:.2f}" for t in times)
            first, median = firsts[size], medians[size]
            print(f"  {size:2d} host(s): first {first:6.2f} s, median {median:6.2f} s   (runs: {runs})")
        for label, figures in (("first run", firsts), ("median", medians)):
            ratio = figures[SIZES[-1]] / figures[1]
            verdict = "meets" if ratio <= GOAL_RATIO else "MISSES"
            print(f"  ratio 16/1 ({label}): {ratio:.2f}x  -> {verdict} the goal (<= {GOAL_RATIO:.0f}x)")
        print(f"baseline: ping.yml, the same fan-out doing nothing, median of {args.repeat} runs")
        floor = {}
        for size in SIZES:
            floor[size] = statistics.median(measure_ping(sshd, base, size, args.repeat))
            print(f"  {size:2d} host(s): {floor[size]:6.2f} s")
        floor_ratio = floor[SIZES[-1]] / floor[1]
        print(f"  ratio 16/1: {floor_ratio:.2f}x  (the floor on this machine: every target shares its cores)")
        return 0
    finally:
        sshd.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
