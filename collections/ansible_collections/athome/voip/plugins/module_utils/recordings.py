# -*- coding: utf-8 -*-
"""Pure helpers shared by the recordings modules (local tree and S3).

Runs unchanged on Python 2.7 (CentOS 7 recordings host), 3.6 and 3.11: no
f-strings, no annotations, only os.listdir / os.stat. Nothing here
imports Ansible or boto3, so tests import this file directly.

Vocabulary: an *extension* (ramal) is a PBX extension such as ``1121``; the
file's own suffix (``wav``) is called *suffix* to keep the two apart.

Window: ``start`` and ``end`` are ``YYYY-MM-DD HH:MM`` in the server's local
time, both inclusive at minute resolution: a call that starts at any second of
the ``end`` minute is inside, a call one second before ``start`` is not.
"""

from __future__ import absolute_import, division, print_function

import errno
import hashlib
import io
import json
import os
import re
import shutil
import stat
import sys
import time
import zipfile
from collections import OrderedDict
from datetime import datetime, timedelta
from operator import itemgetter

__metaclass__ = type

# FreePBX / Asterisk MixMonitor naming:
#   <direction>-<dst>-<src>-YYYYMMDD-HHMMSS-<uniqueid>.<suffix>
# e.g. in-1121-5511999990000-20251104-120304-1730732584.123.wav
DEFAULT_PATTERN = (
    r"^(?P<direction>[a-z]+)-(?P<dst>[^-]*)-(?P<src>[^-]*)-"
    r"(?P<date>\d{8})-(?P<time>\d{6})-(?P<uniqueid>[^-]+)\.(?P<suffix>[A-Za-z0-9]+)$"
)

# Which named field of the pattern holds the extension, per direction. An
# incoming call (in), an outgoing external leg (external) and a queue call (q)
# name the extension as dst; an outgoing call (out) names it as src. Any other
# direction (internal, rg, ondemand...) matches either field. A field matches
# only when it equals the extension: never a substring of a phone number.
DEFAULT_EXTENSION_FIELDS = {
    "in": ["dst"],
    "out": ["src"],
    "external": ["dst"],
    "q": ["dst"],
    "*": ["dst", "src"],
}

DEFAULT_SUFFIXES = ["wav", "WAV", "mp3", "gsm", "ogg"]
DEFAULT_DIR_FORMAT = "%Y/%m/%d"

MOMENT_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2})$")
EXTENSION_RE = re.compile(r"^[0-9]{2,10}$")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
EMAIL_RE = re.compile(r"^[^@\s\"',;<>]+@[^@\s\"',;<>]+\.[^@\s\"',;<>]+$")

COMPRESSIONS = {"stored": zipfile.ZIP_STORED, "deflated": zipfile.ZIP_DEFLATED}
CHUNK = 1024 * 1024


def selection_argument_spec():
    """The options recordings_select and recordings_s3_select share, documented once in
    the doc fragment athome.voip.recordings (a fresh dict each call: modules add their own)."""
    return dict(
        layout=dict(type="str", choices=["dated", "flat"], default="dated"),
        dir_format=dict(type="str", default=DEFAULT_DIR_FORMAT),
        extensions=dict(type="list", elements="str", required=True),
        start=dict(type="str", required=True),
        end=dict(type="str", required=True),
        request_id=dict(type="str", required=True),
        name_pattern=dict(type="str", default=""),
        extension_fields=dict(type="dict", default=dict((k, list(v)) for k, v in DEFAULT_EXTENSION_FIELDS.items())),
        suffixes=dict(type="list", elements="str", default=list(DEFAULT_SUFFIXES)),
        max_files=dict(type="int", default=2000),
        max_bytes=dict(type="int", default=2147483648),
        max_days=dict(type="int", default=92),
        files_cap=dict(type="int", default=200),
        compression=dict(type="str", choices=sorted(COMPRESSIONS), default="stored"),
    )


class RecordingsError(Exception):
    """A request the helpers refuse, with a message meant for the requester."""


# --------------------------------------------------------------------- criteria


def parse_moment(text, what="time"):
    """'YYYY-MM-DD HH:MM' -> datetime, or RecordingsError."""
    m = MOMENT_RE.match(text or "")
    if not m:
        raise RecordingsError("%s %r is not 'YYYY-MM-DD HH:MM'" % (what, text))
    try:
        return datetime(*[int(g) for g in m.groups()])
    except ValueError as exc:
        raise RecordingsError("%s %r is not a valid date: %s" % (what, text, exc))


class Window(object):
    """An inclusive call-start window at minute resolution."""

    def __init__(self, start_text, end_text, max_days=None):
        self.start = parse_moment(start_text, "start")
        self.end = parse_moment(end_text, "end")
        if self.end < self.start:
            raise RecordingsError("end %s is before start %s" % (end_text, start_text))
        if max_days and len(self.days()) > int(max_days):
            raise RecordingsError(
                "the window covers %d days, more than the %d allowed: ask for a narrower window"
                % (len(self.days()), int(max_days))
            )
        # Compared as strings: 'YYYYMMDDHHMMSS' sorts like the time it names.
        self.low = self.start.strftime("%Y%m%d%H%M") + "00"
        self.high = self.end.strftime("%Y%m%d%H%M") + "59"

    def contains(self, stamp):
        return self.low <= stamp <= self.high

    def days(self):
        """Every calendar day the window touches, in order."""
        first, last = self.start.date(), self.end.date()
        return [first + timedelta(days=i) for i in range((last - first).days + 1)]

    def day_dirs(self, dir_format=DEFAULT_DIR_FORMAT):
        return day_dirs(self.days(), dir_format)


def day_dirs(days, dir_format=DEFAULT_DIR_FORMAT):
    """Relative day folders ('2025/11/04') for the given dates."""
    return [format_day(d, dir_format) for d in days]


def format_day(day, dir_format=DEFAULT_DIR_FORMAT):
    # strftime on date works on 2.7 for years >= 1900; build it by hand to
    # stay independent of the locale.
    return (
        dir_format.replace("%Y", "%04d" % day.year)
        .replace("%m", "%02d" % day.month)
        .replace("%d", "%02d" % day.day)
        .strip("/")
    )


def normalize_extensions(values):
    """A list of digit strings, de-duplicated in order; RecordingsError otherwise."""
    if isinstance(values, (str, bytes)) or not values:
        raise RecordingsError("extensions must be a non-empty list of digit strings")
    out = []
    for value in values:
        text = str(value).strip()
        if not EXTENSION_RE.match(text):
            raise RecordingsError("extension %r is not 2 to 10 digits" % (value,))
        if text not in out:
            out.append(text)
    return out


def check_request_id(request_id):
    if not REQUEST_ID_RE.match(request_id or ""):
        raise RecordingsError(
            "request_id %r must be 1-64 characters of letters, digits, '_', '.', '-'" % (request_id,)
        )
    return request_id


# ------------------------------------------------------------------------ names


class NameMatcher(object):
    """Decides whether one file name is a selected recording.

    pattern: a regex with named groups ``date`` (YYYYMMDD) and ``time``
    (HHMMSS), the fields named in ``extension_fields`` (default ``dst`` and
    ``src``), and optionally ``direction`` and ``suffix``.
    """

    def __init__(self, extensions, window, pattern=None, extension_fields=None, suffixes=tuple(DEFAULT_SUFFIXES)):
        self.extensions = normalize_extensions(extensions)
        self.wanted = set(self.extensions)
        self.window = window
        self.regex = re.compile(pattern or DEFAULT_PATTERN)
        self.fields = dict(extension_fields or DEFAULT_EXTENSION_FIELDS)
        if "*" not in self.fields:
            self.fields["*"] = ["dst", "src"]
        groups = set(self.regex.groupindex)
        missing = set(["date", "time"]) - groups
        for names in self.fields.values():
            missing |= set(names) - groups
        if missing:
            raise RecordingsError(
                "the name pattern lacks the named group(s): %s" % ", ".join(sorted(missing))
            )
        self.suffixes = set(suffixes) if suffixes else None
        # A selected name holds one of the extensions verbatim (a field equals it). In the
        # default pattern the extension fields dst and src sit between dashes, so there the
        # needle is '-1121-': fewer false hits in the phone numbers and unique ids.
        alternatives = "|".join(re.escape(e) for e in self.extensions)
        self.prefilter = re.compile(alternatives).search
        dashed = self.regex.pattern == DEFAULT_PATTERN and all(
            set(names) <= set(["dst", "src"]) for names in self.fields.values()
        )
        self.needle = re.compile("-(?:%s)-" % alternatives if dashed else alternatives)
        index = self.regex.groupindex
        self._date, self._time = index["date"], index["time"]
        self._suffix = index.get("suffix")
        self._direction = index.get("direction")
        self._field_index = dict((d, [index[f] for f in names]) for d, names in self.fields.items())

    def parse(self, name):
        """The pattern's fields as a dict, or None when the name does not fit."""
        m = self.regex.match(name)
        return m.groupdict() if m else None

    def match(self, name):
        """(stamp, [matched extensions], suffix) for a selected name, else None."""
        # Cheap pre-filter: a selected name contains one of the extensions
        # verbatim. Most names of a large tree stop here, before the full regex.
        if self.prefilter(name) is None:
            return None
        return self.match_candidate(name)

    def match_candidate(self, name):
        """match() without the pre-filter, for names that passed candidates()."""
        m = self.regex.match(name)
        if m is None:
            return None
        g = m.groups()  # one call, then plain indexing: this runs once per candidate
        stamp = g[self._date - 1] + g[self._time - 1]
        if not self.window.low <= stamp <= self.window.high:
            return None
        suffix = (g[self._suffix - 1] if self._suffix else None) or ""
        if self.suffixes is not None and suffix not in self.suffixes:
            return None
        direction = g[self._direction - 1] if self._direction else None
        matched = []
        for index in self._field_index.get(direction) or self._field_index["*"]:
            value = g[index - 1]
            if value in self.wanted and value not in matched:
                matched.append(value)
        if not matched:
            return None
        return stamp, matched, suffix

    def candidates(self, names):
        """The names of one folder listing that may be selected, in listing order.

        One regex scan (C speed) over the names joined by '/', which no file name can
        hold, instead of a Python step per name: in a day folder of 2,740 names about 2 %
        hold an extension field, and only those go on to match_candidate()."""
        text = "/" + "/".join(names) + "/"
        rfind, find = text.rfind, text.find
        found = []
        end = -1
        for m in self.needle.finditer(text):
            at = m.start()
            if at < end:  # a second hit in the same name
                continue
            end = find("/", at)
            found.append(text[rfind("/", 0, at) + 1:end])
        return found


# -------------------------------------------------------------------- selection


class Selection(object):
    """What a scan found: items (dicts) plus counters."""

    def __init__(self):
        self.items = []
        self.scanned = 0
        self.dirs_listed = 0
        self.list_calls = 0
        self.stopped = False  # the scan stopped early: already over a limit
        self._bytes = 0

    def add(self, path, name, size, stamp, matched, suffix, mtime=None, source=None, identity=None):
        """identity: (st_dev, st_ino) of a local file, checked again when it is zipped."""
        self.items.append(
            {
                "path": path,
                "name": name,
                "size": int(size),
                "stamp": stamp,
                "extensions": matched,
                "suffix": suffix,
                "mtime": mtime,
                "source": source,
                "identity": identity,
            }
        )
        self._bytes += int(size)

    def over(self, max_files, max_bytes):
        """True once the items exceed a limit (0: no limit): the scan can stop there."""
        return bool((max_files and len(self.items) > int(max_files))
                    or (max_bytes and self._bytes > int(max_bytes)))

    def sort(self):
        self.items.sort(key=itemgetter("stamp", "path"))

    @property
    def selected(self):
        return len(self.items)

    @property
    def bytes(self):
        return sum(i["size"] for i in self.items)

    def per_extension(self, extensions):
        counts = OrderedDict((e, 0) for e in extensions)
        for item in self.items:
            for ext in item["extensions"]:
                counts[ext] = counts.get(ext, 0) + 1
        return counts

    def per_extension_bytes(self, extensions):
        sizes = OrderedDict((e, 0) for e in extensions)
        for item in self.items:
            for ext in item["extensions"]:
                sizes[ext] = sizes.get(ext, 0) + item["size"]
        return sizes

    def digest(self):
        """A fingerprint of the selection (paths and sizes) to recognise a ZIP already made."""
        h = hashlib.sha256()
        for item in self.items:
            h.update(("%s\0%d\n" % (item["path"], item["size"])).encode("utf-8"))
        return h.hexdigest()

    def over_limits(self, max_files, max_bytes):
        """A message when the selection exceeds a limit, else None."""
        reasons = []
        if max_files and self.selected > int(max_files):
            if self.stopped:  # the scan stopped at max_files + 1
                reasons.append("more than %d files (the limit)" % int(max_files))
            else:
                reasons.append("%d files (limit %d)" % (self.selected, int(max_files)))
        if max_bytes and self.bytes > int(max_bytes):
            if self.stopped:
                reasons.append("more than %s (the limit)" % human_bytes(int(max_bytes)))
            else:
                reasons.append("%s (limit %s)" % (human_bytes(self.bytes), human_bytes(int(max_bytes))))
        if not reasons:
            return None
        return "too many recordings for one link: %s; ask for a narrower window or fewer extensions" % (
            " and ".join(reasons)
        )


def select_local(root, matcher, layout="dated", dir_format=DEFAULT_DIR_FORMAT, max_files=0, max_bytes=0):
    """Scan a local tree; in a dated tree only the day folders of the window.

    Per folder: one os.listdir (names only: the cheapest listing on 2.7 and 3.x alike),
    one regex scan of the joined names for the extensions (NameMatcher.candidates), the
    full pattern on those candidates only, and an lstat of the names that match. (An lstat
    relative to the open folder, dir_fd, measured no faster than by path.) With max_files /
    max_bytes the scan stops at the first match past a limit (max_files + 1 files):
    nothing will be zipped then, and the selection says so (stopped, over_limits).
    """
    if layout not in ("dated", "flat"):
        raise RecordingsError("layout must be 'dated' or 'flat', not %r" % (layout,))
    if not os.path.isdir(root):
        raise RecordingsError("recordings root %s is not a folder" % root)
    sel = Selection()
    folders = matcher.window.day_dirs(dir_format) if layout == "dated" else [""]
    match, candidates = matcher.match_candidate, matcher.candidates
    max_files, max_bytes = int(max_files or 0), int(max_bytes or 0)
    for rel_dir in folders:
        folder = os.path.join(root, rel_dir) if rel_dir else root
        sel.dirs_listed += 1
        try:
            entries = os.listdir(folder)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):  # no calls that day
                continue
            raise
        sel.scanned += len(entries)
        prefix = os.path.join(folder, "")  # folder + one separator: prefix + name == os.path.join
        rel_prefix = rel_dir + "/" if rel_dir else ""
        for name in candidates(entries):
            hit = match(name)
            if hit is None:
                continue
            full = prefix + name
            try:
                st = os.lstat(full)  # a symlink is never followed: the tree is web-served
            except OSError:
                continue  # removed while we looked
            if not stat.S_ISREG(st.st_mode):
                continue
            sel.add(rel_prefix + name, name, st.st_size, hit[0], hit[1], hit[2], mtime=st.st_mtime, source=full,
                    identity=(st.st_dev, st.st_ino))
            if (max_files and len(sel.items) > max_files) or (max_bytes and sel._bytes > max_bytes):
                sel.stopped = True
                sel.sort()
                return sel
    sel.sort()
    return sel


# -------------------------------------------------------------------------- zip


def zip_date_time(stamp):
    """ZipInfo.date_time from 'YYYYMMDDHHMMSS' (ZIP cannot hold years before 1980)."""
    parts = (stamp[0:4], stamp[4:6], stamp[6:8], stamp[8:10], stamp[10:12], stamp[12:14])
    values = tuple(int(p) for p in parts)
    return values if values[0] >= 1980 else (1980, 1, 1, 0, 0, 0)


def open_selected(item):
    """A read-only descriptor of a selected file that is still the file that was selected.

    The tree is written by Asterisk and served over the web: between the selection and
    the ZIP a recording may be swapped for a symlink (or a hard link) to any file root
    can read. O_NOFOLLOW refuses a symlink in the last component, and fstat on the
    open descriptor must show a regular file with the device and inode seen at
    selection time; only that descriptor is read afterwards."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(item["source"], flags)
    except OSError as exc:
        raise RecordingsError("%s changed between selection and zipping (%s); nothing was published"
                              % (item["path"], os.strerror(exc.errno)))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (
        item.get("identity") is not None and (st.st_dev, st.st_ino) != tuple(item["identity"])
    ):
        os.close(fd)
        raise RecordingsError("%s is no longer the file that was selected; nothing was published" % item["path"])
    return fd, st


def _zip_from_fd(zf, fd, st, arcname):
    """Add the open file fd to zf under arcname, read from that descriptor only.

    Python 3.6+ streams it through ZipFile.open(..., "w"). Python 2.7 has no streaming
    writer (writestr needs the whole file in memory), so zipfile reads it through
    /proc/self/fd/N, which reopens the descriptor's own file whatever its path has become."""
    zinfo = zipfile.ZipInfo(arcname, time.localtime(st.st_mtime)[0:6])
    if zinfo.date_time[0] < 1980:
        zinfo.date_time = (1980, 1, 1, 0, 0, 0)
    zinfo.external_attr = (st.st_mode & 0xFFFF) << 16
    zinfo.compress_type = zf.compression
    zinfo.file_size = st.st_size
    if sys.version_info >= (3, 6):
        src = os.fdopen(os.dup(fd), "rb")
        try:
            dst = zf.open(zinfo, "w", force_zip64=st.st_size > zipfile.ZIP64_LIMIT // 2)
            try:
                shutil.copyfileobj(src, dst, 1024 * 1024)
            finally:
                dst.close()
        finally:
            src.close()
        return
    proc = "/proc/self/fd/%d" % fd
    if not os.path.exists(proc):
        raise RecordingsError("no /proc/self/fd here: cannot zip from a descriptor on Python 2")
    zf.write(proc, arcname)


def write_local_zip(selection, dest, compression="stored", comment=None):
    """Stream the selected local files into a ZIP at dest (ZIP64 when needed).

    Each file is opened with open_selected (no symlink, same inode as selected) and
    zipped from that descriptor; zipfile copies in chunks, so memory stays flat
    whatever the sizes; allowZip64 must be explicit on Python 2.7.
    """
    method = COMPRESSIONS[compression]
    zf = zipfile.ZipFile(dest, "w", method, True)
    try:
        for item in selection.items:
            fd, st = open_selected(item)
            try:
                _zip_from_fd(zf, fd, st, item["path"])
            finally:
                os.close(fd)
        if comment:
            zf.comment = comment.encode("ascii")
    finally:
        zf.close()


def zip_comment(path):
    """The comment of an existing ZIP as text, or None when unreadable."""
    try:
        zf = zipfile.ZipFile(path)
        try:
            return zf.comment.decode("ascii", "replace")
        finally:
            zf.close()
    except (IOError, OSError, zipfile.BadZipfile):
        return None


# ----------------------------------------------------------------------- legacy


def legacy_moment(moment):
    """'YYYY-MM-DD HH:MM' -> the legacy 'DD/MM/YYYY HH:MM'."""
    return parse_moment(moment).strftime("%d/%m/%Y %H:%M")


def legacy_request(extensions, start, end, requester, request_id, received):
    """The legacy queue's JSON document, keys in the legacy order (DOMAIN.md)."""
    if not EMAIL_RE.match(requester or ""):
        raise RecordingsError("requester %r is not an email address" % (requester,))
    check_request_id(request_id)
    Window(start, end)
    params = OrderedDict()
    params["ramais"] = ",".join(normalize_extensions(extensions))
    params["inicio"] = legacy_moment(start)
    params["fim"] = legacy_moment(end)
    params["email"] = requester
    doc = OrderedDict()
    doc["parameters"] = params
    doc["request_id"] = request_id
    doc["timestamp_received"] = received
    doc["from_email"] = requester
    doc["status"] = "pending"
    doc["retries"] = 0
    return doc


def legacy_json(doc):
    text = json.dumps(doc, indent=2, ensure_ascii=False, separators=(",", ": "))
    if not isinstance(text, type(u"")):
        text = text.decode("utf-8")
    return text + u"\n"


def same_legacy_request(existing_text, doc):
    """True when a queued file holds the same request (its receipt time aside)."""
    try:
        old = json.loads(existing_text)
    except ValueError:
        return False
    keys = ("parameters", "request_id", "from_email")
    return all(old.get(k) == json.loads(json.dumps(doc)).get(k) for k in keys)


def write_exclusive(folder, name, text):
    """Write folder/name atomically and never over an existing file.

    The text goes to a hidden temporary name (not *.json, so a legacy worker
    scanning the folder never sees half a file), is flushed and fsynced, then
    hard-linked to its final name (fails if the name exists) and the
    temporary name removed; the folder is fsynced last.
    """
    tmp = os.path.join(folder, ".%s.%d.tmp" % (name, os.getpid()))
    final = os.path.join(folder, name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with io.open(fd, "w", encoding="utf-8", closefd=True) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return final


# ------------------------------------------------------------------------ misc


def human_bytes(n):
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024
    return "%d B" % n


def criteria(extensions, start, end, layout):
    return {"extensions": list(extensions), "start": start, "end": end, "layout": layout}


def summary(selection, extensions, files_cap):
    """The counters every module returns."""
    names = [i["path"] for i in selection.items]
    cap = int(files_cap) if files_cap is not None else len(names)
    return {
        "scanned": selection.scanned,
        "selected": selection.selected,
        "bytes": selection.bytes,
        "per_extension": dict(selection.per_extension(extensions)),
        "per_extension_bytes": dict(selection.per_extension_bytes(extensions)),
        "files": names[:cap],
        "files_capped": len(names) > cap,
    }
