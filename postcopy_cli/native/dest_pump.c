/* The destination's RAM-section fast path: the bulk of a section, runs of
 * PAGE|CONTINUE and ZERO|CONTINUE records (layouts in wire.h). */
#include "dest_pump.h"
#include "io.h"
#include "pagesize.h"
#include "wire.h"
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>

#define TP PC_TARGET_PAGE_SIZE
#define RUN_MAX 256   /* pages per placement: UFFDIO_COPY of 64 KiB+ is ~14x faster per byte */

static __thread uint8_t *staging;

void pc_dest_ram_fast(struct pc_dest *d, int block, const uint8_t *buf, uint64_t len, struct pc_ram_fast *out)
{
    memset(out, 0, sizeof *out);
    if (!staging && !(staging = aligned_alloc(4096, RUN_MAX * TP))) {
        out->error = -ENOMEM;
        return;
    }
    uint64_t blen = d->blocks[block].length, pos = 0;
    uint64_t run_off = 0, run_n = 0;   /* PAGE run being assembled in staging */
    uint64_t zero_off = 0, zero_n = 0; /* ZERO run */
    int r = 0;
    /* the hop trace: when each record of the runs was parsed, for the requests they answer */
    int hop = __atomic_load_n(&d->hop, __ATOMIC_ACQUIRE) != NULL;
    uint64_t run_t[RUN_MAX], zero_t[RUN_MAX];
#define HOP_RX(off, n, t) do { if (hop) pc_hop_rx = (struct pc_hop_rx){ block, off, n, t }; } while (0)
#define FLUSH_PAGES() do { if (run_n) { HOP_RX(run_off, run_n, run_t); \
        r = pc_dest_place(d, block, run_off, staging, run_n * TP); HOP_RX(0, 0, NULL); \
        if (r) { out->error = r; out->error_offset = run_off; } run_n = 0; } } while (0)
#define FLUSH_ZEROS() do { if (zero_n) { HOP_RX(zero_off, zero_n, zero_t); \
        r = pc_dest_place_zero(d, block, zero_off, zero_n * TP); HOP_RX(0, 0, NULL); \
        if (r) { out->error = r; out->error_offset = zero_off; } zero_n = 0; } } while (0)
    while (!out->error) {
        uint64_t off;
        unsigned kind;
        int64_t n = pc_wire_ram_continue(buf + pos, len - pos, blen, &off, &kind);
        if (n == 0)
            break;
        if (n == PC_WIRE_CODEC) {
            out->stop = 1;
            break;
        }
        if (kind == PC_RAM_PAGE) {
            FLUSH_ZEROS();
            if (run_n && (off != run_off + run_n * TP || run_n == RUN_MAX))
                FLUSH_PAGES();
            if (out->error)
                break;
            if (!run_n)
                run_off = off;
            memcpy(staging + run_n * TP, buf + pos + 8, TP);
            if (hop)
                run_t[run_n] = pc_now_ns();
            run_n++;
        } else {
            FLUSH_PAGES();
            if (zero_n && (off != zero_off + zero_n * TP || zero_n == RUN_MAX))
                FLUSH_ZEROS();
            if (out->error)
                break;
            if (!zero_n)
                zero_off = off;
            if (hop)
                zero_t[zero_n] = pc_now_ns();
            zero_n++;
        }
        pos += (uint64_t)n;
        out->records++;
        out->consumed = pos;
    }
    if (!out->error)
        FLUSH_PAGES();
    if (!out->error)
        FLUSH_ZEROS();
#undef FLUSH_PAGES
#undef FLUSH_ZEROS
#undef HOP_RX
}

/* Receive on fd into buf and place the fast records as they come, all with
 * the GIL released, until something the fast path does not take.
 * buf[*start, *end) holds unconsumed bytes on entry and on return.
 * Returns PC_PUMP_STOP (a record or section for the codec at buf[*start]),
 * PC_PUMP_EOF (the peer closed), PC_PUMP_WAKE (wake_fd is readable; -1:
 * none), -ETIMEDOUT (nothing for timeout_ms), or -errno; out->consumed counts every byte consumed, out->error any placement
 * error (then the return is PC_PUMP_STOP). */
int pc_dest_pump(struct pc_dest *d, int fd, int wake_fd, int block, uint8_t *buf, uint64_t cap, uint64_t *start,
                 uint64_t *end, int timeout_ms, struct pc_ram_fast *out)
{
    struct pc_ram_fast step;
    uint64_t consumed = 0, records = 0;
    int r;
    for (;;) {
        if (*end > *start) {
            pc_dest_ram_fast(d, block, buf + *start, *end - *start, &step);
            *start += step.consumed;
            consumed += step.consumed;
            records += step.records;
            if (step.error || step.stop) {
                *out = step;
                r = PC_PUMP_STOP;
                break;
            }
        }
        if (__atomic_load_n(&d->st.first_error, __ATOMIC_ACQUIRE)) {
            memset(out, 0, sizeof *out);
            r = PC_PUMP_FAULT_THREAD;
            break;
        }
        if (*start == *end) {
            *start = *end = 0;
        } else if (cap - *end < 8 + TP + 256) {
            memmove(buf, buf + *start, *end - *start);
            *end -= *start;
            *start = 0;
        }
        struct pollfd p[2] = { { fd, POLLIN, 0 }, { wake_fd, POLLIN, 0 } };
        /* (bytes a TLS connection holds already are not seen by poll) */
        int pr = poll(p, 2, pc_rx_buffered(fd) ? 0 : timeout_ms);
        if (pr < 0 && errno == EINTR)
            continue;
        if (pr == 0 && !pc_rx_buffered(fd)) {
            memset(out, 0, sizeof *out);
            r = -ETIMEDOUT;
            break;
        }
        if (p[1].revents) {
            memset(out, 0, sizeof *out);
            r = PC_PUMP_WAKE;
            break;
        }
        ssize_t n = pc_recv(fd, buf + *end, cap - *end, 0);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            memset(out, 0, sizeof *out);
            r = -errno;
            break;
        }
        if (n == 0) {
            memset(out, 0, sizeof *out);
            r = PC_PUMP_EOF;
            break;
        }
        *end += (uint64_t)n;
    }
    out->consumed = consumed;
    out->records = records;
    return r;
}
