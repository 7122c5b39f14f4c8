#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: athome-ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
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
  - Above O(max_files) or O(max_bytes) nothing is zipped and RV(too_many) says why; a ZIP is never truncated.
    The scan stops at the first file past a limit (O(max_files) + 1 files).
  - Every selected file is opened with C(O_NOFOLLOW), checked with C(fstat) to be the regular file (same
    device and inode) that was selected, and zipped from that descriptor, so a recording swapped for a
    symlink or a link to another file between selection and zipping fails the run instead of putting
    that file into the ZIP.
  - Running again with the same O(request_id) and the same selection reuses the ZIP (not changed).
version_added: "1.0.0"
author: athome-ops (@athome-ops)
options:
  root:
    description: Root of the recordings tree.
    type: path
    required: true
  request_id:
    description: Request id; names the ZIP (C(<request_id>-<random>.zip)).
  publish_dir:
    description: Folder served under O(base_url); it must exist.
    type: path
    required: true
  base_url:
    description: URL of O(publish_dir).
    type: str
    required: true
  mode:
    description: Mode of the published ZIP (readable by O(group), the web server's, and by no one else).
    type: raw
    default: "0640"
  group:
    description: Group of the published ZIP (the web server's); unset keeps the default group.
    type: str
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
extends_documentation_fragment:
  - athome.voip.attributes
  - athome.voip.recordings
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

from ansible_collections.athome.voip.plugins.module_utils.recordings import (
    DEFAULT_PATTERN,
    NameMatcher,
    RecordingsError,
    Window,
    check_request_id,
    criteria,
    human_bytes,
    normalize_extensions,
    select_local,
    selection_argument_spec,
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
    argument_spec = selection_argument_spec()
    argument_spec.update(
        root=dict(type="path", required=True),
        publish_dir=dict(type="path", required=True),
        base_url=dict(type="str", required=True),
        mode=dict(type="raw", default="0640"),
        group=dict(type="str"),
        expires_after=dict(type="int", default=0),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
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
        selection = select_local(
            p["root"], matcher, p["layout"], p["dir_format"], max_files=p["max_files"], max_bytes=p["max_bytes"]
        )
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
                if p["group"]:
                    module.set_group_if_different(tmp, p["group"], False)
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
