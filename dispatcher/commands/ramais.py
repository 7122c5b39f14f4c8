"""RAMAIS=<ramais> SERVER=<host> INICIO=<data hora> FIM=<data hora>: call recordings.

Where the recordings live is the server's `audios_from` host var; the playbook
(playbooks/audios.yml, role recordings) routes on it, not Python.
Reply: templates/ramais.*.j2.
"""

from __future__ import annotations

from datetime import datetime, timezone

from dispatcher import grammar
from dispatcher.commands.base import CONTROLLER, Command, CommandSpec

SIP_GROUP = "sip_servers"
RECORDINGS_GROUP = "recordings"


def received_at(request_id: str) -> str:
    """When the request arrived, in the controller's local time (request ids carry UTC)."""
    try:
        when = datetime.strptime(request_id[:15], "%Y%m%d_%H%M%S").replace(tzinfo=timezone.utc)
    except ValueError:
        return ""
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S")


ISO = "%Y-%m-%d %H:%M"
# Extensions in one request: playbooks/audios.yml asserts the same bound (tests/test_limits.py).
MAX_EXTENSIONS = 50


class Ramais(CommandSpec):
    name = "RAMAIS"
    order = 10
    summary = "Separa as gravações de chamadas de ramais num período e envia um link para o ZIP."
    syntax = "RAMAIS=<ramal>[,<ramal>...] SERVER=<servidor> INICIO=DD/MM/AAAA HH:MM FIM=DD/MM/AAAA HH:MM"
    example = "RAMAIS=1121,1122 SERVER=voip1 INICIO=01/11/2025 00:00 FIM=05/11/2025 23:59"
    playbook = "audios.yml"
    template = "ramais"
    run_timeout = 900  # scanning and zipping a large window (keep deploy TimeoutStopSec above it)
    ignore_hosts = ()  # the S3 route runs on the controller: localhost can be the worker

    def relevant(self, result):
        """The worker host (the one with a report), not the localhost validation play."""
        local = result.hosts.get("localhost")
        if local is not None and not local.report and local.succeeded:
            return result.without(("localhost",))
        return result

    def outcome(self, cmd, result):
        outcome = super().outcome(cmd, result)
        if outcome == "success" and any(h.report.get("too_many") for h in result.hosts.values()):
            return "failed"  # nothing was zipped: the requester must narrow the window
        return outcome

    def parse(self, text, ctx):
        pairs = grammar.split_keywords(text, self.example)
        fields = grammar.keyword_map(
            pairs, ("RAMAIS", "SERVER", "INICIO", "FIM"), (), self.example, self.name
        )
        extensions = grammar.parse_extensions(fields["RAMAIS"], self.example, self.name, limit=MAX_EXTENSIONS)
        server = grammar.parse_host(fields["SERVER"], ctx, SIP_GROUP, self.example, self.name)
        start, end = grammar.parse_window(
            fields["INICIO"], fields["FIM"], ctx.max_window_days, self.example, self.name
        )
        params = {
            "extensions": list(extensions),
            "server": server,
            "start": start.strftime(ISO),
            "end": end.strftime(ISO),
        }
        text = (
            f"RAMAIS={','.join(extensions)} SERVER={server} "
            f"INICIO={start.strftime(grammar.DATE_FORMAT)} FIM={end.strftime(grammar.DATE_FORMAT)}"
        )
        return Command(self.name, params, text)

    def extravars(self, cmd, request_id, requester):
        p = cmd.params
        return {
            "server": p["server"],
            "extensions": p["extensions"],
            "start": p["start"],
            "end": p["end"],
            "request_id": request_id,
            "requester": requester,
            "received": received_at(request_id),
        }

    def hosts(self, cmd, inventory):
        """Where the work runs, chosen as playbooks/audios.yml does: for `audios_from: audio`
        the server's `recordings_host` or else the first host of recordings; for `s3` (or
        a server the play will refuse) the controller."""
        server = inventory.hosts.get(cmd.params["server"])
        if server is None or server.vars.get("audios_from") != "audio":
            return frozenset({CONTROLLER})
        first = next((h.name for h in inventory.hosts.values() if RECORDINGS_GROUP in h.groups), None)
        worker = server.vars.get("recordings_host") or first
        return frozenset({worker or CONTROLLER})
