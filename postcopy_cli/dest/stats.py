"""Migration statistics, named as QEMU names them where QEMU has a name."""
from __future__ import annotations


def histogram_dict(buckets) -> dict[str, int]:
    """Power-of-two microsecond buckets as {"<1": n, "<2": n, "<4": n, ...}, empty buckets left out."""
    out = {}
    for i, n in enumerate(buckets):
        if n:
            out[f"<{1 << i}" if i < len(buckets) - 1 else f">={1 << (i - 1)}"] = int(n)
    return out


def histogram_percentile(buckets, q: float) -> float | None:
    """Upper bound (µs) of the bucket holding the q-quantile; None without samples."""
    total = sum(buckets)
    if not total:
        return None
    want = q * total
    seen = 0
    for i, n in enumerate(buckets):
        seen += n
        if seen >= want:
            return float(1 << i)
    return float(1 << (len(buckets) - 1))


def dest_stats(raw, *, total_pages: int, elapsed_s: float, downtime_ms: float | None = None,
               run_to_complete_s: float | None = None, recovery: dict | None = None) -> dict:
    """The destination's report from the native counters (``struct pc_dest_stats``)."""
    hist = [int(raw.hist[i]) for i in range(32)]
    samples = int(raw.latency_samples)
    return {
        "postcopy-requests": int(raw.requests),
        "postcopy-blocktime": round(raw.blocktime_ns / 1e6, 3),
        "faults": int(raw.faults),
        "duplicate-faults": int(raw.duplicate_faults),
        "late-faults": int(raw.late_faults),
        # --record-workset: faults on pages that had arrived (staged), served without a request
        "staged-faults": int(raw.staged_faults),
        "pages": {
            "total": total_pages,
            "received": int(raw.received_pages),
            "demand": int(raw.demand_pages),
            "background": int(raw.background_pages),
            "precopy": int(raw.precopy_pages),
            "zero": int(raw.zero_pages),
            "skipped": int(raw.skipped_pages),
            "overwritten-in-precopy": int(raw.overwritten_pages),
            "removed-by-program": int(raw.removed_pages),
            "staged": int(raw.staged_pages),
        },
        "bytes": int(raw.demand_pages + raw.background_pages + raw.precopy_pages + raw.overwritten_pages) * 4096,
        "total-time-ms": round(elapsed_s * 1000, 3),
        "postcopy-time-ms": None if run_to_complete_s is None else round(run_to_complete_s * 1000, 3),
        "downtime-ms": downtime_ms,
        "latency-us": {
            "samples": samples,
            "mean": round(raw.blocktime_ns / samples / 1000, 1) if samples else None,
            "p50": histogram_percentile(hist, 0.5),
            "p99": histogram_percentile(hist, 0.99),
            "histogram": histogram_dict(hist),
        },
        "other-events": int(raw.events_other),
        "unknown-faults": int(raw.unknown_faults),
        # post-copy recovery: recoveries, pause time in all, each recovery's pause, requests sent again
        **(recovery or {"postcopy-recoveries": 0, "postcopy-paused-ms": 0.0, "postcopy-recovery-ms": []}),
        "postcopy-rerequests": int(raw.rerequests),
    }
