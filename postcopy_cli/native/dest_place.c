/* The destination's placement: pages into the program's memory (UFFDIO_COPY,
 * UFFDIO_ZEROPAGE, or plain writes before registration and before RUN) and
 * the page bitmaps that record them. */
#include "dest_internal.h"
#include "io.h"
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>

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

/* a requested page is in: its wait ends at t; 1 if it was requested. elsewhere: this receiver
 * found it present (PC_HOP_ELSEWHERE), the other's copy went in. */
static int requested_in(struct pc_dest *d, int block, uint64_t off, uint64_t t, uint32_t elsewhere)
{
    uint64_t t0, hop;
    if (!inflight_take(d, key_of(block, off), &t0, &hop))
        return 0;
    if (t0)
        record_latency(d, t > t0 ? t - t0 : 0);
    if (hop) {   /* the hop trace: the same end as the latency sample */
        struct pc_hop_trace *h = d->hop;
        pc_hop_time(h, hop, 2, pc_hop_rx_time(block, off));
        pc_hop_time(h, hop, 3, t);
        pc_hop_flag(h, hop, pc_hop_channel | elsewhere);
    }
    __atomic_fetch_add(&d->st.demand_pages, d->blocks[block].page_size / TP, __ATOMIC_RELAXED);
    return 1;
}

/* the target pages of one page of block b at off are received; 1 if any was not yet */
static int mark_received(struct pc_dest *d, struct pc_dest_block *b, uint64_t off)
{
    int fresh = 0;
    for (uint64_t q = off; q < off + b->page_size; q += TP) {
        if (!bit_test_and_set(b->received, q >> TP_SHIFT)) {
            fresh = 1;
            __atomic_fetch_add(&d->st.received_pages, 1, __ATOMIC_RELAXED);
        }
    }
    return fresh;
}

/* the pages of [off, off+len) of block are in (placed or staged) at time t: received, and each
 * counted once as requested (its latency ends), pre-copy or background */
static void account(struct pc_dest *d, int block, uint64_t off, uint64_t len, uint64_t t, int zero)
{
    struct pc_dest_block *b = &d->blocks[block];
    for (uint64_t o = off; o < off + len; o += b->page_size) {
        int fresh = mark_received(d, b, o);
        if (requested_in(d, block, o, t, 0))
            ;
        else if (__atomic_load_n(&d->overwrite_ok, __ATOMIC_RELAXED)) {
            /* before RUN: a pre-copy page */
            __atomic_fetch_add(&d->st.precopy_pages, b->page_size / TP, __ATOMIC_RELAXED);
        } else if (fresh) {
            __atomic_fetch_add(&d->st.background_pages, b->page_size / TP, __ATOMIC_RELAXED);
        }
        /* (not fresh: the other channel found it present first, see present_elsewhere) */
    }
    if (zero)
        __atomic_fetch_add(&d->st.zero_pages, len / TP, __ATOMIC_RELAXED);
}

/* After RUN, UFFDIO_COPY found this page present: the other channel's copy
 * went in (each page is installed whole) and that channel has perhaps not
 * accounted for it yet, as it accounts for its run only once all of it is
 * in.  This channel's wake would release the page's faulting thread before
 * that: so the page is accounted for here, received and, if requested, its
 * latency ends now (the thread runs from this wake on). */
static void present_elsewhere(struct pc_dest *d, int block, uint64_t off, uint64_t t)
{
    struct pc_dest_block *b = &d->blocks[block];
    __atomic_fetch_add(&d->st.skipped_pages, b->page_size / TP, __ATOMIC_RELAXED);
    mark_received(d, b, off);
    requested_in(d, block, off, t, PC_HOP_ELSEWHERE);
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
                    present_elsewhere(d, block, off + o, pc_now_ns());
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

/* ---- staged placement (--record-workset) ----
 *
 * A page the source sends unasked is copied into the block's stage and marked staged and
 * received (so it is never asked for, nor sent again on a resumed stream), not placed: the
 * program's first touch of it still faults, the fault thread records it and places the page
 * from the stage (serve_staged), and what is left is placed in long runs when the stream ends
 * (pc_dest_place_staged). Before RUNNING a staged page may be sent again (its copy is
 * replaced) or discarded (its bits cleared); from RUNNING on its copy never changes. */

/* Place the staged host page at block offset off (host addr) and wake its thread; 1 if it was
 * staged (placed now, or present already), 0 if not (placed by someone else, or dropped). */
int serve_staged(struct pc_dest *d, int block, uint64_t off, uint64_t addr)
{
    struct pc_dest_block *b = &d->blocks[block];
    uint64_t page = off >> TP_SHIFT;
    int served = 0;
    pthread_mutex_lock(&d->stage_lock);
    if (b->staged && bit_test(b->staged, page)) {
        int rc;
        if (b->page_size == TP && bit_test(b->staged_zero, page)) {
            struct uffdio_zeropage z = { { addr, TP }, 0, 0 };
            rc = ioctl(d->uffd, UFFDIO_ZEROPAGE, &z);
        } else {
            struct uffdio_copy c = { addr, (uint64_t)(uintptr_t)(b->stage + off), b->page_size, 0, 0 };
            rc = ioctl(d->uffd, UFFDIO_COPY, &c);
        }
        int err = rc ? errno : 0;
        if (err == 0 || err == EEXIST) {
            for (uint64_t q = page; q < page + b->page_size / TP; q++) {
                bit_clear(b->staged, q);
                bit_clear(b->staged_zero, q);
            }
        }
        /* EEXIST: present already (the copy that put it there woke the thread, or this wakes
         * it); another error (EAGAIN: the mm is changing): the page stays staged, the thread
         * is woken and faults again */
        if (err)
            wake_range(d, addr, b->page_size);
        served = 1;
    }
    pthread_mutex_unlock(&d->stage_lock);
    return served;
}

/* A page received already: a thread that asked for it is served from the stage if it is staged,
 * else given the zeros the program dropped it to (serve_late_fault). */
static void serve_received(struct pc_dest *d, int block, uint64_t off, uint64_t addr)
{
    if (!serve_staged(d, block, off, addr))
        serve_late_fault(d, &d->blocks[block], addr);
}

/* Stage the run [off, off+len) of pages missing and not requested (src NULL: zeros). */
static void stage_run(struct pc_dest *d, int block, uint64_t off, const uint8_t *src, uint64_t len)
{
    struct pc_dest_block *b = &d->blocks[block];
    uint64_t first = off >> TP_SHIFT, n = len / TP;
    if (src)
        memcpy(b->stage + off, src, len);
    for (uint64_t p = first; p < first + n; p++) {
        if (src)
            bit_clear(b->staged_zero, p);
        else
            bit_test_and_set(b->staged_zero, p);
        bit_test_and_set(b->staged, p);   /* content, then staged, then received (account) */
    }
    account(d, block, off, len, pc_now_ns(), src == NULL);
    __atomic_fetch_add(&d->st.staged_pages, n, __ATOMIC_RELAXED);
    /* A fault read between this run's check of "requested" and "received" above was sent as a
     * request; its answer would be skipped as received: serve it now (the fault thread does the
     * same for a fault that sees "received" after setting "requested"). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&d->overwrite_ok, __ATOMIC_ACQUIRE))
        return;   /* before RUNNING: woken at RUN, served then */
    for (uint64_t o = off; o < off + len; o += b->page_size) {
        if (bit_test(b->requested, o >> TP_SHIFT)) {
            uint64_t room, addr = host_addr(d, block, o, &room);
            if (addr)
                serve_staged(d, block, o, addr);
        }
    }
}

/* Before RUNNING: pages staged already sent again (src NULL: as zeros); the newer copy
 * replaces the staged one. */
static void restage_run(struct pc_dest *d, int block, uint64_t off, const uint8_t *src, uint64_t len)
{
    struct pc_dest_block *b = &d->blocks[block];
    pthread_mutex_lock(&d->stage_lock);
    for (uint64_t o = off; o < off + len; o += TP) {
        if (src) {
            memcpy(b->stage + o, src + (o - off), TP);
            bit_clear(b->staged_zero, o >> TP_SHIFT);
        } else {
            bit_test_and_set(b->staged_zero, o >> TP_SHIFT);
        }
    }
    pthread_mutex_unlock(&d->stage_lock);
    __atomic_fetch_add(&d->st.overwritten_pages, len / TP, __ATOMIC_RELAXED);
    if (!src)
        __atomic_fetch_add(&d->st.zero_pages, len / TP, __ATOMIC_RELAXED);
}

/* Place the staged run [off, off+len) at host addr (zeros or from the stage) and wake it; pages
 * present already (served to a fault meanwhile) are left. 0 or -errno. */
static int place_staged_run(struct pc_dest *d, const struct pc_dest_block *b, uint64_t off, uint64_t addr, int zero,
                            uint64_t len)
{
    const uint8_t *src = zero ? NULL : b->stage + off;
    if (!__atomic_load_n(&d->registered, __ATOMIC_ACQUIRE)) {
        /* own memory, never registered (a stream without LISTEN) */
        if (src)
            memcpy((void *)(uintptr_t)addr, src, len);
        else
            memset((void *)(uintptr_t)addr, 0, len);
        return 0;
    }
    uint64_t done = 0;
    int r = 0;
    while (done < len) {
        int64_t placed = 0;
        int rc = place_nowake(d, addr + done, src ? src + done : NULL, len - done, &placed);
        if (rc == 0)
            break;
        if (placed > 0)
            done += (uint64_t)placed;
        if (rc == -EAGAIN || rc == -EINTR)
            continue;
        if (rc != -EEXIST) {
            r = rc;
            break;
        }
        done += b->page_size;   /* the page UFFDIO_COPY stopped at is present */
    }
    int w = wake_range(d, addr, len);
    return r ? r : w;
}

#define STAGED_RUN_MAX (1024 * TP)   /* bytes per placement of staged pages at the end */

/* The stream has ended (or the destination closes): every page still staged is placed, in runs,
 * and staging is off. 0 or the first -errno (the pages it could not place stay staged). */
int pc_dest_place_staged(struct pc_dest *d)
{
    int err = 0;
    __atomic_store_n(&d->staging, 0, __ATOMIC_RELEASE);
    for (int bi = 0; bi < d->nblocks; bi++) {
        struct pc_dest_block *b = &d->blocks[bi];
        if (!b->stage)
            continue;
        uint64_t npages = b->length / TP, hp = b->page_size / TP;
        int left = 0;
        for (uint64_t p = 0; p < npages;) {
            if (!(p & 63) && !__atomic_load_n(&b->staged[p >> 6], __ATOMIC_ACQUIRE)) {
                p += 64;
                continue;
            }
            if (!bit_test(b->staged, p)) {
                p += hp;
                continue;
            }
            int zero = b->page_size == TP && bit_test(b->staged_zero, p);
            uint64_t off = p << TP_SHIFT, room, addr = host_addr(d, bi, off, &room);
            uint64_t n = hp;
            while (p + n < npages && (n + hp) * TP <= room && n * TP < STAGED_RUN_MAX && bit_test(b->staged, p + n) &&
                   (b->page_size == TP && bit_test(b->staged_zero, p + n)) == zero)
                n += hp;
            int r = addr ? place_staged_run(d, b, off, addr, zero, n * TP) : 0;
            if (r) {
                left = 1;
                if (!err)
                    err = r;
            } else {
                for (uint64_t q = p; q < p + n; q++) {
                    bit_clear(b->staged, q);
                    bit_clear(b->staged_zero, q);
                }
            }
            p += n;
        }
        if (!left) {
            /* give the copies' memory back (under the lock: a fault thread may be copying from a
             * page it saw staged just before its bit was cleared) */
            pthread_mutex_lock(&d->stage_lock);
            madvise(b->stage, b->length, MADV_DONTNEED);
            pthread_mutex_unlock(&d->stage_lock);
        }
    }
    return err;
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
    int staging = b->stage && __atomic_load_n(&d->staging, __ATOMIC_ACQUIRE);
    while (o < end) {
        int have = bit_test(b->received, o >> TP_SHIFT);
        if (have && !overwrite_ok) {
            /* received already (placed, staged, or dropped by the program since RUN) */
            __atomic_fetch_add(&d->st.skipped_pages, b->page_size / TP, __ATOMIC_RELAXED);
            /* requested, then staged or dropped by the program before it came: the faulting
             * thread still waits; it gets the staged copy, or the zeros it dropped */
            uint64_t room, addr = host_addr(d, block, o, &room);
            uint64_t t0;
            if (inflight_take(d, key_of(block, o), &t0, NULL) && addr)
                serve_received(d, block, o, addr);
            o += b->page_size;
            continue;
        }
        /* a run of pages all missing, or (before RUN) all present; with staging, missing ones
         * split into asked for (placed) and not (staged), present ones into placed and staged */
        uint64_t room;
        uint64_t addr = host_addr(d, block, o, &room);
        if (!addr) {   /* a hole no region maps: nothing to place */
            account(d, block, o, b->page_size, 0, 0);
            o += b->page_size;
            continue;
        }
        if (__atomic_load_n(&d->test_race_once, __ATOMIC_RELAXED) && !overwrite_ok &&
            __atomic_exchange_n(&d->test_race_once, 0, __ATOMIC_RELAXED))
            place(d, block, o, data ? data + (o - offset) : NULL, b->page_size);   /* "the other channel" */
        /* The run starts with page o as `have` says, even if another channel
         * placed it since (UFFDIO_COPY then says EEXIST, handled page by
         * page): re-reading its bit here could end the run before it began,
         * and a zero-length UFFDIO_COPY is EINVAL (validate_range,
         * fs/userfaultfd.c). */
        int held = staging && (have ? bit_test(b->staged, o >> TP_SHIFT) : !bit_test(b->requested, o >> TP_SHIFT));
        uint64_t run = b->page_size;
        while (o + run < end && run < room && bit_test(b->received, (o + run) >> TP_SHIFT) == have &&
               (!staging || (have ? bit_test(b->staged, (o + run) >> TP_SHIFT)
                                  : !bit_test(b->requested, (o + run) >> TP_SHIFT)) == held))
            run += b->page_size;
        const uint8_t *src = data ? data + (o - offset) : NULL;
        int r = 0;
        if (have && held) {
            restage_run(d, block, o, src, run);
        } else if (have) {
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
        } else if (held) {
            stage_run(d, block, o, src, run);
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
            if (b->staged) {   /* discarded: its staged copy is stale (the source sends it again) */
                bit_clear(b->staged, o >> TP_SHIFT);
                bit_clear(b->staged_zero, o >> TP_SHIFT);
            }
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
