/* The reference workload: QEMU migration-test's guest loop and a page toucher. */
#ifndef POSTCOPY_WORKLOAD_H
#define POSTCOPY_WORKLOAD_H
#include <stddef.h>
#include <stdint.h>

#define PC_WORKLOAD_MAGIC 0x504357524b4c4431ULL /* "PCWRKLD1" */
#define PC_TOUCH_BUCKETS 32

struct pc_workload_ctl {
    uint32_t pause_req;
    uint32_t stop_req;
    uint32_t paused;
    uint32_t started;
    uint64_t passes;
    uint64_t start_passes;
    uint64_t steps;
};

struct pc_workload_state {
    uint64_t magic;
    uint64_t passes;
    uint64_t position;
    uint64_t step;
};

struct pc_touch_result {
    uint64_t pages;
    uint64_t mismatches;
    int64_t first_mismatch;
    double seconds;
    double p50_us;
    double p99_us;
    double max_us;
    uint64_t histogram[PC_TOUCH_BUCKETS];
};

/* Returns 0 when stopped, -EINVAL for a bad state page / arguments. */
int pc_workload_loop(uint8_t *ram, size_t size, size_t step, int fresh, struct pc_workload_ctl *ctl);
/* Ask for a pause and wait up to timeout_ms (<0: forever): 0 paused, -ETIMEDOUT. */
int pc_workload_pause(struct pc_workload_ctl *ctl, int timeout_ms);
void pc_workload_resume(struct pc_workload_ctl *ctl);
void pc_workload_stop(struct pc_workload_ctl *ctl);
int pc_workload_wait_started(struct pc_workload_ctl *ctl, int timeout_ms);
uint64_t pc_workload_load64(const uint64_t *p);
/* 0 when the data bytes pass QEMU's check, else 1 + index of the first bad page. */
int64_t pc_workload_check(const uint8_t *ram, size_t size, size_t step);
/* Touch every page; 0, or -errno (ENOMEM, EINVAL). */
int pc_touch(const uint8_t *ram, size_t size, const uint8_t *expected, size_t expected_len,
             int random_order, uint64_t seed, struct pc_touch_result *out);
/* Touch the given pages in that order; 0, or -errno (ENOMEM, EINVAL). */
int pc_touch_pages(const uint8_t *ram, size_t size, const uint8_t *expected, size_t expected_len,
                   const uint64_t *pages, size_t npages, struct pc_touch_result *out);
#endif
