# -*- coding: utf-8 -*-
# Copyright: athome-ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The options of endpoint_mac and endpoint_mac_info that name and read the two endpoint files
(module_utils/endpoint_files.py)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    DOCUMENTATION = r"""
options:
  endpoints_def:
    description: Path of C(__ENDPOINTS__.DEF). Symlinks are followed.
    type: path
    required: true
  endpoints_sip:
    description: Path of C(endpoints_sip.def). Symlinks are followed.
    type: path
    required: true
  rules:
    description:
      - How each endpoint file is read, per file (keys C(endpoints_def), C(endpoints_sip)); any
        entry given replaces that entry of the default, the others keep theirs.
      - C(record) is a list of regexes (multi-line mode), each finding whole records with the
        named groups C(ext) (the extension) and C(body) (where the MAC is looked for). A match
        that starts inside an earlier record does not count.
      - C(mac) is a regex with the named group C(mac), searched in the body; more than one
        hit makes the record ambiguous.
      - C(empty) lists the values read as "no MAC"; the first is what a removal writes.
      - C(comment) is a regex (multi-line mode) of whole comment lines, blanked before matching.
      - C(candidate) is a regex searched in each line outside every record; a hit is reported
        by M(athome.voip.endpoint_mac_info) as a line that looks like a record but did not parse.
      - >-
        The default for C(endpoints_sip.def) takes the extension as the first field of a line,
        whatever the separator (C(;), C(|), C(,), tab, spaces), or as a C([3010]) section header
        whose record runs to the next C([) line, with C(MAC:value) (or C(MAC=value)) anywhere in
        that line or record, a trailing C(;) comment included; C(OLDMAC:) does not match. For
        C(__ENDPOINTS__.DEF) it is C('EXT': {...}) with the C('serialnumber') value. In both files
        a line whose first non-blank character is C(#) or C(;) is a comment.
    type: dict
    default: {}
"""
