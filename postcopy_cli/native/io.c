#include "compat.h"
#include "io.h"
#include "tls_record.h"
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>

/* after a failed write: 0 to try again, or -errno to give up */
static int write_failed(int fd)
{
    if (errno == EINTR)
        return 0;
    if (errno == EAGAIN) {
        /* a blocking socket returns EAGAIN only when its SO_SNDTIMEO expired
         * (socket(7)): the peer took nothing for that long */
        int flags = fcntl(fd, F_GETFL);
        if (flags >= 0 && !(flags & O_NONBLOCK))
            return -ETIMEDOUT;
        struct pollfd p = { fd, POLLOUT, 0 };
        return poll(&p, 1, PC_IO_STALL_MS) == 0 ? -ETIMEDOUT : 0;
    }
    return -errno;
}

int pc_raw_send_all(int fd, const uint8_t *buf, size_t len)
{
    while (len) {
        ssize_t w = send(fd, buf, len, MSG_NOSIGNAL);
        if (w < 0) {
            int r = write_failed(fd);
            if (r)
                return r;
            continue;
        }
        buf += w;
        len -= (size_t)w;
    }
    return 0;
}

static int64_t raw_writev_all(int fd, struct iovec *iov, int n)
{
    int64_t total = 0;
    while (n > 0) {
        ssize_t w = writev(fd, iov, n);
        if (w < 0) {
            int r = write_failed(fd);
            if (r)
                return r;
            continue;
        }
        total += w;
        while (n > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return total;
}

int pc_send_all(int fd, const uint8_t *buf, size_t len)
{
    struct pc_tls_rec *t = pc_tls_rec_get(fd);
    if (!t)
        return pc_raw_send_all(fd, buf, len);
    int r = pc_tls_rec_send(t, buf, len);
    pc_tls_rec_put(t);
    return r;
}

int64_t pc_writev_all(int fd, struct iovec *iov, int n)
{
    struct pc_tls_rec *t = pc_tls_rec_get(fd);
    if (!t)
        return raw_writev_all(fd, iov, n);
    int64_t r = pc_tls_rec_writev(t, iov, n);
    pc_tls_rec_put(t);
    return r;
}

ssize_t pc_recv(int fd, void *buf, size_t len, int flags)
{
    struct pc_tls_rec *t = pc_tls_rec_get(fd);
    if (!t)
        return recv(fd, buf, len, flags);
    int64_t r = pc_tls_rec_recv(t, buf, len, 0);
    pc_tls_rec_put(t);
    if (r < 0) {
        errno = (int)-r;
        return -1;
    }
    return (ssize_t)r;
}

int pc_rx_buffered(int fd)
{
    struct pc_tls_rec *t = pc_tls_rec_get(fd);
    if (!t)
        return 0;
    int b = pc_tls_rec_buffered(t);
    pc_tls_rec_put(t);
    return b;
}
