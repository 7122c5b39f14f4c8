"""RAMAIS recordings selection: figures beside baselines measured in the same run.

    python -m bench.recordings                 # local 1M files (dated + flat), S3 100k keys, 2 GB ZIP
    python -m bench.recordings --cold          # also a 1M dated tree on disk with drop_caches (root)
    python -m bench.recordings --keys 20000    # a faster S3 run (the default is the issue's 100,000)

Local: the collection's own selection code (plugins/module_utils/recordings.py) over a generated tree of
--files recordings (365 days, 100 extensions, directions in/out/external/q), 2 extensions over 1
day and over 30 days, beside `find -name` over the same tree (plus a date filter on its output).
The trees go on a dedicated tmpfs when root (recipe 08), else under --base.
S3: recordings_s3_select's listing against SeaweedFS on loopback, --keys keys over 90 days, beside
a paginated listing of the whole prefix. Seeding goes through the filer HTTP API (recipe 06).
ZIP: peak RSS (VmHWM) of a fresh process that selects and zips 2 GiB of sparse
recordings, on Python 3 and on the target's Python 2.7.
Goals (issue 5): dated >= 100x faster than find; flat <= 1.0x find; S3 list calls <= days + 1;
<= 150 MB RSS while zipping. Issue 9: a dated selection <= 1.25x its floor, listing the window's
day folders and nothing else (a 30-day window is 8 % of the tree, so find was the wrong yardstick);
an S3 request over max_files stops listing in the page where the limit is passed (its list calls
printed beside the unlimited listing's).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODULE_UTILS = REPO / "collections" / "ansible_collections" / "athome" / "voip" / "plugins" / "module_utils"
EXTS = ["1121", "1122"]
DIRECTIONS = ("in", "out", "external", "q")
FIRST_DAY = date(2025, 1, 1)
WINDOWS_LOCAL = {
    "1 day": ("2025-11-04 00:00", "2025-11-04 23:59"),
    "30 days": ("2025-10-06 00:00", "2025-11-04 23:59"),
}


def load_helpers():
    spec = importlib.util.spec_from_file_location("athome_recordings", MODULE_UTILS / "recordings.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


H = load_helpers()


def names(count: int, days: int, seed: int = 8):
    """(day, name) of `count` FreePBX-style recordings spread over `days` days from FIRST_DAY."""
    rng = random.Random(seed)
    for i in range(count):
        seq = i + 1
        day = FIRST_DAY + timedelta(days=i * days // count)
        sec = rng.randrange(86400)
        ext = str(1100 + rng.randrange(100))
        direction = DIRECTIONS[rng.randrange(4)]
        number = f"55119{rng.randrange(10**8):08d}"
        dst, src = (number, ext) if direction == "out" else (ext, number)
        yield (
            day,
            (
                f"{direction}-{dst}-{src}-{day:%Y%m%d}-{sec // 3600:02d}{sec // 60 % 60:02d}{sec % 60:02d}-"
                f"{1735700000 + seq}.{seq % 97}.wav"
            ),
        )


def make_tree(root: Path, count: int, layout: str) -> float:
    t0 = time.monotonic()
    made = set()
    flags = os.O_CREAT | os.O_WRONLY | os.O_EXCL
    for day, name in names(count, 365):
        folder = root / f"{day:%Y/%m/%d}" if layout == "dated" else root
        if folder not in made:
            folder.mkdir(parents=True, exist_ok=True)
            made.add(folder)
        os.close(os.open(folder / name, flags, 0o644))
    return time.monotonic() - t0


def ours(root: Path, layout: str, window: tuple[str, str]):
    m = H.NameMatcher(EXTS, H.Window(*window))
    t0 = time.monotonic()
    sel = H.select_local(str(root), m, layout)
    return time.monotonic() - t0, sel.selected


def floor(root: Path, layout: str, window: tuple[str, str]):
    """The least a dated-tree selection must do: list the window's day folders, nothing else,
    with the call select_local lists them with (os.listdir: names only, the cheapest listing)."""
    folders = H.Window(*window).day_dirs()
    t0 = time.monotonic()
    listed = 0
    for rel in folders:
        with contextlib.suppress(FileNotFoundError):
            listed += len(os.listdir(os.path.join(root, rel)))
    return time.monotonic() - t0, listed


def floor_and_stat(root: Path, window: tuple[str, str], selected: list[str]):
    """The floor plus what no selection can skip either: one lstat per selected file (its size
    for the limits and the reply, its inode for the check at zip time)."""
    t0 = time.monotonic()
    floor(root, "dated", window)
    for path in selected:
        os.lstat(path)
    return time.monotonic() - t0, len(selected)


def selected_paths(root: Path, window: tuple[str, str]) -> list[str]:
    sel = H.select_local(str(root), H.NameMatcher(EXTS, H.Window(*window)), "dated")
    return [i["source"] for i in sel.items]


def _after_drop(fn):
    def run():
        drop_caches()
        return fn()

    return run


def paired(fns, runs=7):
    """Median time of each of fns (argument-less), run in turns after one warm-up each, so a
    load change on the shared machine touches all of them alike; and each one's count."""
    counts = [fn()[1] for fn in fns]
    times = [[] for _ in fns]
    for _ in range(runs):
        for i, fn in enumerate(fns):
            times[i].append(fn()[0])
    return [statistics.median(t) for t in times], counts


STAMP = re.compile(r"-(\d{8})-(\d{6})-")


def with_find(root: Path, layout: str, window: tuple[str, str]):
    """The legacy way: find -name over the whole tree, then keep the window's dates."""
    w = H.Window(*window)
    cmd = ["find", str(root)] + (["-maxdepth", "1"] if layout == "flat" else [])
    cmd += ["-type", "f", "("] + sum((["-name", f"*-{e}-*", "-o"] for e in EXTS), [])[:-1] + [")"]
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()
    hits = [p for p in out if (m := STAMP.search(p)) and w.contains(m.group(1) + m.group(2))]
    return time.monotonic() - t0, len(hits)


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(fn, *args, runs=3):
    fn(*args)  # warm up
    results = [fn(*args) for _ in range(runs)]
    return statistics.median(r[0] for r in results), results[0][1]


def row(label, figure, baseline, ratio_text, goal, ok):
    print(
        f"  {label:<34} {figure:>12} {baseline:>12}  {ratio_text:<18} {goal:<24} {'OK' if ok else 'MISSED'}"
    )


def header(title):
    print(f"\n{title}")
    print(f"  {'':<34} {'ours':>12} {'baseline':>12}  {'ratio':<18} {'goal':<24} result")


def mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},nr_inodes=4m", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    return r.returncode == 0


def bench_local(base: Path, count: int, cold: bool) -> None:
    mnt = base / "tmpfs"
    on_tmpfs = mount_tmpfs(mnt, "8g")
    where = mnt if on_tmpfs else base / "disk"
    print(
        f"\nLocal selection: {count:,} recordings per tree on {'tmpfs' if on_tmpfs else where}, "
        f"extensions {', '.join(EXTS)}, warm cache (find: median of 3 after a warm-up; "
        "ours and the floors: medians of 7 runs taken in turns)"
    )
    try:
        for layout in ("dated", "flat"):
            root = where / layout
            secs = make_tree(root, count, layout)
            print(f"  generated the {layout} tree in {secs:.1f} s")
            header(f"{layout} layout")
            for label, window in WINDOWS_LOCAL.items():
                t_find, n_find = timed(with_find, root, layout, window)
                if layout == "dated":
                    dated_rows(root, label, window, t_find, n_find)
                else:
                    t_ours, n_ours = timed(ours, root, layout, window)
                    assert n_ours == n_find, (n_ours, n_find)
                    ratio = t_ours / t_find
                    row(
                        f"{label}: {n_ours} files",
                        f"{t_ours * 1000:.0f} ms",
                        f"{t_find * 1000:.0f} ms",
                        f"{ratio:.2f}x find",
                        "<= 1.0x find",
                        ratio <= 1.0,
                    )
            if not on_tmpfs:
                shutil.rmtree(root)
        if cold:
            bench_cold(base / "disk-cold", count)
    finally:
        if on_tmpfs:
            subprocess.run(["umount", str(mnt)], check=False)


def dated_rows(root: Path, label: str, window: tuple[str, str], t_find: float, n_find: int, cold=False):
    """Our selection beside find (issue 5's yardstick), then beside the floor (listing the
    window's day folders and nothing else; issue 9's goal: <= 1.25x), then the floor plus one
    lstat per selected file, the part of the gap no selection can avoid. Medians of runs taken
    in turns: 7 warm, 3 cold (drop_caches before each run)."""
    paths = selected_paths(root, window)
    fns = [
        lambda: ours(root, "dated", window),
        lambda: floor(root, "dated", window),
        lambda: floor_and_stat(root, window, paths),
    ]
    if cold:
        (t_ours, t_floor, t_stat), (n, _listed, _n) = paired([_after_drop(fn) for fn in fns], runs=3)
    else:
        (t_ours, t_floor, t_stat), (n, _listed, _n) = paired(fns)
    assert n == n_find, (n, n_find)
    ratio = t_find / t_ours
    row(
        f"{label}: {n} files",
        f"{t_ours * 1000:.1f} ms",
        f"{t_find * 1000:.0f} ms",
        f"{ratio:.0f}x faster",
        ">= 100x faster than find",
        ratio >= 100,
    )
    over = t_ours / t_floor
    row(
        "  same, beside the floor (listdir)",
        f"{t_ours * 1000:.1f} ms",
        f"{t_floor * 1000:.1f} ms",
        f"{over:.2f}x the floor",
        "<= 1.25x the floor",
        over <= 1.25,
    )
    print(
        f"  {'  floor + lstat of the selected':<34} {t_stat * 1000:>9.1f} ms {t_floor * 1000:>9.1f} ms"
        f"  {t_stat / t_floor:.2f}x the floor (no selection does less)"
    )


def bench_cold(root: Path, count: int) -> None:
    if not drop_caches():
        print("\nCold cache: skipped (cannot write /proc/sys/vm/drop_caches)")
        return
    print(f"\nCold cache: dated tree of {count:,} recordings on disk ({root}), drop_caches before each run")
    secs = make_tree(root, count, "dated")
    print(f"  generated in {secs:.1f} s")
    try:
        # The same tree with its folders in the page cache: the recordings host's own file
        # system type (the warm figures above are on tmpfs).
        header("dated layout, on disk, warm")
        for label, window in WINDOWS_LOCAL.items():
            t_find, n_find = timed(with_find, root, "dated", window)
            dated_rows(root, label, window, t_find, n_find)
        header("dated layout, cold")
        for label, window in WINDOWS_LOCAL.items():
            drop_caches()
            t_find, n_find = with_find(root, "dated", window)
            dated_rows(root, label, window, t_find, n_find, cold=True)
    finally:
        t0 = time.monotonic()
        shutil.rmtree(root, ignore_errors=True)
        print(f"  removed the disk tree in {time.monotonic() - t0:.1f} s")


def bench_s3(base: Path, keys: int, days: int) -> None:
    from tests.recordings_support import s3_module
    from tests.servers import SeaweedS3

    s3mod = s3_module(H)
    server = SeaweedS3(base / "s3").start()
    try:
        client = server.client()
        client.create_bucket(Bucket="bench-rec")
        url = f"http://127.0.0.1:{server.filer_port}/buckets/bench-rec/voip1/"
        items = [(d, n) for d, n in names(keys, days, seed=9)]

        def put(item):
            day, name = item
            req = urllib.request.Request(f"{url}{day:%Y/%m/%d}/{name}", data=b"x" * 64, method="PUT")
            with urllib.request.urlopen(req, timeout=60) as resp:
                resp.read()

        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(put, items))
        print(
            f"\nS3 selection: {keys:,} keys over {days} days ({keys // days} per day) in SeaweedFS, seeded "
            f"in {time.monotonic() - t0:.0f} s through the filer API; extensions {', '.join(EXTS)}"
        )
        t0 = time.monotonic()
        full_calls, full_keys = 0, 0
        for page in client.get_paginator("list_objects_v2").paginate(Bucket="bench-rec", Prefix="voip1/"):
            full_calls += 1
            full_keys += len(page.get("Contents", []))
        t_full = time.monotonic() - t0
        assert full_keys == keys, (full_keys, keys)
        header("dated prefixes (baseline: list the whole prefix)")
        last = FIRST_DAY + timedelta(days=days - 1)
        for n_days in (1, 7, 30):
            first = last - timedelta(days=n_days - 1)
            window = H.Window(f"{first} 00:00", f"{last} 23:59")
            m = H.NameMatcher(EXTS, window)
            for listing in ("days", "range"):
                t0 = time.monotonic()
                sel = s3mod.list_selection(client, "bench-rec", "voip1/", m, "dated", "%Y/%m/%d", listing)
                t_sel = time.monotonic() - t0
                row(
                    f"{n_days} day(s), {listing}: {sel.selected} keys",
                    f"{t_sel * 1000:.0f} ms",
                    f"{t_full * 1000:.0f} ms",
                    f"{sel.list_calls} vs {full_calls} calls",
                    f"list calls <= {n_days + 1}",
                    sel.list_calls <= n_days + 1,
                )
        bench_s3_over_limit(s3mod, client, last, [f"voip1/{d:%Y/%m/%d}/{n}" for d, n in items])
    finally:
        server.stop()


def bench_s3_over_limit(s3mod, client, last: date, keys: list[str], max_files: int = 10) -> None:
    """A 30-day request over max_files: the listing stops in the page where the limit is passed
    (issue 9), beside the same listing without a limit. keys: every key of the bucket."""
    header(f"over max_files={max_files} (baseline: the same 30-day listing without a limit)")
    window = H.Window(f"{last - timedelta(days=29)} 00:00", f"{last} 23:59")
    days = ["voip1/" + d + "/" for d in window.day_dirs()]
    for listing in ("days", "range"):
        m = H.NameMatcher(EXTS, window)
        t0 = time.monotonic()
        whole = s3mod.list_selection(client, "bench-rec", "voip1/", m, "dated", "%Y/%m/%d", listing)
        t_whole = time.monotonic() - t0
        t0 = time.monotonic()
        sel = s3mod.list_selection(
            client, "bench-rec", "voip1/", m, "dated", "%Y/%m/%d", listing, max_files=max_files
        )
        t_sel = time.monotonic() - t0
        needed = _pages_to_reach(sorted(i["source"] for i in whole.items)[max_files], days, keys, listing)
        row(
            f"30 days, {listing}: {whole.selected} keys, stopped={sel.stopped}",
            f"{t_sel * 1000:.0f} ms",
            f"{t_whole * 1000:.0f} ms",
            f"{sel.list_calls} vs {whole.list_calls} calls",
            f"list calls = {needed} (limit's page)",
            sel.stopped and sel.list_calls == needed,
        )


def _pages_to_reach(target: str, days: list[str], keys: list[str], listing: str) -> int:
    """List calls (pages of 1,000 keys) a listing makes up to the page holding target: range lists
    the window's days as one run of keys; days lists each day prefix, an empty one costs a call."""
    if listing == "range":
        return -(-sum(1 for k in keys if days[0] <= k <= target) // 1000)
    calls = 0
    for day in days:
        in_day = [k for k in keys if k.startswith(day)]
        if day == target[: len(day)]:
            return calls + -(-sum(1 for k in in_day if k <= target) // 1000)
        calls += max(1, -(-len(in_day) // 1000))
    raise ValueError(target)


ZIP_CHILD = r"""
import sys, zipfile
sys.path.insert(0, sys.argv[1])
import recordings as h
m = h.NameMatcher(["1121"], h.Window("2025-11-04 00:00", "2025-11-04 23:59"))
sel = h.select_local(sys.argv[2], m, "dated")
h.write_local_zip(sel, sys.argv[3], "stored", "bench")
z = zipfile.ZipFile(sys.argv[3])
hwm = [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print("%d %d %s" % (len(z.namelist()), sum(i.file_size for i in z.infolist()), hwm))
"""


def bench_zip(base: Path, gib: float) -> None:
    root = base / "zip-tree"
    day = root / "2025/11/04"
    day.mkdir(parents=True)
    size = 128 * 1024 * 1024
    count = max(1, int(gib * 1024**3 // size) + 1)  # one more than needed: the last entry sits past 2 GiB
    for i in range(count):
        with open(day / f"in-1121-551199990000-20251104-{i:02d}0000-1730700000.{i}.wav", "wb") as f:
            f.truncate(size)  # sparse: reads return zeros, costs no disk
    total = count * size
    print(
        f"\nZIP memory: {count} sparse recordings of 128 MiB ({total / 1024**3:.2f} GiB), stored, "
        "ZIP64 past 2 GiB"
    )
    header("peak RSS of the selecting+zipping process")
    pythons = [("python3 " + sys.version.split()[0], sys.executable)]
    try:
        from tests.servers import pyenv_python

        pythons.append(("python 2.7 (CentOS 7 target)", pyenv_python("2.7")))
    except (ImportError, FileNotFoundError):
        pass
    for label, python in pythons:
        dest = base / "out.zip"
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [python, "-c", ZIP_CHILD, str(MODULE_UTILS), str(root), str(dest)],
            stdout=subprocess.PIPE,
            text=True,
        )
        out = proc.stdout.read()
        proc.wait()
        secs = time.monotonic() - t0
        n, size, hwm_kb = out.split()
        assert proc.returncode == 0 and (n, size) == (str(count), str(total)), (proc.returncode, out)
        rss_mb = int(hwm_kb) / 1024  # VmHWM: the process's own peak RSS since exec
        row(
            f"{label}: {secs:.1f} s",
            f"{rss_mb:.0f} MB",
            "",
            f"zip {dest.stat().st_size / 1024**3:.2f} GiB",
            "<= 150 MB RSS",
            rss_mb <= 150,
        )
        dest.unlink()
    shutil.rmtree(root)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--files", type=int, default=1_000_000, help="recordings per local tree (default 1,000,000)"
    )
    p.add_argument(
        "--keys",
        type=int,
        default=100_000,
        help="S3 keys (default 100,000 as in the issue: seeding takes about a minute)",
    )
    p.add_argument("--s3-days", type=int, default=90)
    p.add_argument("--zip-gib", type=float, default=2.0)
    p.add_argument("--cold", action="store_true", help="also a cold-cache run on disk (root: drop_caches)")
    p.add_argument("--skip", action="append", default=[], choices=["local", "s3", "zip"])
    p.add_argument("--base", default=None, help="scratch folder (default: a new one under /tmp)")
    args = p.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="athome-bench-rec-", dir=args.base))
    print(
        f"bench.recordings {datetime.now():%Y-%m-%d %H:%M}  files={args.files:,} keys={args.keys:,} "
        f"s3_days={args.s3_days} zip={args.zip_gib} GiB cold={args.cold}  cpus={os.cpu_count()}"
    )
    try:
        if "local" not in args.skip:
            bench_local(base, args.files, args.cold)
        if "s3" not in args.skip:
            bench_s3(base, args.keys, args.s3_days)
        if "zip" not in args.skip:
            bench_zip(base, args.zip_gib)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
