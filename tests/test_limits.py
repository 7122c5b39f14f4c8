"""Limits tied together: whatever the email grammar accepts, the playbook accepts, and whatever
the playbook accepts, the module accepts, for extensions, MACs, windows and IPs.

A request that passes the grammar must never fail later with a raw assert message: the
requester would get an operator's English instead of a reply saying what to fix. Each
property draws inputs with hypothesis, and for every input the grammar accepts it checks
- the playbook: the very `assert` conditions of its localhost play (and of the role's
  validate tasks), read from the YAML and evaluated by ansible-core's own Conditional, with
  the extravars the dispatcher would pass (Command.extravars);
- the module: its pure checks (the endpoint_mac module's, module_utils/recordings.py's,
  module_utils/fail2ban.py's), loaded from the collection.
"""

from __future__ import annotations

import importlib.util
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml
from ansible.errors import AnsibleError
from ansible.parsing.dataloader import DataLoader
from ansible.playbook.conditional import Conditional
from ansible.template import Templar
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from dispatcher import commands, grammar
from dispatcher.commands.ramais import MAX_EXTENSIONS
from dispatcher.errors import GrammarError
from tests import recordings_support as rs
from tests.collection_paths import FILTERS, MODULE_UTILS, REPO, ROLES, load_module

CTX = grammar.ParseContext(
    hosts={
        "voip1": grammar.HostFacts("voip1", frozenset({"sip_servers"})),
        "gv2p": grammar.HostFacts("gv2p", frozenset({"sip_servers", "mac_servers"})),
    },
    max_window_days=31,
)
INVENTORY = {  # what the playbooks' host checks see for those hosts
    "groups": {"sip_servers": ["voip1", "gv2p"], "mac_servers": ["gv2p"], "recordings": ["audio"]},
    "hostvars": {"voip1": {"audios_from": "audio"}, "gv2p": {"audios_from": "s3"}, "audio": {}},
}


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


endpoint_mac = load_module("endpoint_mac", "endpoint_files")
fail2ban = _load("limits_fail2ban", MODULE_UTILS / "fail2ban.py")
ip_filter = _load("limits_ip_filter", FILTERS / "fail2ban_whitelist.py")
recordings = rs.helpers()
RECORDINGS_MAX_DAYS = yaml.safe_load((ROLES / "recordings" / "defaults" / "main.yml").read_text())[
    "recordings_max_days"
]


def _listed(value) -> list[str]:
    return value if isinstance(value, list) else [value]


def _asserts(tasks: list[dict]) -> list[tuple[list[str], list[str]]]:
    """(that, when) of each assert task of a task list."""
    return [
        (_listed(task["ansible.builtin.assert"]["that"]), _listed(task.get("when", [])))
        for task in tasks
        if "ansible.builtin.assert" in task
    ]


def playbook_asserts(name: str) -> list[tuple[list[str], list[str]]]:
    """The input asserts of a playbook's first play (the localhost check)."""
    plays = yaml.safe_load((REPO / "playbooks" / name).read_text())
    assert plays[0]["hosts"] == "localhost", name
    found = _asserts(plays[0]["tasks"])
    assert found, f"{name} has no input assert"
    return found


def role_asserts(role: str) -> list[tuple[list[str], list[str]]]:
    return _asserts(yaml.safe_load((ROLES / role / "tasks" / "validate.yml").read_text()))


AUDIOS = playbook_asserts("audios.yml")
MACCHANGE = playbook_asserts("macchange.yml")
ENDPOINT_MAC_ROLE = role_asserts("endpoint_mac")


def _holds(conditions: list[str], templar: Templar) -> bool:
    cond = Conditional(loader=templar._loader)
    cond.when = list(conditions)
    return cond.evaluate_conditional(templar, templar.available_variables)


def passes(asserts: list[tuple[list[str], list[str]]], variables: dict) -> bool:
    """Every assert that runs holds, as ansible.builtin.assert evaluates it (ansible-core 2.16).

    An assert whose `when` names what these variables do not have (the recordings worker,
    chosen by a set_fact) is about the inventory, not the request: not evaluated."""
    templar = Templar(loader=DataLoader(), variables={**INVENTORY, **variables})
    for that, when in asserts:
        try:
            if when and not _holds(when, templar):
                continue
        except AnsibleError as exc:
            if "is undefined" in str(exc):
                continue
            raise
        try:
            if not _holds(that, templar):
                return False
        except Exception:  # to_datetime on a bad date: the assert task fails too
            return False
    return True


def extravars(subject_text: str) -> dict:
    cmd = commands.parse(subject_text, CTX)
    return commands.COMMANDS[cmd.name].extravars(cmd, "20251104_120000_000001_ab", "ops@example.com")


def test_the_asserts_are_really_evaluated():
    """The harness can fail: a request the playbook refuses is seen as refused."""
    good = extravars("RAMAIS=1121 SERVER=voip1 INICIO=04/11/2025 12:00 FIM=04/11/2025 12:00")
    assert passes(AUDIOS, good)
    assert not passes(AUDIOS, {**good, "extensions": [str(1000 + i) for i in range(51)]})
    assert not passes(AUDIOS, {**good, "start": "0001-11-04 12:00"})
    assert not passes(AUDIOS, {**good, "start": "2025-11-04 12:01"})
    assert not passes(AUDIOS, {**good, "end": "2025-02-30 12:00"})
    mac = extravars("MACCHANGE=3010 MACATUAL=010203040506 MACFUTURO= SERVER=gv2p")
    assert passes(MACCHANGE, mac) and passes(ENDPOINT_MAC_ROLE, role_vars(mac))
    assert not passes(MACCHANGE, {**mac, "mac_current": "0102030405"})
    assert not passes(MACCHANGE, {**mac, "target": "voip1"})
    assert passes(MACCHANGE, {"probe": True}) and not passes(MACCHANGE, {"probe": True, "target": "voip1"})
    assert not passes(MACCHANGE, {k: v for k, v in mac.items() if k != "target"})


# ------------------------------------------------------------------ extensions

digits = st.text(alphabet="0123456789", min_size=0, max_size=12)
extension_lists = st.lists(digits, min_size=0, max_size=60).map(",".join) | st.text(
    alphabet="0123456789, ", max_size=80
)


@settings(max_examples=100, deadline=None)
@given(extension_lists)
@example(",".join(str(1000 + i) for i in range(50)))
@example(",".join(str(1000 + i) for i in range(51)))
def test_ramais_extensions_accepted_by_the_grammar_pass_the_playbook_and_the_module(value):
    text = f"RAMAIS={value} SERVER=voip1 INICIO=04/11/2025 12:00 FIM=04/11/2025 13:00"
    try:
        variables = extravars(text)
    except GrammarError as exc:
        assert exc.example and exc.command == "RAMAIS"
        return
    assert len(variables["extensions"]) <= MAX_EXTENSIONS
    assert passes(AUDIOS, variables)
    assert recordings.normalize_extensions(variables["extensions"]) == variables["extensions"]


def test_more_than_50_extensions_are_refused_by_the_grammar_naming_the_limit():
    many = ",".join(str(1000 + i) for i in range(MAX_EXTENSIONS + 1))
    with pytest.raises(GrammarError) as info:
        extravars(f"RAMAIS={many} SERVER=voip1 INICIO=04/11/2025 12:00 FIM=04/11/2025 13:00")
    assert "51 ramais" in info.value.message and "máximo por pedido é 50" in info.value.message
    assert info.value.example.startswith("RAMAIS=1121,1122 SERVER=")
    one = extravars("RAMAIS=1121 SERVER=voip1 INICIO=04/11/2025 12:00 FIM=04/11/2025 13:00")
    assert not passes(AUDIOS, {**one, "extensions": many.split(",")})


@settings(max_examples=60, deadline=None)
@given(digits)
def test_macchange_extension_accepted_by_the_grammar_passes_the_playbook_and_the_module(value):
    try:
        variables = extravars(f"MACCHANGE={value} MACATUAL=010203040506 SERVER=gv2p")
    except GrammarError:
        return
    assert passes(MACCHANGE, variables) and passes(ENDPOINT_MAC_ROLE, role_vars(variables))
    assert endpoint_mac.EXTENSION_RE.match(variables["extension"])


# ------------------------------------------------------------------------ MACs


def role_vars(variables: dict) -> dict:
    """What playbooks/macchange.yml passes to the endpoint_mac role."""
    return {
        "endpoint_mac_extension": str(variables["extension"]),
        "endpoint_mac_current": variables.get("mac_current", ""),
        "endpoint_mac_new": variables.get("mac_new", ""),
    }


macs = st.text(alphabet="0123456789abcdefABCDEFxX:-. ", max_size=20) | st.from_regex(
    r"\A[0-9A-Fa-f]{2}([:\-]?)([0-9A-Fa-f]{2}\1){4}[0-9A-Fa-f]{2}\Z"
)


@settings(max_examples=120, deadline=None)
@given(macs, macs)
@example("01:02:03:04:05:06", "")
@example("", "0a-0b-0c-0d-0e-0f")
def test_macs_accepted_by_the_grammar_pass_the_playbook_and_the_module(current, new):
    try:
        variables = extravars(f"MACCHANGE=3010 MACATUAL={current} MACFUTURO={new} SERVER=gv2p")
    except GrammarError as exc:
        assert exc.example and exc.command == "MACCHANGE"
        return
    assert passes(MACCHANGE, variables) and passes(ENDPOINT_MAC_ROLE, role_vars(variables))
    for mac in (variables["mac_current"], variables["mac_new"]):
        assert endpoint_mac.normalize_mac(mac) == mac
    # the module's own request checks (before it reads any file) pass too
    with pytest.raises(endpoint_mac.MacChangeError) as info:
        endpoint_mac.plan_change(
            {"endpoints_def": "", "endpoints_sip": ""},
            variables["extension"],
            variables["mac_current"],
            variables["mac_new"],
        )
    assert info.value.reason == "not_found"


# --------------------------------------------------------------------- windows

moments = st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59))
near = st.integers(min_value=-120, max_value=50 * 24 * 60)


def human(moment: datetime) -> str:
    return f"{moment.day:02d}/{moment.month:02d}/{moment.year:04d} {moment.hour:02d}:{moment.minute:02d}"


@settings(max_examples=150, deadline=None)
@given(moments, near, st.booleans())
@example(datetime(2025, 11, 4, 12, 0), 0, True)
@example(datetime(1, 1, 1, 0, 0), 10, True)
@example(datetime(2099, 12, 31, 23, 0), 59, True)
@example(datetime(2025, 11, 4, 12, 0), 31 * 24 * 60, True)
def test_windows_accepted_by_the_grammar_pass_the_playbook_and_the_module(start, minutes, recent):
    if recent:  # most draws inside the years a request can name, so many are accepted
        start = start.replace(year=1995 + start.year % 110)
    try:
        end = start + timedelta(minutes=minutes)
    except OverflowError:
        assume(False)
    try:
        variables = extravars(f"RAMAIS=1121 SERVER=voip1 INICIO={human(start)} FIM={human(end)}")
    except GrammarError as exc:
        assert exc.example and exc.command == "RAMAIS"
        return
    assert passes(AUDIOS, variables), variables
    window = recordings.Window(variables["start"], variables["end"], RECORDINGS_MAX_DAYS)
    first = start.strftime("%Y%m%d%H%M") + "00"
    last = end.strftime("%Y%m%d%H%M") + "59"
    assert window.contains(first) and window.contains(last)
    assert recordings.day_dirs(window.days())[0] == start.strftime("%Y/%m/%d")


def test_a_one_minute_window_runs_everywhere():
    variables = extravars("RAMAIS=1121 SERVER=voip1 INICIO=04/11/2025 12:00 FIM=04/11/2025 12:00")
    assert variables["start"] == variables["end"] == "2025-11-04 12:00"
    assert passes(AUDIOS, variables)
    window = recordings.Window(variables["start"], variables["end"], RECORDINGS_MAX_DAYS)
    assert window.contains("20251104120000") and window.contains("20251104120059")
    assert not window.contains("20251104115959") and not window.contains("20251104120100")


@pytest.mark.parametrize("year", ["0001", "1999", "2100", "9999"])
def test_years_outside_2000_2099_are_refused_by_the_grammar_with_an_example(year):
    with pytest.raises(GrammarError) as info:
        extravars(f"RAMAIS=1121 SERVER=voip1 INICIO=04/11/{year} 12:00 FIM=04/11/2025 12:00")
    assert f"ano {year}" in info.value.message and "entre 2000 e 2099" in info.value.message
    assert "INICIO=01/11/2025 00:00" in info.value.example


def test_the_grammar_window_fits_the_recordings_module_limit():
    """max_window_days is counted in whole days from INICIO; the module counts the calendar
    days the window touches, one more at most."""
    assert CTX.max_window_days + 1 <= RECORDINGS_MAX_DAYS


# -------------------------------------------------------------------------- IPs


@settings(max_examples=300, deadline=None)
@given(st.ip_addresses() | st.text(alphabet="0123456789abcdef.:/%", max_size=45))
def test_ips_accepted_by_the_grammar_pass_the_role_check_and_the_module(value):
    text = str(value)
    try:
        ip = extravars(f"CHECKIP={text}")["ip"]
    except GrammarError:
        return
    # playbooks/unban.yml and whitelist.yml check through the role's filter
    assert ip_filter.ip_problem(ip) == ""
    assert ip_filter.ip_normalize(ip) == ip
    assert fail2ban.is_single_address(ip)
    # what the grammar accepts in the raw text, the filter accepts as typed too
    assert ip_filter.ip_problem(text) == "" and ip_filter.ip_normalize(text) == ip


def test_unban_and_whitelist_validate_through_that_filter():
    validate = (ROLES / "fail2ban_whitelist" / "tasks" / "validate.yml").read_text()
    assert "athome.voip.fail2ban_whitelist_ip_problem" in validate
    for name in ("unban.yml", "whitelist.yml"):
        first = yaml.safe_load((REPO / "playbooks" / name).read_text())[0]
        assert first["hosts"] == "localhost"
        include = first["tasks"][0]["ansible.builtin.include_role"]
        assert include == {"name": "athome.voip.fail2ban_whitelist", "tasks_from": "validate.yml"}


def test_extravars_reach_the_playbook_as_the_text_the_grammar_made(tmp_path):
    """A MAC or an extension with a leading zero stays text on its way to ansible-playbook:
    ansible-core 2.19 read `!unsafe '010203040506'` as an octal integer, quoted or not."""
    from dispatcher.runner import write_extravars

    sent = extravars("MACCHANGE=0010 MACATUAL=010203040506 MACFUTURO=0A0203040599 SERVER=gv2p")
    path = write_extravars(tmp_path, sent)
    text = path.read_text()
    assert "mac_current: '010203040506'" in text and "extension: '0010'" in text
    assert "mac_new: !unsafe '0A0203040599'" in text  # not a number: tagged as before
    loaded = DataLoader().load_from_file(str(path))
    assert {k: str(v) if isinstance(v, str) else v for k, v in loaded.items()} == sent
    assert passes(MACCHANGE, loaded)
