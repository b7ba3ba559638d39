"""The hop trace (POSTCOPY_HOP_TRACE): a real restore over loopback TCP writes both sides' entries, and
they tell a consistent story (no timings are asserted, only the order of events and the counts)."""
from __future__ import annotations

import errno
import json
from pathlib import Path

from conftest import touch_restore, write_image
from postcopy_cli import hoptrace
from postcopy_cli._native import ffi, lib
from test_codec import BLOCKS
from test_native_wire import PC_RAM, TP, Server, native_request

MiB = 1 << 20


def _restore(tmp_path, serve_dest, monkeypatch, *, size=12 * MiB, capacity=None):
    """One image restore into a random toucher with the trace on; (dest stats, migrate's JSON, trace dir)."""
    trace = tmp_path / "trace"
    trace.mkdir()
    monkeypatch.setenv(hoptrace.ENV, str(trace))
    if capacity is not None:
        monkeypatch.setenv(hoptrace.ENV_CAPACITY, str(capacity))
    image = tmp_path / "mem.img"
    write_image(image, size, seed=5)
    sd = serve_dest("--listen", "tcp:127.0.0.1:0", "--uffd-socket", str(tmp_path / "uffd.sock"))
    # a capped source: most of the random toucher's faults come before the background stream
    mig, touch = touch_restore(tmp_path / "uffd.sock", sd.address, image, size, "--max-bandwidth", "32M", seed=5)
    rc, out, err = sd.wait()
    assert mig.returncode == 0 and rc == 0 and touch.returncode == 0, (mig.stderr, err, touch.stderr)
    assert json.loads(touch.stdout)["mismatches"] == 0
    assert "Traceback" not in err + mig.stderr + touch.stderr
    return json.loads(out.strip().splitlines()[-1]), json.loads(mig.stdout), trace, sd.proc.pid


def _files(trace: Path, dest_pid: int):
    dest_file = trace / f"dest-{dest_pid}.csv"
    sources = list(trace.glob("source-*.csv"))
    assert dest_file.exists(), list(trace.iterdir())
    assert len(sources) == 1, list(trace.iterdir())
    for f in (dest_file, sources[0]):
        first = f.read_text().splitlines()[0]
        assert first.startswith("# postcopy hop trace:") and "clock=CLOCK_MONOTONIC" in first, first
    return hoptrace.load(str(dest_file)), hoptrace.load(str(sources[0]))


def _answered_by_request(d: dict) -> bool:
    """The preempt channel's copy went in: the request's own answer (the background's copy may have been
    parsed before the fault was even read)."""
    return d["channel"] == "preempt" and not d["elsewhere"]


def test_restore_writes_both_sides_and_they_join(tmp_path, serve_dest, monkeypatch):
    stats, src, trace, dest_pid = _restore(tmp_path, serve_dest, monkeypatch)
    (dmeta, drows), (smeta, srows) = _files(trace, dest_pid)
    assert dmeta["dropped"] == 0 and smeta["dropped"] == 0
    assert stats["postcopy-rerequests"] == 0
    # one entry per page request: each fresh request claims its entry when the fault is read (no resume
    # here, so no request was sent twice; every request was sent, so none lacks its send time)
    assert len(drows) == stats["postcopy-requests"] > 50, stats
    assert all(d["t_fault_read"] and d["t_request_sent"] for d in drows)
    # the entries that were placed are exactly the dest's latency samples, and add up to its blocktime
    placed = [d for d in drows if d["t_placed"]]
    assert len(placed) == stats["latency-us"]["samples"]
    blocktime_ms = sum(d["t_placed"] - d["t_fault_read"] for d in placed) / 1e6
    assert abs(blocktime_ms - stats["postcopy-blocktime"]) <= 0.002, (blocktime_ms, stats["postcopy-blocktime"])
    for d in drows:
        assert d["t_fault_read"] <= d["t_request_sent"], d
        if d["t_placed"]:
            assert d["t_fault_read"] <= d["t_placed"], d
            assert d["channel"] in ("main", "preempt"), d
        if d["t_received"]:
            assert d["t_received"] <= d["t_placed"], d
        if _answered_by_request(d) and d["t_received"]:
            assert d["t_fault_read"] <= d["t_request_sent"] <= d["t_received"] <= d["t_placed"], d
    own = [d for d in placed if _answered_by_request(d)]
    assert len(own) >= len(placed) // 2, (len(own), len(placed))   # a capped background: requests answer first

    # the source's request server took most requests (the few decoded before it started are answered
    # from Python, untraced)
    assert len(srows) <= src["requests"]
    by_key: dict = {}
    for s in srows:
        by_key.setdefault((s["block"], s["offset"]), []).append(s)
    joined = 0
    for d in drows:
        cands = [s for s in by_key.get((d["block"], d["offset"]), []) if s["t_request_read"] >= d["t_request_sent"]]
        if not cands:
            continue
        s = min(cands, key=lambda s: s["t_request_read"])
        joined += 1
        assert d["t_request_sent"] <= s["t_request_read"] <= s["t_sent"], (d, s)
        if _answered_by_request(d) and d["t_received"]:
            assert s["t_sent"] <= d["t_received"], (d, s)
    assert joined >= 0.8 * len(drows), (joined, len(drows), len(srows))


def test_tiny_capacity_drops_and_counts(tmp_path, serve_dest, monkeypatch):
    stats, src, trace, dest_pid = _restore(tmp_path, serve_dest, monkeypatch, size=8 * MiB, capacity=3)
    (dmeta, drows), (smeta, srows) = _files(trace, dest_pid)
    assert stats["postcopy-requests"] > 3
    assert len(drows) == 3 and dmeta["capacity"] == 3
    assert dmeta["dropped"] == stats["postcopy-requests"] - 3
    assert len(srows) <= 3 and smeta["capacity"] == 3
    assert len(srows) + smeta["dropped"] <= src["requests"]
    assert smeta["dropped"] > 0


def test_request_server_keeps_to_its_capacity():
    """The source's native request server (over socket pairs): five requests, room for two entries."""
    srv = Server(BLOCKS.blocks)
    try:
        assert lib.pc_src_hop_trace(srv.srv, 2) == 0
        assert lib.pc_src_hop_trace(srv.srv, 2) == -errno.EBUSY
        data = b"".join(native_request(i * TP, TP, PC_RAM.name if i == 0 else None) for i in range(5))
        assert srv.serve(data)[0] == lib.PC_SERVE_EOF
    finally:
        srv.close()
    assert srv.srv.st.requests == 5
    out, claimed = ffi.new("struct pc_hop_entry[]", 8), ffi.new("uint64_t *")
    assert lib.pc_src_hop_read(srv.srv, out, 8, claimed) == 2
    assert claimed[0] == 5     # three dropped
    assert [(out[i].block, out[i].offset) for i in range(2)] == [(0, 0), (0, TP)]
    assert all(0 < out[i].t[0] <= out[i].t[1] for i in range(2))
    # the server's pages were all marked sent already (nothing left to send): each request says so
    assert all(out[i].flags & lib.PC_HOP_SENT_BEFORE for i in range(2))
    assert ffi.sizeof(out[0]) == 48 and len(srv.sent) == 5 * (TP + 8) + 1 + len(PC_RAM.name)
