#ifndef POSTCOPY_DEST_PUMP_H
#define POSTCOPY_DEST_PUMP_H
#include "compat.h"
#include "dest.h"

/* Fast paths for the bulk of a RAM section: runs of PAGE|CONTINUE and
 * ZERO|CONTINUE records (the codec in Python handles every other item). */
struct pc_ram_fast {
    uint64_t consumed;   /* bytes of whole records consumed */
    uint64_t records;
    int stop;            /* 0: ran out of data, 1: a record the fast path does not take */
    int error;           /* -errno from placement (0: none) */
    uint64_t error_offset;
};
void pc_dest_ram_fast(struct pc_dest *d, int block, const uint8_t *buf, uint64_t len, struct pc_ram_fast *out);
#define PC_PUMP_STOP 1
#define PC_PUMP_EOF 2
#define PC_PUMP_FAULT_THREAD 3
#define PC_PUMP_WAKE 4
int pc_dest_pump(struct pc_dest *d, int fd, int wake_fd, int block, uint8_t *buf, uint64_t cap, uint64_t *start,
                 uint64_t *end, int timeout_ms, struct pc_ram_fast *out);
#endif
