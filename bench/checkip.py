"""Wall time of playbooks/unban.yml on 16 loopback hosts beside the no-op ping.yml floor.

    python -m bench.checkip [--hosts 16] [--repeat 5] [--routes socket,client]

Each host is an inventory alias of ONE real sshd on loopback with its own real
fail2ban-server (tests.servers); the address is banned in one jail of the first host
before every unban run. For each route the fleet starts fresh, then every unban run
follows a ping.yml run on the same hosts, so both see the same load (the machine is
shared). Three kinds of unban run:

- very first: no managed whitelist file yet (it is created, and the config tested);
- first run: a NEW address on every host (the managed file grows by one address, is
  backed up, written and tested): what most CHECKIP requests are, measured `repeat`
  times, each with its own address;
- repeated: the same address again right after (nothing left to change).

Printed: each run with its ping, the unban/ping ratio per run and for the medians of
each kind. Goal (issue 9): unban <= 1.3x the ping floor, first runs and repeated runs.
The load average (uptime) is printed beside the figures: the machine is shared.

Routes: socket (fail2ban_whitelist_transport=auto: one connection per host through the
helper under fail2ban's interpreter, which also tests the config) and client
(transport=client: fail2ban-client per command and `fail2ban-client -t`, the route
before the socket helper).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

from dispatcher.runner import run_playbook
from tests import servers

GOAL_RATIO = 1.3
TRANSPORT = {"socket": "auto", "client": "client"}


def address(n: int) -> str:
    return f"3.3.{n // 250}.{n % 250 + 1}"


def timed(playbook: str, inv, extravars: dict) -> float:
    started = time.monotonic()
    res = run_playbook(playbook, inventory=inv, extravars=extravars)
    elapsed = time.monotonic() - started
    if not res.succeeded:
        raise SystemExit(f"{playbook} failed: {res.to_dict()}")
    return elapsed


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def measure(sshd: servers.SSHD, base, route: str, hosts: int, repeat: int) -> list[tuple[str, float, float]]:
    """[(kind, ping seconds, unban seconds)]: the very first run, then pairs of a first run
    for a new address and a repeated run of the same address."""
    fleet = [servers.Fail2ban(base / route / f"h{i:02d}").start() for i in range(hosts)]
    try:
        conn = {**sshd.ansible_vars(), "ansible_python_interpreter": servers.target_python()}
        inv = servers.write_inventory(
            base / f"inv-{route}.yml",
            {
                "fail2ban_servers": {
                    f"h{i:02d}": {
                        "fail2ban_whitelist_conf_dir": str(f.dir),
                        "fail2ban_whitelist_transport": TRANSPORT[route],
                    }
                    for i, f in enumerate(fleet)
                }
            },
            conn,
        )
        managed = fleet[0].dir / "jail.d" / "zz-athome-whitelist.local"
        plan = [("very first", 0)]
        for n in range(1, repeat + 1):
            plan += [("first run", n), ("repeated", n)]
        runs = []
        for kind, n in plan:
            ip = address(n)
            ping = timed("ping.yml", inv, {"athome_targets": "fail2ban_servers"})
            fleet[0].ban("asterisk", ip)
            before = managed.read_text() if managed.exists() else ""
            unban = timed("unban.yml", inv, {"ip": ip})
            if fleet[0].banned_jails(ip):
                raise SystemExit(f"unban.yml left {ip} banned on h00")
            after = managed.read_text()
            if (before != after) != (kind != "repeated") or ip not in after:
                raise SystemExit(f"{kind} run of {ip}: the managed file did not change as expected")
            runs.append((kind, ping, unban))
        return runs
    finally:
        for f in fleet:
            f.stop()


def verdict(ratio: float) -> str:
    return "meets" if ratio <= GOAL_RATIO else "MISSES"


def summary(label: str, runs: list[tuple[str, float, float]]) -> str:
    pings = statistics.median(p for _, p, _ in runs)
    unbans = statistics.median(u for _, _, u in runs)
    ratios = statistics.median(u / p for _, p, u in runs)
    return (
        f"  {label:16s}: ping {pings:6.2f} s, unban {unbans:6.2f} s (medians of {len(runs)}) "
        f"-> median ratio {ratios:4.2f}x -> {verdict(ratios)} the goal (<= {GOAL_RATIO}x)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=16)
    parser.add_argument(
        "--repeat", type=int, default=5, help="first runs (new address) and repeated runs (median kept)"
    )
    parser.add_argument("--routes", default="socket,client", help="comma-separated: socket, client")
    args = parser.parse_args(argv)
    base = servers.short_tmpdir("bck-")
    keys = servers.SSHKeys(base / "ssh")
    sshd = servers.SSHD(keys).start()
    try:
        print(f"unban.yml vs ping.yml on {args.hosts} loopback hosts, each unban run right after a ping run")
        for route in args.routes.split(","):
            print(f"route {route} (fail2ban_whitelist_transport={TRANSPORT[route]}), {load()}:", flush=True)
            runs = measure(sshd, base, route, args.hosts, args.repeat)
            for kind, ping, unban in runs:
                print(f"  {kind:10s}: ping {ping:6.2f} s, unban {unban:6.2f} s  -> {unban / ping:4.2f}x")
            _, ping0, unban0 = runs[0]
            ratio0 = unban0 / ping0
            print(
                f"  {'very first run':16s}: {ratio0:4.2f}x the ping floor -> {verdict(ratio0)} "
                f"the goal (<= {GOAL_RATIO}x; one run, no managed file yet)"
            )
            print(summary("first runs", [r for r in runs if r[0] == "first run"]))
            print(summary("repeated runs", [r for r in runs if r[0] == "repeated"]))
            print(f"  ({load()})", flush=True)
        return 0
    finally:
        sshd.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
