"""A reproducible "function" access pattern: what a restored serverless function touches.

A fixed working set (about 15 % of the pages, the same for every run on memory of one size):
clustered runs as real programs touch them (code near the start of memory, heap in the middle,
a stack near the end, a few scattered pages), touched in one fixed order.  Each run differs a
little (``jitter``, seeded by ``seed``): neighbouring runs change places, runs grow or shrink by
a few pages, a few runs land elsewhere in their region (data-dependent allocations).  With
``jitter`` 0 every run touches exactly the base pattern, whatever the seed.
"""
from __future__ import annotations

import random
from array import array

# (share of the pages, where in memory (fractions), run lengths in pages)
_REGIONS = (("code", 0.05, (0.0, 0.25), (4, 64)),
            ("heap", 0.08, (0.25, 0.85), (1, 32)),
            ("stack", 0.005, (0.97, 1.0), (16, 128)),
            ("scattered", 0.015, (0.0, 1.0), (1, 1)))


def _base_runs(npages: int) -> list[tuple[int, int, int]]:
    """(first page, count, region) of the fixed working set, in its fixed order."""
    rnd = random.Random(0x5EED0000 + npages)
    taken = bytearray(npages)
    runs = []
    for ri, (_, share, (lo, hi), (shortest, longest)) in enumerate(_REGIONS):
        want = max(1, int(npages * share))
        a, b = int(npages * lo), max(int(npages * lo) + 1, int(npages * hi))
        got, tries = 0, 0
        while got < want and tries < 50 * want:
            tries += 1
            count = min(rnd.randint(shortest, longest), want - got, b - a)
            first = rnd.randrange(a, max(a + 1, b - count + 1))
            if taken.find(1, first, first + count) >= 0:
                continue
            taken[first:first + count] = b"\x01" * count
            runs.append((first, count, ri))
            got += count
    rnd.shuffle(runs)
    # a program starts in its code: most code runs come first
    runs.sort(key=lambda r: 0 if r[2] == 0 and rnd.random() < 0.8 else 1)
    return runs


def function_order(npages: int, *, seed: int = 0, jitter: float = 0.1) -> array:
    """The pages of one run of the pattern on ``npages`` pages, in touch order, each once."""
    if npages <= 0:
        raise ValueError("the pattern needs at least one page")
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be between 0 and 1, not {jitter}")
    runs = _base_runs(npages)
    if jitter:
        rnd = random.Random(seed)
        for i in range(len(runs)):
            if rnd.random() < jitter:                  # a neighbour goes first
                j = min(len(runs) - 1, i + rnd.randint(1, 8))
                runs[i], runs[j] = runs[j], runs[i]
        for i, (first, count, ri) in enumerate(runs):
            if rnd.random() < jitter / 4:              # allocated elsewhere this time
                lo, hi = _REGIONS[ri][2]
                a, b = int(npages * lo), max(int(npages * lo) + 1, int(npages * hi))
                first = rnd.randrange(a, max(a + 1, b - count + 1))
            if rnd.random() < jitter / 2:              # a little more or less of it
                count = max(1, count + rnd.choice((-1, 1)) * rnd.randint(1, 4))
            runs[i] = (first, min(count, npages - first), ri)
    seen = bytearray(npages)
    out = array("Q")
    for first, count, _ in runs:
        for p in range(first, first + count):
            if not seen[p]:
                seen[p] = 1
                out.append(p)
    return out
