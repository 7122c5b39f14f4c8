"""Wall time of playbooks/unban.yml on 16 loopback hosts beside the no-op ping.yml floor.

    python -m bench.checkip [--hosts 16] [--repeat 5] [--routes socket,client]

Each host is an inventory alias of ONE real sshd on loopback with its own real
fail2ban-server (tests.servers); the address is banned in one jail of the first host
before every run. For each route the fleet starts fresh, then rounds alternate
ping.yml and unban.yml on the same hosts, so both see the same load (the machine is
shared): round 0 is the first run (it writes the whitelist file and tests the config
with fail2ban-client -t on every host), the later rounds are repeated runs (nothing
left to change). Printed: each run, and unban/ping per round and for the medians.
Goal (issue 9): unban <= 1.3x the ping floor, first run and repeated runs.

Routes: socket (fail2ban_whitelist_transport=auto: one connection per host through the
helper under fail2ban's interpreter) and client (transport=client: fail2ban-client per
command, the route before the socket helper).
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
GOAL_RATIO = 1.3
TRANSPORT = {"socket": "auto", "client": "client"}


def timed(playbook: str, inv, extravars: dict) -> float:
    started = time.monotonic()
    res = run_playbook(playbook, inventory=inv, extravars=extravars)
    elapsed = time.monotonic() - started
    if not res.succeeded:
        raise SystemExit(f"{playbook} failed: {res.to_dict()}")
    return elapsed


def measure(sshd: servers.SSHD, base, route: str, hosts: int, repeat: int) -> list[tuple[float, float]]:
    """[(ping seconds, unban seconds)] per round; round 0 is the first unban run."""
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
        rounds = []
        for _ in range(repeat + 1):
            ping = timed("ping.yml", inv, {"athome_targets": "fail2ban_servers"})
            fleet[0].ban("asterisk", IP)
            unban = timed("unban.yml", inv, {"ip": IP})
            if fleet[0].banned_jails(IP):
                raise SystemExit(f"unban.yml left {IP} banned on h00")
            rounds.append((ping, unban))
        return rounds
    finally:
        for f in fleet:
            f.stop()


def verdict(ratio: float) -> str:
    return "meets" if ratio <= GOAL_RATIO else "MISSES"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5, help="repeated runs after the first (median kept)")
    parser.add_argument("--routes", default="socket,client", help="comma-separated: socket, client")
    args = parser.parse_args(argv)
    base = servers.short_tmpdir("bck-")
    keys = servers.SSHKeys(base / "ssh")
    sshd = servers.SSHD(keys).start()
    try:
        print(f"unban.yml vs ping.yml on {args.hosts} loopback hosts, alternating in each round")
        for route in args.routes.split(","):
            rounds = measure(sshd, base, route, args.hosts, args.repeat)
            print(f"route {route} (fail2ban_whitelist_transport={TRANSPORT[route]}):")
            for i, (ping, unban) in enumerate(rounds):
                label = "first run" if i == 0 else f"run {i}"
                print(f"  {label:9s}: ping {ping:6.2f} s, unban {unban:6.2f} s  -> {unban / ping:4.2f}x")
            ping0, unban0 = rounds[0]
            pings = statistics.median(p for p, _ in rounds[1:])
            unbans = statistics.median(u for _, u in rounds[1:])
            print(
                f"  first run      : {unban0 / ping0:4.2f}x the ping floor  -> {verdict(unban0 / ping0)} "
                f"the goal (<= {GOAL_RATIO}x)"
            )
            print(
                f"  repeated median: ping {pings:6.2f} s, unban {unbans:6.2f} s -> {unbans / pings:4.2f}x  "
                f"-> {verdict(unbans / pings)} the goal (<= {GOAL_RATIO}x)"
            )
        return 0
    finally:
        sshd.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
