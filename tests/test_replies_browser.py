"""Every reply the product sends, rendered and opened in a real headless Chromium.

Each reply kind (every command's result in its success, partial and failure forms, the
acknowledgements, the confirmation request, the refusals, the alerts, HELP, STATUS,
WHITELIST, the generic and the bare results) is rendered through Replies().render with
values shaped like the real ones: commands parsed by the real grammar, per-host reports
as the playbooks document them (playbooks/*.yml), error strings as the modules write
them. Its HTML part is written to a file and loaded at 360 px (a phone) and 1024 px;
the page must log no console error, fetch nothing but itself (every host name resolves
to nothing, so a fetch would show as a failed request), reference no http(s) resource,
fit the width without scrolling sideways or clipping, and leave a full-page PNG.

The HTML files and screenshots are kept in the directory that every failure message
names (pytest keeps the last three runs' temporary directories). Chromium is Debian's
`chromium` (`make system-deps` installs it): missing, the test fails rather than skips.
"""

from __future__ import annotations

import re
import struct
from html.parser import HTMLParser
from pathlib import Path

import pytest

from dispatcher import auth, commands, grammar
from dispatcher.errors import GrammarError
from dispatcher.jobqueue import Job
from dispatcher.replies import Replies
from tests.browser import BrowserError, Chromium

TEMPLATES = Path(__file__).resolve().parent.parent / "dispatcher" / "templates"
WIDTHS = (360, 1024)
REQUEST_ID = "20251129_173136_482913_a1"
REQUESTER = "maria.fernanda.albuquerque@filial-sorocaba.athome.com.br"
HOSTS = {
    name: grammar.HostFacts(name, frozenset(groups))
    for name, groups in {
        "gv1p": {"sip_servers", "fail2ban_servers", "mac_servers"},
        "gv2p": {"sip_servers", "fail2ban_servers", "mac_servers"},
        "gv3p": {"sip_servers", "fail2ban_servers", "mac_servers"},
        "voip1": {"sip_servers", "fail2ban_servers"},
        "audio": {"recordings"},
    }.items()
}
CTX = grammar.ParseContext(hosts=HOSTS)


def parsed(text: str) -> commands.Command:
    return commands.parse(text, CTX)


def host(status: str, report: dict | None = None, errors: list[str] | None = None) -> dict:
    """One host of runner.PlaybookResult.to_dict()."""
    return {"status": status, "report": report or {}, "errors": errors or []}


def playbook(name: str, hosts: dict, status: str = "successful", errors: list[str] | None = None) -> dict:
    return {"playbook": name, "status": status, "rc": 0 if status == "successful" else 2,
            "elapsed": 7.412, "errors": errors or [], "hosts": hosts}  # fmt: skip


def result_values(cmd: commands.Command, outcome: str, result: dict) -> dict:
    """What service._complete passes to a command's reply template."""
    return dict(request_id=REQUEST_ID, command=cmd.text, command_name=cmd.name, params=cmd.params,
                outcome=outcome, result=result)  # fmt: skip


UNREACHABLE = (
    "Failed to connect to the host via ssh: ssh: connect to host gv2p.athome.invalid port 22: "
    "Connection timed out"
)

# ------------------------------------------------------------------ CHECKIP


def checkip_report(ip: str, banned_in: list[str], whitelisted: str) -> dict:
    return {
        "ip": ip, "request_id": REQUEST_ID, "jails": ["asterisk", "asterisk-iax", "sshd", "recidive"],
        "banned_in": banned_in, "unbanned": bool(banned_in), "whitelisted": whitelisted,
        "backup_file": "/etc/fail2ban/jail.d/athome-whitelist.local.4137.2025-11-29@17:31:40~"
        if whitelisted == "new" else "",
        "check_mode": False, "errors": [],
    }  # fmt: skip


def checkip_replies() -> dict[str, tuple[str, dict]]:
    v4 = parsed("CHECKIP=200.158.47.12")
    v6 = parsed("CHECKIP=2804:14c:5b80:8a21:3d4e:91ff:fe2a:7c10")
    ip6 = v6.params["ip"]
    # As a real run reports a host whose fail2ban is stopped (tests/test_checkip_playbooks.py):
    # the module's message in the report, and again after each failed task's name.
    socket_error = (
        "fail2ban-client status failed (rc=255): 2025-11-29 17:31:41,059 fail2ban                "
        "[5401]: ERROR   Failed to access socket path: /var/run/fail2ban/fail2ban.sock. "
        "Is fail2ban running?"
    )
    failed_tasks = [
        "Unban the address where it is banned and whitelist it on every jail, now and in the "
        "managed file.: " + socket_error,
        "Keep the host marked as failed.: " + socket_error,
    ]
    return {
        "checkip-success": ("checkip", result_values(v4, "success", playbook("unban.yml", {
            "gv1p": host("changed", checkip_report("200.158.47.12", ["asterisk", "recidive"], "new")),
            "gv2p": host("changed", checkip_report("200.158.47.12", [], "new")),
            "gv3p": host("ok", {"disabled": True}),
            "voip1": host("ok", checkip_report("200.158.47.12", [], "already")),
        }))),
        "checkip-partial": ("checkip", result_values(v6, "partial", playbook("unban.yml", {
            "gv1p": host("changed", checkip_report(ip6, ["asterisk-iax"], "new")),
            "gv2p": host("unreachable", errors=[f"Unban the address and whitelist it: {UNREACHABLE}"]),
            "voip1": host("changed", checkip_report(ip6, [], "new")),
        }, status="failed"))),
        "checkip-failed": ("checkip", result_values(v4, "failed", playbook("unban.yml", {
            "gv1p": host("failed", {"ip": "200.158.47.12", "request_id": REQUEST_ID, "check_mode": False,
                                    "errors": [socket_error]}, failed_tasks),
            "gv2p": host("unreachable", errors=[f"Unban the address and whitelist it: {UNREACHABLE}"]),
        }, status="failed"))),
    }  # fmt: skip


# ---------------------------------------------------------------- MACCHANGE

DEF_PATH, SIP_PATH = "/etc/asterisk/__ENDPOINTS__.DEF", "/etc/asterisk/endpoints_sip.def"
SIP_LINE = (
    "3010;MAC:{mac};MODEL:grandstream_gxp1625;LINE:1;CONTEXT:from-internal;"
    "CALLERID:Sala de reunião <3010>;CODECS:alaw,ulaw,g729;NAT:force_rport,comedia"
)


def mac_files(before: str, after: str, backups: bool) -> dict:
    stamp = "20251129_173142"
    return {
        "endpoints_def": {"path": DEF_PATH, "before": f"'serialnumber': '{before}',",
                          "after": f"'serialnumber': '{after}',",
                          "backup": f"{DEF_PATH}.{stamp}.bak" if backups else ""},
        "endpoints_sip": {"path": SIP_PATH, "before": SIP_LINE.format(mac=before),
                          "after": SIP_LINE.format(mac=after),
                          "backup": f"{SIP_PATH}.{stamp}.bak" if backups else ""},
    }  # fmt: skip


def mac_report(cmd, changed=True, check_mode=False, warnings=(), notified=True) -> dict:
    p = cmd.params
    files = mac_files(p["mac_current"] or "None", p["mac_new"] or "None", changed and not check_mode)
    return {
        "request_id": REQUEST_ID, "extension": p["extension"], "operation": p["operation"],
        "mac_current": p["mac_current"], "mac_new": p["mac_new"], "changed": changed,
        "check_mode": check_mode, "files": files,
        "backups": [f["backup"] for f in files.values() if f["backup"]],
        "backups_pruned": [f"{DEF_PATH}.20250214_091502.bak"] if changed and not check_mode else [],
        "warnings": list(warnings), "notified": notified and changed and not check_mode,
    }  # fmt: skip


def macchange_replies() -> dict[str, tuple[str, dict]]:
    swap = parsed("MACCHANGE=3010 MACATUAL=01:02:03:04:05:06 MACFUTURO=0004F2ACC0FE SERVER=gv2p")
    wrong = parsed("MACCHANGE=3010 MACATUAL=AABBCCDDEEFF MACFUTURO=0004F2ACC0FE SERVER=gv2p")
    monitor = (
        "the provisioning monitor could not be notified: /usr/local/bin/arimonitor: "
        "connection to 127.0.0.1:5038 refused"
    )
    refusal = (
        "extension 3010 does not hold MAC AABBCCDDEEFF in both files: __ENDPOINTS__.DEF holds MAC "
        "010203040506; endpoints_sip.def holds MAC 010203040506. Nothing was written."
    )
    refused = {**mac_report(wrong, changed=False), "files": {}, "backups": [], "backups_pruned": [],
               "notified": False, "error": refusal, "reason": "mismatch"}  # fmt: skip
    disagree = (
        "cannot write endpoints_sip.def (/etc/asterisk/endpoints_sip.def): [Errno 28] No space left on "
        "device; restoring /etc/asterisk/__ENDPOINTS__.DEF failed too ([Errno 28] No space left on "
        "device): the files DISAGREE, restore it from /etc/asterisk/__ENDPOINTS__.DEF.20251129_173142.bak"
    )
    half = {**refused, "error": disagree, "reason": "restore_failed",
            "backups": [f"{DEF_PATH}.20251129_173142.bak", f"{SIP_PATH}.20251129_173142.bak"]}  # fmt: skip
    return {
        "macchange-success": ("macchange", result_values(swap, "success", playbook("macchange.yml", {
            "gv2p": host("changed", mac_report(swap)),
        }))),
        "macchange-partial": ("macchange", result_values(swap, "partial", playbook("macchange.yml", {
            "gv2p": host("failed", mac_report(swap, warnings=[monitor], notified=False), [
                "Fail when the monitor could not be notified (the files did change).: The MAC of "
                "extension 3010 changed in both files, but the provisioning monitor could not be "
                "notified (rc=1): connection to 127.0.0.1:5038 refused"]),
        }, status="failed"))),
        "macchange-failed": ("macchange", result_values(wrong, "failed", playbook("macchange.yml", {
            "gv2p": host("failed", refused, [f"Fail with the reason.: {refusal}"]),
        }, status="failed"))),
        "macchange-files-disagree": ("macchange", result_values(swap, "failed", playbook("macchange.yml", {
            "gv2p": host("failed", half, [f"Fail with the reason.: {disagree}"]),
        }, status="failed"))),
        "macchange-unreachable": ("macchange", result_values(swap, "failed", playbook("macchange.yml", {
            "gv2p": host("unreachable", errors=[f"Apply the endpoint_mac role: {UNREACHABLE}"]),
        }, status="failed"))),
    }  # fmt: skip


# ------------------------------------------------------------------- RAMAIS

PRESIGNED = (
    "https://s3.sa-east-1.amazonaws.com/athome-ramais/ramais/20251129_173136_482913_a1/"
    "ramais_1121-1122-1123_20251103-0800_20251104-1830.zip?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAXXXXXXXXXXXXXXXX%2F20251129%2Fsa-east-1%2Fs3%2Faws4_request"
    "&X-Amz-Date=20251129T203140Z&X-Amz-Expires=604800&X-Amz-SignedHeaders=host"
    "&X-Amz-Signature=6f1e0c3b5a9d27e4c8b1f0a3d5e7c9b2a4f6e8d0c2b4a6f8e0d2c4b6a8f0e2d4"
)


def ramais_report(cmd, **entry) -> dict:
    p = cmd.params
    base = {
        "route": "s3", "worker": "localhost", "server": p["server"], "request_id": REQUEST_ID,
        "criteria": {"server": p["server"], "extensions": p["extensions"], "start": p["start"],
                     "end": p["end"]},
        "scanned": 18734, "dirs_listed": 2, "list_calls": 19, "results_removed": 3,
        "selected": 0, "bytes": 0, "per_extension": {}, "per_extension_bytes": {}, "url": None,
        "expires": None, "files": [], "files_capped": False, "too_many": False,
        "limits": {"max_files": 2000, "max_bytes": 2147483648}, "nothing_found": False,
        "queued": False, "message": "",
    }  # fmt: skip
    return {**base, **entry}


def ramais_replies() -> dict[str, tuple[str, dict]]:
    many = parsed(
        "RAMAIS=1121,1122,1123,1124,1125,1126,1127,1128,1129,1130,1131,1132 SERVER=voip1 "
        "INICIO=03/11/2025 08:00 FIM=04/11/2025 18:30"
    )
    few = parsed("RAMAIS=1121,1122,1123 SERVER=voip1 INICIO=03/11/2025 08:00 FIM=04/11/2025 18:30")
    per = {"1121": 212, "1122": 187, "1123": 64}
    found = ramais_report(
        few, selected=sum(per.values()), bytes=731_906_048, per_extension=per, url=PRESIGNED,
        expires="2025-12-06T20:31:40Z", message="463 gravações prontas para baixar",
    )  # fmt: skip
    return {
        "ramais-success": ("ramais", result_values(few, "success", playbook("audios.yml", {
            "localhost": host("ok", found),
        }))),
        "ramais-nothing-found": ("ramais", result_values(few, "success", playbook("audios.yml", {
            "localhost": host("ok", ramais_report(few, nothing_found=True, scanned=40211)),
        }))),
        "ramais-queued-legacy": ("ramais", result_values(few, "success", playbook("audios.yml", {
            "audio": host("changed", ramais_report(few, route="legacy", worker="audio", queued=True,
                                                   scanned=None, selected=None, bytes=None,
                                                   legacy_file="/root/sandbox/fila_audios/"
                                                   "20251129_173136_482913_a1.json")),
        }))),
        # The template's partial form (rare for RAMAIS, whose work is done by one host).
        "ramais-partial": ("ramais", result_values(few, "partial", playbook("audios.yml", {
            "localhost": host("ok", found),
            "audio": host("unreachable", errors=[f"Select the recordings: {UNREACHABLE}"]),
        }, status="failed"))),
        "ramais-too-many": ("ramais", result_values(many, "failed", playbook("audios.yml", {
            "localhost": host("ok", ramais_report(many, too_many=True, selected=3187,
                                                  bytes=5_368_709_120)),
        }))),
        "ramais-failed": ("ramais", result_values(few, "failed", playbook("audios.yml", {
            "localhost": host("failed", errors=[
                "Select the recordings and zip them into the results bucket: An error occurred "
                "(AccessDenied) when calling the ListObjectsV2 operation: User: arn:aws:iam::"
                "123456789012:user/athome-ramais is not authorized to perform: s3:ListBucket on "
                "resource: \"arn:aws:s3:::athome-recordings-voip1\""]),
        }, status="failed"))),
    }  # fmt: skip


# ------------------------------------------------------ replies of the service


def service_replies() -> dict[str, tuple[str, dict]]:
    swap = parsed("MACCHANGE=3010 MACATUAL=01:02:03:04:05:06 MACFUTURO=0004F2ACC0FE SERVER=gv2p")
    ramais = parsed("RAMAIS=1121,1122,1123 SERVER=voip1 INICIO=03/11/2025 08:00 FIM=04/11/2025 18:30")
    ack = dict(request_id=REQUEST_ID, command=ramais.text, command_name=ramais.name, position=3)
    # A grammar error as the service gets it: the real parser on a real mistake.
    bad = "RAMAIS=1121,1122,1123,1124,1125,1126,1127,1128 SERVER=voip1 INICIO=03/11/2025 FIM=04/11/2025"
    with pytest.raises(GrammarError) as caught:
        parsed(bad)
    with pytest.raises(GrammarError) as unknown:
        parsed("Re: ramais da filial")
    masked = grammar.mask_subject(f"[A1B2C3D4E5F60718] {bad}")
    held = "MAC 0004F2ACC0FE is also held by extension 2030 (__ENDPOINTS__.DEF, endpoints_sip.def)"
    check = playbook(
        "macchange.yml", {"gv2p": host("changed", mac_report(swap, check_mode=True, warnings=[held]))}
    )
    job = Job(REQUEST_ID, {"command": "RAMAIS", "command_text": ramais.text, "requester": REQUESTER,
                           "params": ramais.params}, state="pending", attempts=1)  # fmt: skip
    unauthenticated = (
        "mx.athome.com.br: dmarc=fail (p=reject) header.from=filial-sorocaba.athome.com.br; "
        "dkim=fail (body hash did not verify) header.d=filial-sorocaba.athome.com.br; spf=softfail "
        "for From domain filial-sorocaba.athome.com.br"
    )
    long_message_id = "<CAHx7Zb3p9o2Vq8Lm+Y6tRk1wQe0uJd4sNf5gHa7iKz=Xc9vB2nM@mail.gmail.com>"
    return {
        "ack": ("ack", ack),
        "ack-confirm": ("ack", {**ack, "command": swap.text, "command_name": swap.name, "confirm": True}),
        "ack-confirmed": ("ack", {**ack, "command": swap.text, "command_name": swap.name, "position": 1,
                                  "confirmed": True}),
        "confirm": ("confirm", dict(
            request_id=REQUEST_ID, command=swap.text, command_name=swap.name, code="7K3M9QXR",
            expires="29/11/2025 18:01 (UTC-03:00)", result=check,
        )),
        "rejected": ("rejected", dict(
            request_id=REQUEST_ID, subject=masked, problem=caught.value.message,
            example=caught.value.example, command_name=caught.value.command or "",
        )),
        "rejected-no-command": ("rejected", dict(
            request_id=REQUEST_ID, subject=grammar.mask_subject("[A1B2C3D4E5F60718] Re: ramais da filial"),
            problem=unknown.value.message, example=unknown.value.example,
            command_name=unknown.value.command or "",
        )),
        "refused-confirmation": ("refused", dict(
            request_id=REQUEST_ID, subject="Re: CONFIRMAR ******** MACCHANGE=3010 (pedido 20251129_173136)",
            headline="Confirmação não aceita",
            problem="o código de confirmação está errado, expirou, já foi usado ou não é de um pedido seu",
            advice="Nada foi executado. Confira o código no e-mail de confirmação, ou envie o comando "
            "de novo para receber um código novo.",
        )),
        "refused-unauthenticated": ("refused", dict(
            request_id=REQUEST_ID, subject=masked, headline="Comando recusado: mensagem não autenticada",
            problem="não foi possível confirmar que a mensagem foi enviada por este endereço "
            "(o servidor de e-mail não a autenticou por DKIM/DMARC)",
            advice="Se foi você quem enviou, mande o comando direto da sua conta de e-mail corporativa, "
            "sem encaminhar nem usar outro serviço de envio, e avise os administradores se o erro "
            "continuar. Se não foi você, avise os administradores: alguém está usando o seu endereço.",
        )),
        "denied": ("denied", dict(
            request_id=REQUEST_ID, command=swap.text, command_name=swap.name,
        )),
        "token_invalid": ("token_invalid", dict(
            request_id="", sender=REQUESTER, subject=grammar.mask_subject(f"[A1B2C3D4E5F6] {ramais.text}"),
            problem=auth.TOKEN_PROBLEMS["unknown"], lockout_failures=5, lockout_window="15",
            lockout_cooldown="60",
        )),
        "security_alert": ("security_alert", dict(
            request_id="", headline=f"mensagem não autenticada em nome de {REQUESTER}",
            rows=[("Remetente (From)", REQUESTER), ("Assunto", masked),
                  ("Message-ID", long_message_id), ("Verificação", unauthenticated)],
            advice="O servidor de e-mail não confirmou (DMARC/DKIM) que a mensagem veio do domínio do "
            "remetente. Se foi mesmo enviada por ele, veja no README o que fazer; se não, alguém está "
            "forjando o endereço. Alertas iguais para este remetente ficam suspensos por 1 hora.",
        )),
        "admin_notice": ("admin_notice", dict(
            request_id="", headline="respostas retidas pelo limite de envio de e-mail",
            rows=[("Respostas na fila", "37"), ("Enviados (última hora)", "150 de 150 destinatários"),
                  ("Enviados (últimas 24 horas)", "212 de 450 destinatários"),
                  ("Próximo envio", "29/11/2025 14:05 (UTC-03:00)")],
            advice="Nenhuma resposta foi descartada: elas saem em ordem assim que o limite permitir "
            "(mail.smtp.max_recipients_per_hour / max_recipients_per_day). Veja athome status. "
            "Este aviso é enviado no máximo uma vez por dia.",
        )),
        "help": ("help", dict(request_id=REQUEST_ID, commands=list(commands.COMMANDS.values()))),
        "status": ("status", dict(request_id=REQUEST_ID, asked_id=REQUEST_ID, job=job, position=2)),
        "status-unknown": ("status", dict(request_id=REQUEST_ID, asked_id="20251128_090000_000000_zz",
                                          job=None, position=0)),
        "whitelist": ("whitelist", dict(
            request_id=REQUEST_ID, action="ADD", outcome="added",
            why=f"{REQUESTER} foi adicionado à lista de remetentes autorizados.",
            entries=[{"address": "admin@athome.com.br", "inline": True},
                     {"address": "ana@athome.com.br", "inline": False},
                     {"address": REQUESTER, "inline": False}],
        )),
        "whitelist-refused": ("whitelist", dict(
            request_id=REQUEST_ID, action="REMOVE", outcome="refused",
            why="admin@athome.com.br está no arquivo de configuração e não pode ser removido por e-mail.",
            entries=[{"address": "admin@athome.com.br", "inline": True}],
        )),
        "result": ("result", result_values(swap, "partial", playbook("ping.yml", {
            "gv1p": host("ok", {"python": "/usr/bin/python3"}),
            "gv2p": host("unreachable", errors=[f"Ping the host.: {UNREACHABLE}"]),
        }, status="failed"))),
        "result-expired": ("result", result_values(swap, "failed", {
            "status": "failed", "hosts": {},
            "errors": ["a confirmação não chegou a tempo: nada foi alterado"],
        })),
        "bare": ("bare", dict(request_id=REQUEST_ID, command=swap.text, command_name=swap.name,
                              outcome="partial")),
    }  # fmt: skip


REPLIES = {**checkip_replies(), **macchange_replies(), **ramais_replies(), **service_replies()}


# ------------------------------------------------------------------ checks


class ResourceRefs(HTMLParser):
    """Every URL the HTML would load by itself (not links a person clicks)."""

    LOADING = {"src", "srcset", "background", "poster", "data", "lowsrc", "dynsrc"}

    def __init__(self):
        super().__init__()
        self.refs: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            value = value or ""
            if name in self.LOADING or (name == "href" and tag in ("link", "base", "image", "use")):
                self.refs.append(f"<{tag} {name}={value!r}>")
            if name == "style":
                self.refs += [f"<{tag} style=url({u})>" for u in css_urls(value)]
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.refs += [f"<style> url({u})" for u in css_urls(data)]


def css_urls(css: str) -> list[str]:
    found = re.findall(r"""url\(\s*['"]?([^'")\s]+)|@import\s+['"]([^'"]+)""", css, re.I)
    return [a or b for a, b in found]


def external_refs(html: str) -> list[str]:
    parser = ResourceRefs()
    parser.feed(html)
    return [r for r in parser.refs if re.search(r"(https?:)?//", r, re.I)]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("replies-browser")


@pytest.fixture(scope="module")
def browser(out):
    with Chromium(out) as chromium:
        yield chromium


def problems(report, html: str) -> list[str]:
    """Everything wrong with one page at one width, in words."""
    found = [f"console: {c}" for c in report.console]
    found += [f"fetched from outside: {u}" for u in report.external]
    found += [f"failed fetch: {f}" for f in report.failed]
    found += [f"references an outside resource: {r}" for r in external_refs(html)]
    m = report.metrics
    if m["scrollWidth"] > m["viewport"]:
        found.append(f"scrolls sideways: {m['scrollWidth']}px wide in a {m['viewport']}px viewport")
    found += [f"clipped: {c}" for c in m["clipped"]]
    found += [f"past the right edge: {b}" for b in m["beyond"]]
    found += [f"word cut across lines: {c}" for c in m["cut"]]
    return found


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", list(REPLIES))
def test_reply_reads_well_in_a_real_browser(name, width, browser, out):
    kind, values = REPLIES[name]
    rendered = Replies().render(kind, **values)
    page = out / f"{name}.html"
    page.write_text(rendered.html, encoding="utf-8")
    shot = out / f"{name}-{width}.png"
    report = browser.check(page, width, shot)
    found = problems(report, rendered.html)
    assert not found, f"{name} at {width}px (files in {out}):\n  " + "\n  ".join(found)
    assert report.requests == [page.resolve().as_uri()], report.requests
    assert report.metrics["viewport"] == width
    assert shot.stat().st_size > 0 and png_size(shot) == (width, report.metrics["height"]), shot


def test_every_reply_template_is_checked():
    """A new template (or a command's new reply) cannot slip past the browser check."""
    kinds = {
        p.name.removesuffix(".html.j2") for p in TEMPLATES.glob("*.html.j2") if not p.name.startswith("_")
    }
    checked = {kind for kind, _ in REPLIES.values()}
    assert kinds - checked == set(), "templates never opened in the browser"
    for spec in commands.COMMANDS.values():
        if spec.playbook is not None:
            outcomes = {v["outcome"] for k, v in REPLIES.values() if k == spec.template}
            assert outcomes == {"success", "partial", "failed"}, (spec.name, outcomes)
    acks = [v for k, v in REPLIES.values() if k == "ack"]
    assert {("confirm" in v, "confirmed" in v) for v in acks} == {
        (False, False),
        (True, False),
        (False, True),
    }


# ---------------------------------------------------- the checks can fail

BAD_PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8"><title>x</title>
<link rel="stylesheet" href="https://fonts.example.com/css?family=Roboto"></head>
<body style="margin:0"><img src="http://cdn.example.com/logo.png" alt="">
<table width="640"><tr><td>Servidor</td></tr></table>
<div style="width:100px;overflow:hidden"><code>MACCHANGE=3010_MACATUAL=010203040506_MACFUTURO</code></div>
<p style="width:40px;overflow-wrap:anywhere">Servidor</p>
<script>console.error("boom")</script></body></html>"""


def test_the_checks_catch_console_errors_outside_loads_overflow_and_cut_words(browser, out):
    page = out / "self-test-bad.html"
    page.write_text(BAD_PAGE, encoding="utf-8")
    report = browser.check(page, 360, out / "self-test-bad-360.png")
    found = "\n".join(problems(report, BAD_PAGE))
    assert "console: console.error: boom" in found
    assert "fetched from outside: http://cdn.example.com/logo.png" in found
    assert "fetched from outside: https://fonts.example.com/css?family=Roboto" in found
    assert found.count("failed fetch: net::ERR_NAME_NOT_RESOLVED") == 2, found
    assert "references an outside resource: <img src='http://cdn.example.com/logo.png'>" in found
    assert "references an outside resource: <link href=" in found
    assert "scrolls sideways: 640px wide in a 360px viewport" in found
    assert 'clipped: <div> "MACCHANGE=3010_MACATUAL=010203040506_MACFUTURO"' in found
    assert 'past the right edge: <td> "Servidor" ends at' in found
    assert 'word cut across lines: "Servidor" in <p> "Servidor"' in found
    ok = external_refs('<a href="https://audio.athome.invalid/ramais/x.zip">Baixar</a>'
                       '<p style="background:url(data:image/png;base64,AA)">x</p>')  # fmt: skip
    assert ok == [], "links and inline data are not outside resources"
    assert external_refs('<td background="//cdn.example.com/bg.gif">') != []
    assert external_refs("<style>@import 'https://x.example/a.css';</style>") != []


def test_a_browser_that_dies_at_start_is_reported_not_waited_for(tmp_path):
    browser = Chromium(tmp_path, executable="/bin/true")
    with pytest.raises(BrowserError, match=r"closed its pipe \(exit status 0\)"):
        browser.__enter__()
    assert browser.proc is None, "stopped and cleaned up"
