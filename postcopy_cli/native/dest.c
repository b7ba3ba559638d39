/* The destination's native half: the fault thread and page placement.
 *
 * Both run with the GIL released (cffi API mode), so a fault is served while
 * Python code runs, and nothing here ever touches registered memory itself.
 * Page state is two bitmaps per block, one bit per 4096-byte target page:
 * "requested" (asked of the source, never ask twice) and "received" (placed;
 * the RECV_BITMAP the source may ask for). Bits are updated atomically: the
 * fault thread and the placing thread run concurrently. */
#include "dest.h"
#include "io.h"
#include "pagesize.h"
#include "wire.h"
#include <poll.h>
#include <stdlib.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>

#define TP PC_TARGET_PAGE_SIZE
#define TP_SHIFT 12

static int bit_test(const uint64_t *map, uint64_t i)
{
    return (__atomic_load_n(&map[i >> 6], __ATOMIC_ACQUIRE) >> (i & 63)) & 1;
}

static int bit_test_and_set(uint64_t *map, uint64_t i)
{
    uint64_t m = 1ULL << (i & 63);
    return (__atomic_fetch_or(&map[i >> 6], m, __ATOMIC_ACQ_REL) & m) != 0;
}

static int bit_clear(uint64_t *map, uint64_t i)
{
    uint64_t m = 1ULL << (i & 63);
    return (__atomic_fetch_and(&map[i >> 6], ~m, __ATOMIC_ACQ_REL) & m) != 0;
}

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
    }
    free(d->segs);
    free(d->pending);
    free(d->inflight);
    pthread_mutex_destroy(&d->rp_lock);
    pthread_mutex_destroy(&d->state_lock);
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

/* host address of block offset, and how many bytes from there stay in one segment */
static uint64_t host_addr(const struct pc_dest *d, int block, uint64_t off, uint64_t *room)
{
    for (int i = 0; i < d->nsegs; i++) {
        const struct pc_dest_seg *s = &d->segs[i];
        if (s->block == block && off >= s->offset && off < s->offset + s->size) {
            *room = s->offset + s->size - off;
            return s->addr + (off - s->offset);
        }
    }
    *room = 0;
    return 0;
}

/* ---- in-flight requests: page key -> time the fault was read ---- */
static uint64_t key_of(int block, uint64_t off) { return (((uint64_t)block << 48) | (off >> TP_SHIFT)) + 1; }

static void inflight_put(struct pc_dest *d, uint64_t key, uint64_t t)
{
    size_t mask = d->inflight_cap - 1, h = (key * 0x9E3779B97F4A7C15ULL) >> 40;
    for (size_t n = 0; n < 64; n++, h++) {
        struct pc_inflight *e = &d->inflight[h & mask];
        uint64_t expect = 0;
        /* claim the slot, fill it, then publish the key */
        if (__atomic_compare_exchange_n(&e->key, &expect, UINT64_MAX, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            __atomic_store_n(&e->t_ns, t, __ATOMIC_RELEASE);
            __atomic_store_n(&e->key, key, __ATOMIC_RELEASE);
            return;
        }
    }
    /* table crowded: this request goes unmeasured */
}

/* 1 if the page was requested (its entry is removed); *t gets the time the
 * fault was read (0 for a request the table had no room to measure) */
static int inflight_take(struct pc_dest *d, uint64_t key, uint64_t *t)
{
    size_t mask = d->inflight_cap - 1, h = (key * 0x9E3779B97F4A7C15ULL) >> 40;
    for (size_t n = 0; n < 64; n++, h++) {
        struct pc_inflight *e = &d->inflight[h & mask];
        if (__atomic_load_n(&e->key, __ATOMIC_ACQUIRE) == key) {
            *t = __atomic_exchange_n(&e->t_ns, 0, __ATOMIC_ACQ_REL);
            __atomic_store_n(&e->key, 0, __ATOMIC_RELEASE);
            return 1;
        }
    }
    *t = 0;
    return 0;
}

static void record_latency(struct pc_dest *d, uint64_t ns)
{
    uint64_t us = ns / 1000;
    int b = 0;
    while (b < PC_HIST_BUCKETS - 1 && (1ULL << b) <= us)
        b++;
    __atomic_fetch_add(&d->st.hist[b], 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&d->st.blocktime_ns, ns, __ATOMIC_RELAXED);
    __atomic_fetch_add(&d->st.latency_samples, 1, __ATOMIC_RELAXED);
}

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

static int send_requests(struct pc_dest *d, const uint64_t *reqs, size_t n)
{
    uint8_t buf[64 * PC_WIRE_REQ_MAX];
    size_t i = 0;
    int r = 0;
    pthread_mutex_lock(&d->rp_lock);
    while (i < n && r == 0) {
        size_t len = 0;
        for (; i < n && len + PC_WIRE_REQ_MAX <= sizeof buf; i++) {
            int block = (int)(reqs[i] >> 56);
            len += encode_request(d, block, reqs[i] & ((1ULL << 56) - 1), buf + len);
        }
        r = pc_send_all(d->rp_fd, buf, len);
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

/* from POSTCOPY_LISTEN on, faults become requests; those read before are sent now */
static int enable_requests(struct pc_dest *d)
{
    pthread_mutex_lock(&d->state_lock);
    int r = d->requests_enabled ? 0 : -ENOTCONN;
    if (!d->requests_enabled && d->rp_fd >= 0) {
        d->requests_enabled = 1;
        /* a fault whose page arrived in pre-copy meanwhile needs no request */
        size_t n = 0;
        for (size_t i = 0; i < d->npending; i++) {
            uint64_t off = d->pending[i] & ((1ULL << 56) - 1);
            if (!bit_test(d->blocks[d->pending[i] >> 56].received, off >> TP_SHIFT))
                d->pending[n++] = d->pending[i];
        }
        r = n ? send_requests(d, d->pending, n) : 0;
        d->npending = 0;
    }
    pthread_mutex_unlock(&d->state_lock);
    return r;
}

/* The one place the phase reaches the hot paths.  From LISTENING on, own
 * memory is registered (the caller registered it before) and faults become
 * requests (END after a stream without LISTEN changes neither); from RUNNING
 * on, the program runs on the pages, so a present page is never overwritten.
 * Release stores: a thread that sees the new flag sees what was done before
 * it was set. */
int pc_dest_set_phase(struct pc_dest *d, int phase)
{
    int r = 0;
    if (phase >= PC_PHASE_LISTENING && phase != PC_PHASE_END) {
        __atomic_store_n(&d->registered, 1, __ATOMIC_RELEASE);
        r = enable_requests(d);
        if (r < 0)
            return r;
    }
    __atomic_store_n(&d->overwrite_ok, phase < PC_PHASE_RUNNING, __ATOMIC_RELEASE);
    __atomic_store_n(&d->phase, phase, __ATOMIC_RELEASE);
    return r;
}

static void note_error(struct pc_dest *d, int err)
{
    int64_t zero = 0;
    __atomic_compare_exchange_n(&d->st.first_error, &zero, (int64_t)err, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* ---- the fault thread ---- */
static int wake_range(struct pc_dest *d, uint64_t addr, uint64_t len)
{
    struct uffdio_range r = { addr, len };
    return ioctl(d->uffd, UFFDIO_WAKE, &r) ? -errno : 0;
}

/* A fault on a page we already placed: either a message read after the page
 * went in (the UFFDIO_COPY woke the thread already) or a page the program
 * dropped since (MADV_DONTNEED -> UFFD_EVENT_REMOVE), which reads as zeros. */
static void serve_late_fault(struct pc_dest *d, const struct pc_dest_block *b, uint64_t addr)
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
            if (!bit_test_and_set(b->received, page)) {
                __atomic_fetch_add(&d->st.received_pages, 1, __ATOMIC_RELAXED);
                __atomic_fetch_add(&d->st.removed_pages, 1, __ATOMIC_RELAXED);
            }
        }
        a = stop;
    }
}

int pc_dest_fault_loop(struct pc_dest *d)
{
    struct uffd_msg msgs[64];
    uint64_t reqs[64];
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
                if (bit_test(b->received, off >> TP_SHIFT)) {
                    d->st.late_faults++;
                    serve_late_fault(d, b, host);
                } else if (bit_test_and_set(b->requested, off >> TP_SHIFT)) {
                    d->st.duplicate_faults++;
                } else {
                    inflight_put(d, key_of(s->block, off), t);
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
        if (nreq) {
            int e = send_requests(d, reqs, nreq);
            if (e)
                note_error(d, -e);
        }
        pthread_mutex_unlock(&d->state_lock);
    }
}

/* ---- placement ---- */
static int overwrite(struct pc_dest *d, uint64_t addr, const uint8_t *src, uint64_t len)
{
    if (d->pid == 0) {
        memcpy((void *)(uintptr_t)addr, src, len);
        return 0;
    }
    struct iovec l = { (void *)src, len }, r = { (void *)(uintptr_t)addr, len };
    ssize_t w = process_vm_writev(d->pid, &l, 1, &r, 1, 0);
    return w == (ssize_t)len ? 0 : -(w < 0 ? errno : EIO);
}

/* place [addr, addr+len) from src (src NULL: zeros); returns 0 or -errno */
static void account(struct pc_dest *d, int block, uint64_t off, uint64_t len, uint64_t t, int zero)
{
    struct pc_dest_block *b = &d->blocks[block];
    for (uint64_t o = off; o < off + len; o += b->page_size) {
        uint64_t t0;
        if (inflight_take(d, key_of(block, o), &t0)) {
            if (t0)
                record_latency(d, t > t0 ? t - t0 : 0);
            __atomic_fetch_add(&d->st.demand_pages, b->page_size / TP, __ATOMIC_RELAXED);
        } else if (__atomic_load_n(&d->overwrite_ok, __ATOMIC_RELAXED)) {
            /* before RUN: a pre-copy page */
            __atomic_fetch_add(&d->st.precopy_pages, b->page_size / TP, __ATOMIC_RELAXED);
        } else {
            __atomic_fetch_add(&d->st.background_pages, b->page_size / TP, __ATOMIC_RELAXED);
        }
        for (uint64_t q = o; q < o + b->page_size; q += TP) {
            if (!bit_test_and_set(b->received, q >> TP_SHIFT))
                __atomic_fetch_add(&d->st.received_pages, 1, __ATOMIC_RELAXED);
        }
    }
    if (zero)
        __atomic_fetch_add(&d->st.zero_pages, len / TP, __ATOMIC_RELAXED);
}

/* A test hook: sleep between placing pages and accounting for them (0: off). */
static void test_pause(const struct pc_dest *d)
{
    uint64_t ns = __atomic_load_n(&d->test_place_delay_ns, __ATOMIC_RELAXED);
    if (ns) {
        struct timespec t = { (time_t)(ns / 1000000000ULL), (long)(ns % 1000000000ULL) };
        nanosleep(&t, NULL);
    }
}

/* UFFDIO_COPY / UFFDIO_ZEROPAGE of [addr, addr+len) without waking the
 * faulting threads; 0 or -errno, *placed the bytes that went in */
static int place_nowake(struct pc_dest *d, uint64_t addr, const uint8_t *src, uint64_t len, int64_t *placed)
{
    int rc;
    if (src) {
        struct uffdio_copy c = { addr, (uint64_t)(uintptr_t)src, len, UFFDIO_COPY_MODE_DONTWAKE, 0 };
        rc = ioctl(d->uffd, UFFDIO_COPY, &c);
        *placed = c.copy;
    } else {
        struct uffdio_zeropage z = { { addr, len }, UFFDIO_ZEROPAGE_MODE_DONTWAKE, 0 };
        rc = ioctl(d->uffd, UFFDIO_ZEROPAGE, &z);
        *placed = z.zeropage;
    }
    if (rc == 0) {
        *placed = (int64_t)len;
        test_pause(d);
        return 0;
    }
    int err = errno;
    if (*placed > 0)
        test_pause(d);
    return -err;
}

/* Place [off, off+len) of a block at host addr from src (NULL: zeros) and
 * account for what went in, without waking the faulting threads (see
 * place_run); returns 0 or -errno. A page found present (EEXIST) was placed
 * by the other channel meanwhile (or, before RUN, is overwritten). */
static int place_run_nowake(struct pc_dest *d, int block, uint64_t off, uint64_t addr, const uint8_t *src,
                            uint64_t len)
{
    uint64_t page_size = d->blocks[block].page_size;
    uint64_t done = 0;
    while (done < len) {
        int64_t placed;
        int rc = place_nowake(d, addr + done, src ? src + done : NULL, len - done, &placed);
        if (rc == 0) {
            account(d, block, off + done, len - done, pc_now_ns(), src == NULL);
            return 0;
        }
        int err = -rc;
        if (placed > 0) {   /* partial: account for what went in, carry on after it */
            account(d, block, off + done, (uint64_t)placed, pc_now_ns(), src == NULL);
            done += (uint64_t)placed;
        }
        if (err == EAGAIN || err == EINTR)
            continue;
        if (err != EEXIST)
            return -err;
        /* some page of the run is present: go page by page from here */
        for (uint64_t o = done; o < len; o += page_size) {
            int e = -place_nowake(d, addr + o, src ? src + o : NULL, page_size, &placed);
            if (e == 0) {
                account(d, block, off + o, page_size, pc_now_ns(), src == NULL);
            } else if (e == EEXIST) {
                if (d->overwrite_ok) {
                    static const uint8_t zeros[TP];
                    int w = 0;
                    for (uint64_t q = 0; q < page_size && !w; q += TP)
                        w = overwrite(d, addr + o + q, src ? src + o + q : zeros, TP);
                    if (w)
                        return w;
                    account(d, block, off + o, page_size, pc_now_ns(), src == NULL);
                } else {
                    __atomic_fetch_add(&d->st.skipped_pages, page_size / TP, __ATOMIC_RELAXED);
                }
            } else {
                return -e;
            }
        }
        return 0;
    }
    return 0;
}

/* The program must not run on a page before it is accounted for: a thread
 * woken by UFFDIO_COPY may read its last page and exit while the received
 * bitmap still says a page is missing. So pages go in with DONTWAKE, are
 * accounted, and then one UFFDIO_WAKE covers the run (waking a page still
 * missing only makes its thread fault again). */
static int place_run(struct pc_dest *d, int block, uint64_t off, uint64_t addr, const uint8_t *src, uint64_t len)
{
    if (!__atomic_load_n(&d->registered, __ATOMIC_ACQUIRE)) {
        if (src)
            memcpy((void *)(uintptr_t)addr, src, len);
        else
            memset((void *)(uintptr_t)addr, 0, len);
        account(d, block, off, len, pc_now_ns(), src == NULL);
        return 0;
    }
    int r = place_run_nowake(d, block, off, addr, src, len);
    int w = wake_range(d, addr, len);
    return r ? r : w;
}

static int place(struct pc_dest *d, int block, uint64_t offset, const uint8_t *data, uint64_t len)
{
    if (block < 0 || block >= d->nblocks)
        return -EINVAL;
    struct pc_dest_block *b = &d->blocks[block];
    if (offset % b->page_size || len % b->page_size || offset + len > b->length || offset + len < offset)
        return -EINVAL;
    uint64_t o = offset, end = offset + len;
    int overwrite_ok = __atomic_load_n(&d->overwrite_ok, __ATOMIC_ACQUIRE);
    while (o < end) {
        int have = bit_test(b->received, o >> TP_SHIFT);
        if (have && !overwrite_ok) {
            /* received already (placed, or dropped by the program since RUN) */
            __atomic_fetch_add(&d->st.skipped_pages, b->page_size / TP, __ATOMIC_RELAXED);
            /* requested, then dropped by the program before it came: the
             * faulting thread still waits; it gets the zeros it dropped */
            uint64_t room, addr = host_addr(d, block, o, &room);
            uint64_t t0;
            if (inflight_take(d, key_of(block, o), &t0) && addr)
                serve_late_fault(d, b, addr);
            o += b->page_size;
            continue;
        }
        /* a run of pages all missing, or (before RUN) all present */
        uint64_t room, run = 0;
        uint64_t addr = host_addr(d, block, o, &room);
        while (o + run < end && run < room && bit_test(b->received, (o + run) >> TP_SHIFT) == have)
            run += b->page_size;
        if (!addr) {   /* a hole no region maps: nothing to place */
            account(d, block, o, b->page_size, 0, 0);
            o += b->page_size;
            continue;
        }
        const uint8_t *src = data ? data + (o - offset) : NULL;
        int r;
        if (have) {
            /* pre-copy sent this page again (dirtied since): before RUN the
             * program is stopped, so its present copy is simply overwritten */
            if (src) {
                r = overwrite(d, addr, src, run);
            } else {
                uint8_t *zero = calloc(1, run);
                r = zero ? overwrite(d, addr, zero, run) : -ENOMEM;
                free(zero);
            }
            if (!r)
                __atomic_fetch_add(&d->st.overwritten_pages, run / TP, __ATOMIC_RELAXED);
        } else {
            r = place_run(d, block, o, addr, src, run);
        }
        if (r)
            return r;
        o += run;
    }
    return 0;
}

int pc_dest_place(struct pc_dest *d, int block, uint64_t offset, const uint8_t *data, uint64_t len)
{
    return place(d, block, offset, data, len);
}

int pc_dest_place_zero(struct pc_dest *d, int block, uint64_t offset, uint64_t len)
{
    if (block >= 0 && block < d->nblocks && d->blocks[block].page_size != TP) {
        /* no UFFDIO_ZEROPAGE on hugetlbfs: copy from a zero buffer */
        uint8_t *zero = calloc(1, len);
        if (!zero)
            return -ENOMEM;
        int r = place(d, block, offset, zero, len);
        free(zero);
        return r;
    }
    return place(d, block, offset, NULL, len);
}

void pc_dest_mark(struct pc_dest *d, int block, uint64_t offset, uint64_t len, int received)
{
    struct pc_dest_block *b = &d->blocks[block];
    for (uint64_t o = offset; o < offset + len && o < b->length; o += TP) {
        if (received) {
            if (!bit_test_and_set(b->received, o >> TP_SHIFT))
                __atomic_fetch_add(&d->st.received_pages, 1, __ATOMIC_RELAXED);
        } else {
            if (bit_clear(b->received, o >> TP_SHIFT))
                __atomic_fetch_sub(&d->st.received_pages, 1, __ATOMIC_RELAXED);
            bit_clear(b->requested, o >> TP_SHIFT);
        }
    }
}

int pc_dest_test(struct pc_dest *d, int block, uint64_t offset)
{
    return bit_test(d->blocks[block].received, offset >> TP_SHIFT);
}

uint64_t pc_dest_count_received(struct pc_dest *d, int block)
{
    if (block < 0)
        return __atomic_load_n(&d->st.received_pages, __ATOMIC_ACQUIRE);
    const struct pc_dest_block *b = &d->blocks[block];
    uint64_t n = 0, words = (b->length / TP + 63) / 64;
    for (uint64_t i = 0; i < words; i++)
        n += (uint64_t)__builtin_popcountll(__atomic_load_n(&b->received[i], __ATOMIC_ACQUIRE));
    return n;
}

void pc_dest_bitmap_le(struct pc_dest *d, int block, uint8_t *out, size_t out_len)
{
    const struct pc_dest_block *b = &d->blocks[block];
    uint64_t words = (b->length / TP + 63) / 64;
    memset(out, 0, out_len);
    for (uint64_t i = 0; i < words && i * 8 < out_len; i++) {
        uint64_t w = __atomic_load_n(&b->received[i], __ATOMIC_ACQUIRE);
        for (int k = 0; k < 8 && i * 8 + k < out_len; k++)
            out[i * 8 + k] = (uint8_t)(w >> (8 * k));
    }
}

void pc_dest_get_stats(struct pc_dest *d, struct pc_dest_stats *out)
{
    memcpy(out, &d->st, sizeof *out);
}
