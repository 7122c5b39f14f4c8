"""WHITELIST ADD|REMOVE <address> and WHITELIST LIST: the sender whitelist, by email.

Admin tokens only. Answered by the dispatcher itself (no server is touched):
the senders file is changed atomically after a timestamped backup (the newest
20 kept), and every change is an audit record. Addresses in the config file
(auth.senders) are listed but cannot be removed by email, nor can the last
address that an admin token may be used from. The same operations from the
command line: `athome whitelist add|remove|list` (dispatcher/cli.py).
"""

from __future__ import annotations

from dispatcher.auth import SenderWhitelist, TokenStore, valid_address
from dispatcher.commands.base import ADMIN, Answer, Command, CommandSpec
from dispatcher.errors import AthomeError, GrammarError

ACTIONS = ("ADD", "REMOVE", "LIST")


def admins_can_write(addresses: set[str], store: TokenStore) -> bool:
    """Some enabled, unexpired admin token may be used from one of these addresses."""
    return any(
        e.admin and e.enabled and not e.expired() and any(e.allows_sender(a) for a in addresses)
        for e in store.entries()
    )


def change(whitelist: SenderWhitelist, store: TokenStore, action: str, address: str) -> tuple[str, str]:
    """Apply ADD/REMOVE: (outcome, why) with outcome 'added', 'removed', 'unchanged' or
    'refused'; `why` is for the requester (pt-BR). Shared by the email command and the CLI."""
    current = whitelist.addresses()
    if action == "ADD":
        if not whitelist.add(address):
            return "unchanged", f"{address} já está na lista de remetentes."
        return "added", f"{address} foi adicionado à lista de remetentes."
    if address in whitelist.inline:
        return "refused", (
            f"{address} está definido no arquivo de configuração (auth.senders) e só pode ser "
            "removido lá, por um operador do servidor."
        )
    if address not in current:
        return "unchanged", f"{address} não está na lista de remetentes."
    if admins_can_write(current, store) and not admins_can_write(current - {address}, store):
        return "refused", (
            f"{address} é o último endereço de onde um token de administrador pode ser usado: "
            "removê-lo deixaria a lista sem administrador. Adicione outro administrador antes."
        )
    if not whitelist.remove(address):
        return "unchanged", f"{address} não está na lista de remetentes."
    return "removed", f"{address} foi removido da lista de remetentes."


def listing(whitelist: SenderWhitelist) -> list[dict[str, object]]:
    return [{"address": a, "inline": a in whitelist.inline} for a in sorted(whitelist.addresses())]


class Whitelist(CommandSpec):
    name = "WHITELIST"
    order = 90
    form = "words"
    extra_chars = "@+"
    permission = ADMIN
    summary = "Adiciona, remove ou lista os remetentes autorizados (só administradores)."
    syntax = "WHITELIST ADD <e-mail> | WHITELIST REMOVE <e-mail> | WHITELIST LIST"
    example = "WHITELIST ADD ana@example.com"
    template = "whitelist"

    def parse(self, text, ctx):
        parts = text.split()
        action = parts[1].upper() if len(parts) > 1 else ""
        if action not in ACTIONS:
            raise GrammarError("WHITELIST deve ser seguido de ADD, REMOVE ou LIST.", self.example, self.name)
        if action == "LIST":
            if len(parts) != 2:
                raise GrammarError("WHITELIST LIST não recebe parâmetros.", "WHITELIST LIST", self.name)
            return Command(self.name, {"action": "LIST"}, "WHITELIST LIST")
        if len(parts) != 3:
            raise GrammarError(f"WHITELIST {action} recebe exatamente um endereço.", self.example, self.name)
        address = parts[2].lower()
        if not valid_address(address):
            raise GrammarError(
                f"Endereço inválido: “{address[:60]}”. Use só letras, dígitos, . - _ + e um @.",
                self.example,
                self.name,
            )
        return Command(self.name, {"action": action, "address": address}, f"WHITELIST {action} {address}")

    def answer(self, cmd, ctx):
        action, address = cmd.params["action"], cmd.params.get("address", "")
        if action == "LIST":
            outcome, why = "listed", ""
        else:
            try:
                outcome, why = change(ctx.whitelist, ctx.store, action, address)
            except AthomeError as exc:  # no senders file configured, a file that cannot be written
                outcome, why = "refused", f"A lista não pôde ser alterada: {exc}"
            ctx.audit.record(
                "whitelist",
                action=action.lower(),
                address=address,
                outcome=outcome,
                reason=why,
                by=ctx.sender,
                request_id=ctx.request_id,
            )
        return Answer(
            "whitelist",
            {"action": action, "outcome": outcome, "why": why, "entries": listing(ctx.whitelist)},
        )
