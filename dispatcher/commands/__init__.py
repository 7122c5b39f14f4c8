"""The command registry: every command the mailbox accepts, one module each.

To add a command, write dispatcher/commands/<name>.py (a CommandSpec
subclass: its head words, grammar, permission, and its playbook or `answer`),
its reply templates, and its playbook if it has one. Nothing else: every
CommandSpec subclass defined in a module of this package is registered, in
the order of its `order` (the order of HELP).
"""

from __future__ import annotations

import importlib
import pkgutil
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
from dispatcher.errors import GrammarError


def _discover() -> dict[str, CommandSpec]:
    """One instance of every CommandSpec subclass defined in this package's modules."""
    specs: list[CommandSpec] = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        specs.extend(
            obj()
            for obj in vars(module).values()
            if isinstance(obj, type)
            and issubclass(obj, CommandSpec)
            and obj.__module__ == module.__name__
            and obj.name
        )
    specs.sort(key=lambda spec: (spec.order, spec.name))
    heads: dict[str, str] = {}
    for spec in specs:
        for head in spec.heads:
            if head in heads:  # a programming error: fail at import, in every test
                raise RuntimeError(f"head word {head} of {spec.name} is {heads[head]}'s already")
            heads[head] = spec.name
    return {spec.name: spec for spec in specs}


COMMANDS: dict[str, CommandSpec] = _discover()
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
