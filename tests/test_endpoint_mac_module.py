"""Unit tests of the endpoint_mac module's pure helpers, on the realistic fixtures.

The module file is imported by path (plugins/modules of the athome.voip collection).
File-level helpers (atomic write, backups) run on real files here.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.collection_paths import MODULES, load_module_utils
from tests.collection_paths import load_module as load_module_from_collection

REPO = Path(__file__).resolve().parent.parent
MODULE_PATH = MODULES / "endpoint_mac.py"
FIXTURES = REPO / "tests" / "fixtures" / "endpoints"


def load_module():
    return load_module_from_collection("endpoint_mac", "endpoint_files")


em = load_module()
ef = load_module_utils("endpoint_files")
DEF = (FIXTURES / "__ENDPOINTS__.DEF").read_bytes().decode("latin-1")
SIP = (FIXTURES / "endpoints_sip.def").read_bytes().decode("latin-1")
TEXTS = {"endpoints_def": DEF, "endpoints_sip": SIP}
DEF_RULES = em.FILE_RULES["endpoints_def"]
SIP_RULES = em.FILE_RULES["endpoints_sip"]


def records(key="endpoints_def", text=None):
    return em.parse_records(TEXTS[key] if text is None else text, em.FILE_RULES[key])


# ------------------------------------------------------------------ normalising


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("010203040506", "010203040506"),
        ("01:02:03:04:05:0a", "01020304050A"),
        ("01-02-03-04-05-0A", "01020304050A"),
        ("0102.0304.050a", "01020304050A"),
        (" 0102030405ab ", "0102030405AB"),
        ("", ""),
        (None, ""),
    ],
)
def test_normalize_mac_accepts_common_spellings(raw, expected):
    assert em.normalize_mac(raw) == expected


@pytest.mark.parametrize("raw", ["1", "0102030405", "01020304050G", "0102030405060", "None"])
def test_normalize_mac_rejects_what_is_not_a_mac(raw):
    with pytest.raises(ValueError, match="not a MAC"):
        em.normalize_mac(raw)


@given(st.binary(min_size=6, max_size=6), st.sampled_from(["", ":", "-"]), st.booleans())
@settings(max_examples=200, deadline=None)
def test_normalize_mac_round_trips_any_address(octets, sep, lower):
    text = sep.join(format(b, "02x" if lower else "02X") for b in octets)
    assert em.normalize_mac(text) == octets.hex().upper()


def test_read_mac_knows_each_files_empty_spelling():
    assert ef.read_mac("", DEF_RULES) == ""
    assert ef.read_mac("None", SIP_RULES) == ""
    assert ef.read_mac("None", DEF_RULES) is None  # a DEF record says '' for "no MAC"
    assert ef.read_mac("00156517b784", DEF_RULES) == "00156517B784"
    assert ef.read_mac("garbage", SIP_RULES) is None


# --------------------------------------------------------------------- parsing


def test_fixtures_have_dozens_of_records_that_agree():
    defs, sips = records("endpoints_def"), records("endpoints_sip")
    assert len(defs) == len(sips) == 40
    assert [(r.ext, r.mac) for r in defs] == [(r.ext, r.mac) for r in sips]
    assert all(r.count == 1 for r in defs + sips)
    by_ext = {r.ext: r.mac for r in defs}
    assert by_ext["3010"] == "010203040506"
    assert by_ext["2010"] == ""
    assert by_ext["1013010"] == "000B8293F758"  # 7-digit extension, multi-line record


def test_parsing_ignores_comments_and_look_alike_fields():
    for key in ("endpoints_def", "endpoints_sip"):
        recs = {r.ext: r for r in records(key)}
        assert "3099" not in recs  # commented-out record
        assert recs["4021"].mac == "0C383E752E60"  # not old_serialnumber / OLDMAC
    def_recs = {r.ext: r for r in records("endpoints_def")}
    assert def_recs["3022"].raw == "00156517b784"  # lower case as written
    assert def_recs["3022"].mac == "00156517B784"
    assert DEF[def_recs["2012"].start - 1] == '"'  # double-quoted record found
    sip_recs = {r.ext: r for r in records("endpoints_sip")}
    assert sip_recs["3011"].raw == "0004F263E772"  # "MAC: value" with a blank


def test_record_without_mac_field_is_reported():
    text = "X = {\n    '2001': {'model': 'yealink_t46s'},\n}\n"
    (rec,) = em.parse_records(text, DEF_RULES)
    assert rec.count == 0 and rec.mac is None
    assert em.describe(DEF_RULES, [rec]) == "a record without a MAC field"


def test_mask_comments_keeps_offsets():
    text = "a\n  # c 'x'\nb\n"
    masked = ef.mask_comments(text)
    assert len(masked) == len(text)
    assert masked.splitlines()[1].strip() == ""
    assert masked.splitlines()[2] == "b"


# -------------------------------------------------------------------- planning


def expected_after(text, old, new):
    assert text.count(old) == 1, old
    return text.replace(old, new)


def test_replace_changes_only_the_two_values():
    plan = em.plan_change(TEXTS, "3010", "010203040506", "01:02:03:04:05:99")
    assert plan["operation"] == "replace" and plan["changed"]
    assert plan["mac_new"] == "010203040599"
    files = plan["files"]
    assert files["endpoints_def"]["text"] == expected_after(
        DEF, "'serialnumber': '010203040506'", "'serialnumber': '010203040599'"
    )
    assert files["endpoints_sip"]["text"] == expected_after(
        SIP, "3010;MAC:010203040506;", "3010;MAC:010203040599;"
    )
    assert files["endpoints_def"]["before"] == "'serialnumber': '010203040506',"
    assert files["endpoints_def"]["after"] == "'serialnumber': '010203040599',"
    assert files["endpoints_sip"]["after"].startswith("3010;MAC:010203040599;MODEL:")
    assert plan["warnings"] == []


def test_remove_writes_each_files_empty_value():
    plan = em.plan_change(TEXTS, "3010", "010203040506", "")
    assert plan["operation"] == "remove"
    assert "'serialnumber': ''," in plan["files"]["endpoints_def"]["after"]
    assert plan["files"]["endpoints_sip"]["after"].startswith("3010;MAC:None;")


def test_add_warns_about_other_extensions_without_mac():
    removed = em.plan_change(TEXTS, "3010", "010203040506", "")["files"]
    texts = {k: v["text"] for k, v in removed.items()}
    plan = em.plan_change(texts, "3010", "", "010203040588")
    assert plan["operation"] == "add" and plan["changed"]
    assert plan["warnings"] == ["other extensions also have no MAC: 2010"]
    assert plan["files"]["endpoints_sip"]["text"] == expected_after(
        SIP, "3010;MAC:010203040506;", "3010;MAC:010203040588;"
    )


def test_target_state_already_there_is_not_a_change():
    texts = {
        k: v["text"]
        for k, v in em.plan_change(TEXTS, "3010", "010203040506", "010203040599")["files"].items()
    }
    again = em.plan_change(texts, "3010", "010203040506", "010203040599")
    assert again["changed"] is False
    assert again["files"]["endpoints_def"]["text"] == texts["endpoints_def"]


@pytest.mark.parametrize("done", ["endpoints_def", "endpoints_sip"])
def test_a_change_cut_short_between_the_two_files_is_completed(done):
    """Killed between its two renames, a change leaves one file with the new MAC: the same
    request again writes only the other one, and says so."""
    target = em.plan_change(TEXTS, "3010", "010203040506", "010203040599")["files"]
    texts = dict(TEXTS, **{done: target[done]["text"]})
    plan = em.plan_change(texts, "3010", "010203040506", "010203040599")
    left = "endpoints_sip" if done == "endpoints_def" else "endpoints_def"
    assert plan["changed"] and plan["files"][done]["changed"] is False and plan["files"][left]["changed"]
    assert {k: v["text"] for k, v in plan["files"].items()} == {k: v["text"] for k, v in target.items()}
    [warning] = plan["warnings"]
    label = em.FILE_RULES[done]["label"]
    other = em.FILE_RULES[left]["label"]
    assert warning == f"{label} already held 010203040599 (a change cut short): only {other} was changed"


def test_a_removal_cut_short_is_completed_too():
    target = em.plan_change(TEXTS, "3010", "010203040506", "")["files"]
    texts = dict(TEXTS, endpoints_def=target["endpoints_def"]["text"])
    plan = em.plan_change(texts, "3010", "010203040506", "")
    assert plan["files"]["endpoints_sip"]["text"] == target["endpoints_sip"]["text"]
    assert "already held no MAC (a change cut short)" in plan["warnings"][0]


def test_a_file_holding_neither_mac_is_still_a_mismatch_not_a_change_cut_short():
    texts = dict(TEXTS, endpoints_sip=SIP.replace("3010;MAC:010203040506;", "3010;MAC:0102030405AA;"))
    with pytest.raises(em.MacChangeError) as err:
        em.plan_change(texts, "3010", "010203040506", "010203040599")
    assert err.value.reason == "mismatch"


def test_lower_case_mac_in_a_file_matches_the_request():
    plan = em.plan_change(TEXTS, "3022", "00:15:65:17:B7:84", "001565000001")
    assert plan["changed"]
    assert "'serialnumber': '001565000001'" in plan["files"]["endpoints_def"]["text"]


@pytest.mark.parametrize(
    "ext, current, new, message, reason",
    [
        (
            "3010",
            "010203040507",
            "010203040599",
            "extension 3010 does not hold MAC 010203040507 in both files: __ENDPOINTS__.DEF holds MAC "
            "010203040506; endpoints_sip.def holds MAC 010203040506. Nothing was written.",
            "mismatch",
        ),
        (
            "9999",
            "010203040506",
            "",
            "extension 9999 is in neither file: __ENDPOINTS__.DEF holds no such extension; "
            "endpoints_sip.def holds no such extension. Nothing was written.",
            "not_found",
        ),
        ("3010", "", "010203040588", "extension 3010 does not hold MAC '' (empty) in both files", "mismatch"),
        (
            "3010",
            "010203040506",
            "805EC09B49F3",
            "MAC 805EC09B49F3 is already held by extension 2001 (__ENDPOINTS__.DEF, endpoints_sip.def).",
            "mac_in_use",
        ),
        ("3010", "", "", "both empty", "invalid"),
        ("3010", "010203040506", "01:02:03:04:05:06", "are the same", "invalid"),
        ("30a0", "010203040506", "", "digits only", "invalid"),
        ("3010", "xyz", "", "not a MAC", "invalid"),
    ],
)
def test_refusals_say_why(ext, current, new, message, reason):
    with pytest.raises(em.MacChangeError) as err:
        em.plan_change(TEXTS, ext, current, new)
    assert message in str(err.value)
    assert err.value.reason == reason, "the reply says it in Portuguese from the reason"


def test_every_reason_the_module_documents_has_a_portuguese_sentence_in_the_reply():
    import yaml

    from dispatcher.replies import Replies

    doc = " ".join(yaml.safe_load(em.RETURN)["reason"]["description"])
    reasons = set(re.findall(r"V\((\w+)\)", doc))
    assert {"mismatch", "not_found", "mac_in_use", "write_failed", "restore_failed"} <= reasons
    params = {"extension": "3010", "mac_current": "010203040506", "mac_new": "", "server": "gv2p",
              "operation": "remove"}  # fmt: skip
    sentences = set()
    for reason in sorted(reasons):
        report = {"error": "the module's message. Nothing was written.", "reason": reason}
        result = {"hosts": {"gv2p": {"status": "failed", "report": report, "errors": []}}, "errors": []}
        values = dict(command="MACCHANGE=3010", command_name="MACCHANGE", params=params, result=result)
        text = Replies().render("macchange", request_id="r", outcome="failed", **values).text
        lines = text[text.index("gv2p · ramal 3010") :].splitlines()[1:]
        assert lines[2].strip() == "Detalhe técnico: the module's message. Nothing was written.", text
        sentences.add(lines[1].strip())
        assert ("nenhum arquivo foi alterado" in lines[0]) == (reason != "restore_failed"), lines[0]
    assert len(sentences) == len(reasons), "one sentence per reason"


def test_a_completed_change_and_a_late_notification_are_said_in_portuguese():
    from dispatcher.replies import Replies

    warning = "__ENDPOINTS__.DEF already held 010203040599 (a change cut short): only endpoints_sip.def was"
    warning += " changed"
    params = {"extension": "3010", "mac_current": "010203040506", "mac_new": "010203040599", "server": "gv2p",
              "operation": "replace"}  # fmt: skip
    texts = {}
    for changed, notified, warnings in ((True, True, [warning]), (False, True, []), (False, False, [])):
        report = {"changed": changed, "notified": notified, "files": {}, "backups": [], "warnings": warnings}
        result = {"hosts": {"gv2p": {"status": "ok", "report": report, "errors": []}}, "errors": []}
        values = dict(command="MACCHANGE=3010", command_name="MACCHANGE", params=params, result=result)
        rendered = Replies().render("macchange", request_id="r", outcome="success", **values)
        texts[(changed, notified)] = rendered.text
        assert "Os arquivos já estavam assim" in rendered.html or changed
    assert "interrompida no meio" in texts[(True, True)] and "concluída agora" in texts[(True, True)]
    assert "o monitor de provisionamento foi avisado agora" in texts[(False, True)]
    assert "nada a mudar" in texts[(False, False)] and "avisado agora" not in texts[(False, False)]


def test_files_that_disagree_are_described_each():
    texts = dict(TEXTS, endpoints_sip=SIP.replace("3010;MAC:010203040506;", "3010;MAC:None;"))
    with pytest.raises(
        em.MacChangeError,
        match=(r"__ENDPOINTS__.DEF holds MAC 010203040506; endpoints_sip.def holds no MAC \(None\)"),
    ) as err:
        em.plan_change(texts, "3010", "010203040506", "010203040599")
    assert err.value.reason == "mismatch"


def test_extension_missing_from_one_file():
    texts = dict(TEXTS, endpoints_sip=re.sub(r"(?m)^3010;.*\n", "", SIP))
    expected = "not exactly once.*endpoints_sip.def holds no such extension"
    with pytest.raises(em.MacChangeError, match=expected) as err:
        em.plan_change(texts, "3010", "010203040506", "010203040599")
    assert err.value.reason == "ambiguous"


def test_extension_twice_in_a_file_is_ambiguous():
    line = next(line for line in SIP.splitlines() if line.startswith("3010;"))
    texts = dict(TEXTS, endpoints_sip=SIP + "\n" + line + "\n")
    with pytest.raises(em.MacChangeError, match="2 records for the extension") as err:
        em.plan_change(texts, "3010", "010203040506", "010203040599")
    assert err.value.reason == "ambiguous"


def test_commented_out_mac_is_not_a_duplicate():
    plan = em.plan_change(TEXTS, "3010", "010203040506", "0004F2ABCDEF")
    assert plan["changed"] and plan["warnings"] == []


@pytest.mark.parametrize("rec", records("endpoints_def"), ids=lambda r: r.ext)
def test_every_fixture_extension_changes_in_place(rec):
    """Whatever the record's layout, only the MAC value's bytes change."""
    if rec.mac == "":
        plan = em.plan_change(TEXTS, rec.ext, "", "FEDCBA987654")
    else:
        plan = em.plan_change(TEXTS, rec.ext, rec.mac, "FEDCBA987654")
    for key in ("endpoints_def", "endpoints_sip"):
        before, after = TEXTS[key], plan["files"][key]["text"]
        (target,) = [r for r in records(key) if r.ext == rec.ext]
        assert after[: target.start] == before[: target.start]
        assert after[target.start : target.start + 12] == "FEDCBA987654"
        assert after[target.start + 12 :] == before[target.end :]


# --------------------------------------------------------------------- backups


def test_backup_names_carry_the_legacy_timestamp():
    name = em.backup_name("/x/endpoints_sip.def", "20251111_202744")
    assert name == "/x/endpoints_sip.def.20251111_202744.bak"
    assert em.backup_name("/x/a", "20251111_202744", 2) == "/x/a.20251111_202744_2.bak"


def test_prunable_backups_keeps_the_newest():
    names = [
        "endpoints_sip.def.20251111_202744.bak",
        "endpoints_sip.def.20240101_000000.bak",
        "endpoints_sip.def.20251111_202744_1.bak",
        "endpoints_sip.def.20251112_080000.bak",
        "endpoints_sip.def",
        "__ENDPOINTS__.DEF.20200101_000000.bak",
        "endpoints_sip.def.20200101_000000.bak.old",
    ]
    assert em.prunable_backups(names, "endpoints_sip.def", 2) == [
        "endpoints_sip.def.20240101_000000.bak",
        "endpoints_sip.def.20251111_202744.bak",
    ]
    assert em.prunable_backups(names, "endpoints_sip.def", 0) == []
    assert em.prunable_backups(names, "endpoints_sip.def", 10) == []


def test_make_and_prune_backups_on_real_files(tmp_path):
    a, b = tmp_path / "__ENDPOINTS__.DEF", tmp_path / "endpoints_sip.def"
    a.write_text("A")
    b.write_text("B")
    os.chmod(a, 0o640)
    first = em.make_backups([str(a), str(b)], "")
    second = em.make_backups([str(a), str(b)], str(tmp_path))
    assert len(set(first + second)) == 4  # same second: a _N suffix, no overwrite
    assert Path(first[0]).read_text() == "A" and Path(first[1]).read_text() == "B"
    assert os.stat(first[0]).st_mode & 0o777 == 0o640
    assert re.search(r"\.\d{8}_\d{6}\.bak$", first[0])
    removed = em.prune_backups(str(a), "", 1)
    assert removed == [first[0]]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("__")) == sorted(
        [a.name, Path(second[0]).name]
    )


# ----------------------------------------------------------------- atomic write


def test_write_atomically_keeps_owner_and_mode(tmp_path):
    path = tmp_path / "endpoints_sip.def"
    path.write_bytes(b"old")
    os.chown(path, 65534, 65534)
    os.chmod(path, 0o604)
    em.write_atomically(str(path), b"new\xc3\xa7")
    info = os.stat(path)
    assert path.read_bytes() == b"new\xc3\xa7"
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (65534, 65534, 0o604)
    assert [p.name for p in tmp_path.iterdir()] == ["endpoints_sip.def"]


def test_write_atomically_failure_leaves_file_and_no_temp(tmp_path):
    """A real failure: the file is immutable (chattr +i), so even root cannot replace it."""
    path = tmp_path / "endpoints_sip.def"
    path.write_bytes(b"old")
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        with pytest.raises(OSError):
            em.write_atomically(str(path), b"new")
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["endpoints_sip.def"]
