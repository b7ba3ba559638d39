#ifndef POSTCOPY_SRC_SEND_H
#define POSTCOPY_SRC_SEND_H
#include "compat.h"

/* Read len bytes at addr of process pid into buf (process_vm_readv(2)).
 * Returns bytes read or -errno. */
int64_t pc_proc_read(int pid, uint64_t addr, uint8_t *buf, uint64_t len);
/* Source: send `npages` target pages of block memory at `data` (block offset
 * `offset`) as RAM records, zero pages as ZERO records; the first record names
 * the block when `name` is non-NULL, the rest carry CONTINUE. Returns bytes
 * written or -errno; *zero_pages counts ZERO records. */
int64_t pc_src_send_pages(int fd, const uint8_t *data, uint64_t offset, uint64_t npages,
                          const char *name, uint64_t *zero_pages);
#endif
