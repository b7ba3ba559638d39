/* TLS 1.3 records on a connection's own fd, after the OpenSSL handshake
 * (tls.c): the native threads and Python seal and open records themselves
 * (RFC 8446 section 5), so a TLS connection costs a cipher pass per byte and
 * no extra thread, wake-up or copy. The kernel here has no kernel TLS; this
 * is what it would do, in user space.
 *
 * A connection is found by its fd: pc_send_all, pc_writev_all and pc_recv
 * (io.h) take the record path for an fd registered here and the plain one
 * otherwise. One lock per direction: any number of writers (fault threads,
 * Python) and readers (the pump, Python) may share a connection; a record
 * goes out whole and in sequence. */
#ifndef POSTCOPY_TLS_RECORD_H
#define POSTCOPY_TLS_RECORD_H
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

struct pc_tls_rec;

/* the traffic secrets and state a finished handshake leaves (tls.c fills it) */
struct pc_tls_keys {
    uint16_t suite;             /* RFC 8446 B.4: 0x1301, 0x1302 or 0x1303 */
    size_t secret_len;
    uint8_t rx_secret[64], tx_secret[64];
    uint64_t rx_seq, tx_seq;    /* records already sealed/opened with them */
};

/* Register fd as a TLS 1.3 connection with these keys; pre[0, pre_len) is
 * ciphertext already read from it. 0, or -errno (-ENOTSUP: a suite or fd
 * this layer cannot take; the caller relays instead). */
int pc_tls_rec_attach(int fd, const struct pc_tls_keys *k, const uint8_t *pre, size_t pre_len);

/* The record state of fd with a reference held, or NULL for a plain fd. */
struct pc_tls_rec *pc_tls_rec_get(int fd);
void pc_tls_rec_put(struct pc_tls_rec *t);

/* seal and write all of buf / iov[0, n); 0 or bytes written, or -errno */
int pc_tls_rec_send(struct pc_tls_rec *t, const uint8_t *buf, size_t len);
int64_t pc_tls_rec_writev(struct pc_tls_rec *t, const struct iovec *iov, int n);

/* Up to len plaintext bytes without waiting: n > 0, 0 at the end of the
 * stream (close_notify or EOF), -EAGAIN if no whole record is in, or -errno
 * (a record that fails authentication is -EBADMSG; see pc_tls_reason). */
int64_t pc_tls_rec_recv(struct pc_tls_rec *t, uint8_t *buf, size_t len, int peek);

/* 1 if plaintext or a whole record waits in memory (poll(2) would not see it) */
int pc_tls_rec_buffered(struct pc_tls_rec *t);

/* For Python, by fd (-EBADF for an fd not registered). */
#define PC_TLS_WAIT_EXPIRED (-100000)   /* no byte within timeout_ms */
/* flags: 1 peek, 2 do not wait; timeout_ms < 0 waits for ever */
int64_t pc_tls_recv(int fd, uint8_t *buf, size_t len, int flags, int timeout_ms);
int pc_tls_send(int fd, const uint8_t *buf, size_t len);
int pc_tls_buffered(int fd);
/* why the last failure of fd's records was (empty if none) */
void pc_tls_reason(int fd, char *out, size_t len);
/* forget fd's records (before it is closed) */
void pc_tls_detach(int fd);
#endif
