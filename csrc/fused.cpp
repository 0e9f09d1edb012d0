// Fused ops of the embedder head (NumPy references and tolerance: sdk/fused.py):
//
//   fusion_epilogue(q, outs, logits, present, out_w, out_b, ln_w, ln_b) -> (q_new, LN(q_new), gate)
//       gate = softmax(logits + (1 - present) * -1e4); q_new = q + out_w @ sum_m gate_m outs_m + out_b
//   fire_residual(h, shallow, <FIRE weights>, scale) -> h + scale * sigmoid(w.GELU(W LN(h)) + c) * MLP(shallow)
//   project_normalize(q, ln_w, ln_b, w, b, dim) -> l2normalize((w @ LN(q) + b)[:dim])
//
// One pass per row over the caller's buffers, no temporaries beyond a row's scratch. The matrix
// products use `linear_rows`, of which there are two kernels: a portable scalar one and an
// AVX2+FMA one (target attribute, picked at run time from CPUID; no -march flags), processing
// four rows per weight load. Everything else (LayerNorm, GELU, softmax) is shared scalar code.
// The GIL is released while the kernels run.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "ops.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define MOON3_FUSED_AVX2 1
#include <immintrin.h>
#else
#define MOON3_FUSED_AVX2 0
#endif

namespace py = pybind11;
using Arr = py::array_t<float, py::array::c_style | py::array::forcecast>;
using i64 = std::int64_t;

namespace moon3 {
namespace {

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

void linear_scalar(const float* X, i64 n, i64 k, const float* W, const float* b, i64 m, float* Y) {
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

__attribute__((target("avx2,fma"))) void linear_avx2(const float* X, i64 n, i64 k, const float* W, const float* b,
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

bool use_avx2() {
    static const bool ok = [] {
#if MOON3_FUSED_AVX2
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
        return false;
#endif
    }();
    return ok;
}

LinearKernel pick(bool force_scalar) {
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
// argument checks

std::string shape_str(const Arr& a) {
    std::string s = "(";
    for (py::ssize_t k = 0; k < a.ndim(); ++k) s += (k ? ", " : "") + std::to_string(a.shape(k));
    return s + (a.ndim() == 1 ? ",)" : ")");
}

void expect(const Arr& a, const char* name, std::initializer_list<i64> shape) {
    bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
    py::ssize_t k = 0;
    for (i64 s : shape) ok = ok && a.shape(k++) == s;
    if (!ok) {
        std::string want = "(";
        k = 0;
        for (i64 s : shape) want += (k++ ? ", " : "") + std::to_string(s);
        throw std::invalid_argument(std::string(name) + " must have shape " + want + (shape.size() == 1 ? ",)" : ")") +
                                    ", got " + shape_str(a));
    }
}

// ---------------------------------------------------------------------------------------------
// ops

py::tuple fusion_epilogue(const Arr& q, const Arr& outs, const Arr& logits, const Arr& present, const Arr& out_w,
                          const Arr& out_b, const Arr& ln_w, const Arr& ln_b, bool force_scalar) {
    if (q.ndim() != 2) throw std::invalid_argument("q must be (B, d), got " + shape_str(q));
    const i64 B = q.shape(0), d = q.shape(1);
    if (outs.ndim() != 3) throw std::invalid_argument("outs must be (B, M, d), got " + shape_str(outs));
    const i64 M = outs.shape(1);
    expect(outs, "outs", {B, M, d});
    expect(logits, "logits", {B, M});
    expect(present, "present", {B, M});
    expect(out_w, "out_w", {d, d});
    for (auto [a, n] : {std::pair{&out_b, "out_b"}, {&ln_w, "ln_w"}, {&ln_b, "ln_b"}}) expect(*a, n, {d});
    Arr q_new({B, d}), h({B, d}), gate({B, M});
    const float *qp = q.data(), *op = outs.data(), *lp = logits.data(), *pp = present.data();
    float *qn = q_new.mutable_data(), *hp = h.mutable_data(), *gp = gate.mutable_data();
    const LinearKernel linear = pick(force_scalar);
    {
        py::gil_scoped_release release;
        std::vector<float> fused(static_cast<size_t>(B * d));
        for (i64 r = 0; r < B; ++r) {
            float* g = gp + r * M;
            float mx = -INFINITY;
            for (i64 m = 0; m < M; ++m) {
                g[m] = lp[r * M + m] + (1.0f - pp[r * M + m]) * kNeg;
                mx = std::max(mx, g[m]);
            }
            float sum = 0.0f;
            for (i64 m = 0; m < M; ++m) sum += (g[m] = std::exp(g[m] - mx));
            for (i64 m = 0; m < M; ++m) g[m] /= sum;
            float* f = fused.data() + r * d;
            std::fill(f, f + d, 0.0f);
            for (i64 m = 0; m < M; ++m) {
                if (g[m] == 0.0f) continue;  // an absent modality adds exactly nothing
                const float* o = op + (r * M + m) * d;
                for (i64 i = 0; i < d; ++i) f[i] += g[m] * o[i];
            }
        }
        linear(fused.data(), B, d, out_w.data(), out_b.data(), d, qn);  // (B, d)
        for (i64 r = 0; r < B; ++r) {
            float* row = qn + r * d;
            for (i64 i = 0; i < d; ++i) row[i] += qp[r * d + i];
            layer_norm(row, ln_w.data(), ln_b.data(), d, hp + r * d);
        }
    }
    return py::make_tuple(q_new, h, gate);
}

Arr fire_residual(const Arr& h, const Arr& shallow, const Arr& norm_w, const Arr& norm_b, const Arr& gate_in_w,
                  const Arr& gate_in_b, const Arr& gate_out_w, float gate_out_b, const Arr& mlp_norm_w,
                  const Arr& mlp_norm_b, const Arr& mlp_in_w, const Arr& mlp_in_b, const Arr& mlp_out_w,
                  const Arr& mlp_out_b, float scale, bool force_scalar) {
    if (h.ndim() != 2) throw std::invalid_argument("h must be (R, d), got " + shape_str(h));
    if (shallow.ndim() != 2) throw std::invalid_argument("shallow must be (R, Cs), got " + shape_str(shallow));
    if (gate_in_w.ndim() != 2) throw std::invalid_argument("gate_in_w must be (H, d), got " + shape_str(gate_in_w));
    const i64 R = h.shape(0), d = h.shape(1), Cs = shallow.shape(1), H = gate_in_w.shape(0);
    expect(shallow, "shallow", {R, Cs});
    expect(norm_w, "norm_w", {d});
    expect(norm_b, "norm_b", {d});
    expect(gate_in_w, "gate_in_w", {H, d});
    expect(gate_in_b, "gate_in_b", {H});
    expect(gate_out_w, "gate_out_w", {H});
    expect(mlp_norm_w, "mlp_norm_w", {Cs});
    expect(mlp_norm_b, "mlp_norm_b", {Cs});
    expect(mlp_in_w, "mlp_in_w", {H, Cs});
    expect(mlp_in_b, "mlp_in_b", {H});
    expect(mlp_out_w, "mlp_out_w", {d, H});
    expect(mlp_out_b, "mlp_out_b", {d});
    Arr out({R, d});
    const LinearKernel linear = pick(force_scalar);
    {
        py::gil_scoped_release release;
        constexpr i64 kBlock = 16;  // rows per block: scratch stays in L1/L2
        std::vector<float> ln(kBlock * std::max(d, Cs)), g(kBlock * H), m(kBlock * H), y(kBlock * d);
        for (i64 r0 = 0; r0 < R; r0 += kBlock) {
            const i64 n = std::min(kBlock, R - r0);
            const float* hb = h.data() + r0 * d;
            const float* sb = shallow.data() + r0 * Cs;
            for (i64 r = 0; r < n; ++r) layer_norm(hb + r * d, norm_w.data(), norm_b.data(), d, ln.data() + r * d);
            linear(ln.data(), n, d, gate_in_w.data(), gate_in_b.data(), H, g.data());  // (n, H)
            for (i64 r = 0; r < n; ++r)
                layer_norm(sb + r * Cs, mlp_norm_w.data(), mlp_norm_b.data(), Cs, ln.data() + r * Cs);
            linear(ln.data(), n, Cs, mlp_in_w.data(), mlp_in_b.data(), H, m.data());  // (n, H)
            for (i64 i = 0; i < n * H; ++i) {
                g[i] = gelu(g[i]);
                m[i] = gelu(m[i]);
            }
            linear(m.data(), n, H, mlp_out_w.data(), mlp_out_b.data(), d, y.data());  // (n, d)
            float* ob = out.mutable_data() + r0 * d;
            for (i64 r = 0; r < n; ++r) {
                const float z = dot_scalar(g.data() + r * H, gate_out_w.data(), H) + gate_out_b;
                const float a = scale / (1.0f + std::exp(-z));
                for (i64 i = 0; i < d; ++i) ob[r * d + i] = hb[r * d + i] + a * y[r * d + i];
            }
        }
    }
    return out;
}

Arr project_normalize(const Arr& q, const Arr& ln_w, const Arr& ln_b, const Arr& w, const Arr& b, i64 dim,
                      bool force_scalar) {
    if (q.ndim() != 2) throw std::invalid_argument("q must be (B, d), got " + shape_str(q));
    if (w.ndim() != 2) throw std::invalid_argument("w must be (D, d), got " + shape_str(w));
    const i64 B = q.shape(0), d = q.shape(1), D = w.shape(0);
    expect(ln_w, "ln_w", {d});
    expect(ln_b, "ln_b", {d});
    expect(w, "w", {D, d});
    expect(b, "b", {D});
    if (dim < 1 || dim > D) throw std::invalid_argument("dim must be in [1, " + std::to_string(D) + "], got " + std::to_string(dim));
    Arr out({B, dim});
    const LinearKernel linear = pick(force_scalar);
    {
        py::gil_scoped_release release;
        std::vector<float> ln(static_cast<size_t>(B * d));
        for (i64 r = 0; r < B; ++r) layer_norm(q.data() + r * d, ln_w.data(), ln_b.data(), d, ln.data() + r * d);
        float* o = out.mutable_data();
        linear(ln.data(), B, d, w.data(), b.data(), dim, o);  // only the kept rows of w
        for (i64 r = 0; r < B; ++r) {
            float* row = o + r * dim;
            float ss = 0.0f;
            for (i64 i = 0; i < dim; ++i) ss += row[i] * row[i];
            const float inv = 1.0f / std::max(std::sqrt(ss), kL2Eps);
            for (i64 i = 0; i < dim; ++i) row[i] *= inv;
        }
    }
    return out;
}

Arr linear(const Arr& x, const Arr& w, const py::object& b_obj, bool force_scalar) {
    if (x.ndim() < 1) throw std::invalid_argument("x must be (..., k), got a scalar");
    if (w.ndim() != 2) throw std::invalid_argument("w must be (m, k), got " + shape_str(w));
    const i64 k = x.shape(x.ndim() - 1), m = w.shape(0);
    if (w.shape(1) != k)
        throw std::invalid_argument("w must have shape (m, " + std::to_string(k) + "), got " + shape_str(w));
    Arr b;
    if (!b_obj.is_none()) {
        b = Arr::ensure(b_obj);
        if (!b) throw std::invalid_argument("b must be a float array");
        expect(b, "b", {m});
    }
    std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
    shape.back() = m;
    Arr y(shape);
    const i64 n = k ? static_cast<i64>(x.size() / k) : 0;
    const float* bp = b_obj.is_none() ? nullptr : b.data();
    const LinearKernel kernel = pick(force_scalar);
    {
        py::gil_scoped_release release;
        kernel(x.data(), n, k, w.data(), bp, m, y.mutable_data());
    }
    return y;
}

}  // namespace

void register_fused(py::module_& m) {
    m.def("fusion_epilogue", &fusion_epilogue, py::arg("q"), py::arg("outs"), py::arg("logits"), py::arg("present"),
          py::arg("out_w"), py::arg("out_b"), py::arg("ln_w"), py::arg("ln_b"), py::arg("force_scalar") = false,
          "Modality-fusion epilogue -> (q_new, LayerNorm(q_new), gate); see sdk.fused.fusion_epilogue.");
    m.def("fire_residual", &fire_residual, py::arg("h"), py::arg("shallow"), py::arg("norm_w"), py::arg("norm_b"),
          py::arg("gate_in_w"), py::arg("gate_in_b"), py::arg("gate_out_w"), py::arg("gate_out_b"),
          py::arg("mlp_norm_w"), py::arg("mlp_norm_b"), py::arg("mlp_in_w"), py::arg("mlp_in_b"),
          py::arg("mlp_out_w"), py::arg("mlp_out_b"), py::arg("scale"), py::arg("force_scalar") = false,
          "FIRE residual enhancement of (R, d) token states; see sdk.fused.fire_residual.");
    m.def("project_normalize", &project_normalize, py::arg("q"), py::arg("ln_w"), py::arg("ln_b"), py::arg("w"),
          py::arg("b"), py::arg("dim"), py::arg("force_scalar") = false,
          "LayerNorm -> projection -> Matryoshka truncation -> L2 norm; see sdk.fused.project_normalize.");
    m.def("linear", &linear, py::arg("x"), py::arg("w"), py::arg("b") = py::none(), py::arg("force_scalar") = false,
          "x @ w.T + b for x (..., k), w (m, k) in PyTorch's layout, b (m,) or None; one thread, no BLAS.");
    m.def("fused_kernel", [] { return std::string(use_avx2() ? "avx2" : "scalar"); },
          "Name of the matrix kernel the fused ops run here: 'avx2' or 'scalar'.");
}

}  // namespace moon3
