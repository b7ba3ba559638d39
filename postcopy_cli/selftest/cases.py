"""`postcopy selftest`: real migrations on this host over loopback, every byte verified.

Each case is a function taking a :class:`SelftestContext` and returning a result
dict ``{"name", "passed", "detail", "metrics"}``.  :data:`CASES` is the ordered
list the command runs; later modes (the live migration of ``migrate --attach``)
add theirs with :func:`register_case`.

The cases run the real programs: ``serve-dest``, ``workload touch`` and
``migrate`` are subprocesses of ``sys.executable -m postcopy_cli``, each with a
deadline after which it is killed, so nothing hangs and nothing is left behind.
The in-process case drives :class:`~postcopy_cli.dest.serve.ServeDest` and
:func:`~postcopy_cli.source.image.migrate_image` in two threads of this process.
"""
from __future__ import annotations

import ctypes
import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..codec.constants import TARGET_PAGE_SIZE
from ..errors import PostcopyError
from ..memory.mappings import libc
from ..units import plural
from ..signals import Interrupted
from .harness import NotListening, Procs, finish, read_listening

DEFAULT_SIZE = 64 << 20
DEFAULT_CASE_TIMEOUT = 20.0


class SelftestFailed(PostcopyError):
    """At least one selftest case failed (exit 1)."""


@dataclass
class SelftestContext:
    """What every case gets: the memory size, a private temp dir, the per-case deadline."""

    size: int
    tmpdir: str
    timeout: float = DEFAULT_CASE_TIMEOUT
    _images: dict = field(default_factory=dict)

    def path(self, name: str) -> str:
        return os.path.join(self.tmpdir, name)

    def image(self, kind: str = "random") -> str:
        """A memory image file of this context's size (made once per kind)."""
        if kind not in self._images:
            path = self.path(f"image-{kind}.bin")
            with open(path, "wb") as f:
                if kind == "random":
                    f.write(random_image(self.size))
                elif kind == "zeros":
                    f.write(zero_run_image(self.size))
                else:
                    raise ValueError(f"unknown image kind {kind!r}")
            self._images[kind] = path
        return self._images[kind]


@dataclass
class Case:
    name: str
    description: str
    run: Callable[[SelftestContext], dict]


CASES: list[Case] = []


def register_case(name: str, description: str, *, index: int | None = None):
    """Decorator: add a case to :data:`CASES` (at the end, or at ``index``)."""

    def deco(fn: Callable[[SelftestContext], dict]):
        case = Case(name, description, fn)
        if index is None:
            CASES.append(case)
        else:
            CASES.insert(index, case)
        return fn

    return deco


def result(name: str, passed: bool, detail: str, metrics: dict | None = None) -> dict:
    return {"name": name, "passed": bool(passed), "detail": detail, "metrics": metrics or {}}


# -- images ---------------------------------------------------------------------------

def random_image(size: int) -> bytes:
    """Incompressible bytes: every page differs, so a misplaced page cannot match."""
    return os.urandom(size)


def zero_run_image(size: int, seed: int = 2) -> bytes:
    """``size - 2345`` bytes (not a multiple of 4096): runs of zero pages of every length
    between runs of data pages, single zero pages, and a partial last page of data."""
    rng = random.Random(seed)
    length = size - 2345 if size > 2 * TARGET_PAGE_SIZE else size - 123
    buf = bytearray(length)
    pages = -(-length // TARGET_PAGE_SIZE)
    p = 0
    while p < pages:
        data = rng.choice((1, 1, 2, 7, 64))
        for q in range(p, min(p + data, pages)):
            chunk = rng.randbytes(TARGET_PAGE_SIZE)
            end = min((q + 1) * TARGET_PAGE_SIZE, length)
            buf[q * TARGET_PAGE_SIZE:end] = chunk[:end - q * TARGET_PAGE_SIZE]
        p += data + rng.choice((1, 1, 3, 16, 100))   # then a run of zero pages
    # the last (partial) page carries data so that the partial-page path is tested
    last = (pages - 1) * TARGET_PAGE_SIZE
    buf[last:length] = rng.randbytes(length - last)
    return bytes(buf)


# -- subprocesses ---------------------------------------------------------------------

def wait_listening(p: subprocess.Popen, deadline: float) -> str | None:
    """serve-dest's bound address, from its first stdout line (``--json``'s listening event), or None."""
    try:
        return read_listening(p, max(0.0, deadline - time.monotonic()))["address"]
    except NotListening:
        return None


def _dest_metrics(stats: dict | None, nbytes: int, seconds: float | None) -> dict:
    """Throughput over serve-dest's own clock (memory attached to every page in) when it has one:
    the source's clock also counts the wait for the program to attach."""
    stats = stats or {}
    if stats.get("total-time-ms"):
        seconds = stats["total-time-ms"] / 1000
    lat = stats.get("latency-us") or {}
    pages = stats.get("pages") or {}
    return {
        "bytes": nbytes,
        "seconds": seconds,
        "throughput_mib_s": round(nbytes / (1 << 20) / seconds, 1) if seconds else None,
        "requests": stats.get("postcopy-requests"),
        "latency_p50_us": lat.get("p50"),
        "latency_p99_us": lat.get("p99"),
        "blocktime_ms": stats.get("postcopy-blocktime"),
        "pages_demand": pages.get("demand"),
        "pages_background": pages.get("background"),
        "pages_zero": pages.get("zero"),
    }


def restore_to_attached(ctx: SelftestContext, name: str, *, image: str, order: str, listen: str) -> dict:
    """serve-dest + workload touch (verifies every byte) + migrate --image, as subprocesses."""
    deadline = time.monotonic() + ctx.timeout
    uffd_sock = ctx.path(f"{name}.uffd.sock")
    mem = -(-os.path.getsize(image) // TARGET_PAGE_SIZE) * TARGET_PAGE_SIZE
    with Procs() as procs:
        dest = procs.start("serve-dest", "--listen", listen, "--uffd-socket", uffd_sock, "--json",
                           "--timeout", f"{ctx.timeout:g}")
        address = wait_listening(dest, min(deadline, time.monotonic() + 10))
        if address is None:
            f = finish("serve-dest", dest, time.monotonic() + 1)
            return result(name, False, f"serve-dest did not start listening: {f.why()}")
        touch = procs.start("workload", "touch", "--size", str(mem), "--attach", uffd_sock, "--image", image,
                            "--order", order, "--connect-timeout", "10", "--json")
        src = procs.start("migrate", "--to", address, "--image", image, "--json",
                          "--timeout", f"{ctx.timeout:g}")
        f_src = finish("migrate", src, deadline)
        f_touch = finish("workload touch", touch, deadline)
        f_dest = finish("serve-dest", dest, deadline)
    src_stats, touch_rep, dest_stats = f_src.json(), f_touch.json(), f_dest.json()
    seconds = (src_stats or {}).get("total-seconds")
    metrics = _dest_metrics(dest_stats, mem, seconds)
    metrics["address"] = address
    metrics["order"] = order
    if touch_rep:
        metrics["touch_p50_us"] = touch_rep.get("p50-us")
        metrics["touch_p99_us"] = touch_rep.get("p99-us")
        metrics["mismatches"] = touch_rep.get("mismatches")
    if src_stats:
        metrics["source_zero_pages"] = src_stats.get("zero-pages")
    problems = [f.why() for f in (f_src, f_touch, f_dest) if f.rc != 0]
    if touch_rep is None:
        problems.append("workload touch printed no report")
    elif touch_rep.get("mismatches") != 0 or touch_rep.get("pages") != mem // TARGET_PAGE_SIZE:
        problems.append(f"{plural(touch_rep.get('mismatches'), 'mismatching page')}, first "
                        f"{touch_rep.get('first-mismatch')}; {touch_rep.get('pages')} of "
                        f"{mem // TARGET_PAGE_SIZE} pages touched")
    if dest_stats is None:
        problems.append("serve-dest printed no statistics")
    elif dest_stats["pages"]["received"] != mem // TARGET_PAGE_SIZE:
        problems.append(f"serve-dest received {dest_stats['pages']['received']} of {mem // TARGET_PAGE_SIZE} pages")
    if problems:
        return result(name, False, "; ".join(dict.fromkeys(problems)), metrics)
    return result(name, True, f"{mem // TARGET_PAGE_SIZE} pages touched in {order} order over {address.split(':')[0]}, "
                              f"every byte matched", metrics)


# -- the cases ------------------------------------------------------------------------

@register_case("restore-random-tcp", "image restore to an attached process touching pages at random, over TCP")
def case_restore_random_tcp(ctx: SelftestContext) -> dict:
    return restore_to_attached(ctx, "restore-random-tcp", image=ctx.image("random"), order="random",
                               listen="tcp:127.0.0.1:0")


@register_case("restore-sequential-unix", "image restore to an attached process scanning sequentially, over unix:")
def case_restore_sequential_unix(ctx: SelftestContext) -> dict:
    return restore_to_attached(ctx, "restore-sequential-unix", image=ctx.image("random"), order="sequential",
                               listen=f"unix:{ctx.path('restore-sequential-unix.migration.sock')}")


def resident_pages(addr: int, size: int) -> int:
    """How many pages of [addr, addr+size) are mapped (mincore(2)); never faults them in."""
    vec = ctypes.create_string_buffer(-(-size // TARGET_PAGE_SIZE))
    if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mincore: {os.strerror(err)}")
    return sum(b & 1 for b in vec.raw)


@register_case("restore-in-process", "image restore into serve-dest's own memory (library: ServeDest + migrate_image)")
def case_restore_in_process(ctx: SelftestContext) -> dict:
    from ..channels import transport
    from ..dest.serve import ServeDest, ServeOptions
    from ..source.image import ImageMemory, migrate_image

    name = "restore-in-process"
    path = ctx.image("random")
    size = ctx.size
    server = ServeDest(ServeOptions(listen="tcp:127.0.0.1:0", ram=[("mem", size)], timeout=ctx.timeout,
                                    accept_timeout=ctx.timeout))
    out: dict = {}

    def dest_thread():
        try:
            out["dest"] = server.run()
        except BaseException as e:          # reported as the case's failure
            out["dest_error"] = e

    def source_thread():
        image = ImageMemory(path)
        try:
            conn = transport.connect(server.bound, timeout=ctx.timeout)
            try:
                out["source"] = migrate_image(conn, image, timeout=ctx.timeout)
            finally:
                conn.close()
        except BaseException as e:
            out["source_error"] = e
        finally:
            image.close()

    try:
        threads = [threading.Thread(target=dest_thread, name="selftest/dest", daemon=True),
                   threading.Thread(target=source_thread, name="selftest/source", daemon=True)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + ctx.timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            # unblock both: closing the listener and uffd ends the engine's waits
            return result(name, False, f"timed out after {ctx.timeout:g} s")
        src = out.get("source")
        dest = out.get("dest")
        metrics = _dest_metrics(dest.stats if dest else None, size, src.get("total_seconds") if src else None)
        errors = [f"{who}: {out[k]}" for who, k in (("serve-dest", "dest_error"), ("migrate", "source_error"))
                  if k in out]
        if errors:
            return result(name, False, "; ".join(errors), metrics)
        mapping = server.mappings[0]
        resident = resident_pages(mapping.addr, size)
        metrics["resident_pages"] = resident
        if resident != size // TARGET_PAGE_SIZE:
            # reading a missing page of registered memory could block: stop here
            return result(name, False, f"only {resident} of {size // TARGET_PAGE_SIZE} pages present after "
                                       f"completion", metrics)
        chunk = 1 << 20
        with open(path, "rb") as f:
            for at in range(0, size, chunk):
                want = f.read(chunk)
                want += bytes(min(chunk, size - at) - len(want))     # past the image's end: zeros
                got = mapping.map[at:at + len(want)]
                if got != want:
                    first = next(i for i in range(0, len(want), TARGET_PAGE_SIZE)
                                 if got[i:i + TARGET_PAGE_SIZE] != want[i:i + TARGET_PAGE_SIZE])
                    return result(name, False, f"memory differs from the image, first at page "
                                               f"{(at + first) // TARGET_PAGE_SIZE}", metrics)
        return result(name, True, f"{size // TARGET_PAGE_SIZE} pages present in serve-dest's own mapping, "
                                  f"byte-identical to the image", metrics)
    finally:
        server.close()


@register_case("zero-pages", "image with zero-page runs and a size not a multiple of 4096")
def case_zero_pages(ctx: SelftestContext) -> dict:
    name = "zero-pages"
    image = ctx.image("zeros")
    r = restore_to_attached(ctx, name, image=image, order="random", listen="tcp:127.0.0.1:0")
    m = r["metrics"]
    if r["passed"]:
        if not m.get("source_zero_pages") or not m.get("pages_zero"):
            return result(name, False, f"zero runs were not sent as ZERO records (source {m.get('source_zero_pages')}, "
                                       f"destination {m.get('pages_zero')})", m)
        r["detail"] = (f"image of {os.path.getsize(image)} bytes: {m['pages_zero']} zero pages placed, "
                       f"partial last page and every byte matched")
    return r


@register_case("malformed-stream", "a RAM record beyond its block must be refused with exit 3")
def case_malformed_stream(ctx: SelftestContext) -> dict:
    from .. import codec

    name = "malformed-stream"
    block = 1 << 20
    deadline = time.monotonic() + ctx.timeout
    pre = (codec.encode(codec.Header())
           + codec.encode(codec.Blocks((codec.BlockInfo("mem", block, TARGET_PAGE_SIZE),))))
    enc = codec.RamSectionEncoder()
    bad = enc.begin() + enc.page("mem", 2 * block, b"\xa5" * TARGET_PAGE_SIZE)
    record_at = len(pre) + 1          # the record follows the RAM section byte
    with Procs() as procs:
        dest = procs.start("serve-dest", "--listen", "tcp:127.0.0.1:0", "--ram", f"mem={block}", "--json",
                           "--timeout", "5")
        address = wait_listening(dest, min(deadline, time.monotonic() + 10))
        if address is None:
            f = finish("serve-dest", dest, time.monotonic() + 1)
            return result(name, False, f"serve-dest did not start listening: {f.why()}")
        _, host, port = address.split(":")
        try:
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall(pre + bad)
                s.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    while s.recv(65536):
                        pass
                except OSError:
                    pass
        except OSError as e:
            return result(name, False, f"fake source could not talk to serve-dest: {e}")
        f = finish("serve-dest", dest, deadline)
    message = next((line for line in f.err.splitlines() if "protocol error" in line), "")
    metrics = {"exit_code": f.rc, "message": message, "expected_offset": record_at}
    if f.rc != 3:
        return result(name, False, f"serve-dest should exit 3, got {f.why()}", metrics)
    if "RAM" not in message or f"byte {record_at}" not in message:
        return result(name, False, f"message should name the RAM section and byte {record_at}: {message!r}",
                      metrics)
    if "Traceback" in f.err:
        return result(name, False, "serve-dest printed a traceback", metrics)
    return result(name, True, f"refused with exit 3: {message.removeprefix('postcopy: ')}", metrics)


@register_case("live-migration", "a running workload migrated live: pre-copy, discards, switch-over, post-copy, "
                                  "memory check on the destination")
def case_live_migration(ctx: SelftestContext) -> dict:
    """workload run + migrate --attach + serve-dest + workload incoming --report-after 1, as subprocesses."""
    name = "live-migration"
    deadline = time.monotonic() + ctx.timeout
    size = str(ctx.size)
    src_sock, dst_sock = ctx.path(f"{name}.src.sock"), ctx.path(f"{name}.dst.sock")
    with Procs() as procs:
        dest = procs.start("serve-dest", "--listen", "tcp:127.0.0.1:0", "--uffd-socket", dst_sock, "--json",
                           "--timeout", f"{ctx.timeout:g}")
        address = wait_listening(dest, min(deadline, time.monotonic() + 10))
        if address is None:
            f = finish("serve-dest", dest, time.monotonic() + 1)
            return result(name, False, f"serve-dest did not start listening: {f.why()}")
        src = procs.start("migrate", "--attach", src_sock, "--to", address, "--postcopy-after", "1",
                          "--kill-source", "--json", "--timeout", f"{ctx.timeout:g}")
        incoming = procs.start("workload", "incoming", "--mem", size, "--attach", dst_sock, "--report-after", "1",
                               "--connect-timeout", "10")
        run = procs.start("workload", "run", "--mem", size, "--attach", src_sock, "--connect-timeout", "10")
        f_src = finish("migrate", src, deadline)
        f_inc = finish("workload incoming", incoming, deadline)
        f_run = finish("workload run", run, deadline)
        f_dest = finish("serve-dest", dest, deadline)
    src_stats, report, dest_stats = f_src.json() or {}, f_inc.json(), f_dest.json()
    metrics = _dest_metrics(dest_stats, ctx.size, src_stats.get("total-seconds"))
    metrics.update({
        "address": address,
        "precopy_passes": src_stats.get("precopy-passes"),
        "downtime_ms": src_stats.get("downtime-ms"),
        "postcopy_seconds": src_stats.get("postcopy-seconds"),
        "discarded_pages": src_stats.get("discarded-pages"),
    })
    if report:
        metrics.update({k.replace("-", "_"): report.get(k)
                        for k in ("passes-before", "passes-after", "passes-per-second", "check")})
    problems = [f.why() for f in (f_src, f_inc, f_run, f_dest) if f.rc != 0]
    if report is None:
        problems.append("workload incoming printed no report")
    else:
        if report.get("check") != "ok":
            problems.append(f"memory check failed on the destination at page {report.get('first-bad-page')}")
        if not report.get("passes-after", 0) > report.get("passes-before", 0):
            problems.append(f"the workload made no passes on the destination ({report.get('passes-before')} -> "
                            f"{report.get('passes-after')})")
    if dest_stats is None:
        problems.append("serve-dest printed no statistics")
    elif dest_stats["pages"]["received"] != ctx.size // TARGET_PAGE_SIZE:
        problems.append(f"serve-dest received {dest_stats['pages']['received']} of "
                        f"{ctx.size // TARGET_PAGE_SIZE} pages")
    if problems:
        return result(name, False, "; ".join(dict.fromkeys(problems)), metrics)
    return result(name, True, f"{plural(src_stats.get('precopy-passes'), 'pre-copy pass', 'pre-copy passes')}, "
                              f"downtime {src_stats.get('downtime-ms')} ms, "
                              f"{plural(src_stats.get('discarded-pages'), 'page')} discarded, "
                              f"post-copy {src_stats.get('postcopy-seconds')} s with "
                              f"{plural(metrics['requests'], 'request')}; "
                              f"memory check ok, passes {report['passes-before']} -> {report['passes-after']} "
                              f"on the destination", metrics)


# -- the runner -----------------------------------------------------------------------

def case_names() -> list[str]:
    return [c.name for c in CASES]


def run_selftest(*, size: int = DEFAULT_SIZE, timeout: float = DEFAULT_CASE_TIMEOUT, only: list[str] | None = None,
                 on_result: Callable[[dict], None] | None = None) -> dict:
    """Run the cases (all, or those named in ``only``); ``{"passed", "size", "seconds", "cases"}``.

    A case that raises is reported as failed with the exception; it never stops the others.
    """
    if size % TARGET_PAGE_SIZE or size < 16 * TARGET_PAGE_SIZE:
        raise PostcopyError(f"selftest size must be a multiple of {TARGET_PAGE_SIZE} and at least "
                            f"{16 * TARGET_PAGE_SIZE} bytes")
    cases = [c for c in CASES if not only or c.name in only]
    t0 = time.monotonic()
    results = []
    tmpdir = tempfile.mkdtemp(prefix="postcopy-selftest-")
    try:
        ctx = SelftestContext(size=size, tmpdir=tmpdir, timeout=timeout)
        for case in cases:
            t = time.monotonic()
            try:
                r = case.run(ctx)
            except Interrupted:
                raise    # its children are killed and the temporary directory removed on the way out
            except Exception as e:
                r = result(case.name, False, f"{type(e).__name__}: {e}")
            r.setdefault("metrics", {})
            r["metrics"].setdefault("case_seconds", round(time.monotonic() - t, 3))
            results.append(r)
            if on_result:
                on_result(r)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return {"passed": bool(results) and all(r["passed"] for r in results), "size": size,
            "seconds": round(time.monotonic() - t0, 3), "cases": results}


__all__ = ["CASES", "Case", "SelftestContext", "SelftestFailed", "register_case", "result", "run_selftest",
           "case_names", "restore_to_attached", "random_image", "zero_run_image", "DEFAULT_SIZE"]
