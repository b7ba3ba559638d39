/* Writing whole buffers to a socket from the native threads, and the clock
 * they measure with. One policy for every writer: EINTR retries; EAGAIN
 * on a non-blocking socket (Python may have made it so) waits up to
 * PC_IO_STALL_MS for room, then gives up with -ETIMEDOUT; EAGAIN on a
 * blocking socket means its SO_SNDTIMEO expired: -ETIMEDOUT at once. */
#ifndef POSTCOPY_IO_H
#define POSTCOPY_IO_H
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>
#include <time.h>

#define PC_IO_STALL_MS 30000

/* send(2) all of buf (MSG_NOSIGNAL: a closed peer is -EPIPE); 0 or -errno */
int pc_send_all(int fd, const uint8_t *buf, size_t len);

/* writev(2) all of iov[0, n) (iov is consumed); bytes written or -errno */
int64_t pc_writev_all(int fd, struct iovec *iov, int n);

/* CLOCK_MONOTONIC in nanoseconds */
static inline uint64_t pc_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ULL + (uint64_t)t.tv_nsec;
}
#endif
