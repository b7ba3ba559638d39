#!/usr/bin/env python3
"""Working-set replay (DESIGN.md section 10): a 1 GiB image restored into a program touching the
"function" pattern (workload touch --order function: ~15 % of the pages in clustered runs, in a
fixed order, jittered per run by --seed), side by side in one run:

  (0) cold: no workset, nothing recorded (the baseline of the ratios)
  (a) cold: no workset; serve-dest --record-workset a.ws (recording stages the pages that come
      unasked, so each first touch of one faults: the "staged" column is that cost)
  (b) the same program run (seed 1) replaying a.ws; it records b.ws
  (b2) the same, recording nothing (what replay alone gives the same run)
  (c) another, jittered run (seed 2) replaying a.ws
  (d) that run (seed 2) replaying a.ws and b.ws merged (what a restore that keeps learning gets)
  (e), (f), (g) as (c), (d) and (b2) with migrate --workset-before-run: the working set goes before
      RUN, the program starts once it is in (REAP's prefetch)

Per row: time until the program has touched its working set (from its start at RUN; and from
migrate's start, which counts a working set sent before RUN), demand
faults (serve-dest's postcopy-requests), faults served from staging while recording, p50/p99 fault latency as the program sees it (over its
slowest touches, as many as there were requests), total restore time; beside the C floor
(ANCHORS/uffd_floor.c, tcp 256 random).  The machine is shared: the foreign CPU of each row is
printed with it.

usage: workset_bench.py [--size 1G] [--image-dir /tmp] [--anchors DIR] [--json-only]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import restore_bench as rb  # noqa: E402


def recorded_pages(path: str | None) -> int | None:
    if not path:
        return None
    from postcopy_cli.codec import workset
    return workset.load(path).pages


def one(args, img: str, work: str, name: str, *, seed: int, record: str | None, worksets=(),
        before_run: bool = False) -> dict:
    pc = rb.postcopy_cmd()
    kids = rb.Children(work)
    sock = os.path.join(work, f"{name}.sock")
    try:
        sd = kids.spawn(f"{name}-sd", pc + ["serve-dest", "--listen", "tcp:127.0.0.1:0", "--uffd-socket", sock,
                                            "--json", *(["--record-workset", record] if record else [])])
        port = rb.listening_port(sd, os.path.join(work, f"{name}-sd.out"))
        fc = rb.ForeignCPU()
        touch = kids.spawn(f"{name}-touch", pc + ["workload", "touch", "--size", str(args.size), "--attach", sock,
                                                  "--image", img, "--order", "function", "--seed", str(seed),
                                                  "--jitter", "0.1", "--wait-run", "--json"])
        while not os.path.exists(sock) and touch.poll() is None:
            time.sleep(0.01)
        mig_argv = pc + ["migrate", "--to", f"tcp:127.0.0.1:{port}", "--image", img, "--json"]
        for w in worksets:
            mig_argv += ["--workset", w]
        if before_run:
            mig_argv.append("--workset-before-run")
        mig = kids.spawn(f"{name}-mig", mig_argv)
        rcs = {n: rb.wait4(p, 300, watch=(sd, touch, mig))[0] for n, p in
               (("migrate", mig), ("touch", touch), ("serve-dest", sd))}
        cpu = fc.result()
        if any(rc != 0 for rc in rcs.values()):
            return {"error": f"exit codes {rcs}: " + " | ".join(kids.text(n, "err")[-300:] for n in
                                                                 (f"{name}-sd", f"{name}-touch", f"{name}-mig"))}
        stats = json.loads(kids.text(f"{name}-sd").strip().splitlines()[-1])
        report = json.loads(kids.text(f"{name}-touch"))
        src = json.loads(kids.text(f"{name}-mig"))
        req = stats["postcopy-requests"]
        lat = rb.hist_top_percentiles(report["histogram_us"], req) if req else {}
        return {"row": name, "seed": seed, "worksets": [os.path.basename(w) for w in worksets],
                "ws_pages": report["pages"], "ws_seconds": report["seconds"], "demand_faults": req,
                "run_at_seconds": src.get("run_at_seconds"),
                "start_to_ws_seconds": round(src.get("run_at_seconds", 0) + report["seconds"], 3),
                "staged_faults": stats.get("staged-faults", 0), "recorded_pages": recorded_pages(record),
                "p50_us": lat.get(0.5, {}).get("interp"), "p99_us": lat.get(0.99, {}).get("interp"),
                "restore_seconds": src["total_seconds"], "mismatches": report["mismatches"],
                "verified_pages": report.get("verified_pages"), "foreign_cpu_s": cpu["foreign_cpu_s"]}
    finally:
        kids.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=rb.parse_size, default=1 << 30)
    ap.add_argument("--image-dir", default=tempfile.gettempdir())
    ap.add_argument("--floor-mib", type=int, default=256)
    ap.add_argument("--json-only", action="store_true")
    rb.add_anchors_option(ap)
    args = ap.parse_args()
    log = (lambda *a, **k: None) if args.json_only else print
    work = tempfile.mkdtemp(prefix="wsbench-", dir=args.image_dir)
    img = os.path.join(work, "image")
    try:
        log(f"image: {args.size >> 20} MiB random, ~10% zero pages")
        rb.make_image(img, args.size)
        floor_src = rb.find_anchor(args.anchors, "uffd_floor.c")
        floor = rb.run_floor(floor_src, args.floor_mib, 120).get("tcp", {}) if floor_src else {"error": "no anchor"}
        a_ws, b_ws = os.path.join(work, "a.ws"), os.path.join(work, "b.ws")
        rows = [one(args, img, work, "0-cold-no-record", seed=1, record=None)]
        rows.append(one(args, img, work, "a-cold", seed=1, record=a_ws))
        rows.append(one(args, img, work, "b-replay-same-run", seed=1, record=b_ws, worksets=[a_ws]))
        rows.append(one(args, img, work, "b2-same-run-no-record", seed=1, record=None, worksets=[a_ws]))
        rows.append(one(args, img, work, "c-replay-other-run", seed=2, record=None, worksets=[a_ws]))
        rows.append(one(args, img, work, "d-replay-merged", seed=2, record=None, worksets=[a_ws, b_ws]))
        rows.append(one(args, img, work, "e-other-before-run", seed=2, record=None, worksets=[a_ws],
                        before_run=True))
        rows.append(one(args, img, work, "f-merged-before-run", seed=2, record=None, worksets=[a_ws, b_ws],
                        before_run=True))
        rows.append(one(args, img, work, "g-same-before-run", seed=1, record=None, worksets=[a_ws],
                        before_run=True))
        cold = rows[0]
        for r in rows[1:]:
            if "error" not in r and "error" not in cold and cold["demand_faults"]:
                r["faults_vs_cold"] = round(r["demand_faults"] / cold["demand_faults"], 3)
                r["ws_time_vs_cold"] = round(r["ws_seconds"] / cold["ws_seconds"], 3)
                r["start_to_ws_vs_cold"] = round(r["start_to_ws_seconds"] / cold["start_to_ws_seconds"], 3)
        hdr = f"{'row':22} {'ws pages':>8} {'recorded':>8} {'ws time s':>9} {'faults':>7} {'staged':>6} " \
              f"{'x cold':>6} {'ws t x':>6} {'start s':>7} {'st x':>5} {'p50 us':>7} {'p99 us':>7} {'total s':>7} {'foreign':>7}"
        log(hdr)
        for r in rows:
            if "error" in r:
                log(f"{r.get('row', '?'):22} ERROR {r['error']}")
                continue
            log(f"{r['row']:22} {r['ws_pages']:>8} {r['recorded_pages'] or '-':>8} {r['ws_seconds']:>9.3f} "
                f"{r['demand_faults']:>7} {r['staged_faults']:>6} "
                f"{r.get('faults_vs_cold', '-'):>6} {r.get('ws_time_vs_cold', '-'):>6} {r['start_to_ws_seconds']:>7.3f} "
                f"{r.get('start_to_ws_vs_cold', '-'):>5} {r['p50_us'] or '-':>7} "
                f"{r['p99_us'] or '-':>7} {r['restore_seconds']:>7.3f} {r['foreign_cpu_s']:>7}")
        if "p50_us" in floor:
            log(f"{'C floor (tcp random)':22} {'':>8} {'':>8} {'':>9} {'':>7} {'':>6} {'':>6} {'':>6} {'':>7} {'':>5} {floor['p50_us']:>7} "
                f"{floor['p99_us']:>7}")
        else:
            log(f"C floor: {floor.get('error')}")
        print(json.dumps({"bench": "workset", "size": args.size, "rows": rows, "floor_tcp": floor}))
        return 0 if all("error" not in r for r in rows) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
