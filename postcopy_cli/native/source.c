/* The source's request server: reads page requests from the return path and
 * answers each at once on the preempt channel, with the GIL released. It
 * takes only well-formed MIG_RP_MSG_REQ_PAGES_ID / REQ_PAGES (layouts in
 * wire.h); any other message, or one it would refuse, goes back to the codec in Python,
 * which decodes it or names exactly what is wrong. */
#include "source.h"
#include "io.h"
#include "pagesize.h"
#include "wire.h"
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>

#define TP PC_TARGET_PAGE_SIZE
#define READBUF (2u << 20)

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
    free(s->hop);
    free(s);
}

/* The hop trace on, for up to capacity requests (before pc_src_serve runs). 0, -EBUSY, -ENOMEM. */
int pc_src_hop_trace(struct pc_src *s, uint64_t capacity)
{
    if (s->hop)
        return -EBUSY;
    s->hop = pc_hop_new(capacity);
    return s->hop ? 0 : -ENOMEM;
}

uint64_t pc_src_hop_read(struct pc_src *s, struct pc_hop_entry *out, uint64_t cap, uint64_t *claimed)
{
    return pc_hop_read(s->hop, out, cap, claimed);
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
    double ahead = pc_cap_ahead(s->cap, __atomic_load_n(&s->st.bytes, __ATOMIC_RELAXED), pc_now_ns());
    if (ahead > 0) {
        struct timespec t = { (time_t)ahead, (long)((ahead - (double)(time_t)ahead) * 1e9) };
        nanosleep(&t, NULL);
    }
}

/* answer one request, read (parsed) at t_read (0: not traced): returns 0 or -errno */
static int answer(struct pc_src *s, int block, uint64_t start, uint64_t len, uint64_t t_read)
{
    struct pc_src_block *b = &s->blocks[block];
    uint64_t first = start / TP, n = len / TP, pending = 0;
    uint64_t hop = t_read ? pc_hop_claim(s->hop, (uint32_t)block, start, t_read) : 0;
    for (uint64_t i = 0; i < n; i++)
        pending |= __atomic_exchange_n(&b->to_send[first + i], 0, __ATOMIC_ACQ_REL);
    if (hop && !pending)
        pc_hop_flag(s->hop, hop, PC_HOP_SENT_BEFORE);
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
        /* the hop trace: the page's bytes are handed to the socket now (before the write: on loopback
         * the destination may parse them before the write returns here) */
        if (hop && !done)
            pc_hop_time(s->hop, hop, 1, pc_now_ns());
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
    for (;;) {
        struct pc_wire_req q;
        int64_t n = pc_wire_req_decode(s->rbuf + pos, s->rlen - pos, &q);
        if (n == 0)
            break;   /* partial: wait for the rest */
        int block = -1;
        if (n > 0 && !q.name) {
            block = s->last_block;
        } else if (n > 0) {
            for (int i = 0; i < s->nblocks; i++)
                if (s->blocks[i].name_len == q.name_len && !memcmp(s->blocks[i].name, q.name, q.name_len))
                    block = i;
        }
        if (block < 0 || !pc_wire_req_fits(&q, s->blocks[block].page_size, s->blocks[block].length)) {
            r = PC_SERVE_CODEC;   /* the codec names what is wrong */
            break;
        }
        s->last_block = block;
        __atomic_fetch_add(&s->st.requests, 1, __ATOMIC_RELAXED);
        int e = answer(s, block, q.start, q.len, s->hop ? pc_now_ns() : 0);
        pos += (uint32_t)n;
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
        if (poll(p, 2, pc_rx_buffered(s->rp_fd) ? 0 : -1) < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (p[1].revents)
            return PC_SERVE_QUIT;
        if (s->rlen == sizeof s->rbuf)
            return PC_SERVE_CODEC;   /* a message longer than any request */
        ssize_t n = pc_recv(s->rp_fd, s->rbuf + s->rlen, sizeof s->rbuf - s->rlen, MSG_DONTWAIT);
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
