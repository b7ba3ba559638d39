/* The source's sending half: target pages as RAM records (layouts in
 * wire.h), and reads of the program's memory. */
#include "src_send.h"
#include "io.h"
#include "pagesize.h"
#include "wire.h"
#include <sys/uio.h>

#define TP PC_TARGET_PAGE_SIZE

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
