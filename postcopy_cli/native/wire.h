/* The wire layouts the native code reads and writes: the one statement of
 * them in C (DESIGN.md section 4; the layouts are QEMU's). Each function
 * accelerates a piece of postcopy_cli/codec and is named after it; the codec
 * stays the reference (tests/test_native_wire.py runs its tables through
 * these). The native side takes only well-formed items: anything else is
 * reported as PC_WIRE_CODEC and handed back to the codec, which names the
 * error. */
#ifndef POSTCOPY_WIRE_H
#define POSTCOPY_WIRE_H
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include "pagesize.h"

/* codec.constants.RamFlag (QEMU's RAM_SAVE_FLAG_*): in the low 12 bits of a
 * record's be64 offset|flags */
#define PC_RAM_ZERO 0x02
#define PC_RAM_PAGE 0x08
#define PC_RAM_EOS 0x10
#define PC_RAM_CONTINUE 0x20
#define PC_RAM_FLAGS_MASK 0xFFFULL

/* codec.constants.Section.COMMAND, Command.POSTCOPY_RAM_DISCARD */
#define PC_SECTION_COMMAND 0x08
#define PC_CMD_POSTCOPY_RAM_DISCARD 6
/* codec.constants.RpType: MIG_RP_MSG_REQ_PAGES_ID, MIG_RP_MSG_REQ_PAGES */
#define PC_RP_REQ_PAGES_ID 3
#define PC_RP_REQ_PAGES 4

/* the item is not one the native code takes: hand it to the codec */
#define PC_WIRE_CODEC (-1)

/* ---- big-endian fields: the codec's struct formats ">H", ">I", ">Q" ---- */
static inline uint16_t pc_get_be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t pc_get_be32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return __builtin_bswap32(v);
}
static inline uint64_t pc_get_be64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return __builtin_bswap64(v);
}
static inline void pc_put_be16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline void pc_put_be32(uint8_t *p, uint32_t v)
{
    v = __builtin_bswap32(v);
    memcpy(p, &v, 4);
}
static inline void pc_put_be64(uint8_t *p, uint64_t v)
{
    v = __builtin_bswap64(v);
    memcpy(p, &v, 8);
}

/* ---- RAM records: be64 offset|flags, [u8 n, name when not CONTINUE], then
 * 4096 bytes (PAGE) or one fill byte that must be 0 (ZERO) ---- */

/* Longest record header: be64 + u8 + a 255-byte name. */
#define PC_WIRE_RAM_HEADER_MAX (8 + 1 + 255)

/* accelerates codec.encode.RamSectionEncoder.record_header: the header of
 * a record of `kind` (PC_RAM_PAGE or PC_RAM_ZERO) at `offset`, naming the
 * block when name is non-NULL (the first record of a block in a section),
 * else with CONTINUE. The caller passes a valid name (1..255 bytes) and an
 * offset aligned to the target page. Returns the header's length. */
static inline size_t pc_wire_ram_header(uint8_t *out, uint64_t offset, unsigned kind, const char *name,
                                        size_t name_len)
{
    if (!name) {
        pc_put_be64(out, offset | kind | PC_RAM_CONTINUE);
        return 8;
    }
    pc_put_be64(out, offset | kind);
    out[8] = (uint8_t)name_len;
    memcpy(out + 9, name, name_len);
    return 9 + name_len;
}

/* accelerates codec.decode.StreamDecoder._ram_record for the bulk of a
 * section: one PAGE|CONTINUE or ZERO|CONTINUE record of the current block
 * (block_len bytes) at buf[0, len). Returns the record's length and sets
 * *offset and *kind (PC_RAM_PAGE: the data follows the 8-byte header;
 * PC_RAM_ZERO), 0 if more bytes are needed to decide, or PC_WIRE_CODEC for
 * anything else (a named record, EOS, other flags, an offset beyond the
 * block, a non-zero fill byte). */
static inline int64_t pc_wire_ram_continue(const uint8_t *buf, uint64_t len, uint64_t block_len, uint64_t *offset,
                                           unsigned *kind)
{
    if (len < 8)
        return 0;
    uint64_t v = pc_get_be64(buf), flags = v & PC_RAM_FLAGS_MASK, off = v & ~PC_RAM_FLAGS_MASK;
    if (off >= block_len)
        return PC_WIRE_CODEC;
    if (flags == (PC_RAM_PAGE | PC_RAM_CONTINUE)) {
        if (len < 8 + PC_TARGET_PAGE_SIZE)
            return 0;
        *offset = off;
        *kind = PC_RAM_PAGE;
        return 8 + PC_TARGET_PAGE_SIZE;
    }
    if (flags == (PC_RAM_ZERO | PC_RAM_CONTINUE)) {
        if (len < 9)
            return 0;
        if (buf[8] != 0)
            return PC_WIRE_CODEC;
        *offset = off;
        *kind = PC_RAM_ZERO;
        return 9;
    }
    return PC_WIRE_CODEC;
}

/* ---- page requests on the return path: be16 type, be16 len, be64 start,
 * be32 len, then for REQ_PAGES_ID u8 n and the name ---- */

/* Longest request: 4 + 13 + a 255-byte name. */
#define PC_WIRE_REQ_MAX (4 + 13 + 255)

/* accelerates codec.encode.encode_rp(ReqPagesId / ReqPages): REQ_PAGES_ID
 * naming the block when name is non-NULL, else REQ_PAGES (the block of the
 * last REQ_PAGES_ID). The caller passes a valid name (1..255 bytes).
 * Returns the message's length (at most PC_WIRE_REQ_MAX). */
static inline size_t pc_wire_req_pages(uint8_t *out, uint64_t start, uint32_t len, const char *name, size_t name_len)
{
    pc_put_be64(out + 4, start);
    pc_put_be32(out + 12, len);
    if (!name) {
        pc_put_be16(out, PC_RP_REQ_PAGES);
        pc_put_be16(out + 2, 12);
        return 16;
    }
    pc_put_be16(out, PC_RP_REQ_PAGES_ID);
    pc_put_be16(out + 2, (uint16_t)(13 + name_len));
    out[16] = (uint8_t)name_len;
    memcpy(out + 17, name, name_len);
    return 17 + name_len;
}

/* A decoded request: name NULL for REQ_PAGES (the block of the last
 * REQ_PAGES_ID), else the name REQ_PAGES_ID carries (not NUL-terminated). */
struct pc_wire_req {
    uint64_t start;
    uint32_t len;
    uint8_t name_len;
    const uint8_t *name;
};

/* accelerates the framing half of codec.decode.ReturnPathDecoder.next_event
 * for REQ_PAGES_ID / REQ_PAGES: one request at m[0, avail). Returns the
 * message's length and fills *out, 0 if more bytes are needed, or
 * PC_WIRE_CODEC for any other message type or a request whose length or
 * name length is wrong. The block lookup and pc_wire_req_fits remain. */
static inline int64_t pc_wire_req_decode(const uint8_t *m, uint64_t avail, struct pc_wire_req *out)
{
    if (avail < 4)
        return 0;
    uint16_t type = pc_get_be16(m), len = pc_get_be16(m + 2);
    if (type != PC_RP_REQ_PAGES_ID && type != PC_RP_REQ_PAGES)
        return PC_WIRE_CODEC;
    if (avail < 4u + len)
        return 0;   /* partial: wait for the rest */
    if (type == PC_RP_REQ_PAGES_ID) {
        if (len < 14 || m[16] != len - 13)
            return PC_WIRE_CODEC;
        out->name_len = m[16];
        out->name = m + 17;
    } else {
        if (len != 12)
            return PC_WIRE_CODEC;
        out->name_len = 0;
        out->name = NULL;
    }
    out->start = pc_get_be64(m + 4);
    out->len = pc_get_be32(m + 12);
    return 4 + (int64_t)len;
}

/* accelerates the range checks of codec.decode.ReturnPathDecoder.next_event:
 * 1 if the request is aligned to the block's page size, not empty and
 * inside the block, else 0 (the codec names which). */
static inline int pc_wire_req_fits(const struct pc_wire_req *r, uint64_t page_size, uint64_t block_len)
{
    return !(r->start % page_size || r->len == 0 || r->len % page_size || r->start > block_len ||
             r->len > block_len - r->start);
}

/* ---- POSTCOPY_RAM_DISCARD: section 0x08, be16 cmd 6, be16 len, then the
 * payload u8 version 0, u8 n, name, 0, k x (be64 start, be64 length) ---- */

/* Bytes before the first range: the command framing plus the payload's head. */
static inline size_t pc_wire_discard_head_len(size_t name_len) { return 5 + 3 + name_len; }

/* accelerates codec.encode.encode(PostcopyRamDiscard) with
 * codec.encode.encode_discard_payload: the framing and head of a command of
 * `nranges` ranges; the ranges follow at out + pc_wire_discard_head_len().
 * The caller passes a valid name and 3 + name_len + 16 * nranges <= 0xFFFF.
 * Returns the head's length. */
static inline size_t pc_wire_discard_head(uint8_t *out, const uint8_t *name, size_t name_len, size_t nranges)
{
    out[0] = PC_SECTION_COMMAND;
    pc_put_be16(out + 1, PC_CMD_POSTCOPY_RAM_DISCARD);
    pc_put_be16(out + 3, (uint16_t)(3 + name_len + 16 * nranges));
    out[5] = 0;
    out[6] = (uint8_t)name_len;
    memcpy(out + 7, name, name_len);
    out[7 + name_len] = 0;
    return pc_wire_discard_head_len(name_len);
}

/* one range of a discard command, in bytes (accelerates the range packing
 * of codec.encode.encode_discard_payload) */
static inline void pc_wire_discard_range(uint8_t *out, uint64_t start, uint64_t length)
{
    pc_put_be64(out, start);
    pc_put_be64(out + 8, length);
}

#endif
