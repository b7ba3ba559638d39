/* TLS for the migration connections (DESIGN.md section 8) with OpenSSL:
 * the handshake on a connected TCP socket; then, with TLS 1.3, the record
 * layer of tls_record.h on the socket itself; with TLS 1.2 (a peer that
 * offers no 1.3), a relay thread that carries the plaintext between the TLS
 * connection and a local socket (one end of a socketpair) that the engines
 * use as if it were the TCP connection. */
#ifndef POSTCOPY_TLS_H
#define POSTCOPY_TLS_H
#include <stddef.h>

/* An SSL_CTX for one side: server != 0 for the listening side. ca, cert and
 * key are PEM files. NULL with a one-line reason in err on failure. */
void *pc_tls_ctx_new(int server, const char *ca, const char *cert, const char *key, char *err, size_t errlen);
void pc_tls_ctx_free(void *ctx);

/* The handshake on the connected socket fd, both peers verified against
 * the CA; a client checks the server's name against host (an IP address
 * against the certificate's IP SANs). At most timeout_ms. On success with
 * TLS 1.3, fd carries its records from then on (tls_record.h) and 1 is
 * returned; with TLS 1.2, a relay thread owns fd and plain_fd (it closes
 * both when either side ends) and 0 is returned; otherwise neither is
 * closed and err holds the reason:
 * -1 a failed handshake, -2 (server) the peer's first bytes are not a TLS
 * handshake record (a plaintext peer: nothing of it was consumed). */
int pc_tls_start(void *ctx, int fd, int plain_fd, const char *host, int timeout_ms, char *err, size_t errlen);

/* OpenSSL's version text */
const char *pc_tls_library(void);
#endif
