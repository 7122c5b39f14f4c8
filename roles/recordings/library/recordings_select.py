#!/usr/bin/python
# -*- coding: utf-8 -*-
# Runs on the recordings host: Python 2.7 (CentOS 7), 3.6 and 3.11.

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: recordings_select
short_description: Select call recordings by extension and time window and publish them as one ZIP.
description:
  - Scans the recordings tree of the host it runs on for the files of the given extensions whose
    call start time lies in [O(start), O(end)] (both inclusive, minute resolution, server local time).
  - In a dated tree (O(layout=dated)) only the day folders inside the window are listed; a flat tree is
    one folder that is listed whole.
  - File names follow O(name_pattern) (default FreePBX C(<direction>-<dst>-<src>-YYYYMMDD-HHMMSS-<uniqueid>.<suffix>)).
    The extension is matched as a whole field (per direction, O(extension_fields)), never as a substring.
  - The selection is streamed into a ZIP (bounded memory, ZIP64 when needed) published in O(publish_dir)
    under an unguessable name, and the module returns its URL under O(base_url).
  - Above O(max_files) or O(max_bytes) nothing is zipped and RV(too_many) says why: never a truncated ZIP.
  - Running again with the same O(request_id) and the same selection reuses the ZIP (not changed).
version_added: "1.0.0"
author: athome-ops
options:
  root:
    description: Root of the recordings tree.
    type: path
    required: true
  layout:
    description: V(dated) for C(root/YYYY/MM/DD/) folders (see O(dir_format)), V(flat) for one folder.
    type: str
    choices: [dated, flat]
    default: dated
  dir_format:
    description: Day folder below O(root) with C(%Y), C(%m), C(%d) placeholders.
    type: str
    default: "%Y/%m/%d"
  extensions:
    description: Extensions (digit strings) to select.
    type: list
    elements: str
    required: true
  start:
    description: First minute of the window, C(YYYY-MM-DD HH:MM), server local time.
    type: str
    required: true
  end:
    description: Last minute of the window (inclusive), C(YYYY-MM-DD HH:MM).
    type: str
    required: true
  request_id:
    description: Request id; names the ZIP (C(<request_id>-<random>.zip)).
    type: str
    required: true
  name_pattern:
    description:
      - Regular expression for a recording's file name, with named groups C(date) (YYYYMMDD), C(time) (HHMMSS),
        the fields named in O(extension_fields), and optionally C(direction) and C(suffix).
      - Empty means the FreePBX default.
    type: str
    default: ""
  extension_fields:
    description: Per direction, the named fields that may hold the extension; key C(*) for any other direction.
    type: dict
    default: {"in": ["dst"], "out": ["src"], "external": ["dst"], "q": ["dst"], "*": ["dst", "src"]}
  suffixes:
    description: File suffixes accepted (group C(suffix)); empty accepts any.
    type: list
    elements: str
    default: [wav, WAV, mp3, gsm, ogg]
  max_files:
    description: Most files one ZIP may hold (0 for no limit).
    type: int
    default: 2000
  max_bytes:
    description: Most bytes one ZIP may hold (0 for no limit).
    type: int
    default: 2147483648
  max_days:
    description: Longest window in calendar days (0 for no limit).
    type: int
    default: 92
  files_cap:
    description: At most this many file names in RV(files).
    type: int
    default: 200
  publish_dir:
    description: Folder served under O(base_url); it must exist.
    type: path
    required: true
  base_url:
    description: URL of O(publish_dir).
    type: str
    required: true
  mode:
    description: Mode of the published ZIP.
    type: raw
    default: "0644"
  compression:
    description: V(stored) (fast; audio compresses little) or V(deflated).
    type: str
    choices: [stored, deflated]
    default: stored
  expires_after:
    description: Seconds after which the playbook removes a published ZIP (reported as RV(expires)); 0 for none.
    type: int
    default: 0
attributes:
  check_mode:
    support: full
    description: Selects and counts, writes no ZIP.
  diff_mode:
    support: full
    description: The ZIP's entries as the diff.
notes:
  - Runs on Python 2.7, 3.6 and later.
"""

EXAMPLES = r"""
- name: Select the recordings of 1121 and 1122 on 4 November and publish them.
  recordings_select:
    root: /var/spool/asterisk/monitor
    extensions: ["1121", "1122"]
    start: "2025-11-04 00:00"
    end: "2025-11-04 23:59"
    request_id: 20251104_120000_ab12cd
    publish_dir: /var/www/html/recordings
    base_url: https://audio.example.com/recordings
  register: recordings_selection
"""

RETURN = r"""
url:
  description: Download URL of the ZIP (null when nothing was zipped or in check mode before the ZIP exists).
  type: str
  returned: always
zip_path:
  description: Path of the published ZIP on the host.
  type: str
  returned: always
expires:
  description: When the playbook will remove the ZIP (UTC, ISO 8601), null without O(expires_after).
  type: str
  returned: always
scanned:
  description: Directory entries examined.
  type: int
  returned: always
dirs_listed:
  description: Folders listed (day folders of the window in a dated tree).
  type: int
  returned: always
selected:
  description: Recordings selected.
  type: int
  returned: always
bytes:
  description: Total size of the selected recordings.
  type: int
  returned: always
per_extension:
  description: Recordings per requested extension (a call between two requested extensions counts for both).
  type: dict
  returned: always
per_extension_bytes:
  description: Bytes per requested extension.
  type: dict
  returned: always
files:
  description: Selected paths relative to the root, at most O(files_cap), in call order.
  type: list
  elements: str
  returned: always
files_capped:
  description: True when RV(files) was shortened to O(files_cap).
  type: bool
  returned: always
too_many:
  description: True when a limit was exceeded and no ZIP was made.
  type: bool
  returned: always
nothing_found:
  description: True when no recording matched.
  type: bool
  returned: always
criteria:
  description: The request as understood (extensions, start, end, layout).
  type: dict
  returned: always
msg:
  description: One sentence for the requester.
  type: str
  returned: always
"""

import binascii
import os
import re
import time
import traceback

from ansible.module_utils.athome_recordings import (
    DEFAULT_EXTENSION_FIELDS,
    DEFAULT_PATTERN,
    NameMatcher,
    RecordingsError,
    Window,
    check_request_id,
    criteria,
    human_bytes,
    normalize_extensions,
    select_local,
    summary,
    write_local_zip,
    zip_comment,
)
from ansible.module_utils.basic import AnsibleModule

COMMENT_PREFIX = "athome-recordings sha256="


def iso_utc(ts):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def existing_zips(publish_dir, request_id):
    rx = re.compile(r"^%s-[0-9a-f]{16}\.zip$" % re.escape(request_id))
    try:
        names = os.listdir(publish_dir)
    except OSError:
        return []
    return sorted(os.path.join(publish_dir, n) for n in names if rx.match(n))


def main():
    module = AnsibleModule(
        argument_spec=dict(
            root=dict(type="path", required=True),
            layout=dict(type="str", choices=["dated", "flat"], default="dated"),
            dir_format=dict(type="str", default="%Y/%m/%d"),
            extensions=dict(type="list", elements="str", required=True),
            start=dict(type="str", required=True),
            end=dict(type="str", required=True),
            request_id=dict(type="str", required=True),
            name_pattern=dict(type="str", default=""),
            extension_fields=dict(type="dict", default=DEFAULT_EXTENSION_FIELDS),
            suffixes=dict(type="list", elements="str", default=["wav", "WAV", "mp3", "gsm", "ogg"]),
            max_files=dict(type="int", default=2000),
            max_bytes=dict(type="int", default=2147483648),
            max_days=dict(type="int", default=92),
            files_cap=dict(type="int", default=200),
            publish_dir=dict(type="path", required=True),
            base_url=dict(type="str", required=True),
            mode=dict(type="raw", default="0644"),
            compression=dict(type="str", choices=["stored", "deflated"], default="stored"),
            expires_after=dict(type="int", default=0),
        ),
        supports_check_mode=True,
    )
    p = module.params
    echo = criteria(p["extensions"], p["start"], p["end"], p["layout"])
    result = dict(
        changed=False, url=None, zip_path=None, expires=None, too_many=False, nothing_found=False,
        criteria=echo, scanned=0, dirs_listed=0, selected=0, bytes=0, per_extension={},
        per_extension_bytes={}, files=[], files_capped=False,
    )
    try:
        extensions = normalize_extensions(p["extensions"])
        echo["extensions"] = extensions
        check_request_id(p["request_id"])
        window = Window(p["start"], p["end"], p["max_days"])
        matcher = NameMatcher(
            extensions, window, p["name_pattern"] or DEFAULT_PATTERN, p["extension_fields"], p["suffixes"]
        )
        selection = select_local(p["root"], matcher, p["layout"], p["dir_format"])
    except RecordingsError as exc:
        module.fail_json(msg=str(exc), **result)
    except re.error as exc:
        module.fail_json(msg="name_pattern is not a valid regular expression: %s" % exc, **result)

    result.update(summary(selection, extensions, p["files_cap"]))
    result["dirs_listed"] = selection.dirs_listed
    what = "extensions %s between %s and %s" % (", ".join(extensions), p["start"], p["end"])

    if not selection.items:
        result["nothing_found"] = True
        result["msg"] = "No recordings found for %s (%d files scanned)." % (what, selection.scanned)
        module.exit_json(**result)

    refusal = selection.over_limits(p["max_files"], p["max_bytes"])
    if refusal:
        result["too_many"] = True
        result["msg"] = "Nothing zipped for %s: %s." % (what, refusal)
        module.exit_json(**result)

    comment = COMMENT_PREFIX + selection.digest()
    publish_dir = p["publish_dir"]
    base_url = p["base_url"].rstrip("/")
    previous = existing_zips(publish_dir, p["request_id"])
    reuse = [z for z in previous if zip_comment(z) == comment]
    if reuse:
        path = reuse[0]
    else:
        token = binascii.hexlify(os.urandom(8)).decode("ascii")
        path = os.path.join(publish_dir, "%s-%s.zip" % (p["request_id"], token))
        result["changed"] = True
        if module._diff:
            result["diff"] = dict(
                before_header=path, before="",
                after_header=path, after="".join(i["path"] + "\n" for i in selection.items),
            )
        if not module.check_mode:
            if not os.path.isdir(publish_dir):
                module.fail_json(msg="publish_dir %s does not exist" % publish_dir, **result)
            tmp = os.path.join(publish_dir, ".%s.part" % os.path.basename(path))
            try:
                write_local_zip(selection, tmp, p["compression"], comment)
                module.set_mode_if_different(tmp, p["mode"], False)
                os.rename(tmp, path)
            except Exception as exc:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                module.fail_json(msg="could not write the ZIP: %s" % exc,
                                 exception=traceback.format_exc(), **result)
            for old in previous:
                os.unlink(old)  # an older selection under the same request id
    exists = os.path.exists(path)
    result["zip_path"] = path
    result["url"] = base_url + "/" + os.path.basename(path) if exists else None
    if exists:
        result["zip_bytes"] = os.path.getsize(path)
        if p["expires_after"]:
            result["expires"] = iso_utc(os.path.getmtime(path) + p["expires_after"])
    result["msg"] = "%d recordings (%s) for %s." % (selection.selected, human_bytes(selection.bytes), what)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
