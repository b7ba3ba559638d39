/* The hop trace's shared part (hop_trace.h). */
#include "hop_trace.h"
#include <stdlib.h>

__thread uint32_t pc_hop_channel;
__thread struct pc_hop_rx pc_hop_rx;

struct pc_hop_trace *pc_hop_new(uint64_t capacity)
{
    if (capacity > (UINT64_MAX - sizeof(struct pc_hop_trace)) / sizeof(struct pc_hop_entry))
        return NULL;
    struct pc_hop_trace *h = calloc(1, sizeof *h + capacity * sizeof h->e[0]);
    if (h)
        h->capacity = capacity;
    return h;
}

uint64_t pc_hop_read(const struct pc_hop_trace *h, struct pc_hop_entry *out, uint64_t cap, uint64_t *claimed)
{
    if (!h) {
        *claimed = 0;
        return 0;
    }
    uint64_t n = __atomic_load_n(&h->claimed, __ATOMIC_ACQUIRE);
    *claimed = n;
    if (n > h->capacity)
        n = h->capacity;
    if (n > cap)
        n = cap;
    for (uint64_t i = 0; i < n; i++) {
        const struct pc_hop_entry *e = &h->e[i];
        out[i].block = e->block;
        out[i].offset = e->offset;
        out[i].flags = __atomic_load_n(&e->flags, __ATOMIC_RELAXED);
        for (int k = 0; k < PC_HOP_TIMES; k++)
            out[i].t[k] = __atomic_load_n(&e->t[k], __ATOMIC_RELAXED);
    }
    return n;
}

void pc_dest_hop_channel(uint32_t channel) { pc_hop_channel = channel; }
