/* The destination's fault thread: reads the userfaultfd, turns faults into
 * page requests (or serves them at once), and keeps the in-flight table of
 * requested pages for the latency figures. */
#include "dest_internal.h"
#include "io.h"
#include <poll.h>
#include <stdlib.h>
#include <sys/mman.h>

static const struct pc_dest_seg *seg_by_addr(const struct pc_dest *d, uint64_t addr)
{
    int lo = 0, hi = d->nsegs - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        const struct pc_dest_seg *s = &d->segs[mid];
        if (addr < s->addr)
            hi = mid - 1;
        else if (addr >= s->addr + s->size)
            lo = mid + 1;
        else
            return s;
    }
    return NULL;
}

/* ---- in-flight requests: page key -> time the fault was read ---- */

/* hop: the request's hop-trace entry (0: none), kept at the same slot of d->inflight_hop */
static void inflight_put(struct pc_dest *d, uint64_t key, uint64_t t, uint64_t hop)
{
    size_t mask = d->inflight_cap - 1, h = (key * 0x9E3779B97F4A7C15ULL) >> 40;
    for (size_t n = 0; n < 64; n++, h++) {
        struct pc_inflight *e = &d->inflight[h & mask];
        uint64_t expect = 0;
        /* claim the slot, fill it, then publish the key */
        if (__atomic_compare_exchange_n(&e->key, &expect, UINT64_MAX, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            if (d->inflight_hop)
                __atomic_store_n(&d->inflight_hop[h & mask], hop, __ATOMIC_RELAXED);
            __atomic_store_n(&e->t_ns, t, __ATOMIC_RELEASE);
            __atomic_store_n(&e->key, key, __ATOMIC_RELEASE);
            return;
        }
    }
    /* table crowded: this request goes unmeasured */
}

/* 1 if the page was requested (its entry is removed); *t gets the time the
 * fault was read (0 for a request the table had no room to measure), *hop (if
 * not NULL) its hop-trace entry (0: none, or another taker got the time) */
int inflight_take(struct pc_dest *d, uint64_t key, uint64_t *t, uint64_t *hop)
{
    size_t mask = d->inflight_cap - 1, h = (key * 0x9E3779B97F4A7C15ULL) >> 40;
    if (hop)
        *hop = 0;
    for (size_t n = 0; n < 64; n++, h++) {
        struct pc_inflight *e = &d->inflight[h & mask];
        if (__atomic_load_n(&e->key, __ATOMIC_ACQUIRE) == key) {
            *t = __atomic_exchange_n(&e->t_ns, 0, __ATOMIC_ACQ_REL);
            /* the entry goes with the time: to the one taker whose sample ends there */
            uint64_t id = *t && d->inflight_hop ? __atomic_exchange_n(&d->inflight_hop[h & mask], 0, __ATOMIC_ACQ_REL)
                                                : 0;
            if (hop)
                *hop = id;
            __atomic_store_n(&e->key, 0, __ATOMIC_RELEASE);
            return 1;
        }
    }
    *t = 0;
    return 0;
}

/* the hop-trace entry of the request in flight for key (0: none) */
uint64_t inflight_hop_peek(struct pc_dest *d, uint64_t key)
{
    size_t mask = d->inflight_cap - 1, h = (key * 0x9E3779B97F4A7C15ULL) >> 40;
    for (size_t n = 0; n < 64; n++, h++) {
        if (__atomic_load_n(&d->inflight[h & mask].key, __ATOMIC_ACQUIRE) == key)
            return __atomic_load_n(&d->inflight_hop[h & mask], __ATOMIC_ACQUIRE);
    }
    return 0;
}

static void note_error(struct pc_dest *d, int err)
{
    int64_t zero = 0;
    __atomic_compare_exchange_n(&d->st.first_error, &zero, (int64_t)err, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* ---- the working-set record ---- */

/* A page's first request (caller holds state_lock): appended; amortised O(1). */
static void ws_note(struct pc_dest *d, uint64_t page, uint64_t t)
{
    if (d->nws == d->cap_ws) {
        size_t cap = d->cap_ws ? d->cap_ws * 2 : 4096;
        struct pc_ws_entry *n = realloc(d->ws, cap * sizeof *n);
        if (!n) {
            d->ws_recording = 0;
            d->ws_truncated = 1;
            return;
        }
        d->ws = n;
        d->cap_ws = cap;
    }
    d->ws[d->nws++] = (struct pc_ws_entry){ page, t };
}

/* Recording also turns on staged placement: the pages the source sends unasked are held in a
 * staging copy of each block instead of being placed, so that the program's first touch of each
 * one still faults (and is recorded) even when the background stream got there first; the fault
 * is served from the copy, without a request (dest_place.c). */
int pc_dest_record_workset(struct pc_dest *d, int on)
{
    int r = 0;
    pthread_mutex_lock(&d->state_lock);
    for (int i = 0; on && i < d->nblocks && r == 0; i++) {
        struct pc_dest_block *b = &d->blocks[i];
        if (b->stage)
            continue;
        size_t words = (b->length / TP + 63) / 64;
        b->staged = calloc(words ? words : 1, 8);
        b->staged_zero = calloc(words ? words : 1, 8);
        /* only the pages written into it take memory; MAP_NORESERVE: no commit charge for the rest */
        void *m = mmap(NULL, b->length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (!b->staged || !b->staged_zero || m == MAP_FAILED) {
            r = m == MAP_FAILED ? -errno : -ENOMEM;
            free(b->staged);
            free(b->staged_zero);
            b->staged = b->staged_zero = NULL;
            if (m != MAP_FAILED)
                munmap(m, b->length);
        } else {
            b->stage = m;
        }
    }
    if (r == 0) {
        d->ws_recording = on;
        __atomic_store_n(&d->staging, on, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&d->state_lock);
    return r;
}

/* The record so far, each page once (a page discarded and asked for again
 * keeps its first time): up to cap entries into pages[] / t_ns[]; returns how
 * many, or -ENOMEM. *truncated: recording stopped early for lack of memory. */
int64_t pc_dest_workset_read(struct pc_dest *d, uint64_t *pages, uint64_t *t_ns, size_t cap, int *truncated)
{
    uint64_t *seen[PC_MAX_BLOCKS] = { 0 };
    int64_t n = 0;
    pthread_mutex_lock(&d->state_lock);
    for (int b = 0; b < d->nblocks; b++) {
        seen[b] = calloc((d->blocks[b].length / TP + 63) / 64 + 1, 8);
        if (!seen[b]) {
            n = -ENOMEM;
            goto out;
        }
    }
    for (size_t i = 0; i < d->nws && (size_t)n < cap; i++) {
        uint64_t p = d->ws[i].page;
        if (bit_test_and_set(seen[p >> 56], p & ((1ULL << 56) - 1)))
            continue;
        pages[n] = p;
        t_ns[n] = d->ws[i].t_ns;
        n++;
    }
    *truncated = d->ws_truncated;
out:
    pthread_mutex_unlock(&d->state_lock);
    for (int b = 0; b < d->nblocks; b++)
        free(seen[b]);
    return n;
}

/* ---- the fault thread ---- */
int wake_range(struct pc_dest *d, uint64_t addr, uint64_t len)
{
    struct uffdio_range r = { addr, len };
    return ioctl(d->uffd, UFFDIO_WAKE, &r) ? -errno : 0;
}

/* A fault on a page we already placed: either a message read after the page
 * went in (the UFFDIO_COPY woke the thread already) or a page the program
 * dropped since (MADV_DONTNEED -> UFFD_EVENT_REMOVE), which reads as zeros. */
void serve_late_fault(struct pc_dest *d, const struct pc_dest_block *b, uint64_t addr)
{
    struct uffdio_zeropage z = { { addr, b->page_size }, 0, 0 };
    if (b->page_size == TP && ioctl(d->uffd, UFFDIO_ZEROPAGE, &z) == 0)
        return;
    if (b->page_size != TP) {
        /* UFFDIO_ZEROPAGE is not allowed on hugetlbfs: copy a zero page */
        void *zero = calloc(1, b->page_size);
        if (zero) {
            struct uffdio_copy c = { addr, (uint64_t)(uintptr_t)zero, b->page_size, 0, 0 };
            int ok = ioctl(d->uffd, UFFDIO_COPY, &c) == 0;
            free(zero);
            if (ok)
                return;
        }
    }
    /* EEXIST: present now (the copy already woke it); anything else: wake it
     * so that it faults again rather than sleeping forever */
    wake_range(d, addr, b->page_size);
}

static void drop_range(struct pc_dest *d, uint64_t start, uint64_t end)
{
    /* a discard the source asked for: those pages are about to be sent again */
    if (__atomic_load_n(&d->discarding, __ATOMIC_ACQUIRE))
        return;
    /* the program dropped [start, end): those pages now read as zeros and
     * the source's copy of them must not be placed */
    for (uint64_t a = start; a < end;) {
        const struct pc_dest_seg *s = seg_by_addr(d, a);
        if (!s) {
            a = (a | (TP - 1)) + 1;
            continue;
        }
        uint64_t stop = end < s->addr + s->size ? end : s->addr + s->size;
        struct pc_dest_block *b = &d->blocks[s->block];
        for (uint64_t p = a; p < stop; p += TP) {
            uint64_t page = (s->offset + (p - s->addr)) >> TP_SHIFT;
            /* a staged page it dropped reads as zeros too: its copy must not be placed */
            int was_staged = b->staged && bit_clear(b->staged, page);
            if (!bit_test_and_set(b->received, page)) {
                __atomic_fetch_add(&d->st.received_pages, 1, __ATOMIC_RELAXED);
                __atomic_fetch_add(&d->st.removed_pages, 1, __ATOMIC_RELAXED);
            } else if (was_staged) {
                __atomic_fetch_add(&d->st.removed_pages, 1, __ATOMIC_RELAXED);
            }
        }
        a = stop;
    }
}

/* The program's first touch of a page held in staging: recorded, and served from the copy (from
 * RUNNING on; before, the page may still be sent again or discarded, and the thread waits for the
 * wake-up at RUN, faulting again then). Caller holds state_lock. */
static void fault_on_staged(struct pc_dest *d, int block, uint64_t off, uint64_t host, uint64_t t)
{
    if (__atomic_load_n(&d->overwrite_ok, __ATOMIC_ACQUIRE))
        return;
    if (d->ws_recording)
        ws_note(d, ((uint64_t)block << 56) | (off >> TP_SHIFT), t);
    d->st.staged_faults++;
    if (!serve_staged(d, block, off, host))
        serve_late_fault(d, &d->blocks[block], host);   /* placed at the stream's end meanwhile, or dropped */
}

int pc_dest_fault_loop(struct pc_dest *d)
{
    struct uffd_msg msgs[64];
    uint64_t reqs[64], hops[64];   /* requests to send, and their hop-trace entries */
    struct pollfd p[2] = { { d->uffd, POLLIN, 0 }, { d->quit_fd, POLLIN, 0 } };
    for (;;) {
        int r = poll(p, 2, -1);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            note_error(d, errno);
            return -errno;
        }
        if (p[1].revents)
            return 0;
        if (p[0].revents & POLLERR) {
            note_error(d, EBADF);
            return -EBADF;
        }
        ssize_t n = read(d->uffd, msgs, sizeof msgs);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            note_error(d, errno);
            return -errno;
        }
        uint64_t t = pc_now_ns();
        size_t nreq = 0;
        pthread_mutex_lock(&d->state_lock);
        for (size_t i = 0; i < (size_t)n / sizeof msgs[0]; i++) {
            struct uffd_msg *m = &msgs[i];
            if (m->event == UFFD_EVENT_PAGEFAULT) {
                uint64_t addr = m->arg.pagefault.address;
                d->st.faults++;
                const struct pc_dest_seg *s = seg_by_addr(d, addr);
                if (!s) {
                    d->st.unknown_faults++;
                    continue;
                }
                struct pc_dest_block *b = &d->blocks[s->block];
                uint64_t off = (s->offset + (addr - s->addr)) & ~(b->page_size - 1);
                uint64_t host = s->addr + (off - s->offset);
                uint64_t page = off >> TP_SHIFT;
                if (bit_test(b->received, page)) {
                    if (b->staged && bit_test(b->staged, page))
                        fault_on_staged(d, s->block, off, host, t);
                    else {
                        d->st.late_faults++;
                        serve_late_fault(d, b, host);
                    }
                } else if (bit_test_and_set(b->requested, page)) {
                    d->st.duplicate_faults++;
                } else if (b->staged && (__atomic_thread_fence(__ATOMIC_SEQ_CST), bit_test(b->received, page))) {
                    /* staged by a channel since the test above (its check of "requested" came
                     * first): no request; if the channel saw this request it serves it too
                     * (EEXIST: whichever comes second only wakes) */
                    fault_on_staged(d, s->block, off, host, t);
                } else {
                    struct pc_hop_trace *trace = __atomic_load_n(&d->hop, __ATOMIC_ACQUIRE);
                    uint64_t hop = trace ? pc_hop_claim(trace, (uint32_t)s->block, off, t) : 0;
                    inflight_put(d, key_of(s->block, off), t, hop);
                    if (d->ws_recording)
                        ws_note(d, ((uint64_t)s->block << 56) | page, t);
                    uint64_t req = ((uint64_t)s->block << 56) | off;
                    if (!d->requests_enabled) {
                        if (d->npending == d->cap_pending) {
                            size_t cap = d->cap_pending ? d->cap_pending * 2 : 256;
                            uint64_t *np = realloc(d->pending, cap * sizeof *np);
                            if (!np) {
                                note_error(d, ENOMEM);
                                continue;
                            }
                            d->pending = np;
                            d->cap_pending = cap;
                        }
                        d->pending[d->npending++] = req;
                    } else {
                        hops[nreq] = hop;
                        reqs[nreq++] = req;
                    }
                }
            } else if (m->event == UFFD_EVENT_REMOVE || m->event == UFFD_EVENT_UNMAP) {
                if (m->event == UFFD_EVENT_UNMAP)
                    d->st.events_other++;
                drop_range(d, m->arg.remove.start, m->arg.remove.end);
            } else if (m->event == UFFD_EVENT_FORK) {
                /* a child's uffd installed in our table: we do not serve forks */
                close((int)m->arg.fork.ufd);
                d->st.events_other++;
            } else {
                d->st.events_other++;
            }
        }
        /* a failed send ends the connection (send_requests): the stream's
         * thread decides; the pages stay requested and are asked for again */
        if (nreq)
            send_requests(d, reqs, hops, nreq);
        pthread_mutex_unlock(&d->state_lock);
    }
}
