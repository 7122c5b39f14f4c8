# -*- coding: utf-8 -*-
# Copyright: athome-ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Reading the two endpoint definition files (endpoint_mac, endpoint_mac_info).

Runs on the target with Python 2.7, 3.6 and 3.x: no f-strings, no type hints, standard
library only, pure functions (tests/unit of the collection).

Where an extension's MAC lives is data, not code: RULES per file, each a dict of
  record:    regexes (MULTILINE), each finding whole records with the named groups `ext`
             (the extension) and `body` (where the MAC is looked for); a match that starts
             inside an earlier record is not a record of its own
  mac:       regex finding the MAC inside a body; group `mac` is the value replaced
  empty:     values read as "no MAC"; the first one is what a removal writes
  comment:   regex (MULTILINE) of whole comment lines, blanked before matching
  candidate: regex searched in each line outside every record: a hit is a line that
             looks like a record but did not parse (the probe reports it)
A site overrides any of them per file (the role's endpoint_mac_rules, the modules' rules).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import re

from ansible.module_utils.six import string_types

FILES = ("endpoints_def", "endpoints_sip")
LABELS = {"endpoints_def": "__ENDPOINTS__.DEF", "endpoints_sip": "endpoints_sip.def"}

# A whole line whose first non-blank character is # or ; (Asterisk .def includes use ;).
COMMENT = r"^[ \t]*[#;][^\r\n]*"

RULES = {
    "endpoints_def": {
        # 'EXT': { ... } (either quote), flat, possibly over several lines
        "record": [r"""^[ \t]*(['"])(?P<ext>[0-9]+)\1[ \t]*:[ \t]*\{(?P<body>[^{}]*)\}"""],
        "mac": r"""(['"])serialnumber\1[ \t]*:[ \t]*(['"])(?P<mac>[^'"\r\n]*)\2""",
        "empty": [""],
        "comment": COMMENT,
        "candidate": r"""serialnumber|^[ \t]*['"][0-9]+['"][ \t]*:""",
    },
    "endpoints_sip": {
        "record": [
            # the extension as the first field of a line: 3010;... 3010|... 3010,... 3010<tab>...
            # 3010 ... (blanks around a separator allowed); the body is the rest of the line,
            # a trailing ; comment included
            r"""^[ \t]*(?P<ext>[0-9]+)(?P<body>(?:(?:[ \t]*[;|,]|[ \t])[^\r\n]*)?)(?=\r?$)""",
            # a [3010] section header: the body is the rest of its line and every line up to
            # the next line starting with [
            r"""^[ \t]*\[[ \t]*(?P<ext>[0-9]+)[ \t]*\](?P<body>[^\r\n]*(?:\r?\n(?![ \t]*\[)[^\r\n]*)*)""",
        ],
        # MAC:value or MAC=value anywhere in the body; OLDMAC: and the like do not match
        "mac": r"""(?<![A-Za-z0-9_])MAC[ \t]*[:=][ \t]*(?P<mac>[^\s;|,]*)""",
        "empty": ["None", ""],
        "comment": COMMENT,
        "candidate": r"""^[ \t]*\[?[ \t]*[0-9]{2,}(?![0-9]*[ \t]*=)|(?<![A-Za-z0-9_])MAC[ \t]*[:=]""",
    },
}
RULE_KEYS = ("record", "mac", "empty", "comment", "candidate")

_MAC_SEPARATORS = re.compile(r"[\s:.\-]")
_MAC_RE = re.compile(r"^[0-9A-F]{12}$")


class Record(object):
    """One extension's record in one file, with the span of its MAC value."""

    __slots__ = ("ext", "raw", "mac", "start", "end", "count", "span")

    def __init__(self, ext, raw, mac, start, end, count, span=None):
        self.ext = ext
        self.raw = raw  # the value as written, None when the record has no MAC field
        self.mac = mac  # normalised: 12 hex, "" for empty, None when not a MAC
        self.start = start
        self.end = end
        self.count = count  # how many MAC fields the record has
        self.span = span or (start, end)  # the whole record

    def __repr__(self):
        return "Record(%r, raw=%r, mac=%r)" % (self.ext, self.raw, self.mac)


# ---------------------------------------------------------------------- rules


def rules_for(key, overrides=None):
    """The compiled rules of one file: the defaults with `overrides[key]` on top.

    Raises ValueError naming the bad entry (a regex that does not compile or lacks its
    named groups, an unknown key)."""
    merged = dict(RULES[key])
    given = (overrides or {}).get(key) or {}
    if not isinstance(given, dict):
        raise ValueError("rules.%s must be a dict of %s" % (key, ", ".join(RULE_KEYS)))
    for name, value in given.items():
        if value is None:
            continue  # an option an argument spec filled with None: keep the default
        if name not in RULE_KEYS:
            raise ValueError("rules.%s.%s: unknown (known: %s)" % (key, name, ", ".join(RULE_KEYS)))
        merged[name] = value
    records = merged["record"]
    if isinstance(records, string_types) or not isinstance(records, (list, tuple)):
        records = [records]
    if isinstance(merged["empty"], string_types) or not isinstance(merged["empty"], (list, tuple)):
        raise ValueError("rules.%s.empty must be a list of strings" % key)
    compiled = {"label": LABELS[key], "empty": tuple(merged["empty"]) or ("",)}
    compiled["record"] = [
        _compile(key, "record[%d]" % i, pattern, ("ext", "body"), re.MULTILINE)
        for i, pattern in enumerate(records)
    ]
    if not compiled["record"]:
        raise ValueError("rules.%s.record: at least one regex" % key)
    compiled["mac"] = _compile(key, "mac", merged["mac"], ("mac",), 0)
    compiled["comment"] = _compile(key, "comment", merged["comment"], (), re.MULTILINE)
    compiled["candidate"] = _compile(key, "candidate", merged["candidate"], (), 0)
    return compiled


def _compile(key, name, pattern, groups, flags):
    try:
        regex = re.compile(pattern, flags)
    except (re.error, TypeError) as exc:
        raise ValueError("rules.%s.%s: %r does not compile: %s" % (key, name, pattern, exc))
    missing = [g for g in groups if g not in regex.groupindex]
    if missing:
        raise ValueError("rules.%s.%s: %r lacks the named group(s) %s" % (
            key, name, pattern, ", ".join("(?P<%s>...)" % g for g in missing)))
    return regex


def all_rules(overrides=None):
    """{file key: compiled rules} for both files; ValueError on a bad override."""
    if overrides and not isinstance(overrides, dict):
        raise ValueError("rules must be a dict keyed by %s" % " and ".join(FILES))
    unknown = sorted(set(overrides or {}) - set(FILES))
    if unknown:
        raise ValueError("rules: unknown file key(s) %s (known: %s)" % (", ".join(unknown), ", ".join(FILES)))
    return dict((key, rules_for(key, overrides)) for key in FILES)


# ------------------------------------------------------------------- parsing


def normalize_mac(value):
    """'01:02:03:04:05:0a' -> '01020304050A'; '' or None -> ''; raises ValueError."""
    if value is None:
        return ""
    text = _MAC_SEPARATORS.sub("", value).upper()
    if text == "":
        return ""
    if not _MAC_RE.match(text):
        raise ValueError("%r is not a MAC address (12 hex digits)" % (value,))
    return text


def read_mac(raw, rules):
    """A value as found in a file -> normalised MAC, '' for empty, None when not a MAC."""
    if raw is None:
        return None
    if raw.strip() in rules["empty"]:
        return ""
    try:
        return normalize_mac(raw) or None
    except ValueError:
        return None


def mask_comments(text, rules=None):
    """Blank comment lines (same length, newlines kept) so offsets stay valid."""
    regex = rules["comment"] if rules else re.compile(COMMENT, re.MULTILINE)
    return regex.sub(lambda m: re.sub(r"[^\r\n]", " ", m.group(0)), text)


def parse_records(text, rules):
    """Every record of a file, in file order."""
    masked = mask_comments(text, rules)
    matches = []
    for regex in rules["record"]:
        matches.extend(regex.finditer(masked))
    matches.sort(key=lambda m: (m.start(), -m.end()))
    records, covered = [], -1
    for match in matches:
        if match.start() < covered:
            continue  # inside an earlier record (a line of a [section], say)
        covered = match.end()
        body_start, body_end = match.span("body")
        if body_start < 0:
            body_start = body_end = match.end()
        found = list(rules["mac"].finditer(masked, body_start, body_end))
        if found:
            start, end = found[0].span("mac")
            raw = text[start:end]
            records.append(Record(match.group("ext"), raw, read_mac(raw, rules), start, end, len(found),
                                  match.span()))
        else:
            records.append(Record(match.group("ext"), None, None, body_start, body_start, 0, match.span()))
    return records


def unparsed_lines(text, rules, records):
    """[(line number, line)] of lines outside every record that look like one."""
    masked = mask_comments(text, rules)
    spans = sorted(r.span for r in records)
    out, pos, index = [], 0, 0
    for number, line in enumerate(masked.split("\n"), 1):
        start, end = pos, pos + len(line)
        pos = end + 1
        while index < len(spans) and spans[index][1] <= start:
            index += 1
        inside = index < len(spans) and spans[index][0] < max(end, start + 1)
        if not inside and line.strip() and rules["candidate"].search(line):
            out.append((number, text[start:end].rstrip("\r")))
    return out


def describe(rules, found):
    """What a file holds for an extension, in words."""
    if not found:
        return "no such extension"
    if len(found) > 1:
        return "%d records for the extension (ambiguous)" % len(found)
    rec = found[0]
    if rec.count == 0:
        return "a record without a MAC field"
    if rec.count > 1:
        return "a record with %d MAC fields (ambiguous)" % rec.count
    if rec.mac is None:
        return "'%s', which is not a MAC" % rec.raw
    if rec.mac == "":
        return "no MAC (%s)" % (rec.raw if rec.raw else "''")
    return "MAC %s" % rec.mac


def line_at(text, start, end):
    """The whole line(s) around text[start:end], without surrounding blanks."""
    first = text.rfind("\n", 0, start) + 1
    last = text.find("\n", end)
    if last < 0:
        last = len(text)
    return text[first:last].strip()


def others_holding(records, extension, mac):
    """Extensions other than `extension` whose MAC equals `mac`, in file order."""
    seen = []
    for rec in records:
        if rec.ext != extension and rec.count == 1 and rec.mac == mac and rec.ext not in seen:
            seen.append(rec.ext)
    return seen


def as_display(text):
    """Latin-1 working text (the file's bytes one for one) back to what it says in UTF-8."""
    return text.encode("latin-1").decode("utf-8", "replace")


def _ext_key(ext):
    return (len(ext), ext)


def survey(text, rules, cap=50):
    """How one file parses, for the probe: extensions, duplicates, records whose MAC field
    is missing, doubled or not a MAC, and lines that look like records but did not parse
    (at most `cap` of each list, with their counts)."""
    records = parse_records(text, rules)
    by_ext, by_mac = {}, {}
    for rec in records:
        by_ext.setdefault(rec.ext, []).append(rec)
        if rec.count == 1 and rec.mac:
            holders = by_mac.setdefault(rec.mac, [])
            if rec.ext not in holders:
                holders.append(rec.ext)
    problems = []
    for rec in records:
        if rec.count != 1 or rec.mac is None:
            problems.append({"extension": rec.ext, "holds": describe(rules, [rec]),
                             "text": line_at(text, rec.span[0], rec.span[0])})
    unparsed = unparsed_lines(text, rules, records)
    return {
        "records": len(records),
        "extensions": sorted(by_ext, key=_ext_key),
        "duplicate_extensions": sorted((e for e, recs in by_ext.items() if len(recs) > 1), key=_ext_key),
        "duplicate_macs": dict((mac, exts) for mac, exts in by_mac.items() if len(exts) > 1),
        "without_mac": sorted((e for e, recs in by_ext.items() if any(r.mac == "" for r in recs)),
                              key=_ext_key),
        "bad_records": problems[:cap],
        "bad_records_count": len(problems),
        "unparsed": [{"line": n, "text": t} for n, t in unparsed[:cap]],
        "unparsed_count": len(unparsed),
    }


def compare(surveys):
    """Extensions present in one file only: {file key: [extensions]}."""
    sets = dict((key, set(s["extensions"])) for key, s in surveys.items())
    out = {}
    for key in sets:
        others = set()
        for other in sets:
            if other != key:
                others |= sets[other]
        out[key] = sorted(sets[key] - others, key=_ext_key)
    return out
