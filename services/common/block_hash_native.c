/* The chained page hashes of services/common/block_hash.py in one C call (no Python API: loaded
 * with ctypes; scripts/setup.sh builds it as _block_hash_native.so next to this file).
 *
 * Hashing an 85k-token prompt is 5,300 BLAKE2b-128 calls of ~100 bytes each: in Python the calls
 * themselves cost ~0.4 us a page, here the whole chain takes ~0.1 us a page. Same encoding,
 * byte for byte (tests/common/test_block_hash.py compares both with the reference on random
 * prompts); the caller falls back to hashlib when this library is absent.
 *
 * BLAKE2b is written here from its specification (RFC 7693): 12 rounds of the G function over a
 * 16-word state, the message schedule SIGMA, unkeyed, digest length in the parameter block.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static const uint64_t IV[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
};

static const uint8_t SIGMA[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
};

#define BLOCK 128
#define DIGEST 16

static inline uint64_t rotr(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

static inline uint64_t load64(const uint8_t *p) { /* a little-endian word */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
#else
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
#endif
}

#define G(a, b, c, d, x, y)          \
    do {                             \
        v[a] = v[a] + v[b] + (x);    \
        v[d] = rotr(v[d] ^ v[a], 32); \
        v[c] = v[c] + v[d];          \
        v[b] = rotr(v[b] ^ v[c], 24); \
        v[a] = v[a] + v[b] + (y);    \
        v[d] = rotr(v[d] ^ v[a], 16); \
        v[c] = v[c] + v[d];          \
        v[b] = rotr(v[b] ^ v[c], 63); \
    } while (0)

/* F: mix one 128-byte block into h; t = bytes hashed so far (this block included). */
static void compress(uint64_t h[8], const uint8_t block[BLOCK], uint64_t t, int last) {
    uint64_t v[16], m[16];
    for (int i = 0; i < 16; i++) m[i] = load64(block + 8 * i);
    for (int i = 0; i < 8; i++) {
        v[i] = h[i];
        v[i + 8] = IV[i];
    }
    v[12] ^= t; /* messages here are far below 2^64 bytes: the high word of t stays 0 */
    if (last) v[14] = ~v[14];
    for (int r = 0; r < 12; r++) {
        const uint8_t *s = SIGMA[r];
        G(0, 4, 8, 12, m[s[0]], m[s[1]]);
        G(1, 5, 9, 13, m[s[2]], m[s[3]]);
        G(2, 6, 10, 14, m[s[4]], m[s[5]]);
        G(3, 7, 11, 15, m[s[6]], m[s[7]]);
        G(0, 5, 10, 15, m[s[8]], m[s[9]]);
        G(1, 6, 11, 12, m[s[10]], m[s[11]]);
        G(2, 7, 8, 13, m[s[12]], m[s[13]]);
        G(3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++) h[i] ^= v[i] ^ v[i + 8];
}

/* BLAKE2b, unkeyed, 16-byte digest, of msg[0 .. len). */
static void blake2b_16(const uint8_t *msg, size_t len, uint8_t out[DIGEST]) {
    uint64_t h[8];
    uint8_t last[BLOCK];
    memcpy(h, IV, sizeof h);
    h[0] ^= 0x01010000ULL ^ DIGEST; /* parameter block: depth 1, fanout 1, no key, digest length */
    uint64_t t = 0;
    while (len > BLOCK) { /* every block but the last (which may be full) */
        t += BLOCK;
        compress(h, msg, t, 0);
        msg += BLOCK;
        len -= BLOCK;
    }
    memset(last, 0, BLOCK);
    memcpy(last, msg, len);
    t += len;
    compress(h, last, t, 1);
    for (int i = 0; i < DIGEST; i++) out[i] = (uint8_t)(h[i / 8] >> (8 * (i % 8)));
}

/* out[16 i .. 16 i + 16) = BLAKE2b-128(tag | parent_i | rows[i]) for i < n, where parent_0 = parent
 * and parent_i = out of page i - 1; rows are `row_len` bytes each, back to back.
 * Returns 0, or -1 when out of memory. */
int swaserve_hash_chain(const uint8_t *tag, size_t tag_len, const uint8_t *parent, const uint8_t *rows,
                        size_t n, size_t row_len, uint8_t *out) {
    size_t len = tag_len + DIGEST + row_len;
    uint8_t stack[512];
    uint8_t *msg = len <= sizeof stack ? stack : malloc(len);
    if (msg == NULL) return -1;
    memcpy(msg, tag, tag_len);
    memcpy(msg + tag_len, parent, DIGEST);
    for (size_t i = 0; i < n; i++) {
        memcpy(msg + tag_len + DIGEST, rows + i * row_len, row_len);
        blake2b_16(msg, len, out + i * DIGEST);
        memcpy(msg + tag_len, out + i * DIGEST, DIGEST);
    }
    if (msg != stack) free(msg);
    return 0;
}

/* swaserve_hash_chain over pages of token ids, the message of each page built here: out[16 i ..) =
 * BLAKE2b-128(tag | parent_i | page_size (4 bytes, big-endian) | its ids, 4 bytes big-endian each |
 * 0x00) for i < n, ids[i * page_size ..) the page's ids (host order, as a numpy uint32 array holds
 * them). The caller needs no packed copy of the prompt. Returns 0, or -1 when out of memory. */
int swaserve_hash_pages(const uint8_t *tag, size_t tag_len, const uint8_t *parent, const uint32_t *ids,
                        size_t n, size_t page_size, uint8_t *out) {
    size_t row = 4 + 4 * page_size + 1, len = tag_len + DIGEST + row;
    uint8_t stack[512];
    uint8_t *msg = len <= sizeof stack ? stack : malloc(len);
    if (msg == NULL) return -1;
    uint8_t *body = msg + tag_len + DIGEST;
    memcpy(msg, tag, tag_len);
    memcpy(msg + tag_len, parent, DIGEST);
    for (int b = 0; b < 4; b++) body[b] = (uint8_t)(page_size >> (8 * (3 - b)));
    body[row - 1] = 0;
    for (size_t i = 0; i < n; i++) {
        const uint32_t *page = ids + i * page_size;
        uint8_t *p = body + 4;
        for (size_t j = 0; j < page_size; j++, p += 4) {
            uint32_t v = page[j];
            p[0] = (uint8_t)(v >> 24);
            p[1] = (uint8_t)(v >> 16);
            p[2] = (uint8_t)(v >> 8);
            p[3] = (uint8_t)v;
        }
        blake2b_16(msg, len, out + i * DIGEST);
        memcpy(msg + tag_len, out + i * DIGEST, DIGEST);
    }
    if (msg != stack) free(msg);
    return 0;
}
