#ifndef POSTCOPY_BITMAP_H
#define POSTCOPY_BITMAP_H
#include <stddef.h>
#include <stdint.h>

/* Bitmaps are little-endian: bit i of byte i/8 is page i (the RECV_BITMAP layout).
 * Only bits [*pos, nbits) are looked at, and only the first (nbits+7)/8 bytes read. */

/* Find up to max runs of set bits from *pos; store (first bit, count) pairs.
 * Returns the number of runs found; *pos is left after the last run returned
 * (== nbits once the bitmap is exhausted).  A return < max means no more runs. */
size_t pc_bitmap_runs(const uint8_t *bitmap, uint64_t nbits, uint64_t *pos,
                      uint64_t *starts, uint64_t *lens, size_t max);

/* Write whole COMMAND sections (0x08, be16 6, be16 len, version 0, name_len,
 * name, 0, k x (be64 start, be64 length) in bytes = run * page_size) for the
 * runs from *pos, at most max_per_cmd ranges each, while a full command still
 * fits in out_cap.  Returns the bytes written (0 once no runs remain).
 * stats[0] += runs, stats[1] += pages, stats[2] += commands. */
size_t pc_discard_encode(const uint8_t *bitmap, uint64_t nbits, uint64_t *pos,
                         const uint8_t *name, size_t name_len, uint64_t page_size,
                         size_t max_per_cmd, uint8_t *out, size_t out_cap,
                         uint64_t *stats);
#endif
