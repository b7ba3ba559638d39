/* Writing whole buffers to a socket from the native threads, and the clock
 * they measure with. One policy for every writer: EINTR retries; EAGAIN
 * on a non-blocking socket (Python may have made it so) waits up to
 * PC_IO_STALL_MS for room, then gives up with -ETIMEDOUT; EAGAIN on a
 * blocking socket means its SO_SNDTIMEO expired: -ETIMEDOUT at once. */
#ifndef POSTCOPY_IO_H
#define POSTCOPY_IO_H
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>

#define PC_IO_STALL_MS 30000

/* A connection's fd may carry TLS records (tls_record.h): these four take
 * plaintext either way. */

/* send(2) all of buf (MSG_NOSIGNAL: a closed peer is -EPIPE); 0 or -errno */
int pc_send_all(int fd, const uint8_t *buf, size_t len);

/* writev(2) all of iov[0, n) (iov may be consumed); bytes written or -errno */
int64_t pc_writev_all(int fd, struct iovec *iov, int n);

/* recv(2) as the socket's; on a TLS connection it never waits (-1 with
 * EAGAIN until a whole record is in) */
ssize_t pc_recv(int fd, void *buf, size_t len, int flags);

/* 1 if pc_recv has bytes for fd that poll(2) on it would not report */
int pc_rx_buffered(int fd);

/* pc_send_all on the socket itself (the ciphertext of a TLS connection) */
int pc_raw_send_all(int fd, const uint8_t *buf, size_t len);

/* CLOCK_MONOTONIC in nanoseconds */
static inline uint64_t pc_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ULL + (uint64_t)t.tv_nsec;
}
#endif
