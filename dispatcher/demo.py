"""`athome demo`: the whole product, end to end, on embedded defaults.

No outside server and no credential: the mailbox is a local Maildir
(DEMO/mail/inbox), replies go to another (DEMO/mail/outbox), the fleet is
inventory/demo (every host a local sandbox under DEMO/), each fail2ban host
runs its own sandbox fail2ban-server, and the MAC servers get copies of the
test endpoint files. Sample command emails go through the same Dispatcher,
playbooks and templates as production.
"""

from __future__ import annotations

import contextlib
import email
import logging
import os
import shutil
from datetime import date, datetime, timedelta
from email.message import EmailMessage
from email.policy import default as default_policy
from email.utils import formatdate
from pathlib import Path

import yaml

from dispatcher import config
from dispatcher.auth import TokenStore
from dispatcher.runner import REPO_ROOT
from dispatcher.sandbox import Fail2banSandbox, SeaweedSandbox
from dispatcher.service import Dispatcher

log = logging.getLogger(__name__)

REQUESTER = "operadora@athome.example"
FAIL2BAN_HOSTS = ("gv1p", "gv2p", "gv3p", "voip1")
MAC_HOSTS = ("gv1p", "gv2p", "gv3p")
ENDPOINT_FIXTURES = REPO_ROOT / "tests" / "fixtures" / "endpoints"


def _commands() -> list[str]:
    """The sample requests: what staff send every day, plus mistakes."""
    return [
        "HELP",
        "CHECKIP=3.3.3.3",
        "MACCHANGE=3010 MACATUAL=010203040506 MACFUTURO=010203040599 SERVER=gv2p",
        "MACCHANGE=3010 MACATUAL=AABBCCDDEEFF MACFUTURO=010203040511 SERVER=gv1p",
        "CHECKIP=3.3.3.3; reboot",
        "RAMAIS=1121,1122 SERVER=gv1p INICIO=03/11/2025 08:00 FIM=04/11/2025 18:00",
        "RAMAIS=1121 SERVER=voip1 INICIO=04/11/2025 00:00 FIM=04/11/2025 23:59",
        "RAMAIS=1121 SERVER=voip3 INICIO=01/11/2025 00:00 FIM=05/11/2025 23:59",
    ]


def _recording_names(day: date, count: int) -> list[str]:
    """FreePBX-style names (<direction>-<dst>-<src>-YYYYMMDD-HHMMSS-<uniqueid>.wav) spread over a day."""
    names = []
    extensions = ("1121", "1122", "1123", "112", "2010")
    for i in range(count):
        when = datetime(day.year, day.month, day.day) + timedelta(seconds=(i * 86400) // count)
        ext = extensions[i % len(extensions)]
        phone = f"55119{(i * 7919) % 100000000:08d}"
        direction = ("in", "out", "external", "q")[i % 4]
        dst, src = (phone, ext) if direction == "out" else (ext, phone)
        names.append(f"{direction}-{dst}-{src}-{when:%Y%m%d-%H%M%S}-{int(when.timestamp())}.{i}.wav")
    return names


def _recordings(root: Path) -> SeaweedSandbox | None:
    """A dated tree for the recordings host; a bucket for voip1 on a SeaweedFS sandbox."""
    days = [date(2025, 11, 3), date(2025, 11, 4), date(2025, 11, 5)]
    for day in days:
        folder = root / "recordings" / "tree" / f"{day:%Y/%m/%d}"
        folder.mkdir(parents=True)
        for name in _recording_names(day, 60):
            (folder / name).write_bytes(b"RIFF demo recording " + name.encode())
    if not SeaweedSandbox.available():
        return None
    s3 = SeaweedSandbox(root / "s3").start()
    os.environ.update(s3.credentials_file())  # the keys in a 0600 file, not in the environment
    os.environ["ATHOME_DEMO_S3_ENDPOINT"] = s3.endpoint
    client = s3.client()
    client.create_bucket(Bucket="athome-demo-voip1")
    client.create_bucket(Bucket="athome-demo-results")
    for name in _recording_names(days[1], 40):
        client.put_object(Bucket="athome-demo-voip1", Key=f"voip1/{days[1]:%Y/%m/%d}/{name}", Body=b"demo")
    return s3


def _stop_leftovers(root: Path) -> None:
    for host in FAIL2BAN_HOSTS:
        sandbox = Fail2banSandbox(root / "f2b" / host)
        if sandbox.sock.exists():
            sandbox.client("stop", check=False)


def _prepare(root: Path) -> tuple[Path, str, list]:
    _stop_leftovers(root)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    os.environ["ATHOME_DEMO_ROOT"] = str(root)

    sandboxes = []
    if shutil.which("fail2ban-server"):
        for host in FAIL2BAN_HOSTS:
            sandboxes.append(Fail2banSandbox(root / "f2b" / host).start())
        # The legacy real run: 3.3.3.3 banned on gv3p only.
        sandboxes[FAIL2BAN_HOSTS.index("gv3p")].ban("asterisk", "3.3.3.3")
    for host in MAC_HOSTS:
        target = root / "hosts" / host
        target.mkdir(parents=True)
        for f in ENDPOINT_FIXTURES.iterdir():
            shutil.copy2(f, target / f.name)

    s3 = _recordings(root)
    if s3 is not None:
        sandboxes.append(s3)
    store = TokenStore(root / "tokens.json")
    _, token = store.add("demo", senders=[REQUESTER], admin=True)
    cfg_path = root / "athome.yml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "state_dir": "state",
                "inventory": str(REPO_ROOT / "inventory" / "demo"),
                "mail": {
                    "transport": "maildir",
                    "from_address": "ops@athome.example",
                    "admin_addresses": ["admin@athome.example"],
                    "maildir": {"inbox": "mail/inbox", "outbox": "mail/outbox"},
                },
                "auth": {
                    "senders": [REQUESTER],
                    "tokens_file": "tokens.json",
                    # The demo's mail never crosses a mail server that could vouch for it
                    # (Authentication-Results); production requires it (config/athome.example.yml).
                    "authentication_results": {"required": False},
                },
                "worker": {"retry_backoff": [0], "playbook_timeout": 300},
            }
        )
    )
    return cfg_path, token, sandboxes


def _drop_emails(inbox: Path, token: str) -> None:
    import mailbox

    box = mailbox.Maildir(str(inbox), create=True)
    for i, command in enumerate(_commands(), 1):
        msg = EmailMessage()
        msg["From"] = f"Operadora <{REQUESTER}>"
        msg["To"] = "ops@athome.example"
        msg["Subject"] = f"[{token}] {command}"
        msg["Message-ID"] = f"<demo-{i}@athome.example>"
        msg["Date"] = formatdate(localtime=True)
        msg.set_content("Enviado pela demonstração do athome-ops.")
        box.add(msg)


def _print_replies(outbox: Path, seen: set[str]) -> None:
    files = sorted(p for sub in ("new", "cur") for p in (outbox / sub).glob("*") if p.name not in seen)
    for path in files:
        seen.add(path.name)
        msg = email.message_from_bytes(path.read_bytes(), policy=default_policy)
        print(f"\n── Para: {msg['To']}{'  Cc: ' + msg['Cc'] if msg['Cc'] else ''}")
        print(f"   Assunto: {msg['Subject']}")
        print(f"   Arquivo: {path}")
        text = msg.get_body(("plain",)).get_content()
        body = text.split("----------------------------------------------")[0]
        status, _, rest = body.partition("\n")
        print(f"   Situação: {status}")
        for line in rest.split("==============================================", 1)[-1].splitlines()[1:]:
            print(f"   │ {line}")


def main(root: Path) -> int:
    root = root.resolve()
    print(f"athome-ops demo in {root}")
    cfg_path, token, sandboxes = _prepare(root)
    if not sandboxes:
        print("fail2ban-server is not installed: CHECKIP will fail on every host (make demo installs it)")
    try:
        cfg = config.load(cfg_path)
        dispatcher = Dispatcher(cfg)
        _drop_emails(cfg.maildir_inbox, token)
        print(f"\n{len(_commands())} command emails dropped into {cfg.maildir_inbox}")
        seen: set[str] = set()

        print("\n═══ 1. Intake: authenticate, parse, queue, confirm at once ═══")
        counts = dispatcher.poll_once()
        print(f"   {counts}")
        _print_replies(cfg.maildir_outbox, seen)

        print("\n═══ 2. Work: each queued job runs its playbook (ansible-runner) ═══")
        done = dispatcher.work_once()
        print(f"   {done} job(s) run")
        _print_replies(cfg.maildir_outbox, seen)

        print("\n═══ What changed on the sandbox hosts ═══")
        for sandbox, host in zip(sandboxes[: len(FAIL2BAN_HOSTS)], FAIL2BAN_HOSTS, strict=False):
            print(
                f"   {host}: 3.3.3.3 banned in {sandbox.banned_jails('3.3.3.3') or 'no jail'}; "
                f"whitelist of asterisk: {', '.join(sandbox.ignore_list('asterisk'))}"
            )
        for host in MAC_HOSTS:
            sip = (root / "hosts" / host / "endpoints_sip.def").read_text()
            line = next((x for x in sip.splitlines() if x.startswith("3010;")), "")
            print(f"   {host}: endpoints_sip.def 3010 → {line[:60]}")
        for z in sorted((root / "www" / "recordings").glob("*.zip")):
            print(f"   audio: published {z} ({z.stat().st_size} bytes)")
        print(f"\nReplies (.eml) are in {cfg.maildir_outbox}/new; the queue is in {cfg.queue_dir}.")
        count, broken = dispatcher.audit.verify()
        print(
            f"Audit trail: {count} records in {cfg.audit_dir} (athome --config {cfg_path} audit), "
            f"hash chain {'BROKEN' if broken else 'intact'}."
        )
        # Expected: CHECKIP, one MACCHANGE and both RAMAIS done; the MACCHANGE with a
        # wrong MACATUAL refused on the server (the other mistakes never reach a job).
        done, failed = dispatcher.jobs.count("done"), dispatcher.jobs.count("failed")
        if (done, failed) != (4, 1):
            print(f"demo: expected 4 jobs done and 1 refused, found {done} done and {failed} failed")
            return 1
        print("demo: every outcome is the expected one")
        return 0
    finally:
        for sandbox in sandboxes:
            with contextlib.suppress(Exception):
                sandbox.stop()
