#include "compat.h"
#include "io.h"
#include "tls.h"
#include "tls_record.h"
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>

/* Ciphertext travels through a BIO pair: the TCP socket is read and written
 * here in large chunks straight from and into the pair's ring buffers
 * (BIO_nwrite0/BIO_nread0), not one syscall per 16 KiB TLS record. */
#define TLS_BIO_RING (256 << 10)
#define TLS_PLAIN_CHUNK (32 << 10)
/* after the engine closed its end: this long at most to deliver what it
 * wrote last (e.g. a final SHUT) and the close_notify */
#define TLS_LINGER_MS 10000

static void fail(char *err, size_t len, const char *fmt, const char *what)
{
    snprintf(err, len, fmt, what);
}

/* the first OpenSSL error in this thread's queue, as a reason */
static void openssl_reason(char *err, size_t len, const char *what)
{
    unsigned long e = ERR_peek_error();
    const char *r = e ? ERR_reason_error_string(e) : NULL;
    if (what)
        snprintf(err, len, "%s: %s", what, r ? r : "unknown OpenSSL error");
    else
        snprintf(err, len, "%s", r ? r : "unknown OpenSSL error");
    ERR_clear_error();
}

/* what one handshake learns, through its callbacks */
struct handshake {
    int ticket;                 /* a session ticket came (TLS 1.3 client) */
    int rx_app, tx_app;         /* that direction's Finished went by: records are under traffic keys */
    int have_rx, have_tx;
    int server;
    struct pc_tls_keys keys;
};

static int hs_index = -1;
static pthread_once_t hs_once = PTHREAD_ONCE_INIT;

static void hs_index_init(void)
{
    /* no cleanup at exit: relay threads may still be running then */
    OPENSSL_init_ssl(OPENSSL_INIT_NO_ATEXIT, NULL);
    hs_index = SSL_get_ex_new_index(0, NULL, NULL, NULL, NULL);
}

/* TLS 1.3: the server sends its session tickets only once it has accepted
 * the client's certificate; the client waits for one to know it was let in */
static int on_ticket(SSL *ssl, SSL_SESSION *sess)
{
    (void)sess;
    struct handshake *h = SSL_get_ex_data(ssl, hs_index);
    if (h)
        h->ticket = 1;
    return 0;   /* not kept */
}

/* Records sealed and opened under the traffic keys during the handshake
 * (tickets) are counted: the record layer (tls_record.c) goes on from
 * those sequence numbers. A direction switches to its traffic keys right
 * after its Finished message (RFC 8446 7.2). */
static void on_message(int write_p, int version, int type, const void *buf, size_t len, SSL *ssl, void *arg)
{
    (void)version, (void)arg;
    struct handshake *h = SSL_get_ex_data(ssl, hs_index);
    if (!h)
        return;
    if (type == SSL3_RT_HEADER) {
        if (write_p && h->tx_app)
            h->keys.tx_seq++;
        else if (!write_p && h->rx_app)
            h->keys.rx_seq++;
    } else if (type == SSL3_RT_HANDSHAKE && len >= 1 && ((const uint8_t *)buf)[0] == SSL3_MT_FINISHED) {
        if (write_p)
            h->tx_app = 1;
        else
            h->rx_app = 1;
    }
}

static int unhex(const char *s, uint8_t *out, size_t max)
{
    size_t n = 0;
    while (s[0] && s[1] && n < max) {
        unsigned v;
        if (sscanf(s, "%2x", &v) != 1)
            return -1;
        out[n++] = (uint8_t)v;
        s += 2;
    }
    return (int)n;
}

/* The traffic secrets, from OpenSSL's key log lines (NSS key log format:
 * label, client random, secret; the labels of RFC 8446 7.1) */
static void on_keylog(const SSL *ssl, const char *line)
{
    struct handshake *h = SSL_get_ex_data(ssl, hs_index);
    if (!h)
        return;
    int client = !strncmp(line, "CLIENT_TRAFFIC_SECRET_0 ", 24);
    if (!client && strncmp(line, "SERVER_TRAFFIC_SECRET_0 ", 24))
        return;
    const char *sp = strchr(line + 24, ' ');
    if (!sp)
        return;
    int ours = client != h->server;   /* the client writes with the client's secret */
    uint8_t *dst = ours ? h->keys.tx_secret : h->keys.rx_secret;
    int n = unhex(sp + 1, dst, sizeof h->keys.tx_secret);
    if (n <= 0)
        return;
    h->keys.secret_len = (size_t)n;
    if (ours)
        h->have_tx = 1;
    else
        h->have_rx = 1;
}

const char *pc_tls_library(void)
{
    return OpenSSL_version(OPENSSL_VERSION);
}

void *pc_tls_ctx_new(int server, const char *ca, const char *cert, const char *key, char *err, size_t errlen)
{
    pthread_once(&hs_once, hs_index_init);
    ERR_clear_error();
    SSL_CTX *ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    if (!ctx) {
        openssl_reason(err, errlen, "cannot make a TLS context");
        return NULL;
    }
    SSL_CTX_set_app_data(ctx, server ? ctx : NULL);   /* which side, for pc_tls_start */
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    /* both ends verify the peer (QEMU's verify-peer=on) */
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | (server ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0), NULL);
    /* AES-GCM first: this CPU has AES-NI (the record layer takes all three) */
    SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256");
    SSL_CTX_set_options(ctx, SSL_OP_CIPHER_SERVER_PREFERENCE);
    SSL_CTX_set_keylog_callback(ctx, on_keylog);
    if (SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1) {
        openssl_reason(err, errlen, ca);
        goto bad;
    }
    if (server) {
        STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(ca);
        if (names)
            SSL_CTX_set_client_CA_list(ctx, names);
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    } else {
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
        SSL_CTX_sess_set_new_cb(ctx, on_ticket);
    }
    if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
        openssl_reason(err, errlen, cert);
        goto bad;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
        openssl_reason(err, errlen, key);
        goto bad;
    }
    if (SSL_CTX_check_private_key(ctx) != 1) {
        fail(err, errlen, "%s: the key does not belong to the certificate", key);
        ERR_clear_error();
        goto bad;
    }
    return ctx;
bad:
    SSL_CTX_free(ctx);
    return NULL;
}

void pc_tls_ctx_free(void *ctx)
{
    SSL_CTX_free(ctx);
}

struct relay {
    SSL *ssl;
    BIO *net;          /* our end of the BIO pair; the SSL has the other */
    int fd;            /* TCP */
    int plain;         /* the engine's connection, other end */
    uint8_t *in;       /* plaintext from the peer, to the engine */
    size_t in_off, in_len;
    uint8_t *out;      /* plaintext from the engine, to the peer */
    size_t out_off, out_len;
    int net_eof, plain_eof;
};

/* TCP -> ring; 1 if bytes came, 0 if none, -1 on a failed socket */
static int net_read(struct relay *r)
{
    int got = 0;
    while (!r->net_eof) {
        char *p;
        int space = BIO_nwrite0(r->net, &p);
        if (space <= 0)
            break;
        ssize_t n = recv(r->fd, p, (size_t)space, 0);
        if (n > 0) {
            BIO_nwrite(r->net, &p, (int)n);
            got = 1;
            if (n < space)
                break;
        } else if (n == 0) {
            r->net_eof = 1;
        } else if (errno == EINTR) {
            continue;
        } else if (errno == EAGAIN) {
            break;
        } else {
            return -1;
        }
    }
    return got;
}

/* ring -> TCP; 1 if bytes went, 0 if none, -1 on a failed socket */
static int net_write(struct relay *r)
{
    int sent = 0;
    for (;;) {
        char *p;
        int n = BIO_nread0(r->net, &p);
        if (n <= 0)
            break;
        ssize_t w = send(r->fd, p, (size_t)n, MSG_NOSIGNAL);
        if (w > 0) {
            BIO_nread(r->net, &p, (int)w);
            sent = 1;
            if (w < n)
                break;
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else if (w < 0 && errno == EAGAIN) {
            break;
        } else {
            return -1;
        }
    }
    return sent;
}

static int wait_fd(int fd, short events, int ms)
{
    struct pollfd p = { fd, events, 0 };
    int n;
    do
        n = poll(&p, 1, ms);
    while (n < 0 && errno == EINTR);
    return n;
}

static int64_t ms_left(uint64_t deadline)
{
    uint64_t now = pc_now_ns();
    return now >= deadline ? 0 : (int64_t)((deadline - now) / 1000000ULL) + 1;
}

/* one step of a handshake-time exchange: flush, and wait for/read what the
 * peer sends; 0 to go on, -1 with err set */
static int handshake_io(struct relay *r, uint64_t deadline, char *err, size_t errlen)
{
    if (net_write(r) < 0) {
        fail(err, errlen, "the connection failed during the TLS handshake: %s", strerror(errno));
        return -1;
    }
    if (BIO_ctrl_pending(r->net) > 0) {
        if (wait_fd(r->fd, POLLOUT, (int)ms_left(deadline)) <= 0)
            goto timeout;
        return 0;
    }
    int got = net_read(r);
    if (got < 0) {
        fail(err, errlen, "the connection failed during the TLS handshake: %s", strerror(errno));
        return -1;
    }
    if (r->net_eof && BIO_ctrl_pending(SSL_get_rbio(r->ssl)) == 0) {
        fail(err, errlen, "%s", "the peer closed the connection during the TLS handshake");
        return -1;
    }
    if (!got && wait_fd(r->fd, POLLIN, (int)ms_left(deadline)) <= 0)
        goto timeout;
    return 0;
timeout:
    fail(err, errlen, "%s", "no TLS handshake within the timeout");
    return -1;
}

static void handshake_reason(SSL *ssl, char *err, size_t errlen)
{
    unsigned long e = ERR_peek_error();
    long v = SSL_get_verify_result(ssl);
    if (e && ERR_GET_REASON(e) == SSL_R_CERTIFICATE_VERIFY_FAILED && v != X509_V_OK) {
        snprintf(err, errlen, "the peer's certificate: %s", X509_verify_cert_error_string(v));
        ERR_clear_error();
    } else if (e && ERR_GET_REASON(e) >= SSL_AD_REASON_OFFSET) {
        openssl_reason(err, errlen, "the peer refused us");   /* an alert from the peer */
    } else if (e) {
        openssl_reason(err, errlen, NULL);
    } else {
        snprintf(err, errlen, "the peer closed the connection during the TLS handshake");
    }
}

static void *relay_main(void *arg);

static void relay_free(struct relay *r)
{
    SSL_free(r->ssl);   /* and its end of the pair */
    BIO_free(r->net);
    free(r->in);
    free(r->out);
    free(r);
}

int pc_tls_start(void *vctx, int fd, int plain_fd, const char *host, int timeout_ms, char *err, size_t errlen)
{
    SSL_CTX *ctx = vctx;
    int server = SSL_CTX_get_app_data(ctx) != NULL;
    uint64_t deadline = pc_now_ns() + (uint64_t)timeout_ms * 1000000ULL;
    struct handshake hs;
    memset(&hs, 0, sizeof hs);
    hs.server = server;
    BIO *inner = NULL;
    int flags0 = fcntl(fd, F_GETFL);
    ERR_clear_error();
    struct relay *r = calloc(1, sizeof *r);
    if (!r)
        goto nomem;
    r->fd = fd;
    r->plain = plain_fd;
    r->in = malloc(TLS_PLAIN_CHUNK);
    r->out = malloc(TLS_PLAIN_CHUNK);
    r->ssl = SSL_new(ctx);
    if (!r->in || !r->out || !r->ssl || BIO_new_bio_pair(&inner, TLS_BIO_RING, &r->net, TLS_BIO_RING) != 1)
        goto nomem;
    SSL_set_bio(r->ssl, inner, inner);
    SSL_set_ex_data(r->ssl, hs_index, &hs);
    SSL_set_msg_callback(r->ssl, on_message);
    if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0 ||
        fcntl(plain_fd, F_SETFL, fcntl(plain_fd, F_GETFL) | O_NONBLOCK) < 0) {
        fail(err, errlen, "cannot make the sockets non-blocking: %s", strerror(errno));
        goto bad;
    }
    if (server) {
        /* a TLS connection begins with a handshake record (RFC 8446 5.1):
         * anything else is a plaintext peer, told so by the caller */
        uint8_t first;
        for (;;) {
            ssize_t n = recv(fd, &first, 1, MSG_PEEK);
            if (n == 1)
                break;
            if (n == 0) {
                fail(err, errlen, "%s", "the peer closed the connection before the TLS handshake");
                goto bad;
            }
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN) {
                fail(err, errlen, "the connection failed before the TLS handshake: %s", strerror(errno));
                goto bad;
            }
            if (wait_fd(fd, POLLIN, (int)ms_left(deadline)) <= 0) {
                fail(err, errlen, "%s", "no TLS handshake within the timeout");
                goto bad;
            }
        }
        if (first != 0x16) {
            fail(err, errlen, "%s", "the peer sent plaintext, not a TLS handshake (is it without --tls-creds?)");
            relay_free(r);
            return -2;
        }
        SSL_set_accept_state(r->ssl);
    } else {
        SSL_set_connect_state(r->ssl);
        if (host && *host) {
            X509_VERIFY_PARAM *param = SSL_get0_param(r->ssl);
            if (X509_VERIFY_PARAM_set1_ip_asc(param, host) != 1) {
                ERR_clear_error();
                if (SSL_set1_host(r->ssl, host) != 1 || SSL_set_tlsext_host_name(r->ssl, host) != 1) {
                    openssl_reason(err, errlen, host);
                    goto bad;
                }
            }
        }
    }
    for (;;) {
        int ret = SSL_do_handshake(r->ssl);
        if (ret == 1)
            break;
        int e = SSL_get_error(r->ssl, ret);
        if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) {
            handshake_reason(r->ssl, err, errlen);
            net_write(r);   /* the alert that says why, to the peer */
            goto bad;
        }
        if (handshake_io(r, deadline, err, errlen) < 0)
            goto bad;
    }
    if (!server && SSL_version(r->ssl) == TLS1_3_VERSION) {
        /* wait for a ticket (accepted) or an alert (refused) */
        while (!hs.ticket) {
            uint8_t c;
            int ret = SSL_peek(r->ssl, &c, 1);
            if (ret > 0)
                break;      /* data: accepted too */
            int e = SSL_get_error(r->ssl, ret);
            if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) {
                handshake_reason(r->ssl, err, errlen);
                goto bad;
            }
            if (hs.ticket)
                break;
            if (handshake_io(r, deadline, err, errlen) < 0)
                goto bad;
        }
    }
    while (BIO_ctrl_pending(r->net) > 0) {
        if (net_write(r) < 0) {
            fail(err, errlen, "%s", "the connection failed after the TLS handshake");
            goto bad;
        }
        if (BIO_ctrl_pending(r->net) > 0 && wait_fd(fd, POLLOUT, (int)ms_left(deadline)) <= 0) {
            fail(err, errlen, "%s", "no TLS handshake within the timeout");
            goto bad;
        }
    }
    SSL_set_ex_data(r->ssl, hs_index, NULL);
    SSL_set_msg_callback(r->ssl, NULL);
    if (SSL_version(r->ssl) == TLS1_3_VERSION && hs.have_rx && hs.have_tx && !SSL_has_pending(r->ssl)) {
        /* the native threads seal and open the records themselves from here
         * (tls_record.c), with the ciphertext OpenSSL has not read yet */
        hs.keys.suite = (uint16_t)SSL_CIPHER_get_protocol_id(SSL_get_current_cipher(r->ssl));
        uint8_t *pre = malloc(TLS_BIO_RING);
        int n = 0;
        if (pre) {
            BIO *rb = SSL_get_rbio(r->ssl);
            int m;
            while (n < TLS_BIO_RING && (m = BIO_read(rb, pre + n, TLS_BIO_RING - n)) > 0)
                n += m;
        }
        int rc = pre ? pc_tls_rec_attach(fd, &hs.keys, pre, (size_t)n) : -ENOMEM;
        free(pre);
        OPENSSL_cleanse(&hs.keys, sizeof hs.keys);
        if (rc == 0) {
            fcntl(fd, F_SETFL, flags0);
            relay_free(r);
            ERR_clear_error();
            return 1;
        }
        if (n > 0) {
            fail(err, errlen, "cannot take over the TLS connection: %s", strerror(-rc));
            goto bad;
        }
    }
    OPENSSL_cleanse(&hs.keys, sizeof hs.keys);
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int rc = pthread_create(&t, &attr, relay_main, r);
    pthread_attr_destroy(&attr);
    if (rc) {
        fail(err, errlen, "cannot start the TLS relay thread: %s", strerror(rc));
        goto bad;
    }
    return 0;
nomem:
    fail(err, errlen, "%s", "out of memory for a TLS connection");
bad:
    if (r) {
        if (r->ssl)
            SSL_free(r->ssl);
        else if (inner)
            BIO_free(inner);
        BIO_free(r->net);
        free(r->in);
        free(r->out);
        free(r);
    }
    ERR_clear_error();
    return -1;
}

/* Carry bytes both ways until either side ends; then close both, so that a
 * broken TLS link is a broken connection to the engine and the reverse. */
static void *relay_main(void *arg)
{
    struct relay *r = arg;
    int read_blocked = 0, shutdown_sent = 0;
    uint64_t linger_until = 0;
    for (;;) {
        int progress = 0, n;

        if ((n = net_read(r)) < 0)
            break;
        progress |= n;

        /* ciphertext -> plaintext, as much as fits */
        read_blocked = 0;
        while (r->in_len < TLS_PLAIN_CHUNK) {
            int got = SSL_read(r->ssl, r->in + r->in_len, TLS_PLAIN_CHUNK - (int)r->in_len);
            if (got > 0) {
                r->in_len += (size_t)got;
                progress = 1;
                continue;
            }
            int e = SSL_get_error(r->ssl, got);
            if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
                read_blocked = 1;
                break;
            }
            /* close_notify, an alert, a bad record, or EOF without close_notify */
            r->net_eof = 2;
            break;
        }
        if (r->in_off < r->in_len) {
            ssize_t w = send(r->plain, r->in + r->in_off, r->in_len - r->in_off, MSG_NOSIGNAL);
            if (w > 0) {
                r->in_off += (size_t)w;
                progress = 1;
            } else if (w < 0 && errno != EAGAIN && errno != EINTR) {
                break;      /* the engine closed its end */
            }
            if (r->in_off == r->in_len)
                r->in_off = r->in_len = 0;
        }
        if (r->net_eof && r->in_len == 0 && (r->net_eof == 2 || read_blocked))
            break;          /* everything the peer sent is delivered */

        /* plaintext -> ciphertext */
        if (r->out_off == r->out_len && !r->plain_eof) {
            r->out_off = r->out_len = 0;
            ssize_t got = recv(r->plain, r->out, TLS_PLAIN_CHUNK, 0);
            if (got > 0) {
                r->out_len = (size_t)got;
                progress = 1;
            } else if (got == 0 || (errno != EAGAIN && errno != EINTR)) {
                r->plain_eof = 1;
                linger_until = pc_now_ns() + TLS_LINGER_MS * 1000000ULL;
            }
        }
        while (r->out_off < r->out_len) {
            int w = SSL_write(r->ssl, r->out + r->out_off, (int)(r->out_len - r->out_off));
            if (w > 0) {
                r->out_off += (size_t)w;
                progress = 1;
                continue;
            }
            int e = SSL_get_error(r->ssl, w);
            if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ)
                break;
            goto end;
        }
        if (r->plain_eof && r->out_off == r->out_len && !shutdown_sent) {
            SSL_shutdown(r->ssl);
            shutdown_sent = 1;
            progress = 1;
        }
        if ((n = net_write(r)) < 0)
            break;
        progress |= n;
        if (shutdown_sent && BIO_ctrl_pending(r->net) == 0)
            break;          /* all the engine wrote went out, and the close_notify */
        if (progress)
            continue;

        int timeout = -1;
        if (r->plain_eof) {
            timeout = (int)ms_left(linger_until);
            if (timeout == 0)
                break;
        }
        struct pollfd p[2] = { { r->fd, 0, 0 }, { r->plain, 0, 0 } };
        if (!r->net_eof && BIO_ctrl_get_write_guarantee(r->net) > 0)
            p[0].events |= POLLIN;
        if (BIO_ctrl_pending(r->net) > 0)
            p[0].events |= POLLOUT;
        if (r->out_off == r->out_len && !r->plain_eof)
            p[1].events |= POLLIN;
        if (r->in_off < r->in_len)
            p[1].events |= POLLOUT;
        /* (a side with nothing to wait for is left out: its POLLHUP would spin) */
        for (int i = 0; i < 2; i++)
            if (!p[i].events)
                p[i].fd = -1;
        if (poll(p, 2, timeout) < 0 && errno != EINTR)
            break;
    }
end:
    close(r->fd);
    close(r->plain);
    relay_free(r);
    ERR_clear_error();
    OPENSSL_thread_stop();
    return NULL;
}
