"""Dispatcher figures: token check, queue durability cost, parse rate, intake latency.

`python -m bench.dispatch`. Each figure is printed beside a baseline measured
in the same run (the legacy way of doing the same step), never asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

from dispatcher import commands, config, grammar
from dispatcher.auth import TokenStore
from dispatcher.jobqueue import DirQueue
from dispatcher.service import Dispatcher


def timed(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def bench_tokens(tmp: Path) -> None:
    store = TokenStore(tmp / "tokens.json")
    clear = [store.add(f"t{i}")[1] for i in range(10)]
    legacy = [{"token": t, "enabled": True} for t in clear]
    ours = timed(lambda: store.match(clear[-1]), 20)
    base = timed(lambda: any(e["token"] == clear[-1] and e["enabled"] for e in legacy), 20000)
    print(f"token check, 10 tokens:   {ours * 1000:8.1f} ms/message (scrypt, salted, all entries)")
    print(
        f"  baseline legacy clear:  {base * 1e6:8.2f} µs/message (plain JSON list; tokens readable on disk)"
    )


def bench_queue(tmp: Path, n: int) -> None:
    q = DirQueue(tmp / "q")
    start = time.perf_counter()
    for i in range(n):
        q.put({"command": "CHECKIP", "params": {"ip": f"10.0.{i // 250}.{i % 250}"}})
    put = (time.perf_counter() - start) / n
    start = time.perf_counter()
    while (job := q.claim()) is not None:
        job.result = {"outcome": "success"}
        q.checkpoint(job)
        q.finish(job)
    cycle = (time.perf_counter() - start) / n
    legacy_dir = tmp / "legacy"
    legacy_dir.mkdir()
    start = time.perf_counter()
    for i in range(n):
        (legacy_dir / f"20251111_171215_req{i:03d}.json").write_text(json.dumps({"i": i}))
    base = (time.perf_counter() - start) / n
    print(f"queue put (fsync'd):      {put * 1000:8.2f} ms/job   ({1 / put:,.0f} jobs/s)")
    print(f"queue claim+checkpoint+finish: {cycle * 1000:5.2f} ms/job")
    print(
        f"  baseline legacy write:  {base * 1000:8.2f} ms/job   (no fsync, no atomic rename: lost on a crash)"
    )


def bench_parse(n: int) -> None:
    hosts = {
        "voip1": grammar.HostFacts("voip1", frozenset({"sip_servers"})),
        "gv2p": grammar.HostFacts("gv2p", frozenset({"sip_servers", "mac_servers"})),
    }
    ctx = grammar.ParseContext(hosts=hosts)
    subjects = [
        "Re: [A1B2C3D4] RAMAIS=1121,1122 SERVER=voip1 INICIO=01/11/2025 00:00 FIM=05/11/2025 23:59",
        "[A1B2C3D4] MACCHANGE=3010 MACATUAL=010203040506 MACFUTURO=010203040599 SERVER=gv2p",
        "[A1B2C3D4] CHECKIP=3.3.3.3",
    ]

    def one():
        for s in subjects:
            _t, text = grammar.split_token(s)
            commands.parse(text, ctx)

    per = timed(one, n) / len(subjects)
    print(f"parse a subject:          {per * 1e6:8.1f} µs          ({1 / per:,.0f} subjects/s)")


def bench_intake(tmp: Path, n: int) -> None:
    store = TokenStore(tmp / "it-tokens.json")
    _, token = store.add("bench")
    cfg = config.from_dict(
        {
            "state_dir": str(tmp / "state"),
            "inventory": str(Path(__file__).resolve().parent.parent / "inventory" / "demo"),
            "mail": {
                "transport": "maildir",
                "from_address": "ops@example.test",
                "admin_addresses": ["admin@example.test"],
                "maildir": {"inbox": str(tmp / "in"), "outbox": str(tmp / "out")},
            },
            "auth": {"senders": ["ana@example.test"], "tokens_file": str(store.path)},
        },
        base=tmp,
    )
    d = Dispatcher(cfg)
    box = d._inbox_factory().box
    for i in range(n):
        m = EmailMessage()
        m["From"] = "ana@example.test"
        m["Subject"] = f"[{token}] CHECKIP=3.3.{i // 250}.{i % 250 + 1}"
        m["Message-ID"] = f"<b{i}@example.test>"
        m.set_content("x")
        box.add(m)
    start = time.perf_counter()
    counts = d.poll_once()
    total = time.perf_counter() - start
    print(
        f"intake of {n} emails:       {total:8.2f} s  -> {total / n * 1000:.1f} ms/email from inbox to "
        f"confirmation sent ({counts['queued']} queued)"
    )
    print("  baseline legacy:        up to 360 s before anything happens (two 3-minute timers)")


def bench_idle(tmp: Path, n: int) -> None:
    """`athome run` against a real Dovecot and SMTP server: delivery -> confirmation received."""
    import os
    import signal
    import subprocess
    import sys

    import yaml

    from tests import servers

    base = servers.short_tmpdir("bdi-")
    dovecot = servers.Dovecot(base / "dovecot", users={"svc@example.test": "bench-imap-pw"}).start()
    sink = servers.SMTPSink().start()
    store = TokenStore(tmp / "idle-tokens.json")
    _, token = store.add("bench")
    cfg = tmp / "idle.yml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(tmp / "idle-state"),
                "inventory": str(Path(__file__).resolve().parent.parent / "inventory" / "demo"),
                "mail": {
                    "transport": "imap",
                    "from_address": "svc@example.test",
                    "admin_addresses": ["a@example.test"],
                    "imap": {
                        "host": "127.0.0.1",
                        "port": dovecot.imap_port,
                        "security": "plain",
                        "user": "svc@example.test",
                        "password_env": "BENCH_IMAP_PW",
                    },
                    "smtp": {"host": "127.0.0.1", "port": sink.port, "security": "plain"},
                },
                "auth": {"senders": ["ana@example.test"], "tokens_file": str(store.path)},
                "worker": {"poll_interval": 300},
            }
        )
    )
    env = dict(os.environ, BENCH_IMAP_PW="bench-imap-pw")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dispatcher.cli", "--config", str(cfg), "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(4)  # started, first pass done, in IDLE
        latencies = []
        for i in range(n):
            m = EmailMessage()
            m["From"], m["Subject"], m["Message-ID"] = "ana@example.test", f"[{token}] HELP", f"<idle{i}@x>"
            m.set_content("x")
            started = time.perf_counter()
            dovecot.deliver("svc@example.test", m.as_bytes())
            sink.wait_for(i + 1, timeout=120)
            latencies.append(time.perf_counter() - started)
            time.sleep(0.5)
        med = statistics.median(latencies)
        print(
            f"service, IMAP IDLE, {n} emails: {med * 1000:8.0f} ms median from delivery to the reply "
            f"received by SMTP (max {max(latencies) * 1000:.0f} ms; Dovecot batches by 500 ms)"
        )
        print("  baseline legacy:        up to 360 s (two 3-minute timers)")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        sink.stop()
        dovecot.stop()
        import shutil

        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dispatch")
    p.add_argument("--jobs", type=int, default=500)
    p.add_argument("--emails", type=int, default=100)
    args = p.parse_args(argv)
    logging.disable(logging.INFO)  # figures only
    with tempfile.TemporaryDirectory(prefix="athome-bench-") as d:
        tmp = Path(d)
        bench_tokens(tmp)
        bench_queue(tmp, args.jobs)
        bench_parse(2000)
        bench_intake(tmp, args.emails)
        bench_idle(tmp, 5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
