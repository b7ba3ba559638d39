#!/usr/bin/env python3
"""What TLS costs (issue 11): ours plaintext vs TLS, beside QEMU 7.2 plaintext vs TLS, in one run.

1. the 1 GiB image restore of restore_bench.py (``workload touch`` at random), ``--runs`` times
   each way, alternating: total time, post-copy phase (serve-dest's RUN -> complete), p50 demand
   latency (serve-dest's fault -> placed), CPU seconds per GiB of serve-dest + migrate;
2. the 1 GiB live migration, no cap, 1 s of pre-copy (qemu_compare.py's scenario), ours plain
   and TLS, QEMU plain and TLS (``anchors/qemu/postcopy_run.py [--tls]``): total, post-copy phase,
   p50 demand latency (QEMU: blocktime / requests, its only figure), CPU seconds per GiB (every
   process of the run: workloads and guest included, so only comparable within a column pair).

Credentials come from ``postcopy tls-creds create`` (QEMU makes its own with certtool/openssl).
Prints the table of the issue with the goals' ratios, then one JSON line.

usage: tls_bench.py [--size 1G] [--runs 3] [--warmup 1] [--live-runs 1] [--no-qemu] [--no-live] [--anchors DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from restore_bench import (add_anchors_option, child_env, find_anchor, make_image, one_restore, parse_size,  # noqa: E402
                           postcopy_cmd, wait_idle, warm_host_memory)
from qemu_compare import qemu_missing, run_ours, run_qemu  # noqa: E402

GiB = 1 << 30


def median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def restore_figures(r: dict, size: int) -> dict:
    cpu = r.get("proc_cpu_s") or {}
    ours = sum(c["user"] + c["sys"] for n, c in cpu.items() if n in ("serve-dest", "migrate"))
    return {"ok": r.get("ok"), "total_s": r.get("total_s"),
            "postcopy_s": (r["sd_postcopy_ms"] / 1000) if r.get("sd_postcopy_ms") is not None else None,
            "p50_us": r.get("sd_p50_interp_us") or r.get("sd_p50_us"),
            "cpu_s_per_gib": round(ours / (size / GiB), 3) if cpu else None, "error": r.get("error")}


def live_figures(r: dict, mem_mib: int, qemu: bool) -> dict:
    if not r.get("available"):
        return {"ok": False, "error": r.get("error")}
    cpu = (r.get("cpu") or {}).get("ours_cpu_s") if not qemu else (r.get("cpu") or {}).get("busy_cpu_s")
    return {"ok": True, "total_s": r.get("total_s"), "postcopy_s": r.get("postcopy_s"),
            "p50_us": r.get("latency_us") if qemu else r.get("latency_p50_us"),
            "cpu_s_per_gib": round(cpu / (mem_mib / 1024), 3) if cpu is not None else None}


def medians(runs: list[dict]) -> dict:
    ok = [r for r in runs if r.get("ok")]
    out = {k: median([r.get(k) for r in ok]) for k in ("total_s", "postcopy_s", "p50_us", "cpu_s_per_gib")}
    out["runs"], out["failed"] = len(ok), [r.get("error") for r in runs if not r.get("ok")]
    return out


def ratio(a, b):
    return round(a / b, 2) if a is not None and b else None


def fmt(v):
    return "-" if v is None else f"{v:g}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=parse_size, default=GiB)
    ap.add_argument("--runs", type=int, default=3, help="restores each way")
    ap.add_argument("--warmup", type=int, default=1,
                    help="uncounted plain restores first (the first restore of a run pays for cold page cache "
                         "and allocator)")
    ap.add_argument("--live-runs", type=int, default=1, help="live migrations each way and side")
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--no-live", action="store_true")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--idle-wait", type=float, default=20.0)
    ap.add_argument("--warm-mib", type=int, default=None,
                    help="MiB to fault in and free before every run (restore_bench.warm_host_memory; default 3x "
                         "--size, 0: off)")
    ap.add_argument("--image-dir", default=tempfile.gettempdir())
    add_anchors_option(ap)
    args = ap.parse_args()
    if args.warm_mib is None:
        args.warm_mib = 3 * (args.size >> 20)

    work = tempfile.mkdtemp(prefix="pctls-")
    creds = os.path.join(work, "pki")
    subprocess.run(postcopy_cmd() + ["tls-creds", "create", creds, "--hostname", "127.0.0.1"], check=True,
                   env=child_env(), capture_output=True)
    img = os.path.join(work, "mem.img")
    print(f"image: {args.size >> 20} MiB at {img}", flush=True)
    make_image(img, args.size)
    base = dict(size=args.size, timeout=args.timeout, wait_run=False, handover_wait=1.0, image_dir=args.image_dir,
                keep_work=False, migrate_args="")
    ways = {"plain": dict(base, serve_args=""),
            "tls": dict(base, serve_args=f"--tls-creds {creds}", migrate_args=f"--tls-creds {creds}")}
    restore: dict[str, list] = {"plain": [], "tls": []}
    try:
        for i in range(args.warmup):
            r = restore_figures(one_restore(types.SimpleNamespace(**ways["plain"]), img, 0), args.size)
            print(f"  warm-up restore (not counted): {r}", flush=True)
        for i in range(1, args.runs + 1):
            for way, opts in ways.items():
                if args.idle_wait:
                    wait_idle(args.idle_wait, log=lambda *a: None)
                warm_host_memory(args.warm_mib << 20)
                r = restore_figures(one_restore(types.SimpleNamespace(**opts), img, i), args.size)
                restore[way].append(r)
                print(f"  restore {way} #{i}: {r}", flush=True)
    finally:
        os.unlink(img)
    live: dict[str, list] = {"ours plain": [], "ours tls": [], "qemu plain": [], "qemu tls": []}
    mem_mib = args.size >> 20
    qemu_script = find_anchor(args.anchors, "qemu/postcopy_run.py")
    if not args.no_live:
        for i in range(args.live_runs):
            for tls in (False, True):
                warm_host_memory(args.warm_mib << 20)
                r = run_ours(mem_mib, 0, 1.0, args.timeout, 1.0, False, tls_creds=creds if tls else None)
                live["ours tls" if tls else "ours plain"].append(live_figures(r, mem_mib, False))
                print(f"  live ours {'tls' if tls else 'plain'}: {live['ours tls' if tls else 'ours plain'][-1]}",
                      flush=True)
                if not args.no_qemu and qemu_script and not qemu_missing():
                    warm_host_memory(args.warm_mib << 20)
                    q = run_qemu(qemu_script, mem_mib, 0, 1.0, 300, tls=tls)
                    live["qemu tls" if tls else "qemu plain"].append(live_figures(q, mem_mib, True))
                    print(f"  live qemu {'tls' if tls else 'plain'}: {live['qemu tls' if tls else 'qemu plain'][-1]}",
                          flush=True)
    shutil.rmtree(work, ignore_errors=True)

    rm = {w: medians(v) for w, v in restore.items()}
    lm = {w: medians(v) for w, v in live.items()}
    print()
    oks = "; ".join(f"{w}: {m['runs']} ok" for w, m in rm.items())
    print(f"restore of {mem_mib} MiB, medians of {args.runs} ({oks})")
    print(f"{'figure':34} {'plain':>9} {'TLS':>9} {'TLS/plain':>9}  goal")
    goals = {"total_s": "<= 1.25", "p50_us": "<= 1.3"}
    for key, label in [("total_s", "total (s)"), ("postcopy_s", "post-copy phase (s)"),
                       ("p50_us", "p50 demand latency (us)"), ("cpu_s_per_gib", "CPU s / GiB (serve-dest+migrate)")]:
        print(f"{label:34} {fmt(rm['plain'][key]):>9} {fmt(rm['tls'][key]):>9} "
              f"{fmt(ratio(rm['tls'][key], rm['plain'][key])):>9}  {goals.get(key, '')}")
    if not args.no_live:
        print()
        print(f"live {mem_mib} MiB, no cap, 1 s pre-copy (medians)")
        print(f"{'figure':34} {'ours':>9} {'ours TLS':>9} {'QEMU':>9} {'QEMU TLS':>9} {'oursTLS/QEMU TLS':>17}")
        for key, label in [("total_s", "total (s)"), ("postcopy_s", "post-copy phase (s)"),
                           ("p50_us", "p50 latency (us; QEMU: bt/req)"), ("cpu_s_per_gib", "CPU s / GiB (all procs)")]:
            print(f"{label:34} {fmt(lm['ours plain'][key]):>9} {fmt(lm['ours tls'][key]):>9} "
                  f"{fmt(lm['qemu plain'][key]):>9} {fmt(lm['qemu tls'][key]):>9} "
                  f"{fmt(ratio(lm['ours tls'][key], lm['qemu tls'][key])):>17}")
        print("goals: ours TLS post-copy phase <= 0.5x QEMU TLS; <= 1.25x ours plain")
    print(json.dumps({"restore": {"runs": restore, "medians": rm}, "live": {"runs": live, "medians": lm}}))


if __name__ == "__main__":
    main()
