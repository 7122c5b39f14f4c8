"""`athome`: the command line. Builds a Config, sets up logging, calls one thing."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from dispatcher import __version__, commands, config, inventory, logs, runner, sdnotify
from dispatcher.audit import AuditLog, parse_day
from dispatcher.auth import SenderWhitelist, TokenStore
from dispatcher.errors import AthomeError, ConfigError

log = logging.getLogger("dispatcher")


def _dispatcher(args, *roles: str):
    """A Dispatcher holding the locks of its roles; the worker recovers the queue first."""
    from dispatcher.service import Dispatcher

    cfg = config.load(args.config)
    if cfg.secret_problems:
        raise ConfigError(cfg.secret_problems)
    d = Dispatcher(cfg)
    for role in roles:
        d.lock(role)
    if "work" in roles:
        for action in d.recover():
            log.warning("recovered: %s", action)
    return d


# ----------------------------------------------------------------- commands


def cmd_check(args) -> int:
    """Validate config and inventory; print every problem; exit 1 if any."""
    problems: list[str] = []
    cfg = None
    if args.config or not args.inventory:
        try:
            cfg = config.load(args.config)
            problems += cfg.secret_problems
        except ConfigError as exc:
            problems += exc.problems
    inv_path = Path(args.inventory) if args.inventory else (cfg.inventory if cfg else None)
    if cfg is not None and cfg.inventory_git is not None and not args.inventory and not inv_path.exists():
        inv_path = None  # from git: nothing fetched yet (the service fetches it at start)
        print(f"inventory: from git ({cfg.inventory_git.branch}); not fetched yet: athome inventory sync")
    if inv_path is not None:
        problems += [f"inventory: {p}" for p in inventory.check(inv_path, deployment=cfg is not None)]
    for spec in commands.COMMANDS.values():
        if spec.playbook and not (runner.PLAYBOOK_DIR / spec.playbook).is_file():
            problems.append(f"command {spec.name}: playbook playbooks/{spec.playbook} is missing")
    warnings: list[str] = []
    if cfg is not None:
        store = TokenStore(cfg.tokens_file, cfg.server_key())
        try:
            store.key.get()
            found, warned = store.problems()
            problems += [f"auth: {p}" for p in found]
            warnings += [f"auth: {w}" for w in warned]
        except AthomeError as exc:
            problems.append(f"auth: {exc}")
        if cfg.senders_file and not cfg.senders_file.is_file():
            problems.append(f"auth.senders_file {cfg.senders_file}: does not exist")
        elif cfg.senders_file:
            wl = SenderWhitelist(cfg.senders, cfg.senders_file)
            wl.addresses()
            warnings += [f"auth.senders_file: {r}" for r in wl.rejected]
        if not cfg.ar_required:
            warnings.append(
                "auth.authentication_results.required is off: a forged From with a known token runs commands"
            )
        # A deployment: two readers of one mailbox take each other's messages.
        from dispatcher.legacy import legacy_timers

        warned, notes = legacy_timers()
        warnings += warned
        for note in notes:
            print(f"NOTE: {note}")
    for w in warnings:
        print(f"WARNING: {w}")
    for p in problems:
        print(f"PROBLEM: {p}")
    if problems:
        print(f"{len(problems)} problem(s) found")
        return 1
    print("OK: configuration and inventory are valid")
    return 0


def _until_signalled() -> threading.Event:
    """An event set by SIGTERM or SIGINT: loops finish their current step and stop."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def cmd_poll(args) -> int:
    d = _dispatcher(args, "intake")
    if args.once:
        log.info("intake pass: %s", d.poll_once())
        return 0
    d.intake_forever(_until_signalled())
    return 0


def cmd_work(args) -> int:
    d = _dispatcher(args, "work")
    if args.once:
        log.info("work pass: %d job(s)", d.work_once())
        return 0
    d.work_forever(_until_signalled())
    return 0


def cmd_run(args) -> int:
    # Before anything can start a child process: the playbooks must not inherit them.
    notifier = sdnotify.Notifier.from_environ()
    notifier.status("starting: settling what the last run left in the queue")
    d = _dispatcher(args, "intake", "work")
    stop = _until_signalled()
    log.info(
        "athome %s running: IMAP IDLE intake, %d worker(s), poll every %ss%s",
        __version__,
        d.cfg.concurrency,
        d.cfg.poll_interval,
        f", systemd watchdog {notifier.watchdog_interval:g} s" if notifier.watchdog_interval else "",
    )
    d.run_forever(stop, notifier)
    log.info("stopped")
    return 0


def cmd_demo(args) -> int:
    from dispatcher import demo

    if not args.verbose:  # the demo prints what matters; the log would drown it
        logging.getLogger().setLevel(logging.WARNING)
    return demo.main(Path(args.dir))


def _tokens(args) -> tuple[TokenStore, AuditLog | None]:
    """The tokens file, and the audit trail when a config names the state directory."""
    if args.tokens_file:
        return TokenStore(args.tokens_file), None
    cfg = config.load(args.config)
    return TokenStore(cfg.tokens_file, cfg.server_key()), AuditLog(cfg.audit_dir)


def _operator() -> str:
    """Who ran a CLI change, for the audit trail (sudo keeps the real user)."""
    import getpass

    return os.environ.get("SUDO_USER") or getpass.getuser()


def _print_new_token(entry, token: str, verb: str) -> None:
    print(f"Token {entry.id} {verb} for {entry.description!r} ({', '.join(entry.senders)}): {token}")
    print(f"Subject form: [{token}] HELP. It is shown only now; only its digests are stored.")


def cmd_token(args) -> int:
    if args.action == "unlock":
        from dispatcher.throttle import Throttle

        cfg = config.load(args.config)
        key = cfg.server_key()
        Throttle(cfg.throttle_dir, name=lambda who: key.digest("throttle", who)[:40]).clear(
            args.sender.lower()
        )
        AuditLog(cfg.audit_dir).record("lockout-cleared", sender=args.sender.lower(), by=_operator())
        print(f"{args.sender.lower()}: failure count and lock-out cleared")
        return 0
    store, audit = _tokens(args)

    def note(action: str, entry, **fields) -> None:
        if audit is not None:
            audit.record(
                "token", action=action, token_id=entry.id, senders=entry.senders, by=_operator(), **fields
            )

    if args.action == "add":
        cmds = [c.strip().upper() for c in args.commands.split(",")] if args.commands else None
        unknown = [c for c in cmds or [] if c not in commands.COMMANDS]
        if unknown:
            raise AthomeError(f"unknown command(s): {', '.join(unknown)}")
        expires = time.time() + args.expires_days * 86400 if args.expires_days else None
        entry, token = store.add(
            args.description,
            args.sender,
            commands=cmds,
            admin=args.admin,
            length=args.length,
            expires=expires,
        )
        note("add", entry, commands=entry.commands, admin=entry.admin, expires=entry.expires)
        _print_new_token(entry, token, "created")
    elif args.action == "rotate":
        entry, token = store.rotate(args.id, length=args.length)
        note("rotate", entry)
        _print_new_token(entry, token, "rotated")
        print("The old token stopped working now.")
    elif args.action == "list":
        now = time.time()
        for e in store.entries():
            scope = ",".join(e.commands) if e.commands else "all"
            state = "enabled" if e.enabled else "disabled"
            if e.enabled and e.expired(now):
                state = "expired"
            expires = time.strftime("%Y-%m-%d", time.gmtime(e.expires)) if e.expires else "-"
            who = ",".join(e.senders) or "(nobody)"
            legacy = ["LEGACY"] if e.legacy else []
            admin = "admin" if e.admin else "-"
            print("\t".join([e.id, state, admin, scope, who, f"expires {expires}", *legacy, e.description]))
    elif args.action in ("disable", "enable"):
        e = store.set_enabled(args.id, args.action == "enable")
        note(args.action, e)
        print(f"{e.id} {args.action}d")
    elif args.action == "import":
        before = {e.id for e in store.entries()}
        for line in store.import_legacy(
            args.file, args.sender, expires_days=args.expires_days, allow_weak=args.allow_weak
        ):
            print(line)
        for e in store.entries():
            if e.id not in before:
                note("import", e, legacy=True, enabled=e.enabled, expires=e.expires)
        print(
            "These tokens were stored and committed in clear by the legacy system: give each person "
            "a new one (athome token add / rotate) before they expire."
        )
    return 0


def cmd_legacy(args) -> int:
    """Carry the legacy system's configuration across (dispatcher/legacy.py)."""
    from dispatcher import legacy

    return legacy.run_import(
        [Path(p) for p in args.path],
        Path(args.out),
        args.sender,
        dry_run=args.dry_run,
        force=args.force,
        expires_days=args.expires_days,
    )


def cmd_status(args) -> int:
    """Health for people and monitoring: exit 0 healthy, 1 degraded, 2 down."""
    from dispatcher import health

    cfg = config.load(args.config)
    report = health.status(cfg)
    code, reasons = health.verdict(report, cfg)
    if args.json:
        print(json.dumps({"status": health.VERDICTS[code], "reasons": reasons, **report}, indent=2))
        return code
    svc = report["service"]
    print(f"athome: {health.VERDICTS[code].upper()}")
    for reason in reasons:
        print(f"  - {reason}")
    running = "running" if svc["intake_running"] and svc["work_running"] else "NOT running"
    print(
        f"service: {running}; mailbox read {_ago_text(svc['mailbox_read_ago'])}, "
        f"queue worked {_ago_text(svc['queue_worked_ago'])}"
    )
    print("jobs: " + ", ".join(f"{state} {n}" for state, n in report["jobs"].items()))
    if report["oldest_pending_age"] is not None:
        print(f"oldest pending job: {_ago_text(report['oldest_pending_age'])}")
    print(
        f"replies unsent: {report['replies_unsent']}; quarantined: {report['quarantined']}; "
        f"senders locked out: {report['lockouts']}"
    )
    inv = report["inventory"]
    line = f"inventory: {inv['source']} at {inv['revision'][:12] or 'no revision'}"
    if "last_fetch_ago" in inv:
        line += f", fetched {_ago_text(inv['last_fetch_ago'])}"
        if inv["last_fetch_error"]:
            line += f" (last fetch failed: {inv['last_fetch_error']})"
    print(line)
    mail = report["outgoing_mail"]
    line = f"outgoing mail: {health.limit_text(mail)}"
    if mail["held_replies"]:
        line += (
            f"; {mail['held_replies']} repl(ies) HELD by the limit for {mail['held_since_ago']} s, "
            f"the next can go in {mail['next_send_in']} s"
        )
    print(line)
    if mail["smtp_failures"]:
        print(
            f"smtp: {mail['smtp_failures']} failure(s) in a row for {mail['smtp_failing_since_ago']} s, "
            f"next try in {mail['smtp_retry_in']} s: {mail['smtp_error']}"
        )
    locks = report["locked_hosts"]
    if locks:
        print("locked hosts: " + ", ".join(f"{k['host']} by {k['job']} for {k['held_for']} s" for k in locks))
    else:
        print("locked hosts: none")
    if svc["last_error"]:
        print(f"last error ({_ago_text(svc['last_error_ago'])}): {svc['last_error']}")
    return code


def cmd_inventory_sync(args) -> int:
    """inventory.git: fetch, check and switch once (the service does it every interval).
    Exit 0 when the branch's newest commit is in force, 1 when it was refused, 2 when the
    repository could not be read."""
    from dispatcher.service import Dispatcher

    cfg = config.load(args.config)
    if cfg.inventory_git is None:
        print(f"the inventory is a directory ({cfg.inventory}), not inventory.git: nothing to fetch")
        return 0
    d = Dispatcher(cfg)
    try:
        in_force = d.git_inventory.sync()
    except AthomeError as exc:
        print(f"inventory: {exc}", file=sys.stderr)
        return 2
    state = d.git_inventory.state()
    newest = state.get("remote_revision", "")
    if newest and newest != in_force:
        refused = state.get("rejected", {}).get(newest, {})
        kept = in_force[:12] or "nothing"
        print(f"inventory: {d.git_inventory.describe(newest)} REFUSED; {kept} stays in force")
        for problem in refused.get("problems", []):
            print(f"  - {problem}")
        return 1
    print(f"inventory: {state.get('revision_described') or in_force[:12]} in force")
    return 0


def _ago_text(seconds) -> str:
    return "never" if seconds is None else f"{seconds} s ago"


def cmd_whitelist(args) -> int:
    """The same operations as WHITELIST by email, for an operator on the controller."""
    from dispatcher.commands.whitelist import change, listing

    cfg = config.load(args.config)
    whitelist = SenderWhitelist(cfg.senders, cfg.senders_file)
    if args.action != "list":
        from dispatcher.auth import valid_address

        address = args.address.strip().lower()
        if not valid_address(address):
            raise AthomeError(
                f"{args.address!r} is not an accepted address (letters, digits, . - _ + and one @)"
            )
        outcome, why = change(
            whitelist, TokenStore(cfg.tokens_file, cfg.server_key()), args.action.upper(), address
        )
        AuditLog(cfg.audit_dir).record(
            "whitelist", action=args.action, address=address, outcome=outcome, reason=why, by=_operator()
        )
        print(f"{outcome}: {why}")
        if outcome == "refused":
            return 1
    for entry in listing(whitelist):
        print(entry["address"] + ("\t(config file: auth.senders)" if entry["inline"] else ""))
    return 0


def cmd_audit(args) -> int:
    cfg = config.load(args.config)
    trail = AuditLog(cfg.audit_dir)
    if args.action == "verify":
        count, problems = trail.verify()
        for p in problems:
            print(f"PROBLEM: {p}")
        print(
            f"{count} record(s) checked in {cfg.audit_dir}: "
            + ("chain broken" if problems else "chain intact")
        )
        return 1 if problems else 0
    try:
        since = parse_day(args.since) if args.since else None
        until = parse_day(args.until, end=True) if args.until else None
    except ValueError as exc:
        raise AthomeError(str(exc)) from None
    for rec in trail.search(args.sender, args.command, since, until):
        if args.json:
            print(json.dumps(rec, ensure_ascii=False))
            continue
        what = rec.get("command") or rec.get("subject") or rec.get("action") or ""
        who = rec.get("sender") or rec.get("by") or ""
        row = (rec["at"][:19], rec["event"], rec.get("request_id", "-"), who, rec.get("outcome", "-"), what)
        print("\t".join(str(x) for x in (*row, rec.get("reason", ""))))
    return 0


def cmd_queue(args) -> int:
    from dispatcher.jobqueue import STATES, DirQueue

    cfg = config.load(args.config)
    q = DirQueue(cfg.queue_dir, cfg.max_attempts)
    if args.queue_cmd == "list":
        for state in [args.state] if args.state else STATES:
            for job in q.list(state):
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.created))
                print(
                    f"{job.id}\t{state}\t{when}\t{job.attempts}/{job.max_attempts}\t"
                    f"{job.payload.get('requester', '')}\t{job.payload.get('command_text', '')}"
                )
        bad = q.quarantined()
        if bad:
            print(f"{len(bad)} quarantined record(s) in {q.root / 'quarantine'}: {', '.join(bad)}")
    elif args.queue_cmd == "show":
        job = q.get(args.id)
        print(
            json.dumps(
                {"id": job.id, "state": job.state, **json.loads(job.to_json())}, indent=2, ensure_ascii=False
            )
        )
    elif args.queue_cmd == "retry":
        job = q.retry_failed(args.id)
        print(f"{job.id} is pending again")
    return 0


# ------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="athome", description="athome-ops dispatcher")
    p.add_argument("--config", help="config file (default: $ATHOME_CONFIG)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--version", action="version", version=f"athome {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("check", help="validate config and inventory, report every problem")
    c.add_argument("--inventory", help="check this inventory (alone, when no --config is given)")
    c.set_defaults(func=cmd_check)

    c = sub.add_parser("poll", help="read the mailbox: queue commands, answer at once")
    c.add_argument("--once", action="store_true", help="one pass, then exit")
    c.set_defaults(func=cmd_poll)

    c = sub.add_parser("work", help="run queued jobs and send the results")
    c.add_argument("--once", action="store_true", help="drain the queue once, then exit")
    c.set_defaults(func=cmd_work)

    c = sub.add_parser("run", help="poll and work continuously (the service)")
    c.set_defaults(func=cmd_run)

    c = sub.add_parser("demo", help="run the whole product end to end on local sandbox hosts")
    c.add_argument("--dir", default=".demo", help="where the demo keeps its files (default .demo)")
    c.set_defaults(func=cmd_demo)

    c = sub.add_parser("token", help="manage command tokens (stored hashed)")
    c.add_argument(
        "--tokens-file",
        help="tokens file (default: auth.tokens_file of the config); its server key is athome.key beside it",
    )
    ts = c.add_subparsers(dest="action", required=True)
    a = ts.add_parser("add", help="create a random token bound to senders; printed once")
    a.add_argument("--description", required=True)
    a.add_argument(
        "--sender", action="append", required=True, help="address (or @domain) that may use it; repeat"
    )
    a.add_argument("--commands", help="comma-separated commands it may run (default: all)")
    a.add_argument("--admin", action="store_true", help="may run admin-only commands")
    a.add_argument("--length", type=int, default=16, help="hex digits, 8 to 32 (default 16)")
    a.add_argument("--expires-days", type=float, help="expires after this many days (default: never)")
    x = ts.add_parser("rotate", help="replace a token by a new random one; printed once")
    x.add_argument("id")
    x.add_argument("--length", type=int, default=16, help="hex digits, 8 to 32 (default 16)")
    ts.add_parser("list")
    for name in ("disable", "enable"):
        x = ts.add_parser(name)
        x.add_argument("id")
    x = ts.add_parser("import", help="import the legacy tokens.json (bound, expiring, marked legacy)")
    x.add_argument("file")
    x.add_argument("--sender", action="append", required=True, help="who may use them (address or @domain)")
    x.add_argument("--expires-days", type=float, default=30, help="they expire after (default 30 days)")
    x.add_argument("--allow-weak", action="store_true", help="keep guessable tokens enabled")
    x = ts.add_parser("unlock", help="end a sender's lock-out after bad tokens")
    x.add_argument("sender")
    c.set_defaults(func=cmd_token)

    c = sub.add_parser("legacy", help="carry the legacy system's configuration across")
    ls = c.add_subparsers(dest="action", required=True)
    x = ls.add_parser(
        "import",
        help="legacy trees -> inventory, athome.yml, senders.txt, tokens.json, athome.env.example",
    )
    x.add_argument(
        "path", nargs="+", help="a legacy tree (master or MODE=slave), or a directory holding them"
    )
    x.add_argument("--out", required=True, help="where to write the result, to review and move into place")
    x.add_argument(
        "--sender",
        action="append",
        default=[],
        help="who may use the legacy tokens (address or @domain; repeat; default: the whitelist)",
    )
    x.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    x.add_argument(
        "--force",
        action="store_true",
        help="replace files that exist and differ (old ones kept in DIR/.backups/)",
    )
    x.add_argument("--expires-days", type=float, default=30, help="the legacy tokens expire after (30)")
    c.set_defaults(func=cmd_legacy)

    c = sub.add_parser("status", help="health: exit 0 healthy, 1 degraded, 2 down (for monitoring)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_status)

    c = sub.add_parser("inventory", help="the inventory from git (inventory.git)")
    isub = c.add_subparsers(dest="action", required=True)
    x = isub.add_parser("sync", help="fetch, check and put in force the branch's newest commit, once")
    x.set_defaults(func=cmd_inventory_sync)

    c = sub.add_parser("whitelist", help="the senders allowed to send commands (as WHITELIST by email)")
    ws = c.add_subparsers(dest="action", required=True)
    for name in ("add", "remove"):
        x = ws.add_parser(name)
        x.add_argument("address")
    ws.add_parser("list")
    c.set_defaults(func=cmd_whitelist)

    c = sub.add_parser("audit", help="the audit trail: search it, or verify its hash chain")
    c.add_argument("action", nargs="?", choices=["show", "verify"], default="show")
    c.add_argument("--sender", help="only this sender's records")
    c.add_argument("--command", help="only this command (CHECKIP, MACCHANGE, ...)")
    c.add_argument("--since", help="from this UTC day or time (YYYY-MM-DD[THH:MM])")
    c.add_argument("--until", help="up to this UTC day or time (YYYY-MM-DD[THH:MM])")
    c.add_argument("--json", action="store_true", help="JSON Lines, for tools")
    c.set_defaults(func=cmd_audit)

    c = sub.add_parser("queue", help="inspect and repair the job queue")
    qs = c.add_subparsers(dest="queue_cmd", required=True)
    x = qs.add_parser("list")
    x.add_argument("--state", choices=["pending", "processing", "waiting", "done", "failed"])
    x = qs.add_parser("show")
    x.add_argument("id")
    x = qs.add_parser("retry", help="put a failed job back in the queue")
    x.add_argument("id")
    c.set_defaults(func=cmd_queue)
    return p


def main(argv: list[str] | None = None) -> int:
    # Job records, replies and the audit trail hold addresses and links: private however
    # athome is started (systemd sets UMask=0077 too, a shell usually 0022).
    os.umask(0o077)
    args = build_parser().parse_args(argv)
    logs.setup(args.verbose)
    try:
        return args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"PROBLEM: {problem}", file=sys.stderr)
        return 2
    except AthomeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
