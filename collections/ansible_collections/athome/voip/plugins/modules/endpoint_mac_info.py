#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: athome-ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# athome-ops: how a host's endpoint files parse (MACCHANGE probe). Read only.
# Runs on target Python 2.7, 3.6 and 3.x: no f-strings, no annotations.

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: endpoint_mac_info
short_description: Report how the two endpoint definition files parse
description:
  - >-
    Reads C(__ENDPOINTS__.DEF) and C(endpoints_sip.def) with the rules
    M(athome.voip.endpoint_mac) uses and reports, per file, the extensions found,
    duplicated extensions and MACs, records whose MAC field is missing, doubled or not a
    MAC, and lines that look like records but did not parse; and the extensions that
    only one of the two files has.
  - It never changes anything; it runs the same in check mode.
  - Run it (C(playbooks/macchange.yml -e probe=true)) before trusting the rules on a new
    server, and after adapting them with O(rules).
version_added: "1.1.0"
author: athome-ops (@athome-ops)
options:
  cap:
    description: At most this many entries in each list of problems (the counts are exact).
    type: int
    default: 50
extends_documentation_fragment:
  - athome.voip.attributes
  - athome.voip.endpoint_files
attributes:
  check_mode:
    details: It never modifies anything.
  diff_mode:
    support: none
seealso:
  - module: athome.voip.endpoint_mac
"""

EXAMPLES = r"""
- name: Report how the endpoint files parse.
  athome.voip.endpoint_mac_info:
    endpoints_def: /etc/asterisk/__ENDPOINTS__.DEF
    endpoints_sip: /etc/asterisk/endpoints_sip.def
  register: endpoint_probe

- name: Try a site's own rule for endpoints_sip.def (extension in the second field).
  athome.voip.endpoint_mac_info:
    endpoints_def: /etc/asterisk/__ENDPOINTS__.DEF
    endpoints_sip: /etc/asterisk/endpoints_sip.def
    rules:
      endpoints_sip:
        record:
          - '^[^;\r\n]*;(?P<ext>[0-9]+)(?P<body>[^\r\n]*)'
"""

RETURN = r"""
files:
  description:
    - Per file (C(endpoints_def), C(endpoints_sip)) how it parses.
    - C(path); C(records) how many records; C(extensions) every extension found (sorted);
      C(duplicate_extensions) extensions with more than one record; C(duplicate_macs)
      MAC -> the extensions holding it, when more than one does; C(without_mac) extensions
      whose record holds no MAC; C(bad_records) records with no MAC field, two MAC fields
      or a value that is not a MAC (C(extension), C(holds), C(text) its first line) and
      C(bad_records_count); C(unparsed) lines that look like records but are in none
      (C(line) number, C(text)) and C(unparsed_count).
  returned: always
  type: dict
  sample:
    endpoints_sip:
      path: /etc/asterisk/endpoints_sip.def
      records: 41
      extensions: ["2001", "2002", "3010"]
      duplicate_extensions: []
      duplicate_macs: {"805EC09B49F3": ["2001", "2003"]}
      without_mac: ["2010"]
      bad_records: []
      bad_records_count: 0
      unparsed: [{line: 12, text: "ext=3050;MAC:0004F2000001"}]
      unparsed_count: 1
only_in:
  description: Per file, the extensions that the other file does not have.
  returned: always
  type: dict
  sample: {endpoints_def: ["3050"], endpoints_sip: []}
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.athome.voip.plugins.module_utils.endpoint_files import (
    FILES,
    LABELS,
    all_rules,
    as_display,
    compare,
    survey,
)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            endpoints_def=dict(type="path", required=True),
            endpoints_sip=dict(type="path", required=True),
            cap=dict(type="int", default=50),
            rules=dict(type="dict", default={}),
        ),
        supports_check_mode=True,
    )
    try:
        rules = all_rules(module.params["rules"])
    except ValueError as exc:
        module.fail_json(msg="bad rules: %s" % exc)
    surveys = {}
    for key in FILES:
        path = os.path.realpath(module.params[key])
        try:
            with open(path, "rb") as handle:
                text = handle.read().decode("latin-1")
        except (IOError, OSError) as exc:
            module.fail_json(msg="cannot read %s (%s): %s" % (LABELS[key], path, exc))
        found = survey(text, rules[key], module.params["cap"])
        for item in found["bad_records"] + found["unparsed"]:
            item["text"] = as_display(item["text"])
        found["path"] = path
        surveys[key] = found
    module.exit_json(changed=False, files=surveys, only_in=compare(surveys))


if __name__ == "__main__":
    main()
