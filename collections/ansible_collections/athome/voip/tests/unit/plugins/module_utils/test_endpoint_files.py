# -*- coding: utf-8 -*-
# Copyright: athome-ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The endpoint file rules (module_utils/endpoint_files.py) and the endpoint_mac plan on the
four layouts of endpoints_sip.def in fixtures/endpoints, on every interpreter a MAC server
may run (`ansible-test units`: Python 2.7, 3.6 and the controller's).

Layouts, all holding the same 40 extensions and MACs as fixtures/endpoints/__ENDPOINTS__.DEF:
  semicolon  3010;MAC:...;MODEL:...      (the first guess; # comments)
  pipe       3010|Name|Vendor|Model|MAC:...|TEMPLATE:...|ACCOUNT:SIP3010|STATUS:on  (; comments)
  section    [3010] then MAC:... (or MAC = ...) on a line of the section  (; comments)
  comment    3010,Name,model,1 ; MAC:...  with , tab or spaces between fields (# and ; comments)
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import io
import os

import pytest

from ansible_collections.athome.voip.plugins.module_utils import endpoint_files as ef
from ansible_collections.athome.voip.plugins.modules import endpoint_mac as em

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "endpoints")
LAYOUTS = ("semicolon", "pipe", "section", "comment")
RULES = ef.all_rules()


def read(name):
    with io.open(os.path.join(FIXTURES, name), "rb") as handle:
        return handle.read().decode("latin-1")


DEF = read("__ENDPOINTS__.DEF")


def sip(layout):
    return read("endpoints_sip.%s.def" % layout)


def macs(text, key):
    return dict((r.ext, r.mac) for r in ef.parse_records(text, RULES[key]))


DEF_MACS = macs(DEF, "endpoints_def")


def test_the_def_fixture_is_what_the_layouts_are_compared_with():
    assert len(DEF_MACS) == 40
    assert DEF_MACS["3010"] == "010203040506" and DEF_MACS["2010"] == ""
    assert DEF_MACS["4021"] == "0C383E752E60" and "3099" not in DEF_MACS


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_parses_to_the_same_extensions_and_macs(layout):
    assert macs(sip(layout), "endpoints_sip") == DEF_MACS


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_surveys_clean(layout):
    found = ef.survey(sip(layout), RULES["endpoints_sip"])
    assert found["records"] == 40
    assert found["duplicate_extensions"] == [] and found["duplicate_macs"] == {}
    assert found["bad_records"] == [] and found["unparsed"] == [] and found["unparsed_count"] == 0
    assert found["without_mac"] == ["2010"]
    assert ef.compare({"endpoints_def": ef.survey(DEF, RULES["endpoints_def"]), "endpoints_sip": found}) == {
        "endpoints_def": [], "endpoints_sip": []}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ext, current, new, written", [
    ("3010", "010203040506", "010203040599", "010203040599"),  # replace
    ("3011", "0004F263E772", "", "None"),  # remove (MAC: value, MAC = value in the section layout)
    ("2010", "", "010203040588", "010203040588"),  # add
    ("4021", "0C383E752E60", "0C383E752E61", "0C383E752E61"),  # next to an OLDMAC
    ("4004", "000B825E0E67", "000B825E0E68", "000B825E0E68"),  # blanks around the separators
])
def test_a_change_writes_only_the_mac_value_in_every_layout(layout, ext, current, new, written):
    text = sip(layout)
    plan = em.plan_change({"endpoints_def": DEF, "endpoints_sip": text}, ext, current, new)
    assert plan["changed"] is True
    after = plan["files"]["endpoints_sip"]["text"]
    old_value = [r for r in ef.parse_records(text, RULES["endpoints_sip"]) if r.ext == ext][0]
    assert after == text[:old_value.start] + written + text[old_value.end:]
    want = dict(DEF_MACS)
    want[ext] = new
    assert macs(after, "endpoints_sip") == want
    assert written in plan["files"]["endpoints_sip"]["after"]


def test_comment_lines_in_either_style_are_not_records():
    text = "#3098;MAC:0004F2ABCDEE\n;3099|MAC:0004F2ABCDEF\n  ; [3097]\n3010;MAC:010203040506\n"
    assert macs(text, "endpoints_sip") == {"3010": "010203040506"}
    assert ef.survey(text, RULES["endpoints_sip"])["unparsed"] == []


def test_oldmac_and_other_keys_do_not_match():
    text = "4021|OLDMAC:0C383E000001|XMAC:0C383E000002|MAC:0C383E752E60\n"
    (rec,) = ef.parse_records(text, RULES["endpoints_sip"])
    assert rec.mac == "0C383E752E60" and rec.count == 1


def test_crlf_lines_and_a_missing_final_newline():
    text = "3010;MAC:010203040506\r\n3011 | MAC:0004F263E772\r\n[3012]\r\nMAC:C074AD938F6B"
    assert macs(text, "endpoints_sip") == {
        "3010": "010203040506", "3011": "0004F263E772", "3012": "C074AD938F6B"}


def test_a_section_runs_to_the_next_header_and_its_comment_lines_do_not_count():
    text = "[3010]\nMAC:010203040506\n; MAC:0000000000AA (old phone)\nmodel=x\n[general]\nMAC:0000000000BB\n"
    (rec,) = ef.parse_records(text, RULES["endpoints_sip"])
    assert rec.ext == "3010" and rec.mac == "010203040506" and rec.count == 1


def test_the_survey_reports_what_did_not_parse_and_what_disagrees():
    broken = sip("pipe") + "\n".join([
        "ext=3050|MAC:0004F2000001",  # looks like a record, is not one
        "3051|Novo|MAC:805EC09B49F3",  # a MAC 2001 already has; only in this file
        "3052|Quebrado|MAC:xyz",  # not a MAC
        "3053|Sem campo",  # no MAC field
        "2002|Outra|MAC:0C383ECAC826",  # 2002 twice
        "30x4|MAC:0004F2000002",  # not an extension
    ]) + "\n"
    found = ef.survey(broken, RULES["endpoints_sip"])
    assert [u["text"] for u in found["unparsed"]] == ["ext=3050|MAC:0004F2000001", "30x4|MAC:0004F2000002"]
    assert found["unparsed_count"] == 2 and all(u["line"] > 40 for u in found["unparsed"])
    assert found["duplicate_macs"] == {"805EC09B49F3": ["2001", "3051"]}
    assert found["duplicate_extensions"] == ["2002"]
    assert [(b["extension"], b["holds"]) for b in found["bad_records"]] == [
        ("3052", "'xyz', which is not a MAC"), ("3053", "a record without a MAC field")]
    assert found["bad_records"][0]["text"] == "3052|Quebrado|MAC:xyz"
    only = ef.compare({"endpoints_def": ef.survey(DEF, RULES["endpoints_def"]), "endpoints_sip": found})
    assert only == {"endpoints_def": [], "endpoints_sip": ["3051", "3052", "3053"]}
    capped = ef.survey(broken, RULES["endpoints_sip"], cap=1)
    assert len(capped["unparsed"]) == 1 and capped["unparsed_count"] == 2


def test_a_site_rule_replaces_one_entry_and_keeps_the_others():
    # a layout the default cannot read: the extension in the second field
    text = "linha1;3010;Sala;MAC:010203040506\nlinha2;3011;Juridico;MAC:None\n"
    assert macs(text, "endpoints_sip") == {}
    assert ef.survey(text, RULES["endpoints_sip"])["unparsed_count"] == 2
    rules = ef.all_rules({"endpoints_sip": {"record": [r"^[^;\r\n]*;(?P<ext>[0-9]+)(?P<body>[^\r\n]*)"]}})
    assert dict((r.ext, r.mac) for r in ef.parse_records(text, rules["endpoints_sip"])) == {
        "3010": "010203040506", "3011": ""}
    assert rules["endpoints_sip"]["empty"] == ("None", "")  # not overridden: the default
    plan = em.plan_change({"endpoints_def": DEF, "endpoints_sip": text}, "3010", "010203040506",
                          "010203040599", rules)
    assert plan["files"]["endpoints_sip"]["text"].startswith("linha1;3010;Sala;MAC:010203040599\n")


@pytest.mark.parametrize("overrides, message", [
    ({"endpoints_sip": {"record": [r"^(?P<ext>[0-9]+)"]}}, "lacks the named group(s) (?P<body>...)"),
    ({"endpoints_sip": {"mac": r"MAC:(?P<mac>[0-9A-F"}}, "rules.endpoints_sip.mac"),
    ({"endpoints_sip": {"macs": "x"}}, "rules.endpoints_sip.macs: unknown"),
    ({"endpoints_sip": {"empty": "None"}}, "must be a list"),
    ({"endpoints.sip": {}}, "unknown file key(s) endpoints.sip"),
])
def test_bad_rules_are_refused_naming_the_entry(overrides, message):
    with pytest.raises(ValueError) as info:
        ef.all_rules(overrides)
    assert message in str(info.value)


def test_none_entries_keep_the_default():
    """An argument spec fills the entries a site did not give with None."""
    rules = ef.all_rules({"endpoints_sip": {"record": None, "mac": None, "empty": None,
                                            "comment": None, "candidate": None}, "endpoints_def": None})
    assert macs(sip("section"), "endpoints_sip") == DEF_MACS
    assert [r.pattern for r in rules["endpoints_sip"]["record"]] == ef.RULES["endpoints_sip"]["record"]
