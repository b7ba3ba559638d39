#!/usr/bin/env python3
"""Lazy restore of a 1 GiB image over loopback TCP, measured against the C floor.

One run on this machine does:

1. the C floor (``ANCHORS/uffd_floor.c``, see ``--anchors``), modes ``tcp 256 random`` and
   ``local 256 random``: a userfaultfd fault served by C over loopback TCP /
   in-process, p50/p99 of the faulting touch;
2. ``--runs N`` restores of a random image (~10 % zero pages) into an attached
   toucher that touches every page in random order:

     postcopy serve-dest --listen tcp:127.0.0.1:0 --uffd-socket S --json --stats F
     postcopy workload touch --size 1G --attach S --image IMG --order random --json
     postcopy migrate --to tcp:127.0.0.1:PORT --image IMG --json

and prints each run, the median, the goals of DESIGN.md section 7 and the
ratio of our figure to the goal (<= 1.0 meets it), then one JSON line.

usage: restore_bench.py [--size 1G] [--runs 3] [--image-dir /tmp] [--keep-image]
                        [--floor-mib 256] [--wait-run] [--json-only] [--anchors DIR]
"""
from __future__ import annotations

import argparse
import datetime
import json
import mmap
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

PAGE = 4096
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the installed postcopy_cli (pip install .), as the children run it: a source tree is not built
from postcopy_cli.selftest import harness  # noqa: E402
from postcopy_cli.selftest.harness import NotListening, read_listening  # noqa: E402

GOAL_TOTAL_S = 1.5          # whole 1 GiB restored (scaled linearly for other sizes)
GOAL_MEM_MIB = 64.0         # serve-dest's own memory (RAM lives in the toucher)
GOAL_P50_X_FLOOR = 1.5      # p50 request latency <= 1.5x the C floor (tcp) p50


# --------------------------------------------------------------------------- helpers

def parse_size(s: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGkmg]?)(i?[Bb]?)?", s.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r} (e.g. 1G, 256M)")
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]


# The anchors (shared/anchors of the project's design documents: uffd_floor.c, qemu/postcopy_run.py)
# are not part of this repository; without them the scripts measure our side only.
ANCHORS_DEFAULT = os.path.join(REPO, "..", "shared", "anchors")


def add_anchors_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--anchors", metavar="DIR", default=os.environ.get("POSTCOPY_ANCHORS") or ANCHORS_DEFAULT,
                    help="folder of the anchors (uffd_floor.c, qemu/postcopy_run.py); default $POSTCOPY_ANCHORS, "
                         "else ../shared/anchors beside the repository")


def find_anchor(anchors: str, name: str) -> str | None:
    """The anchor file ``anchors/name``, or None when it is not there."""
    path = os.path.abspath(os.path.join(anchors, name))
    return path if os.path.isfile(path) else None


def postcopy_cmd() -> list[str]:
    """How to run `postcopy`: $POSTCOPY_CMD, else this interpreter with -m postcopy_cli
    (avoids pyenv shims, and keeps the child's PID the PID we wait on)."""
    if os.environ.get("POSTCOPY_CMD"):
        return os.environ["POSTCOPY_CMD"].split()
    return [sys.executable, "-m", "postcopy_cli"]


_CHILD_ENV: dict | None = None
REV_DESC = "working tree"


def child_env() -> dict:
    """Environment for the `postcopy` children: the postcopy_cli this script imported, or --rev's export."""
    return _CHILD_ENV if _CHILD_ENV is not None else harness.child_env()


def listening_port(sd: subprocess.Popen, stdout_path: str, timeout: float = 20) -> int:
    """The port of `serve-dest --json --listen tcp:...:0`, from its first stdout line (a file here)."""
    return int(read_listening(sd, timeout, path=stdout_path)["address"].rsplit(":", 1)[1])


def use_rev(rev: str, log=print) -> str:
    """Run `postcopy` from a clean export of git revision `rev` (its native layer built
    fresh), not from the working tree that other people may be editing.  Returns the dir."""
    global _CHILD_ENV, REV_DESC
    dest = tempfile.mkdtemp(prefix=f"postcopy-{re.sub(r'[^A-Za-z0-9]', '_', rev)[:20]}-")
    sha = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", rev], capture_output=True, text=True,
                         check=True).stdout.strip()
    arch = subprocess.run(["git", "-C", REPO, "archive", "--format=tar", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=arch, check=True)
    r = subprocess.run([sys.executable, "postcopy_cli/_build_native.py"], cwd=dest, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"building the native layer of {rev} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    env = dict(os.environ)
    env["PYTHONPATH"] = dest + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    chk = subprocess.run([sys.executable, "-c", "import postcopy_cli, postcopy_cli._native; print(postcopy_cli.__file__)"],
                         env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if not chk.stdout.startswith(dest):
        sys.exit(f"export of {rev} is not the postcopy_cli that gets imported: {chk.stdout}{chk.stderr}")
    _CHILD_ENV = env
    REV_DESC = f"{rev} ({sha})"
    log(f"postcopy from git {rev} ({sha}), exported to {dest}")
    return dest


def pct(sorted_vals, q):
    if not sorted_vals:
        return None
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))]


def hist_top_percentiles(hist: dict[str, int], k: int, qs=(0.5, 0.99)) -> dict:
    """Percentiles over the k slowest samples of a power-of-two histogram
    (keys: bucket upper bound in µs, e.g. "1024" or "<1024").  Returns for each
    q the bucket's upper bound and a linear interpolation inside the bucket
    [ub/2, ub)."""
    buckets = []
    for key, n in hist.items():
        ub = float(re.sub(r"[^0-9.]", "", key))
        if key.startswith(">="):
            ub *= 2
        buckets.append((ub, int(n)))
    buckets.sort()
    total = sum(n for _, n in buckets)
    k = max(0, min(k, total))
    if k == 0:
        return {}
    # drop the (total - k) fastest samples
    drop = total - k
    kept = []
    for ub, n in buckets:
        d = min(drop, n)
        drop -= d
        if n - d:
            kept.append((ub, n - d))
    out = {}
    for q in qs:
        want = q * k
        seen = 0
        for ub, n in kept:
            if seen + n >= want:
                frac = (want - seen) / n if n else 1.0
                lo = ub / 2 if ub > 1 else 0.0
                out[q] = {"bucket_ub": ub, "interp": round(lo + frac * (ub - lo), 1)}
                break
            seen += n
    return out


def hist_percentiles(hist: dict[str, int], qs=(0.5, 0.99)) -> dict:
    return hist_top_percentiles(hist, sum(int(v) for v in hist.values()), qs)


def kill_proc(p: subprocess.Popen | None):
    if p is None or p.poll() is not None:
        return
    try:
        p.send_signal(signal.SIGTERM)
        p.wait(3)
    except subprocess.TimeoutExpired:
        p.kill()
        try:
            p.wait(3)
        except subprocess.TimeoutExpired:
            pass
    except ProcessLookupError:
        pass


class Children:
    """The `postcopy` children of one run: each one's stdout and stderr go to files in `work`."""

    def __init__(self, work: str):
        self.work = work
        self.procs: dict[str, subprocess.Popen] = {}
        self.files: dict[str, tuple] = {}

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        self.files[name] = (open(os.path.join(self.work, name + ".out"), "w+"),
                            open(os.path.join(self.work, name + ".err"), "w+"))
        self.procs[name] = subprocess.Popen(argv, stdout=self.files[name][0], stderr=self.files[name][1],
                                            cwd=self.work, env=child_env())
        return self.procs[name]

    def text(self, name: str, which: str = "out") -> str:
        f = self.files[name][0 if which == "out" else 1]
        f.flush()
        f.seek(0)
        return f.read()

    def close(self):
        end_children(self.procs, self.files)


def end_children(procs: dict, files: dict) -> None:
    """Ends the children still running and closes their stdout/stderr files."""
    for p in procs.values():
        kill_proc(p)
    for fo, fe in files.values():
        fo.close()
        fe.close()


class StatusSampler(threading.Thread):
    """Samples VmHWM / VmRSS of a PID from /proc every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.01):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.hwm_kib = 0
        self.rss_max_kib = 0
        self.rss_last_kib = 0
        self.samples = 0
        self._stop = threading.Event()

    def sample(self):
        try:
            with open(f"/proc/{self.pid}/status") as f:
                txt = f.read()
        except OSError:
            return False
        for line in txt.splitlines():
            if line.startswith("VmHWM:"):
                self.hwm_kib = max(self.hwm_kib, int(line.split()[1]))
            elif line.startswith("VmRSS:"):
                v = int(line.split()[1])
                self.rss_last_kib = v
                self.rss_max_kib = max(self.rss_max_kib, v)
        self.samples += 1
        return True

    def run(self):
        while not self._stop.is_set():
            if not self.sample():
                break
            self._stop.wait(self.interval)

    def stop(self):
        self._stop.set()


def exited_badly(p: subprocess.Popen) -> bool:
    """Has `p` exited with a failure?  Peeks (WNOWAIT) so wait4 can still reap it with its rusage."""
    if p.returncode is not None:
        return p.returncode != 0
    try:
        r = os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    if r is None:
        return False
    return not (r.si_code == os.CLD_EXITED and r.si_status == 0)


LAST_RUSAGE: dict[int, tuple[float, float]] = {}   # pid -> (user s, system s) of reaped children


def wait4(p: subprocess.Popen, timeout: float, watch=(), grace: float = 5.0) -> tuple[int | None, int]:
    """Wait for a child, returning (exit code, ru_maxrss KiB).  None on timeout.

    If a process in `watch` exits non-zero first, give `p` only `grace` more seconds."""
    deadline = time.monotonic() + timeout
    while True:
        for w in watch:
            if exited_badly(w):
                deadline = min(deadline, time.monotonic() + grace)
        if p.returncode is not None:      # already reaped elsewhere
            return p.returncode, 0
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid == p.pid:
            rc = os.waitstatus_to_exitcode(status)
            p.returncode = rc
            LAST_RUSAGE[p.pid] = (ru.ru_utime, ru.ru_stime)
            return rc, ru.ru_maxrss
        if time.monotonic() > deadline:
            return None, 0
        time.sleep(0.002)


class ForeignCPU:
    """CPU seconds used on this host by processes other than us and our children
    over a window: (busy jiffies in /proc/stat) - (our own and reaped children's CPU).
    Other engineers' tests on a 2-CPU box show up here; a large value taints the run."""

    def __init__(self):
        self.t0, self.busy0, self.own0 = time.monotonic(), self._busy(), self._own()

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal
        return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        import resource
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    def result(self) -> dict:
        wall = time.monotonic() - self.t0
        busy, own = self._busy() - self.busy0, self._own() - self.own0
        return {"wall_s": round(wall, 2), "busy_cpu_s": round(busy, 2), "ours_cpu_s": round(own, 2),
                "foreign_cpu_s": round(max(0.0, busy - own), 2), "loadavg_1m": round(os.getloadavg()[0], 2)}


def wait_idle(max_wait: float, log=print, threshold: float = 0.25) -> dict:
    """Wait (up to max_wait s) for a 1 s window in which other processes use < threshold CPU-s.
    Returns {"waited_s", "idle": bool, "last_foreign_cpu_s"}."""
    t0 = time.monotonic()
    last = None
    said = False
    while True:
        fc = ForeignCPU()
        time.sleep(1.0)
        last = fc.result()["foreign_cpu_s"]
        if last < threshold:
            return {"waited_s": round(time.monotonic() - t0, 1), "idle": True, "last_foreign_cpu_s": last}
        if time.monotonic() - t0 >= max_wait:
            log(f"  host still busy after {max_wait:.0f} s ({last} CPU-s/s used by other processes); running anyway")
            return {"waited_s": round(time.monotonic() - t0, 1), "idle": False, "last_foreign_cpu_s": last}
        if not said:
            log(f"  waiting for the host to go idle (other processes use {last} CPU-s/s) ...")
            said = True


def warm_host_memory(nbytes: int) -> float:
    """Fault in and free ``nbytes`` of anonymous memory; returns the seconds it took.

    These VMs run with free page reporting (``page_reporting.page_reporting_order=11`` on the kernel
    command line, mm/page_reporting.c): free 8 MiB blocks go back to the host, and the first write to
    such memory costs a host fault.  A run that follows an idle spell would pay that for every page it
    places, a run right after another one would not: warming the same amount before every run, on
    both sides of a comparison, takes that difference out.  MAP_POPULATE makes the kernel allocate and
    zero every page at mmap(2) (a write: the host backs it); munmap frees them again, hot."""
    if nbytes <= 0:
        return 0.0
    t = time.monotonic()
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    m.close()
    return round(time.monotonic() - t, 2)


# --------------------------------------------------------------------------- C floor

FLOOR_RE = re.compile(r"mode=(\w+) pages=(\d+) faults/s=([\d.]+) MiB/s=([\d.]+) "
                      r"lat_us p50=([\d.]+) p99=([\d.]+) max=([\d.]+)")


def run_floor(src: str, mib: int, timeout: float, idle_wait: float = 0.0, log=print) -> dict:
    exe = os.path.join(tempfile.gettempdir(), "uffd_floor")
    r = subprocess.run(["gcc", "-O2", "-pthread", "-o", exe, src], capture_output=True, text=True)
    if r.returncode:
        return {"error": f"gcc failed: {r.stderr.strip()[:500]}"}
    out = {}
    for mode in ("tcp", "local"):
        if idle_wait:
            wait_idle(idle_wait, log)
        fc = ForeignCPU()
        try:
            r = subprocess.run([exe, mode, str(mib), "random"], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            out[mode] = {"error": f"timed out after {timeout} s"}
            continue
        m = FLOOR_RE.search(r.stdout)
        if r.returncode or not m:
            out[mode] = {"error": f"exit {r.returncode}: {(r.stdout + r.stderr).strip()[:300]}"}
            continue
        out[mode] = {"pages": int(m.group(2)), "faults_per_s": float(m.group(3)), "mib_per_s": float(m.group(4)),
                     "p50_us": float(m.group(5)), "p99_us": float(m.group(6)), "max_us": float(m.group(7)),
                     "cpu": fc.result()}
    return out


# --------------------------------------------------------------------------- image

def make_image(path: str, size: int, zero_frac: float = 0.10, seed: int = 1) -> dict:
    rnd = random.Random(seed)
    chunk_pages = 4096   # 16 MiB
    zero_pages = 0
    zero = bytes(PAGE)
    with open(path, "wb") as f:
        left = size // PAGE
        while left:
            n = min(chunk_pages, left)
            buf = bytearray(os.urandom(n * PAGE))
            mv = memoryview(buf)
            for i in range(n):
                if rnd.random() < zero_frac:
                    mv[i * PAGE:(i + 1) * PAGE] = zero
                    zero_pages += 1
            f.write(buf)
            left -= n
    return {"path": path, "bytes": size, "zero_pages": zero_pages}


# --------------------------------------------------------------------------- one restore

def one_restore(args, img: str, run_no: int) -> dict:
    pc = postcopy_cmd()
    work = tempfile.mkdtemp(prefix="pcbench-", dir=args.image_dir)
    sock = os.path.join(work, "uffd.sock")
    stats_file = os.path.join(work, "stats.json")
    procs: dict[str, subprocess.Popen] = {}
    files = {}
    res: dict = {"run": run_no}
    size_arg = f"{args.size // (1 << 20)}M"
    try:
        def spawn(name, argv):
            files[name] = (open(os.path.join(work, name + ".out"), "w+"), open(os.path.join(work, name + ".err"), "w+"))
            procs[name] = subprocess.Popen(argv, stdout=files[name][0], stderr=files[name][1], cwd=work,
                                           env=child_env())
            return procs[name]

        def text(name, which):
            f = files[name][0 if which == "out" else 1]
            f.flush()
            f.seek(0)
            return f.read()

        fc = ForeignCPU()
        t_sd = time.monotonic()
        sd = spawn("serve-dest", pc + ["serve-dest", "--listen", "tcp:127.0.0.1:0", "--uffd-socket", sock,
                                       "--json", "--stats", stats_file, "--timeout", str(args.timeout)]
                   + shlex.split(getattr(args, "serve_args", "")))
        sampler = StatusSampler(sd.pid)
        sampler.start()
        try:
            port = listening_port(sd, files["serve-dest"][0].name)
        except NotListening as e:
            raise RuntimeError(f"serve-dest did not announce its port ({e}): exit={sd.poll()} "
                               f"stderr={text('serve-dest', 'err')[-500:]!r}") from None
        res["serve_dest_startup_s"] = round(time.monotonic() - t_sd, 3)

        touch_argv = pc + ["workload", "touch", "--size", size_arg, "--attach", sock, "--image", img,
                           "--order", "random", "--json"]
        if args.wait_run:
            touch_argv.append("--wait-run")
        tc = spawn("touch", touch_argv)
        if args.wait_run:
            # let the toucher hand its memory over before the source starts
            time.sleep(args.handover_wait)
        t0 = time.monotonic()
        mg = spawn("migrate", pc + ["migrate", "--to", f"tcp:127.0.0.1:{port}", "--image", img, "--json",
                                    "--timeout", str(args.timeout)] + shlex.split(args.migrate_args))
        rc_sd, maxrss_sd = wait4(sd, args.timeout + 30, watch=(mg, tc))
        t_end = time.monotonic()
        sampler.stop()
        if rc_sd is None:
            raise RuntimeError(f"serve-dest did not exit (timeout, or a peer failed): exits migrate={mg.poll()} "
                               f"touch={tc.poll()}; stderr: " +
                               "; ".join(f"{n}: {text(n, 'err').strip()[-300:]}" for n in procs))
        res["total_s"] = round(t_end - t0, 3)
        rc_mg, _ = wait4(mg, 30)
        rc_tc, _ = wait4(tc, 60)
        res["proc_cpu_s"] = {n: {"user": round(LAST_RUSAGE[p.pid][0], 3), "sys": round(LAST_RUSAGE[p.pid][1], 3)}
                             for n, p in procs.items() if p.pid in LAST_RUSAGE}
        res["exit"] = {"serve-dest": rc_sd, "migrate": rc_mg, "touch": rc_tc}
        res["cpu"] = fc.result()

        def js(name):
            t = text(name, "out").strip().splitlines()
            try:
                return json.loads(t[-1]) if t else None
            except json.JSONDecodeError:
                return None
        sd_stats = None
        if os.path.exists(stats_file):
            try:
                with open(stats_file) as f:
                    sd_stats = json.load(f)
            except (OSError, json.JSONDecodeError):
                pass
        sd_stats = sd_stats or js("serve-dest")
        mg_out, tc_out = js("migrate"), js("touch")
        errs = {}
        for n in procs:
            lines = [ln for ln in text(n, "err").splitlines() if ln.strip() and "listening on" not in ln]
            if lines:
                errs[n] = "\n".join(lines)[-400:]
        if errs:
            res["stderr"] = errs
        res["ok"] = rc_sd == 0 and rc_mg == 0 and rc_tc == 0 and bool(tc_out) and tc_out.get("mismatches") == 0
        res["serve_dest"] = sd_stats
        res["migrate"] = mg_out
        res["touch"] = tc_out
        res["mem"] = {"ru_maxrss_mib": round(maxrss_sd / 1024, 1),
                      "vmhwm_mib": round(sampler.hwm_kib / 1024, 1),
                      "vmrss_max_mib": round(sampler.rss_max_kib / 1024, 1),
                      "vmrss_last_mib": round(sampler.rss_last_kib / 1024, 1),
                      "samples": sampler.samples}
        if sd_stats:
            lat = sd_stats.get("latency-us") or {}
            res["requests"] = sd_stats.get("postcopy-requests")
            res["faults"] = sd_stats.get("faults")
            res["sd_p50_us"] = lat.get("p50")
            res["sd_p99_us"] = lat.get("p99")
            hp = hist_percentiles(lat.get("histogram") or {})
            res["sd_p50_interp_us"] = hp.get(0.5, {}).get("interp")
            res["sd_p99_interp_us"] = hp.get(0.99, {}).get("interp")
            res["sd_mean_us"] = lat.get("mean")
            res["sd_total_ms"] = sd_stats.get("total-time-ms")
            res["sd_postcopy_ms"] = sd_stats.get("postcopy-time-ms")
            res["blocktime_ms"] = sd_stats.get("postcopy-blocktime")
            pages = sd_stats.get("pages") or {}
            res["pages_demand"] = pages.get("demand")
            res["pages_background"] = pages.get("background")
        if tc_out:
            res["touch_s"] = tc_out.get("seconds")
            k = (sd_stats or {}).get("faults") or 0
            tp = hist_top_percentiles(tc_out.get("histogram_us") or {}, k)
            # the k slowest touches are the ones that faulted (k = serve-dest's fault count)
            res["touch_fault_p50_us"] = tp.get(0.5, {}).get("bucket_ub")
            res["touch_fault_p99_us"] = tp.get(0.99, {}).get("bucket_ub")
            res["touch_fault_p50_interp_us"] = tp.get(0.5, {}).get("interp")
            res["touch_fault_p99_interp_us"] = tp.get(0.99, {}).get("interp")
            res["touch_max_us"] = tc_out.get("max_us")
        if mg_out:
            res["migrate_s"] = mg_out.get("total_seconds", mg_out.get("seconds"))
        return res
    except Exception as e:  # noqa: BLE001 — a benchmark reports, it does not crash
        res["ok"] = False
        res["error"] = f"{type(e).__name__}: {e}"
        return res
    finally:
        end_children(procs, files)
        if args.keep_work:
            res["workdir"] = work
        else:
            shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- report

def fmt(v, nd=1):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def median_of(runs, key):
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=parse_size, default=1 << 30, help="image / RAM size (default 1G)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--image-dir", default=tempfile.gettempdir())
    ap.add_argument("--keep-image", action="store_true", help="keep (and reuse) the generated image")
    ap.add_argument("--keep-work", action="store_true", help="keep each run's directory (logs, stats)")
    ap.add_argument("--floor-mib", type=int, default=256, help="C floor size in MiB (default 256)")
    ap.add_argument("--no-floor", action="store_true")
    ap.add_argument("--wait-run", action="store_true",
                    help="toucher waits for RUN before touching (default: touches as soon as attached)")
    ap.add_argument("--handover-wait", type=float, default=1.0, help="with --wait-run: seconds before migrate starts")
    ap.add_argument("--timeout", type=float, default=60.0, help="per-process timeout, seconds")
    ap.add_argument("--warm-mib", type=int, default=None,
                    help="MiB of memory to fault in and free before each run (free page reporting: see "
                         "warm_host_memory; default 3x --size, 0: off)")
    ap.add_argument("--idle-wait", type=float, default=60.0,
                    help="before each measurement wait up to this long for other processes to leave the CPUs idle "
                         "(0: don't); each run reports the foreign CPU seconds it saw")
    ap.add_argument("--migrate-args", default="", help="extra arguments for `postcopy migrate` "
                                                       "(e.g. '--max-bandwidth 200M' to separate queueing from service)")
    ap.add_argument("--rev", help="benchmark a clean export of this git revision (e.g. HEAD) instead of the "
                                   "working tree")
    ap.add_argument("--json-only", action="store_true", help="print only the JSON line")
    add_anchors_option(ap)
    args = ap.parse_args()
    if args.warm_mib is None:
        args.warm_mib = 3 * (args.size >> 20)
    if args.size % PAGE or args.size <= 0:
        ap.error("--size must be a positive multiple of 4 KiB")

    floor_src = find_anchor(args.anchors, "uffd_floor.c")
    machine = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "kernel": platform.release(), "nproc": os.cpu_count(), "python": platform.python_version()}
    log = (lambda *a: None) if args.json_only else (lambda *a: print(*a, flush=True))
    log(f"# restore_bench  {machine['date']}  kernel {machine['kernel']}  nproc {machine['nproc']}")

    rev_dir = use_rev(args.rev, log) if args.rev else None
    machine["postcopy"] = sys.modules[__name__].REV_DESC
    floor = {}
    if not args.no_floor and floor_src is None:
        log(f"C floor skipped: no uffd_floor.c in {os.path.abspath(args.anchors)} "
            f"(give the anchors' folder with --anchors DIR or POSTCOPY_ANCHORS); measuring our side only")
    elif not args.no_floor:
        log(f"C floor: {floor_src}, {args.floor_mib} MiB random ...")
        floor = run_floor(floor_src, args.floor_mib, timeout=120, idle_wait=args.idle_wait, log=log)
        for mode, f in floor.items():
            if isinstance(f, dict) and "p50_us" in f:
                log(f"  {mode:5s}: p50 {f['p50_us']:.1f} us  p99 {f['p99_us']:.1f} us  "
                    f"{f['faults_per_s']:.0f} faults/s  {f['mib_per_s']:.1f} MiB/s  "
                    f"(foreign CPU {f['cpu']['foreign_cpu_s']} s in {f['cpu']['wall_s']} s)")
            else:
                log(f"  {mode}: {f}")

    os.makedirs(args.image_dir, exist_ok=True)
    img = os.path.join(args.image_dir, f"postcopy-bench-{args.size >> 20}M.img")
    created = False
    if not (args.keep_image and os.path.exists(img) and os.path.getsize(img) == args.size):
        log(f"image: writing {args.size >> 20} MiB random (~10% zero pages) to {img} ...")
        t = time.monotonic()
        info = make_image(img, args.size)
        created = True
        log(f"  {info['zero_pages']} zero pages of {args.size // PAGE}, {time.monotonic() - t:.1f} s")
    runs = []
    try:
        for i in range(1, args.runs + 1):
            idle = wait_idle(args.idle_wait, log) if args.idle_wait else None
            warmed = warm_host_memory(args.warm_mib << 20)
            r = one_restore(args, img, i)
            r["idle_wait"] = idle
            r["warm_host_s"] = warmed
            runs.append(r)
            if r.get("error") or not r.get("ok"):
                log(f"run {i}: FAILED {r.get('error', '')} exit={r.get('exit')} {r.get('stderr', '')}")
            else:
                log(f"run {i}: total {r['total_s']:.3f} s, {r.get('requests')} requests, "
                    f"sd p50/p99 {fmt(r.get('sd_p50_us'), 0)}/{fmt(r.get('sd_p99_us'), 0)} us, "
                    f"touch-fault p50/p99 {fmt(r.get('touch_fault_p50_interp_us'))}/"
                    f"{fmt(r.get('touch_fault_p99_interp_us'))} us, VmHWM {r['mem']['vmhwm_mib']} MiB; "
                    f"foreign CPU {r['cpu']['foreign_cpu_s']} s in {r['cpu']['wall_s']} s (ours {r['cpu']['ours_cpu_s']} s)")
    finally:
        if rev_dir:
            shutil.rmtree(rev_dir, ignore_errors=True)
        if created and not args.keep_image:
            try:
                os.unlink(img)
            except OSError:
                pass

    ok_runs = [r for r in runs if r.get("ok")]
    keys = ["total_s", "requests", "faults", "sd_p50_us", "sd_p99_us", "sd_p50_interp_us", "sd_p99_interp_us",
            "sd_mean_us", "touch_fault_p50_us", "touch_fault_p99_us", "touch_fault_p50_interp_us",
            "touch_fault_p99_interp_us", "touch_s", "migrate_s", "sd_total_ms", "sd_postcopy_ms", "blocktime_ms",
            "pages_demand", "pages_background", "serve_dest_startup_s"]
    med = {k: median_of(ok_runs, k) for k in keys}
    for k in ("vmhwm_mib", "vmrss_max_mib", "vmrss_last_mib", "ru_maxrss_mib"):
        vals = [r["mem"][k] for r in ok_runs if r.get("mem")]
        med[k] = statistics.median(vals) if vals else None
    max_hwm = max((r["mem"]["vmhwm_mib"] for r in ok_runs if r.get("mem")), default=None)

    floor_tcp = (floor.get("tcp") or {}).get("p50_us")
    goal_total = GOAL_TOTAL_S * args.size / (1 << 30)
    goal_p50 = GOAL_P50_X_FLOOR * floor_tcp if floor_tcp else None

    def ratio(ours, goal):
        return round(ours / goal, 2) if ours is not None and goal else None

    rows = [
        ("whole image restored (s)", med["total_s"], f"<= {goal_total:.2f}", ratio(med["total_s"], goal_total)),
        ("serve-dest VmHWM (MiB)", med["vmhwm_mib"], f"<= {GOAL_MEM_MIB:.0f}", ratio(med["vmhwm_mib"], GOAL_MEM_MIB)),
        ("serve-dest VmRSS at end (MiB)", med["vmrss_last_mib"], f"<= {GOAL_MEM_MIB:.0f}",
         ratio(med["vmrss_last_mib"], GOAL_MEM_MIB)),
        ("p50 request, serve-dest (us, bucket<=)", med["sd_p50_us"], f"<= {fmt(goal_p50)}", ratio(med["sd_p50_us"], goal_p50)),
        ("p50 request, serve-dest (us, interp)", med["sd_p50_interp_us"], f"<= {fmt(goal_p50)}",
         ratio(med["sd_p50_interp_us"], goal_p50)),
        ("p50 faulting touch, program (us, interp)", med["touch_fault_p50_interp_us"], f"<= {fmt(goal_p50)}",
         ratio(med["touch_fault_p50_interp_us"], goal_p50)),
        ("p99 request, serve-dest (us, bucket<=)", med["sd_p99_us"], "—", None),
        ("p99 faulting touch, program (us, interp)", med["touch_fault_p99_interp_us"], "—", None),
        ("demand requests", med["requests"], "—", None),
    ]
    if not args.json_only:
        print()
        print(f"runs ok: {len(ok_runs)}/{len(runs)}   size {args.size >> 20} MiB   "
              f"C floor tcp p50 {fmt(floor_tcp)} us, p99 {fmt((floor.get('tcp') or {}).get('p99_us'))} us; "
              f"local p50 {fmt((floor.get('local') or {}).get('p50_us'))} us")
        hdr = ["run", "total s", "requests", "sd p50", "sd p99", "touch p50", "touch p99", "VmHWM", "VmRSS", "maxrss",
               "migrate s", "touch s"]
        print("  ".join(f"{h:>9s}" for h in hdr))
        for r in runs:
            if not r.get("ok"):
                print(f"{r['run']:>9}  FAILED: {r.get('error') or r.get('exit')}")
                continue
            vals = [r["run"], r["total_s"], r.get("requests"), r.get("sd_p50_us"), r.get("sd_p99_us"),
                    r.get("touch_fault_p50_interp_us"), r.get("touch_fault_p99_interp_us"), r["mem"]["vmhwm_mib"],
                    r["mem"]["vmrss_last_mib"], r["mem"]["ru_maxrss_mib"], r.get("migrate_s"), r.get("touch_s")]
            print("  ".join(f"{fmt(v, 3 if isinstance(v, float) and v < 10 else 1):>9s}" for v in vals))
        print("CPU seconds per process (user+sys) and the time split:")
        for r in runs:
            if r.get("ok") and r.get("proc_cpu_s"):
                cpu = "  ".join(f"{n} {c['user']:.2f}+{c['sys']:.2f}" for n, c in r["proc_cpu_s"].items())
                print(f"  run {r['run']}: {cpu};  foreign {r['cpu']['foreign_cpu_s']} s;  "
                      f"migrate start-up+connect ~{r['total_s'] - (r.get('sd_total_ms') or 0) / 1000:.2f} s, "
                      f"serve-dest stream {fmt((r.get('sd_total_ms') or 0) / 1000, 3)} s")
        print()
        print(f"{'figure (median of ok runs)':42s} {'ours':>10s} {'goal':>12s} {'ours/goal':>10s}")
        for name, ours, goal, rt in rows:
            flag = "" if rt is None else ("  ok" if rt <= 1.0 else "  MISSED")
            print(f"{name:42s} {fmt(ours, 3 if isinstance(ours, float) and ours < 10 else 1):>10s} {goal:>12s} "
                  f"{fmt(rt, 2):>10s}{flag}")
        print()
    summary = {
        "bench": "restore", "machine": machine, "size_bytes": args.size, "runs_ok": len(ok_runs),
        "runs_total": len(runs), "floor": floor, "median": med, "max_vmhwm_mib": max_hwm,
        "goals": {"total_s": goal_total, "serve_dest_mem_mib": GOAL_MEM_MIB, "p50_us": goal_p50},
        "ratios": {"total": ratio(med["total_s"], goal_total), "mem_vmhwm": ratio(med["vmhwm_mib"], GOAL_MEM_MIB),
                   "p50_serve_dest": ratio(med["sd_p50_us"], goal_p50),
                   "p50_serve_dest_interp": ratio(med["sd_p50_interp_us"], goal_p50),
                   "p50_touch_fault_interp": ratio(med["touch_fault_p50_interp_us"], goal_p50)},
        "runs": [{k: v for k, v in r.items() if k not in ("serve_dest", "migrate", "touch")} |
                 {"serve_dest_stats": r.get("serve_dest"), "migrate_json": r.get("migrate"),
                  "touch_json": r.get("touch")} for r in runs],
    }
    print(json.dumps(summary, separators=(",", ":")))
    return 0 if ok_runs and len(ok_runs) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
