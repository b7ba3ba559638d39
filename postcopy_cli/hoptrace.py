"""The hop trace: where the time of a requested page goes, hop by hop (a debugging and benchmark aid).

With ``POSTCOPY_HOP_TRACE=DIR`` in the environment, serve-dest and migrate keep one entry per page
request in native code (``native/hop_trace.h``) and, at the end of the migration (success or
failure), write them to ``DIR/dest-<pid>.csv`` and ``DIR/source-<pid>.csv``.  Times are
CLOCK_MONOTONIC nanoseconds: one clock for every process on a host, so the two files' times
compare directly (on one host only); a "sent" time is read just before the write to the
socket (on loopback the peer may read the bytes before the write returns).
``POSTCOPY_HOP_TRACE_CAPACITY``: entries kept per trace (default: one per target page of the
memory); requests beyond it are counted as dropped.

Not a user feature: no option, and the files' layout may change with the benchmarks that read them
(benchmarks/hop_trace.py).
"""
from __future__ import annotations

import csv
import os
import sys

ENV = "POSTCOPY_HOP_TRACE"
ENV_CAPACITY = "POSTCOPY_HOP_TRACE_CAPACITY"
CLOCK = "CLOCK_MONOTONIC"

# native/hop_trace.h: the times of an entry, by role
DEST_TIMES = ("t_fault_read", "t_request_sent", "t_received", "t_placed")
SOURCE_TIMES = ("t_request_read", "t_sent")
DEST_COLUMNS = ("block", "offset", *DEST_TIMES, "channel", "elsewhere", "rerequested")
SOURCE_COLUMNS = ("block", "offset", *SOURCE_TIMES, "sent_before")


def directory() -> str | None:
    """The trace's directory, or None when the trace is off."""
    return os.environ.get(ENV) or None


def capacity(default: int = 0) -> int:
    """Entries to keep: $POSTCOPY_HOP_TRACE_CAPACITY if a positive number, else ``default``."""
    try:
        value = int(os.environ.get(ENV_CAPACITY) or 0)
    except ValueError:
        value = 0
    return value if value > 0 else default


def read(native_read, handle, block_names: list[str]) -> tuple[list[tuple], int]:
    """Entries of a native trace as rows of the role's columns, and how many were asked for (more
    than the rows: the rest were dropped).  ``native_read``: pc_dest_hop_read or pc_src_hop_read."""
    from ._native import ffi
    claimed = ffi.new("uint64_t *")
    native_read(handle, ffi.NULL, 0, claimed)
    n = int(claimed[0])
    if not n:
        return [], 0
    out = ffi.new("struct pc_hop_entry[]", n)
    got = native_read(handle, out, n, claimed)
    rows = []
    for i in range(got):
        e = out[i]
        rows.append((block_names[e.block], int(e.offset), int(e.flags), tuple(int(t) for t in e.t)))
    return rows, int(claimed[0])


def dest_rows(entries) -> list[tuple]:
    """The destination's entries (from :func:`read`) as rows of DEST_COLUMNS."""
    from ._native import lib
    rows = []
    for block, offset, flags, t in entries:
        channel = "preempt" if flags & lib.PC_HOP_PREEMPT else "main" if flags & lib.PC_HOP_MAIN else ""
        rows.append((block, offset, *t, channel, int(bool(flags & lib.PC_HOP_ELSEWHERE)),
                     int(bool(flags & lib.PC_HOP_REREQUESTED))))
    return rows


def source_rows(entries) -> list[tuple]:
    """The source's entries (from :func:`read`) as rows of SOURCE_COLUMNS."""
    from ._native import lib
    return [(block, offset, t[0], t[1], int(bool(flags & lib.PC_HOP_SENT_BEFORE)))
            for block, offset, flags, t in entries]


def write(folder: str, role: str, columns, rows, *, claimed: int, capacity: int) -> str | None:
    """``folder/<role>-<pid>.csv``: a comment line naming the clock, the counts and the columns'
    meaning, the header, the rows.  A file that cannot be written is a warning (the migration's
    outcome stands); returns its path or None."""
    path = os.path.join(folder, f"{role}-{os.getpid()}.csv")
    dropped = max(0, claimed - len(rows))
    try:
        with open(path, "w") as f:
            f.write(f"# postcopy hop trace: role={role} pid={os.getpid()} clock={CLOCK} unit=ns "
                    f"entries={len(rows)} dropped={dropped} capacity={capacity}; a time of 0 was not reached "
                    f"(or is not known)\n")
            out = csv.writer(f, lineterminator="\n")
            out.writerow(columns)
            out.writerows(rows)
    except OSError as e:
        print(f"postcopy: warning: {ENV} {folder}: {e.strerror or e}", file=sys.stderr)
        return None
    return path


def load(path: str) -> tuple[dict, list[dict]]:
    """A trace file back: (its comment line's key=value fields, rows as dicts with ints where the
    column is a number).  For the benchmarks and tests."""
    meta: dict = {}
    rows: list[dict] = []
    with open(path) as f:
        first = f.readline()
        for word in first.replace(";", " ").split():
            key, sep, value = word.partition("=")
            if sep:
                meta[key] = int(value) if value.isdigit() else value
        reader = csv.reader(f)
        columns = next(reader)
        for values in reader:
            rows.append({c: v if c in ("block", "channel") else int(v) for c, v in zip(columns, values)})
    return meta, rows
