#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: athome-ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# athome-ops: move a phone's MAC address between extensions (MACCHANGE).
# Runs on target Python 2.7, 3.6 and 3.x: no f-strings, no annotations.

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: endpoint_mac
short_description: Change an extension's MAC address in both endpoint definition files
description:
  - >-
    Edits the MAC address bound to one extension in C(__ENDPOINTS__.DEF)
    (C('serialnumber': '...') in the extension's record) and in C(endpoints_sip.def)
    (C(MAC:...) on the extension's line), keeping the two files in agreement.
  - >-
    The operation follows from which MAC is empty. Both set means V(replace), an empty
    O(mac_new) means V(remove) (the files get C('serialnumber': '') and C(MAC:None)),
    and an empty O(mac_current) means V(add).
  - The extension must exist in both files and hold O(mac_current) in both.
    Otherwise the module fails with a message that says what each file holds, and it
    writes nothing. It also refuses a O(mac_new) that another extension already holds.
  - >-
    One file holding O(mac_current) and the other O(mac_new) is a change cut short
    (the process killed between the two writes). The module completes it, writing the
    file that still holds O(mac_current), and says so in RV(mac_warnings).
  - Both files are backed up with a timestamp, then written atomically (a temporary
    file in the same directory, renamed over the original). If writing the second file
    fails, the first one is put back, so a failed write never leaves them disagreeing.
  - Owner, group, mode and every byte outside the changed values are preserved.
  - The rules that find an extension's record and its MAC are regexes (O(rules)); the
    defaults tolerate the layouts seen in the field, and the README of the role
    athome.voip.endpoint_mac documents them. M(athome.voip.endpoint_mac_info) reports how
    a host's files parse with the same rules, changing nothing.
version_added: "0.1.0"
author: athome-ops (@athome-ops)
options:
  extension:
    description: The extension (digits only) whose MAC changes.
    type: str
    required: true
  mac_current:
    description:
      - The MAC the extension holds now in both files (MACATUAL); empty for V(add).
      - Separators C(:), C(-), C(.) and lower case are accepted; the module compares
        and writes 12 upper-case hex digits.
    type: str
    default: ""
  mac_new:
    description: The MAC the extension must hold afterwards (MACFUTURO); empty for V(remove).
    type: str
    default: ""
  backup:
    description: Copy both files to timestamped backups before writing.
    type: bool
    default: true
  backup_dir:
    description:
      - Directory for the backups, created with mode 0700 when missing.
      - Empty means next to each file.
    type: path
    default: ""
  backup_keep:
    description:
      - How many backups of each file to keep after a change; older ones are removed.
      - V(0) keeps them all.
    type: int
    default: 0
  monitor_pending_file:
    description:
      - A file that says the provisioning monitor has not yet heard of the last change.
        Before writing, the module creates it; whoever notifies the monitor removes it
        once the monitor answered (the role's handler does).
      - So a run killed between the change and the notification, or a notification that
        failed, is not forgotten; the next run finds the files already changed
        (C(changed=false)) and RV(monitor_pending) true, and notifies.
      - Empty means no such file (nothing remembers a missed notification).
    version_added: "1.2.0"
    type: path
    default: ""
extends_documentation_fragment:
  - athome.voip.attributes
  - athome.voip.endpoint_files
notes:
  - Backups are named C(<file name>.<YYYYmmdd_HHMMSS>.bak) (the legacy timestamp), with a
    C(_N) suffix when that name is already taken.
seealso:
  - module: athome.voip.endpoint_mac_info
"""

EXAMPLES = r"""
- name: Replace the MAC of extension 3010.
  endpoint_mac:
    endpoints_def: /etc/asterisk/__ENDPOINTS__.DEF
    endpoints_sip: /etc/asterisk/endpoints_sip.def
    extension: "3010"
    mac_current: "010203040506"
    mac_new: "01:02:03:04:05:99"

- name: Remove the MAC of extension 3010, keeping the last 10 backups.
  endpoint_mac:
    endpoints_def: /etc/asterisk/__ENDPOINTS__.DEF
    endpoints_sip: /etc/asterisk/endpoints_sip.def
    extension: "3010"
    mac_current: "010203040599"
    mac_new: ""
    backup_keep: 10

- name: Bind a phone to extension 3010, which has none.
  endpoint_mac:
    endpoints_def: /etc/asterisk/__ENDPOINTS__.DEF
    endpoints_sip: /etc/asterisk/endpoints_sip.def
    extension: "3010"
    mac_current: ""
    mac_new: "010203040588"
  register: mac_change
"""

RETURN = r"""
operation:
  description: What the request does.
  returned: always
  type: str
  sample: replace
extension:
  description: The extension edited.
  returned: always
  type: str
  sample: "3010"
mac_current:
  description: O(mac_current) normalised (empty for add).
  returned: always
  type: str
  sample: "010203040506"
mac_new:
  description: O(mac_new) normalised (empty for remove).
  returned: always
  type: str
  sample: "010203040599"
endpoints_def:
  description: C(__ENDPOINTS__.DEF) path, the line holding the MAC before and after, its backup.
  returned: success
  type: dict
  sample:
    path: /etc/asterisk/__ENDPOINTS__.DEF
    before: "'serialnumber': '010203040506',"
    after: "'serialnumber': '010203040599',"
    backup: /etc/asterisk/__ENDPOINTS__.DEF.20251111_202744.bak
endpoints_sip:
  description: The same for C(endpoints_sip.def).
  returned: success
  type: dict
  sample:
    path: /etc/asterisk/endpoints_sip.def
    before: "3010;MAC:010203040506;MODEL:yealink_t46s"
    after: "3010;MAC:010203040599;MODEL:yealink_t46s"
    backup: /etc/asterisk/endpoints_sip.def.20251111_202744.bak
backups:
  description: Backups written by this run (empty when nothing changed or in check mode).
  returned: always
  type: list
  elements: str
backups_pruned:
  description: Old backups removed because of O(backup_keep).
  returned: always
  type: list
  elements: str
mac_warnings:
  description:
    - Things the operator should know that do not stop the change, for example other
      extensions that also have no MAC (on V(add)). They are also emitted as warnings.
  returned: always
  type: list
  elements: str
monitor_pending:
  description:
    - O(monitor_pending_file) exists after the run, because this run changed the files
      or an earlier change was not notified yet. Always false without O(monitor_pending_file).
  returned: always
  type: bool
reason:
  description:
    - Why the module failed, as one word, for a reply in the requester's language
      (C(msg) says it in words for the operator).
    - V(invalid) the request itself (extension, MACs); V(not_found) the extension is in
      neither file; V(ambiguous) not exactly once in each file; V(mismatch) the files do
      not both hold O(mac_current); V(mac_in_use) another extension holds O(mac_new);
      V(file_missing), V(unreadable) a file; V(backup_failed); V(changed_meanwhile) a file
      changed while the change was prepared; V(write_failed) a write failed and both files
      are as they were; V(restore_failed) the first file could not be put back, so the two
      files disagree.
    - Nothing was written in every case but V(restore_failed).
  returned: failure
  type: str
  sample: mismatch
"""

import errno
import os
import re
import shutil
import stat
import tempfile
import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.athome.voip.plugins.module_utils.endpoint_files import (
    FILES,
    all_rules,
    as_display,
    describe,
    line_at,
    normalize_mac,
    others_holding,
    parse_records,
)

# The default rules, compiled (module_utils/endpoint_files.py RULES; option rules overrides them).
FILE_RULES = all_rules()
BACKUP_STAMP = "%Y%m%d_%H%M%S"
EXTENSION_RE = re.compile(r"^[0-9]{1,10}$")


class MacChangeError(Exception):
    """A request the files cannot satisfy; the message is meant for the operator, the
    reason (a word of RETURN's `reason`) lets a reply say it in the requester's words."""

    def __init__(self, message, reason):
        Exception.__init__(self, message)
        self.reason = reason


def plan_change(texts, extension, mac_current, mac_new, rules=None):
    """Decide what to do; pure.

    texts: {'endpoints_def': text, 'endpoints_sip': text} (any str type, decoded
    byte-for-byte, e.g. latin-1); rules: compiled rules per file (default FILE_RULES).
    Returns a dict with operation, changed,
    warnings and per file {before, after, text}; raises MacChangeError with a
    message for the operator when the request cannot be applied.
    """
    if not EXTENSION_RE.match(extension or ""):
        raise MacChangeError("extension %r must be digits only" % (extension,), "invalid")
    try:
        current = normalize_mac(mac_current)
        new = normalize_mac(mac_new)
    except ValueError as exc:
        raise MacChangeError(str(exc), "invalid")
    if not current and not new:
        raise MacChangeError("mac_current and mac_new are both empty: nothing to do", "invalid")
    if current == new:
        raise MacChangeError("mac_current and mac_new are the same (%s)" % current, "invalid")
    operation = "replace" if current and new else ("remove" if current else "add")
    file_rules = rules or FILE_RULES

    records, found, states = {}, {}, []
    for key in FILES:
        records[key] = parse_records(texts[key], file_rules[key])
        found[key] = [r for r in records[key] if r.ext == extension]
        states.append("%s holds %s" % (file_rules[key]["label"], describe(file_rules[key], found[key])))
    held = []
    for key in ("endpoints_def", "endpoints_sip"):
        usable = len(found[key]) == 1 and found[key][0].count == 1
        held.append(found[key][0].mac if usable else None)

    to_change = [held[i] == current for i in range(2)]
    if held == [new, new]:
        changed = False
    elif all(mac in (current, new) for mac in held):
        changed = True  # both hold current, or one already holds new: a change cut short
    else:
        if all(len(found[k]) == 0 for k in found):
            what, reason = "extension %s is in neither file" % extension, "not_found"
        elif any(len(found[k]) != 1 for k in found):
            what, reason = "extension %s is not exactly once in each file" % extension, "ambiguous"
        else:
            what = "extension %s does not hold MAC %s in both files" % (
                extension, current or "'' (empty)")
            reason = "mismatch"
        raise MacChangeError("%s: %s. Nothing was written." % (what, "; ".join(states)), reason)

    warnings = []
    if changed and not all(to_change):
        done, left = [file_rules[k]["label"] for k, c in zip(FILES, to_change) if not c], \
            [file_rules[k]["label"] for k, c in zip(FILES, to_change) if c]
        warnings.append("%s already held %s (a change cut short): only %s was changed" % (
            ", ".join(done), new or "no MAC", ", ".join(left)))
    if new:
        where = {}
        for key in ("endpoints_def", "endpoints_sip"):
            for ext in others_holding(records[key], extension, new):
                where.setdefault(ext, []).append(file_rules[key]["label"])
        holders = ["%s (%s)" % (ext, ", ".join(where[ext])) for ext in sorted(where, key=int)]
        if holders and changed:
            raise MacChangeError(
                "MAC %s is already held by extension %s. Nothing was written."
                % (new, ", ".join(holders)), "mac_in_use")
        if holders:
            warnings.append("MAC %s is also held by extension %s" % (new, ", ".join(holders)))
    if operation == "add":
        empty = []
        for key in ("endpoints_def", "endpoints_sip"):
            for ext in others_holding(records[key], extension, ""):
                if ext not in empty:
                    empty.append(ext)
        if empty:
            warnings.append(
                "other extensions also have no MAC: %s" % ", ".join(sorted(empty, key=int)))

    files = {}
    for key, change in zip(FILES, to_change):
        text, rec = texts[key], found[key][0]
        value = new if new else file_rules[key]["empty"][0]
        change = changed and change
        after_text = text[:rec.start] + value + text[rec.end:] if change else text
        after_end = rec.start + len(value) if change else rec.end
        files[key] = {
            "before": line_at(text, rec.start, rec.end),
            "after": line_at(after_text, rec.start, after_end),
            "text": after_text,
            "changed": change,
        }
    return {
        "operation": operation,
        "changed": changed,
        "mac_current": current,
        "mac_new": new,
        "warnings": warnings,
        "files": files,
    }


def backup_name(path, stamp, suffix=0):
    """<path>.<stamp>.bak, or <path>.<stamp>_<suffix>.bak."""
    return "%s.%s%s.bak" % (path, stamp, "_%d" % suffix if suffix else "")


def prunable_backups(names, base, keep):
    """Backup file names of `base` beyond the newest `keep`, oldest first."""
    if keep <= 0:
        return []
    pattern = re.compile(r"^%s\.([0-9]{8}_[0-9]{6})(?:_([0-9]+))?\.bak$" % re.escape(base))
    dated = []
    for name in names:
        match = pattern.match(name)
        if match:
            dated.append(((match.group(1), int(match.group(2) or 0)), name))
    dated.sort()
    return [name for _key, name in dated[:-keep]] if len(dated) > keep else []


# ---------------------------------------------------------------------- I/O


def read_text(path):
    with open(path, "rb") as handle:
        return handle.read().decode("latin-1")


def fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path, data, prepare=None):
    """Write bytes to a temp file next to `path`, keep owner and mode, rename it over.

    Like AnsibleModule.atomic_move, but raising instead of calling fail_json, so that
    the caller can still put the first file back when the second one fails.
    `prepare(tmp, path)` runs before the rename (the SELinux context, for one).
    """
    info = os.stat(path)
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".%s." % os.path.basename(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, stat.S_IMODE(info.st_mode))
        try:
            os.chown(tmp, info.st_uid, info.st_gid)
        except OSError as exc:
            if exc.errno != errno.EPERM or os.geteuid() == 0:
                raise
        if prepare is not None:
            prepare(tmp, path)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory)


def write_pending(path, text):
    """The monitor-pending file, written through to disk (it must survive what it guards against)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(os.path.dirname(path) or ".")


def make_backups(paths, backup_dir):
    """Copy every path to <dir>/<name>.<stamp>.bak (one stamp for all); returns the copies."""
    stamp = time.strftime(BACKUP_STAMP)
    targets = []
    for suffix in range(0, 1000):
        targets = [
            backup_name(os.path.join(backup_dir or os.path.dirname(p), os.path.basename(p)), stamp, suffix)
            for p in paths
        ]
        if not any(os.path.lexists(t) for t in targets):
            break
    done = []
    for src, dest in zip(paths, targets):
        shutil.copy2(src, dest)
        info = os.stat(src)
        try:
            os.chown(dest, info.st_uid, info.st_gid)
        except OSError:
            pass
        done.append(dest)
    return done


def prune_backups(path, backup_dir, keep):
    directory = backup_dir or os.path.dirname(path)
    removed = []
    for name in prunable_backups(os.listdir(directory), os.path.basename(path), keep):
        victim = os.path.join(directory, name)
        os.unlink(victim)
        removed.append(victim)
    return removed


def main():
    module = AnsibleModule(
        argument_spec=dict(
            endpoints_def=dict(type="path", required=True),
            endpoints_sip=dict(type="path", required=True),
            extension=dict(type="str", required=True),
            mac_current=dict(type="str", default=""),
            mac_new=dict(type="str", default=""),
            backup=dict(type="bool", default=True),
            backup_dir=dict(type="path", default=""),
            backup_keep=dict(type="int", default=0),
            rules=dict(type="dict", default={}),
            monitor_pending_file=dict(type="path", default=""),
        ),
        supports_check_mode=True,
    )
    params = module.params
    extension = (params["extension"] or "").strip()
    keys = ("endpoints_def", "endpoints_sip")
    paths = dict((k, os.path.realpath(params[k])) for k in keys)
    result = dict(
        changed=False,
        extension=extension,
        operation="",
        mac_current="",
        mac_new="",
        backups=[],
        backups_pruned=[],
        mac_warnings=[],
        monitor_pending=False,
    )
    pending_file = params["monitor_pending_file"]

    try:
        rules = all_rules(params["rules"])
    except ValueError as exc:
        module.fail_json(msg="bad rules: %s. Nothing was written." % exc, reason="invalid", **result)

    texts = {}
    for key in keys:
        label = FILE_RULES[key]["label"]
        if not os.path.isfile(paths[key]):
            module.fail_json(msg="%s not found at %s. Nothing was written." % (label, paths[key]),
                             reason="file_missing", **result)
        try:
            texts[key] = read_text(paths[key])
        except (IOError, OSError) as exc:
            module.fail_json(msg="cannot read %s (%s): %s" % (label, paths[key], exc), reason="unreadable",
                             **result)

    try:
        plan = plan_change(texts, extension, params["mac_current"], params["mac_new"], rules)
    except MacChangeError as exc:
        module.fail_json(msg=str(exc), reason=exc.reason, **result)

    result.update(
        changed=plan["changed"],
        operation=plan["operation"],
        mac_current=plan["mac_current"],
        mac_new=plan["mac_new"],
        mac_warnings=plan["warnings"],
    )
    for key in keys:
        result[key] = dict(
            path=paths[key],
            before=as_display(plan["files"][key]["before"]),
            after=as_display(plan["files"][key]["after"]),
            backup="",
        )
    for warning in plan["warnings"]:
        module.warn(warning)

    if plan["changed"] and module._diff:
        result["diff"] = [
            dict(
                before_header=paths[key],
                after_header=paths[key],
                before=as_display(texts[key]),
                after=as_display(plan["files"][key]["text"]),
            )
            for key in keys
        ]

    result["monitor_pending"] = bool(pending_file) and os.path.lexists(pending_file)
    if not plan["changed"]:
        result["msg"] = "extension %s already holds %s in both files" % (
            extension, plan["mac_new"] or "no MAC")
        if result["monitor_pending"]:
            result["msg"] += "; the provisioning monitor has not been notified of it yet"
        module.exit_json(**result)
    if module.check_mode:
        result["msg"] = "would %s the MAC of extension %s" % (plan["operation"], extension)
        module.exit_json(**result)

    backup_dir = params["backup_dir"]
    if params["backup"]:
        try:
            if backup_dir and not os.path.isdir(backup_dir):
                os.makedirs(backup_dir, 0o700)
            result["backups"] = make_backups([paths[k] for k in keys], backup_dir)
        except (IOError, OSError) as exc:
            module.fail_json(msg="cannot back up the endpoint files: %s. Nothing was written." % exc,
                             reason="backup_failed", **result)
        for key, backup in zip(keys, result["backups"]):
            result[key]["backup"] = backup

    # Someone else (the PBX GUI, a hand-run playbook) may have written a file since we
    # read it: never overwrite their change with a plan made on the old content.
    for key in keys:
        try:
            unchanged = read_text(paths[key]) == texts[key]
        except (IOError, OSError):
            unchanged = False
        if not unchanged:
            module.fail_json(msg="%s changed while this change was being prepared. Nothing was "
                             "written; run the command again." % FILE_RULES[key]["label"],
                             reason="changed_meanwhile", **result)

    def keep_context(tmp, path):
        if module.selinux_enabled():
            module.set_context_if_different(tmp, module.selinux_context(path), False)

    pending_before = result["monitor_pending"]

    def nothing_changed():
        """A write failed and both files are as they were: a pending file this run wrote
        would make a later run notify the monitor of a change that did not happen."""
        if pending_file and not pending_before:
            try:
                os.unlink(pending_file)
            except OSError:
                pass
        result["monitor_pending"] = pending_before

    if pending_file:
        try:
            write_pending(pending_file, "extension %s: %s -> %s\n" % (
                extension, plan["mac_current"] or "no MAC", plan["mac_new"] or "no MAC"))
        except (IOError, OSError) as exc:
            module.fail_json(msg="cannot write %s (%s). Nothing was written." % (pending_file, exc),
                             reason="write_failed", **result)
        result["monitor_pending"] = True

    new_bytes = dict((k, plan["files"][k]["text"].encode("latin-1")) for k in keys)
    todo = [k for k in keys if plan["files"][k]["changed"]]
    first, second = (todo + [None])[:2]
    try:
        write_atomically(paths[first], new_bytes[first], keep_context)
    except (IOError, OSError) as exc:
        nothing_changed()
        module.fail_json(msg="cannot write %s (%s): %s. Nothing was written."
                         % (FILE_RULES[first]["label"], paths[first], exc), reason="write_failed", **result)
    try:
        if second is not None:
            write_atomically(paths[second], new_bytes[second], keep_context)
    except (IOError, OSError) as exc:
        failure = "cannot write %s (%s): %s" % (FILE_RULES[second]["label"], paths[second], exc)
        try:
            write_atomically(paths[first], texts[first].encode("latin-1"), keep_context)
        except (IOError, OSError) as exc2:
            module.fail_json(
                msg="%s; restoring %s failed too (%s): the files DISAGREE, restore it from %s"
                % (failure, paths[first], exc2, result[first]["backup"] or "a copy"),
                reason="restore_failed", **result)
        nothing_changed()
        module.fail_json(msg="%s. %s was restored: both files are as they were."
                         % (failure, FILE_RULES[first]["label"]), reason="write_failed", **result)

    if params["backup"] and params["backup_keep"] > 0:
        for key in keys:
            try:
                result["backups_pruned"].extend(prune_backups(paths[key], backup_dir, params["backup_keep"]))
            except (IOError, OSError) as exc:
                warning = "could not prune old backups of %s: %s" % (paths[key], exc)
                module.warn(warning)
                result["mac_warnings"].append(warning)

    result["msg"] = "%s: extension %s now holds %s in both files" % (
        plan["operation"], extension, plan["mac_new"] or "no MAC")
    module.exit_json(**result)


if __name__ == "__main__":
    main()
