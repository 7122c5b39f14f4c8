#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: athome-ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Runs on the recordings host: Python 2.7 (CentOS 7), 3.6 and 3.11.

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: recordings_legacy_enqueue
short_description: Hand a recordings request to the legacy queue of the recordings host.
description:
  - Writes C(<pending_dir>/<request_id>.json) in exactly the legacy shape (parameters ramais/inicio/fim/email,
    request_id, timestamp_received, from_email, status pending, retries 0).
  - The file is written under a hidden temporary name, fsynced, then linked to its final name, so the
    legacy worker never sees half a file and an existing request is never overwritten.
  - Idempotent; a request id already in O(pending_dir) or in one of O(other_dirs) with the same parameters
    is not written again; with different parameters the module fails.
version_added: "1.0.0"
author: athome-ops (@athome-ops)
options:
  pending_dir:
    description: The legacy queue's pending folder; it must exist.
    type: path
    required: true
  other_dirs:
    description: Queue folders (processing, completed, failed) where an already handed request may be.
    type: list
    elements: path
    default: []
  request_id:
    description: Unique request id; names the file.
    type: str
    required: true
  extensions:
    description: Extensions (digit strings).
    type: list
    elements: str
    required: true
  start:
    description: First minute, C(YYYY-MM-DD HH:MM) (written as C(DD/MM/YYYY HH:MM)).
    type: str
    required: true
  end:
    description: Last minute, C(YYYY-MM-DD HH:MM).
    type: str
    required: true
  requester:
    description: Email address of the requester (C(email) and C(from_email)).
    type: str
    required: true
  received:
    description: C(timestamp_received) (C(YYYY-MM-DD HH:MM:SS)); default now on the host.
    type: str
    default: ""
extends_documentation_fragment:
  - athome.voip.attributes
"""

EXAMPLES = r"""
- name: Queue the request for the legacy processor.
  recordings_legacy_enqueue:
    pending_dir: /root/sandbox/fila_audios/pending
    other_dirs: [/root/sandbox/fila_audios/processing, /root/sandbox/fila_audios/completed]
    request_id: 20251111_150122_ab12cd
    extensions: ["1121", "1122"]
    start: "2025-09-29 00:00"
    end: "2025-10-27 23:59"
    requester: user@example.com
"""

RETURN = r"""
path:
  description: The queued file (or the place where the same request already was).
  type: str
  returned: always
request_id:
  description: The request id written.
  type: str
  returned: always
document:
  description: The JSON document.
  type: dict
  returned: always
"""

import io
import json
import os
import time

from ansible_collections.athome.voip.plugins.module_utils.recordings import (
    RecordingsError,
    legacy_json,
    legacy_request,
    same_legacy_request,
    write_exclusive,
)
from ansible.module_utils.basic import AnsibleModule


def main():
    module = AnsibleModule(
        argument_spec=dict(
            pending_dir=dict(type="path", required=True),
            other_dirs=dict(type="list", elements="path", default=[]),
            request_id=dict(type="str", required=True),
            extensions=dict(type="list", elements="str", required=True),
            start=dict(type="str", required=True),
            end=dict(type="str", required=True),
            requester=dict(type="str", required=True),
            received=dict(type="str", default=""),
        ),
        supports_check_mode=True,
    )
    p = module.params
    received = p["received"] or time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        doc = legacy_request(p["extensions"], p["start"], p["end"], p["requester"], p["request_id"], received)
    except RecordingsError as exc:
        module.fail_json(msg=str(exc))
    name = p["request_id"] + ".json"
    text = legacy_json(doc)
    result = dict(changed=False, request_id=p["request_id"], document=json.loads(text))

    for folder in [p["pending_dir"]] + p["other_dirs"]:
        candidate = os.path.join(folder, name)
        if os.path.exists(candidate):
            with io.open(candidate, encoding="utf-8") as f:
                existing = f.read()
            if not same_legacy_request(existing, doc):
                module.fail_json(
                    msg="request id %s is already queued with other parameters (%s)" % (p["request_id"], candidate),
                    **result
                )
            result["path"] = candidate
            module.exit_json(**result)

    path = os.path.join(p["pending_dir"], name)
    result.update(changed=True, path=path)
    if module._diff:
        result["diff"] = dict(before_header=path, before="", after_header=path, after=text)
    if not module.check_mode:
        if not os.path.isdir(p["pending_dir"]):
            module.fail_json(msg="pending_dir %s does not exist" % p["pending_dir"], **result)
        try:
            write_exclusive(p["pending_dir"], name, text)
        except OSError as exc:
            module.fail_json(msg="could not queue %s: %s" % (path, exc), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
