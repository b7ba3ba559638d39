#!/usr/bin/env python3
"""Live post-copy migration of 1 GiB, ours and QEMU 7.2 side by side (issue 4 section 4).

Two scenarios, each side gets 1 s of pre-copy, then post-copy to completion (issue 13's goals):
  nocap   no bandwidth cap     post-copy phase <= 0.8x QEMU's; destination blocktime <= QEMU's;
                               passes/s during post-copy >= QEMU's; bytes sent <= QEMU's
  bw100   100 MiB/s cap        average demand-request latency <= 0.5x QEMU's; downtime <= QEMU's
  both                         serve-dest memory <= 64 MiB

The program's progress is measured on the same windows for both sides: the post-copy phase
(ours: the incoming workload from RUN to its complete event; QEMU: from the source guest's last
serial byte, i.e. its last pass before switch-over, for postcopy_run.py's post-copy phase) and the
1 s after completion.  A pass is one serial byte of QEMU's guest (one increment of every page but
the first and last MiB and the last 16) and one sweep of our loop over every page; both count
whole passes, ours also pages touched per second.  QEMU's serial files are read while it runs
(the anchor makes its folder under our TMPDIR).

QEMU side: ANCHORS/qemu/postcopy_run.py (see --anchors) --mem 1024 --precopy-s 1 [--bw 100]
(needs Debian's qemu-system-x86 and nasm; uses KVM).
Our side:
  postcopy serve-dest --listen tcp:127.0.0.1:0 --uffd-socket DST --json --stats F
  postcopy workload incoming --mem 1G --attach DST --report-after-complete 1 --json
  postcopy migrate --attach SRC --to tcp:127.0.0.1:PORT --postcopy-after 1 [--max-bandwidth 100M] --json
  postcopy workload run --mem 1G --attach SRC

usage: qemu_compare.py [--mem-mib 1024] [--scenarios nocap,bw100] [--runs 1] [--skip-qemu] [--skip-ours]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import restore_bench  # noqa: E402
from restore_bench import NotListening, ForeignCPU, child_env, listening_port, use_rev, wait_idle, warm_host_memory, StatusSampler, add_anchors_option, find_anchor, end_children, postcopy_cmd, wait4  # noqa: E402

GOAL_POSTCOPY_X = 0.8
GOAL_LATENCY_X = 0.5
GOAL_MEM_MIB = 64.0
SCENARIOS = {"nocap": 0, "bw100": 100}


def find_key(d, *names):
    """First value found under any of `names`, searching nested dicts breadth-first."""
    if not isinstance(d, dict):
        return None
    todo = [d]
    while todo:
        cur = todo.pop(0)
        for n in names:
            if n in cur and cur[n] is not None and not isinstance(cur[n], dict):
                return cur[n]
        todo.extend(v for v in cur.values() if isinstance(v, dict))
    return None


def last_json(text: str):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


# --------------------------------------------------------------------------- QEMU side

def qemu_missing() -> str | None:
    miss = [t for t in ("qemu-system-x86_64", "nasm") if not shutil.which(t)]
    if miss:
        return (f"missing {', '.join(miss)}: install with `apt-get update && apt-get install -y "
                f"qemu-system-x86 nasm` (this script does not install anything)")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not usable (postcopy_run.py runs QEMU with -enable-kvm)"
    return None


def run_anchor(argv: list[str], timeout: float, env: dict | None = None) -> tuple[int, str, str]:
    """Runs an anchor script to its end: (exit code, stdout, stderr).  It runs in a process
    group of its own, so that on a timeout (TimeoutExpired) or ^C the QEMU processes it
    started go too."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env=env)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except BaseException:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            try:
                p.wait(5)
                break
            except subprocess.TimeoutExpired:
                continue
        raise
    return p.returncode, stdout, stderr


class SerialWatch:
    """Reads the sizes of QEMU's serial files (src.ser, dst.ser: one byte per guest pass) under
    ``root`` every 5 ms while the anchor runs: the time of every byte, for the progress windows."""

    def __init__(self, root: str):
        import threading
        self.root = root
        self.times: dict[str, list[float]] = {"src.ser": [], "dst.ser": []}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)

    def _run(self):
        paths: dict[str, str] = {}
        sizes = {name: 0 for name in self.times}
        while not self._stop.wait(0.005):
            if len(paths) < len(self.times):
                for dirpath, _, names in os.walk(self.root):
                    for name in self.times:
                        if name in names:
                            paths[name] = os.path.join(dirpath, name)
            now = time.monotonic()
            for name, path in paths.items():
                try:
                    size = os.path.getsize(path)
                except OSError:
                    continue
                self.times[name].extend([now] * (size - sizes[name]))
                sizes[name] = max(size, sizes[name])

    def postcopy_passes(self, phase_s: float) -> dict:
        """Whole passes of the destination guest in the post-copy phase: from the source guest's last
        pass (it stops at switch-over) for ``phase_s``."""
        src, dst = self.times["src.ser"], self.times["dst.ser"]
        if not src or not phase_s:
            return {}
        t_pc = src[-1]
        n = sum(1 for t in dst if t_pc < t <= t_pc + phase_s)
        return {"whole_passes": n, "seconds": round(phase_s, 3), "passes_per_second": round(n / phase_s, 3)}


def completed_anchor_run(argv: list[str], timeout: float, env: dict | None = None) -> tuple[dict | None, dict | None]:
    """Run postcopy_run.py: (its JSON figures, None) for a completed migration, else (None, the
    "not available" result saying why)."""
    try:
        rc, stdout, stderr = run_anchor(argv, timeout, env)
    except subprocess.TimeoutExpired:
        return None, {"available": False, "error": f"postcopy_run.py timed out after {timeout:.0f} s"}
    out = last_json(stdout)
    if rc or not out:
        return None, {"available": False, "error": f"exit {rc}: {(stdout + stderr).strip()[-500:]}"}
    if out.get("status") != "completed":
        return None, {"available": False, "error": f"QEMU migration status {out.get('status')!r}", "raw": out}
    return out, None


def run_qemu(script: str, mem_mib: int, bw: int, precopy_s: float, timeout: float, *, tls: bool = False) -> dict:
    why = qemu_missing()
    if why:
        return {"available": False, "error": why}
    argv = [sys.executable, script, "--mem", str(mem_mib),
            "--precopy-s", str(precopy_s)]
    if bw:
        argv += ["--bw", str(bw)]
    if tls:
        argv.append("--tls")
    t = time.monotonic()
    fc = ForeignCPU()
    anchor_tmp = tempfile.mkdtemp(prefix="pcqemu-anchor-")
    try:
        with SerialWatch(anchor_tmp) as serial:
            out, failed = completed_anchor_run(argv, timeout, env=dict(os.environ, TMPDIR=anchor_tmp))
    finally:
        shutil.rmtree(anchor_tmp, ignore_errors=True)
    if failed:
        return failed
    during = serial.postcopy_passes(out.get("postcopy_phase_s") or 0)
    after = out.get("guest_passes_after_1s_on_dest")
    req = out.get("postcopy_requests") or 0
    bt = out.get("dest_postcopy_blocktime_ms")
    tot = (out.get("total_time_ms") or 0) / 1000
    return {
        "available": True, "wall_s": round(time.monotonic() - t, 1), "raw": out, "cpu": fc.result(),
        "total_s": tot,
        "precopy_s": round(tot - out["postcopy_phase_s"], 3) if tot else precopy_s,
        "postcopy_s": out.get("postcopy_phase_s"),
        "requests": req,
        "blocktime_ms": bt,
        "latency_us": round(1000 * bt / req, 1) if bt is not None and req else None,
        "latency_note": "postcopy-blocktime / post-copy requests (as postcopy_run.py)",
        "blocktime_per_request_us": (round(1000 * sum(out.get("dest_vcpu_blocktime_ms") or []) / req, 1)
                                     if req and out.get("dest_vcpu_blocktime_ms") else None),
        "downtime_ms": out.get("downtime_ms"),
        "sent_mib": out.get("transferred_mib"),
        "postcopy_passes_per_s": during.get("passes_per_second"),
        "postcopy_whole_passes": during.get("whole_passes"),
        "passes_per_s": after,
        "progress_kept": (round(during["passes_per_second"] / after, 3)
                          if during.get("passes_per_second") is not None and after else None),
        "passes_note": "guest passes (serial bytes): during post-copy from the source's last pass for its "
                       "post-copy phase; in the 1 s after completion",
        "mem_mib": None,
    }


# --------------------------------------------------------------------------- our side

PERF_EVENTS = "task-clock,context-switches,cpu-migrations,raw_syscalls:sys_enter,page-faults"


def read_perf_stat(path: str) -> dict:
    """perf stat -x, output: {event: count}."""
    out = {}
    try:
        with open(path) as f:
            for line in f:
                parts = line.strip().split(",")
                if len(parts) >= 3 and parts[0] and not line.startswith("#"):
                    try:
                        out[parts[2]] = float(parts[0])
                    except ValueError:
                        pass
    except OSError:
        pass
    return out


def run_ours(mem_mib: int, bw: int, precopy_s: float, timeout: float, report_after: float, keep: bool, *,
             tls_creds: str | None = None, perf_stat: bool = False) -> dict:
    pc = postcopy_cmd()
    work = tempfile.mkdtemp(prefix="pcqemu-")
    dst_sock, src_sock = os.path.join(work, "dst.sock"), os.path.join(work, "src.sock")
    stats_file = os.path.join(work, "stats.json")
    procs: dict[str, subprocess.Popen] = {}
    files: dict = {}
    mem = f"{mem_mib}M"

    def spawn(name, argv, perf=False):
        if perf:
            argv = ["perf", "stat", "-x,", "-o", os.path.join(work, name + ".perf"), "-e", PERF_EVENTS, "--"] + argv
        files[name] = (open(os.path.join(work, name + ".out"), "w+"), open(os.path.join(work, name + ".err"), "w+"))
        procs[name] = subprocess.Popen(argv, stdout=files[name][0], stderr=files[name][1], cwd=work, env=child_env())
        return procs[name]

    def text(name, which="out"):
        f = files[name][0 if which == "out" else 1]
        f.flush()
        f.seek(0)
        return f.read()

    def tail_errs():
        return {n: text(n, "err").strip()[-300:] for n in procs if text(n, "err").strip()}

    tls = ["--tls-creds", tls_creds] if tls_creds else []
    fc = ForeignCPU()
    try:
        sd = spawn("serve-dest", pc + ["serve-dest", "--listen", "tcp:127.0.0.1:0", "--uffd-socket", dst_sock,
                                       "--json", "--stats", stats_file, "--timeout", str(timeout)] + tls,
                   perf=perf_stat)
        sampler = StatusSampler(sd.pid)
        sampler.start()
        try:
            port = listening_port(sd, files["serve-dest"][0].name)
        except NotListening as e:
            return {"available": False, "error": f"serve-dest did not start ({e}): {tail_errs()}"}
        inc = spawn("incoming", pc + ["workload", "incoming", "--mem", mem, "--attach", dst_sock,
                                      "--report-after-complete", str(report_after), "--json",
                                      "--connect-timeout", "20"])
        margv = pc + ["migrate", "--attach", src_sock, "--to", f"tcp:127.0.0.1:{port}",
                      "--postcopy-after", str(precopy_s), "--json", "--timeout", str(timeout)]
        if bw:
            margv += ["--max-bandwidth", f"{bw}M"]
        margv += tls
        t0 = time.monotonic()
        mg = spawn("migrate", margv, perf=perf_stat)
        src = spawn("source", pc + ["workload", "run", "--mem", mem, "--attach", src_sock, "--connect-timeout", "20",
                                      "--warmup-passes", "1"])
        limit = timeout + 60
        rc_sd, _ = wait4(sd, limit, watch=(mg, src, inc))
        t_end = time.monotonic()
        sampler.stop()
        if rc_sd is None:
            return {"available": False, "error": f"serve-dest did not finish (timeout {limit:.0f} s, or a peer failed): "
                                                       f"{tail_errs()}"}
        rc_mg, _ = wait4(mg, 30)
        try:
            rc_inc = inc.wait(report_after + 30)
        except subprocess.TimeoutExpired:
            rc_inc = None
        exits = {"serve-dest": rc_sd, "migrate": rc_mg, "incoming": rc_inc, "source": src.poll()}
        sd_stats = None
        try:
            with open(stats_file) as f:
                sd_stats = json.load(f)
        except (OSError, json.JSONDecodeError):
            sd_stats = last_json(text("serve-dest"))
        mg_out, inc_out = last_json(text("migrate")), last_json(text("incoming"))
        if rc_sd != 0 or rc_mg != 0 or not sd_stats:
            return {"available": False, "exits": exits,
                    "error": f"exits {exits}; " + "; ".join(f"{k}: {v}" for k, v in tail_errs().items())}
        req = sd_stats.get("postcopy-requests") or 0
        bt = sd_stats.get("postcopy-blocktime")
        lat = sd_stats.get("latency-us") or {}
        down = sd_stats.get("downtime-ms")
        down_src = "serve-dest"
        if down is None:
            down, down_src = find_key(mg_out, "downtime_ms", "downtime-ms"), "migrate (source pause -> RUN sent)"
        pc_ms = find_key(mg_out, "postcopy_seconds", "postcopy-time-s")
        pc_s = pc_ms if pc_ms is not None else None
        if pc_s is None and sd_stats.get("postcopy-time-ms") is not None:
            # serve-dest's post-copy time; add downtime so it runs from switch-over like QEMU's figure
            pc_s = (sd_stats["postcopy-time-ms"] + (down or 0)) / 1000
        pre_s = find_key(mg_out, "precopy_seconds", "precopy-time-s", "precopy_s")
        total_s = round(t_end - t0, 3)
        sent = find_key(mg_out, "bytes", "bytes_sent", "transferred")
        profile = {}
        for name, proc in (("serve-dest", sd), ("migrate", mg)):
            ut, st = restore_bench.LAST_RUSAGE.get(proc.pid, (None, None))
            prof = {"user_s": round(ut, 3) if ut is not None else None,
                    "sys_s": round(st, 3) if st is not None else None}
            if perf_stat:
                ps = read_perf_stat(os.path.join(work, name + ".perf"))
                mib = sent / 2 ** 20 if isinstance(sent, (int, float)) and sent else None
                prof.update({"context_switches": ps.get("context-switches"), "cpu_migrations": ps.get("cpu-migrations"),
                             "syscalls": ps.get("raw_syscalls:sys_enter"), "page_faults": ps.get("page-faults"),
                             "syscalls_per_mib": round(ps["raw_syscalls:sys_enter"] / mib, 1)
                             if mib and ps.get("raw_syscalls:sys_enter") else None,
                             "context_switches_per_request": round(ps["context-switches"] / req, 2)
                             if req and ps.get("context-switches") else None})
            profile[name] = prof
        return {
            "available": True, "exits": exits, "cpu": fc.result(), "profile": profile, "raw": {"serve_dest": sd_stats, "migrate": mg_out, "incoming": inc_out},
            "total_s": total_s,
            "total_note": "wall: migrate start (incl. its startup and the source's hand-over) to serve-dest exit",
            "precopy_s": pre_s if pre_s is not None else precopy_s,
            "postcopy_s": round(pc_s, 3) if pc_s is not None else None,
            "requests": req,
            "blocktime_ms": bt,
            "latency_us": lat.get("mean"),
            "latency_note": "serve-dest mean of fault read -> page placed",
            "blocktime_per_request_us": round(1000 * bt / req, 1) if bt is not None and req else None,
            "latency_p50_us": lat.get("p50"), "latency_p99_us": lat.get("p99"),
            "downtime_ms": down,
            "downtime_note": f"downtime from {down_src}",
            "sent_mib": round(sent / 2 ** 20, 1) if isinstance(sent, (int, float)) else None,
            **_progress(inc_out, report_after),
            "check_ok": find_key(inc_out, "check_ok", "ok", "check"),
            "mem_mib": round(sampler.hwm_kib / 1024, 1),
            "mem_rss_last_mib": round(sampler.rss_last_kib / 1024, 1),
        }
    except Exception as e:  # noqa: BLE001
        return {"available": False, "error": f"{type(e).__name__}: {e}"}
    finally:
        end_children(procs, files)
        if keep:
            print(f"  (kept {work})", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _progress(inc_out: dict | None, after: float) -> dict:
    """The incoming workload's progress windows (workload incoming --report-after-complete)."""
    prog = (inc_out or {}).get("progress") or {}
    post, aft = prog.get("postcopy") or {}, prog.get("after_complete") or {}
    whole = post.get("whole_passes")
    return {
        "postcopy_passes_per_s": (round(whole / post["seconds"], 3) if whole is not None and post.get("seconds")
                                  else None),
        "postcopy_whole_passes": whole,
        "postcopy_pages_per_s": post.get("pages_per_second"),
        "passes_per_s": aft.get("passes_per_second"),
        "progress_kept": (round(post["passes_per_second"] / aft["passes_per_second"], 3)
                          if post.get("passes_per_second") is not None and aft.get("passes_per_second") else None),
        "passes_note": f"incoming workload: whole passes from RUN to its complete event; passes (pages "
                       f"touched / pages) in the {after:g} s after it; progress kept: pages touched per "
                       f"second during post-copy over those after it (QEMU: whole passes, coarse)",
    }


# --------------------------------------------------------------------------- report

ROWS = [
    ("total time (s)", "total_s", 2),
    ("pre-copy (s)", "precopy_s", 2),
    ("post-copy phase: switch-over -> done (s)", "postcopy_s", 3),
    ("post-copy requests", "requests", 0),
    ("blocktime (ms)", "blocktime_ms", 1),
    ("avg demand latency (us)", "latency_us", 1),
    ("blocktime / requests (us; QEMU: vCPU blocktime)", "blocktime_per_request_us", 1),
    ("downtime (ms)", "downtime_ms", 1),
    ("sent (MiB)", "sent_mib", 1),
    ("passes/s during post-copy (whole passes / phase)", "postcopy_passes_per_s", 2),
    ("pages touched/s during post-copy (ours only)", "postcopy_pages_per_s", 0),
    ("passes/s in the 1 s after completion", "passes_per_s", 2),
    ("progress kept during post-copy (during / after)", "progress_kept", 3),
    ("serve-dest memory VmHWM (MiB)", "mem_mib", 1),
]


def fmt(v, nd):
    if v is None:
        return "—"
    if isinstance(v, (int, float)):
        return f"{v:.{nd}f}" if nd else f"{v:.0f}"
    return str(v)


def median_side(results: list[dict]) -> dict:
    ok = [r for r in results if r.get("available")]
    if not ok:
        return results[-1] if results else {"available": False, "error": "not run"}
    out = {"available": True, "runs": len(ok)}
    for _, key, _ in ROWS + [("", "latency_p50_us", 0), ("", "latency_p99_us", 0)]:
        vals = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
        out[key] = statistics.median(vals) if vals else None
    for k in ("latency_note", "passes_note", "total_note", "downtime_note"):
        if ok[0].get(k):
            out[k] = ok[0][k]
    return out


def ratio(a, b):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return round(a / b, 3)
    return None


def print_scenario(name, bw, ours, qemu, mem_mib):
    print(f"\n== {name}: {mem_mib} MiB live, {'no cap' if not bw else f'{bw} MiB/s cap'}, 1 s pre-copy ==")
    if not qemu.get("available"):
        print(f"  QEMU: not available: {qemu.get('error')}")
    if not ours.get("available"):
        print(f"  ours: not available: {ours.get('error')}")
    print(f"  {'figure':48s} {'ours':>10s} {'QEMU 7.2':>10s} {'ours/QEMU':>10s}")
    for label, key, nd in ROWS:
        print(f"  {label:48s} {fmt(ours.get(key), nd):>10s} {fmt(qemu.get(key), nd):>10s} "
              f"{fmt(ratio(ours.get(key), qemu.get(key)), 3):>10s}")
    goals = []
    if not bw:
        goals.append(("post-copy phase <= 0.8x QEMU", ratio(ours.get("postcopy_s"), qemu.get("postcopy_s")),
                      GOAL_POSTCOPY_X))
        goals.append(("blocktime <= QEMU", ratio(ours.get("blocktime_ms"), qemu.get("blocktime_ms")), 1.0))
        # passes/s: QEMU's over ours must be <= 1 (ours at least QEMU's)
        goals.append(("passes/s during post-copy >= QEMU (QEMU/ours)",
                      ratio(qemu.get("postcopy_passes_per_s"), ours.get("postcopy_passes_per_s")), 1.0))
        goals.append(("bytes sent <= QEMU", ratio(ours.get("sent_mib"), qemu.get("sent_mib")), 1.0))
    else:
        goals.append(("avg demand latency <= 0.5x QEMU", ratio(ours.get("latency_us"), qemu.get("latency_us")), GOAL_LATENCY_X))
    goals.append(("downtime <= QEMU", ratio(ours.get("downtime_ms"), qemu.get("downtime_ms")), 1.0))
    goals.append(("serve-dest memory <= 64 MiB", ratio(ours.get("mem_mib"), GOAL_MEM_MIB), 1.0))
    for label, r, lim in goals:
        verdict = "—" if r is None else ("ok" if r <= lim else "MISSED")
        print(f"  goal: {label:34s} ratio {fmt(r, 3):>7s} (limit {lim:g})  {verdict}")
    for side, d in (("ours", ours), ("QEMU", qemu)):
        notes = [d.get(k) for k in ("latency_note", "passes_note", "total_note", "downtime_note") if d.get(k)]
        if notes:
            print(f"  {side}: " + "; ".join(notes))
    return {label: {"ratio": r, "limit": lim, "met": None if r is None else r <= lim} for label, r, lim in goals}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mem-mib", type=int, default=1024)
    ap.add_argument("--precopy-s", type=float, default=1.0)
    ap.add_argument("--scenarios", default="nocap,bw100", help="comma list of: " + ",".join(SCENARIOS))
    ap.add_argument("--runs", type=int, default=1, help="runs per side and scenario (median shown)")
    ap.add_argument("--report-after", type=float, default=1.0,
                    help="the incoming workload reports this long after the migration is complete")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--warm-mib", type=int, default=None,
                    help="MiB of memory to fault in and free before each run of either side (free page "
                         "reporting: see restore_bench.warm_host_memory; default 3x --mem-mib, 0: off)")
    ap.add_argument("--idle-wait", type=float, default=60.0,
                    help="wait up to this long before each run for other processes to leave the CPUs idle (0: don't)")
    ap.add_argument("--rev", help="run our side from a clean export of this git revision (e.g. HEAD)")
    ap.add_argument("--skip-qemu", action="store_true")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--keep-work", action="store_true")
    ap.add_argument("--perf-stat", action="store_true",
                    help="run our serve-dest and migrate under perf stat: context switches, CPU migrations, "
                         "syscalls (per MiB sent, per request)")
    add_anchors_option(ap)
    args = ap.parse_args()
    if args.warm_mib is None:
        args.warm_mib = 3 * args.mem_mib
    scen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in scen if s not in SCENARIOS]
    if bad:
        ap.error(f"unknown scenario(s) {bad}; choose from {list(SCENARIOS)}")

    qemu_script = find_anchor(args.anchors, os.path.join("qemu", "postcopy_run.py"))
    if qemu_script is None and not args.skip_qemu:
        print(f"QEMU side skipped: no qemu/postcopy_run.py in {os.path.abspath(args.anchors)} "
              f"(give the anchors' folder with --anchors DIR or POSTCOPY_ANCHORS); measuring our side only", flush=True)
        args.skip_qemu = True
    machine = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "kernel": platform.release(), "nproc": os.cpu_count()}
    qv = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.split("\n")[0] \
        if shutil.which("qemu-system-x86_64") else None
    print(f"# qemu_compare  {machine['date']}  kernel {machine['kernel']}  nproc {machine['nproc']}  {qv or 'no QEMU'}",
          flush=True)
    why = qemu_missing()
    if why and not args.skip_qemu:
        print(f"QEMU side not available: {why}", flush=True)

    rev_dir = use_rev(args.rev) if args.rev and not args.skip_ours else None
    import restore_bench
    machine["postcopy"] = restore_bench.REV_DESC
    summary = {"bench": "qemu_compare", "machine": machine, "qemu": qv, "mem_mib": args.mem_mib, "scenarios": {}}
    for name in scen:
        bw = SCENARIOS[name]
        qruns, oruns = [], []
        for i in range(args.runs):
            if not args.skip_qemu:
                if args.idle_wait:
                    wait_idle(args.idle_wait, lambda *a: print(*a, flush=True))
                warm_host_memory(args.warm_mib << 20)
                print(f"[{name}] QEMU run {i + 1}/{args.runs} ...", flush=True)
                q = run_qemu(qemu_script, args.mem_mib, bw, args.precopy_s, args.timeout + 120)
                qruns.append(q)
                print(f"  -> {json.dumps(q.get('raw') or q.get('error'))}  cpu {q.get('cpu')}", flush=True)
            if not args.skip_ours:
                if args.idle_wait:
                    wait_idle(args.idle_wait, lambda *a: print(*a, flush=True))
                warm_host_memory(args.warm_mib << 20)
                print(f"[{name}] ours run {i + 1}/{args.runs} ...", flush=True)
                o = run_ours(args.mem_mib, bw, args.precopy_s, args.timeout, args.report_after, args.keep_work,
                             perf_stat=args.perf_stat)
                oruns.append(o)
                for pname, prof in (o.get("profile") or {}).items():
                    print(f"     {pname:10s} " + "  ".join(f"{k} {v}" for k, v in prof.items()), flush=True)
                print(f"  -> {'ok  cpu ' + str(o.get('cpu')) if o.get('available') else 'not available: ' + str(o.get('error'))[:600]}",
                      flush=True)
        qm = median_side(qruns) if qruns else {"available": False, "error": "skipped"}
        om = median_side(oruns) if oruns else {"available": False, "error": "skipped"}
        goals = print_scenario(name, bw, om, qm, args.mem_mib)
        summary["scenarios"][name] = {
            "bw_mibps": bw, "goals": goals,
            "ours": {k: v for k, v in om.items() if k != "raw"}, "qemu": {k: v for k, v in qm.items() if k != "raw"},
            "ours_runs": [{k: v for k, v in r.items()} for r in oruns],
            "qemu_runs": [r.get("raw") or {"error": r.get("error")} for r in qruns],
        }
    if rev_dir:
        shutil.rmtree(rev_dir, ignore_errors=True)
    print()
    print(json.dumps(summary, separators=(",", ":"), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
