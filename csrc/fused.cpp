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

#include <vector>

#include "kernels.h"
#include "ops.h"

namespace py = pybind11;

namespace moon3 {
namespace {

using namespace kern;  // NOLINT: the shared kernels and checks

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
        epilogue_rows(qp, op, lp, pp, B, M, d, out_w.data(), out_b.data(), ln_w.data(), ln_b.data(), linear, qn, hp,
                      gp);
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
        project_normalize_rows(q.data(), B, d, ln_w.data(), ln_b.data(), w.data(), b.data(), dim, linear,
                               out.mutable_data());
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
