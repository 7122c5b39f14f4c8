"""Reply emails from jinja2 templates: a subject, a text part and an HTML part.

Each reply kind has dispatcher/templates/<kind>.txt.j2 (blocks `status` and
`body`) and <kind>.html.j2 (block `body`); both extend the shared layout that
carries the branding, the status line and the standard footer. Values from the
request are passed as data, never as template source, and the HTML side
autoescapes.

Subjects and threading: a reply about a request is rendered with `thread`, the
command's subject with the token masked, and its subject is `Re: <thread>`: the
same for the acknowledgement, the result and any refusal, so mail clients that
group a conversation by subject (Gmail: the subject without Re:/Fwd: must be the
same, besides In-Reply-To/References) keep every reply about a request in one
conversation. The status ('✅ CHECKIP concluído (pedido …)') is the first line of
the body, which is what a client shows beside the subject. A message that replies
to nothing (an alert to the admins) has the status as its subject.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

from jinja2 import Environment, PackageLoader, StrictUndefined, TemplateNotFound

MARKS = {"success": "✅", "partial": "⚠️", "failed": "❌", "info": "ℹ️"}
HOST_MARKS = {"ok": "✅", "changed": "✅", "skipped": "✅", "failed": "❌", "unreachable": "⚠️"}
STATUS_PT = {
    "ok": "ok",
    "changed": "alterado",
    "skipped": "ignorado",
    "failed": "falhou",
    "unreachable": "inacessível",
}
STATE_PT = {
    "pending": "na fila",
    "processing": "em execução",
    "waiting": "aguardando sua confirmação",
    "done": "concluído",
    "failed": "falhou",
}


STATUS_END = "\x1e\n"  # ends the status line in the text layout (_layout.txt.j2)
REPLY_PREFIX = "Re: "


def thread_subject(thread: str) -> str:
    """The subject of a reply about a request whose (masked) subject is `thread`."""
    thread = " ".join(thread.split())
    return thread if thread[:3].lower() == "re:" else f"{REPLY_PREFIX}{thread}"


def br_datetime(value: str) -> str:
    """'2025-11-01 08:00' -> '01/11/2025 08:00' (the form users type)."""
    try:
        return datetime.strptime(value, "%Y-%m-%d %H:%M").strftime("%d/%m/%Y %H:%M")
    except (TypeError, ValueError):
        return str(value)


DEFAULT_TIMEZONE = "America/Sao_Paulo"


def local_time(value: str | float | int, tz: str = DEFAULT_TIMEZONE) -> str:
    """An instant ('2025-11-29T20:31:36Z', or seconds since the epoch) as requesters read
    it, in the operator's time zone: '29/11/2025 17:31 (UTC-03:00)'."""
    try:
        if isinstance(value, (int, float)):
            when = datetime.fromtimestamp(value, timezone.utc)
        else:
            when = datetime.strptime(str(value)[:16], "%Y-%m-%dT%H:%M").replace(tzinfo=timezone.utc)
        local = when.astimezone(ZoneInfo(tz))
    except (ValueError, OverflowError, OSError):
        return str(value)
    offset = local.strftime("%z")
    return f"{local:%d/%m/%Y %H:%M} (UTC{offset[:3]}:{offset[3:]})"


@dataclass(frozen=True)
class Rendered:
    subject: str
    status: str  # the first line of the body: what happened, at a glance
    text: str
    html: str


class Replies:
    def __init__(self, brand: str = "ATHome", tz: str = DEFAULT_TIMEZONE):
        self.tz = tz
        common = dict(
            loader=PackageLoader("dispatcher", "templates"),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        )
        self.text_env = Environment(autoescape=False, **common)  # noqa: S701 - text/plain part
        self.html_env = Environment(autoescape=True, **common)
        for env in (self.text_env, self.html_env):
            env.filters["br_datetime"] = br_datetime
            env.filters["local_time"] = self.local_time
            env.globals.update(
                brand=brand, marks=MARKS, host_marks=HOST_MARKS, status_pt=STATUS_PT, state_pt=STATE_PT
            )

    def local_time(self, value: str | float | int) -> str:
        return local_time(value, self.tz)

    def has(self, kind: str) -> bool:
        try:
            self.text_env.get_template(f"{kind}.txt.j2")
            return True
        except TemplateNotFound:
            return False

    def render(self, kind: str, thread: str = "", **values) -> Rendered:
        """`thread`: the masked subject of the request this replies to ('' for none)."""
        text_t = self.text_env.get_template(f"{kind}.txt.j2")
        html_t = self.html_env.get_template(f"{kind}.html.j2")
        # The text layout renders the `status` block first, then a record separator.
        status, _, text = text_t.render(**values).partition(STATUS_END)
        status = " ".join(status.split())
        return Rendered(
            subject=thread_subject(thread) if thread.strip() else status,
            status=status,
            text=f"{status}\n\n{text.lstrip(chr(10))}",
            html=html_t.render(status=status, **values),
        )
