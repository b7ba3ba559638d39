/* The hop trace: where the time of a requested page goes, hop by hop (a
 * debugging and benchmark aid, enabled by POSTCOPY_HOP_TRACE; see
 * benchmarks/README.md). A preallocated array of fixed entries claimed with
 * an atomic index: an entry beyond the capacity is counted, never written.
 * Times are CLOCK_MONOTONIC nanoseconds, one clock for every process on a
 * host, so the destination's and the source's entries compare directly.
 * Disabled (NULL), each hot path pays one branch. */
#ifndef POSTCOPY_HOP_TRACE_H
#define POSTCOPY_HOP_TRACE_H
#include "compat.h"
#include "pagesize.h"

/* destination: t[0] fault read, t[1] request sent, t[2] received, t[3] placed;
 * source: t[0] request read, t[1] page sent; 0 = not reached (or not known) */
#define PC_HOP_TIMES 4
struct pc_hop_entry {
    uint32_t block;
    uint32_t flags;   /* PC_HOP_* */
    uint64_t offset;  /* byte offset of the host page in its block */
    uint64_t t[PC_HOP_TIMES];
};

#define PC_HOP_MAIN 1          /* dest: accounted for by the main stream's receiver */
#define PC_HOP_PREEMPT 2       /* dest: ... by the preempt channel's */
#define PC_HOP_ELSEWHERE 4     /* dest: that receiver found the page present: the other channel's copy went in */
#define PC_HOP_REREQUESTED 8   /* dest: asked for again on a resumed stream (t[1] is the last send) */
#define PC_HOP_SENT_BEFORE 16  /* source: the page had been sent already when the request was read */

struct pc_hop_trace {
    uint64_t capacity;
    uint64_t claimed;   /* entries asked for; those beyond capacity were dropped */
    struct pc_hop_entry e[];
};

struct pc_hop_trace *pc_hop_new(uint64_t capacity);

/* a new entry with its first time: its id (index + 1), or 0 when the trace is full */
static inline uint64_t pc_hop_claim(struct pc_hop_trace *h, uint32_t block, uint64_t offset, uint64_t t0)
{
    uint64_t i = __atomic_fetch_add(&h->claimed, 1, __ATOMIC_RELAXED);
    if (i >= h->capacity)
        return 0;
    struct pc_hop_entry *e = &h->e[i];
    e->block = block;
    e->offset = offset;
    __atomic_store_n(&e->t[0], t0, __ATOMIC_RELAXED);
    return i + 1;
}

/* entry id's time of hop k (id 0: none) */
static inline void pc_hop_time(struct pc_hop_trace *h, uint64_t id, int k, uint64_t t)
{
    if (id)
        __atomic_store_n(&h->e[id - 1].t[k], t, __ATOMIC_RELAXED);
}

static inline void pc_hop_flag(struct pc_hop_trace *h, uint64_t id, uint32_t flags)
{
    if (id)
        __atomic_fetch_or(&h->e[id - 1].flags, flags, __ATOMIC_RELAXED);
}

/* Copy up to cap entries into out; returns how many; *claimed: entries asked
 * for (more than the capacity: the rest were dropped). h may be NULL. */
uint64_t pc_hop_read(const struct pc_hop_trace *h, struct pc_hop_entry *out, uint64_t cap, uint64_t *claimed);

/* The destination's receivers: which channel the calling thread receives on
 * (PC_HOP_MAIN or PC_HOP_PREEMPT), recorded in the entries it accounts for. */
void pc_dest_hop_channel(uint32_t channel);
extern __thread uint32_t pc_hop_channel;

/* While the pump places a run it parsed: when each of its target pages' records was
 * parsed (n pages from block offset off; n = 0 outside the pump). */
struct pc_hop_rx {
    int block;
    uint64_t off;
    uint64_t n;
    const uint64_t *t;
};
extern __thread struct pc_hop_rx pc_hop_rx;

/* the parse time of the record of block offset off, if the pump is placing it now (else 0) */
static inline uint64_t pc_hop_rx_time(int block, uint64_t off)
{
    const struct pc_hop_rx *r = &pc_hop_rx;
    if (r->n && r->block == block && off >= r->off && off < r->off + r->n * PC_TARGET_PAGE_SIZE)
        return r->t[(off - r->off) / PC_TARGET_PAGE_SIZE];
    return 0;
}
#endif
