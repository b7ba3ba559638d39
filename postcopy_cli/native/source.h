#ifndef POSTCOPY_SOURCE_H
#define POSTCOPY_SOURCE_H
#include "compat.h"
#include "hop_trace.h"
#include "src_send.h"

#define PC_SRC_MAX_BLOCKS 256

struct pc_src_block {
    const uint8_t *base;  /* the block in our own memory (an image mapping), or NULL: read from pid */
    uint64_t length;
    uint64_t page_size;
    uint8_t *to_send;     /* one byte per target page, 1 = not sent yet (shared with Python) */
    uint8_t *sent;        /* NULL, or one byte per target page, 1 = sent at least once */
    uint8_t name_len;
    char name[256];
};

/* --max-bandwidth: the one cap on what a source sends, on both channels.
 * The owner (Python, source/bandwidth.py) sets it up; the request server
 * reads it through a pointer. */
struct pc_cap {
    double max_bandwidth; /* bytes/s (0: no cap) */
    uint64_t t0_ns;       /* CLOCK_MONOTONIC start of the accounting */
};

/* seconds by which `bytes` sent since t0 run ahead of the cap at now_ns (0: within it) */
double pc_cap_ahead(const struct pc_cap *cap, uint64_t bytes, uint64_t now_ns);

struct pc_src_seg {
    int block;
    uint64_t offset;
    uint64_t addr;
    uint64_t size;
};

struct pc_src_stats {
    uint64_t requests;
    uint64_t requested_pages;  /* sent because requested */
    uint64_t resent_pages;     /* requested though sent already (maybe still in flight) */
    uint64_t bytes;
    uint64_t zero_pages;       /* ZERO records among the requested pages (not the resent ones) */
};

struct pc_src {
    int rp_fd;            /* the return path: requests come here */
    int out_fd;           /* where requested pages go (the preempt channel) */
    int quit_fd;          /* eventfd: written to stop pc_src_serve */
    int pid;              /* the program whose memory is read (blocks without base) */
    int nblocks;
    struct pc_src_block blocks[PC_SRC_MAX_BLOCKS];
    int nsegs;
    struct pc_src_seg *segs;
    int last_block;       /* block of the last REQ_PAGES_ID (-1: none yet) */
    int named;            /* block named by the last record sent on out_fd (-1: none) */
    int need_more;        /* the codec needs more bytes before it can decode rbuf */
    uint8_t *readbuf;
    uint64_t consumed;    /* return-path bytes parsed here (the codec's stream offset) */
    const struct pc_cap *cap; /* NULL: no cap */
    uint32_t rlen;        /* unparsed bytes in rbuf */
    uint8_t rbuf[65536];
    struct pc_src_stats st;
    struct pc_hop_trace *hop;   /* the hop trace: one entry per request answered (NULL: off) */
};

#define PC_SERVE_QUIT 0
#define PC_SERVE_CODEC 1  /* a message for the codec: the unparsed bytes are in rbuf[0, rlen) */
#define PC_SERVE_EOF 2

struct pc_src *pc_src_new(int rp_fd, int out_fd, int quit_fd, int pid);
void pc_src_free(struct pc_src *s);
int pc_src_add_block(struct pc_src *s, const char *name, uint64_t length, uint64_t page_size, const uint8_t *base,
                     uint8_t *to_send, uint8_t *sent);
int pc_src_add_segment(struct pc_src *s, int block, uint64_t offset, uint64_t addr, uint64_t size);
int pc_src_serve(struct pc_src *s);
int pc_src_hop_trace(struct pc_src *s, uint64_t capacity);
uint64_t pc_src_hop_read(struct pc_src *s, struct pc_hop_entry *out, uint64_t cap, uint64_t *claimed);
#endif
