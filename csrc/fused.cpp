// Fused ops of the embedder head (NumPy references and tolerance: sdk/fused.py):
//
//   fusion_epilogue(q, outs, logits, present, out_w, out_b, ln_w, ln_b, out=None) -> (q_new, LN(q_new), gate)
//       gate = softmax(logits + (1 - present) * -1e4); q_new = q + out_w @ sum_m gate_m outs_m + out_b
//       out: None or a 3-tuple (q_new, h, gate) of arrays or None; q_new may be q
//   fire_residual(h, shallow, <FIRE weights>, scale, out=None)
//       -> h + scale * sigmoid(w.GELU(W LN(h)) + c) * MLP(shallow)
//       out may be h
//   project_normalize(q, ln_w, ln_b, w, b, dim, out=None) -> l2normalize((w @ LN(q) + b)[:dim])
//       out may be q (when dim == d)
//
// Every array argument must be a C-contiguous, aligned float32 ndarray (checked, never converted:
// pybind11's array_t caster would silently copy a float64 or strided input, and for `out` would
// write into a temporary the caller never sees); sdk.fused converts, copying, for callers that
// cannot guarantee it. `out` (optional) receives the result in place and is returned; it must have
// exactly the result's shape and overlap no input, except the one documented in-place alias per op.
//
// One pass per row over the caller's buffers, no temporaries beyond a row's scratch. The matrix
// products use `linear_rows`, of which there are two kernels: a portable scalar one and an
// AVX2+FMA one (target attribute, picked at run time from CPUID; no -march flags), processing
// four rows per weight load. Everything else (LayerNorm, GELU, softmax) is shared scalar code.
// The GIL is released while the kernels run.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "kernels.h"
#include "py_arrays.h"
#include "ops.h"

namespace py = pybind11;

namespace moon3 {
namespace {

using namespace kern;  // NOLINT: the shared kernels and checks

// ---------------------------------------------------------------------------------------------
// argument checks: no conversion, no copy

std::string type_name(const py::handle& obj) { return py::str(py::type::of(obj).attr("__name__")); }

std::string shape_of(const py::array& a) { return shape_str(py::reinterpret_borrow<Arr>(a)); }

std::string dtype_of(const py::array& a) { return py::str(a.dtype()); }

// `obj` as the float32 array it already is, or TypeError (not an ndarray, another dtype) /
// ValueError (not C-contiguous, unaligned) naming the argument and what to pass instead.
Arr take(const py::handle& obj, const char* name) {
    const std::string n(name);
    if (!py::isinstance<py::array>(obj))
        throw py::type_error(n + " must be a numpy.ndarray of float32, got " + type_name(obj));
    auto arr = py::reinterpret_borrow<py::array>(obj);
    if (!py::isinstance<py::array_t<float>>(arr))  // also refuses byte-swapped float32
        throw py::type_error(n + " must have dtype float32 (native byte order), got " + dtype_of(arr) + " " +
                             shape_of(arr) + "; pass " + n + ".astype(np.float32), or call sdk.fused, which converts "
                             "(copying)");
    if (!(arr.flags() & py::array::c_style))
        throw py::value_error(n + " must be C-contiguous, got a strided " + shape_of(arr) +
                              " view; pass np.ascontiguousarray(" + n + "), or call sdk.fused, which copies it");
    if (!(arr.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
        throw py::value_error(n + " must be aligned to 4 bytes; pass a copy, np.array(" + n + ")");
    return py::reinterpret_borrow<Arr>(arr);
}

bool overlap(const Arr& a, const Arr& b) {
    const auto ab = reinterpret_cast<std::uintptr_t>(a.data()), bb = reinterpret_cast<std::uintptr_t>(b.data());
    return a.nbytes() > 0 && b.nbytes() > 0 && ab < bb + static_cast<std::uintptr_t>(b.nbytes()) &&
           bb < ab + static_cast<std::uintptr_t>(a.nbytes());
}

using Named = std::pair<const Arr*, const char*>;

// An `out` argument: None -> a fresh array of `shape`; else the caller's array, which must have
// exactly that shape, be writeable and overlap none of `others` -- except that it may be the very
// buffer of `alias` (same start, same shape) where the op is written to work in place.
Arr take_out(const py::handle& obj, const char* name, std::initializer_list<i64> shape,
             const std::vector<Named>& others, const Named& alias = {nullptr, nullptr}) {
    const std::vector<py::ssize_t> want(shape.begin(), shape.end());
    if (obj.is_none()) return Arr(want);
    const std::string n(name);
    auto fix = [&] {
        std::string t = "(";
        for (size_t k = 0; k < want.size(); ++k) t += (k ? ", " : "") + std::to_string(want[k]);
        return "; allocate it with np.empty(" + t + (want.size() == 1 ? ",)" : ")") + ", np.float32)";
    };
    if (!py::isinstance<py::array>(obj))
        throw py::type_error(n + " must be a numpy.ndarray or None, got " + type_name(obj));
    auto arr = py::reinterpret_borrow<py::array>(obj);
    if (!py::isinstance<py::array_t<float>>(arr))
        throw py::type_error(n + " must have dtype float32 (native byte order), got " + dtype_of(arr) + fix());
    Arr out = py::reinterpret_borrow<Arr>(arr);
    expect(out, name, shape);
    if (!(arr.flags() & py::array::c_style) || !(arr.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
        throw py::value_error(n + " must be C-contiguous and aligned: the result is written into it" + fix());
    if (!out.writeable()) throw py::value_error(n + " is read-only; pass a writeable array");
    auto refuse = [&](const char* other) {
        throw py::value_error(n + " overlaps " + other + "; pass a separate buffer" +
                              (alias.first ? std::string(" (or ") + alias.second + " itself, to work in place)" : ""));
    };
    for (const Named& a : others)
        if (overlap(out, *a.first)) refuse(a.second);
    if (alias.first && overlap(out, *alias.first) &&
        !(out.data() == alias.first->data() && out.nbytes() == alias.first->nbytes()))
        refuse(alias.second);
    return out;
}

// ---------------------------------------------------------------------------------------------
// ops

py::tuple fusion_epilogue(const py::object& q_obj, const py::object& outs_obj, const py::object& logits_obj,
                          const py::object& present_obj, const py::object& out_w_obj, const py::object& out_b_obj,
                          const py::object& ln_w_obj, const py::object& ln_b_obj, const py::object& out_obj,
                          bool force_scalar) {
    const Arr q = take(q_obj, "q"), outs = take(outs_obj, "outs"), logits = take(logits_obj, "logits"),
              present = take(present_obj, "present"), out_w = take(out_w_obj, "out_w"),
              out_b = take(out_b_obj, "out_b"), ln_w = take(ln_w_obj, "ln_w"), ln_b = take(ln_b_obj, "ln_b");
    if (q.ndim() != 2) throw std::invalid_argument("q must be (B, d), got " + shape_str(q));
    const i64 B = q.shape(0), d = q.shape(1);
    if (outs.ndim() != 3) throw std::invalid_argument("outs must be (B, M, d), got " + shape_str(outs));
    const i64 M = outs.shape(1);
    expect(outs, "outs", {B, M, d});
    expect(logits, "logits", {B, M});
    expect(present, "present", {B, M});
    expect(out_w, "out_w", {d, d});
    for (auto [a, n] : {std::pair{&out_b, "out_b"}, {&ln_w, "ln_w"}, {&ln_b, "ln_b"}}) expect(*a, n, {d});

    py::object o[3] = {py::none(), py::none(), py::none()};  // (q_new, h, gate) or None each
    if (!out_obj.is_none()) {
        if (!py::isinstance<py::tuple>(out_obj) || py::len(out_obj) != 3)
            throw py::type_error(
                "out must be a 3-tuple (q_new, h, gate), each an array or None, got " +
                (py::isinstance<py::tuple>(out_obj) ? "a tuple of length " + std::to_string(py::len(out_obj))
                                                    : type_name(out_obj)));
        const auto t = py::reinterpret_borrow<py::tuple>(out_obj);
        for (size_t k = 0; k < 3; ++k) o[k] = t[k];
    }
    std::vector<Named> ins = {{&outs, "outs"},   {&logits, "logits"}, {&present, "present"}, {&out_w, "out_w"},
                              {&out_b, "out_b"}, {&ln_w, "ln_w"},     {&ln_b, "ln_b"}};
    // epilogue_rows writes q_new's row r after its last read of q's row r: q_new may be q.
    Arr q_new = take_out(o[0], "out[0] (q_new)", {B, d}, ins, {&q, "q"});
    ins.insert(ins.end(), {{&q, "q"}, {&q_new, "out[0] (q_new)"}});
    Arr h = take_out(o[1], "out[1] (h)", {B, d}, ins);
    ins.push_back({&h, "out[1] (h)"});
    Arr gate = take_out(o[2], "out[2] (gate)", {B, M}, ins);

    const float *qp = q.data(), *op = outs.data(), *lp = logits.data(), *pp = present.data();
    float *qn = q_new.mutable_data(), *hp = h.mutable_data(), *gp = gate.mutable_data();
    const LinearKernel linear = pick(force_scalar);
    {
        py::gil_scoped_release release;  // every array stays referenced, so its buffer stays alive
        epilogue_rows(qp, op, lp, pp, B, M, d, out_w.data(), out_b.data(), ln_w.data(), ln_b.data(), linear, qn, hp,
                      gp);
    }
    return py::make_tuple(q_new, h, gate);
}

Arr fire_residual(const py::object& h_obj, const py::object& shallow_obj, const py::object& norm_w_obj,
                  const py::object& norm_b_obj, const py::object& gate_in_w_obj, const py::object& gate_in_b_obj,
                  const py::object& gate_out_w_obj, float gate_out_b, const py::object& mlp_norm_w_obj,
                  const py::object& mlp_norm_b_obj, const py::object& mlp_in_w_obj, const py::object& mlp_in_b_obj,
                  const py::object& mlp_out_w_obj, const py::object& mlp_out_b_obj, float scale,
                  const py::object& out_obj, bool force_scalar) {
    const Arr h = take(h_obj, "h"), shallow = take(shallow_obj, "shallow"), norm_w = take(norm_w_obj, "norm_w"),
              norm_b = take(norm_b_obj, "norm_b"), gate_in_w = take(gate_in_w_obj, "gate_in_w"),
              gate_in_b = take(gate_in_b_obj, "gate_in_b"), gate_out_w = take(gate_out_w_obj, "gate_out_w"),
              mlp_norm_w = take(mlp_norm_w_obj, "mlp_norm_w"), mlp_norm_b = take(mlp_norm_b_obj, "mlp_norm_b"),
              mlp_in_w = take(mlp_in_w_obj, "mlp_in_w"), mlp_in_b = take(mlp_in_b_obj, "mlp_in_b"),
              mlp_out_w = take(mlp_out_w_obj, "mlp_out_w"), mlp_out_b = take(mlp_out_b_obj, "mlp_out_b");
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
    // A block's rows of out are written after that block's last read of h: out may be h (h += ...).
    Arr out = take_out(out_obj, "out", {R, d},
                             {{&shallow, "shallow"}, {&norm_w, "norm_w"}, {&norm_b, "norm_b"},
                              {&gate_in_w, "gate_in_w"}, {&gate_in_b, "gate_in_b"}, {&gate_out_w, "gate_out_w"},
                              {&mlp_norm_w, "mlp_norm_w"}, {&mlp_norm_b, "mlp_norm_b"}, {&mlp_in_w, "mlp_in_w"},
                              {&mlp_in_b, "mlp_in_b"}, {&mlp_out_w, "mlp_out_w"}, {&mlp_out_b, "mlp_out_b"}},
                             {&h, "h"});
    float* op = out.mutable_data();
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
            float* ob = op + r0 * d;
            for (i64 r = 0; r < n; ++r) {
                const float z = dot_scalar(g.data() + r * H, gate_out_w.data(), H) + gate_out_b;
                const float a = scale / (1.0f + std::exp(-z));
                for (i64 i = 0; i < d; ++i) ob[r * d + i] = hb[r * d + i] + a * y[r * d + i];
            }
        }
    }
    return out;
}

Arr project_normalize(const py::object& q_obj, const py::object& ln_w_obj, const py::object& ln_b_obj,
                      const py::object& w_obj, const py::object& b_obj, i64 dim, const py::object& out_obj,
                      bool force_scalar) {
    const Arr q = take(q_obj, "q"), ln_w = take(ln_w_obj, "ln_w"), ln_b = take(ln_b_obj, "ln_b"), w = take(w_obj, "w"),
              b = take(b_obj, "b");
    if (q.ndim() != 2) throw std::invalid_argument("q must be (B, d), got " + shape_str(q));
    if (w.ndim() != 2) throw std::invalid_argument("w must be (D, d), got " + shape_str(w));
    const i64 B = q.shape(0), d = q.shape(1), D = w.shape(0);
    expect(ln_w, "ln_w", {d});
    expect(ln_b, "ln_b", {d});
    expect(w, "w", {D, d});
    expect(b, "b", {D});
    if (dim < 1 || dim > D)
        throw std::invalid_argument("dim must be in [1, " + std::to_string(D) + "], got " + std::to_string(dim));
    // project_normalize_rows reads all of q (into its LayerNorm scratch) before it writes out: out may be q.
    Arr out =
        take_out(out_obj, "out", {B, dim}, {{&ln_w, "ln_w"}, {&ln_b, "ln_b"}, {&w, "w"}, {&b, "b"}}, {&q, "q"});
    float* op = out.mutable_data();
    const LinearKernel linear = pick(force_scalar);
    {
        py::gil_scoped_release release;
        project_normalize_rows(q.data(), B, d, ln_w.data(), ln_b.data(), w.data(), b.data(), dim, linear, op);
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
          py::arg("out_w"), py::arg("out_b"), py::arg("ln_w"), py::arg("ln_b"), py::arg("out") = py::none(),
          py::kw_only(), py::arg("force_scalar") = false,
          "Modality-fusion epilogue -> (q_new, LayerNorm(q_new), gate), written into out=(q_new, h, gate) where "
          "given (each an array or None; q_new may be q); see sdk.fused.fusion_epilogue.");
    m.def("fire_residual", &fire_residual, py::arg("h"), py::arg("shallow"), py::arg("norm_w"), py::arg("norm_b"),
          py::arg("gate_in_w"), py::arg("gate_in_b"), py::arg("gate_out_w"), py::arg("gate_out_b"),
          py::arg("mlp_norm_w"), py::arg("mlp_norm_b"), py::arg("mlp_in_w"), py::arg("mlp_in_b"),
          py::arg("mlp_out_w"), py::arg("mlp_out_b"), py::arg("scale"), py::arg("out") = py::none(), py::kw_only(),
          py::arg("force_scalar") = false,
          "FIRE residual enhancement of (R, d) token states, into out where given (out may be h); "
          "see sdk.fused.fire_residual.");
    m.def("project_normalize", &project_normalize, py::arg("q"), py::arg("ln_w"), py::arg("ln_b"), py::arg("w"),
          py::arg("b"), py::arg("dim"), py::arg("out") = py::none(), py::kw_only(), py::arg("force_scalar") = false,
          "LayerNorm -> projection -> Matryoshka truncation -> L2 norm, into out where given (out may be q); "
          "see sdk.fused.project_normalize.");
    m.def("linear", &linear, py::arg("x"), py::arg("w"), py::arg("b") = py::none(), py::arg("force_scalar") = false,
          "x @ w.T + b for x (..., k), w (m, k) in PyTorch's layout, b (m,) or None; one thread, no BLAS.");
    m.def("fused_kernel", [] { return std::string(use_avx2() ? "avx2" : "scalar"); },
          "Name of the matrix kernel the fused ops run here: 'avx2' or 'scalar'.");
}

}  // namespace moon3
