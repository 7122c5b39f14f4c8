"""Reply emails from jinja2 templates: a subject, a text part and an HTML part.

Each reply kind has dispatcher/templates/<kind>.txt.j2 (blocks `subject` and
`body`) and <kind>.html.j2 (block `body`); both extend the shared layout that
carries the branding and the standard footer. Values from the request are
passed as data, never as template source, and the HTML side autoescapes.
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


SUBJECT_END = "\x1e\n"  # ends the subject in the text layout (_layout.txt.j2)


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

    def render(self, kind: str, **values) -> Rendered:
        text_t = self.text_env.get_template(f"{kind}.txt.j2")
        html_t = self.html_env.get_template(f"{kind}.html.j2")
        # The text layout renders the `subject` block first, then a record separator.
        subject, _, text = text_t.render(**values).partition(SUBJECT_END)
        return Rendered(
            subject=" ".join(subject.split()), text=text.lstrip("\n"), html=html_t.render(**values)
        )
