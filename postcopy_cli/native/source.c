/* The source's request server: reads page requests from the return path and
 * answers each at once on the preempt channel, with the GIL released. It
 * takes only well-formed MIG_RP_MSG_REQ_PAGES_ID / REQ_PAGES (QEMU's
 * layouts: be16 type, be16 len, be64 start, be32 len[, u8 n, name]); any
 * other message, or one it would refuse, goes back to the codec in Python,
 * which decodes it or names exactly what is wrong. */
#include "source.h"
#include "pagesize.h"
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>

#define TP PC_TARGET_PAGE_SIZE
#define READBUF (2u << 20)
#define RP_REQ_PAGES_ID 3
#define RP_REQ_PAGES 4

struct pc_src *pc_src_new(int rp_fd, int out_fd, int quit_fd, int pid)
{
    struct pc_src *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->readbuf = aligned_alloc(4096, READBUF);
    if (!s->readbuf) {
        free(s);
        return NULL;
    }
    s->rp_fd = rp_fd;
    s->out_fd = out_fd;
    s->quit_fd = quit_fd;
    s->pid = pid;
    s->last_block = -1;
    s->named = -1;
    return s;
}

void pc_src_free(struct pc_src *s)
{
    if (!s)
        return;
    free(s->segs);
    free(s->readbuf);
    free(s);
}

int pc_src_add_block(struct pc_src *s, const char *name, uint64_t length, uint64_t page_size, const uint8_t *base,
                     uint8_t *to_send, uint8_t *sent)
{
    size_t n = strlen(name);
    if (s->nblocks >= PC_SRC_MAX_BLOCKS || n == 0 || n > 255 || page_size < TP || length % page_size)
        return -EINVAL;
    struct pc_src_block *b = &s->blocks[s->nblocks];
    b->base = base;
    b->length = length;
    b->page_size = page_size;
    b->to_send = to_send;
    b->sent = sent;
    b->name_len = (uint8_t)n;
    memcpy(b->name, name, n);
    b->name[n] = 0;
    return s->nblocks++;
}

int pc_src_add_segment(struct pc_src *s, int block, uint64_t offset, uint64_t addr, uint64_t size)
{
    struct pc_src_seg *g = realloc(s->segs, (s->nsegs + 1) * sizeof *g);
    if (!g)
        return -ENOMEM;
    s->segs = g;
    g[s->nsegs++] = (struct pc_src_seg){ block, offset, addr, size };
    return 0;
}

static uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t be32(const uint8_t *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }
static uint64_t be64(const uint8_t *p) { return (uint64_t)be32(p) << 32 | be32(p + 4); }

/* the block's bytes [off, off+len) in our memory: the block's own mapping,
 * or read from the program into readbuf; NULL on failure (errno set) */
static const uint8_t *block_bytes(struct pc_src *s, int block, uint64_t off, uint64_t len)
{
    const struct pc_src_block *b = &s->blocks[block];
    if (b->base)
        return b->base + off;
    for (uint64_t done = 0; done < len;) {
        const struct pc_src_seg *g = NULL;
        for (int i = 0; i < s->nsegs; i++)
            if (s->segs[i].block == block && off + done >= s->segs[i].offset &&
                off + done < s->segs[i].offset + s->segs[i].size)
                g = &s->segs[i];
        if (!g) {   /* a hole no region maps: zeros */
            memset(s->readbuf + done, 0, TP);
            done += TP;
            continue;
        }
        uint64_t room = g->offset + g->size - (off + done), want = len - done < room ? len - done : room;
        int64_t n = pc_proc_read(s->pid, g->addr + (off + done - g->offset), s->readbuf + done, want);
        if (n < (int64_t)want) {
            errno = n < 0 ? (int)-n : EIO;
            return NULL;
        }
        done += want;
    }
    return s->readbuf;
}

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ULL + (uint64_t)t.tv_nsec;
}

double pc_cap_ahead(const struct pc_cap *cap, uint64_t bytes, uint64_t now_ns)
{
    if (cap->max_bandwidth <= 0)
        return 0;
    double ahead = (double)bytes / cap->max_bandwidth - (double)(int64_t)(now_ns - cap->t0_ns) / 1e9;
    return ahead > 0 ? ahead : 0;
}

/* --max-bandwidth covers requested pages too, but they come first: their
 * bytes count against the cap, so the background thread (which counts both)
 * slows down to make room; a request itself waits only when requests alone
 * exceed the cap */
static void within_cap(struct pc_src *s)
{
    if (!s->cap)
        return;
    double ahead = pc_cap_ahead(s->cap, __atomic_load_n(&s->st.bytes, __ATOMIC_RELAXED), now_ns());
    if (ahead > 0) {
        struct timespec t = { (time_t)ahead, (long)((ahead - (double)(time_t)ahead) * 1e9) };
        nanosleep(&t, NULL);
    }
}

/* answer one request: returns 0 or -errno */
static int answer(struct pc_src *s, int block, uint64_t start, uint64_t len)
{
    struct pc_src_block *b = &s->blocks[block];
    uint64_t first = start / TP, n = len / TP, pending = 0;
    for (uint64_t i = 0; i < n; i++)
        pending |= __atomic_exchange_n(&b->to_send[first + i], 0, __ATOMIC_ACQ_REL);
    if (b->sent)
        memset(b->sent + first, 1, n);
    __atomic_fetch_add(pending ? &s->st.requested_pages : &s->st.resent_pages, n, __ATOMIC_RELAXED);
    within_cap(s);
    for (uint64_t done = 0; done < len;) {
        uint64_t chunk = len - done < READBUF ? len - done : READBUF;
        const uint8_t *data = block_bytes(s, block, start + done, chunk);
        if (!data)
            return -errno;
        uint64_t zeros = 0;
        int64_t w = pc_src_send_pages(s->out_fd, data, start + done, chunk / TP,
                                      s->named == block ? NULL : b->name, &zeros);
        if (w < 0)
            return (int)w;
        s->named = block;
        __atomic_fetch_add(&s->st.bytes, (uint64_t)w, __ATOMIC_RELAXED);
        if (pending)
            __atomic_fetch_add(&s->st.zero_pages, zeros, __ATOMIC_RELAXED);
        done += chunk;
    }
    return 0;
}

/* parse and answer the whole requests at the front of rbuf; returns
 * PC_SERVE_CODEC when the next message is not one we take, else 0 or -errno */
static int drain(struct pc_src *s)
{
    uint32_t pos = 0;
    int r = 0;
    while (s->rlen - pos >= 4) {
        const uint8_t *m = s->rbuf + pos;
        uint16_t type = be16(m), len = be16(m + 2);
        if (type != RP_REQ_PAGES_ID && type != RP_REQ_PAGES) {
            r = PC_SERVE_CODEC;
            break;
        }
        if (s->rlen - pos < 4u + len)
            break;   /* partial: wait for the rest */
        int block = s->last_block;
        if (type == RP_REQ_PAGES_ID) {
            block = -1;
            if (len >= 14 && m[16] == len - 13)
                for (int i = 0; i < s->nblocks; i++)
                    if (s->blocks[i].name_len == m[16] && !memcmp(s->blocks[i].name, m + 17, m[16]))
                        block = i;
        } else if (len != 12) {
            block = -1;
        }
        if (block < 0) {
            r = PC_SERVE_CODEC;
            break;
        }
        const struct pc_src_block *b = &s->blocks[block];
        uint64_t start = be64(m + 4), rlen = be32(m + 12);
        if (start % b->page_size || rlen == 0 || rlen % b->page_size || start > b->length ||
            rlen > b->length - start) {
            r = PC_SERVE_CODEC;   /* the codec names what is wrong */
            break;
        }
        s->last_block = block;
        __atomic_fetch_add(&s->st.requests, 1, __ATOMIC_RELAXED);
        int e = answer(s, block, start, rlen);
        pos += 4u + len;
        if (e) {
            r = e;
            break;
        }
    }
    memmove(s->rbuf, s->rbuf + pos, s->rlen - pos);
    s->rlen -= pos;
    s->consumed += pos;
    return r;
}

int pc_src_serve(struct pc_src *s)
{
    for (;;) {
        int r = s->need_more ? 0 : drain(s);
        if (r)
            return r;
        struct pollfd p[2] = { { s->rp_fd, POLLIN, 0 }, { s->quit_fd, POLLIN, 0 } };
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (p[1].revents)
            return PC_SERVE_QUIT;
        if (s->rlen == sizeof s->rbuf)
            return PC_SERVE_CODEC;   /* a message longer than any request */
        ssize_t n = recv(s->rp_fd, s->rbuf + s->rlen, sizeof s->rbuf - s->rlen, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            return -errno;
        }
        if (n == 0)
            return PC_SERVE_EOF;
        s->rlen += (uint32_t)n;
        s->need_more = 0;
    }
}
