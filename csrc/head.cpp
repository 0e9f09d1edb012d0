// The whole embedder head as one call (NumPy reference: sdk.head.FusionHead.forward_reference):
//
//   text/trace projection (Linear + LayerNorm) of the valid tokens
//   query start = learned query + mean of the present modalities' pooled tokens
//   n rounds of modality fusion: per-modality cross-attention of the query (LayerNorm of the
//       modality's tokens, K/V projection, softmax attention per head, output projection) ->
//       gate logits -> fusion epilogue (gate softmax, weighted sum, output projection, residual,
//       LayerNorm) -> FFN residual
//   projection, Matryoshka truncation and L2 normalisation
//
// Python's version makes ~30 matrix calls and as many temporaries per round trip at batch 1;
// here the weights are copied once, when the kernel object is built, and a forward pass is one
// call with the GIL released. Only the valid (unmasked) tokens of a title or trace are projected
// and attended to: padded positions get exactly zero attention weight in the reference (their
// additive -1e4 underflows exp), so skipping them changes nothing but the time. A modality
// marked present with no valid token at all is attended over all its positions and pools to
// zero, as the reference does. Masks are 0/1.
//
// `source` (optional, R ints) lets R query rows share B token rows: query row r reads the tokens of
// row source[r] under its own `present` mask and skip term. The K/V projections of a token row are
// computed once and shared by every query row that reads it, so the photo + title blend (the fused
// vector plus the photo-only and title-only views of the same rows) costs one set of projections.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "kernels.h"
#include "py_arrays.h"
#include "ops.h"

namespace py = pybind11;

namespace moon3 {
namespace {

using namespace kern;  // NOLINT: the shared kernels and checks
using Vec = std::vector<float>;

constexpr int kModalities = 3;  // image, text (title), trace

using Dense = PackedDense;  // y = W x + b, packed for the `packed_*` kernels

struct Raw {  // y = W x + b in PyTorch's layout, for the shared epilogue and projection bodies
    Vec w, b;
};

struct Norm {  // LayerNorm affine
    Vec w, b;
};

struct Round {  // one modality-fusion round (sdk.train.fusion_model.ModalityFusion)
    Norm q_norm, kv_norm[kModalities], ffn_norm;
    Dense q[kModalities], kv[kModalities], o[kModalities], gate_in, ffn_in, ffn_out;
    Raw out;
    Vec gate_out_w;
    float gate_out_b = 0.0f;
};

class HeadKernel {
   public:
    HeadKernel(const py::dict& weights, i64 d, i64 heads, i64 n_rounds, i64 out_dim, i64 text_dim, i64 ffn_mult)
        : d_(d), heads_(heads), out_dim_(out_dim), text_dim_(text_dim) {
        if (d < 1 || heads < 1 || d % heads != 0)
            throw std::invalid_argument("d_model must be a positive multiple of n_heads, got d_model=" +
                                        std::to_string(d) + ", n_heads=" + std::to_string(heads));
        if (n_rounds < 0 || out_dim < 1 || text_dim < 1 || ffn_mult < 1)
            throw std::invalid_argument("n_fusion_layers, out_dim, text_dim and ffn_mult must be positive");
        query_ = take(weights, "query", {1, 1, d});
        text_proj_ = dense(weights, "text_proj.0", d, text_dim);
        trace_proj_ = dense(weights, "trace_proj.0", d, text_dim);
        text_norm_ = norm(weights, "text_proj.1");
        trace_norm_ = norm(weights, "trace_proj.1");
        for (i64 k = 0; k < n_rounds; ++k) {
            const std::string f = "fusion." + std::to_string(k) + ".";
            Round r;
            r.q_norm = norm(weights, f + "q_norm");
            r.ffn_norm = norm(weights, f + "ffn.0");
            for (int m = 0; m < kModalities; ++m) {
                const std::string a = f + "attn." + std::to_string(m);
                r.kv_norm[m] = norm(weights, f + "kv_norms." + std::to_string(m));
                r.q[m] = dense(weights, a + ".q", d, d);
                r.kv[m] = dense(weights, a + ".kv", 2 * d, d);
                r.o[m] = dense(weights, a + ".o", d, d);
            }
            r.gate_in = dense(weights, f + "gate.0", d, 2 * d);
            r.gate_out_w = take(weights, f + "gate.2.weight", {1, d});
            r.gate_out_b = take(weights, f + "gate.2.bias", {1})[0];
            r.out = raw(weights, f + "out", d, d);
            r.ffn_in = dense(weights, f + "ffn.1", ffn_mult * d, d);
            r.ffn_out = dense(weights, f + "ffn.4", d, ffn_mult * d);
            rounds_.push_back(std::move(r));
        }
        head_norm_ = norm(weights, "head.0");
        head_proj_ = raw(weights, "head.1", out_dim, d);
    }

    Arr forward(const Arr& image, const Arr& text, const Arr& text_mask, const Arr& trace, const Arr& trace_mask,
                const Arr& present, i64 dim, const py::object& skip_obj, bool force_scalar,
                const py::object& source_obj) const {
        if (present.ndim() != 2) throw std::invalid_argument("present must be (R, 3), got " + shape_str(present));
        const i64 R = present.shape(0);
        expect(present, "present", {R, kModalities});
        if (image.ndim() < 1) throw std::invalid_argument("image_tokens must be (B, N, d), got " + shape_str(image));
        const i64 B = image.shape(0);  // token rows; R query rows read them (through `source`)
        std::vector<i64> source(static_cast<size_t>(R));
        if (source_obj.is_none()) {
            if (R != B)
                throw std::invalid_argument("present has " + std::to_string(R) + " rows and image_tokens " +
                                            std::to_string(B) + ": without source they must match");
            for (i64 r = 0; r < R; ++r) source[r] = r;
        } else {
            const auto src = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(source_obj);
            if (!src || src.ndim() != 1 || src.shape(0) != R)
                throw std::invalid_argument("source must be " + std::to_string(R) + " ints (one per present row)");
            for (i64 r = 0; r < R; ++r) {
                source[r] = src.data()[r];
                if (source[r] < 0 || source[r] >= B)
                    throw std::invalid_argument("source[" + std::to_string(r) + "] = " + std::to_string(source[r]) +
                                                " is not a token row (0.." + std::to_string(B - 1) + ")");
            }
        }
        if (image.ndim() != 3) throw std::invalid_argument("image_tokens must be (B, N, d), got " + shape_str(image));
        if (text.ndim() != 3) throw std::invalid_argument("text_states must be (B, T, C), got " + shape_str(text));
        if (trace.ndim() != 3) throw std::invalid_argument("trace_states must be (B, S, C), got " + shape_str(trace));
        const i64 N = image.shape(1), T = text.shape(1), S = trace.shape(1);
        expect(image, "image_tokens", {B, N, d_});
        expect(text, "text_states", {B, T, text_dim_});
        expect(text_mask, "text_mask", {B, T});
        expect(trace, "trace_states", {B, S, text_dim_});
        expect(trace_mask, "trace_mask", {B, S});
        if (dim < 1 || dim > out_dim_)
            throw std::invalid_argument("dim must be in [1, " + std::to_string(out_dim_) + "], got " +
                                        std::to_string(dim));
        Arr skip;  // (a default-constructed array is an empty one, not a null handle: has_skip says)
        const bool has_skip = !skip_obj.is_none();
        if (has_skip) {
            skip = Arr::ensure(skip_obj);
            if (!skip) throw std::invalid_argument("skip must be a float array");
            expect(skip, "skip", {R, out_dim_});
        }
        Arr out({R, dim});
        const LinearKernel linear = pick(force_scalar);
        const PackedKernel gemm = pick_packed(force_scalar);
        {
            py::gil_scoped_release release;
            run(image.data(), N, text.data(), text_mask.data(), T, trace.data(), trace_mask.data(), S, present.data(),
                B, source, dim, linear, gemm, out.mutable_data(), has_skip ? skip.data() : nullptr);
        }
        return out;
    }

   private:
    // A modality's tokens for one row: n rows of d values; pool_zero when no position was valid
    // (the attention then runs over all positions and the pooled mean is zero, as in the reference).
    struct Tokens {
        const float* x = nullptr;
        i64 n = 0;
        bool pool_zero = false;
    };

    void run(const float* image, i64 N, const float* text, const float* text_mask, i64 T, const float* trace,
             const float* trace_mask, i64 S, const float* present, i64 B, const std::vector<i64>& source, i64 dim,
             LinearKernel linear, PackedKernel gemm, float* out, const float* skip) const {
        const i64 d = d_, c = d / heads_, R = static_cast<i64>(source.size());
        // which token rows each modality is read from, and by which query rows
        std::vector<char> need(static_cast<size_t>(B * kModalities), 0);
        std::vector<std::vector<i64>> users(static_cast<size_t>(B));
        for (i64 r = 0; r < R; ++r) {
            users[source[r]].push_back(r);
            for (int m = 0; m < kModalities; ++m)
                if (present[r * kModalities + m] > 0.0f) need[source[r] * kModalities + m] = 1;
        }
        // projected title and trace tokens of every token row that is read, valid positions only
        std::vector<Vec> projected(static_cast<size_t>(B * kModalities));
        std::vector<Tokens> tok(static_cast<size_t>(B * kModalities));
        Vec gather;
        for (i64 b = 0; b < B; ++b) {
            if (need[b * kModalities]) tok[b * kModalities] = {image + b * N * d, N, false};
            for (int m = 1; m < kModalities; ++m) {
                if (!need[b * kModalities + m]) continue;
                const i64 L = m == 1 ? T : S;
                const float* states = (m == 1 ? text : trace) + b * L * text_dim_;
                const float* mask = (m == 1 ? text_mask : trace_mask) + b * L;
                i64 n = 0;
                for (i64 t = 0; t < L; ++t) n += mask[t] > 0.0f;
                const bool none = n == 0;
                if (none) n = L;
                gather.resize(static_cast<size_t>(n * text_dim_));
                for (i64 t = 0, j = 0; t < L; ++t)
                    if (none || mask[t] > 0.0f)
                        std::copy(states + t * text_dim_, states + (t + 1) * text_dim_, gather.data() + (j++) * text_dim_);
                const Dense& p = m == 1 ? text_proj_ : trace_proj_;
                const Norm& ln = m == 1 ? text_norm_ : trace_norm_;
                Vec& y = projected[b * kModalities + m];
                y.resize(static_cast<size_t>(n * d));
                gemm(gather.data(), n, p, y.data());
                for (i64 t = 0; t < n; ++t) layer_norm(y.data() + t * d, ln.w.data(), ln.b.data(), d, y.data() + t * d);
                tok[b * kModalities + m] = {y.data(), n, none};
            }
        }
        // query start: learned query + mean over the present modalities of their pooled tokens
        Vec q(static_cast<size_t>(R * d)), pooled(static_cast<size_t>(d));
        for (i64 b = 0; b < R; ++b) {
            float* qb = q.data() + b * d;
            std::fill(qb, qb + d, 0.0f);
            float count = 0.0f;
            for (int m = 0; m < kModalities; ++m) {
                const float p = present[b * kModalities + m];
                count += p;
                const Tokens& tk = tok[source[b] * kModalities + m];
                if (!(p > 0.0f) || tk.pool_zero) continue;
                mean_rows(tk.x, tk.n, d, pooled.data());
                for (i64 i = 0; i < d; ++i) qb[i] += p * pooled[i];
            }
            const float inv = 1.0f / std::max(count, 1.0f);
            for (i64 i = 0; i < d; ++i) qb[i] = query_[i] + qb[i] * inv;
        }
        i64 max_n = 1;
        for (const Tokens& tk : tok) max_n = std::max(max_n, tk.n);
        bool any_present[kModalities] = {};
        for (i64 b = 0; b < R; ++b)
            for (int m = 0; m < kModalities; ++m) any_present[m] = any_present[m] || present[b * kModalities + m] > 0.0f;
        Vec qn(static_cast<size_t>(R * d)), qp(static_cast<size_t>(kModalities * R * d));
        Vec y(static_cast<size_t>(kModalities * R * d)), outs(static_cast<size_t>(R * kModalities * d));
        Vec logits(static_cast<size_t>(R * kModalities)), gate(static_cast<size_t>(R * kModalities));
        Vec kvn(static_cast<size_t>(max_n * d)), kvp(static_cast<size_t>(max_n * 2 * d)), att(static_cast<size_t>(max_n));
        Vec gin(static_cast<size_t>(2 * d)), gh(static_cast<size_t>(d)), hq(static_cast<size_t>(R * d));
        Vec kv_mean(static_cast<size_t>(d));
        Vec ffn;
        const float scale = 1.0f / std::sqrt(static_cast<float>(c));
        for (const Round& r : rounds_) {
            for (i64 b = 0; b < R; ++b) layer_norm(q.data() + b * d, r.q_norm.w.data(), r.q_norm.b.data(), d, qn.data() + b * d);
            std::fill(y.begin(), y.end(), 0.0f);
            std::fill(logits.begin(), logits.end(), 0.0f);
            for (int m = 0; m < kModalities; ++m) {
                if (!any_present[m]) {  // no row has it: its outputs are zero, skip its projections
                    for (i64 b = 0; b < R; ++b) {
                        float* dst = outs.data() + (b * kModalities + m) * d;
                        std::fill(dst, dst + d, 0.0f);
                    }
                    continue;
                }
                float* qm = qp.data() + m * R * d;  // (R, d) this modality's projected queries
                gemm(qn.data(), R, r.q[m], qm);
                for (i64 s = 0; s < B; ++s) {  // each token row's K/V once, for every query row reading it
                    if (!need[s * kModalities + m]) continue;
                    const Tokens& tk = tok[s * kModalities + m];
                    const i64 n = tk.n;
                    for (i64 t = 0; t < n; ++t)
                        layer_norm(tk.x + t * d, r.kv_norm[m].w.data(), r.kv_norm[m].b.data(), d, kvn.data() + t * d);
                    gemm(kvn.data(), n, r.kv[m], kvp.data());  // (n, 2d): K | V
                    if (tk.pool_zero)
                        std::fill(kv_mean.begin(), kv_mean.end(), 0.0f);
                    else
                        mean_rows(kvn.data(), n, d, kv_mean.data());
                    for (const i64 b : users[s]) {
                        if (!(present[b * kModalities + m] > 0.0f)) continue;
                        float* yb = y.data() + (m * R + b) * d;
                        for (i64 h = 0; h < heads_; ++h) {
                            const float* qh = qm + b * d + h * c;
                            float mx = -INFINITY;
                            for (i64 t = 0; t < n; ++t) {
                                att[t] = dot_scalar(qh, kvp.data() + t * 2 * d + h * c, c) * scale;
                                mx = std::max(mx, att[t]);
                            }
                            float sum = 0.0f;
                            for (i64 t = 0; t < n; ++t) sum += (att[t] = std::exp(att[t] - mx));
                            const float inv = 1.0f / sum;
                            float* yh = yb + h * c;
                            for (i64 t = 0; t < n; ++t) {
                                const float a = att[t] * inv;
                                const float* v = kvp.data() + t * 2 * d + d + h * c;
                                for (i64 i = 0; i < c; ++i) yh[i] += a * v[i];
                            }
                        }
                        // gate logit from [LN(q), mean of the normed tokens]
                        std::copy(qn.data() + b * d, qn.data() + (b + 1) * d, gin.data());
                        std::copy(kv_mean.begin(), kv_mean.end(), gin.data() + d);
                        gemm(gin.data(), 1, r.gate_in, gh.data());
                        for (i64 i = 0; i < d; ++i) gh[i] = std::tanh(gh[i]);
                        logits[b * kModalities + m] = dot_scalar(gh.data(), r.gate_out_w.data(), d) + r.gate_out_b;
                    }
                }
                // per-modality output projection, into outs (R, M, d); absent rows stay zero
                float* ym = y.data() + m * R * d;
                float* om = qp.data() + m * R * d;  // the queries are spent: reuse their buffer
                gemm(ym, R, r.o[m], om);
                for (i64 b = 0; b < R; ++b) {
                    float* dst = outs.data() + (b * kModalities + m) * d;
                    if (present[b * kModalities + m] > 0.0f)
                        std::copy(om + b * d, om + (b + 1) * d, dst);
                    else
                        std::fill(dst, dst + d, 0.0f);
                }
            }
            epilogue_rows(q.data(), outs.data(), logits.data(), present, R, kModalities, d, r.out.w.data(),
                          r.out.b.data(), r.ffn_norm.w.data(), r.ffn_norm.b.data(), linear, q.data(), hq.data(),
                          gate.data());
            ffn.resize(static_cast<size_t>(R * r.ffn_in.m));
            gemm(hq.data(), R, r.ffn_in, ffn.data());
            for (float& v : ffn) v = gelu(v);
            gemm(ffn.data(), R, r.ffn_out, hq.data());
            for (i64 i = 0; i < R * d; ++i) q[i] += hq[i];
        }
        project_normalize_rows(q.data(), R, d, head_norm_.w.data(), head_norm_.b.data(), head_proj_.w.data(),
                               head_proj_.b.data(), dim, linear, out, skip, out_dim_);
    }

    static void mean_rows(const float* x, i64 n, i64 d, float* mean) {
        std::fill(mean, mean + d, 0.0f);
        for (i64 t = 0; t < n; ++t)
            for (i64 i = 0; i < d; ++i) mean[i] += x[t * d + i];
        const float inv = 1.0f / static_cast<float>(std::max<i64>(n, 1));
        for (i64 i = 0; i < d; ++i) mean[i] *= inv;
    }

    static Vec take(const py::dict& weights, const std::string& name, std::initializer_list<i64> shape) {
        if (!weights.contains(name)) throw std::invalid_argument("the head weights lack '" + name + "'");
        Arr a = Arr::ensure(weights[py::str(name)]);
        if (!a) throw std::invalid_argument("head weight '" + name + "' is not a float array");
        expect(a, name.c_str(), shape);
        return Vec(a.data(), a.data() + a.size());
    }

    static Dense dense(const py::dict& weights, const std::string& name, i64 out, i64 in) {
        const Vec w = take(weights, name + ".weight", {out, in}), b = take(weights, name + ".bias", {out});
        return pack_dense(w.data(), b.data(), out, in);
    }

    static Raw raw(const py::dict& weights, const std::string& name, i64 out, i64 in) {
        return {take(weights, name + ".weight", {out, in}), take(weights, name + ".bias", {out})};
    }

    Norm norm(const py::dict& weights, const std::string& name) const {
        return {take(weights, name + ".weight", {d_}), take(weights, name + ".bias", {d_})};
    }

    i64 d_, heads_, out_dim_, text_dim_;
    Vec query_;
    Dense text_proj_, trace_proj_;
    Raw head_proj_;
    Norm text_norm_, trace_norm_, head_norm_;
    std::vector<Round> rounds_;
};

}  // namespace

void register_head(py::module_& m) {
    py::class_<HeadKernel>(m, "FusionHeadKernel",
                           "The embedder head in one call; see sdk.head.FusionHead (weights copied at construction).")
        .def(py::init<const py::dict&, i64, i64, i64, i64, i64, i64>(), py::arg("weights"), py::arg("d_model"),
             py::arg("n_heads"), py::arg("n_fusion_layers"), py::arg("out_dim"), py::arg("text_dim"),
             py::arg("ffn_mult") = 4)
        .def("__call__", &HeadKernel::forward, py::arg("image_tokens"), py::arg("text_states"), py::arg("text_mask"),
             py::arg("trace_states"), py::arg("trace_mask"), py::arg("present"), py::arg("dim"),
             py::arg("skip") = py::none(), py::arg("force_scalar") = false, py::arg("source") = py::none(),
             "(B, N, d), (B, T, C), (B, T), (B, S, C), (B, S), (R, 3), dim[, skip (R, out_dim) added before the "
             "truncation and norm][, source (R,) token row of each query row; default: R == B, row r reads row r] "
             "-> (R, dim) L2-normalised embeddings.");
}

}  // namespace moon3
