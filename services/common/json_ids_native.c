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
        if (i >= n || s[i] < '0' || s[i] > '9')
            return -1; /* an id must come: "[]", "[,", "[1,]", "[-1" and the like are not ours */
        uint64_t v = (uint64_t)(s[i] - '0');
        int leading_zero = s[i] == '0';
        i++;
        while (i < n && s[i] >= '0' && s[i] <= '9') {
            if (leading_zero)
                return -1; /* "01" is not JSON */
            v = v * 10 + (uint64_t)(s[i] - '0');
            if (v > 0xFFFFFFFFULL)
                return -1;
            i++;
        }
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
        return -1; /* ".", "e", "E" or anything else after an int */
    }
}
