"""C source of the CPU quantize library and its ctypes signatures (built by quantize_cpu)."""

from __future__ import annotations

import ctypes

# Written so gcc/clang -O3 auto-vectorise every inner loop:
# - absmax as an unsigned max over the float bits with the sign cleared (for non-negative
#   floats integer order is float order; NaN's bits are above +inf, so NaN propagates
#   like torch.amax),
# - round-half-to-even by adding and subtracting 1.5 * 2**23 (exact for |v| < 2**22,
#   and every value rounded here is within [-128, 128]),
# - clamping with plain comparisons (min/max instructions).
SOURCE = r"""
#include <stdint.h>
#include <math.h>
#include <string.h>

#define ROUND_MAGIC 12582912.0f /* 1.5 * 2^23 */
#define PIECE 256               /* elements of a block handled at once (even, fits L1) */

static inline float round_even(float v) { return (v + ROUND_MAGIC) - ROUND_MAGIC; }

static float absmax(const float *x, int64_t n) {
    const uint32_t *bits = (const uint32_t *)x;
    uint32_t best = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t a = bits[i] & 0x7fffffffu;
        best = a > best ? a : best;
    }
    float out;
    memcpy(&out, &best, sizeof out);
    return out;
}

void swarm_quantize_int8(const float *x, int64_t n, int64_t block, int8_t *codes, float *scales) {
    for (int64_t b = 0, start = 0; start < n; b++, start += block) {
        int64_t len = n - start < block ? n - start : block;
        const float *xb = x + start;
        int8_t *cb = codes + start;
        float m = absmax(xb, len);
        scales[b] = m;
        /* torch computes 127.0 / tensor as reciprocal(tensor) * 127.0: same rounding here. */
        float inv = (1.0f / (m > 0.0f ? m : 1.0f)) * 127.0f;
        for (int64_t i = 0; i < len; i++) {
            float v = round_even(xb[i] * inv);
            v = v < -127.0f ? -127.0f : v;
            v = v > 127.0f ? 127.0f : v;
            cb[i] = (int8_t)(int32_t)v;
        }
    }
}

void swarm_dequantize_int8(const int8_t *codes, int64_t n, int64_t block, const float *scales, float *out) {
    for (int64_t b = 0, start = 0; start < n; b++, start += block) {
        int64_t len = n - start < block ? n - start : block;
        float step = scales[b] / 127.0f;
        for (int64_t i = 0; i < len; i++) out[start + i] = (float)codes[start + i] * step;
    }
}

/* 4-bit codes of one piece (len <= PIECE) of a block whose absmax is `safe`. */
static void encode_piece(const float *x, int64_t len, float safe, const float *levels, int use_int4,
                         uint8_t *out) {
    float normalized[PIECE];
    for (int64_t i = 0; i < len; i++) normalized[i] = x[i] / safe;
    if (use_int4) {
        for (int64_t i = 0; i < len; i++) {
            float v = round_even(normalized[i] * 7.0f);
            v = v < -7.0f ? -7.0f : v;
            v = v > 7.0f ? 7.0f : v;
            out[i] = (uint8_t)((int32_t)v + 7);
        }
        return;
    }
    /* Nearest level, first one on ties: the reference's argmin over |x - level|. The
       levels are sorted, so the rounded distances fall strictly and then rise; the
       first argmin is the number of steps where the distance still falls. Counting
       keeps everything in registers and vectorises over elements. */
    float l[16];
    for (int k = 0; k < 16; k++) l[k] = levels[k];
    for (int64_t i = 0; i < len; i++) {
        float n = normalized[i];
        float previous = fabsf(n - l[0]);
        int32_t index = 0;
        for (int k = 1; k < 16; k++) {
            float d = fabsf(n - l[k]);
            index += d < previous;
            previous = d;
        }
        out[i] = (uint8_t)index;
    }
}

void swarm_quantize_4bit(const float *x, int64_t n, int64_t block, const float *levels, int use_int4,
                         uint8_t *packed, float *scales) {
    uint8_t codes[PIECE + 1];
    for (int64_t b = 0, start = 0; start < n; b++, start += block) {
        int64_t len = n - start < block ? n - start : block;
        float m = absmax(x + start, len);
        scales[b] = m;
        float safe = m > 0.0f ? m : 1.0f;
        for (int64_t p = 0; p < len; p += PIECE) {
            int64_t piece = len - p < PIECE ? len - p : PIECE;
            encode_piece(x + start + p, piece, safe, levels, use_int4, codes);
            codes[piece] = 0; /* odd tail: the high nibble of the last byte is 0 */
            uint8_t *dst = packed + (start + p) / 2;
            for (int64_t j = 0; j < (piece + 1) / 2; j++)
                dst[j] = (uint8_t)(codes[2 * j] | (codes[2 * j + 1] << 4));
        }
    }
}

void swarm_dequantize_4bit(const uint8_t *packed, int64_t n, int64_t block, const float *scales,
                           const float *levels, float *out) {
    for (int64_t b = 0, start = 0; start < n; b++, start += block) {
        int64_t len = n - start < block ? n - start : block;
        float scale = scales[b];
        const uint8_t *src = packed + start / 2;
        float *dst = out + start;
        for (int64_t j = 0; j < len / 2; j++) {
            dst[2 * j] = levels[src[j] & 15] * scale;
            dst[2 * j + 1] = levels[src[j] >> 4] * scale;
        }
        if (len % 2) dst[len - 1] = levels[src[len / 2] & 15] * scale;
    }
}
"""


def declare(library: ctypes.CDLL) -> None:
    """Set argument types so ctypes passes 64-bit sizes and pointers correctly."""
    pointer, size, integer = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    library.swarm_quantize_int8.argtypes = [pointer, size, size, pointer, pointer]
    library.swarm_dequantize_int8.argtypes = [pointer, size, size, pointer, pointer]
    library.swarm_quantize_4bit.argtypes = [pointer, size, size, pointer, integer, pointer, pointer]
    library.swarm_dequantize_4bit.argtypes = [pointer, size, size, pointer, pointer, pointer]
    for function in (
        library.swarm_quantize_int8,
        library.swarm_dequantize_int8,
        library.swarm_quantize_4bit,
        library.swarm_dequantize_4bit,
    ):
        function.restype = None
