#include <string.h>
#include "bitmap.h"
#include "wire.h"

/* 64 bits of the bitmap starting at bit wi*64, bits >= nbits cleared. */
static inline uint64_t load_word(const uint8_t *bm, uint64_t nbits, uint64_t wi)
{
    uint64_t nbytes = (nbits + 7) / 8;
    uint64_t off = wi * 8;
    uint64_t w = 0;
    if (off + 8 <= nbytes) {
        memcpy(&w, bm + off, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        w = __builtin_bswap64(w);
#endif
    } else {
        for (uint64_t i = 0; off + i < nbytes; i++)
            w |= (uint64_t)bm[off + i] << (8 * i);
    }
    uint64_t base = wi * 64;
    if (nbits - base < 64)
        w &= (UINT64_C(1) << (nbits - base)) - 1;
    return w;
}

/* First bit >= pos that is set (want=1) or clear (want=0); nbits if none. */
static inline uint64_t find_next(const uint8_t *bm, uint64_t nbits, uint64_t pos, int want)
{
    while (pos < nbits) {
        uint64_t wi = pos >> 6;
        uint64_t w = load_word(bm, nbits, wi);
        if (!want)
            w = ~w;
        w >>= (pos & 63);
        if (w) {
            uint64_t r = pos + (uint64_t)__builtin_ctzll(w);
            return r < nbits ? r : nbits;
        }
        pos = (wi + 1) << 6;
    }
    return nbits;
}

size_t pc_bitmap_runs(const uint8_t *bitmap, uint64_t nbits, uint64_t *pos,
                      uint64_t *starts, uint64_t *lens, size_t max)
{
    size_t n = 0;
    uint64_t p = *pos;
    while (n < max) {
        uint64_t s = find_next(bitmap, nbits, p, 1);
        if (s >= nbits) {
            p = nbits;
            break;
        }
        uint64_t e = find_next(bitmap, nbits, s, 0);
        starts[n] = s;
        lens[n] = e - s;
        n++;
        p = e;
    }
    *pos = p;
    return n;
}

size_t pc_discard_encode(const uint8_t *bitmap, uint64_t nbits, uint64_t *pos,
                         const uint8_t *name, size_t name_len, uint64_t page_size,
                         size_t max_per_cmd, uint8_t *out, size_t out_cap,
                         uint64_t *stats)
{
    size_t head = pc_wire_discard_head_len(name_len);
    size_t full = head + 16 * max_per_cmd;
    size_t w = 0;
    uint64_t p = *pos;
    if (max_per_cmd == 0 || name_len == 0 || name_len > 255 || 3 + name_len + 16 * max_per_cmd > 0xFFFF)
        return 0;
    while (out_cap - w >= full) {
        uint8_t *cmd = out + w;
        uint8_t *r = cmd + head;
        size_t k = 0;
        while (k < max_per_cmd) {
            uint64_t s = find_next(bitmap, nbits, p, 1);
            if (s >= nbits) {
                p = nbits;
                break;
            }
            uint64_t e = find_next(bitmap, nbits, s, 0);
            pc_wire_discard_range(r, s * page_size, (e - s) * page_size);
            r += 16;
            stats[1] += e - s;
            k++;
            p = e;
        }
        if (k == 0)
            break;
        pc_wire_discard_head(cmd, name, name_len, k);
        w += head + 16 * k;
        stats[0] += k;
        stats[2] += 1;
        if (k < max_per_cmd)
            break;
    }
    *pos = p;
    return w;
}
