#include "compat.h"
#include "io.h"
#include "tls_record.h"
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>

/* RFC 8446 5.1: TLSPlaintext.length <= 2^14; 5.2: TLSCiphertext.length
 * <= 2^14 + 256; the AEAD tag of every TLS 1.3 suite is 16 bytes and its
 * nonce 12 (5.3) */
#define REC_HDR 5
#define REC_PLAIN_MAX 16384
#define REC_CIPHER_MAX (REC_PLAIN_MAX + 256)
#define TAG 16
#define NONCE 12
#define CT_ALERT 21
#define CT_HANDSHAKE 22
#define CT_APPDATA 23
#define HS_NEW_SESSION_TICKET 4
#define HS_KEY_UPDATE 24
/* ciphertext read ahead, and sealed before one send */
#define RBUF (256 << 10)
#define WBUF (16 * (REC_HDR + REC_PLAIN_MAX + 1 + TAG))
/* fds above this are relayed (tls.c), not registered */
#define TABLE 65536

struct direction {
    EVP_CIPHER_CTX *ctx;
    uint8_t secret[64];
    uint8_t iv[NONCE];
    uint64_t seq;
};

struct pc_tls_rec {
    int fd;
    int refs;
    const EVP_CIPHER *cipher;
    const EVP_MD *md;
    size_t secret_len, key_len;
    pthread_mutex_t rx_lock, tx_lock;
    struct direction rx, tx;
    uint8_t *rbuf;          /* ciphertext read, not yet opened: [r_off, r_len) */
    size_t r_off, r_len;
    uint8_t *plain;         /* opened, not yet taken: [p_off, p_len) */
    size_t p_off, p_len;
    uint8_t *wbuf;
    int rx_end;             /* 1 at the end of the stream, -errno after a failure */
    int tx_update;          /* the peer asked for our KeyUpdate (4.6.3) */
    char why[160];
};

static struct pc_tls_rec *table[TABLE];
static int registered;
static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;

/* HKDF-Expand-Label (RFC 8446 7.1) with an empty context */
static int expand_label(const EVP_MD *md, const uint8_t *secret, size_t slen, const char *label,
                        uint8_t *out, size_t outlen)
{
    uint8_t info[4 + 6 + 32];
    size_t ll = strlen(label);
    info[0] = (uint8_t)(outlen >> 8);
    info[1] = (uint8_t)outlen;
    info[2] = (uint8_t)(6 + ll);
    memcpy(info + 3, "tls13 ", 6);
    memcpy(info + 9, label, ll);
    info[9 + ll] = 0;
    EVP_KDF *kdf = EVP_KDF_fetch(NULL, "HKDF", NULL);
    EVP_KDF_CTX *k = kdf ? EVP_KDF_CTX_new(kdf) : NULL;
    int mode = EVP_KDF_HKDF_MODE_EXPAND_ONLY;
    OSSL_PARAM p[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, (char *)EVP_MD_get0_name(md), 0),
        OSSL_PARAM_construct_int(OSSL_KDF_PARAM_MODE, &mode),
        OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, (void *)secret, slen),
        OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, info, 10 + ll),
        OSSL_PARAM_construct_end(),
    };
    int ok = k && EVP_KDF_derive(k, out, outlen, p) == 1;
    EVP_KDF_CTX_free(k);
    EVP_KDF_free(kdf);
    return ok ? 0 : -EINVAL;
}

/* the key and iv of d->secret (7.3), sequence from 0 */
static int install(struct pc_tls_rec *t, struct direction *d, int enc)
{
    uint8_t key[32];
    if (expand_label(t->md, d->secret, t->secret_len, "key", key, t->key_len) ||
        expand_label(t->md, d->secret, t->secret_len, "iv", d->iv, NONCE))
        return -EINVAL;
    int ok = EVP_CipherInit_ex(d->ctx, t->cipher, NULL, NULL, NULL, enc) == 1 &&
             EVP_CIPHER_CTX_ctrl(d->ctx, EVP_CTRL_AEAD_SET_IVLEN, NONCE, NULL) == 1 &&
             EVP_CipherInit_ex(d->ctx, NULL, NULL, key, NULL, enc) == 1;
    OPENSSL_cleanse(key, sizeof key);
    d->seq = 0;
    return ok ? 0 : -EINVAL;
}

/* the next traffic secret (7.2) */
static int key_update(struct pc_tls_rec *t, struct direction *d, int enc)
{
    uint8_t next[64];
    if (expand_label(t->md, d->secret, t->secret_len, "traffic upd", next, t->secret_len))
        return -EINVAL;
    memcpy(d->secret, next, t->secret_len);
    OPENSSL_cleanse(next, sizeof next);
    return install(t, d, enc);
}

/* the per-record nonce: iv XOR the 64-bit sequence number (5.3) */
static int start_record(struct direction *d, int enc, const uint8_t *hdr)
{
    uint8_t nonce[NONCE];
    memcpy(nonce, d->iv, NONCE);
    for (int i = 0; i < 8; i++)
        nonce[NONCE - 1 - i] ^= (uint8_t)(d->seq >> (8 * i));
    int outl;
    if (EVP_CipherInit_ex(d->ctx, NULL, NULL, NULL, nonce, enc) != 1 ||
        EVP_CipherUpdate(d->ctx, NULL, &outl, hdr, REC_HDR) != 1)   /* additional data: the header */
        return -EINVAL;
    return 0;
}

static void rec_free(struct pc_tls_rec *t)
{
    EVP_CIPHER_CTX_free(t->rx.ctx);
    EVP_CIPHER_CTX_free(t->tx.ctx);
    OPENSSL_cleanse(t->rx.secret, sizeof t->rx.secret);
    OPENSSL_cleanse(t->tx.secret, sizeof t->tx.secret);
    pthread_mutex_destroy(&t->rx_lock);
    pthread_mutex_destroy(&t->tx_lock);
    free(t->rbuf);
    free(t->plain);
    free(t->wbuf);
    free(t);
}

int pc_tls_rec_attach(int fd, const struct pc_tls_keys *k, const uint8_t *pre, size_t pre_len)
{
    if (fd < 0 || fd >= TABLE || pre_len > RBUF)
        return -ENOTSUP;
    struct pc_tls_rec *t = calloc(1, sizeof *t);
    if (!t)
        return -ENOMEM;
    t->fd = fd;
    t->refs = 1;
    switch (k->suite) {
    case 0x1301:
        t->cipher = EVP_aes_128_gcm(), t->md = EVP_sha256(), t->key_len = 16;
        break;
    case 0x1302:
        t->cipher = EVP_aes_256_gcm(), t->md = EVP_sha384(), t->key_len = 32;
        break;
    case 0x1303:
        t->cipher = EVP_chacha20_poly1305(), t->md = EVP_sha256(), t->key_len = 32;
        break;
    default:
        free(t);
        return -ENOTSUP;
    }
    t->secret_len = k->secret_len;
    if (t->secret_len != (size_t)EVP_MD_get_size(t->md)) {
        free(t);
        return -ENOTSUP;
    }
    pthread_mutex_init(&t->rx_lock, NULL);
    pthread_mutex_init(&t->tx_lock, NULL);
    t->rx.ctx = EVP_CIPHER_CTX_new();
    t->tx.ctx = EVP_CIPHER_CTX_new();
    t->rbuf = malloc(RBUF);
    t->plain = malloc(REC_CIPHER_MAX);
    t->wbuf = malloc(WBUF);
    memcpy(t->rx.secret, k->rx_secret, t->secret_len);
    memcpy(t->tx.secret, k->tx_secret, t->secret_len);
    if (!t->rx.ctx || !t->tx.ctx || !t->rbuf || !t->plain || !t->wbuf || install(t, &t->rx, 0) ||
        install(t, &t->tx, 1)) {
        rec_free(t);
        return -ENOMEM;
    }
    t->rx.seq = k->rx_seq;
    t->tx.seq = k->tx_seq;
    memcpy(t->rbuf, pre, pre_len);
    t->r_len = pre_len;
    pthread_mutex_lock(&table_lock);
    struct pc_tls_rec *old = table[fd];
    table[fd] = t;
    if (!old)
        __atomic_add_fetch(&registered, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&table_lock);
    if (old)
        pc_tls_rec_put(old);
    return 0;
}

struct pc_tls_rec *pc_tls_rec_get(int fd)
{
    if (!__atomic_load_n(&registered, __ATOMIC_ACQUIRE) || fd < 0 || fd >= TABLE)
        return NULL;
    pthread_mutex_lock(&table_lock);
    struct pc_tls_rec *t = table[fd];
    if (t)
        t->refs++;
    pthread_mutex_unlock(&table_lock);
    return t;
}

void pc_tls_rec_put(struct pc_tls_rec *t)
{
    pthread_mutex_lock(&table_lock);
    int last = --t->refs == 0;
    pthread_mutex_unlock(&table_lock);
    if (last)
        rec_free(t);
}

void pc_tls_detach(int fd)
{
    if (fd < 0 || fd >= TABLE)
        return;
    pthread_mutex_lock(&table_lock);
    struct pc_tls_rec *t = table[fd];
    table[fd] = NULL;
    if (t)
        __atomic_sub_fetch(&registered, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&table_lock);
    if (t)
        pc_tls_rec_put(t);
}

/* -- sealing ------------------------------------------------------------ */

/* one record of content type `type` from len bytes of iov starting at
 * (*iv, *off), into out; its size */
static int64_t seal(struct pc_tls_rec *t, uint8_t *out, uint8_t type, const struct iovec **iv,
                    const struct iovec *iv_end, size_t *off, size_t len)
{
    size_t clen = len + 1 + TAG;
    out[0] = CT_APPDATA;   /* opaque_type (5.2) */
    out[1] = 0x03;
    out[2] = 0x03;
    out[3] = (uint8_t)(clen >> 8);
    out[4] = (uint8_t)clen;
    if (start_record(&t->tx, 1, out))
        return -EINVAL;
    uint8_t *p = out + REC_HDR;
    int outl;
    while (len) {
        while (*iv < iv_end && *off == (*iv)->iov_len) {
            (*iv)++;
            *off = 0;
        }
        size_t take = (*iv)->iov_len - *off;
        if (take > len)
            take = len;
        if (EVP_EncryptUpdate(t->tx.ctx, p, &outl, (const uint8_t *)(*iv)->iov_base + *off, (int)take) != 1)
            return -EINVAL;
        p += outl;
        *off += take;
        len -= take;
    }
    if (EVP_EncryptUpdate(t->tx.ctx, p, &outl, &type, 1) != 1)   /* TLSInnerPlaintext.type */
        return -EINVAL;
    p += outl;
    if (EVP_EncryptFinal_ex(t->tx.ctx, p, &outl) != 1)
        return -EINVAL;
    p += outl;
    if (EVP_CIPHER_CTX_ctrl(t->tx.ctx, EVP_CTRL_AEAD_GET_TAG, TAG, p) != 1)
        return -EINVAL;
    t->tx.seq++;
    return (int64_t)(p + TAG - out);
}

/* our KeyUpdate(update_not_requested) as the peer asked, then the next keys */
static int send_key_update(struct pc_tls_rec *t)
{
    static const uint8_t msg[5] = { HS_KEY_UPDATE, 0, 0, 1, 0 };
    struct iovec v = { (void *)msg, sizeof msg };
    const struct iovec *iv = &v;
    size_t off = 0;
    int64_t n = seal(t, t->wbuf, CT_HANDSHAKE, &iv, &v + 1, &off, sizeof msg);
    if (n < 0)
        return (int)n;
    int r = pc_raw_send_all(t->fd, t->wbuf, (size_t)n);
    if (r)
        return r;
    __atomic_store_n(&t->tx_update, 0, __ATOMIC_RELAXED);
    return key_update(t, &t->tx, 1);
}

int64_t pc_tls_rec_writev(struct pc_tls_rec *t, const struct iovec *iov, int n)
{
    size_t left = 0;
    for (int i = 0; i < n; i++)
        left += iov[i].iov_len;
    int64_t total = (int64_t)left;
    const struct iovec *iv = iov, *end = iov + n;
    size_t off = 0;
    int r = 0;
    pthread_mutex_lock(&t->tx_lock);
    if (__atomic_load_n(&t->tx_update, __ATOMIC_RELAXED))
        r = send_key_update(t);
    while (!r && left) {
        size_t used = 0;
        while (left && used + REC_HDR + REC_PLAIN_MAX + 1 + TAG <= WBUF) {
            size_t len = left < REC_PLAIN_MAX ? left : REC_PLAIN_MAX;
            int64_t s = seal(t, t->wbuf + used, CT_APPDATA, &iv, end, &off, len);
            if (s < 0) {
                r = (int)s;
                break;
            }
            used += (size_t)s;
            left -= len;
        }
        if (!r)
            r = pc_raw_send_all(t->fd, t->wbuf, used);
    }
    pthread_mutex_unlock(&t->tx_lock);
    return r ? r : total;
}

int pc_tls_rec_send(struct pc_tls_rec *t, const uint8_t *buf, size_t len)
{
    struct iovec v = { (void *)buf, len };
    int64_t r = pc_tls_rec_writev(t, &v, 1);
    return r < 0 ? (int)r : 0;
}

/* -- opening ------------------------------------------------------------ */

static int64_t failed(struct pc_tls_rec *t, int err, const char *why)
{
    snprintf(t->why, sizeof t->why, "%s", why);
    t->rx_end = -err;
    return -err;
}

/* the handshake messages of a post-handshake record (4.6): tickets are not
 * kept; a KeyUpdate moves to the next keys */
static int64_t post_handshake(struct pc_tls_rec *t, const uint8_t *m, size_t len)
{
    while (len) {
        if (len < 4)
            return failed(t, EPROTO, "a TLS handshake message split across records");
        size_t ml = (size_t)m[1] << 16 | (size_t)m[2] << 8 | m[3];
        if (ml > len - 4)
            return failed(t, EPROTO, "a TLS handshake message split across records");
        if (m[0] == HS_KEY_UPDATE) {
            if (ml != 1 || m[4] > 1)
                return failed(t, EPROTO, "a malformed TLS KeyUpdate");
            if (key_update(t, &t->rx, 0))
                return failed(t, EPROTO, "cannot derive the next TLS keys");
            if (m[4] == 1)
                __atomic_store_n(&t->tx_update, 1, __ATOMIC_RELAXED);
        } else if (m[0] != HS_NEW_SESSION_TICKET) {
            char why[80];
            snprintf(why, sizeof why, "an unexpected TLS handshake message (type %u) after the handshake", m[0]);
            return failed(t, EPROTO, why);
        }
        m += 4 + ml;
        len -= 4 + ml;
    }
    return 0;
}

/* open the record at rbuf[r_off] (whole, clen bytes after its header) into
 * dst (room for clen - TAG); its content length and type */
static int64_t open_record(struct pc_tls_rec *t, size_t clen, uint8_t *dst, uint8_t *type)
{
    const uint8_t *hdr = t->rbuf + t->r_off;
    int outl, total = 0;
    if (start_record(&t->rx, 0, hdr) ||
        EVP_DecryptUpdate(t->rx.ctx, dst, &outl, hdr + REC_HDR, (int)(clen - TAG)) != 1)
        return failed(t, EBADMSG, "cannot open a TLS record");
    total = outl;
    if (EVP_CIPHER_CTX_ctrl(t->rx.ctx, EVP_CTRL_AEAD_SET_TAG, TAG, (void *)(hdr + REC_HDR + clen - TAG)) != 1 ||
        EVP_DecryptFinal_ex(t->rx.ctx, dst + total, &outl) != 1)
        return failed(t, EBADMSG, "a TLS record failed its integrity check (bad record MAC)");
    t->rx.seq++;
    t->r_off += REC_HDR + clen;
    /* TLSInnerPlaintext: content, type, zero padding (5.4) */
    int64_t i = total - 1;
    while (i >= 0 && dst[i] == 0)
        i--;
    if (i < 0)
        return failed(t, EPROTO, "a TLS record without a content type");
    *type = dst[i];
    return i;
}

/* one piece of plaintext (of one record at most), rx_lock held */
static int64_t recv_once(struct pc_tls_rec *t, uint8_t *buf, size_t len, int peek)
{
    int64_t r;
    for (;;) {
        if (t->p_off < t->p_len) {
            size_t n = t->p_len - t->p_off;
            if (n > len)
                n = len;
            memcpy(buf, t->plain + t->p_off, n);
            if (!peek)
                t->p_off += n;
            r = (int64_t)n;
            break;
        }
        if (t->rx_end) {
            r = t->rx_end > 0 ? 0 : t->rx_end;
            break;
        }
        size_t have = t->r_len - t->r_off;
        if (have >= REC_HDR) {
            const uint8_t *h = t->rbuf + t->r_off;
            size_t clen = (size_t)h[3] << 8 | h[4];
            if (h[0] != CT_APPDATA || h[1] != 0x03 || h[2] != 0x03) {
                r = failed(t, EPROTO, "not a TLS 1.3 record");
                break;
            }
            if (clen > REC_CIPHER_MAX || clen < TAG + 1) {
                r = failed(t, EMSGSIZE, "a TLS record of a size no peer may send (record_overflow)");
                break;
            }
            if (have >= REC_HDR + clen) {
                /* straight into the caller's buffer when the record fits */
                int direct = !peek && len >= clen - TAG;
                uint8_t *dst = direct ? buf : t->plain;
                uint8_t type;
                int64_t n = open_record(t, clen, dst, &type);
                if (n < 0) {
                    r = n;
                    break;
                }
                if (type == CT_APPDATA) {
                    if (n == 0)
                        continue;
                    if (direct) {
                        r = n;
                        break;
                    }
                    t->p_off = 0;
                    t->p_len = (size_t)n;
                    continue;
                }
                if (type == CT_ALERT) {
                    if (n == 2 && dst[1] == 0) {   /* close_notify (6.1) */
                        t->rx_end = 1;
                        continue;
                    }
                    char why[64];
                    snprintf(why, sizeof why, "the peer sent TLS alert %u", n >= 2 ? dst[1] : 0);
                    r = failed(t, ECONNRESET, why);
                    break;
                }
                if (type == CT_HANDSHAKE) {
                    if ((r = post_handshake(t, dst, (size_t)n)) < 0)
                        break;
                    continue;
                }
                r = failed(t, EPROTO, "a TLS record of an unknown content type");
                break;
            }
        }
        /* room for at least one whole record after what is kept */
        if (t->r_off == t->r_len) {
            t->r_off = t->r_len = 0;
            have = 0;
        } else if (t->r_off && RBUF - t->r_len < REC_HDR + REC_CIPHER_MAX) {
            memmove(t->rbuf, t->rbuf + t->r_off, have);
            t->r_off = 0;
            t->r_len = have;
        }
        ssize_t got = recv(t->fd, t->rbuf + t->r_len, RBUF - t->r_len, MSG_DONTWAIT);
        if (got > 0) {
            t->r_len += (size_t)got;
            continue;
        }
        if (got == 0) {
            t->rx_end = 1;   /* (a cut inside a record is the same end: nothing of it is delivered) */
            continue;
        }
        if (errno == EINTR)
            continue;
        r = errno == EAGAIN || errno == EWOULDBLOCK ? -EAGAIN : -errno;
        break;
    }
    return r;
}

/* As recv(2) with MSG_DONTWAIT: the caller's buffer takes every whole record
 * already readable, not one record (16 KiB at most) per call: a 1 MiB read of
 * the page stream is one call, as on a plain socket.  An end or an error met
 * after some bytes is reported by the next call (rx_end keeps it). */
int64_t pc_tls_rec_recv(struct pc_tls_rec *t, uint8_t *buf, size_t len, int peek)
{
    pthread_mutex_lock(&t->rx_lock);
    int64_t r = recv_once(t, buf, len, peek);
    if (r > 0 && !peek) {
        size_t done = (size_t)r;
        while (done < len) {
            int64_t more = recv_once(t, buf + done, len - done, 0);
            if (more <= 0)
                break;
            done += (size_t)more;
        }
        r = (int64_t)done;
    }
    pthread_mutex_unlock(&t->rx_lock);
    return r;
}

int pc_tls_rec_buffered(struct pc_tls_rec *t)
{
    pthread_mutex_lock(&t->rx_lock);
    int b = t->p_off < t->p_len || t->rx_end;
    size_t have = t->r_len - t->r_off;
    if (!b && have >= REC_HDR) {
        const uint8_t *h = t->rbuf + t->r_off;
        b = have >= REC_HDR + ((size_t)h[3] << 8 | h[4]);
    }
    pthread_mutex_unlock(&t->rx_lock);
    return b;
}

/* -- for Python ---------------------------------------------------------- */

int64_t pc_tls_recv(int fd, uint8_t *buf, size_t len, int flags, int timeout_ms)
{
    struct pc_tls_rec *t = pc_tls_rec_get(fd);
    if (!t)
        return -EBADF;
    uint64_t deadline = timeout_ms < 0 ? 0 : pc_now_ns() + (uint64_t)timeout_ms * 1000000ULL;
    int64_t r;
    for (;;) {
        r = pc_tls_rec_recv(t, buf, len, flags & 1);
        if (r != -EAGAIN || (flags & 2))
            break;
        int ms = -1;
        if (timeout_ms >= 0) {
            uint64_t now = pc_now_ns();
            if (now >= deadline) {
                r = PC_TLS_WAIT_EXPIRED;
                break;
            }
            ms = (int)((deadline - now) / 1000000ULL) + 1;
        }
        struct pollfd p = { fd, POLLIN, 0 };
        if (poll(&p, 1, ms) < 0 && errno != EINTR) {
            r = -errno;
            break;
        }
    }
    pc_tls_rec_put(t);
    return r;
}

int pc_tls_send(int fd, const uint8_t *buf, size_t len)
{
    struct pc_tls_rec *t = pc_tls_rec_get(fd);
    if (!t)
        return -EBADF;
    int r = pc_tls_rec_send(t, buf, len);
    pc_tls_rec_put(t);
    return r;
}

int pc_tls_buffered(int fd)
{
    struct pc_tls_rec *t = pc_tls_rec_get(fd);
    if (!t)
        return 0;
    int b = pc_tls_rec_buffered(t);
    pc_tls_rec_put(t);
    return b;
}

void pc_tls_reason(int fd, char *out, size_t len)
{
    struct pc_tls_rec *t = pc_tls_rec_get(fd);
    out[0] = 0;
    if (!t)
        return;
    pthread_mutex_lock(&t->rx_lock);
    snprintf(out, len, "%s", t->why);
    pthread_mutex_unlock(&t->rx_lock);
    pc_tls_rec_put(t);
}
