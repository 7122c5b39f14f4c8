"""Pure helpers of the recordings modules (athome.voip plugins/module_utils/recordings.py), tested directly.

The same file is imported by the modules on the recordings host (Python 2.7,
3.6, 3.11) and on the controller; the last tests run it under 2.7 and 3.6.
"""

from __future__ import annotations

import json
import os
import zipfile
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import recordings_support as rs

H = rs.helpers()

DAYS = [
    date(2024, 12, 30),
    date(2024, 12, 31),
    date(2025, 1, 1),
    date(2025, 1, 31),
    date(2025, 2, 1),
    date(2024, 2, 28),
    date(2024, 2, 29),
    date(2024, 3, 1),
]
BOUNDARIES = [
    datetime(2024, 12, 31, 22, 0, 0),
    datetime(2025, 1, 1, 2, 0, 0),
    datetime(2025, 1, 1, 2, 0, 59),
    datetime(2025, 1, 1, 2, 1, 0),
    datetime(2024, 12, 31, 21, 59, 59),
]
CALLS = rs.generate_calls(DAYS, 150, seed=11, boundaries=BOUNDARIES)


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("rec")
    rs.write_tree(base / "dated", CALLS, "dated")
    rs.write_tree(base / "flat", CALLS, "flat")
    return base


def matcher(exts, start, end, **kw):
    return H.NameMatcher(exts, H.Window(start, end), **kw)


# ------------------------------------------------------------------------ names


def test_default_pattern_parses_every_direction_and_dotted_uniqueid():
    m = matcher(["1121"], "2025-11-04 00:00", "2025-11-04 23:59")
    f = m.parse("in-1121-5511999990000-20251104-120304-1730732584.123.wav")
    assert f == {
        "direction": "in",
        "dst": "1121",
        "src": "5511999990000",
        "date": "20251104",
        "time": "120304",
        "uniqueid": "1730732584.123",
        "suffix": "wav",
    }
    assert m.parse("out-5511999990000-1121-20251104-120304-1.2.mp3")["src"] == "1121"
    assert m.parse("q-5000--20251104-120304-1.2.wav")["src"] == ""
    assert m.parse("in-1121-551199-2025110-120304-1.2.wav") is None  # 7-digit date
    assert m.parse("README.txt") is None


def test_extension_is_matched_as_a_field_never_as_a_substring():
    m = matcher(["112"], "2025-11-04 00:00", "2025-11-04 23:59")
    assert m.match("in-112-5511999990000-20251104-120304-1.1.wav")[1] == ["112"]
    assert m.match("in-1121-5511999990000-20251104-120304-1.1.wav") is None  # 112 inside 1121
    assert m.match("in-2010-5511211200000-20251104-120304-1.1.wav") is None  # inside a phone number
    assert m.match("out-5511211200000-1121-20251104-120304-1.1.wav") is None
    m2 = matcher(["1121"], "2025-11-04 00:00", "2025-11-04 23:59")
    assert m2.match("in-11210-5511999990000-20251104-120304-1.1.wav") is None
    # out: the extension is the source; the destination number does not count even if equal digits.
    assert m2.match("out-5511999990000-1121-20251104-120304-1.1.wav")[1] == ["1121"]
    assert m2.match("out-1121-5511999990000-20251104-120304-1.1.wav") is None
    # an unknown direction (internal) matches either side
    both = matcher(["1121", "1122"], "2025-11-04 00:00", "2025-11-04 23:59")
    assert both.match("internal-1122-1121-20251104-120304-1.1.wav")[1] == ["1122", "1121"]


CUSTOM = r"^(?P<date>\d{8})_(?P<time>\d{6})_(?P<dst>\d+)_(?P<src>\d+)\.(?P<suffix>wav)$"


def test_suffixes_filter_and_custom_pattern():
    m = matcher(["1121"], "2025-11-04 00:00", "2025-11-04 23:59")
    assert m.match("in-1121-55-20251104-120304-1.1.wav.part") is None
    custom = matcher(
        ["1121"],
        "2025-11-04 00:00",
        "2025-11-04 23:59",
        pattern=CUSTOM,
        extension_fields={"*": ["dst", "src"]},
    )
    assert custom.match("20251104_120304_1121_5511.wav")[0] == "20251104120304"
    with pytest.raises(H.RecordingsError, match="lacks the named group"):
        matcher(["1121"], "2025-11-04 00:00", "2025-11-04 23:59", pattern=r"^(?P<date>\d{8})$")


@settings(max_examples=60, deadline=None)
@given(
    exts=st.lists(st.sampled_from(rs.EXTENSIONS), min_size=1, max_size=3, unique=True),
    fields=st.sampled_from([None, {"*": ["dst"]}, {"*": ["uniqueid"]}, {"in": ["src"], "*": ["dst", "src"]}]),
    junk=st.lists(st.text(st.characters(blacklist_characters="/\0"), min_size=1, max_size=30), max_size=5),
)
def test_candidates_hold_every_name_that_matches(exts, fields, junk):
    """candidates() is only a pre-filter: every name match() selects is among them, once, and
    match_candidate() agrees with match() on each. Names with newlines, dashes or extensions
    in other fields (the generator's 11210, 1013010, phone numbers) included."""
    m = matcher(exts, "2024-12-30 00:00", "2025-02-01 23:59", extension_fields=fields)
    names = [c.name for c in CALLS] + junk + ["x\n" + CALLS[0].name, CALLS[1].name + "\n"]
    cands = m.candidates(names)
    assert len(cands) == len(set(cands)) and set(cands) <= set(names)
    matched = [n for n in names if m.match(n) is not None]
    assert set(matched) <= set(cands)
    assert all(m.match_candidate(n) == m.match(n) for n in cands)
    if fields is None:  # the default pattern and fields: the dashed needle
        assert m.needle.pattern.startswith("-(?:")


def test_custom_patterns_use_the_plain_extension_as_needle():
    m = matcher(["1121"], "2025-11-04 00:00", "2025-11-04 23:59", pattern=CUSTOM)
    assert m.candidates(["20251104_120304_1121_5511.wav", "20251104_120304_2010_5511.wav"]) == [
        "20251104_120304_1121_5511.wav"
    ]
    assert m.match_candidate("20251104_120304_1121_5511.wav")[1] == ["1121"]


# ----------------------------------------------------------------------- window


def test_window_is_inclusive_at_minute_resolution():
    w = H.Window("2025-11-01 08:00", "2025-11-01 17:30")
    assert w.contains("20251101080000")  # exactly at start
    assert not w.contains("20251101075959")  # one second before start
    assert w.contains("20251101173000")  # exactly at end
    assert w.contains("20251101173059")  # anywhere in the end minute
    assert not w.contains("20251101173100")


@pytest.mark.parametrize(
    ("start", "end", "dirs"),
    [
        ("2025-11-04 23:30", "2025-11-05 00:30", ["2025/11/04", "2025/11/05"]),  # midnight
        ("2025-01-31 22:00", "2025-02-01 01:00", ["2025/01/31", "2025/02/01"]),  # month end
        ("2024-12-31 23:00", "2025-01-01 00:59", ["2024/12/31", "2025/01/01"]),  # year end
        ("2024-02-28 12:00", "2024-03-01 00:00", ["2024/02/28", "2024/02/29", "2024/03/01"]),  # leap day
        ("2025-11-04 10:00", "2025-11-04 10:00", ["2025/11/04"]),
    ],
)
def test_day_dirs_cover_exactly_the_days_of_the_window(start, end, dirs):
    assert H.Window(start, end).day_dirs() == dirs
    assert H.Window(start, end).day_dirs("%Y-%m-%d") == [d.replace("/", "-") for d in dirs]


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        ("2025-11-05 00:00", "2025-11-04 23:59", "before start"),
        ("2025-02-30 00:00", "2025-03-01 00:00", "not a valid date"),
        ("04/11/2025 00:00", "2025-11-04 23:59", "is not 'YYYY-MM-DD HH:MM'"),
        ("2025-01-01 00:00", "2025-12-31 23:59", "more than the 92 allowed"),
    ],
)
def test_bad_windows_are_refused(start, end, message):
    with pytest.raises(H.RecordingsError, match=message):
        H.Window(start, end, max_days=92)


@pytest.mark.parametrize("bad", [[], "1121", ["11a"], ["1"], ["12345678901"], [" "]])
def test_bad_extensions_are_refused(bad):
    with pytest.raises(H.RecordingsError):
        H.normalize_extensions(bad)


def test_extensions_are_normalised_and_deduplicated():
    assert H.normalize_extensions([1121, "1122", " 1121 "]) == ["1121", "1122"]


@pytest.mark.parametrize("bad", ["", "../x", "a b", "x" * 65, "-lead", "a/b"])
def test_bad_request_ids_are_refused(bad):
    with pytest.raises(H.RecordingsError):
        H.check_request_id(bad)


# --------------------------------------------------------------- against truth


@settings(max_examples=60, deadline=None)
@given(
    start=st.datetimes(datetime(2024, 12, 30), datetime(2025, 2, 2)),
    minutes=st.integers(0, 3 * 1440),
    exts=st.lists(st.sampled_from(rs.EXTENSIONS), min_size=1, max_size=3, unique=True),
)
def test_matcher_agrees_with_the_generator_on_any_window(start, minutes, exts):
    s = start.strftime("%Y-%m-%d %H:%M")
    e = (start + timedelta(minutes=minutes)).strftime("%Y-%m-%d %H:%M")
    m = matcher(exts, s, e)
    got = sorted(c.name for c in CALLS if m.match(c.name) is not None)
    assert got == sorted(c.name for c in rs.expected(CALLS, exts, s, e))


@pytest.mark.parametrize("layout", ["dated", "flat"])
def test_select_local_finds_exactly_the_expected_files(trees, layout):
    start, end = "2024-12-31 22:00", "2025-01-01 02:00"
    sel = H.select_local(str(trees / layout), matcher(["112", "1121"], start, end), layout)
    want = rs.expected(CALLS, ["112", "1121"], start, end)
    assert [i["path"] for i in sel.items] == [c.relpath(layout) for c in want]
    assert sel.bytes == sum(len(c.body()) for c in want)
    names = {c.name for c in want}
    # boundary calls: 22:00:00 and 02:00:59 in; 21:59:59 and 02:01:00 out
    assert any("-20241231-220000-" in n for n in names)
    assert any("-20250101-020059-" in n for n in names)
    assert not any("-20241231-215959-" in n or "-20250101-020100-" in n for n in names)
    per = sel.per_extension(["112", "1121"])
    assert per["112"] == sum(1 for c in want if "112" in c.parties)
    assert per["1121"] == sum(1 for c in want if "1121" in c.parties)
    if layout == "dated":  # only the two day folders of the window were listed
        assert sel.dirs_listed == 2
        assert sel.scanned == sum(1 for c in CALLS if c.when.date() in (date(2024, 12, 31), date(2025, 1, 1)))
    else:
        assert sel.dirs_listed == 1 and sel.scanned == len(CALLS)


def test_missing_day_folders_and_root(trees):
    sel = H.select_local(str(trees / "dated"), matcher(["1121"], "2030-01-01 00:00", "2030-01-02 00:00"))
    assert sel.items == [] and sel.dirs_listed == 2 and sel.scanned == 0
    with pytest.raises(H.RecordingsError, match="not a folder"):
        H.select_local(str(trees / "nope"), matcher(["1121"], "2030-01-01 00:00", "2030-01-02 00:00"))


def test_limits_produce_a_refusal_that_suggests_a_narrower_window(trees):
    sel = H.select_local(
        str(trees / "dated"), matcher(["112", "1121"], "2024-12-30 00:00", "2025-01-01 23:59")
    )
    assert sel.over_limits(0, 0) is None
    assert sel.over_limits(sel.selected, sel.bytes) is None
    msg = sel.over_limits(sel.selected - 1, 0)
    assert f"{sel.selected} files (limit {sel.selected - 1})" in msg and "narrower window" in msg
    assert "limit 1.0 KiB" in sel.over_limits(0, 1024)


def test_digest_changes_with_the_selection(trees):
    a = H.select_local(str(trees / "dated"), matcher(["1121"], "2024-12-31 00:00", "2024-12-31 23:59"))
    b = H.select_local(str(trees / "dated"), matcher(["1121"], "2024-12-31 00:00", "2024-12-31 23:59"))
    c = H.select_local(str(trees / "dated"), matcher(["1121"], "2024-12-31 00:00", "2024-12-31 22:59"))
    assert a.digest() == b.digest() != c.digest()


# -------------------------------------------------------------------------- zip


def test_zip_entries_match_the_selection_one_by_one(trees, tmp_path):
    start, end = "2025-01-31 20:00", "2025-02-01 04:00"
    sel = H.select_local(str(trees / "dated"), matcher(["1122", "3001"], start, end))
    want = rs.expected(CALLS, ["1122", "3001"], start, end)
    H.write_local_zip(sel, str(tmp_path / "x.zip"), "deflated", comment="athome-recordings sha256=abc")
    with zipfile.ZipFile(tmp_path / "x.zip") as zf:
        assert zf.testzip() is None
        infos = zf.infolist()
        assert len(infos) == len(want) > 0
        for info, call in zip(infos, want, strict=True):
            assert info.filename == call.relpath("dated")
            assert zf.read(info) == call.body()
            assert info.compress_type == zipfile.ZIP_DEFLATED
    assert H.zip_comment(str(tmp_path / "x.zip")) == "athome-recordings sha256=abc"
    assert H.zip_comment(str(tmp_path / "missing.zip")) is None


def test_zip64_records_are_written_when_sizes_pass_the_limit(trees, tmp_path, monkeypatch):
    # Lowering zipfile's limit exercises the ZIP64 path without writing 4 GB in the suite
    # (the bench zips 2 GB for real).
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 64)
    sel = H.select_local(str(trees / "dated"), matcher(["1121"], "2024-12-31 00:00", "2024-12-31 23:59"))
    H.write_local_zip(sel, str(tmp_path / "z.zip"))
    raw = (tmp_path / "z.zip").read_bytes()
    assert b"PK\x06\x06" in raw  # ZIP64 end of central directory record
    monkeypatch.undo()
    with zipfile.ZipFile(tmp_path / "z.zip") as zf:
        assert zf.testzip() is None
        assert zf.namelist() == [i["path"] for i in sel.items]


# ----------------------------------------------------------------------- legacy


def test_legacy_request_has_exactly_the_legacy_shape():
    doc = H.legacy_request(
        ["1121", "1122"],
        "2025-09-29 00:00",
        "2025-10-27 23:59",
        "user@example.com",
        "20251111_150122_req001",
        "2025-11-11 15:01:22",
    )
    text = H.legacy_json(doc)
    parsed = json.loads(text)
    assert list(parsed) == [
        "parameters",
        "request_id",
        "timestamp_received",
        "from_email",
        "status",
        "retries",
    ]
    assert list(parsed["parameters"]) == ["ramais", "inicio", "fim", "email"]
    assert parsed == {
        "parameters": {
            "ramais": "1121,1122",
            "inicio": "29/09/2025 00:00",
            "fim": "27/10/2025 23:59",
            "email": "user@example.com",
        },
        "request_id": "20251111_150122_req001",
        "timestamp_received": "2025-11-11 15:01:22",
        "from_email": "user@example.com",
        "status": "pending",
        "retries": 0,
    }
    assert H.same_legacy_request(text.replace("15:01:22", "16:00:00"), doc)
    assert not H.same_legacy_request(text.replace("1121,1122", "1121"), doc)
    with pytest.raises(H.RecordingsError, match="not an email"):
        H.legacy_request(["1121"], "2025-09-29 00:00", "2025-10-27 23:59", "nobody", "r1", "x")


def test_write_exclusive_never_overwrites_and_leaves_no_temporary(tmp_path):
    path = H.write_exclusive(str(tmp_path), "r1.json", "first\n")
    assert Path(path).read_text() == "first\n"
    with pytest.raises(FileExistsError):
        H.write_exclusive(str(tmp_path), "r1.json", "second\n")
    assert Path(path).read_text() == "first\n"
    assert sorted(os.listdir(tmp_path)) == ["r1.json"]


def test_a_symlink_named_like_a_recording_is_never_followed(tmp_path):
    day = tmp_path / "tree" / "2025" / "11" / "04"
    day.mkdir(parents=True)
    secret = tmp_path / "shadow"
    secret.write_text("root:secret-hash")
    real = day / "in-1121-5511999990000-20251104-120000-1730721600.1.wav"
    real.write_bytes(b"RIFF")
    (day / "in-1121-5511999990000-20251104-120500-1730721900.2.wav").symlink_to(secret)
    sel = H.select_local(str(tmp_path / "tree"), matcher(["1121"], "2025-11-04 00:00", "2025-11-04 23:59"))
    assert [i["path"] for i in sel.items] == ["2025/11/04/" + real.name]


# ------------------------------------------------------------- old interpreters
# The same helpers on Python 2.7 and 3.6: the collection's tests/unit/plugins/module_utils/
# test_recordings.py, run by `ansible-test units` (make units) on 2.7, 3.6 and this Python.


# ------------------------------------------------------------- safe links, limits


def _swap_tree(tmp_path):
    """A small dated tree of real files, a selection over it, and a root-only secret outside it."""
    calls = rs.generate_calls([date(2025, 11, 4)], 20, seed=5)
    rs.write_tree(tmp_path / "tree", calls, "dated")
    secret = tmp_path / "secret.key"
    secret.write_bytes(b"TOP-SECRET-" * 100)
    secret.chmod(0o600)
    sel = H.select_local(
        str(tmp_path / "tree"), matcher(["1121", "1122", "3001"], "2025-11-04 00:00", "2025-11-04 23:59")
    )
    assert sel.selected >= 2
    return sel, secret


@pytest.mark.parametrize("swap", ["symlink", "hardlink", "symlinked-day-folder"])
def test_a_recording_swapped_after_selection_never_puts_its_target_in_the_zip(tmp_path, swap):
    """Between the selection and the ZIP, a selected recording is replaced (real files): by a
    symlink to a root-only file, by a hard link to it, or its whole day folder by a symlink to
    a folder holding a same-named link. The ZIP fails; the target's bytes are in no file."""
    sel, secret = _swap_tree(tmp_path)
    victim = Path(sel.items[-1]["source"])
    if swap == "symlink":
        victim.unlink()
        victim.symlink_to(secret)
    elif swap == "hardlink":
        victim.unlink()
        os.link(secret, victim)
    else:
        day = victim.parent
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        for f in day.iterdir():
            os.link(secret, elsewhere / f.name)
        day.rename(tmp_path / "moved-day")
        day.symlink_to(elsewhere)
    dest = tmp_path / "out.zip"
    with pytest.raises(H.RecordingsError, match="nothing was published"):
        H.write_local_zip(sel, str(dest), "stored")
    assert b"TOP-SECRET" not in (dest.read_bytes() if dest.exists() else b"")


def test_the_zip_reads_the_selected_file_even_if_its_name_is_swapped_while_open(tmp_path):
    """Zipping from the descriptor: once open_selected has the file, a swap of its name no longer
    matters; what is zipped is the selected recording."""
    sel, secret = _swap_tree(tmp_path)
    item = sel.items[0]
    body = Path(item["source"]).read_bytes()
    fd, st = H.open_selected(item)
    try:
        os.unlink(item["source"])
        os.symlink(secret, item["source"])
        with zipfile.ZipFile(tmp_path / "one.zip", "w") as zf:
            H._zip_from_fd(zf, fd, st, item["path"])
    finally:
        os.close(fd)
    with zipfile.ZipFile(tmp_path / "one.zip") as zf:
        assert zf.read(item["path"]) == body


def test_selection_stops_at_max_files_plus_one(trees):
    exts, start, end = ["112", "1121"], "2024-12-30 00:00", "2025-01-01 23:59"
    whole = H.select_local(str(trees / "dated"), matcher(exts, start, end))
    assert whole.selected > 4 and not whole.stopped
    sel = H.select_local(str(trees / "dated"), matcher(exts, start, end), max_files=3)
    assert sel.stopped and sel.selected == 4 and sel.scanned < whole.scanned
    assert "more than 3 files (the limit)" in sel.over_limits(3, 0)
    by_bytes = H.select_local(str(trees / "dated"), matcher(exts, start, end), max_bytes=1)
    assert by_bytes.stopped and by_bytes.selected == 1
    assert "more than 1 B (the limit)" in by_bytes.over_limits(0, 1)
    fits = H.select_local(str(trees / "dated"), matcher(exts, start, end), max_files=whole.selected)
    assert not fits.stopped and fits.selected == whole.selected
    assert fits.over_limits(whole.selected, 0) is None
