#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: athome-ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Runs on the controller (connection local, the playbook's own Python with boto3).

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: recordings_s3_select
short_description: Select call recordings in an S3 bucket, zip them into a results bucket, return a presigned URL.
description:
  - Lists only the keys of the window's day prefixes (C(<prefix>YYYY/MM/DD/), paginated, see O(listing)) of O(bucket), or the single
    O(prefix) of a flat store, filters the keys by name exactly like M(athome.voip.recordings_select) (same parser, same
    window rules), streams the selected objects into a ZIP in a temporary file (bounded memory, ZIP64 when
    needed), uploads it to O(results_bucket) and returns a presigned GET URL valid O(expiry) seconds.
  - Above O(max_files) or O(max_bytes) nothing is zipped and RV(too_many) says why. The listing stops at the first
    key past a limit (O(max_files) + 1 keys) and requests no further page.
  - Credentials come from boto3's standard chain (environment, shared config/credentials, O(profile), instance
    role); the module takes none as options.
  - Running again with the same O(request_id) and the same selection does not upload again (not changed) and
    returns a fresh presigned URL.
version_added: "1.0.0"
author: athome-ops (@athome-ops)
requirements: [boto3]
options:
  bucket:
    description: Bucket holding the server's recordings.
    type: str
    required: true
  prefix:
    description: Key prefix of the server's recordings (a C(/) is appended when missing).
    type: str
    default: ""
  layout:
    description: V(dated) for C(<prefix>YYYY/MM/DD/<name>) keys, V(flat) for C(<prefix><name>).
  listing:
    description:
      - V(days) lists each day prefix of the window (paginated); V(range) lists the key range from the first
        day prefix to the end of the last one (StartAfter, stop past the last day), which holds the same keys in
        ceil(keys/1000) calls; V(auto) uses V(range) when O(dir_format) sorts chronologically (C(%Y..%m..%d)).
    type: str
    choices: [auto, days, range]
    default: auto
  request_id:
    description:
      - Request id; names the result object C(<results_prefix><request_id>-<16 hex>.zip). The random part
        keeps result keys unguessable from the request id (a bucket policy or a leaked listing must not
        lead to another request's recordings).
  results_bucket:
    description: Bucket receiving the ZIPs.
    type: str
    required: true
  results_prefix:
    description: Key prefix of the ZIPs.
    type: str
    default: ""
  results_max_age_days:
    description: Remove result ZIPs under O(results_prefix) older than this many days (fractions allowed; 0 keeps them).
    type: float
    default: 0
  results_lifecycle_days:
    description:
      - When above 0, make sure the results bucket has a lifecycle rule (ID C(athome-results-expiry)) that
        expires objects under O(results_prefix) after this many days, so links expire on S3's side without
        a new run; other rules of the bucket are kept. 0 leaves the bucket's lifecycle alone.
    type: int
    default: 0
  expiry:
    description: Lifetime of the presigned URL in seconds (SigV4 allows at most 7 days).
    type: int
    default: 259200
  endpoint_url:
    description: S3-compatible endpoint; empty for AWS.
    type: str
    default: ""
  region:
    description: Region name.
    type: str
    default: us-east-1
  profile:
    description: Named AWS profile of the standard chain; empty for the default chain.
    type: str
    default: ""
  addressing_style:
    description: Bucket addressing.
    type: str
    choices: [auto, path, virtual]
    default: path
  tmp_dir:
    description: Folder for the temporary ZIP; empty for the system default.
    type: path
    default: ""
attributes:
  check_mode:
    support: full
    description: Lists and counts, uploads nothing.
  diff_mode:
    support: full
    description: The ZIP's entries as the diff.
extends_documentation_fragment:
  - athome.voip.attributes
  - athome.voip.recordings
"""

EXAMPLES = r"""
- name: Select the recordings of voip1 in S3.
  recordings_s3_select:
    bucket: athome-recordings
    prefix: voip1/
    extensions: ["1121"]
    start: "2025-11-04 00:00"
    end: "2025-11-04 06:00"
    request_id: 20251104_120000_ab12cd
    results_bucket: athome-results
    results_prefix: ramais/
    expiry: 86400
  register: recordings_selection
"""

RETURN = r"""
url:
  description: Presigned GET URL of the ZIP (null when nothing was zipped or in check mode).
  type: str
  returned: always
expires:
  description: When RV(url) stops working (UTC, ISO 8601).
  type: str
  returned: always
lifecycle_changed:
  description: Whether the results lifecycle rule was (would be) set or changed.
  type: bool
  returned: always
results_key:
  description: Key of the ZIP in O(results_bucket).
  type: str
  returned: always
list_calls:
  description: ListObjectsV2 requests made to select (pages of all listed prefixes, up to the page where a limit was passed).
  type: int
  returned: always
dirs_listed:
  description: Prefixes listed.
  type: int
  returned: always
scanned:
  description: Keys examined.
  type: int
  returned: always
selected:
  description: Recordings selected.
  type: int
  returned: always
bytes:
  description: Total size of the selection.
  type: int
  returned: always
per_extension:
  description: Recordings per requested extension.
  type: dict
  returned: always
files:
  description: Selected keys relative to O(prefix), at most O(files_cap).
  type: list
  elements: str
  returned: always
too_many:
  description: True when a limit was exceeded and no ZIP was made.
  type: bool
  returned: always
nothing_found:
  description: True when no recording matched.
  type: bool
  returned: always
results_removed:
  description: Old result ZIPs removed (O(results_max_age_days)).
  type: int
  returned: always
"""

import binascii
import os
import re
import tempfile
import time
import traceback
import zipfile

from ansible_collections.athome.voip.plugins.module_utils.recordings import (
    CHUNK,
    COMPRESSIONS,
    DEFAULT_PATTERN,
    NameMatcher,
    RecordingsError,
    Selection,
    Window,
    check_request_id,
    criteria,
    human_bytes,
    normalize_extensions,
    selection_argument_spec,
    summary,
    zip_date_time,
)
from ansible.module_utils.basic import AnsibleModule, missing_required_lib

try:
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    HAS_BOTO3 = True
    BOTO3_IMPORT_ERROR = None
except ImportError:
    HAS_BOTO3 = False
    BOTO3_IMPORT_ERROR = traceback.format_exc()

META_KEY = "athome-selection"


def iso_utc(ts):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def with_slash(prefix):
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


CHRONOLOGICAL_FORMAT = re.compile(r"^%Y([^%]*)%m([^%]*)%d$")


def list_selection(client, bucket, prefix, matcher, layout, dir_format, listing="auto", max_files=0, max_bytes=0):
    """List only the keys of the window's days, filter them by name, count list calls.

    listing=days: one paginated listing per day prefix (prefix + '2025/11/04/').
    listing=range: one paginated listing of the key range from the first day prefix to the
    end of the last one (StartAfter, then stop at the first key past the last day); since
    zero-padded %Y..%m..%d prefixes sort like dates, that range holds exactly the window's
    days, in ceil(keys/1000) calls instead of at least one per day. auto picks range when
    dir_format sorts chronologically, else days. A flat layout lists the prefix with
    Delimiter=/ (the whole store: there is no date in the key path).
    With max_files / max_bytes (0: no limit) the listing stops at the first match past a
    limit, as the local scan does: no further page is requested, and the selection says so
    (stopped, over_limits: "more than N files (the limit)").
    """
    sel = Selection()
    limits = (max_files, max_bytes)
    if layout == "flat":
        _list_pages(client, sel, dict(Bucket=bucket, Prefix=prefix, Delimiter="/"), prefix, prefix,
                    matcher, None, None, limits)
        sel.sort()
        return sel
    dirs = matcher.window.day_dirs(dir_format)
    if listing == "auto":
        listing = "range" if CHRONOLOGICAL_FORMAT.match(dir_format.strip("/")) else "days"
    if listing == "range":
        sel.dirs_listed = len(dirs)
        wanted = set(dirs)
        # StartAfter ends with '/': every key of the first day sorts above it (SeaweedFS
        # skips the whole folder when StartAfter names the folder without its slash).
        kwargs = dict(Bucket=bucket, Prefix=prefix, StartAfter=prefix + dirs[0] + "/")
        # '0' follows '/' in ASCII: every key of the last day sorts below this bound.
        stop = prefix + dirs[-1] + "0"
        _list_pages(client, sel, kwargs, prefix, None, matcher, stop, wanted, limits)
        sel.sort()
        return sel
    for day in dirs:
        sel.dirs_listed += 1
        listed = prefix + day + "/"
        _list_pages(client, sel, dict(Bucket=bucket, Prefix=listed), prefix, listed, matcher, None, None, limits)
        if sel.stopped:
            break
    sel.sort()
    return sel


def _list_pages(client, sel, kwargs, prefix, listed, matcher, stop, wanted_days, limits):
    """Page through one listing into sel. With stop, end at the first key >= stop; once the
    selection is over a limit, end there and mark it stopped: no further call either way."""
    max_files, max_bytes = limits
    while True:
        page = client.list_objects_v2(**kwargs)
        sel.list_calls += 1
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if stop is not None and key >= stop:
                return
            if listed is not None:
                name = key[len(listed):]
            else:  # range listing: keep only <day>/<name> keys of the window's days
                day, _sep, name = key[len(prefix):].rpartition("/")
                if day not in wanted_days:
                    continue
            if not name or "/" in name:
                continue
            sel.scanned += 1
            hit = matcher.match(name)
            if hit is not None:
                sel.add(key[len(prefix):], name, obj["Size"], hit[0], hit[1], hit[2], source=key)
                if sel.over(max_files, max_bytes):
                    sel.stopped = True
                    return
        if not page.get("IsTruncated"):
            return
        kwargs = dict(kwargs, ContinuationToken=page["NextContinuationToken"])


def write_s3_zip(client, bucket, selection, dest, compression, comment):
    """Stream each object into the ZIP chunk by chunk (memory stays at one chunk)."""
    method = COMPRESSIONS[compression]
    with zipfile.ZipFile(dest, "w", method, allowZip64=True) as zf:
        for item in selection.items:
            info = zipfile.ZipInfo(item["path"], date_time=zip_date_time(item["stamp"]))
            info.compress_type = method
            info.external_attr = 0o644 << 16
            body = client.get_object(Bucket=bucket, Key=item["source"])["Body"]
            try:
                with zf.open(info, "w", force_zip64=item["size"] > zipfile.ZIP64_LIMIT) as out:
                    for chunk in body.iter_chunks(CHUNK):
                        out.write(chunk)
            finally:
                body.close()
        zf.comment = comment.encode("ascii")


LIFECYCLE_ID = "athome-results-expiry"


def ensure_lifecycle(client, bucket, prefix, days, check_mode):
    """Our expiry rule on the results prefix, beside the bucket's other rules; True if changed."""
    try:
        rules = client.get_bucket_lifecycle_configuration(Bucket=bucket).get("Rules", [])
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "NoSuchLifecycleConfiguration":
            raise
        rules = []
    ours = {"ID": LIFECYCLE_ID, "Filter": {"Prefix": prefix}, "Status": "Enabled", "Expiration": {"Days": days}}
    current = [r for r in rules if r.get("ID") == LIFECYCLE_ID]
    if len(current) == 1 and current[0].get("Filter") == ours["Filter"] and \
            current[0].get("Expiration") == ours["Expiration"] and current[0].get("Status") == "Enabled":
        return False
    if not check_mode:
        others = [r for r in rules if r.get("ID") != LIFECYCLE_ID]
        client.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": others + [ours]})
    return True


def request_results(client, bucket, prefix, request_id):
    """Result keys of this request id (<prefix><request_id>-<16 hex>.zip), oldest first."""
    rx = re.compile(r"^%s%s-[0-9a-f]{16}\.zip$" % (re.escape(prefix), re.escape(request_id)))
    found = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + request_id + "-"):
        found += [(o["LastModified"], o["Key"]) for o in page.get("Contents", []) if rx.match(o["Key"])]
    return [key for _when, key in sorted(found)]


def remove_old_results(client, bucket, prefix, max_age_days, keep, check_mode):
    """Delete result ZIPs older than max_age_days under prefix, except the keys in keep."""
    cutoff = time.time() - max_age_days * 86400
    removed = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        old = [
            {"Key": o["Key"]}
            for o in page.get("Contents", [])
            if o["Key"] not in keep and o["Key"].endswith(".zip") and o["LastModified"].timestamp() < cutoff
        ]
        if old and not check_mode:
            client.delete_objects(Bucket=bucket, Delete={"Objects": old, "Quiet": True})
        removed += len(old)
    return removed


def main():
    argument_spec = selection_argument_spec()
    argument_spec.update(
        bucket=dict(type="str", required=True),
        prefix=dict(type="str", default=""),
        listing=dict(type="str", choices=["auto", "days", "range"], default="auto"),
        results_bucket=dict(type="str", required=True),
        results_prefix=dict(type="str", default=""),
        results_max_age_days=dict(type="float", default=0),
        results_lifecycle_days=dict(type="int", default=0),
        expiry=dict(type="int", default=259200),
        endpoint_url=dict(type="str", default=""),
        region=dict(type="str", default="us-east-1"),
        profile=dict(type="str", default=""),
        addressing_style=dict(type="str", choices=["auto", "path", "virtual"], default="path"),
        tmp_dir=dict(type="path", default=""),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    if not HAS_BOTO3:
        module.fail_json(msg=missing_required_lib("boto3"), exception=BOTO3_IMPORT_ERROR)
    p = module.params
    echo = criteria(p["extensions"], p["start"], p["end"], p["layout"])
    result = dict(
        changed=False, url=None, expires=None, results_key=None, too_many=False, nothing_found=False,
        criteria=echo, list_calls=0, dirs_listed=0, scanned=0, selected=0, bytes=0, per_extension={},
        per_extension_bytes={}, files=[], files_capped=False, results_removed=0, lifecycle_changed=False,
    )
    if not 1 <= p["expiry"] <= 604800:
        module.fail_json(msg="expiry must be between 1 second and 7 days (604800)", **result)
    try:
        extensions = normalize_extensions(p["extensions"])
        echo["extensions"] = extensions
        check_request_id(p["request_id"])
        window = Window(p["start"], p["end"], p["max_days"])
        matcher = NameMatcher(
            extensions, window, p["name_pattern"] or DEFAULT_PATTERN, p["extension_fields"], p["suffixes"]
        )
    except RecordingsError as exc:
        module.fail_json(msg=str(exc), **result)
    except re.error as exc:
        module.fail_json(msg="name_pattern is not a valid regular expression: %s" % exc, **result)

    prefix = with_slash(p["prefix"])
    results_prefix = with_slash(p["results_prefix"])
    results_key = None
    what = "extensions %s between %s and %s" % (", ".join(extensions), p["start"], p["end"])
    try:
        session = boto3.session.Session(profile_name=p["profile"] or None)
        client = session.client(
            "s3",
            endpoint_url=p["endpoint_url"] or None,
            region_name=p["region"] or None,
            config=Config(signature_version="s3v4", s3={"addressing_style": p["addressing_style"]}),
        )
        selection = list_selection(
            client, p["bucket"], prefix, matcher, p["layout"], p["dir_format"], p["listing"],
            max_files=p["max_files"], max_bytes=p["max_bytes"],
        )
        result.update(summary(selection, extensions, p["files_cap"]))
        result["list_calls"] = selection.list_calls
        result["dirs_listed"] = selection.dirs_listed
        if p["results_lifecycle_days"] > 0:
            result["lifecycle_changed"] = ensure_lifecycle(
                client, p["results_bucket"], results_prefix, p["results_lifecycle_days"], module.check_mode
            )
        previous = request_results(client, p["results_bucket"], results_prefix, p["request_id"])
        if p["results_max_age_days"] > 0:
            result["results_removed"] = remove_old_results(
                client, p["results_bucket"], results_prefix, p["results_max_age_days"],
                set(previous), module.check_mode,
            )
        result["changed"] = result["results_removed"] > 0 or result["lifecycle_changed"]

        if not selection.items:
            result["nothing_found"] = True
            result["msg"] = "No recordings found for %s (%d keys scanned)." % (what, selection.scanned)
            module.exit_json(**result)
        refusal = selection.over_limits(p["max_files"], p["max_bytes"])
        if refusal:
            result["too_many"] = True
            result["msg"] = "Nothing zipped for %s: %s." % (what, refusal)
            module.exit_json(**result)

        digest = selection.digest()
        present = False
        for key in reversed(previous):  # the newest result of this request with this selection
            try:
                head = client.head_object(Bucket=p["results_bucket"], Key=key)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                    raise
                continue
            if head.get("Metadata", {}).get(META_KEY) == digest:
                present, results_key = True, key
                break
        if not present:
            token = binascii.hexlify(os.urandom(8)).decode("ascii")
            results_key = "%s%s-%s.zip" % (results_prefix, p["request_id"], token)
        result["results_key"] = results_key
        if not present:
            result["changed"] = True
            if module._diff:
                result["diff"] = dict(
                    before_header=results_key, before="", after_header=results_key,
                    after="".join(i["path"] + "\n" for i in selection.items),
                )
            if not module.check_mode:
                fd, tmp = tempfile.mkstemp(prefix="recordings-", suffix=".zip", dir=p["tmp_dir"] or None)
                os.close(fd)
                try:
                    write_s3_zip(client, p["bucket"], selection, tmp, p["compression"],
                                 "athome-recordings sha256=" + digest)
                    result["zip_bytes"] = os.path.getsize(tmp)
                    client.upload_file(
                        tmp, p["results_bucket"], results_key,
                        ExtraArgs={"ContentType": "application/zip", "Metadata": {META_KEY: digest}},
                        Config=TransferConfig(multipart_chunksize=8 * CHUNK, max_concurrency=2),
                    )
                finally:
                    os.unlink(tmp)
                # An older selection under the same request id.
                stale = [{"Key": k} for k in previous if k != results_key]
                if stale:
                    client.delete_objects(Bucket=p["results_bucket"], Delete={"Objects": stale, "Quiet": True})
        if present or not module.check_mode:
            now = time.time()
            result["url"] = client.generate_presigned_url(
                "get_object", Params={"Bucket": p["results_bucket"], "Key": results_key}, ExpiresIn=p["expiry"]
            )
            result["expires"] = iso_utc(now + p["expiry"])
    except NoCredentialsError:
        module.fail_json(
            msg="no S3 credentials in boto3's standard chain (AWS_* environment, shared credentials, profile)",
            **result
        )
    except (BotoCoreError, ClientError) as exc:
        module.fail_json(msg="S3 error: %s" % exc, exception=traceback.format_exc(), **result)
    result["msg"] = "%d recordings (%s) for %s." % (selection.selected, human_bytes(selection.bytes), what)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
