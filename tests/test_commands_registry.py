"""Every command of the registry, walked: its example parses, HELP shows it, its replies render."""

from __future__ import annotations

import pytest

from dispatcher import commands, grammar
from dispatcher.commands import ADMIN, ALWAYS, TOKEN
from dispatcher.replies import Replies
from tests.test_service import make  # noqa: F401 - fixture

HOSTS = {
    "gv2p": grammar.HostFacts("gv2p", frozenset({"sip_servers", "fail2ban_servers", "mac_servers"})),
    "voip1": grammar.HostFacts("voip1", frozenset({"sip_servers", "fail2ban_servers"})),
    "audio": grammar.HostFacts("audio", frozenset({"recordings"})),
}
CTX = grammar.ParseContext(hosts=HOSTS)
SPECS = list(commands.COMMANDS.values())


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_the_example_parses_and_every_head_word_reaches_the_command(spec):
    cmd = commands.parse(spec.example, CTX)
    assert cmd.name == spec.name
    assert spec.permission in (ALWAYS, TOKEN, ADMIN)
    for alias in spec.aliases:
        assert commands.parse(spec.example.replace(spec.name, alias, 1), CTX).name == spec.name
    assert (spec.playbook is None) == (type(spec).answer is not commands.CommandSpec.answer), (
        "a command has a playbook or an answer, not both, not neither"
    )


def test_help_lists_every_command_an_admin_may_run_and_hides_admin_ones_from_others(make):  # noqa: F811
    d = make()
    ctx = dict(sender="ana@example.test", request_id="r", specs=SPECS, jobs=d.jobs)
    ctx.update(whitelist=d.whitelist, store=d.auth_store, audit=d.audit)
    admin = commands.COMMANDS["HELP"].answer(
        commands.Command("HELP"), commands.AnswerContext(admin=True, **ctx)
    )
    other = commands.COMMANDS["HELP"].answer(
        commands.Command("HELP"), commands.AnswerContext(admin=False, **ctx)
    )
    text = Replies().render("help", **admin.values).text
    for spec in SPECS:
        assert spec.name in text and spec.example in text
    assert {s.name for s in other.values["commands"]} == {s.name for s in SPECS if s.permission != ADMIN}


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_every_reply_of_every_command_renders_in_text_and_html(spec, make):  # noqa: F811
    d = make()
    cmd = commands.parse(spec.example, CTX)
    replies = Replies()
    if spec.playbook is None:
        ctx = commands.AnswerContext(
            sender="ana@example.test", admin=True, request_id="r", specs=SPECS, jobs=d.jobs,
            whitelist=d.whitelist, store=d.auth_store, audit=d.audit,
        )  # fmt: skip
        answer = spec.answer(cmd, ctx)
        kinds = [(answer.template, answer.values)]
    else:
        result = {"status": "failed", "hosts": {}, "errors": ["a host failed"], "playbook": spec.playbook}
        values = dict(
            command=cmd.text, command_name=cmd.name, params=cmd.params, outcome="failed", result=result
        )
        kinds = [(spec.template, values), ("ack", dict(command=cmd.text, command_name=cmd.name, position=1))]
    for kind, values in kinds:
        rendered = replies.render(kind, request_id="20251111_171215_482913_a1", **values)
        assert rendered.subject and rendered.text.strip() and "<" in rendered.html


PING = """
from dispatcher.commands.base import ALWAYS, Answer, Command, CommandSpec


class Ping(CommandSpec):
    name = "PING"
    order = 1
    form = "words"
    permission = ALWAYS
    summary = "Responde pong."
    syntax = example = "PING"

    def parse(self, text, ctx):
        return Command(self.name, {}, "PING")

    def answer(self, cmd, ctx):
        return Answer("help", {"commands": [self]})
"""


def test_a_new_command_is_its_own_module_and_nothing_else(tmp_path, monkeypatch):
    """A module dropped into the package registers its command: the registry, decide()
    and HELP take it without a change anywhere else."""
    import sys
    from datetime import datetime, timezone

    from dispatcher import decide
    from dispatcher.auth import TokenStore
    from dispatcher.mail import Incoming

    (tmp_path / "ping.py").write_text(PING)
    monkeypatch.setattr(commands, "__path__", [*commands.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "dispatcher.commands.ping", raising=False)
    try:
        registry = commands._discover()
    finally:
        sys.modules.pop("dispatcher.commands.ping", None)
    assert list(registry)[0] == "PING" and set(registry) == {"PING", *commands.COMMANDS}
    monkeypatch.setattr(commands, "COMMANDS", registry)
    monkeypatch.setattr(commands, "_BY_HEAD", {h: s for s in registry.values() for h in s.heads})
    store = TokenStore(tmp_path / "tokens.json")
    store.key.get(create=True)
    _, token = store.add("ana", senders=["ana@example.test"])
    msg = Incoming(
        "1", "<m@x>", "ana@example.test", f"[{token}] PING", date="Tue, 04 Nov 2025 12:00:00 +0000"
    )
    ctx = decide.Context(
        now=datetime(2025, 11, 4, 12, 1, tzinfo=timezone.utc),
        policy=decide.Policy(ar_required=False),
        senders=frozenset({"ana@example.test"}),
        tokens=store.entries(),
        token_lookup=store.lookup,
        parse_context=CTX,
    )
    d = decide.decide(msg, ctx)
    assert d.action is decide.Action.ANSWER and d.command.name == "PING"
    answer = registry["HELP"].answer(
        commands.Command("HELP"),
        commands.AnswerContext(
            "ana@example.test", False, "r", list(registry.values()), None, None, None, None
        ),
    )
    help_text = Replies().render(answer.template, **answer.values).text
    assert "PING" in help_text and help_text.index("PING") < help_text.index("RAMAIS")


def test_every_reply_template_has_a_status_line():
    """The status (what happened) is each reply's first line: a template that fills a
    block the layout does not have (`subject`, before the status moved out of the
    subject) would send replies with an empty one."""
    import re
    from pathlib import Path

    folder = Path(commands.__file__).parent.parent / "templates"
    for path in sorted(folder.glob("[!_]*.txt.j2")):
        source, chain = path.read_text(), [path.name]
        while "{% block status %}" not in source:
            parent = re.search(r'{% extends "([^"]+)" %}', source)
            assert parent and parent.group(1) != "_layout.txt.j2", f"{' -> '.join(chain)}: no status block"
            chain.append(parent.group(1))
            source = (folder / parent.group(1)).read_text()
        assert "{% block subject %}" not in path.read_text(), path.name
