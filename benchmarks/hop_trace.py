#!/usr/bin/env python3
"""Where the time of a requested page goes, hop by hop (issue 13 item 1).

One migration with POSTCOPY_HOP_TRACE set (serve-dest and migrate write their entries at the end,
postcopy_cli/hoptrace.py), by default one 1 GiB image restore as restore_bench.py runs it
(serve-dest --uffd-socket, workload touch --order random, migrate --image), or with --attach a
live migration as qemu_compare.py runs our side (workload incoming, migrate --attach, 1 s of
pre-copy).  The destination's entries (fault read, request sent, received, placed) are joined with
the source's (request read, page sent) by block, offset and the nearest request: the source entry
of that page read first at or after the destination sent the request.  One host, one
CLOCK_MONOTONIC: the two processes' times compare directly.

Hops:
  fault read -> request sent      dest: the fault thread read the uffd message, wrote REQ_PAGES
  request sent -> request read    the return path, to the source's native request server parsing it
  request read -> page sent       source: to the write of the page's bytes to the preempt channel
  page sent -> page received      that write (the time is read just before it: on loopback the dest
                                  may parse the record before the write returns), the preempt channel,
                                  to the dest's pump parsing the record
  page received -> placed         dest: UFFDIO_COPY done and the page accounted for
  fault read -> placed            end to end: the dest's own latency sample (must agree with it)
The two cross-process hops and "page sent -> received" are for requests answered by the request's
own answer (the preempt channel's copy went in); a request answered by the background stream (the
main stream's copy went in first) counts in the "answered by the background" share.

usage: hop_trace.py [--size 1G] [--image-dir /tmp] [--keep-image] [--keep-trace] [--attach] [--json-only]
"""
from __future__ import annotations

import argparse
import bisect
import datetime
import glob
import json
import os
import platform
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from restore_bench import PAGE, fmt, make_image, one_restore, parse_size, wait_idle, warm_host_memory  # noqa: E402

from postcopy_cli import hoptrace  # noqa: E402

HOPS = (
    ("fault read -> request sent", "dest"),
    ("request sent -> request read", "join"),
    ("request read -> page sent", "join"),
    ("page sent -> page received", "join"),
    ("page received -> placed", "dest"),
    ("fault read -> placed", "dest"),
)


def pct(sorted_vals: list, q: float):
    """Nearest-rank percentile of a sorted list (None if empty)."""
    if not sorted_vals:
        return None
    return sorted_vals[min(len(sorted_vals) - 1, max(0, int(q * len(sorted_vals) + 0.5) - 1))]


def load_traces(folder: str) -> tuple[tuple[dict, list], tuple[dict, list]]:
    """(meta, rows) of the one dest-*.csv and the one source-*.csv in ``folder``."""
    out = []
    for role in ("dest", "source"):
        files = glob.glob(os.path.join(folder, f"{role}-*.csv"))
        if len(files) != 1:
            raise RuntimeError(f"expected one {role}-<pid>.csv in {folder}, found {len(files)}")
        out.append(hoptrace.load(files[0]))
    return out[0], out[1]


def placed_by(row: dict) -> str:
    """The channel whose copy of the page went in: the accounting one, or the other if it found the page
    present ("elsewhere")."""
    ch = row["channel"]
    if row["elsewhere"]:
        return {"main": "preempt", "preempt": "main"}.get(ch, "")
    return ch


def join(dest_rows: list[dict], source_rows: list[dict]) -> list[tuple[dict, dict | None]]:
    """Each dest entry with its source entry (None when none joins): same block and offset, the first
    one read at or after the dest sent the request (each source entry joins one dest entry)."""
    by_key: dict = {}
    for s in source_rows:
        by_key.setdefault((s["block"], s["offset"]), []).append(s)
    for v in by_key.values():
        v.sort(key=lambda s: s["t_request_read"])
    used: set = set()
    out = []
    for d in sorted(dest_rows, key=lambda r: r["t_request_sent"]):
        cands = by_key.get((d["block"], d["offset"]), [])
        match = None
        if d["t_request_sent"]:
            i = bisect.bisect_left([s["t_request_read"] for s in cands], d["t_request_sent"])
            while i < len(cands) and id(cands[i]) in used:
                i += 1
            if i < len(cands):
                match = cands[i]
                used.add(id(match))
        out.append((d, match))
    return out


def analyse(dest: tuple[dict, list], source: tuple[dict, list], sd_stats: dict | None) -> dict:
    (dmeta, drows), (smeta, srows) = dest, source
    joined = join(drows, srows)
    hops: dict[str, list] = {name: [] for name, _ in HOPS}
    answered = {"request": 0, "background": 0, "unknown": 0}
    for d, s in joined:
        if not d["t_placed"]:
            continue
        by = placed_by(d)
        own_answer = by == "preempt"
        answered["request" if own_answer else "background" if by == "main" else "unknown"] += 1
        if d["t_request_sent"]:
            hops["fault read -> request sent"].append(d["t_request_sent"] - d["t_fault_read"])
        if d["t_received"] and not d["elsewhere"]:
            hops["page received -> placed"].append(d["t_placed"] - d["t_received"])
        hops["fault read -> placed"].append(d["t_placed"] - d["t_fault_read"])
        if s is not None and own_answer and s["t_sent"]:
            hops["request sent -> request read"].append(s["t_request_read"] - d["t_request_sent"])
            hops["request read -> page sent"].append(s["t_sent"] - s["t_request_read"])
            if d["t_received"] and not d["elsewhere"]:
                hops["page sent -> page received"].append(d["t_received"] - s["t_sent"])
    table = {}
    for name, _ in HOPS:
        v = sorted(x / 1000 for x in hops[name])
        table[name] = {"count": len(v), "p50_us": pct(v, 0.5), "p90_us": pct(v, 0.9), "p99_us": pct(v, 0.99)}
    placed = [d for d, _ in joined if d["t_placed"]]
    with_sent = [d for d, _ in joined if d["t_request_sent"]]
    n_joined = sum(1 for d, s in joined if s is not None)
    lat = (sd_stats or {}).get("latency-us") or {}
    e2e = sorted((d["t_placed"] - d["t_fault_read"]) / 1000 for d in placed)
    background = answered["background"]
    known = answered["request"] + background
    return {
        "hops": table,
        "dest_entries": len(drows), "dest_dropped": dmeta.get("dropped"), "dest_capacity": dmeta.get("capacity"),
        "source_entries": len(srows), "source_dropped": smeta.get("dropped"),
        "dest_requests_stat": (sd_stats or {}).get("postcopy-requests"),
        "dest_entries_placed": len(placed), "dest_entries_request_sent": len(with_sent),
        "joined": n_joined, "joined_share": round(n_joined / len(with_sent), 4) if with_sent else None,
        "answered": answered,
        "background_share": round(background / known, 4) if known else None,
        "source_sent_before": sum(1 for s in srows if s["sent_before"]),
        "e2e_p50_us": pct(e2e, 0.5), "e2e_mean_us": round(sum(e2e) / len(e2e), 1) if e2e else None,
        "dest_latency_p50_bucket_us": lat.get("p50"), "dest_latency_mean_us": lat.get("mean"),
        "dest_latency_samples": lat.get("samples"),
        "dest_skipped_pages": ((sd_stats or {}).get("pages") or {}).get("skipped"),
    }


def print_report(a: dict, conditions: dict) -> None:
    print()
    print(f"conditions: {conditions['mode']}, {conditions['size_mib']} MiB, load average {conditions['loadavg']}, "
          f"foreign CPU {conditions.get('foreign_cpu_s')} s in {conditions.get('wall_s')} s")
    print(f"{'hop':32s} {'count':>8s} {'p50 us':>9s} {'p90 us':>9s} {'p99 us':>9s}")
    for name, _ in HOPS:
        h = a["hops"][name]
        print(f"{name:32s} {h['count']:>8d} {fmt(h['p50_us']):>9s} {fmt(h['p90_us']):>9s} {fmt(h['p99_us']):>9s}")
    print()
    lo = a["dest_latency_p50_bucket_us"]
    print(f"end to end fault read -> placed: p50 {fmt(a['e2e_p50_us'])} us, mean {fmt(a['e2e_mean_us'])} us; "
          f"serve-dest's own latency: p50 bucket [{fmt(lo / 2 if lo else None, 0)}, {fmt(lo, 0)}) us, "
          f"mean {fmt(a['dest_latency_mean_us'])} us over {a['dest_latency_samples']} samples")
    ans = a["answered"]
    unknown = ans["unknown"]
    share = a["background_share"]
    print(f"requested pages answered by the background stream: {ans['background']} of "
          f"{ans['request'] + ans['background']} ({fmt(100 * share if share is not None else None)} %)"
          f"{f', {unknown} not known' if unknown else ''}; source: "
          f"{a['source_sent_before']} requests for pages sent already; dest skipped pages {a['dest_skipped_pages']}")
    print(f"entries: dest {a['dest_entries']} (postcopy-requests {a['dest_requests_stat']}; dropped "
          f"{a['dest_dropped']}), source {a['source_entries']} (dropped {a['source_dropped']}); joined "
          f"{a['joined']} of {a['dest_entries_request_sent']} sent requests")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=parse_size, default=1 << 30, help="image / memory size (default 1G)")
    ap.add_argument("--image-dir", default=tempfile.gettempdir())
    ap.add_argument("--keep-image", action="store_true", help="keep (and reuse) the generated image")
    ap.add_argument("--keep-work", action="store_true", help="keep the run's directory (logs, stats)")
    ap.add_argument("--keep-trace", action="store_true", help="keep the trace files (their folder is printed)")
    ap.add_argument("--wait-run", action="store_true", help="the toucher waits for RUN before touching")
    ap.add_argument("--handover-wait", type=float, default=1.0)
    ap.add_argument("--timeout", type=float, default=60.0, help="per-process timeout, seconds")
    ap.add_argument("--idle-wait", type=float, default=60.0, help="wait up to this long for an idle host first")
    ap.add_argument("--warm-mib", type=int, default=None,
                    help="MiB of memory to fault in and free before the run (restore_bench.warm_host_memory: free "
                         "page reporting; default 3x --size, 0: off)")
    ap.add_argument("--migrate-args", default="", help="extra arguments for `postcopy migrate` (image restore)")
    ap.add_argument("--attach", action="store_true",
                    help="a live migration (workload incoming, migrate --attach, 1 s of pre-copy) instead")
    ap.add_argument("--json-only", action="store_true", help="print only the JSON line")
    args = ap.parse_args()
    if args.size % PAGE or args.size <= 0:
        ap.error("--size must be a positive multiple of 4 KiB")
    log = (lambda *a: None) if args.json_only else (lambda *a: print(*a, flush=True))
    machine = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "kernel": platform.release(), "nproc": os.cpu_count()}
    log(f"# hop_trace  {machine['date']}  kernel {machine['kernel']}  nproc {machine['nproc']}")
    trace_dir = tempfile.mkdtemp(prefix="pchop-")
    os.environ[hoptrace.ENV] = trace_dir   # the children's environment is ours (restore_bench.child_env)
    img = None
    created = False
    try:
        idle = wait_idle(args.idle_wait, log) if args.idle_wait else None
        warmed = warm_host_memory((3 * (args.size >> 20) if args.warm_mib is None else args.warm_mib) << 20)
        if args.attach:
            import qemu_compare

            log(f"live migration of {args.size >> 20} MiB (our side of qemu_compare.py, no cap) ...")
            r = qemu_compare.run_ours(args.size >> 20, 0, 1.0, args.timeout, 1.0, args.keep_work)
            ok = bool(r.get("available"))
            sd_stats = (r.get("raw") or {}).get("serve_dest")
            cpu = r.get("cpu") or {}
            mode = "live migration (--attach, 1 s pre-copy)"
        else:
            os.makedirs(args.image_dir, exist_ok=True)
            img = os.path.join(args.image_dir, f"postcopy-bench-{args.size >> 20}M.img")
            if not (args.keep_image and os.path.exists(img) and os.path.getsize(img) == args.size):
                log(f"image: writing {args.size >> 20} MiB random (~10% zero pages) to {img} ...")
                make_image(img, args.size)
                created = True
            args.serve_args = ""
            log(f"image restore of {args.size >> 20} MiB (restore_bench.py's run) ...")
            r = one_restore(args, img, 1)
            ok = bool(r.get("ok"))
            sd_stats = r.get("serve_dest")
            cpu = r.get("cpu") or {}
            mode = "image restore (workload touch --order random)"
        if not ok:
            log(f"the migration FAILED: {r.get('error') or r.get('exit')} {r.get('stderr', '')}")
        conditions = {"mode": mode, "size_mib": args.size >> 20, "loadavg": round(os.getloadavg()[0], 2),
                      "foreign_cpu_s": cpu.get("foreign_cpu_s"), "wall_s": cpu.get("wall_s"), "idle_wait": idle,
                      "warm_host_s": warmed}
        try:
            dest, source = load_traces(trace_dir)
        except (RuntimeError, OSError) as e:
            log(f"no trace to analyse: {e}")
            print(json.dumps({"bench": "hop_trace", "machine": machine, "ok": False, "error": str(e)}))
            return 1
        a = analyse(dest, source, sd_stats)
        if not args.json_only:
            print_report(a, conditions)
            if args.keep_trace:
                print(f"trace files kept in {trace_dir}")
        print(json.dumps({"bench": "hop_trace", "machine": machine, "ok": ok, "conditions": conditions,
                          "migration_total_s": r.get("total_s"), **a}, separators=(",", ":")))
        return 0 if ok else 1
    finally:
        if not args.keep_trace:
            shutil.rmtree(trace_dir, ignore_errors=True)
        if created and not args.keep_image and img:
            try:
                os.unlink(img)
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(main())
