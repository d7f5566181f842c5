// Fused spherical epipolar attention on the CPU (fp32). Each target row interpolates its K*S samples' keys and
// values into a small per-thread buffer (L1/L2 sized), so nothing per sample ever reaches main memory.
// Tensor layouts: diffpano/epipolar_ops/layout.py.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

typedef struct {
    int64_t r[4];
    float w[4];
} Corners;

// The four source rows of a sample whose top-left corner is row `base`, with fractions (fx, fy); longitude wraps.
static inline Corners corners(int32_t base, const float *frac, int64_t height, int64_t width) {
    Corners c;
    int64_t x0 = base % width, y0 = (base / width) % height;
    int64_t x1 = (x0 + 1 == width) ? base - x0 : base + 1;
    int64_t dy = (y0 + 1 < height) ? width : 0;
    float fx = frac[0], fy = frac[1];
    c.r[0] = base; c.r[1] = x1; c.r[2] = base + dy; c.r[3] = x1 + dy;
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

// Bilinear keys and values (2 * heads * dim each) of a row's usable samples into samp; returns nothing for unusable.
static void interpolate(const float *kv_copy, const int32_t *base, const float *frac, int64_t samples, int64_t width2,
                        int64_t height, int64_t width, float *samp) {
    for (int64_t j = 0; j < samples; j++) {
        float *s = samp + j * width2;
        if (base[j] < 0) continue;
        Corners c = corners(base[j], frac + 2 * j, height, width);
        memset(s, 0, sizeof(float) * width2);
        for (int t = 0; t < 4; t++) axpy(c.w[t], kv_copy + c.r[t] * width2, s, width2);
    }
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

void ea_forward(const float *q, const float *kv, const float *qg, const float *nl, const float *code,
                const int32_t *base, const float *frac, float *out, float *lse, int64_t copies, int64_t rows,
                int64_t heads, int64_t dim, int64_t rank, int64_t samples, int64_t height, int64_t width) {
    const int64_t width2 = 2 * heads * dim, width_out = dim + rank;
#pragma omp parallel
    {
        float *samp = malloc(sizeof(float) * samples * width2);
        float *logits = malloc(sizeof(float) * heads * samples);
        float *top = malloc(sizeof(float) * heads);
#pragma omp for schedule(static)
        for (int64_t row = 0; row < rows; row++) {
            const int32_t *b = base + row * samples;
            const float *f = frac + 2 * row * samples, *cr = code + row * samples * rank;
            for (int64_t c = 0; c < copies; c++) {
                int64_t at = (c * rows + row) * heads;
                interpolate(kv + c * rows * width2, b, f, samples, width2, height, width, samp);
                logits_of(q + at * dim, qg + at * rank, nl + at, cr, b, samp, heads, dim, rank, samples, logits, top);
                for (int64_t h = 0; h < heads; h++) {
                    float *lh = logits + h * samples, total = expf(nl[at + h] - top[h]);
                    for (int64_t j = 0; j < samples; j++) total += (lh[j] = expf(lh[j] - top[h]));
                    float *o = out + (at + h) * width_out, inv = 1.f / total;
                    memset(o, 0, sizeof(float) * width_out);
                    for (int64_t j = 0; j < samples; j++) {
                        if (b[j] < 0) continue;
                        axpy(lh[j] * inv, samp + j * width2 + (heads + h) * dim, o, dim);
                        axpy(lh[j] * inv, cr + j * rank, o + dim, rank);
                    }
                    lse[at + h] = top[h] + logf(total);
                }
            }
        }
        free(samp); free(logits); free(top);
    }
}

// Gradients of ea_forward. dkv_threads holds one zeroed kv-sized buffer per thread (summed by the caller), so the
// scatter into reference pixels needs no atomics; dq, dqg, dnl and dcode are written.
void ea_backward(const float *q, const float *kv, const float *qg, const float *nl, const float *code,
                 const int32_t *base, const float *frac, const float *lse, const float *dout, float *dq,
                 float *dkv_threads, float *dqg, float *dnl, float *dcode, int64_t copies, int64_t rows,
                 int64_t heads, int64_t dim, int64_t rank, int64_t samples, int64_t height, int64_t width) {
    const int64_t width2 = 2 * heads * dim, width_out = dim + rank;
#pragma omp parallel
    {
        float *samp = malloc(sizeof(float) * samples * width2), *dsamp = malloc(sizeof(float) * width2);
        float *attn = malloc(sizeof(float) * heads * samples), *dlog = malloc(sizeof(float) * heads * samples);
        float *top = malloc(sizeof(float) * heads);
        float *dkv = dkv_threads + (int64_t)omp_get_thread_num() * copies * rows * width2;
#pragma omp for schedule(static)
        for (int64_t row = 0; row < rows; row++) {
            const int32_t *b = base + row * samples;
            const float *f = frac + 2 * row * samples, *cr = code + row * samples * rank;
            float *dcr = dcode + row * samples * rank;
            memset(dcr, 0, sizeof(float) * samples * rank);
            for (int64_t c = 0; c < copies; c++) {
                int64_t at = (c * rows + row) * heads;
                const float *kv_copy = kv + c * rows * width2;
                interpolate(kv_copy, b, f, samples, width2, height, width, samp);
                logits_of(q + at * dim, qg + at * rank, nl + at, cr, b, samp, heads, dim, rank, samples, attn, top);
                for (int64_t h = 0; h < heads; h++) {
                    const float *dov = dout + (at + h) * width_out, *qv = q + (at + h) * dim;
                    const float *qgv = qg + (at + h) * rank;
                    float *ah = attn + h * samples, *dh = dlog + h * samples, mean = 0.f;
                    for (int64_t j = 0; j < samples; j++) {
                        ah[j] = b[j] < 0 ? 0.f : expf(ah[j] - lse[at + h]);
                        dh[j] = b[j] < 0 ? 0.f
                                         : dot(dov, samp + j * width2 + (heads + h) * dim, dim) +
                                               dot(dov + dim, cr + j * rank, rank);
                        mean += ah[j] * dh[j];
                    }
                    dnl[at + h] = -expf(nl[at + h] - lse[at + h]) * mean;
                    float *dqv = dq + (at + h) * dim, *dqgv = dqg + (at + h) * rank;
                    memset(dqv, 0, sizeof(float) * dim);
                    memset(dqgv, 0, sizeof(float) * rank);
                    for (int64_t j = 0; j < samples; j++) {
                        if (b[j] < 0) continue;
                        dh[j] = ah[j] * (dh[j] - mean);  // now dL/dlogit
                        axpy(dh[j], samp + j * width2 + h * dim, dqv, dim);
                        axpy(dh[j], cr + j * rank, dqgv, rank);
                        axpy(dh[j], qgv, dcr + j * rank, rank);
                        axpy(ah[j], dov + dim, dcr + j * rank, rank);
                    }
                    (void)qv;
                }
                for (int64_t j = 0; j < samples; j++) {
                    if (b[j] < 0) continue;
                    for (int64_t h = 0; h < heads; h++) {
                        const float *qv = q + (at + h) * dim, *dov = dout + (at + h) * width_out;
                        float dl = dlog[h * samples + j], a = attn[h * samples + j];
                        for (int64_t i = 0; i < dim; i++) {
                            dsamp[h * dim + i] = dl * qv[i];
                            dsamp[(heads + h) * dim + i] = a * dov[i];
                        }
                    }
                    Corners cs = corners(b[j], f + 2 * j, height, width);
                    for (int t = 0; t < 4; t++) axpy(cs.w[t], dsamp, dkv + (c * rows + cs.r[t]) * width2, width2);
                }
            }
        }
        free(samp); free(dsamp); free(attn); free(dlog); free(top);
    }
}

int ea_threads(void) { return omp_get_max_threads(); }
