/* The destination's native half: set-up, the return path and the phase here;
 * the fault thread in dest_faults.c, page placement in dest_place.c.
 *
 * Both run with the GIL released (cffi API mode), so a fault is served while
 * Python code runs, and nothing here ever touches registered memory itself.
 * Page state is two bitmaps per block, one bit per 4096-byte target page:
 * "requested" (asked of the source, never ask twice) and "received" (placed;
 * the RECV_BITMAP the source may ask for). Bits are updated atomically: the
 * fault thread and the placing thread run concurrently. */
#include "dest_internal.h"
#include "io.h"
#include <sys/socket.h>
#include "wire.h"
#include <stdlib.h>
#include <sys/mman.h>

struct pc_dest *pc_dest_new(int uffd, int quit_fd, int pid)
{
    struct pc_dest *d = calloc(1, sizeof *d);
    if (!d)
        return NULL;
    d->uffd = uffd;
    d->quit_fd = quit_fd;
    d->rp_fd = -1;
    d->requests_enabled = 0;
    d->last_rp_block = -1;
    d->pid = pid;
    d->phase = PC_PHASE_NONE;
    d->overwrite_ok = 1;
    d->registered = pid != 0;   /* an attached program's memory is registered before it is handed over */
    d->inflight_cap = 1 << 16;
    d->inflight = calloc(d->inflight_cap, sizeof *d->inflight);
    pthread_mutex_init(&d->rp_lock, NULL);
    pthread_mutex_init(&d->state_lock, NULL);
    pthread_mutex_init(&d->stage_lock, NULL);
    if (!d->inflight) {
        free(d);
        return NULL;
    }
    return d;
}

void pc_dest_free(struct pc_dest *d)
{
    if (!d)
        return;
    for (int i = 0; i < d->nblocks; i++) {
        free(d->blocks[i].received);
        free(d->blocks[i].requested);
        if (d->blocks[i].stage)
            munmap(d->blocks[i].stage, d->blocks[i].length);
        free(d->blocks[i].staged);
        free(d->blocks[i].staged_zero);
    }
    free(d->segs);
    free(d->pending);
    free(d->inflight);
    free(d->ws);
    free(d->hop);
    free(d->inflight_hop);
    pthread_mutex_destroy(&d->rp_lock);
    pthread_mutex_destroy(&d->state_lock);
    pthread_mutex_destroy(&d->stage_lock);
    free(d);
}

int pc_dest_add_block(struct pc_dest *d, const char *name, uint64_t length, uint64_t page_size)
{
    size_t n = strlen(name);
    if (d->nblocks >= PC_MAX_BLOCKS || n == 0 || n > 255 || length % TP || page_size < TP ||
        (page_size & (page_size - 1)) || length % page_size)
        return -EINVAL;
    struct pc_dest_block *b = &d->blocks[d->nblocks];
    size_t words = (length / TP + 63) / 64;
    b->received = calloc(words ? words : 1, 8);
    b->requested = calloc(words ? words : 1, 8);
    if (!b->received || !b->requested)
        return -ENOMEM;
    b->length = length;
    b->page_size = page_size;
    b->name_len = (uint8_t)n;
    memcpy(b->name, name, n);
    d->total_pages += length / TP;
    return d->nblocks++;
}

int pc_dest_add_segment(struct pc_dest *d, int block, uint64_t offset, uint64_t addr, uint64_t size)
{
    if (block < 0 || block >= d->nblocks || offset + size > d->blocks[block].length)
        return -EINVAL;
    struct pc_dest_seg *s = realloc(d->segs, (d->nsegs + 1) * sizeof *s);
    if (!s)
        return -ENOMEM;
    d->segs = s;
    int i = d->nsegs++;
    while (i > 0 && s[i - 1].addr > addr) {   /* keep sorted by address */
        s[i] = s[i - 1];
        i--;
    }
    s[i] = (struct pc_dest_seg){ addr, size, offset, block };
    return 0;
}

void pc_dest_set_quit_fd(struct pc_dest *d, int quit_fd) { d->quit_fd = quit_fd; }
void pc_dest_set_discarding(struct pc_dest *d, int discarding) { __atomic_store_n(&d->discarding, discarding, __ATOMIC_RELEASE); }
void pc_dest_set_test_place_delay(struct pc_dest *d, uint64_t ns) { __atomic_store_n(&d->test_place_delay_ns, ns, __ATOMIC_RELAXED); }
void pc_dest_set_test_place_race(struct pc_dest *d) { __atomic_store_n(&d->test_race_once, 1, __ATOMIC_RELAXED); }

/* ---- return path ---- */
int pc_dest_rp_send(struct pc_dest *d, const uint8_t *buf, size_t len)
{
    pthread_mutex_lock(&d->rp_lock);
    int r = d->rp_fd < 0 ? -ENOTCONN : pc_send_all(d->rp_fd, buf, len);
    pthread_mutex_unlock(&d->rp_lock);
    return r;
}

/* A request for the page at off of block, naming the block unless the last
 * request did. Caller holds rp_lock. Returns bytes written to out (room for
 * PC_WIRE_REQ_MAX). */
static size_t encode_request(struct pc_dest *d, int block, uint64_t off, uint8_t *out)
{
    const struct pc_dest_block *b = &d->blocks[block];
    if (block == d->last_rp_block)
        return pc_wire_req_pages(out, off, (uint32_t)b->page_size, NULL, 0);
    d->last_rp_block = block;
    return pc_wire_req_pages(out, off, (uint32_t)b->page_size, b->name, b->name_len);
}

/* The hop trace's entries of reqs[0, n) (0: none), from known (NULL: looked up in the in-flight
 * table, before the requests are sent: an answer may take a page out of it as soon as its
 * request is out). */
static void hop_ids(struct pc_dest *d, const uint64_t *reqs, const uint64_t *known, size_t n, uint64_t *ids)
{
    for (size_t k = 0; k < n; k++) {
        uint64_t off = reqs[k] & ((1ULL << 56) - 1);
        ids[k] = known ? known[k] : inflight_hop_peek(d, key_of((int)(reqs[k] >> 56), off));
    }
}

/* The hop trace: those requests were handed to the return path's socket at t (taken before the
 * write: on loopback the source may read a request before the write returns here). */
static void hop_sent(struct pc_dest *d, const uint64_t *ids, size_t n, uint64_t t)
{
    for (size_t k = 0; k < n; k++) {
        if (ids[k] && __atomic_load_n(&d->hop->e[ids[k] - 1].t[1], __ATOMIC_RELAXED))
            pc_hop_flag(d->hop, ids[k], PC_HOP_REREQUESTED);
        pc_hop_time(d->hop, ids[k], 1, t);
    }
}

int send_requests(struct pc_dest *d, const uint64_t *reqs, const uint64_t *known_hops, size_t n)
{
    uint8_t buf[64 * PC_WIRE_REQ_MAX];
    uint64_t ids[64];
    size_t i = 0;
    int r = 0;
    struct pc_hop_trace *hop = __atomic_load_n(&d->hop, __ATOMIC_ACQUIRE);
    pthread_mutex_lock(&d->rp_lock);
    if (d->rp_fd < 0)
        r = -ENOTCONN;
    while (i < n && r == 0) {
        size_t len = 0, first = i;
        for (; i < n && len + PC_WIRE_REQ_MAX <= sizeof buf; i++) {
            int block = (int)(reqs[i] >> 56);
            len += encode_request(d, block, reqs[i] & ((1ULL << 56) - 1), buf + len);
        }
        uint64_t t = 0;
        if (hop) {
            hop_ids(d, reqs + first, known_hops ? known_hops + first : NULL, i - first, ids);
            t = pc_now_ns();
        }
        r = pc_send_all(d->rp_fd, buf, len);
        if (hop && r == 0)
            hop_sent(d, ids, i - first, t);
    }
    if (r && d->rp_fd >= 0) {
        /* the connection is broken: end it, so the stream's thread, reading it,
         * notices now (and pauses the migration, or fails it); the pages keep
         * their "requested" bits and are asked for again on a resumed stream */
        shutdown(d->rp_fd, SHUT_RDWR);
        __atomic_fetch_add(&d->st.request_send_failures, 1, __ATOMIC_RELAXED);
    }
    pthread_mutex_unlock(&d->rp_lock);
    if (r == 0)
        __atomic_fetch_add(&d->st.requests, n, __ATOMIC_RELAXED);
    return r;
}

void pc_dest_set_return_path(struct pc_dest *d, int rp_fd)
{
    pthread_mutex_lock(&d->rp_lock);
    d->rp_fd = rp_fd;
    d->last_rp_block = -1;
    pthread_mutex_unlock(&d->rp_lock);
}

/* Collects into d->pending every page asked for and not received yet (the
 * requested bit is set on the first target page of each host page).
 * Caller holds state_lock. */
static int collect_outstanding(struct pc_dest *d)
{
    d->npending = 0;
    for (int bi = 0; bi < d->nblocks; bi++) {
        const struct pc_dest_block *b = &d->blocks[bi];
        uint64_t words = (b->length / TP + 63) / 64;
        for (uint64_t w = 0; w < words; w++) {
            uint64_t want = __atomic_load_n(&b->requested[w], __ATOMIC_ACQUIRE) &
                            ~__atomic_load_n(&b->received[w], __ATOMIC_ACQUIRE);
            while (want) {
                uint64_t page = w * 64 + (uint64_t)__builtin_ctzll(want);
                want &= want - 1;
                if (d->npending == d->cap_pending) {
                    size_t cap = d->cap_pending ? d->cap_pending * 2 : 256;
                    uint64_t *np = realloc(d->pending, cap * sizeof *np);
                    if (!np)
                        return -ENOMEM;
                    d->pending = np;
                    d->cap_pending = cap;
                }
                d->pending[d->npending++] = ((uint64_t)bi << 56) | (page << TP_SHIFT);
            }
        }
    }
    return 0;
}

/* From POSTCOPY_LISTEN on, faults become requests; those read before are sent
 * now.  Coming back from PAUSED (a resumed stream), every page asked for and
 * not received is asked for again: requests in flight when the old connection
 * broke are lost with it, and faults read while paused only set their bits. */
static int enable_requests(struct pc_dest *d, int resuming)
{
    pthread_mutex_lock(&d->state_lock);
    int r = d->requests_enabled ? 0 : -ENOTCONN;
    if (!d->requests_enabled && d->rp_fd >= 0) {
        d->requests_enabled = 1;
        size_t n = 0;
        if (resuming) {
            r = collect_outstanding(d);
            n = d->npending;
        } else {
            /* a fault whose page arrived in pre-copy meanwhile needs no request */
            for (size_t i = 0; i < d->npending; i++) {
                uint64_t off = d->pending[i] & ((1ULL << 56) - 1);
                if (!bit_test(d->blocks[d->pending[i] >> 56].received, off >> TP_SHIFT))
                    d->pending[n++] = d->pending[i];
            }
            r = 0;
        }
        if (r == 0 && n)
            r = send_requests(d, d->pending, NULL, n);
        if (r == 0 && resuming)
            __atomic_fetch_add(&d->st.rerequests, n, __ATOMIC_RELAXED);
        if (r < 0 && resuming) {
            /* the resumed connection broke while the outstanding requests went out: the migration
             * stays paused, requests held back; the next resume collects them again from the bitmaps */
            d->requests_enabled = 0;
        }
        d->npending = 0;
    }
    pthread_mutex_unlock(&d->state_lock);
    return r;
}

/* PAUSED: the source connection broke after RUN.  Faults read from here on
 * only mark their pages requested (the faulting threads keep waiting, the
 * registration stays); enable_requests asks for them on the resumed stream. */
static void disable_requests(struct pc_dest *d)
{
    pthread_mutex_lock(&d->state_lock);
    d->requests_enabled = 0;
    d->npending = 0;
    pthread_mutex_unlock(&d->state_lock);
}

/* The one place the phase reaches the hot paths.  From LISTENING on, own
 * memory is registered (the caller registered it before) and faults become
 * requests (END after a stream without LISTEN changes neither); from RUNNING
 * on, the program runs on the pages, so a present page is never overwritten;
 * PAUSED holds requests back until the stream resumes.  Release stores: a
 * thread that sees the new flag sees what was done before it was set. */
int pc_dest_set_phase(struct pc_dest *d, int phase)
{
    int r = 0;
    int from = __atomic_load_n(&d->phase, __ATOMIC_ACQUIRE);
    if (phase == PC_PHASE_PAUSED) {
        disable_requests(d);
    } else if (phase >= PC_PHASE_LISTENING && phase != PC_PHASE_END) {
        __atomic_store_n(&d->registered, 1, __ATOMIC_RELEASE);
        r = enable_requests(d, from == PC_PHASE_PAUSED);
        if (r < 0)
            return r;
    }
    int was_ok = __atomic_exchange_n(&d->overwrite_ok, phase < PC_PHASE_RUNNING, __ATOMIC_ACQ_REL);
    __atomic_store_n(&d->phase, phase, __ATOMIC_RELEASE);
    if (was_ok && phase >= PC_PHASE_RUNNING && __atomic_load_n(&d->staging, __ATOMIC_ACQUIRE)) {
        /* A fault on a staged page is served from staging only from here on (before, a page may
         * still be sent again or discarded); the threads that faulted on one before wait: wake
         * them all, each faults again and is served (a thread whose page is missing only faults
         * again: UFFDIO_WAKE wakes whoever waits in the range, fs/userfaultfd.c) */
        for (int i = 0; i < d->nsegs; i++)
            wake_range(d, d->segs[i].addr, d->segs[i].size);
    }
    return r;
}

/* The hop trace on, for up to capacity page requests (before the fault thread starts: a request
 * read before has no entry). 0, -EBUSY (on already) or -ENOMEM. */
int pc_dest_hop_trace(struct pc_dest *d, uint64_t capacity)
{
    if (__atomic_load_n(&d->hop, __ATOMIC_ACQUIRE))
        return -EBUSY;
    uint64_t *ids = calloc(d->inflight_cap, sizeof *ids);
    struct pc_hop_trace *h = pc_hop_new(capacity);
    if (!ids || !h) {
        free(ids);
        free(h);
        return -ENOMEM;
    }
    d->inflight_hop = ids;
    __atomic_store_n(&d->hop, h, __ATOMIC_RELEASE);   /* whoever sees the trace sees its id table */
    return 0;
}

uint64_t pc_dest_hop_read(struct pc_dest *d, struct pc_hop_entry *out, uint64_t cap, uint64_t *claimed)
{
    return pc_hop_read(__atomic_load_n(&d->hop, __ATOMIC_ACQUIRE), out, cap, claimed);
}

void pc_dest_get_stats(struct pc_dest *d, struct pc_dest_stats *out)
{
    memcpy(out, &d->st, sizeof *out);
}
