"""The source's page bookkeeping: which pages are still to send and which were sent."""
from __future__ import annotations

from ..codec.constants import TARGET_PAGE_SIZE as TP


def _clean_spans(to_send: bytearray, seg) -> list[tuple[int, int]]:
    """Host ranges of segment ``seg`` whose pages are not due to be sent (to_send 0)."""
    spans = []
    first, last = seg.offset // TP, (seg.offset + seg.size) // TP
    pos = first
    while pos < last:
        a = to_send.find(0, pos, last)
        if a < 0:
            break
        e = to_send.find(1, a, last)
        e = last if e < 0 else e
        spans.append((seg.host_addr + (a - first) * TP, seg.host_addr + (e - first) * TP))
        pos = e
    return spans


def _stale_runs(to_send: bytearray, sent: bytearray) -> list[tuple[int, int]]:
    """Runs of pages both still to send and sent before: the destination's copy is stale."""
    runs = []
    pos, n = 0, len(to_send)
    while pos < n:
        a = to_send.find(1, pos)
        if a < 0:
            break
        e = to_send.find(0, a)
        e = n if e < 0 else e
        p = a
        while p < e:
            s = sent.find(1, p, e)
            if s < 0:
                break
            t = sent.find(0, s, e)
            t = e if t < 0 else t
            runs.append((s, t - s))
            p = t
        pos = e
    return runs
