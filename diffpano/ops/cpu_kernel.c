// Fused spherical epipolar attention on the CPU (fp32). Each target row interpolates its K*S samples' keys and
// values into a small buffer (L1/L2 sized), so nothing per sample ever reaches main memory. Each call handles the
// rows [row_begin, row_end); the caller runs disjoint ranges on its threads (ctypes releases the GIL).
// Tensor layouts: diffpano/epipolar_ops/layout.py.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int64_t r[4];
    float w[4];
} Corners;

#define ROW_BITS 0x1FFFFFFF  // layout.py: the top-left corner's row; bit 29: column w-1 (wraps); bit 30: bottom row
#define WRAPS (1 << 29)
#define BOTTOM (1 << 30)

// The four source rows of a sample with encoded top-left corner `base` and fractions (fx, fy); longitude wraps.
static inline Corners corners(int32_t base, const float *frac, int64_t width) {
    Corners c;
    int64_t r = base & ROW_BITS;
    int64_t x1 = (base & WRAPS) ? r - (width - 1) : r + 1;
    int64_t dy = (base & BOTTOM) ? 0 : width;
    float fx = frac[0], fy = frac[1];
    c.r[0] = r; c.r[1] = x1; c.r[2] = r + dy; c.r[3] = x1 + dy;
    c.w[0] = (1.f - fx) * (1.f - fy); c.w[1] = fx * (1.f - fy); c.w[2] = (1.f - fx) * fy; c.w[3] = fx * fy;
    return c;
}

static inline float dot(const float *a, const float *b, int64_t n) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline void axpy(float a, const float *x, float *y, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

// Bilinear keys and values (2 * heads * dim each) of a row's usable samples into samp, one pass per sample.
static void interpolate(const float *kv_copy, const int32_t *base, const float *frac, int64_t samples, int64_t width2,
                        int64_t width, float *samp) {
    for (int64_t j = 0; j < samples; j++) {
        if (base[j] < 0) continue;
        Corners c = corners(base[j], frac + 2 * j, width);
        const float *a = kv_copy + c.r[0] * width2, *b = kv_copy + c.r[1] * width2;
        const float *e = kv_copy + c.r[2] * width2, *f = kv_copy + c.r[3] * width2;
        float *s = samp + j * width2, w0 = c.w[0], w1 = c.w[1], w2 = c.w[2], w3 = c.w[3];
#pragma omp simd
        for (int64_t i = 0; i < width2; i++) s[i] = w0 * a[i] + w1 * b[i] + w2 * e[i] + w3 * f[i];
    }
}

// Per-head geometry query qg = geo_k^T q (rank; geo_k_t is geo_k as (heads, rank, dim)) and null logit of a row.

static void geometry_query(const float *qrow, const float *geo_k_t, const float *null_key, int64_t heads,
                           int64_t dim, int64_t rank, float *qg, float *nl) {
    for (int64_t h = 0; h < heads; h++) {
        const float *qv = qrow + h * dim;
        for (int64_t r = 0; r < rank; r++) qg[h * rank + r] = dot(qv, geo_k_t + (h * rank + r) * dim, dim);
        nl[h] = dot(qv, null_key + h * dim, dim);
    }
}

// A (heads, dim, rank) matrix as (heads, rank, dim), so its products run along dim (vectorised); caller frees.
static float *transposed(const float *m, int64_t heads, int64_t dim, int64_t rank) {
    float *t = malloc(sizeof(float) * heads * rank * dim);
    for (int64_t h = 0; h < heads; h++)
        for (int64_t d = 0; d < dim; d++)
            for (int64_t g = 0; g < rank; g++) t[(h * rank + g) * dim + d] = m[(h * dim + d) * rank + g];
    return t;
}

// Logits (heads, samples) of one row from its interpolated keys; returns per-head maxima (with the null) in top.
static void logits_of(const float *qv, const float *qgv, const float *nlv, const float *code, const int32_t *base,
                      const float *samp, int64_t heads, int64_t dim, int64_t rank, int64_t samples, float *logits,
                      float *top) {
    int64_t width2 = 2 * heads * dim;
    for (int64_t h = 0; h < heads; h++) {
        float m = nlv[h];
        for (int64_t j = 0; j < samples; j++) {
            float l = -INFINITY;
            if (base[j] >= 0)
                l = dot(qv + h * dim, samp + j * width2 + h * dim, dim) + dot(qgv + h * rank, code + j * rank, rank);
            logits[h * samples + j] = l;
            if (l > m) m = l;
        }
        top[h] = m;
    }
}

// Softmax weights (heads, samples) in place of the logits; returns nothing, writes lse (heads).
static void softmax_of(const float *nlv, const int32_t *base, const float *top, int64_t heads, int64_t samples,
                       float *logits, float *lse) {
    for (int64_t h = 0; h < heads; h++) {
        float *lh = logits + h * samples, total = expf(nlv[h] - top[h]);
        for (int64_t j = 0; j < samples; j++) total += (lh[j] = base[j] < 0 ? 0.f : expf(lh[j] - top[h]));
        float inv = 1.f / total;
        for (int64_t j = 0; j < samples; j++) lh[j] *= inv;
        lse[h] = top[h] + logf(total);
    }
}

// Softmax-weighted geometry code (heads, rank) of one row.
static void weighted_code(const float *attn, const float *code, const int32_t *base, int64_t heads, int64_t rank,
                          int64_t samples, float *acc) {
    for (int64_t h = 0; h < heads; h++) {
        float *ah = acc + h * rank;
        for (int64_t r = 0; r < rank; r++) ah[r] = 0.f;
        for (int64_t j = 0; j < samples; j++)
            if (base[j] >= 0) axpy(attn[h * samples + j], code + j * rank, ah, rank);
    }
}

void ea_forward(const float *q, const float *kv, const float *code, const float *geo_k, const float *geo_v,
                const float *null_key, const int32_t *base, const float *frac, float *out, float *lse,
                int64_t copies, int64_t rows, int64_t heads, int64_t dim, int64_t rank, int64_t samples,
                int64_t width, int64_t row_begin, int64_t row_end) {
    const int64_t width2 = 2 * heads * dim;
    {
        float *samp = malloc(sizeof(float) * samples * width2), *logits = malloc(sizeof(float) * heads * samples);
        float *top = malloc(sizeof(float) * heads), *qg = malloc(sizeof(float) * heads * rank);
        float *nl = malloc(sizeof(float) * heads), *acc = malloc(sizeof(float) * heads * rank);
        float *gv_t = transposed(geo_v, heads, dim, rank), *gk_t = transposed(geo_k, heads, dim, rank);
        for (int64_t row = row_begin; row < row_end; row++) {
            const int32_t *b = base + row * samples;
            const float *f = frac + 2 * row * samples, *cr = code + row * samples * rank;
            for (int64_t c = 0; c < copies; c++) {
                int64_t at = (c * rows + row) * heads;
                const float *qrow = q + at * dim;
                interpolate(kv + c * rows * width2, b, f, samples, width2, width, samp);
                geometry_query(qrow, gk_t, null_key, heads, dim, rank, qg, nl);
                logits_of(qrow, qg, nl, cr, b, samp, heads, dim, rank, samples, logits, top);
                softmax_of(nl, b, top, heads, samples, logits, lse + at);
                weighted_code(logits, cr, b, heads, rank, samples, acc);
                for (int64_t h = 0; h < heads; h++) {
                    float *o = out + (at + h) * dim;
                    memset(o, 0, sizeof(float) * dim);
                    for (int64_t g = 0; g < rank; g++) axpy(acc[h * rank + g], gv_t + (h * rank + g) * dim, o, dim);
                    for (int64_t j = 0; j < samples; j++)
                        if (b[j] >= 0) axpy(logits[h * samples + j], samp + j * width2 + (heads + h) * dim, o, dim);
                }
            }
        }
        free(samp); free(logits); free(top); free(qg); free(nl); free(acc); free(gv_t); free(gk_t);
    }
}

// Gradients of ea_forward (the softmax is recomputed, not read back). dkv_out (kv-sized) and dweights
// ((geo_k, geo_v, null_key)-sized) are zeroed buffers of this call's own, summed by the caller over its calls, so
// concurrent calls on disjoint rows never write the same memory.
void ea_backward(const float *q, const float *kv, const float *code, const float *geo_k, const float *geo_v,
                 const float *null_key, const int32_t *base, const float *frac, const float *dout,
                 float *dq, float *dkv_out, float *dcode, float *dweights, int64_t copies, int64_t rows,
                 int64_t heads, int64_t dim, int64_t rank, int64_t samples, int64_t width,
                 int64_t row_begin, int64_t row_end) {
    const int64_t width2 = 2 * heads * dim;
    {
        float *samp = malloc(sizeof(float) * samples * width2), *dsamp = malloc(sizeof(float) * width2);
        float *attn = malloc(sizeof(float) * heads * samples), *dlog = malloc(sizeof(float) * heads * samples);
        float *top = malloc(sizeof(float) * heads), *qg = malloc(sizeof(float) * heads * rank);
        float *nl = malloc(sizeof(float) * heads), *acc = malloc(sizeof(float) * heads * rank);
        float *dog = malloc(sizeof(float) * heads * rank), *dqg = malloc(sizeof(float) * rank);
        float *lse_row = malloc(sizeof(float) * heads), *gk_t = transposed(geo_k, heads, dim, rank);
        float *dkv = dkv_out, *dgeo_k = dweights, *dgeo_v = dgeo_k + heads * dim * rank;
        float *dnull = dgeo_v + heads * dim * rank;
        for (int64_t row = row_begin; row < row_end; row++) {
            const int32_t *b = base + row * samples;
            const float *f = frac + 2 * row * samples, *cr = code + row * samples * rank;
            float *dcr = dcode + row * samples * rank;
            memset(dcr, 0, sizeof(float) * samples * rank);
            for (int64_t c = 0; c < copies; c++) {
                int64_t at = (c * rows + row) * heads;
                const float *qrow = q + at * dim, *dorow = dout + at * dim;
                interpolate(kv + c * rows * width2, b, f, samples, width2, width, samp);
                geometry_query(qrow, gk_t, null_key, heads, dim, rank, qg, nl);
                logits_of(qrow, qg, nl, cr, b, samp, heads, dim, rank, samples, attn, top);
                softmax_of(nl, b, top, heads, samples, attn, lse_row);
                weighted_code(attn, cr, b, heads, rank, samples, acc);
                float *dqrow = dq + at * dim;
                for (int64_t h = 0; h < heads; h++) {
                    const float *dov = dorow + h * dim, *qv = qrow + h * dim;
                    float *ah = attn + h * samples, *dh = dlog + h * samples, *dg = dog + h * rank, mean = 0.f;
                    for (int64_t r = 0; r < rank; r++) dg[r] = 0.f;  // dL/d(weighted code) = geo_v^T dout
                    for (int64_t d = 0; d < dim; d++) {
                        axpy(dov[d], geo_v + (h * dim + d) * rank, dg, rank);
                        axpy(dov[d], acc + h * rank, dgeo_v + (h * dim + d) * rank, rank);
                    }
                    for (int64_t j = 0; j < samples; j++) {
                        dh[j] = b[j] < 0 ? 0.f
                                         : dot(dov, samp + j * width2 + (heads + h) * dim, dim) +
                                               dot(dg, cr + j * rank, rank);
                        mean += ah[j] * dh[j];
                    }
                    float dnl = -expf(nl[h] - lse_row[h]) * mean;
                    float *dqv = dqrow + h * dim;
                    for (int64_t d = 0; d < dim; d++) dqv[d] = dnl * null_key[h * dim + d];
                    axpy(dnl, qv, dnull + h * dim, dim);
                    for (int64_t r = 0; r < rank; r++) dqg[r] = 0.f;
                    for (int64_t j = 0; j < samples; j++) {
                        if (b[j] < 0) continue;
                        dh[j] = ah[j] * (dh[j] - mean);  // now dL/dlogit
                        axpy(dh[j], samp + j * width2 + h * dim, dqv, dim);
                        axpy(dh[j], cr + j * rank, dqg, rank);
                        axpy(dh[j], qg + h * rank, dcr + j * rank, rank);
                        axpy(ah[j], dg, dcr + j * rank, rank);
                    }
                    for (int64_t d = 0; d < dim; d++) {  // through qg = geo_k^T q
                        dqv[d] += dot(geo_k + (h * dim + d) * rank, dqg, rank);
                        axpy(qv[d], dqg, dgeo_k + (h * dim + d) * rank, rank);
                    }
                }
                for (int64_t j = 0; j < samples; j++) {
                    if (b[j] < 0) continue;
                    for (int64_t h = 0; h < heads; h++) {
                        const float *qv = qrow + h * dim, *dov = dorow + h * dim;
                        float dl = dlog[h * samples + j], a = attn[h * samples + j];
                        for (int64_t i = 0; i < dim; i++) {
                            dsamp[h * dim + i] = dl * qv[i];
                            dsamp[(heads + h) * dim + i] = a * dov[i];
                        }
                    }
                    Corners cs = corners(b[j], f + 2 * j, width);
                    for (int t = 0; t < 4; t++) axpy(cs.w[t], dsamp, dkv + (c * rows + cs.r[t]) * width2, width2);
                }
            }
        }
        free(samp); free(dsamp); free(attn); free(dlog); free(top); free(qg); free(nl); free(acc); free(dog);
        free(dqg); free(lse_row); free(gk_t);
    }
}
