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
