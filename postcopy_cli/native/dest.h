#ifndef POSTCOPY_DEST_H
#define POSTCOPY_DEST_H
#include "compat.h"
#include "hop_trace.h"
#include <pthread.h>

#define PC_HIST_BUCKETS 32
#define PC_MAX_BLOCKS 256

/* the destination's phase (codec.states.PostcopyState, in order); set only by pc_dest_set_phase */
enum pc_dest_phase {
    PC_PHASE_NONE, PC_PHASE_ADVISE, PC_PHASE_DISCARD, PC_PHASE_LISTENING, PC_PHASE_RUNNING, PC_PHASE_END,
    PC_PHASE_PAUSED,
};

struct pc_dest_block {
    uint64_t length;      /* bytes */
    uint64_t page_size;   /* host page size of the block */
    uint64_t *received;   /* one bit per 4096-byte target page */
    uint64_t *requested;  /* one bit per 4096-byte target page */
    /* --record-workset: pages that arrived unrequested are held here, not placed, until the program
     * touches them (its fault is the record's) or the stream ends (NULL: placed as they come) */
    uint8_t *stage;           /* anonymous MAP_NORESERVE mapping, the block's length */
    uint64_t *staged;         /* one bit per target page: its content is in stage (or zero), not placed */
    uint64_t *staged_zero;    /* ... and it is a zero page (4 KiB blocks: UFFDIO_ZEROPAGE) */
    uint8_t name_len;
    char name[256];
};

/* one mapped piece of a block: host [addr, addr+size) is block offset [offset, ...) */
struct pc_dest_seg {
    uint64_t addr;
    uint64_t size;
    uint64_t offset;
    int block;
};

struct pc_dest_stats {
    uint64_t faults;            /* pagefault messages read */
    uint64_t requests;          /* page requests sent to the source */
    uint64_t duplicate_faults;  /* faults on pages already requested */
    uint64_t late_faults;       /* faults on pages already placed (woken) */
    uint64_t demand_pages;      /* requested pages placed */
    uint64_t background_pages;  /* unrequested pages placed after RUN */
    uint64_t precopy_pages;     /* unrequested pages placed before RUN (first copies) */
    uint64_t zero_pages;
    uint64_t skipped_pages;     /* arrived but already present */
    uint64_t overwritten_pages; /* sent again in pre-copy: overwritten before RUN */
    uint64_t removed_pages;     /* dropped by the program (UFFD_EVENT_REMOVE) */
    uint64_t events_other;      /* fork/remap/unmap */
    uint64_t unknown_faults;    /* fault outside every handed-over region */
    uint64_t blocktime_ns;      /* sum over demand requests of fault read -> placed */
    uint64_t latency_samples;
    uint64_t hist[PC_HIST_BUCKETS]; /* bucket i: latency < 2^i us (i=0: < 1us) */
    uint64_t received_pages;    /* target pages marked received */
    uint64_t request_send_failures; /* page requests the broken return path did not take */
    uint64_t rerequests;        /* requests sent again on resumed streams */
    uint64_t staged_pages;      /* target pages held back in staging (--record-workset) */
    uint64_t staged_faults;     /* faults served from staging, without a request */
    int64_t first_error;        /* first errno the fault thread met (0: none) */
};

/* the working-set record: one entry per page at its first request, in order */
struct pc_ws_entry {
    uint64_t page;    /* block << 56 | target page of the host page's start */
    uint64_t t_ns;    /* CLOCK_MONOTONIC when the fault was read */
};

struct pc_inflight {
    uint64_t key;     /* (block << 48 | target page) + 1; 0 = empty */
    uint64_t t_ns;
};

struct pc_dest {
    int uffd;
    int quit_fd;          /* eventfd: written to stop the fault thread */
    int rp_fd;            /* return path socket; -1 until the source connects */
    int requests_enabled; /* from LISTENING on (under state_lock) */
    int last_rp_block;    /* block named by the last request (-1: none) */
    pthread_mutex_t rp_lock;
    pthread_mutex_t state_lock;
    int nblocks;
    struct pc_dest_block blocks[PC_MAX_BLOCKS];
    int nsegs;
    struct pc_dest_seg *segs;   /* sorted by addr */
    /* faults read before requests were enabled: (block, byte offset) */
    uint64_t *pending;
    size_t npending, cap_pending;
    struct pc_inflight *inflight;
    size_t inflight_cap;        /* power of two */
    struct pc_dest_stats st;
    uint64_t total_pages;
    int pid;                    /* attached program (process_vm_writev before RUN), 0 = own memory */
    int phase;                  /* enum pc_dest_phase */
    /* derived from the phase by pc_dest_set_phase, for the hot paths: */
    int overwrite_ok;           /* before RUNNING: a present page may be overwritten */
    int registered;             /* 0: own memory before LISTENING, not registered yet -> plain memcpy */
    int discarding;             /* the program is dropping discarded ranges itself */
    uint64_t test_place_delay_ns; /* tests only: pause between placing pages and accounting for them */
    int test_race_once;           /* tests only: the next run after RUN has its first page placed by "another
                                   * channel" between reading its bit and placing the run (a requested page may
                                   * come on the preempt channel before the main stream's RUN is read: before
                                   * RUN a present page is overwritten, not skipped) */
    /* --record-workset (under state_lock): first requests, in order; recording stops if it cannot grow */
    int staging;          /* unrequested pages go to the blocks' stage (read by the placement hot path) */
    pthread_mutex_t stage_lock;   /* a staged page's content and bits while it is placed or rewritten */
    int ws_recording;
    int ws_truncated;
    struct pc_ws_entry *ws;
    size_t nws, cap_ws;
    /* the hop trace (NULL: off): one entry per page request, its id kept in inflight_hop[] at the
     * request's slot of the in-flight table */
    struct pc_hop_trace *hop;
    uint64_t *inflight_hop;
};

struct pc_dest *pc_dest_new(int uffd, int quit_fd, int pid);
void pc_dest_free(struct pc_dest *d);
int pc_dest_add_block(struct pc_dest *d, const char *name, uint64_t length, uint64_t page_size);
int pc_dest_add_segment(struct pc_dest *d, int block, uint64_t offset, uint64_t addr, uint64_t size);
int pc_dest_set_phase(struct pc_dest *d, int phase);
void pc_dest_set_quit_fd(struct pc_dest *d, int quit_fd);
void pc_dest_set_discarding(struct pc_dest *d, int discarding);
void pc_dest_set_test_place_delay(struct pc_dest *d, uint64_t ns);
void pc_dest_set_test_place_race(struct pc_dest *d);
void pc_dest_set_return_path(struct pc_dest *d, int rp_fd);
int pc_dest_rp_send(struct pc_dest *d, const uint8_t *buf, size_t len);
int pc_dest_fault_loop(struct pc_dest *d);
int pc_dest_place(struct pc_dest *d, int block, uint64_t offset, const uint8_t *data, uint64_t len);
int pc_dest_place_zero(struct pc_dest *d, int block, uint64_t offset, uint64_t len);
void pc_dest_mark(struct pc_dest *d, int block, uint64_t offset, uint64_t len, int received);
int pc_dest_test(struct pc_dest *d, int block, uint64_t offset);
uint64_t pc_dest_count_received(struct pc_dest *d, int block);
void pc_dest_bitmap_le(struct pc_dest *d, int block, uint8_t *out, size_t out_len);
void pc_dest_get_stats(struct pc_dest *d, struct pc_dest_stats *out);
int pc_dest_record_workset(struct pc_dest *d, int on);
int pc_dest_place_staged(struct pc_dest *d);
int64_t pc_dest_workset_read(struct pc_dest *d, uint64_t *pages, uint64_t *t_ns, size_t cap, int *truncated);
int pc_dest_hop_trace(struct pc_dest *d, uint64_t capacity);
uint64_t pc_dest_hop_read(struct pc_dest *d, struct pc_hop_entry *out, uint64_t cap, uint64_t *claimed);
#endif
