"""CHECKIP=<ip>: unban an address on every fail2ban server and whitelist it there.

Playbook: playbooks/unban.yml (role fail2ban_whitelist). Reply: templates/checkip.*.j2.
"""

from __future__ import annotations

from dispatcher import grammar
from dispatcher.commands.base import Command, CommandSpec

F2B_GROUP = "fail2ban_servers"


class CheckIP(CommandSpec):
    name = "CHECKIP"
    order = 20
    summary = "Desbloqueia um IP no fail2ban de todos os servidores e o coloca na lista de liberados."
    syntax = "CHECKIP=<endereço IPv4 ou IPv6>"
    example = "CHECKIP=3.3.3.3"
    playbook = "unban.yml"
    template = "checkip"
    run_timeout = 300  # every fail2ban host, a few tasks each

    def parse(self, text, ctx):
        pairs = grammar.split_keywords(text, self.example)
        fields = grammar.keyword_map(pairs, ("CHECKIP",), (), self.example, self.name)
        ip = grammar.parse_ip(fields["CHECKIP"], self.example, self.name)
        return Command(self.name, {"ip": ip}, f"CHECKIP={ip}")

    def extravars(self, cmd, request_id, requester):
        return {"ip": cmd.params["ip"], "request_id": request_id}

    def hosts(self, cmd, inventory):
        """Every enabled fail2ban server (the play skips the disabled ones)."""
        return frozenset(h.name for h in inventory.group(F2B_GROUP))
