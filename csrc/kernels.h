// Shared building blocks of the fused CPU ops (csrc/fused.cpp, csrc/head.cpp): float32 constants
// matching torch's defaults, LayerNorm, exact-erf GELU, and the matrix kernel `linear_rows` in two
// versions -- a portable scalar one and an AVX2+FMA one compiled per function (target attribute,
// no -march flags) and picked at run time from CPUID. Pure C++ on raw pointers: the Python glue
// (array arguments and their checks) is csrc/py_arrays.h.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define MOON3_FUSED_AVX2 1
#include <immintrin.h>
#else
#define MOON3_FUSED_AVX2 0
#endif

namespace moon3 {
namespace kern {

using i64 = std::int64_t;

constexpr float kLnEps = 1e-5f;   // torch.nn.LayerNorm's default
constexpr float kNeg = -1e4f;     // the embedder's additive mask value
constexpr float kL2Eps = 1e-12f;  // torch.nn.functional.normalize's default

// Y[r, i] = sum_j X[r, j] * W[i, j] + b[i]     X: (n, k), W: (m, k), b: (m,) or null, Y: (n, m)
using LinearKernel = void (*)(const float* X, i64 n, i64 k, const float* W, const float* b, i64 m, float* Y);

inline float dot_scalar(const float* a, const float* w, i64 k) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // eight lanes: vectorisable without reassociation
    i64 j = 0;
    for (; j + 8 <= k; j += 8)
        for (int t = 0; t < 8; ++t) acc[t] += a[j + t] * w[j + t];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; j < k; ++j) s += a[j] * w[j];
    return s;
}

inline void linear_scalar(const float* X, i64 n, i64 k, const float* W, const float* b, i64 m, float* Y) {
    for (i64 r = 0; r < n; ++r)
        for (i64 i = 0; i < m; ++i) Y[r * m + i] = dot_scalar(X + r * k, W + i * k, k) + (b ? b[i] : 0.0f);
}

#if MOON3_FUSED_AVX2
__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) inline void linear_avx2(const float* X, i64 n, i64 k, const float* W, const float* b,
                                                      i64 m, float* Y) {
    i64 r = 0;
    for (; r + 4 <= n; r += 4) {  // four rows share each weight load
        const float* x0 = X + r * k;
        const float* x1 = x0 + k;
        const float* x2 = x1 + k;
        const float* x3 = x2 + k;
        for (i64 i = 0; i < m; ++i) {
            const float* w = W + i * k;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
                   a3 = _mm256_setzero_ps();
            i64 j = 0;
            for (; j + 8 <= k; j += 8) {
                const __m256 wv = _mm256_loadu_ps(w + j);
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + j), wv, a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + j), wv, a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x2 + j), wv, a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x3 + j), wv, a3);
            }
            float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
            for (; j < k; ++j) {
                s0 += x0[j] * w[j];
                s1 += x1[j] * w[j];
                s2 += x2[j] * w[j];
                s3 += x3[j] * w[j];
            }
            const float bi = b ? b[i] : 0.0f;
            Y[r * m + i] = s0 + bi;
            Y[(r + 1) * m + i] = s1 + bi;
            Y[(r + 2) * m + i] = s2 + bi;
            Y[(r + 3) * m + i] = s3 + bi;
        }
    }
    for (; r < n; ++r) {
        const float* x = X + r * k;
        for (i64 i = 0; i < m; ++i) {
            const float* w = W + i * k;
            __m256 a = _mm256_setzero_ps();
            i64 j = 0;
            for (; j + 8 <= k; j += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(w + j), a);
            float s = hsum(a);
            for (; j < k; ++j) s += x[j] * w[j];
            Y[r * m + i] = s + (b ? b[i] : 0.0f);
        }
    }
}
#endif

// The CPU features the kernels dispatch on, read once from CPUID (libgcc / compiler-rt also
// check that the OS saves the YMM registers, XGETBV).
struct CpuFeatures {
    bool avx2 = false;
    bool fma = false;
};

inline const CpuFeatures& cpu_features() {
    static const CpuFeatures features = [] {
        CpuFeatures f;
#if MOON3_FUSED_AVX2
        __builtin_cpu_init();
        f.avx2 = __builtin_cpu_supports("avx2");
        f.fma = __builtin_cpu_supports("fma");
#endif
        return f;
    }();
    return features;
}

inline bool use_avx2() { return cpu_features().avx2 && cpu_features().fma; }

inline LinearKernel pick(bool force_scalar) {
#if MOON3_FUSED_AVX2
    if (!force_scalar && use_avx2()) return linear_avx2;
#endif
    (void)force_scalar;
    return linear_scalar;
}

// y = LayerNorm(x) over n values (biased variance, as torch); y may alias x.
inline void layer_norm(const float* x, const float* w, const float* b, i64 n, float* y) {
    float mu = 0.0f;
    for (i64 i = 0; i < n; ++i) mu += x[i];
    mu /= static_cast<float>(n);
    float var = 0.0f;
    for (i64 i = 0; i < n; ++i) var += (x[i] - mu) * (x[i] - mu);
    const float inv = 1.0f / std::sqrt(var / static_cast<float>(n) + kLnEps);
    for (i64 i = 0; i < n; ++i) y[i] = (x[i] - mu) * inv * w[i] + b[i];
}

inline float gelu(float x) { return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f)); }

// ---------------------------------------------------------------------------------------------
// op bodies shared by the single fused ops and the whole head

// One modality-fusion epilogue over B rows: gate = softmax(logits + (1 - present) * kNeg) (B, M);
// q_new = q + out_w @ (sum_m gate_m outs_m) + out_b (B, d); h = LayerNorm(q_new) (B, d).
// outs: (B, M, d); q_new may alias q.
inline void epilogue_rows(const float* q, const float* outs, const float* logits, const float* present, i64 B, i64 M,
                          i64 d, const float* out_w, const float* out_b, const float* ln_w, const float* ln_b,
                          LinearKernel linear, float* q_new, float* h, float* gate) {
    std::vector<float> fused(static_cast<size_t>(B * d));
    for (i64 r = 0; r < B; ++r) {
        float* g = gate + r * M;
        float mx = -INFINITY;
        for (i64 m = 0; m < M; ++m) {
            g[m] = logits[r * M + m] + (1.0f - present[r * M + m]) * kNeg;
            mx = std::max(mx, g[m]);
        }
        float sum = 0.0f;
        for (i64 m = 0; m < M; ++m) sum += (g[m] = std::exp(g[m] - mx));
        for (i64 m = 0; m < M; ++m) g[m] /= sum;
        float* f = fused.data() + r * d;
        std::fill(f, f + d, 0.0f);
        for (i64 m = 0; m < M; ++m) {
            if (g[m] == 0.0f) continue;  // an absent modality adds exactly nothing
            const float* o = outs + (r * M + m) * d;
            for (i64 i = 0; i < d; ++i) f[i] += g[m] * o[i];
        }
    }
    std::vector<float> proj(static_cast<size_t>(B * d));
    linear(fused.data(), B, d, out_w, out_b, d, proj.data());  // (B, d)
    for (i64 r = 0; r < B; ++r) {
        float* row = q_new + r * d;
        for (i64 i = 0; i < d; ++i) row[i] = q[r * d + i] + proj[r * d + i];
        layer_norm(row, ln_w, ln_b, d, h + r * d);
    }
}

// out (B, dim) = l2normalize((w[:dim] @ LayerNorm(q) + b[:dim] + skip[:, :dim])), q: (B, d), w: (D >= dim, d);
// skip (optional): a per-row term, row r at skip + r * skip_ld (the embedder's skip path).
inline void project_normalize_rows(const float* q, i64 B, i64 d, const float* ln_w, const float* ln_b, const float* w,
                                   const float* b, i64 dim, LinearKernel linear, float* out,
                                   const float* skip = nullptr, i64 skip_ld = 0) {
    std::vector<float> ln(static_cast<size_t>(B * d));
    for (i64 r = 0; r < B; ++r) layer_norm(q + r * d, ln_w, ln_b, d, ln.data() + r * d);
    linear(ln.data(), B, d, w, b, dim, out);  // only the kept rows of w
    for (i64 r = 0; r < B; ++r) {
        float* row = out + r * dim;
        if (skip)
            for (i64 i = 0; i < dim; ++i) row[i] += skip[r * skip_ld + i];
        float ss = 0.0f;
        for (i64 i = 0; i < dim; ++i) ss += row[i] * row[i];
        const float inv = 1.0f / std::max(std::sqrt(ss), kL2Eps);
        for (i64 i = 0; i < dim; ++i) row[i] *= inv;
    }
}

// ---------------------------------------------------------------------------------------------
// packed matrix kernel: weights packed once into panels of 16 output columns, so a tile of up to
// six rows x 16 columns accumulates in registers with no horizontal sums (for weights that are
// used many times: the whole head's, packed when its kernel object is built)

constexpr i64 kPanel = 16;

struct PackedDense {  // W (m, k) in PyTorch's layout: w[(p * k + j) * 16 + c] = W[16 p + c, j]
    std::vector<float> w, b;  // zero-padded to a multiple of 16 columns
    i64 m = 0, k = 0;
};

inline PackedDense pack_dense(const float* W, const float* b, i64 m, i64 k) {
    PackedDense p;
    p.m = m;
    p.k = k;
    const i64 panels = (m + kPanel - 1) / kPanel;
    p.w.assign(static_cast<size_t>(panels * k * kPanel), 0.0f);
    p.b.assign(static_cast<size_t>(panels * kPanel), 0.0f);
    for (i64 i = 0; i < m; ++i) {
        for (i64 j = 0; j < k; ++j) p.w[((i / kPanel) * k + j) * kPanel + i % kPanel] = W[i * k + j];
        p.b[i] = b ? b[i] : 0.0f;
    }
    return p;
}

// Y (n, W.m) = X (n, W.k) @ W^T + b
using PackedKernel = void (*)(const float* X, i64 n, const PackedDense& W, float* Y);

// Portable version: a row's 16-column panel as four 4-float vectors (GCC/Clang vector extensions:
// SSE2 on x86-64, NEON on aarch64, scalar code elsewhere), two rows per panel pass.
template <int R>
inline void packed_scalar_tile(const float* X, i64 k, const float* P, const float* bias, float* Y, i64 m, i64 nc) {
#if defined(__GNUC__) || defined(__clang__)
    typedef float v4 __attribute__((vector_size(16)));
    v4 acc[R][4];
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < 4; ++v) std::memcpy(&acc[r][v], bias + 4 * v, sizeof(v4));
    for (i64 j = 0; j < k; ++j) {
        v4 w[4];
        std::memcpy(w, P + j * kPanel, sizeof(w));
        for (int r = 0; r < R; ++r) {
            const float xv = X[r * k + j];
            for (int v = 0; v < 4; ++v) acc[r][v] += xv * w[v];
        }
    }
    for (int r = 0; r < R; ++r) {
        float t[kPanel];
        std::memcpy(t, acc[r], sizeof(t));
        std::copy(t, t + nc, Y + r * m);
    }
#else
    float acc[R][kPanel];
    for (int r = 0; r < R; ++r)
        for (i64 c = 0; c < kPanel; ++c) acc[r][c] = bias[c];
    for (i64 j = 0; j < k; ++j)
        for (int r = 0; r < R; ++r)
            for (i64 c = 0; c < kPanel; ++c) acc[r][c] += X[r * k + j] * P[j * kPanel + c];
    for (int r = 0; r < R; ++r) std::copy(acc[r], acc[r] + nc, Y + r * m);
#endif
}

inline void packed_scalar(const float* X, i64 n, const PackedDense& W, float* Y) {
    const i64 k = W.k, m = W.m;
    for (i64 p = 0; p * kPanel < m; ++p) {
        const float* P = W.w.data() + p * k * kPanel;
        const float* bias = W.b.data() + p * kPanel;
        const i64 nc = std::min(kPanel, m - p * kPanel);
        i64 r = 0;
        for (; r + 2 <= n; r += 2) packed_scalar_tile<2>(X + r * k, k, P, bias, Y + r * m + p * kPanel, m, nc);
        if (r < n) packed_scalar_tile<1>(X + r * k, k, P, bias, Y + r * m + p * kPanel, m, nc);
    }
}

#if MOON3_FUSED_AVX2
template <int R>
__attribute__((target("avx2,fma"))) inline void packed_tile(const float* X, i64 k, const float* P, const float* bias,
                                                             float* Y, i64 m, i64 nc) {
    __m256 a0[R], a1[R];
    const __m256 b0 = _mm256_loadu_ps(bias), b1 = _mm256_loadu_ps(bias + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
        a0[r] = b0;
        a1[r] = b1;
    }
    for (i64 j = 0; j < k; ++j) {
        const __m256 w0 = _mm256_loadu_ps(P + j * kPanel), w1 = _mm256_loadu_ps(P + j * kPanel + 8);
#pragma GCC unroll 6
        for (int r = 0; r < R; ++r) {
            const __m256 xv = _mm256_broadcast_ss(X + r * k + j);
            a0[r] = _mm256_fmadd_ps(xv, w0, a0[r]);
            a1[r] = _mm256_fmadd_ps(xv, w1, a1[r]);
        }
    }
    if (nc == kPanel) {
#pragma GCC unroll 6
        for (int r = 0; r < R; ++r) {
            _mm256_storeu_ps(Y + r * m, a0[r]);
            _mm256_storeu_ps(Y + r * m + 8, a1[r]);
        }
    } else {  // a narrower last panel: only its nc real columns are written
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(nc)), lane);
        const __m256i m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(nc) - 8), lane);
#pragma GCC unroll 6
        for (int r = 0; r < R; ++r) {
            _mm256_maskstore_ps(Y + r * m, m0, a0[r]);
            _mm256_maskstore_ps(Y + r * m + 8, m1, a1[r]);
        }
    }
}

__attribute__((target("avx2,fma"))) inline void packed_avx2(const float* X, i64 n, const PackedDense& W, float* Y) {
    const i64 k = W.k, m = W.m;
    for (i64 p = 0; p * kPanel < m; ++p) {  // panel-outer: a panel (16 k floats) stays in cache across rows
        const float* P = W.w.data() + p * k * kPanel;
        const float* bias = W.b.data() + p * kPanel;
        const i64 nc = std::min(kPanel, m - p * kPanel);
        float* Yp = Y + p * kPanel;
        i64 r = 0;
        for (; r + 6 <= n; r += 6) packed_tile<6>(X + r * k, k, P, bias, Yp + r * m, m, nc);
        switch (n - r) {
            case 5: packed_tile<5>(X + r * k, k, P, bias, Yp + r * m, m, nc); break;
            case 4: packed_tile<4>(X + r * k, k, P, bias, Yp + r * m, m, nc); break;
            case 3: packed_tile<3>(X + r * k, k, P, bias, Yp + r * m, m, nc); break;
            case 2: packed_tile<2>(X + r * k, k, P, bias, Yp + r * m, m, nc); break;
            case 1: packed_tile<1>(X + r * k, k, P, bias, Yp + r * m, m, nc); break;
            default: break;
        }
    }
}
#endif

inline PackedKernel pick_packed(bool force_scalar) {
#if MOON3_FUSED_AVX2
    if (!force_scalar && use_avx2()) return packed_avx2;
#endif
    (void)force_scalar;
    return packed_scalar;
}

}  // namespace kern
}  // namespace moon3
