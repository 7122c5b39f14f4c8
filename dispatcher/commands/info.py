"""HELP and STATUS <id>: answered by the dispatcher itself, no playbook."""

from __future__ import annotations

from dispatcher import grammar
from dispatcher.commands.base import ADMIN, ALWAYS, Answer, Command, CommandSpec
from dispatcher.errors import GrammarError


class Help(CommandSpec):
    name = "HELP"
    order = 80
    aliases = ("AJUDA",)
    form = "words"
    permission = ALWAYS
    summary = "Responde com a lista de comandos e exemplos."
    syntax = "HELP"
    example = "HELP"
    template = "help"

    def parse(self, text, ctx):
        if text.strip().upper() not in self.heads:
            raise GrammarError("HELP não recebe parâmetros.", self.example, self.name)
        return Command(self.name, {}, "HELP")

    def answer(self, cmd, ctx):
        specs = [s for s in ctx.specs if s.permission != ADMIN or ctx.admin]
        return Answer("help", {"commands": specs})


class Status(CommandSpec):
    name = "STATUS"
    order = 85
    form = "words"
    permission = ALWAYS
    summary = "Mostra a situação de um pedido pelo seu identificador."
    syntax = "STATUS <identificador do pedido>"
    example = "STATUS 20251111_171215_482913_a1"
    template = "status"

    def parse(self, text, ctx):
        parts = text.split()
        if len(parts) != 2:
            raise GrammarError(
                "STATUS recebe exatamente um identificador de pedido.", self.example, self.name
            )
        request_id = grammar.parse_request_id(parts[1], self.example)
        return Command(self.name, {"request_id": request_id}, f"STATUS {request_id}")

    def answer(self, cmd, ctx):
        asked = cmd.params["request_id"]
        job = ctx.jobs.find(asked)
        if job is not None and job.payload.get("requester") != ctx.sender and not ctx.admin:
            job = None  # nobody reads somebody else's requests (an admin token may)
        position = ctx.jobs.position(asked) if job else 0
        return Answer("status", {"asked_id": asked, "job": job, "position": position})
