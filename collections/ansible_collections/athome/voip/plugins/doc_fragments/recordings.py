# -*- coding: utf-8 -*-
# Copyright: athome-ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The selection options of recordings_select and recordings_s3_select.

Their argument spec is module_utils/recordings.py selection_argument_spec(): the
sanity test validate-modules checks that both say the same thing.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    DOCUMENTATION = r"""
options:
  layout:
    description:
      - V(dated) for day folders (day key prefixes in S3) below the root, see O(dir_format);
        V(flat) for one folder (one prefix) holding every recording.
    type: str
    choices: [dated, flat]
    default: dated
  dir_format:
    description: Day folder (day key prefix) below the root, with C(%Y), C(%m), C(%d) placeholders.
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
    description:
      - Last minute of the window (inclusive), C(YYYY-MM-DD HH:MM).
      - Equal to O(start) is a one-minute window.
    type: str
    required: true
  request_id:
    description: Request id (letters, digits, C(_) and C(-)); it names the ZIP.
    type: str
    required: true
  name_pattern:
    description:
      - Regular expression for a recording's file name, with named groups C(date) (YYYYMMDD), C(time) (HHMMSS),
        the fields named in O(extension_fields), and optionally C(direction) and C(suffix).
      - Empty means the FreePBX default, C(<direction>-<dst>-<src>-YYYYMMDD-HHMMSS-<uniqueid>.<suffix>).
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
    description: At most this many names in RV(files).
    type: int
    default: 200
  compression:
    description: V(stored) (fast; audio compresses little) or V(deflated).
    type: str
    choices: [stored, deflated]
    default: stored
"""
