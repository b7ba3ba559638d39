/* What the parts of the destination's native half share (dest.c: set-up,
 * return path and phase; dest_faults.c: the fault thread and the in-flight
 * table; dest_place.c: placement and the page bitmaps). */
#ifndef POSTCOPY_DEST_INTERNAL_H
#define POSTCOPY_DEST_INTERNAL_H
#include "dest.h"
#include "pagesize.h"

#define TP PC_TARGET_PAGE_SIZE
#define TP_SHIFT 12

static inline int bit_test(const uint64_t *map, uint64_t i)
{
    return (__atomic_load_n(&map[i >> 6], __ATOMIC_ACQUIRE) >> (i & 63)) & 1;
}

static inline int bit_test_and_set(uint64_t *map, uint64_t i)
{
    uint64_t m = 1ULL << (i & 63);
    return (__atomic_fetch_or(&map[i >> 6], m, __ATOMIC_ACQ_REL) & m) != 0;
}

static inline int bit_clear(uint64_t *map, uint64_t i)
{
    uint64_t m = 1ULL << (i & 63);
    return (__atomic_fetch_and(&map[i >> 6], ~m, __ATOMIC_ACQ_REL) & m) != 0;
}

/* in-flight requests: page key -> time the fault was read */
static inline uint64_t key_of(int block, uint64_t off) { return (((uint64_t)block << 48) | (off >> TP_SHIFT)) + 1; }

#define PC_DEST_INTERNAL __attribute__((visibility("hidden")))
PC_DEST_INTERNAL int inflight_take(struct pc_dest *d, uint64_t key, uint64_t *t, uint64_t *hop);
PC_DEST_INTERNAL uint64_t inflight_hop_peek(struct pc_dest *d, uint64_t key);
PC_DEST_INTERNAL int wake_range(struct pc_dest *d, uint64_t addr, uint64_t len);
PC_DEST_INTERNAL void serve_late_fault(struct pc_dest *d, const struct pc_dest_block *b, uint64_t addr);
PC_DEST_INTERNAL int serve_staged(struct pc_dest *d, int block, uint64_t off, uint64_t addr);
/* hop: the requests' hop-trace entries (NULL: looked up in the in-flight table) */
PC_DEST_INTERNAL int send_requests(struct pc_dest *d, const uint64_t *reqs, const uint64_t *hop, size_t n);
#endif
