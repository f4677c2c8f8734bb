/* A JSON array of token ids read straight into uint32s (no Python API: loaded with ctypes by
 * services/common/json_ids.py; scripts/setup.sh builds it as _json_ids_native.so next to this file).
 *
 * An 85k-token prompt sent as ids is ~500 kB of JSON; parsing it into a list of Python ints and
 * then into an array("I") costs the router ~2-3 ms, reading it here ~0.2 ms. Only the strict form
 * is read: '[' ws int (ws ',' ws int)* ws ']' with ws in " \t\n\r" and each int "0" or a digit
 * 1-9 followed by digits, at most 4294967295. Anything else (an empty array, a sign, a fraction, an
 * exponent, a leading zero, true/false, a nested value, a trailing comma) answers -1 and the
 * caller parses the body the general way, so that every error is reported as before.
 */
#include <stddef.h>
#include <stdint.h>

static int is_ws(unsigned char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

/* s[0] must be '['. Writes the ids to out (room for cap) and the offset just past the closing ']'
 * to *end. Returns the number of ids (>= 1), or -1 if s is not such an array or holds more than
 * cap ids. */
long swaserve_json_uint32_array(const unsigned char *s, size_t n, size_t *end, uint32_t *out, size_t cap) {
    size_t i = 0, count = 0;
    if (n == 0 || s[0] != '[')
        return -1;
    i = 1;
    for (;;) {
        while (i < n && is_ws(s[i]))
            i++;
        size_t start = i;
        uint64_t v = 0;
        /* at most 10 digits fit below 2^64 with room to spare: no overflow check per digit */
        while (i < n && i - start < 11 && (unsigned)(s[i] - '0') < 10)
            v = v * 10 + (uint64_t)(s[i++] - '0');
        size_t digits = i - start;
        if (digits == 0 || digits > 10 || v > 0xFFFFFFFFULL || (s[start] == '0' && digits > 1))
            return -1; /* no id ("[]", "[,", "[1,]", "[-1"), too long, or "01": not ours */
        if (count == cap)
            return -1;
        out[count++] = (uint32_t)v;
        while (i < n && is_ws(s[i]))
            i++;
        if (i >= n)
            return -1;
        if (s[i] == ',') {
            i++;
            continue;
        }
        if (s[i] == ']') {
            *end = i + 1;
            return (long)count;
        }
        return -1; /* ".", "e", "E", an 11th digit or anything else after an int */
    }
}
