/* The reference "guest" (QEMU tests/migration-test's a-b loop, rebuilt) and a
 * page toucher for restore tests and benchmarks.
 *
 * Everything here touches memory that may be registered with userfaultfd.
 * It runs in C called through cffi API mode, which releases the GIL, so a
 * thread blocked on a missing page never blocks the Python thread that serves
 * or controls it.
 */
#include "compat.h"
#include "workload.h"
#include "pagesize.h"

#include <limits.h>
#include <linux/futex.h>
#include <stdlib.h>
#include <time.h>

#define LOAD32(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE32(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

static long futex(uint32_t *word, int op, uint32_t val, const struct timespec *ts)
{
    return syscall(SYS_futex, word, op, val, ts, NULL, 0);
}

static void futex_wake_all(uint32_t *word)
{
    futex(word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Wait until *word != bad (timeout_ms < 0: forever). 0 or -ETIMEDOUT. */
static int wait_while(uint32_t *word, uint32_t bad, int timeout_ms)
{
    double deadline = timeout_ms < 0 ? 0 : now_s() + timeout_ms / 1000.0;
    while (LOAD32(word) == bad) {
        struct timespec ts, *tsp = NULL;
        if (timeout_ms >= 0) {
            double left = deadline - now_s();
            if (left <= 0)
                return -ETIMEDOUT;
            ts.tv_sec = (time_t)left;
            ts.tv_nsec = (long)((left - ts.tv_sec) * 1e9);
            tsp = &ts;
        }
        futex(word, FUTEX_WAIT_PRIVATE, bad, tsp);
    }
    return 0;
}

/* ---- the loop ----------------------------------------------------------- */

static void save_state(volatile struct pc_workload_state *st, uint64_t passes, uint64_t pos)
{
    st->passes = passes;
    st->position = pos;
}

int pc_workload_loop(uint8_t *ram, size_t size, size_t step, int fresh, struct pc_workload_ctl *ctl)
{
    volatile struct pc_workload_state *st = (volatile struct pc_workload_state *)ram;
    volatile uint8_t *data = ram;
    uint64_t passes, pos;

    if (size < 2 * PC_TARGET_PAGE_SIZE || step == 0 || step > size - PC_TARGET_PAGE_SIZE) {
        STORE32(&ctl->started, 2);
        futex_wake_all(&ctl->started);
        return -EINVAL;
    }
    if (fresh) {
        st->magic = PC_WORKLOAD_MAGIC;
        st->step = step;
        save_state(st, 0, PC_TARGET_PAGE_SIZE);
    } else if (st->magic != PC_WORKLOAD_MAGIC || st->step != step || st->position < PC_TARGET_PAGE_SIZE ||
               st->position >= size || (st->position - PC_TARGET_PAGE_SIZE) % step) {
        /* an incoming start continues from the state page; it must be ours */
        STORE32(&ctl->started, 2);
        futex_wake_all(&ctl->started);
        return -EINVAL;
    }
    passes = st->passes;
    pos = st->position;
    __atomic_store_n(&ctl->passes, passes, __ATOMIC_RELAXED);
    __atomic_store_n(&ctl->start_passes, passes, __ATOMIC_RELAXED);
    __atomic_store_n(&ctl->steps, 0, __ATOMIC_RELAXED);
    STORE32(&ctl->started, 1);
    futex_wake_all(&ctl->started);

    for (uint64_t steps = 1;; steps++) {
        data[pos]++;
        pos += step;
        if (pos >= size) {
            pos = PC_TARGET_PAGE_SIZE;
            passes++;
            __atomic_store_n(&ctl->passes, passes, __ATOMIC_RELAXED);
        }
        /* The state page is written on every step: the loop's whole state is
         * in RAM at any instant, so a migration needs nothing else. */
        save_state(st, passes, pos);
        __atomic_store_n(&ctl->steps, steps, __ATOMIC_RELAXED);

        if (__builtin_expect(__atomic_load_n(&ctl->pause_req, __ATOMIC_RELAXED) |
                             __atomic_load_n(&ctl->stop_req, __ATOMIC_RELAXED), 0)) {
            if (LOAD32(&ctl->stop_req))
                return 0;
            if (LOAD32(&ctl->pause_req)) {
                __atomic_thread_fence(__ATOMIC_SEQ_CST);
                STORE32(&ctl->paused, 1);
                futex_wake_all(&ctl->paused);
                while (LOAD32(&ctl->pause_req) && !LOAD32(&ctl->stop_req))
                    futex(&ctl->pause_req, FUTEX_WAIT_PRIVATE, 1, NULL);
                STORE32(&ctl->paused, 0);
                futex_wake_all(&ctl->paused);
                if (LOAD32(&ctl->stop_req))
                    return 0;
            }
        }
    }
}

int pc_workload_pause(struct pc_workload_ctl *ctl, int timeout_ms)
{
    STORE32(&ctl->pause_req, 1);
    return wait_while(&ctl->paused, 0, timeout_ms);
}

void pc_workload_resume(struct pc_workload_ctl *ctl)
{
    STORE32(&ctl->pause_req, 0);
    futex_wake_all(&ctl->pause_req);
}

void pc_workload_stop(struct pc_workload_ctl *ctl)
{
    STORE32(&ctl->stop_req, 1);
    futex_wake_all(&ctl->pause_req);
}

int pc_workload_wait_started(struct pc_workload_ctl *ctl, int timeout_ms)
{
    int r = wait_while(&ctl->started, 0, timeout_ms);
    if (r)
        return r;
    return LOAD32(&ctl->started) == 1 ? 0 : -EINVAL;
}

uint64_t pc_workload_load64(const uint64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

/* QEMU's check_guests_ram(): in address order the data bytes step down by
 * one (mod 256) at most once - where the loop was when it stopped. */
int64_t pc_workload_check(const uint8_t *ram, size_t size, size_t step)
{
    const volatile uint8_t *data = ram;
    int edge = 0;
    uint8_t last;

    if (size < 2 * PC_TARGET_PAGE_SIZE || step == 0)
        return 1;
    last = data[PC_TARGET_PAGE_SIZE];
    for (size_t off = PC_TARGET_PAGE_SIZE + step; off < size; off += step) {
        uint8_t b = data[off];
        if (b == last)
            continue;
        if ((uint8_t)(b + 1) == last && !edge) {
            edge = 1;
            last = b;
            continue;
        }
        return 1 + (int64_t)(off / PC_TARGET_PAGE_SIZE);
    }
    return 0;
}

/* ---- the toucher -------------------------------------------------------- */

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static uint64_t ns_between(const struct timespec *a, const struct timespec *b)
{
    return (uint64_t)(b->tv_sec - a->tv_sec) * 1000000000ULL + (uint64_t)b->tv_nsec - (uint64_t)a->tv_nsec;
}

static const uint8_t zero_page[PC_TARGET_PAGE_SIZE];

/* Does page i of ram equal the expected image (zeros past its end)? */
static int page_matches(const uint8_t *page, size_t i, const uint8_t *expected, size_t expected_len)
{
    size_t off = i * PC_TARGET_PAGE_SIZE;
    size_t have = off >= expected_len ? 0 : expected_len - off;
    if (have > PC_TARGET_PAGE_SIZE)
        have = PC_TARGET_PAGE_SIZE;
    if (have && memcmp(page, expected + off, have))
        return 0;
    if (have < PC_TARGET_PAGE_SIZE && memcmp(page + have, zero_page, PC_TARGET_PAGE_SIZE - have))
        return 0;
    return 1;
}

/* Touch pages[0..npages) of ram in that order (each < size / 4096), timing the
 * first access of each and comparing each with the expected image. */
int pc_touch_pages(const uint8_t *ram, size_t size, const uint8_t *expected, size_t expected_len,
                   const uint64_t *pages, size_t npages, struct pc_touch_result *out)
{
    size_t n = size / PC_TARGET_PAGE_SIZE;
    uint64_t *lat;
    struct timespec t0, t1, a, b;

    memset(out, 0, sizeof(*out));
    out->first_mismatch = -1;
    if (n == 0 || size % PC_TARGET_PAGE_SIZE || npages == 0)
        return -EINVAL;
    for (size_t k = 0; k < npages; k++)
        if (pages[k] >= n)
            return -EINVAL;
    lat = malloc(npages * sizeof(*lat));
    if (!lat)
        return -ENOMEM;

    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (size_t k = 0; k < npages; k++) {
        size_t i = pages[k];
        const volatile uint8_t *page = ram + i * PC_TARGET_PAGE_SIZE;
        /* the first access is the one that may fault; time only it */
        clock_gettime(CLOCK_MONOTONIC, &a);
        (void)page[0];
        clock_gettime(CLOCK_MONOTONIC, &b);
        lat[k] = ns_between(&a, &b);
        if (expected && !page_matches((const uint8_t *)page, i, expected, expected_len)) {
            if (out->first_mismatch < 0 || (int64_t)i < out->first_mismatch)
                out->first_mismatch = (int64_t)i;
            out->mismatches++;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);

    for (size_t k = 0; k < npages; k++) {
        /* bucket b holds latencies below 2^b microseconds (the last: the rest) */
        uint64_t us = lat[k] / 1000;
        int bucket = 0;
        while (bucket < PC_TOUCH_BUCKETS - 1 && us >= (1ULL << bucket))
            bucket++;
        out->histogram[bucket]++;
    }
    qsort(lat, npages, sizeof(*lat), cmp_u64);
    out->pages = npages;
    out->seconds = ns_between(&t0, &t1) * 1e-9;
    out->p50_us = lat[(npages - 1) / 2] / 1000.0;
    out->p99_us = lat[(size_t)((npages - 1) * 0.99)] / 1000.0;
    out->max_us = lat[npages - 1] / 1000.0;
    free(lat);
    return 0;
}

int pc_touch(const uint8_t *ram, size_t size, const uint8_t *expected, size_t expected_len,
             int random_order, uint64_t seed, struct pc_touch_result *out)
{
    size_t n = size / PC_TARGET_PAGE_SIZE;
    uint64_t *order;

    memset(out, 0, sizeof(*out));
    out->first_mismatch = -1;
    if (n == 0 || size % PC_TARGET_PAGE_SIZE)
        return -EINVAL;
    order = malloc(n * sizeof(*order));
    if (!order)
        return -ENOMEM;
    for (size_t i = 0; i < n; i++)
        order[i] = i;
    if (random_order) {
        uint64_t s = seed;
        for (size_t i = n - 1; i > 0; i--) { /* Fisher-Yates */
            size_t j = splitmix64(&s) % (i + 1);
            uint64_t t = order[i];
            order[i] = order[j];
            order[j] = t;
        }
    }
    int r = pc_touch_pages(ram, size, expected, expected_len, order, n, out);
    free(order);
    return r;
}
