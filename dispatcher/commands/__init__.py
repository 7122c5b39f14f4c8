"""The command registry: every command the mailbox accepts, one module each.

To add a command, write dispatcher/commands/<name>.py (a CommandSpec
subclass: its head words, grammar, permission, and its playbook or `answer`),
its reply templates, its playbook if it has one, and list it in COMMANDS below.
"""

from __future__ import annotations

import re

from dispatcher import grammar
from dispatcher.commands.base import (
    ADMIN,
    ALWAYS,
    CONTROLLER,
    TOKEN,
    Answer,
    AnswerContext,
    Command,
    CommandSpec,
)
from dispatcher.commands.checkip import CheckIP
from dispatcher.commands.info import Help, Status
from dispatcher.commands.macchange import MacChange
from dispatcher.commands.ramais import Ramais
from dispatcher.commands.whitelist import Whitelist
from dispatcher.errors import GrammarError

COMMANDS: dict[str, CommandSpec] = {
    spec.name: spec for spec in (Ramais(), CheckIP(), MacChange(), Help(), Status(), Whitelist())
}
_BY_HEAD = {head: spec for spec in COMMANDS.values() for head in spec.heads}

__all__ = [
    "ADMIN",
    "ALWAYS",
    "COMMANDS",
    "CONTROLLER",
    "TOKEN",
    "Answer",
    "AnswerContext",
    "Command",
    "CommandSpec",
    "parse",
    "spec_for",
]


def spec_for(name: str) -> CommandSpec:
    return COMMANDS[name]


def examples() -> str:
    return "\n".join(spec.example for spec in COMMANDS.values() if spec.permission != ADMIN)


def parse(text: str, ctx: grammar.ParseContext) -> Command:
    """Parse the command text (token already removed) into a validated Command."""
    text = text.strip()
    if not text:
        raise GrammarError("O assunto não traz nenhum comando depois do token.", examples())
    first = text.split(" ", 1)[0]
    head = re.match(r"[A-Za-z]*", first).group(0).upper()
    spec = _BY_HEAD.get(head)
    if spec is not None and spec.form == "words" and first.upper() != head:
        spec = None  # 'HELP=1', 'STATUSX': a word command is its head word alone
    grammar.check_charset(text, spec.example if spec else examples(), spec.extra_chars if spec else "")
    if spec is None:
        shown = first.split("=", 1)[0]
        raise GrammarError(f"Comando desconhecido: “{shown[:30]}”.", examples())
    return spec.parse(text, ctx)
