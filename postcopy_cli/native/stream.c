/* RAM-section fast paths: the bulk of a section, runs of PAGE|CONTINUE and
 * ZERO|CONTINUE records (layouts in wire.h). */
#include "stream.h"
#include "io.h"
#include "pagesize.h"
#include "wire.h"
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/uio.h>

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
#define FLUSH_PAGES() do { if (run_n) { r = pc_dest_place(d, block, run_off, staging, run_n * TP); \
        if (r) { out->error = r; out->error_offset = run_off; } run_n = 0; } } while (0)
#define FLUSH_ZEROS() do { if (zero_n) { r = pc_dest_place_zero(d, block, zero_off, zero_n * TP); \
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
            run_n++;
        } else {
            FLUSH_PAGES();
            if (zero_n && (off != zero_off + zero_n * TP || zero_n == RUN_MAX))
                FLUSH_ZEROS();
            if (out->error)
                break;
            if (!zero_n)
                zero_off = off;
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
        int pr = poll(p, 2, timeout_ms);
        if (pr < 0 && errno == EINTR)
            continue;
        if (pr == 0) {
            memset(out, 0, sizeof *out);
            r = -ETIMEDOUT;
            break;
        }
        if (p[1].revents) {
            memset(out, 0, sizeof *out);
            r = PC_PUMP_WAKE;
            break;
        }
        ssize_t n = recv(fd, buf + *end, cap - *end, 0);
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

static int page_is_zero(const uint8_t *p)
{
    const uint64_t *w = (const uint64_t *)p;
    for (size_t i = 0; i < TP / 8; i += 4)
        if (w[i] | w[i + 1] | w[i + 2] | w[i + 3])
            return 0;
    return 1;
}

int64_t pc_src_send_pages(int fd, const uint8_t *data, uint64_t offset, uint64_t npages,
                          const char *name, uint64_t *zero_pages)
{
    enum { BATCH = 256 };
    static const uint8_t zero_byte = 0;
    uint8_t hdr[BATCH][PC_WIRE_RAM_HEADER_MAX];
    size_t nl = name ? strlen(name) : 0;
    struct iovec iov[2 * BATCH];
    int64_t total = 0;
    *zero_pages = 0;
    for (uint64_t i = 0; i < npages;) {
        int n = 0;
        for (int k = 0; k < BATCH && i < npages; k++, i++) {
            const uint8_t *page = data + i * TP;
            int zero = page_is_zero(page);
            size_t hl = pc_wire_ram_header(hdr[k], offset + i * TP, zero ? PC_RAM_ZERO : PC_RAM_PAGE,
                                           i == 0 ? name : NULL, nl);
            iov[n].iov_base = hdr[k];
            iov[n++].iov_len = hl;
            if (zero) {
                iov[n].iov_base = (void *)&zero_byte;
                iov[n++].iov_len = 1;
                (*zero_pages)++;
            } else {
                iov[n].iov_base = (void *)page;
                iov[n++].iov_len = TP;
            }
        }
        int64_t w = pc_writev_all(fd, iov, n);
        if (w < 0)
            return w;
        total += w;
    }
    return total;
}

/* Read len bytes at addr of process pid into buf (process_vm_readv(2): the
 * pages are pinned and copied in batches, no per-page syscall). Returns
 * bytes read or -errno. */
int64_t pc_proc_read(int pid, uint64_t addr, uint8_t *buf, uint64_t len)
{
    uint64_t done = 0;
    while (done < len) {
        struct iovec l = { buf + done, len - done }, r = { (void *)(uintptr_t)(addr + done), len - done };
        ssize_t n = process_vm_readv(pid, &l, 1, &r, 1, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return done ? (int64_t)done : -errno;
        }
        if (n == 0)
            break;
        done += (uint64_t)n;
    }
    return (int64_t)done;
}
