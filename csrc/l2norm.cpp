// Fused Matryoshka truncation + L2 normalisation of embeddings:
//   y[b, :] = x[b, :dim] / max(||x[b, :dim]||_2, 1e-12)      x: (B, D), y: (B, dim)
//
// Two kernels: a portable scalar one, and an AVX2+FMA one compiled for that target per function,
// so the extension is built without -march flags, runs on any x86-64 and still compiles on
// aarch64 (scalar only). The AVX2 kernel is picked at run time from CPUID. Everything accumulates
// in float32, as torch.nn.functional.normalize does; the NumPy reference is
// sdk.ops.l2_normalize_ref and the two agree to sdk.ops.L2_NORMALIZE_ATOL.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "kernels.h"  // MOON3_FUSED_AVX2 (GCC/Clang on x86-64: target attributes and CPUID) and cpu_features
#include "ops.h"
#include "py_arrays.h"

namespace py = pybind11;

namespace moon3 {
namespace {

constexpr float kEps = 1e-12f;  // torch.nn.functional.normalize's default eps

// x: (rows, D) row-major; reads x[:, :dim] and writes y: (rows, dim) row-major.
// y may start at the same address as x (in place, even with dim < D): row b is written at or
// below where it was read and after it was read, so no element is overwritten before its read.
using RowsKernel = void (*)(const float* x, float* y, std::int64_t rows, std::int64_t D,
                            std::int64_t dim);

void l2norm_rows_scalar(const float* x, float* y, std::int64_t rows, std::int64_t D,
                        std::int64_t dim) {
    for (std::int64_t b = 0; b < rows; ++b) {
        const float* xr = x + b * D;  // (dim,) of the (D,) row
        float* yr = y + b * dim;      // (dim,)
        // Eight partial sums instead of one: a single float accumulator is a serial dependency
        // chain the compiler may not reorder, while these it vectorises with the baseline ISA
        // (SSE2 on x86-64, NEON on aarch64).
        float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        std::int64_t i = 0;
        for (; i + 8 <= dim; i += 8) {
            for (int j = 0; j < 8; ++j) acc[j] += xr[i + j] * xr[i + j];
        }
        float ss = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        for (; i < dim; ++i) ss += xr[i] * xr[i];
        const float inv = 1.0f / std::max(std::sqrt(ss), kEps);
        for (i = 0; i < dim; ++i) yr[i] = xr[i] * inv;
    }
}

#if MOON3_FUSED_AVX2

__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // (4,)
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                         // (2,)
    s = _mm_add_ss(s, _mm_movehdup_ps(s));                                          // (1,)
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) void l2norm_rows_avx2(const float* x, float* y,
                                                          std::int64_t rows, std::int64_t D,
                                                          std::int64_t dim) {
    for (std::int64_t b = 0; b < rows; ++b) {
        const float* xr = x + b * D;  // (dim,) of the (D,) row
        float* yr = y + b * dim;      // (dim,)

        // Four independent 8-lane accumulators hide the FMA latency on 128..1024-wide rows.
        __m256 acc0 = _mm256_setzero_ps();
        __m256 acc1 = _mm256_setzero_ps();
        __m256 acc2 = _mm256_setzero_ps();
        __m256 acc3 = _mm256_setzero_ps();
        std::int64_t i = 0;
        for (; i + 32 <= dim; i += 32) {
            const __m256 v0 = _mm256_loadu_ps(xr + i);
            const __m256 v1 = _mm256_loadu_ps(xr + i + 8);
            const __m256 v2 = _mm256_loadu_ps(xr + i + 16);
            const __m256 v3 = _mm256_loadu_ps(xr + i + 24);
            acc0 = _mm256_fmadd_ps(v0, v0, acc0);
            acc1 = _mm256_fmadd_ps(v1, v1, acc1);
            acc2 = _mm256_fmadd_ps(v2, v2, acc2);
            acc3 = _mm256_fmadd_ps(v3, v3, acc3);
        }
        for (; i + 8 <= dim; i += 8) {
            const __m256 v = _mm256_loadu_ps(xr + i);
            acc0 = _mm256_fmadd_ps(v, v, acc0);
        }
        float ss = hsum8(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
        for (; i < dim; ++i) ss += xr[i] * xr[i];

        const float inv = 1.0f / std::max(std::sqrt(ss), kEps);
        const __m256 vinv = _mm256_set1_ps(inv);
        i = 0;
        for (; i + 8 <= dim; i += 8) {
            _mm256_storeu_ps(yr + i, _mm256_mul_ps(_mm256_loadu_ps(xr + i), vinv));
        }
        for (; i < dim; ++i) yr[i] = xr[i] * inv;
    }
}

#endif  // MOON3_FUSED_AVX2

using kern::cpu_features;
using kern::shape_str;

struct Kernel {
    RowsKernel fn;
    const char* name;
};

const Kernel kScalarKernel{l2norm_rows_scalar, "scalar"};

const Kernel& dispatched_kernel() {
    static const Kernel kernel = [] {
#if MOON3_FUSED_AVX2
        if (cpu_features().avx2 && cpu_features().fma) return Kernel{l2norm_rows_avx2, "avx2"};
#endif
        return kScalarKernel;
    }();
    return kernel;
}

using F32Matrix = py::array_t<float, py::array::c_style>;

// Arguments are taken as plain objects and checked here rather than typed as py::array_t: the
// array_t caster would silently convert (copy) a float64 or strided input, and for `out` the
// kernel would then write into a temporary the caller never sees.
F32Matrix checked_matrix(const py::object& obj, const char* name) {
    if (!py::isinstance<py::array>(obj)) {
        throw py::type_error(std::string(name) + " must be a numpy.ndarray, got " +
                             std::string(py::str(py::type::of(obj).attr("__name__"))));
    }
    auto arr = py::reinterpret_borrow<py::array>(obj);
    if (!py::isinstance<py::array_t<float>>(arr)) {  // also rejects byte-swapped float32
        throw py::type_error(std::string(name) + " must have dtype float32 (native byte order), got " +
                             std::string(py::str(arr.dtype())) + "; convert with x.astype(np.float32)");
    }
    if (arr.ndim() != 2) {
        throw py::value_error(std::string(name) + " must be 2-D (B, D), got shape " + shape_str(arr));
    }
    if (!(arr.flags() & py::array::c_style)) {
        throw py::value_error(std::string(name) +
                              " must be C-contiguous; pass np.ascontiguousarray(" + name + ")");
    }
    if (!(arr.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_)) {
        throw py::value_error(std::string(name) +
                              " must be aligned to 4 bytes; copy it with np.array(" + name + ")");
    }
    return py::reinterpret_borrow<F32Matrix>(arr);
}

F32Matrix l2_normalize(const py::object& x_obj, py::ssize_t dim, const py::object& out_obj,
                       bool force_scalar) {
    const F32Matrix x = checked_matrix(x_obj, "x");  // (B, D)
    const py::ssize_t B = x.shape(0);
    const py::ssize_t D = x.shape(1);
    if (dim <= 0 || dim > D) {
        throw py::value_error("dim must be in [1, D] = [1, " + std::to_string(D) + "], got " +
                              std::to_string(dim));
    }

    F32Matrix out;  // (B, dim)
    if (out_obj.is_none()) {
        out = F32Matrix({B, dim});
    } else {
        out = checked_matrix(out_obj, "out");
        if (out.shape(0) != B || out.shape(1) != dim) {
            throw py::value_error("out must have shape (" + std::to_string(B) + ", " +
                                  std::to_string(dim) + "), got " + shape_str(out));
        }
        if (!out.writeable()) throw py::value_error("out is read-only");
        const auto xb = reinterpret_cast<std::uintptr_t>(x.data());
        const auto yb = reinterpret_cast<std::uintptr_t>(out.data());
        const auto xe = xb + static_cast<std::uintptr_t>(x.nbytes());
        const auto ye = yb + static_cast<std::uintptr_t>(out.nbytes());
        if (yb != xb && yb < xe && xb < ye) {
            throw py::value_error(
                "out overlaps x without starting at x; pass a separate buffer, or x itself to "
                "normalise in place");
        }
    }

    const float* xp = x.data();
    float* yp = out.mutable_data();
    const RowsKernel kernel = force_scalar ? kScalarKernel.fn : dispatched_kernel().fn;
    {
        py::gil_scoped_release nogil;  // x and out stay referenced, so their buffers stay alive
        kernel(xp, yp, B, D, dim);
    }
    return out;
}

}  // namespace

void register_l2norm(py::module_& m) {
    m.def("l2_normalize", &l2_normalize, py::arg("x"), py::arg("dim"),
          py::arg("out") = py::none(), py::kw_only(), py::arg("force_scalar") = false,
          R"doc(Truncate float32 (B, D) embeddings to their first `dim` columns and L2-normalise rows.

Returns (B, dim) float32 rows x[i, :dim] / max(||x[i, :dim]||_2, 1e-12). `x` and `out` must be
C-contiguous, aligned float32 arrays; nothing is copied. `out` may be `x` itself (in place).
`force_scalar` skips the AVX2 kernel (for tests). Raises TypeError for a non-array or a dtype
other than float32 and ValueError for a wrong shape, layout, dim or overlapping out.)doc");
    m.def(
        "l2_normalize_kernel", [] { return std::string(dispatched_kernel().name); },
        "Name of the kernel l2_normalize runs on this CPU: 'avx2' or 'scalar'.");
    m.def(
        "cpu_features",
        [] {
            py::dict d;
            d["avx2"] = cpu_features().avx2;
            d["fma"] = cpu_features().fma;
            return d;
        },
        "CPU features the kernels dispatch on, as {'avx2': bool, 'fma': bool}.");
}

}  // namespace moon3
