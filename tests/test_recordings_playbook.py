"""playbooks/audios.yml end to end: the recordings host over real SSH, SeaweedFS S3 on loopback.

The local tree and the bucket are generated (tests/recordings_support.py) and
the expected selection comes from the generator, not from the parser under
test. Published ZIPs are downloaded over HTTP from a loopback web server that
serves the publish folder, and the S3 ZIP through its presigned URL.
"""

from __future__ import annotations

import grp
import http.server
import io
import json
import os
import re
import shutil
import stat
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from datetime import date, datetime
from functools import partial
from pathlib import Path

import pytest
import yaml

from dispatcher.runner import run_playbook
from tests import recordings_support as rs
from tests import servers

pytestmark = pytest.mark.integration

DAYS = [date(2024, 12, 30), date(2024, 12, 31), date(2025, 1, 1), date(2025, 1, 31), date(2025, 2, 1)]
BOUNDARIES = [
    datetime(2024, 12, 31, 22, 0, 0),
    datetime(2025, 1, 1, 2, 0, 59),
    datetime(2025, 1, 1, 2, 1, 0),
    datetime(2025, 1, 31, 23, 0, 0),
    datetime(2025, 2, 1, 1, 0, 59),
    datetime(2025, 2, 1, 1, 1, 0),
]
CALLS = rs.generate_calls(DAYS, 700, seed=23, boundaries=BOUNDARIES)  # 3,524 files
S3_CALLS = [c for c in CALLS if c.when.date() in (date(2025, 1, 31), date(2025, 2, 1))]
BUCKET, RESULTS = "athome-rec-gv1p", "athome-results"
REQ = {"extensions": ["112", "1121"], "requester": "ops@example.com"}
YEAR_END = {"start": "2024-12-31 22:00", "end": "2025-01-01 02:00"}
MONTH_END = {"start": "2025-01-31 23:00", "end": "2025-02-01 01:00"}


class World:
    def __init__(self, base: Path, sshd, s3, http_port: int):
        self.base, self.sshd, self.s3, self.http_port = base, sshd, s3, http_port
        self.publish = base / "www" / "recordings"
        self.inventory = base / "inventory.yml"
        self.queue = base / "fila_audios"

    def write_inventory(self, gv1p_from: str = "audio", audio: dict | None = None, gv1p: dict | None = None):
        audio_vars = {
            **self.sshd.ansible_vars(),
            "ansible_python_interpreter": servers.target_python(),
            "recordings_root": str(self.base / "tree-dated"),
            "recordings_layout": "dated",
            "recordings_publish_dir": str(self.publish),
            "recordings_publish_base_url": f"http://127.0.0.1:{self.http_port}/recordings",
            "recordings_publish_max_age_days": 3,
            "recordings_legacy_queue_dir": str(self.queue),
            **(audio or {}),
        }
        gv1p_vars = {
            "ansible_host": "127.0.0.1",
            "audios_from": gv1p_from,
            "recordings_s3_bucket": BUCKET,
            "recordings_s3_prefix": "gv1p",
            "recordings_s3_endpoint_url": self.s3.endpoint,
            "recordings_s3_results_bucket": RESULTS,
            "recordings_s3_results_prefix": "ramais/",
            "recordings_s3_url_expiry": 600,
            **(gv1p or {}),
        }
        servers.write_inventory(
            self.inventory,
            {
                "sip_servers": {
                    "gv1p": gv1p_vars,
                    "voip3": {"ansible_host": "127.0.0.1", "enabled": False, "audios_from": "s3"},
                    "voip9": {"ansible_host": "127.0.0.1", "audios_from": "nowhere"},
                },
                "recordings": {"audio": audio_vars},
            },
        )
        return self.inventory

    def run(self, request_id: str, window: dict, check: bool = False, **extra):
        extravars = {"server": "gv1p", "request_id": request_id, **REQ, **window, **extra}
        return run_playbook(
            "audios.yml",
            inventory=self.inventory,
            extravars=extravars,
            check=check,
            envvars=rs.s3_env(self.s3),
            timeout=300,
        )

    def published(self) -> list[str]:
        return sorted(p.name for p in self.publish.glob("*.zip")) if self.publish.exists() else []


@pytest.fixture(scope="module")
def world(sshd, s3_server):
    base = servers.short_tmpdir("atrec-")
    rs.write_tree(base / "tree-dated", CALLS, "dated")
    rs.write_tree(base / "tree-flat", CALLS, "flat")
    rs.seed_bucket(s3_server, BUCKET, "gv1p/", S3_CALLS)
    client = s3_server.client()
    client.create_bucket(Bucket=RESULTS)
    (base / "www").mkdir()
    handler = partial(QuietHandler, directory=str(base / "www"))
    httpd = http.server.ThreadingHTTPServer((servers.LOOPBACK, 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield World(base, sshd, s3_server, httpd.server_address[1])
    httpd.shutdown()
    shutil.rmtree(base, ignore_errors=True)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.read()


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def check_zip(data: bytes, want: list[rs.Call], layout: str = "dated") -> None:
    """Every entry, in order, is the expected recording with the expected bytes."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.testzip() is None
        infos = zf.infolist()
        assert [i.filename for i in infos] == [c.relpath(layout) for c in want]
        for info, call in zip(infos, want, strict=True):
            assert zf.read(info) == call.body(), info.filename


def check_counts(report: dict, want: list[rs.Call], extensions: list[str]) -> None:
    assert report["selected"] == len(want) > 0
    assert report["bytes"] == sum(len(c.body()) for c in want)
    assert report["per_extension"] == {e: sum(1 for c in want if e in c.parties) for e in extensions}
    assert report["too_many"] is False and report["nothing_found"] is False


def only_report(result) -> tuple[str, dict]:
    reports = {h: r.report for h, r in result.hosts.items() if r.report}
    assert len(reports) == 1, result.to_dict()
    return next(iter(reports.items()))


# ---------------------------------------------------------------------- audio


def test_audio_route_year_end_publishes_the_exact_selection(world):
    world.write_inventory()
    world.publish.mkdir(parents=True, exist_ok=True)
    stale, fresh = world.publish / "old-0000000000000000.zip", world.publish / "new-0000000000000000.zip"
    stale.write_bytes(b"old")
    fresh.write_bytes(b"new")
    os.utime(stale, (time.time() - 4 * 86400,) * 2)  # older than recordings_publish_max_age_days (3)

    # check mode: reports what it would do, publishes nothing, removes nothing
    dry = world.run("req-year-dry", YEAR_END, check=True)
    assert dry.succeeded, dry.to_dict()
    assert dry.hosts["audio"].status == "changed"
    assert stale.exists() and world.published() == sorted([stale.name, fresh.name])

    result = world.run("req-year", YEAR_END)
    assert result.succeeded, result.to_dict()
    assert result.hosts["audio"].status == "changed"
    host, report = only_report(result)
    want = rs.expected(CALLS, REQ["extensions"], **YEAR_END)
    assert host == "audio" and report["route"] == "audio" and report["server"] == "gv1p"
    check_counts(report, want, REQ["extensions"])
    assert report["dirs_listed"] == 2  # only 2024/12/31 and 2025/01/01 were listed
    assert report["scanned"] == sum(
        1 for c in CALLS if c.when.date() in (date(2024, 12, 31), date(2025, 1, 1))
    )
    assert report["files"] == [c.relpath("dated") for c in want]
    assert report["criteria"] == {
        "server": "gv1p",
        "extensions": ["112", "1121"],
        "layout": "dated",
        **YEAR_END,
    }
    names = {c.name for c in want}
    assert any("-20241231-220000-" in n for n in names) and any("-20250101-020059-" in n for n in names)
    assert not any("-20250101-020100-" in n for n in names)
    assert report["url"].startswith(f"http://127.0.0.1:{world.http_port}/recordings/req-year-")
    check_zip(fetch(report["url"]), want)
    assert not stale.exists() and fresh.exists()  # old published ZIPs removed, recent kept
    expires = datetime.strptime(report["expires"], "%Y-%m-%dT%H:%M:%SZ")
    assert 2.9 * 86400 < (expires - datetime.utcnow()).total_seconds() <= 3 * 86400

    # again: the same selection reuses the same ZIP
    again = world.run("req-year", YEAR_END)
    assert again.succeeded and again.hosts["audio"].status == "ok", again.to_dict()
    assert only_report(again)[1]["url"] == report["url"]
    assert len([n for n in world.published() if n.startswith("req-year-")]) == 1


@pytest.mark.parametrize(("version", "layout"), [("2.7", "flat"), ("3.6", "dated")])
def test_audio_route_on_old_target_pythons_month_end(world, version, layout):
    world.write_inventory(
        audio={
            "ansible_python_interpreter": servers.pyenv_python(version),
            "recordings_root": str(world.base / f"tree-{layout}"),
            "recordings_layout": layout,
        }
    )
    result = world.run(f"req-py{version}", MONTH_END)
    assert result.succeeded, result.to_dict()
    report = only_report(result)[1]
    want = rs.expected(CALLS, REQ["extensions"], **MONTH_END)
    check_counts(report, want, REQ["extensions"])
    assert report["dirs_listed"] == (2 if layout == "dated" else 1)
    assert report["scanned"] == (
        len(CALLS)
        if layout == "flat"
        else sum(1 for c in CALLS if c.when.date() in (date(2025, 1, 31), date(2025, 2, 1)))
    )
    check_zip(fetch(report["url"]), want, layout)


def test_a_one_minute_window_selects_that_minute(world):
    """INICIO equal to FIM (RAMAIS ... INICIO=01/01/2025 02:00 FIM=01/01/2025 02:00) is the
    minute it names: 02:00:59 is in, 02:01:00 is not (tests/test_limits.py ties the grammar)."""
    world.write_inventory()
    minute = {"start": "2025-01-01 02:00", "end": "2025-01-01 02:00"}
    result = world.run("req-minute", minute)
    assert result.succeeded, result.to_dict()
    report = only_report(result)[1]
    want = rs.expected(CALLS, REQ["extensions"], **minute)
    assert want and all(c.when.strftime("%Y-%m-%d %H:%M") == minute["start"] for c in want)
    assert any(c.when.second == 59 for c in want)
    check_counts(report, want, REQ["extensions"])
    check_zip(fetch(report["url"]), want)


def test_limits_exceeded_and_nothing_found_make_no_zip(world):
    world.write_inventory(audio={"recordings_max_files": 5, "recordings_files_cap": 3})
    before = world.published()
    big = world.run("req-big", YEAR_END)
    assert big.succeeded and big.hosts["audio"].status == "ok", big.to_dict()
    report = only_report(big)[1]
    want = rs.expected(CALLS, REQ["extensions"], **YEAR_END)
    assert report["too_many"] is True and report["url"] is None
    # The scan stopped at the 6th match (max_files + 1) instead of collecting all of them.
    assert len(want) > 6 and report["selected"] == 6 and report["limits"]["max_files"] == 5
    assert "more than 5 files (the limit)" in report["message"] and "narrower window" in report["message"]
    assert len(report["files"]) == 3 and report["files_capped"] is True
    empty = world.run("req-empty", {"start": "2025-06-01 00:00", "end": "2025-06-02 23:59"})
    assert empty.succeeded, empty.to_dict()
    report = only_report(empty)[1]
    assert report["nothing_found"] is True and report["selected"] == 0 and report["url"] is None
    assert report["criteria"] == {
        "server": "gv1p",
        "extensions": ["112", "1121"],
        "layout": "dated",
        "start": "2025-06-01 00:00",
        "end": "2025-06-02 23:59",
    }
    assert (
        "No recordings found for extensions 112, 1121 between 2025-06-01 00:00 and 2025-06-02 23:59"
        in (report["message"])
    )
    assert world.published() == before


def test_legacy_handoff_writes_the_legacy_json(world):
    # the legacy host is CentOS 7: run the handoff module on Python 2.7
    world.write_inventory(
        audio={"recordings_legacy_queue": True, "ansible_python_interpreter": servers.pyenv_python("2.7")}
    )
    for sub in ("pending", "processing", "completed", "failed"):
        (world.queue / sub).mkdir(parents=True, exist_ok=True)
    before = world.published()
    rid = "20251111_150122_a1b2c3"
    result = world.run(
        rid,
        {"start": "2025-09-29 00:00", "end": "2025-10-27 23:59"},
        extensions=["1121", "1122"],
        requester="user@example.com",
        received="2025-11-11 15:01:22",
    )
    assert result.succeeded and result.hosts["audio"].status == "changed", result.to_dict()
    report = only_report(result)[1]
    path = world.queue / "pending" / f"{rid}.json"
    assert report["route"] == "legacy" and report["queued"] is True and report["legacy_file"] == str(path)
    doc = json.loads(path.read_text())
    assert list(doc) == ["parameters", "request_id", "timestamp_received", "from_email", "status", "retries"]
    assert doc["parameters"] == {
        "ramais": "1121,1122",
        "inicio": "29/09/2025 00:00",
        "fim": "27/10/2025 23:59",
        "email": "user@example.com",
    }
    assert list(doc["parameters"]) == ["ramais", "inicio", "fim", "email"]
    assert doc["request_id"] == rid
    assert doc["timestamp_received"] == "2025-11-11 15:01:22", "when the email arrived"
    assert doc["from_email"] == "user@example.com" and doc["status"] == "pending" and doc["retries"] == 0
    assert os.listdir(world.queue / "pending") == [f"{rid}.json"]  # no temporary left behind
    assert world.published() == before  # nothing selected locally

    # the legacy worker took it: handing it again changes nothing
    os.rename(path, world.queue / "processing" / path.name)
    again = world.run(
        rid,
        {"start": "2025-09-29 00:00", "end": "2025-10-27 23:59"},
        extensions=["1121", "1122"],
        requester="user@example.com",
    )
    assert again.succeeded and again.hosts["audio"].status == "ok", again.to_dict()
    assert os.listdir(world.queue / "pending") == []
    # the same id with other parameters is refused, the queued file untouched
    clash = world.run(
        rid,
        {"start": "2025-09-29 00:00", "end": "2025-10-27 23:59"},
        extensions=["3001"],
        requester="user@example.com",
    )
    assert clash.hosts["audio"].status == "failed"
    assert "already queued with other parameters" in " ".join(clash.hosts["audio"].errors)
    assert json.loads((world.queue / "processing" / path.name).read_text()) == doc


# ------------------------------------------------------------------------- s3


def test_routing_flips_by_inventory_and_s3_route_serves_a_presigned_zip(world):
    inv = world.write_inventory(gv1p_from="audio")
    audio = world.run("req-flip", MONTH_END)
    assert audio.succeeded and only_report(audio)[0] == "audio", audio.to_dict()
    assert only_report(audio)[1]["route"] == "audio"

    # one line of the inventory changes, nothing else
    before = inv.read_text().splitlines()
    data = yaml.safe_load(inv.read_text())
    data["all"]["children"]["sip_servers"]["hosts"]["gv1p"]["audios_from"] = "s3"
    inv.write_text(yaml.safe_dump(data, sort_keys=False))
    after = inv.read_text().splitlines()
    changed = [(a.strip(), b.strip()) for a, b in zip(before, after, strict=True) if a != b]
    assert changed == [("audios_from: audio", "audios_from: s3")]

    s3 = world.run("req-flip", MONTH_END)
    assert s3.succeeded, s3.to_dict()
    host, report = only_report(s3)
    assert host == "localhost" and report["route"] == "s3"
    assert "audio" not in s3.hosts  # the recordings host was not contacted
    want = rs.expected(S3_CALLS, REQ["extensions"], **MONTH_END)
    check_counts(report, want, REQ["extensions"])
    assert report["dirs_listed"] == 2 and report["list_calls"] == 2  # 2 day prefixes, < 1,000 keys each
    assert report["scanned"] == len(S3_CALLS)
    assert report["files"] == [c.relpath("dated") for c in want]
    data = fetch(report["url"])
    check_zip(data, want)
    assert http_status(report["url"].replace("X-Amz-Signature=", "X-Amz-Signature=0")) == 403
    # The result key has a random part: <prefix><request_id>-<16 hex>.zip.
    key = urllib.parse.urlsplit(report["url"]).path.split(f"/{RESULTS}/", 1)[1]
    assert re.fullmatch(r"ramais/req-flip-[0-9a-f]{16}\.zip", key), key
    assert http_status(report["url"].replace(key, "ramais/req-flip-0000000000000000.zip")) == 403
    stored = world.s3.client().head_object(Bucket=RESULTS, Key=key)
    assert stored["ContentLength"] == len(data)

    # a short expiry: the same selection is not uploaded again, the new link dies after 1 s
    world.write_inventory(gv1p_from="s3", gv1p={"recordings_s3_url_expiry": 1})
    short = world.run("req-flip", MONTH_END)
    assert short.succeeded and short.hosts["localhost"].status == "ok", short.to_dict()
    url = only_report(short)[1]["url"]
    assert url != report["url"] and f"/{RESULTS}/{key}?" in url  # the same object, a new link
    # the link expires 1 s after signing: wait for it, bounded
    servers.wait_for(lambda: http_status(url) == 403, "the short link to expire", timeout=30)
    assert http_status(report["url"]) == 200

    # results older than recordings_s3_results_max_age_days (here ~1 s) are deleted on the next run
    world.write_inventory(gv1p_from="s3", gv1p={"recordings_s3_results_max_age_days": 1 / 86400})
    sweep = world.run("req-sweep", {"start": "2025-01-30 00:00", "end": "2025-01-30 23:59"})
    assert sweep.succeeded and sweep.hosts["localhost"].status == "changed", sweep.to_dict()
    assert only_report(sweep)[1]["results_removed"] >= 1
    assert http_status(report["url"]) == 404
    left = world.s3.client().list_objects_v2(Bucket=RESULTS, Prefix="ramais/req-flip").get("KeyCount")
    assert left == 0

    # A lifecycle rule on the results prefix (SeaweedFS stores it; that S3 then deletes on time
    # is S3's part, days away): set beside the bucket's other rules, then left alone.
    client = world.s3.client()
    other = {"ID": "someone-else", "Filter": {"Prefix": "logs/"}, "Status": "Enabled"}
    other["Expiration"] = {"Days": 30}
    client.put_bucket_lifecycle_configuration(Bucket=RESULTS, LifecycleConfiguration={"Rules": [other]})
    world.write_inventory(gv1p_from="s3", gv1p={"recordings_s3_results_lifecycle_days": 5})
    empty_window = {"start": "2025-01-30 00:00", "end": "2025-01-30 23:59"}
    ruled = world.run("req-rule", empty_window)
    assert ruled.succeeded and ruled.hosts["localhost"].status == "changed", ruled.to_dict()
    rules = {r["ID"]: r for r in client.get_bucket_lifecycle_configuration(Bucket=RESULTS)["Rules"]}
    assert rules["someone-else"]["Filter"] == {"Prefix": "logs/"}
    assert rules["athome-results-expiry"]["Filter"] == {"Prefix": "ramais/"}
    assert rules["athome-results-expiry"]["Expiration"] == {"Days": 5}
    again = world.run("req-rule", empty_window)
    assert again.succeeded and again.hosts["localhost"].status == "ok", again.to_dict()


@pytest.mark.parametrize(
    ("window", "days_calls", "range_calls"),
    [
        (MONTH_END, 2, 2),  # 2 day prefixes of ~700 keys; the range holds ~1,400 keys: 2 pages
        ({"start": "2025-01-31 00:00", "end": "2025-01-31 23:59"}, 1, 1),
        ({"start": "2025-02-01 01:01", "end": "2025-02-03 00:00"}, 3, 1),  # 2 empty days cost no call
        ({"start": "2025-01-30 00:00", "end": "2025-01-30 23:59"}, 1, 1),
    ],
)
def test_s3_listing_by_day_prefix_and_by_range_select_the_same_keys(world, window, days_calls, range_calls):
    mod = rs.s3_module()
    client = world.s3.client()
    want = rs.expected(S3_CALLS, REQ["extensions"], **window)
    for listing, calls in (("days", days_calls), ("range", range_calls)):
        m = mod.NameMatcher(REQ["extensions"], mod.Window(window["start"], window["end"]))
        sel = mod.list_selection(client, BUCKET, "gv1p/", m, "dated", "%Y/%m/%d", listing)
        assert [i["path"] for i in sel.items] == [c.relpath("dated") for c in want], listing
        assert [i["size"] for i in sel.items] == [len(c.body()) for c in want]
        assert sel.list_calls == calls, listing
        assert sel.scanned == sum(
            1 for c in S3_CALLS if m.window.start.date() <= c.when.date() <= m.window.end.date()
        )


def count_list_calls(client) -> list[dict]:
    """The ListObjectsV2 requests this client sends, as botocore sees them go out."""
    sent: list[dict] = []
    client.meta.events.register("before-call.s3.ListObjectsV2", lambda params, **_kw: sent.append(params))
    return sent


@pytest.mark.parametrize("listing", ["days", "range"])
def test_s3_listing_stops_at_the_first_key_past_a_limit(world, listing):
    """Two days of ~700 keys: 2 pages either way without a limit. Over max_files (or max_bytes)
    inside the first page, no second page is requested (counted on the wire by botocore) and
    the refusal reads like the local route's."""
    mod = rs.s3_module()
    window = {"start": "2025-01-31 00:00", "end": "2025-02-01 23:59"}
    want = rs.expected(S3_CALLS, REQ["extensions"], **window)
    assert len(want) > 2

    def select(**limits):
        client = world.s3.client()
        sent = count_list_calls(client)
        m = mod.NameMatcher(REQ["extensions"], mod.Window(window["start"], window["end"]))
        sel = mod.list_selection(client, BUCKET, "gv1p/", m, "dated", "%Y/%m/%d", listing, **limits)
        assert sel.list_calls == len(sent)
        return sel, sent

    whole, sent = select()
    assert len(sent) == 2 and not whole.stopped and whole.selected == len(want)
    assert whole.over_limits(len(want), 0) is None

    for limits, message in (
        ({"max_files": 1}, "more than 1 files (the limit)"),
        ({"max_bytes": 1}, "more than 1 B (the limit)"),
    ):
        sel, sent = select(**limits)
        assert len(sent) == 1, (limits, sent)  # the first page only
        assert sel.stopped and sel.selected == (2 if "max_files" in limits else 1)
        assert {i["path"] for i in sel.items} <= {c.relpath("dated") for c in want}
        assert sel.scanned < whole.scanned
        assert message in sel.over_limits(limits.get("max_files", 0), limits.get("max_bytes", 0))

    # a limit the selection fits in changes nothing
    fits, sent = select(max_files=len(want))
    assert (
        len(sent) == 2
        and not fits.stopped
        and [i["path"] for i in fits.items] == [i["path"] for i in whole.items]
    )


def test_s3_route_nothing_found_and_too_many(world):
    world.write_inventory(gv1p_from="s3", gv1p={"recordings_max_bytes": 1000})
    empty = world.run("req-s3-empty", {"start": "2025-01-30 00:00", "end": "2025-01-30 23:59"})
    assert empty.succeeded, empty.to_dict()
    report = only_report(empty)[1]
    assert report["nothing_found"] is True and report["list_calls"] == 1 and report["url"] is None
    big = world.run("req-s3-big", MONTH_END)
    report = only_report(big)[1]
    assert report["too_many"] is True and report["url"] is None, report
    assert "more than 1000 B (the limit)" in report["message"]
    assert report["list_calls"] == 1  # stopped in the first page, before the month end's second
    keys = world.s3.client().list_objects_v2(Bucket=RESULTS, Prefix="ramais/").get("Contents", [])
    assert not any(k["Key"].startswith("ramais/req-s3-") for k in keys)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"extensions": ["11a"]}, "Bad request"),
        ({"extensions": "1121"}, "Bad request"),
        ({"start": "01/11/2025 00:00"}, "Bad request"),
        ({"end": "2024-12-30 00:00"}, "Bad window"),
        ({"request_id": "../../etc"}, "Bad request"),
        ({"requester": "not-an-email"}, "Bad request"),
        ({"start": "2025-02-30 00:00"}, "day is out of range for month"),
        ({"server": "voip3"}, "not an enabled host of sip_servers"),
        ({"server": "nosuch"}, "not an enabled host of sip_servers"),
        ({"server": "voip9"}, "audios_from=nowhere"),
    ],
)
def test_bad_requests_fail_before_any_work(world, override, message):
    world.write_inventory()
    before = world.published()
    extravars = {"server": "gv1p", "request_id": "req-bad", **REQ, **YEAR_END, **override}
    result = run_playbook("audios.yml", inventory=world.inventory, extravars=extravars, timeout=120)
    assert not result.succeeded
    assert result.hosts["localhost"].status == "failed"
    assert message in " ".join(result.hosts["localhost"].errors), result.to_dict()
    assert "audio" not in result.hosts
    assert world.published() == before


# --------------------------------------------------- permissions, expiry, per-server trees


def test_published_zips_are_closed_to_others_and_expire_without_a_new_run(world):
    """Folder 0750 and ZIP 0640 in the web server's group; the cron entry the role installs on
    the recordings host removes ZIPs past their age when its command runs, with no new request."""
    cron_file = world.base / "cron.d" / "athome-recordings-expiry"
    cron_file.parent.mkdir(exist_ok=True)
    publish = world.base / "www" / "closed"
    world.write_inventory(
        audio={
            "recordings_publish_dir": str(publish),
            "recordings_publish_base_url": f"http://127.0.0.1:{world.http_port}/closed",
            "recordings_publish_group": "www-data",
            "recordings_publish_expiry_cron_file": str(cron_file),
        }
    )
    result = world.run("req-perm", YEAR_END)
    assert result.succeeded, result.to_dict()
    report = only_report(result)[1]
    zip_path = publish / report["url"].rsplit("/", 1)[1]
    www_data = grp.getgrnam("www-data").gr_gid
    for path, mode in ((publish, 0o750), (zip_path, 0o640), (publish / "index.html", 0o640)):
        st = path.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (mode, www_data), path
    check_zip(fetch(report["url"]), rs.expected(CALLS, REQ["extensions"], **YEAR_END))

    lines = [
        ln for ln in cron_file.read_text().splitlines() if ln and not ln.startswith("#") and "=" not in ln
    ]
    assert len(lines) == 1 and stat.S_IMODE(cron_file.stat().st_mode) == 0o644
    minute, hour, dom, month, dow, user, command = lines[0].split(None, 6)
    assert (minute, hour, dom, month, dow, user) == ("*/10", "*", "*", "*", "*", "root")
    assert "-mmin +4320" in command  # recordings_publish_max_age_days: 3

    old = publish / "old-1111111111111111.zip"
    old_part = publish / ".old-2222222222222222.zip.part"
    for path in (old, old_part):
        path.write_bytes(b"old")
        os.utime(path, (time.time() - 3 * 86400 - 120,) * 2)
    young = publish / "young-3333333333333333.zip"
    young.write_bytes(b"young")
    os.utime(young, (time.time() - 3 * 86400 + 600,) * 2)
    # What cron would run (the same shell and PATH as the file sets).
    subprocess.run(["/bin/sh", "-c", command], env={"PATH": "/usr/bin:/bin"}, check=True, timeout=60)
    assert not old.exists() and not old_part.exists()
    assert young.exists() and zip_path.exists() and (publish / "index.html").exists()
    # Installed once: a second run leaves the file as it is.
    again = world.run("req-perm", YEAR_END)
    assert again.succeeded and again.hosts["audio"].status == "ok", again.to_dict()


def test_each_server_can_have_its_own_tree_on_the_recordings_host(world):
    """gv1p and gv2p share extension numbers; with recordings_root in each server's host vars a
    request for one never returns the other's calls. A server without one uses the host's tree."""
    day = [date(2025, 3, 10)]
    trees = {"gv1p": rs.generate_calls(day, 60, seed=101), "gv2p": rs.generate_calls(day, 60, seed=202)}
    for name, calls in trees.items():
        rs.write_tree(world.base / f"tree-{name}", calls, "dated")
    window = {"start": "2025-03-10 00:00", "end": "2025-03-10 23:59"}
    inv = world.write_inventory(gv1p={"recordings_root": str(world.base / "tree-gv1p")})
    data = yaml.safe_load(inv.read_text())
    data["all"]["children"]["sip_servers"]["hosts"]["gv2p"] = {
        "ansible_host": "127.0.0.1",
        "audios_from": "audio",
        "recordings_root": str(world.base / "tree-gv2p"),
    }
    data["all"]["children"]["sip_servers"]["hosts"]["gv3p"] = {
        "ansible_host": "127.0.0.1",
        "audios_from": "audio",
    }
    inv.write_text(yaml.safe_dump(data, sort_keys=False))
    for name, calls in trees.items():
        want = rs.expected(calls, REQ["extensions"], **window)
        other = rs.expected(trees["gv2p" if name == "gv1p" else "gv1p"], REQ["extensions"], **window)
        assert want and other and {c.name for c in want}.isdisjoint(c.name for c in other)
        res = world.run(f"req-tree-{name}", window, server=name)
        assert res.succeeded, res.to_dict()
        report = only_report(res)[1]
        assert report["server"] == name
        check_counts(report, want, REQ["extensions"])
        check_zip(fetch(report["url"]), want)
    # gv3p has no tree of its own: the recordings host's (tree-dated) has no calls that day.
    res = world.run("req-tree-gv3p", window, server="gv3p")
    assert res.succeeded and only_report(res)[1]["nothing_found"] is True, res.to_dict()
