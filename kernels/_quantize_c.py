"""C source of the CPU library and its ctypes signatures (built by quantize_cpu): blockwise
quantization, and CenteredClip's first pass (``swarm.training.robust_buffers``)."""

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

/* CenteredClip's first pass over a part (swarm/training/robust_buffers.py): per column, the
   members' (clipped) values rows[i][c] * factors[i], their weighted mean (written to mean[c]),
   the start point (the lower median through the compare-exchange network, or the mean when
   median_wire < 0) and the Gram matrix of the offsets from it, accumulated in float32 lanes per
   piece of columns and added to gram (count x count, float64) piece by piece. Same operations in
   the same order on every call: the same bits. count <= CLIP_MAX_ROWS. */
#define CLIP_MAX_ROWS 8
#define CLIP_PIECE 512
#define CLIP_LANES 16

void swarm_clip_start(const float *const *rows, const float *factors, const float *shares, int64_t count,
                      int64_t n, const int32_t *network, int64_t comparators, int64_t median_wire,
                      float *mean, double *gram) {
    float values[CLIP_MAX_ROWS][CLIP_PIECE], wires[CLIP_MAX_ROWS][CLIP_PIECE], start[CLIP_PIECE];
    float lanes[CLIP_MAX_ROWS][CLIP_MAX_ROWS][CLIP_LANES];
    for (int64_t base = 0; base < n; base += CLIP_PIECE) {
        int64_t len = n - base < CLIP_PIECE ? n - base : CLIP_PIECE;
        for (int64_t r = 0; r < count; r++) {
            const float *src = rows[r] + base;
            float f = factors[r];
            for (int64_t j = 0; j < len; j++) values[r][j] = src[j] * f;
        }
        float *out = mean + base;
        for (int64_t j = 0; j < len; j++) out[j] = 0.0f;
        for (int64_t r = 0; r < count; r++) {
            float w = shares[r];
            for (int64_t j = 0; j < len; j++) out[j] += values[r][j] * w;
        }
        if (median_wire < 0) {
            for (int64_t j = 0; j < len; j++) start[j] = out[j];
        } else {
            for (int64_t r = 0; r < count; r++) memcpy(wires[r], values[r], (size_t)len * sizeof(float));
            for (int64_t k = 0; k < comparators; k++) {
                const int32_t *cmp = network + 4 * k; /* low wire, high wire, want min, want max */
                float *low = wires[cmp[0]], *high = wires[cmp[1]];
                if (cmp[2] && cmp[3]) {
                    for (int64_t j = 0; j < len; j++) {
                        float a = low[j], b = high[j];
                        low[j] = b < a ? b : a;
                        high[j] = b < a ? a : b;
                    }
                } else if (cmp[2]) {
                    for (int64_t j = 0; j < len; j++) low[j] = high[j] < low[j] ? high[j] : low[j];
                } else {
                    for (int64_t j = 0; j < len; j++) high[j] = high[j] < low[j] ? low[j] : high[j];
                }
            }
            memcpy(start, wires[median_wire], (size_t)len * sizeof(float));
        }
        for (int64_t r = 0; r < count; r++)
            for (int64_t j = 0; j < len; j++) values[r][j] -= start[j];
        for (int64_t r = 0; r < count; r++)
            for (int64_t q = 0; q <= r; q++) {
                float *acc = lanes[r][q];
                for (int64_t l = 0; l < CLIP_LANES; l++) acc[l] = 0.0f;
                int64_t j = 0;
                for (; j + CLIP_LANES <= len; j += CLIP_LANES)
                    for (int64_t l = 0; l < CLIP_LANES; l++) acc[l] += values[r][j + l] * values[q][j + l];
                for (int64_t l = 0; j + l < len; l++) acc[l] += values[r][j + l] * values[q][j + l];
                double sum = 0.0;
                for (int64_t l = 0; l < CLIP_LANES; l++) sum += (double)acc[l];
                gram[r * count + q] += sum;
                if (q != r) gram[q * count + r] += sum;
            }
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
    # rows, factors, shares, count, n, network, comparators, median wire, mean, gram
    library.swarm_clip_start.argtypes = [*[pointer] * 3, size, size, pointer, size, size, pointer, pointer]
    for function in (
        library.swarm_quantize_int8,
        library.swarm_dequantize_int8,
        library.swarm_quantize_4bit,
        library.swarm_dequantize_4bit,
        library.swarm_clip_start,
    ):
        function.restype = None
