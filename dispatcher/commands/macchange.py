"""MACCHANGE=<ramal> MACATUAL=<mac> MACFUTURO=<mac> SERVER=<host>: move a phone's MAC.

Replace (both MACs), remove (MACFUTURO empty) or add (MACATUAL empty) in both
endpoint files of one MAC server. Playbook: playbooks/macchange.yml (role
endpoint_mac). Reply: templates/macchange.*.j2.
"""

from __future__ import annotations

from dispatcher import grammar
from dispatcher.commands.base import Command, CommandSpec
from dispatcher.errors import GrammarError

MAC_GROUP = "mac_servers"


class MacChange(CommandSpec):
    name = "MACCHANGE"
    order = 30
    summary = "Troca, remove ou adiciona o MAC de um ramal nos dois arquivos de endpoints."
    syntax = "MACCHANGE=<ramal> MACATUAL=<mac ou vazio> MACFUTURO=<mac ou vazio> SERVER=<servidor>"
    example = "MACCHANGE=3010 MACATUAL=010203040506 MACFUTURO=010203040599 SERVER=gv2p"
    playbook = "macchange.yml"
    template = "macchange"
    confirmable = True
    run_timeout = 300

    def parse(self, text, ctx):
        pairs = grammar.split_keywords(text, self.example)
        fields = grammar.keyword_map(
            pairs, ("MACCHANGE", "SERVER"), ("MACATUAL", "MACFUTURO"), self.example, self.name
        )
        extensions = grammar.parse_extensions(fields["MACCHANGE"], self.example, self.name)
        if len(extensions) != 1:
            raise GrammarError("MACCHANGE recebe um único ramal.", self.example, self.name)
        extension = extensions[0]
        current = grammar.parse_mac(fields.get("MACATUAL", ""), "MACATUAL", self.example, self.name)
        new = grammar.parse_mac(fields.get("MACFUTURO", ""), "MACFUTURO", self.example, self.name)
        if not current and not new:
            raise GrammarError(
                "Informe MACATUAL, MACFUTURO ou os dois (vazio em MACFUTURO remove; "
                "vazio em MACATUAL adiciona).",
                self.example,
                self.name,
            )
        if current == new:
            raise GrammarError("MACATUAL e MACFUTURO são iguais: nada a fazer.", self.example, self.name)
        server = grammar.parse_host(fields["SERVER"], ctx, MAC_GROUP, self.example, self.name)
        operation = "replace" if current and new else ("remove" if current else "add")
        params = {
            "extension": extension,
            "mac_current": current,
            "mac_new": new,
            "server": server,
            "operation": operation,
        }
        text = f"MACCHANGE={extension} MACATUAL={current} MACFUTURO={new} SERVER={server}"
        return Command(self.name, params, text)

    def extravars(self, cmd, request_id, requester):
        p = cmd.params
        return {
            "target": p["server"],
            "extension": p["extension"],
            "mac_current": p["mac_current"],
            "mac_new": p["mac_new"],
            "request_id": request_id,
        }

    def hosts(self, cmd, inventory):
        """Its SERVER, the one host the play edits."""
        return frozenset({cmd.params["server"]})
