// CUDA kernels of the embedder head's fused ops (C ABI and layouts: fused.h; NumPy references and
// tolerance: sdk/fused.py, sdk/ops.py; CPU kernels: csrc/fused.cpp, csrc/l2norm.cpp):
//
//   fusion_epilogue(q, outs, logits, present, out_w, out_b, ln_w, ln_b) -> (q_new, LN(q_new), gate)
//       gate = softmax(logits + (1 - present) * -1e4); q_new = q + out_w @ sum_m gate_m outs_m + out_b
//   fire_residual(h, shallow, <FIRE weights>, scale) -> h + scale * sigmoid(w.GELU(W LN(h)) + c) * MLP(shallow)
//   project_normalize(q, ln_w, ln_b, w, b, dim) -> l2normalize((w @ LN(q) + b)[:dim])
//   l2_normalize(x, dim) -> x[:, :dim] / max(||x[:, :dim]||_2, 1e-12)
//
// One thread block per row (a product's query state, or one visual token): the row's
// intermediates live in shared memory, reductions (LayerNorm statistics, the gate logit, the L2
// norm) are warp shuffles plus one shared slot per warp, and each matrix-vector product gives
// one warp per output element, its lanes reading consecutive weights (coalesced). The head's
// rows are few and short (d = 256), so a row per block keeps every op one launch without
// temporaries in global memory; weights are re-read per row from L2.
//
// Everything accumulates in float32 with the precise math functions (expf, erff, sqrtf; no
// --use_fast_math), like the CPU kernels, so results agree with the references to FUSED_ATOL.
// The `_f16` variants read and write binary16 activations and compute exactly as float32 does.

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <tuple>

#include "fused.h"

namespace {

constexpr int kThreads = 256;  // per block; a multiple of the warp size
constexpr int kWarps = kThreads / 32;
constexpr float kLnEps = 1e-5f;   // torch.nn.LayerNorm's default
constexpr float kNeg = -1e4f;     // the embedder's additive mask value
constexpr float kL2Eps = 1e-12f;  // torch.nn.functional.normalize's default
constexpr size_t kDefaultSmem = 48 * 1024;  // dynamic shared memory without an opt-in

// A failed CUDA runtime call also leaves its error as the thread's "last error", which the next
// launch check (cudaGetLastError) would report again; the error is returned here, so clear it.
inline cudaError_t reported(cudaError_t err) {
    if (err != cudaSuccess) (void)cudaGetLastError();
    return err;
}

// Returns from the enclosing function with the error of `expr` (our own checks or a CUDA call).
#define MOON3_TRY(expr)                                   \
    do {                                                  \
        const cudaError_t err_ = (expr);                  \
        if (err_ != cudaSuccess) return err_;             \
    } while (0)
#define MOON3_CUDA(expr) MOON3_TRY(reported(expr))

// ---------------------------------------------------------------------------------------------
// device helpers

__device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }

__device__ __forceinline__ float gelu(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum of v over the block, returned to every thread (all add the per-warp sums in the same order,
// so all get the same value). red: kWarps floats of shared memory. The leading barrier keeps a
// previous call's readers of red from seeing this call's writes, so calls can follow each other.
__device__ float block_sum(float v, float* red) {
    v = warp_sum(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float s = 0.0f;
    for (int w = 0; w < kWarps; ++w) s += red[w];
    return s;
}

// store(i, LayerNorm(x)[i]) for i < n (biased variance, two passes, as the reference). x is a
// row in global memory (float or half) or in shared memory; store may write x itself, since
// every read of x for the statistics precedes block_sum's barriers. Ends with a barrier.
template <typename TX, typename Store>
__device__ void layer_norm(const TX* x, int n, const float* __restrict__ w, const float* __restrict__ b, float* red,
                           Store store_fn) {
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += kThreads) s += load(x, i);
    const float mu = block_sum(s, red) / static_cast<float>(n);
    float v = 0.0f;
    for (int i = threadIdx.x; i < n; i += kThreads) {
        const float c = load(x, i) - mu;
        v = fmaf(c, c, v);
    }
    const float inv = 1.0f / sqrtf(block_sum(v, red) / static_cast<float>(n) + kLnEps);
    for (int i = threadIdx.x; i < n; i += kThreads) store_fn(i, (load(x, i) - mu) * inv * w[i] + b[i]);
    __syncthreads();
}

// store(j, sum_k W[j, k] * x[k]) for j < m; W: (m, k) row-major in global memory, x: (k,) in
// shared memory. One warp per output: its lanes read consecutive weights and a shuffle adds their
// partial sums (the loop bound is the same for the whole warp, so the full shuffle mask holds).
// Ends with a barrier, so what store wrote to shared memory is visible to the block.
template <typename Store>
__device__ void matvec(const float* __restrict__ W, const float* x, int k, int m, Store store_fn) {
    const int lane = threadIdx.x & 31;
    for (int j = threadIdx.x >> 5; j < m; j += kWarps) {
        const float* wj = W + static_cast<int64_t>(j) * k;  // (k,)
        float s = 0.0f;
        for (int i = lane; i < k; i += 32) s = fmaf(wj[i], x[i], s);
        s = warp_sum(s);
        if (lane == 0) store_fn(j, s);
    }
    __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// kernels: one block of kThreads per row, blockIdx.x = the row

// shared: red (kWarps) | g (M) | fused (d) | qn (d)
template <typename T>
__global__ void __launch_bounds__(kThreads)
    fusion_epilogue_kernel(const T* __restrict__ q, const T* __restrict__ outs, const float* __restrict__ logits,
                           const float* __restrict__ present, const float* __restrict__ out_w,
                           const float* __restrict__ out_b, const float* __restrict__ ln_w,
                           const float* __restrict__ ln_b, int M, int d, T* __restrict__ q_new, T* __restrict__ h,
                           float* __restrict__ gate) {
    extern __shared__ float smem[];
    float* red = smem;
    float* g = red + kWarps;  // (M,)
    float* fused = g + M;     // (d,)
    float* qn = fused + d;     // (d,)
    const int64_t r = blockIdx.x;
    const int tid = threadIdx.x;

    // Gate: softmax over the modalities, absent ones pushed down by kNeg. M is a handful, so
    // every thread finds the max and the sum itself instead of another reduction.
    for (int m = tid; m < M; m += kThreads) g[m] = logits[r * M + m] + (1.0f - present[r * M + m]) * kNeg;
    __syncthreads();
    float mx = -INFINITY;
    for (int m = 0; m < M; ++m) mx = fmaxf(mx, g[m]);
    float sum = 0.0f;
    for (int m = 0; m < M; ++m) sum += expf(g[m] - mx);
    __syncthreads();  // every thread has read the logits before they are overwritten
    for (int m = tid; m < M; m += kThreads) {
        const float gm = expf(g[m] - mx) / sum;
        g[m] = gm;
        gate[r * M + m] = gm;
    }
    __syncthreads();

    // fused = sum_m gate_m * outs_m; an absent modality (gate exactly 0) is never read, so even a
    // NaN there cannot leak in (as on the CPU).
    for (int i = tid; i < d; i += kThreads) {
        float f = 0.0f;
        for (int m = 0; m < M; ++m)
            if (g[m] != 0.0f) f = fmaf(g[m], load(outs, (r * M + m) * d + i), f);
        fused[i] = f;
    }
    __syncthreads();

    const T* qr = q + r * d;  // (d,)
    matvec(out_w, fused, d, d, [&](int j, float s) { qn[j] = load(qr, j) + (s + out_b[j]); });
    for (int i = tid; i < d; i += kThreads) store(q_new, r * d + i, qn[i]);
    layer_norm(qn, d, ln_w, ln_b, red, [&](int i, float v) { store(h, r * d + i, v); });
}

// shared: red (kWarps) | ln (max(d, Cs)) | g (H) | mlp (H)
template <typename T>
__global__ void __launch_bounds__(kThreads)
    fire_residual_kernel(const T* __restrict__ h, const T* __restrict__ shallow, int d, int Cs, int H,
                         const float* __restrict__ norm_w, const float* __restrict__ norm_b,
                         const float* __restrict__ gate_in_w, const float* __restrict__ gate_in_b,
                         const float* __restrict__ gate_out_w, float gate_out_b,
                         const float* __restrict__ mlp_norm_w, const float* __restrict__ mlp_norm_b,
                         const float* __restrict__ mlp_in_w, const float* __restrict__ mlp_in_b,
                         const float* __restrict__ mlp_out_w, const float* __restrict__ mlp_out_b, float scale,
                         T* __restrict__ out) {
    extern __shared__ float smem[];
    float* red = smem;
    float* ln = red + kWarps;            // (max(d, Cs),)
    float* g = ln + (d > Cs ? d : Cs);   // (H,)
    float* mlp = g + H;                  // (H,)
    const int64_t r = blockIdx.x;
    const T* hr = h + r * d;         // (d,)
    const T* sr = shallow + r * Cs;  // (Cs,)

    // saliency a = scale * sigmoid(w . GELU(W LN(h) + b) + c)
    layer_norm(hr, d, norm_w, norm_b, red, [&](int i, float v) { ln[i] = v; });
    matvec(gate_in_w, ln, d, H, [&](int j, float s) { g[j] = gelu(s + gate_in_b[j]); });
    float part = 0.0f;
    for (int j = threadIdx.x; j < H; j += kThreads) part = fmaf(g[j], gate_out_w[j], part);
    const float z = block_sum(part, red) + gate_out_b;
    const float a = scale / (1.0f + expf(-z));

    // out = h + a * MLP(LN(shallow)); ln is free again (matvec ended with a barrier)
    layer_norm(sr, Cs, mlp_norm_w, mlp_norm_b, red, [&](int i, float v) { ln[i] = v; });
    matvec(mlp_in_w, ln, Cs, H, [&](int j, float s) { mlp[j] = gelu(s + mlp_in_b[j]); });
    matvec(mlp_out_w, mlp, H, d,
           [&](int j, float s) { store(out, r * d + j, load(hr, j) + a * (s + mlp_out_b[j])); });
}

// shared: red (kWarps) | ln (d) | e (dim)
template <typename T>
__global__ void __launch_bounds__(kThreads)
    project_normalize_kernel(const T* __restrict__ q, const float* __restrict__ ln_w,
                             const float* __restrict__ ln_b, const float* __restrict__ w,
                             const float* __restrict__ b, int d, int dim, T* __restrict__ out) {
    extern __shared__ float smem[];
    float* red = smem;
    float* ln = red + kWarps;  // (d,)
    float* e = ln + d;         // (dim,)
    const int64_t r = blockIdx.x;

    layer_norm(q + r * d, d, ln_w, ln_b, red, [&](int i, float v) { ln[i] = v; });
    matvec(w, ln, d, dim, [&](int j, float s) { e[j] = s + b[j]; });  // only the kept rows of w
    float part = 0.0f;
    for (int j = threadIdx.x; j < dim; j += kThreads) part = fmaf(e[j], e[j], part);
    const float inv = 1.0f / fmaxf(sqrtf(block_sum(part, red)), kL2Eps);
    for (int j = threadIdx.x; j < dim; j += kThreads) store(out, r * dim + j, e[j] * inv);
}

// shared: red (kWarps). x and y are not __restrict__: y may be x itself (dim == D); each thread
// rewrites only the elements it read, after the norm's barriers.
template <typename T>
__global__ void __launch_bounds__(kThreads) l2_normalize_kernel(const T* x, int D, int dim, T* y) {
    extern __shared__ float smem[];
    const int64_t r = blockIdx.x;
    const T* xr = x + r * D;  // (dim,) of the (D,) row
    float part = 0.0f;
    for (int i = threadIdx.x; i < dim; i += kThreads) {
        const float v = load(xr, i);
        part = fmaf(v, v, part);
    }
    const float inv = 1.0f / fmaxf(sqrtf(block_sum(part, smem)), kL2Eps);
    for (int i = threadIdx.x; i < dim; i += kThreads) store(y, r * dim + i, load(xr, i) * inv);
}

// ---------------------------------------------------------------------------------------------
// launchers (device pointers)

bool rows_ok(int64_t n) { return n >= 0 && n <= INT_MAX; }  // grid.x limit
bool size_ok(int64_t n) { return n >= 1 && n <= INT_MAX; }

template <typename... P>
bool non_null(const P*... p) {
    return ((p != nullptr) && ...);
}

// Launches kernel on `rows` blocks with `floats` floats of dynamic shared memory, opting in to
// more than 48 KiB where a row needs it (cudaErrorInvalidValue beyond the device's limit). The
// arguments are converted to the kernel's exact parameter types for cudaLaunchKernel's array.
template <typename... P, typename... A>
cudaError_t launch(void (*kernel)(P...), int64_t rows, int64_t floats, cudaStream_t stream, A... args) {
    static_assert(sizeof...(P) == sizeof...(A), "one argument per kernel parameter");
    const size_t smem = static_cast<size_t>(floats) * sizeof(float);
    if (smem > static_cast<size_t>(INT_MAX)) return cudaErrorInvalidValue;  // far beyond any GPU's
    if (smem > kDefaultSmem)
        MOON3_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    std::tuple<P...> params(args...);
    void* argv[sizeof...(P)];
    std::apply([&argv](auto&... p) { size_t i = 0; ((argv[i++] = &p), ...); }, params);
    return reported(cudaLaunchKernel(kernel, dim3(static_cast<unsigned>(rows)), dim3(kThreads), argv, smem, stream));
}

cudaError_t check_fusion_epilogue(int64_t B, int64_t M, int64_t d) {
    return rows_ok(B) && size_ok(M) && size_ok(d) && kWarps + M + 2 * d <= INT_MAX ? cudaSuccess
                                                                                   : cudaErrorInvalidValue;
}

cudaError_t check_fire_residual(int64_t R, int64_t d, int64_t Cs, int64_t H) {
    return rows_ok(R) && size_ok(d) && size_ok(Cs) && size_ok(H) && kWarps + d + Cs + 2 * H <= INT_MAX
               ? cudaSuccess
               : cudaErrorInvalidValue;
}

cudaError_t check_project_normalize(int64_t B, int64_t d, int64_t D, int64_t dim) {
    return rows_ok(B) && size_ok(d) && size_ok(D) && size_ok(dim) && dim <= D && kWarps + d + dim <= INT_MAX
               ? cudaSuccess
               : cudaErrorInvalidValue;
}

cudaError_t check_l2_normalize(int64_t B, int64_t D, int64_t dim) {
    return rows_ok(B) && size_ok(D) && size_ok(dim) && dim <= D ? cudaSuccess : cudaErrorInvalidValue;
}

template <typename T>
cudaError_t fusion_epilogue(const T* q, const T* outs, const float* logits, const float* present, const float* out_w,
                            const float* out_b, const float* ln_w, const float* ln_b, int64_t B, int64_t M, int64_t d,
                            T* q_new, T* h, float* gate, cudaStream_t stream) {
    MOON3_TRY(check_fusion_epilogue(B, M, d));
    if (B == 0) return cudaSuccess;
    if (!non_null(q, outs, logits, present, out_w, out_b, ln_w, ln_b, q_new, h, gate)) return cudaErrorInvalidValue;
    return launch(fusion_epilogue_kernel<T>, B, kWarps + M + 2 * d, stream, q, outs, logits, present, out_w, out_b,
                  ln_w, ln_b, static_cast<int>(M), static_cast<int>(d), q_new, h, gate);
}

template <typename T>
cudaError_t fire_residual(const T* h, const T* shallow, int64_t R, int64_t d, int64_t Cs, int64_t H,
                          const float* norm_w, const float* norm_b, const float* gate_in_w, const float* gate_in_b,
                          const float* gate_out_w, float gate_out_b, const float* mlp_norm_w,
                          const float* mlp_norm_b, const float* mlp_in_w, const float* mlp_in_b,
                          const float* mlp_out_w, const float* mlp_out_b, float scale, T* out, cudaStream_t stream) {
    MOON3_TRY(check_fire_residual(R, d, Cs, H));
    if (R == 0) return cudaSuccess;
    if (!non_null(h, shallow, norm_w, norm_b, gate_in_w, gate_in_b, gate_out_w, mlp_norm_w, mlp_norm_b, mlp_in_w,
                  mlp_in_b, mlp_out_w, mlp_out_b, out))
        return cudaErrorInvalidValue;
    const int64_t floats = kWarps + (d > Cs ? d : Cs) + 2 * H;
    return launch(fire_residual_kernel<T>, R, floats, stream, h, shallow, static_cast<int>(d), static_cast<int>(Cs),
                  static_cast<int>(H), norm_w, norm_b, gate_in_w, gate_in_b, gate_out_w, gate_out_b, mlp_norm_w,
                  mlp_norm_b, mlp_in_w, mlp_in_b, mlp_out_w, mlp_out_b, scale, out);
}

template <typename T>
cudaError_t project_normalize(const T* q, const float* ln_w, const float* ln_b, const float* w, const float* b,
                              int64_t B, int64_t d, int64_t D, int64_t dim, T* out, cudaStream_t stream) {
    MOON3_TRY(check_project_normalize(B, d, D, dim));
    if (B == 0) return cudaSuccess;
    if (!non_null(q, ln_w, ln_b, w, b, out)) return cudaErrorInvalidValue;
    return launch(project_normalize_kernel<T>, B, kWarps + d + dim, stream, q, ln_w, ln_b, w, b, static_cast<int>(d),
                  static_cast<int>(dim), out);
}

template <typename T>
cudaError_t l2_normalize(const T* x, int64_t B, int64_t D, int64_t dim, T* y, cudaStream_t stream) {
    MOON3_TRY(check_l2_normalize(B, D, dim));
    if (B == 0) return cudaSuccess;
    if (!non_null(x, y)) return cudaErrorInvalidValue;
    // In place only when the rows keep their places: with dim < D, block r would write into rows
    // that other blocks may not have read yet.
    const auto xb = reinterpret_cast<uintptr_t>(x), yb = reinterpret_cast<uintptr_t>(y);
    const auto xe = xb + static_cast<uintptr_t>(B * D) * sizeof(T);
    const auto ye = yb + static_cast<uintptr_t>(B * dim) * sizeof(T);
    if (yb == xb ? dim != D : (yb < xe && xb < ye)) return cudaErrorInvalidValue;
    return launch(l2_normalize_kernel<T>, B, kWarps, stream, x, static_cast<int>(D), static_cast<int>(dim), y);
}

// ---------------------------------------------------------------------------------------------
// host-pointer wrappers: allocate, copy in, run on the legacy default stream, copy back

class DeviceBuffer {
   public:
    DeviceBuffer() = default;
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    ~DeviceBuffer() {
        if (p_) cudaFree(p_);
    }

    // Allocates count elements of T and, when src is given, copies them from the host.
    template <typename T>
    cudaError_t alloc(int64_t count, const T* src = nullptr) {
        const size_t bytes = static_cast<size_t>(count) * sizeof(T);
        MOON3_CUDA(cudaMalloc(&p_, bytes));
        return src ? reported(cudaMemcpy(p_, src, bytes, cudaMemcpyHostToDevice)) : cudaSuccess;
    }

    template <typename T>
    cudaError_t copy_to(T* dst, int64_t count) const {
        // cudaMemcpy waits for the kernel queued before it on the legacy default stream.
        return reported(cudaMemcpy(dst, p_, static_cast<size_t>(count) * sizeof(T), cudaMemcpyDeviceToHost));
    }

    template <typename T>
    T* get() const {
        return static_cast<T*>(p_);
    }

   private:
    void* p_ = nullptr;
};

template <typename T>
cudaError_t fusion_epilogue_host(const T* q, const T* outs, const float* logits, const float* present,
                                 const float* out_w, const float* out_b, const float* ln_w, const float* ln_b,
                                 int64_t B, int64_t M, int64_t d, T* q_new, T* h, float* gate) {
    MOON3_TRY(check_fusion_epilogue(B, M, d));
    if (B == 0) return cudaSuccess;
    if (!non_null(q, outs, logits, present, out_w, out_b, ln_w, ln_b, q_new, h, gate)) return cudaErrorInvalidValue;
    DeviceBuffer dq, douts, dlogits, dpresent, dw, db, dlw, dlb, dq_new, dh, dgate;
    MOON3_TRY(dq.alloc(B * d, q));
    MOON3_TRY(douts.alloc(B * M * d, outs));
    MOON3_TRY(dlogits.alloc(B * M, logits));
    MOON3_TRY(dpresent.alloc(B * M, present));
    MOON3_TRY(dw.alloc(d * d, out_w));
    MOON3_TRY(db.alloc(d, out_b));
    MOON3_TRY(dlw.alloc(d, ln_w));
    MOON3_TRY(dlb.alloc(d, ln_b));
    MOON3_TRY(dq_new.alloc<T>(B * d));
    MOON3_TRY(dh.alloc<T>(B * d));
    MOON3_TRY(dgate.alloc<float>(B * M));
    MOON3_TRY(fusion_epilogue(dq.get<T>(), douts.get<T>(), dlogits.get<float>(), dpresent.get<float>(),
                              dw.get<float>(), db.get<float>(), dlw.get<float>(), dlb.get<float>(), B, M, d,
                              dq_new.get<T>(), dh.get<T>(), dgate.get<float>(), nullptr));
    MOON3_TRY(dq_new.copy_to(q_new, B * d));
    MOON3_TRY(dh.copy_to(h, B * d));
    return dgate.copy_to(gate, B * M);
}

template <typename T>
cudaError_t fire_residual_host(const T* h, const T* shallow, int64_t R, int64_t d, int64_t Cs, int64_t H,
                               const float* norm_w, const float* norm_b, const float* gate_in_w,
                               const float* gate_in_b, const float* gate_out_w, float gate_out_b,
                               const float* mlp_norm_w, const float* mlp_norm_b, const float* mlp_in_w,
                               const float* mlp_in_b, const float* mlp_out_w, const float* mlp_out_b, float scale,
                               T* out) {
    MOON3_TRY(check_fire_residual(R, d, Cs, H));
    if (R == 0) return cudaSuccess;
    if (!non_null(h, shallow, norm_w, norm_b, gate_in_w, gate_in_b, gate_out_w, mlp_norm_w, mlp_norm_b, mlp_in_w,
                  mlp_in_b, mlp_out_w, mlp_out_b, out))
        return cudaErrorInvalidValue;
    DeviceBuffer dh, ds, dnw, dnb, dgw, dgb, dgo, dmnw, dmnb, dmiw, dmib, dmow, dmob, dout;
    MOON3_TRY(dh.alloc(R * d, h));
    MOON3_TRY(ds.alloc(R * Cs, shallow));
    MOON3_TRY(dnw.alloc(d, norm_w));
    MOON3_TRY(dnb.alloc(d, norm_b));
    MOON3_TRY(dgw.alloc(H * d, gate_in_w));
    MOON3_TRY(dgb.alloc(H, gate_in_b));
    MOON3_TRY(dgo.alloc(H, gate_out_w));
    MOON3_TRY(dmnw.alloc(Cs, mlp_norm_w));
    MOON3_TRY(dmnb.alloc(Cs, mlp_norm_b));
    MOON3_TRY(dmiw.alloc(H * Cs, mlp_in_w));
    MOON3_TRY(dmib.alloc(H, mlp_in_b));
    MOON3_TRY(dmow.alloc(d * H, mlp_out_w));
    MOON3_TRY(dmob.alloc(d, mlp_out_b));
    MOON3_TRY(dout.alloc<T>(R * d));
    MOON3_TRY(fire_residual(dh.get<T>(), ds.get<T>(), R, d, Cs, H, dnw.get<float>(), dnb.get<float>(),
                            dgw.get<float>(), dgb.get<float>(), dgo.get<float>(), gate_out_b, dmnw.get<float>(),
                            dmnb.get<float>(), dmiw.get<float>(), dmib.get<float>(), dmow.get<float>(),
                            dmob.get<float>(), scale, dout.get<T>(), nullptr));
    return dout.copy_to(out, R * d);
}

template <typename T>
cudaError_t project_normalize_host(const T* q, const float* ln_w, const float* ln_b, const float* w, const float* b,
                                   int64_t B, int64_t d, int64_t D, int64_t dim, T* out) {
    MOON3_TRY(check_project_normalize(B, d, D, dim));
    if (B == 0) return cudaSuccess;
    if (!non_null(q, ln_w, ln_b, w, b, out)) return cudaErrorInvalidValue;
    DeviceBuffer dq, dlw, dlb, dw, db, dout;
    MOON3_TRY(dq.alloc(B * d, q));
    MOON3_TRY(dlw.alloc(d, ln_w));
    MOON3_TRY(dlb.alloc(d, ln_b));
    MOON3_TRY(dw.alloc(dim * d, w));  // only the kept rows are read
    MOON3_TRY(db.alloc(dim, b));
    MOON3_TRY(dout.alloc<T>(B * dim));
    MOON3_TRY(project_normalize(dq.get<T>(), dlw.get<float>(), dlb.get<float>(), dw.get<float>(), db.get<float>(), B,
                                d, dim, dim, dout.get<T>(), nullptr));
    return dout.copy_to(out, B * dim);
}

template <typename T>
cudaError_t l2_normalize_host(const T* x, int64_t B, int64_t D, int64_t dim, T* y) {
    MOON3_TRY(check_l2_normalize(B, D, dim));
    if (B == 0) return cudaSuccess;
    if (!non_null(x, y)) return cudaErrorInvalidValue;
    DeviceBuffer dx, dy;
    MOON3_TRY(dx.alloc(B * D, x));
    MOON3_TRY(dy.alloc<T>(B * dim));
    MOON3_TRY(l2_normalize(dx.get<T>(), B, D, dim, dy.get<T>(), nullptr));
    return dy.copy_to(y, B * dim);
}

inline const __half* half_ptr(const uint16_t* p) { return reinterpret_cast<const __half*>(p); }
inline __half* half_ptr(uint16_t* p) { return reinterpret_cast<__half*>(p); }
inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

}  // namespace

// ---------------------------------------------------------------------------------------------
// C ABI

static_assert(sizeof(__half) == sizeof(uint16_t), "binary16 is passed as uint16_t");

extern "C" {

int moon3_cuda_abi_version(void) { return MOON3_CUDA_ABI_VERSION; }

int moon3_cuda_device_count(int* count) {
    if (!count) return cudaErrorInvalidValue;
    const cudaError_t err = reported(cudaGetDeviceCount(count));
    if (err != cudaSuccess) *count = 0;
    return err;
}

const char* moon3_cuda_error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

int moon3_cuda_fusion_epilogue(const float* q, const float* outs, const float* logits, const float* present,
                               const float* out_w, const float* out_b, const float* ln_w, const float* ln_b, int64_t B,
                               int64_t M, int64_t d, float* q_new, float* h, float* gate, void* stream) {
    return fusion_epilogue(q, outs, logits, present, out_w, out_b, ln_w, ln_b, B, M, d, q_new, h, gate,
                           as_stream(stream));
}

int moon3_cuda_fusion_epilogue_f16(const uint16_t* q, const uint16_t* outs, const float* logits,
                                   const float* present, const float* out_w, const float* out_b, const float* ln_w,
                                   const float* ln_b, int64_t B, int64_t M, int64_t d, uint16_t* q_new, uint16_t* h,
                                   float* gate, void* stream) {
    return fusion_epilogue(half_ptr(q), half_ptr(outs), logits, present, out_w, out_b, ln_w, ln_b, B, M, d,
                           half_ptr(q_new), half_ptr(h), gate, as_stream(stream));
}

int moon3_cuda_fire_residual(const float* h, const float* shallow, int64_t R, int64_t d, int64_t Cs, int64_t H,
                             const float* norm_w, const float* norm_b, const float* gate_in_w, const float* gate_in_b,
                             const float* gate_out_w, float gate_out_b, const float* mlp_norm_w,
                             const float* mlp_norm_b, const float* mlp_in_w, const float* mlp_in_b,
                             const float* mlp_out_w, const float* mlp_out_b, float scale, float* out, void* stream) {
    return fire_residual(h, shallow, R, d, Cs, H, norm_w, norm_b, gate_in_w, gate_in_b, gate_out_w, gate_out_b,
                         mlp_norm_w, mlp_norm_b, mlp_in_w, mlp_in_b, mlp_out_w, mlp_out_b, scale, out,
                         as_stream(stream));
}

int moon3_cuda_fire_residual_f16(const uint16_t* h, const uint16_t* shallow, int64_t R, int64_t d, int64_t Cs,
                                 int64_t H, const float* norm_w, const float* norm_b, const float* gate_in_w,
                                 const float* gate_in_b, const float* gate_out_w, float gate_out_b,
                                 const float* mlp_norm_w, const float* mlp_norm_b, const float* mlp_in_w,
                                 const float* mlp_in_b, const float* mlp_out_w, const float* mlp_out_b, float scale,
                                 uint16_t* out, void* stream) {
    return fire_residual(half_ptr(h), half_ptr(shallow), R, d, Cs, H, norm_w, norm_b, gate_in_w, gate_in_b,
                         gate_out_w, gate_out_b, mlp_norm_w, mlp_norm_b, mlp_in_w, mlp_in_b, mlp_out_w, mlp_out_b,
                         scale, half_ptr(out), as_stream(stream));
}

int moon3_cuda_project_normalize(const float* q, const float* ln_w, const float* ln_b, const float* w, const float* b,
                                 int64_t B, int64_t d, int64_t D, int64_t dim, float* out, void* stream) {
    return project_normalize(q, ln_w, ln_b, w, b, B, d, D, dim, out, as_stream(stream));
}

int moon3_cuda_project_normalize_f16(const uint16_t* q, const float* ln_w, const float* ln_b, const float* w,
                                     const float* b, int64_t B, int64_t d, int64_t D, int64_t dim, uint16_t* out,
                                     void* stream) {
    return project_normalize(half_ptr(q), ln_w, ln_b, w, b, B, d, D, dim, half_ptr(out), as_stream(stream));
}

int moon3_cuda_l2_normalize(const float* x, int64_t B, int64_t D, int64_t dim, float* y, void* stream) {
    return l2_normalize(x, B, D, dim, y, as_stream(stream));
}

int moon3_cuda_l2_normalize_f16(const uint16_t* x, int64_t B, int64_t D, int64_t dim, uint16_t* y, void* stream) {
    return l2_normalize(half_ptr(x), B, D, dim, half_ptr(y), as_stream(stream));
}

int moon3_cuda_fusion_epilogue_host(const float* q, const float* outs, const float* logits, const float* present,
                                    const float* out_w, const float* out_b, const float* ln_w, const float* ln_b,
                                    int64_t B, int64_t M, int64_t d, float* q_new, float* h, float* gate) {
    return fusion_epilogue_host(q, outs, logits, present, out_w, out_b, ln_w, ln_b, B, M, d, q_new, h, gate);
}

int moon3_cuda_fusion_epilogue_f16_host(const uint16_t* q, const uint16_t* outs, const float* logits,
                                        const float* present, const float* out_w, const float* out_b,
                                        const float* ln_w, const float* ln_b, int64_t B, int64_t M, int64_t d,
                                        uint16_t* q_new, uint16_t* h, float* gate) {
    return fusion_epilogue_host(half_ptr(q), half_ptr(outs), logits, present, out_w, out_b, ln_w, ln_b, B, M, d,
                                half_ptr(q_new), half_ptr(h), gate);
}

int moon3_cuda_fire_residual_host(const float* h, const float* shallow, int64_t R, int64_t d, int64_t Cs, int64_t H,
                                  const float* norm_w, const float* norm_b, const float* gate_in_w,
                                  const float* gate_in_b, const float* gate_out_w, float gate_out_b,
                                  const float* mlp_norm_w, const float* mlp_norm_b, const float* mlp_in_w,
                                  const float* mlp_in_b, const float* mlp_out_w, const float* mlp_out_b, float scale,
                                  float* out) {
    return fire_residual_host(h, shallow, R, d, Cs, H, norm_w, norm_b, gate_in_w, gate_in_b, gate_out_w, gate_out_b,
                              mlp_norm_w, mlp_norm_b, mlp_in_w, mlp_in_b, mlp_out_w, mlp_out_b, scale, out);
}

int moon3_cuda_fire_residual_f16_host(const uint16_t* h, const uint16_t* shallow, int64_t R, int64_t d, int64_t Cs,
                                      int64_t H, const float* norm_w, const float* norm_b, const float* gate_in_w,
                                      const float* gate_in_b, const float* gate_out_w, float gate_out_b,
                                      const float* mlp_norm_w, const float* mlp_norm_b, const float* mlp_in_w,
                                      const float* mlp_in_b, const float* mlp_out_w, const float* mlp_out_b,
                                      float scale, uint16_t* out) {
    return fire_residual_host(half_ptr(h), half_ptr(shallow), R, d, Cs, H, norm_w, norm_b, gate_in_w, gate_in_b,
                              gate_out_w, gate_out_b, mlp_norm_w, mlp_norm_b, mlp_in_w, mlp_in_b, mlp_out_w,
                              mlp_out_b, scale, half_ptr(out));
}

int moon3_cuda_project_normalize_host(const float* q, const float* ln_w, const float* ln_b, const float* w,
                                      const float* b, int64_t B, int64_t d, int64_t D, int64_t dim, float* out) {
    return project_normalize_host(q, ln_w, ln_b, w, b, B, d, D, dim, out);
}

int moon3_cuda_project_normalize_f16_host(const uint16_t* q, const float* ln_w, const float* ln_b, const float* w,
                                          const float* b, int64_t B, int64_t d, int64_t D, int64_t dim,
                                          uint16_t* out) {
    return project_normalize_host(half_ptr(q), ln_w, ln_b, w, b, B, d, D, dim, half_ptr(out));
}

int moon3_cuda_l2_normalize_host(const float* x, int64_t B, int64_t D, int64_t dim, float* y) {
    return l2_normalize_host(x, B, D, dim, y);
}

int moon3_cuda_l2_normalize_f16_host(const uint16_t* x, int64_t B, int64_t D, int64_t dim, uint16_t* y) {
    return l2_normalize_host(half_ptr(x), B, D, dim, half_ptr(y));
}

}  // extern "C"
