#!/usr/bin/env python3
"""Post-copy recovery, ours and QEMU 7.2 side by side: N network failures in one migration.

Figure: per recovery, the time from the failure to pages flowing again; goal (issue 10):
our median <= QEMU's, with 10 failures in one 1 GiB migration at 100 MiB/s and exit 0.

QEMU side: ANCHORS/qemu/postcopy_run.py --mem 1024 --bw 100 --pauses N [--preempt] (see
--anchors): migrate-pause on the source every 0.3 s of post-copy, then migrate-recover on the
destination and migrate resume=true on the source, as an operator's script would; it reports
`recoveries_s` (migrate-pause -> postcopy-active again).
Our side (lazy restore of a 1 GiB random image, ~10 % zero pages):
  postcopy serve-dest --ram mem=1G --listen tcp:127.0.0.1:0 --json --recover-timeout 60
  postcopy migrate --image IMG --to tcp:127.0.0.1:PROXY --max-bandwidth 100M --json --recover-timeout 60
with tests/proxy.py's FaultProxy in between: every 0.3 s of post-copy, once the previous
recovery is complete, it cuts every connection (RST); a recovery is timed from the cut to
the first source byte after the destination's RESUME_ACK (FaultProxy.recoveries()).

usage: recovery_bench.py [--pauses 10] [--mem-mib 1024] [--bw 100] [--preempt] [--qemu-only | --skip-qemu]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))     # proxy.py, the FaultProxy
from restore_bench import (REPO, Children, NotListening, ForeignCPU, add_anchors_option, find_anchor,  # noqa: E402
                           listening_port, make_image, postcopy_cmd, use_rev, wait_idle)
from qemu_compare import completed_anchor_run, last_json, qemu_missing  # noqa: E402
from proxy import FaultProxy, ProxyError  # noqa: E402

GOAL_MEDIAN_X = 1.0            # our median recovery <= QEMU's
STATS_KEYS = ("postcopy-recoveries", "postcopy-paused-ms", "postcopy-recovery-ms")
RESULTS_DIR = os.path.join(HERE, "results")


def summary(ms: list[float]) -> dict:
    """Median and p90 (interpolated) of the recoveries that completed."""
    done = sorted(v for v in ms if v is not None)
    if not done:
        return {"n": 0, "median_ms": None, "p90_ms": None, "max_ms": None}
    p90 = statistics.quantiles(done, n=10, method="inclusive")[8] if len(done) > 1 else done[0]
    return {"n": len(done), "median_ms": round(statistics.median(done), 2), "p90_ms": round(p90, 2),
            "max_ms": round(done[-1], 2)}


# --------------------------------------------------------------------------- QEMU side

def run_qemu(script: str, args) -> dict:
    why = qemu_missing()
    if why:
        return {"available": False, "error": why}
    argv = [sys.executable, script, "--mem", str(args.mem_mib), "--bw", str(args.bw),
            "--pauses", str(args.pauses), "--pause-every-s", str(args.pause_every_s)]
    if args.preempt:
        argv.append("--preempt")
    fc = ForeignCPU()
    out, failed = completed_anchor_run(argv, args.timeout)
    if failed:
        return failed
    rec = out.get("recoveries_s")
    if not isinstance(rec, list):
        return {"available": False, "error": "postcopy_run.py printed no recoveries_s (an anchor without --pauses?)",
                "raw": out}
    ms = [round(1000 * v, 2) for v in rec]
    return {"available": True, "raw": out, "cpu": fc.result(), "recoveries_ms": ms, **summary(ms),
            "postcopy_s": out.get("postcopy_phase_s"), "note": "migrate-pause -> source postcopy-active again"}


# --------------------------------------------------------------------------- our side

def rejected_option(err: str) -> bool:
    return "--recover-timeout" in err and ("no such option" in err.lower() or "unrecognized" in err.lower())


def run_ours(args, image: str) -> dict:
    pc = postcopy_cmd()
    work = tempfile.mkdtemp(prefix="pcrecover-", dir=args.image_dir)
    kids = Children(work)
    procs, spawn, text = kids.procs, kids.spawn, kids.text

    def errors():
        return "; ".join(f"{n} (exit {p.poll()}): {text(n, 'err').strip()[-300:]}" for n, p in procs.items()
                         if text(n, "err").strip())

    def not_built():
        err = " ".join(text(n, "err") for n in procs)
        if rejected_option(err):
            return {"available": False, "error": "recovery is not built yet: serve-dest/migrate reject "
                                                 f"--recover-timeout (issue 10); {errors()}"}
        return None

    rt = str(args.recover_timeout)
    proxy = None
    fc = ForeignCPU()
    try:
        sd = spawn("serve-dest", pc + ["serve-dest", "--ram", f"mem={args.mem_mib}M", "--listen", "tcp:127.0.0.1:0",
                                       "--json", "--recover-timeout", rt])
        try:
            port = listening_port(sd, kids.files["serve-dest"][0].name)
        except NotListening as e:
            try:
                sd.wait(5)
            except subprocess.TimeoutExpired:
                pass
            return not_built() or {"available": False, "error": f"serve-dest did not start ({e}): {errors()}"}
        proxy = FaultProxy(("127.0.0.1", port))
        margv = pc + ["migrate", "--image", image, "--to", proxy.uri, "--max-bandwidth", f"{args.bw}M",
                      "--json", "--recover-timeout", rt]
        if not args.preempt:
            margv.append("--single-channel")
        t0 = time.monotonic()
        spawn("migrate", margv)

        def ended() -> str | None:
            for n, p in procs.items():
                if p.poll() is not None:
                    return n
            return None

        try:
            (main,) = proxy.wait_connections("main", 1, timeout=30)[:1]
        except ProxyError:
            return not_built() or {"available": False, "error": f"migrate never connected: {errors()}"}
        # image mode: RUN comes right after the header, so post-copy starts with the main connection
        t_pc = main.accepted_at
        cut_note = None
        for i in range(args.pauses):
            when = t_pc + args.pause_every_s * (i + 1)
            while time.monotonic() < when and not ended():
                time.sleep(min(0.005, max(0.0, when - time.monotonic())))
            gone = ended()
            if gone:
                cut_note = f"{gone} exited (code {procs[gone].poll()}) after {i} of {args.pauses} cuts"
                break
            if not proxy.cut():
                cut_note = f"nothing to cut at cut {i + 1}: the migration ended after {i} cuts"
                break
            give_up = time.monotonic() + args.recover_timeout + 5
            while True:
                try:
                    proxy.wait_resumed(i + 1, timeout=0.1)
                    break
                except ProxyError as e:
                    gone = ended()
                    if gone or time.monotonic() > give_up:
                        why = f"{gone} exited (code {procs[gone].poll()})" if gone else str(e)
                        return {"available": False, "error": f"recovery {i + 1} did not complete: {why}; {errors()}",
                                "recoveries_ms": [None if v is None else round(1000 * v, 2)
                                                  for v in proxy.recoveries()]}
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline and any(p.poll() is None for p in procs.values()):
            if any(p.poll() not in (None, 0) for p in procs.values()):
                deadline = min(deadline, time.monotonic() + 5)
            time.sleep(0.01)
        t_end = time.monotonic()
        exits = {n: p.poll() for n, p in procs.items()}
        built = not_built()
        if built:
            return built
        sd_out, mg_out = last_json(text("serve-dest")), last_json(text("migrate"))
        ms = [None if v is None else round(1000 * v, 2) for v in proxy.recoveries()]
        res = {"exits": exits, "cpu": fc.result(), "recoveries_ms": ms, **summary(ms),
               "cuts": len(proxy.cuts()), "total_s": round(t_end - t0, 2),
               "connections": [{"kind": r.kind, "c2s": r.bytes["c2s"], "s2c": r.bytes["s2c"],
                                "closed_by": r.closed_by} for r in proxy.connections()],
               "stats": {"serve-dest": {k: (sd_out or {}).get(k) for k in STATS_KEYS},
                         "migrate": {k: (mg_out or {}).get(k) for k in STATS_KEYS}},
               "note": "cut (RST, both sides) -> first source byte after RESUME_ACK"}
        if cut_note:
            res["cut_note"] = cut_note
        if any(rc != 0 for rc in exits.values()):
            return {"available": False, **res, "error": f"exits {exits}: {errors()}"}
        if len(ms) < args.pauses or None in ms:
            return {"available": False, **res,
                    "error": f"{len(ms)} cuts of {args.pauses}, {res['n']} recovered ({cut_note or 'see recoveries_ms'})"}
        return {"available": True, **res}
    except Exception as e:  # noqa: BLE001
        return {"available": False, "error": f"{type(e).__name__}: {e}"}
    finally:
        if proxy is not None:
            proxy.close()
        kids.close()
        if args.keep_work:
            print(f"  (kept {work})", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- report

def fmt(v, nd=1):
    return "—" if v is None else f"{v:.{nd}f}"


def ratio(a, b):
    return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def report(ours: dict, qemu: dict, args) -> dict:
    print(f"\n== recovery: {args.mem_mib} MiB at {args.bw} MiB/s, {args.pauses} failures every "
          f"{args.pause_every_s:g} s of post-copy, {'preempt' if args.preempt else 'single channel'} ==")
    for side, d in (("QEMU", qemu), ("ours", ours)):
        if not d.get("available"):
            print(f"  {side}: not available: {d.get('error')}")
    qo, oo = qemu.get("recoveries_ms") or [], ours.get("recoveries_ms") or []
    print(f"  {'recovery':>8s} {'ours (ms)':>10s} {'QEMU (ms)':>10s}")
    for i in range(max(len(qo), len(oo))):
        print(f"  {i + 1:>8d} {fmt(oo[i] if i < len(oo) else None):>10s} {fmt(qo[i] if i < len(qo) else None):>10s}")
    for label, key in (("median", "median_ms"), ("p90", "p90_ms"), ("max", "max_ms")):
        print(f"  {label:>8s} {fmt(ours.get(key)):>10s} {fmt(qemu.get(key)):>10s}   ours/QEMU "
              f"{fmt(ratio(ours.get(key), qemu.get(key)), 3)}")
    r = ratio(ours.get("median_ms"), qemu.get("median_ms")) if ours.get("available") and qemu.get("available") else None
    verdict = "—" if r is None else ("ok" if r <= GOAL_MEDIAN_X else "MISSED")
    print(f"  goal: median recovery ours <= QEMU     ratio {fmt(r, 3):>7s} (limit {GOAL_MEDIAN_X:g})  {verdict}")
    for cmd, st in (ours.get("stats") or {}).items():
        shown = {k: v for k, v in st.items() if v is not None}
        print(f"  ours {cmd} stats: " + (", ".join(f"{k} {v}" for k, v in shown.items()) or
                                         f"none of {', '.join(STATS_KEYS)}"))
    for side, d in (("ours", ours), ("QEMU", qemu)):
        if d.get("note"):
            print(f"  {side}: {d['note']}" + (f"; {d['cut_note']}" if d.get("cut_note") else ""))
    return {"ratio": r, "limit": GOAL_MEDIAN_X, "met": None if r is None else r <= GOAL_MEDIAN_X}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pauses", type=int, default=10, help="network failures in the one migration")
    ap.add_argument("--pause-every-s", type=float, default=0.3, help="one failure per this much post-copy time")
    ap.add_argument("--mem-mib", type=int, default=1024)
    ap.add_argument("--bw", type=int, default=100, help="bandwidth cap, MiB/s (both sides)")
    ap.add_argument("--preempt", action="store_true",
                    help="QEMU with postcopy-preempt; ours with its preempt channel (else --single-channel)")
    ap.add_argument("--recover-timeout", type=float, default=60.0, help="our commands' --recover-timeout")
    ap.add_argument("--timeout", type=float, default=300.0, help="limit of one side's whole run, seconds")
    ap.add_argument("--image-dir", default=tempfile.gettempdir())
    ap.add_argument("--idle-wait", type=float, default=60.0,
                    help="wait up to this long before each side for other processes to leave the CPUs idle (0: don't)")
    ap.add_argument("--rev", help="run our side from a clean export of this git revision (e.g. HEAD)")
    ap.add_argument("--out", help="write the JSON results here (default benchmarks/results/recovery_bench-DATE.json)")
    side = ap.add_mutually_exclusive_group()
    side.add_argument("--qemu-only", action="store_true", help="run the QEMU anchor only")
    side.add_argument("--skip-qemu", action="store_true", help="run our side only")
    ap.add_argument("--keep-work", action="store_true")
    add_anchors_option(ap)
    args = ap.parse_args()
    if args.pauses < 1:
        ap.error("--pauses must be at least 1")

    machine = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "kernel": platform.release(), "nproc": os.cpu_count()}
    qv = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.split("\n")[0] \
        if shutil.which("qemu-system-x86_64") else None
    print(f"# recovery_bench  {machine['date']}  kernel {machine['kernel']}  nproc {machine['nproc']}  "
          f"{qv or 'no QEMU'}", flush=True)
    log = lambda *a: print(*a, flush=True)  # noqa: E731

    qemu = {"available": False, "error": "skipped"}
    if not args.skip_qemu:
        script = find_anchor(args.anchors, os.path.join("qemu", "postcopy_run.py"))
        if script is None:
            qemu = {"available": False, "error": f"QEMU side skipped: no qemu/postcopy_run.py in "
                                                 f"{os.path.abspath(args.anchors)} (give --anchors DIR)"}
        else:
            if args.idle_wait:
                wait_idle(args.idle_wait, log)
            log(f"QEMU: postcopy_run.py --pauses {args.pauses} ...")
            qemu = run_qemu(script, args)
            log(f"  -> {json.dumps(qemu.get('raw') or qemu.get('error'))}  cpu {qemu.get('cpu')}")

    ours = {"available": False, "error": "skipped"}
    rev_dir = None
    if not args.qemu_only:
        rev_dir = use_rev(args.rev, log) if args.rev else None
        img = os.path.join(args.image_dir, f"pcrecover-{os.getpid()}.img")
        log(f"ours: writing a {args.mem_mib} MiB image ...")
        try:
            make_image(img, args.mem_mib << 20)
            if args.idle_wait:
                wait_idle(args.idle_wait, log)
            log(f"ours: {args.pauses} cuts through FaultProxy ...")
            ours = run_ours(args, img)
        finally:
            try:
                os.unlink(img)
            except FileNotFoundError:
                pass
        log(f"  -> {'ok' if ours.get('available') else 'not available: ' + str(ours.get('error'))[:800]}"
            f"  cpu {ours.get('cpu')}")

    goal = report(ours, qemu, args)
    import restore_bench
    machine["postcopy"] = restore_bench.REV_DESC
    result = {"bench": "recovery_bench", "machine": machine, "qemu": qv, "mem_mib": args.mem_mib, "bw_mibps": args.bw,
              "pauses": args.pauses, "pause_every_s": args.pause_every_s, "preempt": args.preempt, "goal": goal,
              "ours": ours, "qemu_side": {k: v for k, v in qemu.items()}}
    out = args.out or os.path.join(RESULTS_DIR, f"recovery_bench-{machine['date'][:10]}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=str)
        f.write("\n")
    print(f"\n(results in {os.path.relpath(out, REPO) if out.startswith(REPO) else out})")
    print(json.dumps(result, separators=(",", ":"), default=str))
    if rev_dir:
        shutil.rmtree(rev_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
