"""The command registry: every command the mailbox accepts, one module each.

To add a command, write dispatcher/commands/<name>.py (a CommandSpec
subclass), its reply templates, its playbook, and list it in COMMANDS below.
"""

from __future__ import annotations

import re

from dispatcher import grammar
from dispatcher.commands.base import Command, CommandSpec
from dispatcher.commands.checkip import CheckIP
from dispatcher.commands.info import Help, Status
from dispatcher.commands.macchange import MacChange
from dispatcher.commands.ramais import Ramais
from dispatcher.errors import GrammarError

COMMANDS: dict[str, CommandSpec] = {
    spec.name: spec for spec in (Ramais(), CheckIP(), MacChange(), Help(), Status())
}
# Words that start a command without a '=' after them.
_BARE = {"HELP": "HELP", "AJUDA": "HELP", "STATUS": "STATUS"}

__all__ = ["COMMANDS", "Command", "CommandSpec", "parse", "spec_for"]


def spec_for(name: str) -> CommandSpec:
    return COMMANDS[name]


def examples() -> str:
    return "\n".join(spec.example for spec in COMMANDS.values())


def parse(text: str, ctx: grammar.ParseContext) -> Command:
    """Parse the command text (token already removed) into a validated Command."""
    text = text.strip()
    if not text:
        raise GrammarError("O assunto não traz nenhum comando depois do token.", examples())
    first = text.split(" ", 1)[0]
    head = re.match(r"[A-Za-z]*", first).group(0).upper()
    bare = head in _BARE and first.upper() == head
    spec = COMMANDS.get(_BARE[head]) if bare else COMMANDS.get(head)
    grammar.check_charset(text, spec.example if spec else examples())
    if spec is None or (spec.playbook is None and not bare):
        shown = first.split("=", 1)[0]
        raise GrammarError(f"Comando desconhecido: “{shown[:30]}”.", examples())
    return spec.parse(text, ctx)
