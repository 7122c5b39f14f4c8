# -*- coding: utf-8 -*-
# Copyright: athome-ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The recordings helpers (module_utils/recordings.py) on every interpreter the recordings
host may run: `ansible-test units` runs this on Python 2.7 (CentOS 7), 3.6 and the
controller's Python. The repository's tests/test_recordings_unit.py checks the same code
against generated trees and hypothesis on the controller."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import os
import zipfile

import pytest

from ansible_collections.athome.voip.plugins.module_utils import recordings as h

# (day folder, file name, selected for 112/1121 in 2024-12-31 22:00 .. 2025-01-01 02:00)
CALLS = [
    ("2024/12/31", "in-1121-5511999990000-20241231-220000-1.1.wav", True),  # first second
    ("2024/12/31", "in-1121-5511999990000-20241231-215959-1.2.wav", False),  # one second early
    ("2025/01/01", "out-112-5511911210000-20250101-020059-1.3.mp3", False),  # 112 is dst, out wants src
    ("2025/01/01", "out-551100-112-20250101-020059-1.4.gsm", True),  # last second of the end minute
    ("2025/01/01", "in-11210-1121-20250101-010000-1.5.wav", False),  # 11210 is not 1121
    ("2025/01/01", "internal-1122-1121-20250101-010000-1.6.wav", True),  # any direction: either field
    ("2025/01/01", "in-1121-5511-20250101-020100-1.7.wav", False),  # one minute late
    ("2025/01/01", "in-1121-5511-20250101-010000-1.8.txt", False),  # not a recording suffix
]


def make_tree(root, layout):
    for day, name, _selected in CALLS:
        folder = os.path.join(root, day) if layout == "dated" else root
        if not os.path.isdir(folder):
            os.makedirs(folder)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(b"RIFF" + name.encode("ascii"))


@pytest.mark.parametrize("layout", ["dated", "flat"])
def test_selection_and_zip64_on_this_interpreter(tmpdir, layout, monkeypatch):
    root = str(tmpdir.mkdir("tree"))
    make_tree(root, layout)
    matcher = h.NameMatcher(["112", "1121"], h.Window("2024-12-31 22:00", "2025-01-01 02:00"))
    sel = h.select_local(root, matcher, layout)
    want = sorted(name for _day, name, selected in CALLS if selected)
    assert sorted(os.path.basename(i["path"]) for i in sel.items) == want
    assert sel.per_extension(["112", "1121"]) == {"112": 1, "1121": 2}
    # A tiny ZIP64 limit forces the ZIP64 records that a 2 GiB selection writes.
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 64)
    dest = str(tmpdir.join("out.zip"))
    h.write_local_zip(sel, dest, "stored", "c")
    with zipfile.ZipFile(dest) as z:
        assert sorted(os.path.basename(n) for n in z.namelist()) == want
        assert z.testzip() is None


def test_one_minute_window_is_accepted_and_holds_that_minute_only():
    w = h.Window("2025-11-04 12:00", "2025-11-04 12:00")
    assert w.contains("20251104120000") and w.contains("20251104120059")
    assert not w.contains("20251104115959") and not w.contains("20251104120100")
    with pytest.raises(h.RecordingsError):
        h.Window("2025-11-04 12:01", "2025-11-04 12:00")


def test_legacy_request_document():
    doc = h.legacy_request(["1121"], "2025-09-29 00:00", "2025-10-27 23:59", "u@example.com", "r1", "t")
    text = h.legacy_json(doc)
    assert json.loads(text)["parameters"]["inicio"] == "29/09/2025 00:00"
    assert h.same_legacy_request(text, doc)
    with pytest.raises(h.RecordingsError):
        h.legacy_request(["1121"], "2025-09-29 00:00", "2025-10-27 23:59", "nobody", "r1", "x")


def test_selection_argument_spec_is_a_fresh_copy_each_time():
    first = h.selection_argument_spec()
    first["extension_fields"]["default"]["in"].append("src")
    first["suffixes"]["default"].append("flac")
    second = h.selection_argument_spec()
    assert second["extension_fields"]["default"] == h.DEFAULT_EXTENSION_FIELDS
    assert second["suffixes"]["default"] == h.DEFAULT_SUFFIXES
    assert h.DEFAULT_EXTENSION_FIELDS["in"] == ["dst"]


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("swap", ["symlink", "hardlink"])
def test_a_recording_swapped_after_selection_is_not_zipped_on_this_interpreter(tmpdir, swap):
    """O_NOFOLLOW + fstat identity on 2.7 (zipped through /proc/self/fd) and 3.x (streamed from
    the descriptor): a selected file replaced by a link to a root-only file fails the ZIP."""
    root = str(tmpdir.mkdir("tree"))
    make_tree(root, "dated")
    secret = tmpdir.join("secret.key")
    secret.write_binary(b"TOP-SECRET-" * 50)
    sel = h.select_local(root, h.NameMatcher(["112", "1121"], h.Window("2024-12-31 22:00", "2025-01-01 02:00")))
    clean = str(tmpdir.join("clean.zip"))
    h.write_local_zip(sel, clean, "stored")
    with zipfile.ZipFile(clean) as z:
        assert [z.read(n) for n in z.namelist()] == [read_bytes(i["source"]) for i in sel.items]
    victim = sel.items[0]["source"]
    os.unlink(victim)
    if swap == "symlink":
        os.symlink(str(secret), victim)
    else:
        os.link(str(secret), victim)
    dest = str(tmpdir.join("out.zip"))
    with pytest.raises(h.RecordingsError):
        h.write_local_zip(sel, dest, "stored")
    assert b"TOP-SECRET" not in read_bytes(dest)


def test_selection_stops_past_max_files(tmpdir):
    root = str(tmpdir.mkdir("tree"))
    make_tree(root, "flat")
    window = h.Window("2024-12-31 22:00", "2025-01-01 02:00")
    sel = h.select_local(root, h.NameMatcher(["112", "1121"], window), "flat", max_files=1)
    assert sel.stopped and sel.selected == 2
    assert "more than 1 files" in sel.over_limits(1, 0)
