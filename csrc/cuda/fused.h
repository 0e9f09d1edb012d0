/* CUDA kernels of the embedder head's fused ops: a plain C ABI (sdk/_cuda_ops.so).
 *
 * The same ops as sdk._C (csrc/fused.cpp, csrc/l2norm.cpp), on a GPU; the NumPy references and
 * the tolerance are in sdk/fused.py and sdk/ops.py, the Python loader is sdk/cuda_ops.py.
 *
 *   fusion_epilogue   (q, outs, logits, present, out_w, out_b, ln_w, ln_b) -> q_new, LN(q_new), gate
 *   fire_residual     (h, shallow, <FIRE weights>, scale) -> h + scale * sigmoid(.) * MLP(LN(shallow))
 *   project_normalize (q, ln_w, ln_b, w, b, dim) -> l2normalize((w @ LN(q) + b)[:dim])
 *   l2_normalize      (x, dim) -> x[:, :dim] / max(||x[:, :dim]||, 1e-12)
 *
 * Two entry points per op:
 *   moon3_cuda_<op>(...)       device pointers, enqueued on `stream` (a cudaStream_t passed as
 *                              void*; NULL is the legacy default stream); returns at once.
 *   moon3_cuda_<op>_host(...)  host pointers: allocates device buffers, copies in, runs, copies
 *                              back and frees; synchronous. For tests and for callers without a
 *                              device-array library.
 * Every function returns a cudaError_t value (0 = cudaSuccess); cudaErrorInvalidValue (1) for a
 * bad size or a null pointer, checked before anything is enqueued. A launch returning 0 only says
 * the kernel was enqueued: errors while it runs surface at the next synchronising call.
 *
 * Activations are float32, or IEEE binary16 in the `_f16` variants (passed as uint16_t bit
 * patterns, i.e. __half / numpy.float16; all arithmetic stays float32). Weights, gate logits,
 * presence and gate weights are always float32. All arrays are C-contiguous (row-major) and
 * must not overlap, except l2_normalize's y, which may be x itself when dim == D.
 */
#ifndef MOON3_CUDA_FUSED_H_
#define MOON3_CUDA_FUSED_H_

#include <stdint.h>

#if defined(_WIN32)
#define MOON3_CUDA_API __declspec(dllexport)
#else
#define MOON3_CUDA_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever a signature below changes; sdk/cuda_ops.py refuses another value. */
#define MOON3_CUDA_ABI_VERSION 1

MOON3_CUDA_API int moon3_cuda_abi_version(void);
/* Number of visible CUDA devices in *count (0 on error); returns the cudaGetDeviceCount error. */
MOON3_CUDA_API int moon3_cuda_device_count(int* count);
MOON3_CUDA_API const char* moon3_cuda_error_string(int error);

/* q: (B, d), outs: (B, M, d), logits/present: (B, M), out_w: (d, d), out_b/ln_w/ln_b: (d,)
 * -> q_new: (B, d), h = LayerNorm(q_new): (B, d), gate: (B, M) */
MOON3_CUDA_API int moon3_cuda_fusion_epilogue(const float* q, const float* outs, const float* logits,
                                              const float* present, const float* out_w, const float* out_b,
                                              const float* ln_w, const float* ln_b, int64_t B, int64_t M,
                                              int64_t d, float* q_new, float* h, float* gate, void* stream);
MOON3_CUDA_API int moon3_cuda_fusion_epilogue_f16(const uint16_t* q, const uint16_t* outs, const float* logits,
                                                  const float* present, const float* out_w, const float* out_b,
                                                  const float* ln_w, const float* ln_b, int64_t B, int64_t M,
                                                  int64_t d, uint16_t* q_new, uint16_t* h, float* gate,
                                                  void* stream);

/* h: (R, d), shallow: (R, Cs); norm_w/norm_b: (d,), gate_in_w: (H, d), gate_in_b: (H,),
 * gate_out_w: (H,); mlp_norm_w/mlp_norm_b: (Cs,), mlp_in_w: (H, Cs), mlp_in_b: (H,),
 * mlp_out_w: (d, H), mlp_out_b: (d,) -> out: (R, d) */
MOON3_CUDA_API int moon3_cuda_fire_residual(const float* h, const float* shallow, int64_t R, int64_t d, int64_t Cs,
                                            int64_t H, const float* norm_w, const float* norm_b,
                                            const float* gate_in_w, const float* gate_in_b, const float* gate_out_w,
                                            float gate_out_b, const float* mlp_norm_w, const float* mlp_norm_b,
                                            const float* mlp_in_w, const float* mlp_in_b, const float* mlp_out_w,
                                            const float* mlp_out_b, float scale, float* out, void* stream);
MOON3_CUDA_API int moon3_cuda_fire_residual_f16(const uint16_t* h, const uint16_t* shallow, int64_t R, int64_t d,
                                                int64_t Cs, int64_t H, const float* norm_w, const float* norm_b,
                                                const float* gate_in_w, const float* gate_in_b,
                                                const float* gate_out_w, float gate_out_b, const float* mlp_norm_w,
                                                const float* mlp_norm_b, const float* mlp_in_w,
                                                const float* mlp_in_b, const float* mlp_out_w,
                                                const float* mlp_out_b, float scale, uint16_t* out, void* stream);

/* q: (B, d), ln_w/ln_b: (d,), w: (D, d), b: (D,), 1 <= dim <= D -> out: (B, dim) */
MOON3_CUDA_API int moon3_cuda_project_normalize(const float* q, const float* ln_w, const float* ln_b, const float* w,
                                                const float* b, int64_t B, int64_t d, int64_t D, int64_t dim,
                                                float* out, void* stream);
MOON3_CUDA_API int moon3_cuda_project_normalize_f16(const uint16_t* q, const float* ln_w, const float* ln_b,
                                                    const float* w, const float* b, int64_t B, int64_t d, int64_t D,
                                                    int64_t dim, uint16_t* out, void* stream);

/* x: (B, D), 1 <= dim <= D -> y: (B, dim) */
MOON3_CUDA_API int moon3_cuda_l2_normalize(const float* x, int64_t B, int64_t D, int64_t dim, float* y,
                                           void* stream);
MOON3_CUDA_API int moon3_cuda_l2_normalize_f16(const uint16_t* x, int64_t B, int64_t D, int64_t dim, uint16_t* y,
                                               void* stream);

/* Host-pointer wrappers: the same arguments, on host memory, without a stream. */
MOON3_CUDA_API int moon3_cuda_fusion_epilogue_host(const float* q, const float* outs, const float* logits,
                                                   const float* present, const float* out_w, const float* out_b,
                                                   const float* ln_w, const float* ln_b, int64_t B, int64_t M,
                                                   int64_t d, float* q_new, float* h, float* gate);
MOON3_CUDA_API int moon3_cuda_fusion_epilogue_f16_host(const uint16_t* q, const uint16_t* outs, const float* logits,
                                                       const float* present, const float* out_w,
                                                       const float* out_b, const float* ln_w, const float* ln_b,
                                                       int64_t B, int64_t M, int64_t d, uint16_t* q_new, uint16_t* h,
                                                       float* gate);
MOON3_CUDA_API int moon3_cuda_fire_residual_host(const float* h, const float* shallow, int64_t R, int64_t d,
                                                 int64_t Cs, int64_t H, const float* norm_w, const float* norm_b,
                                                 const float* gate_in_w, const float* gate_in_b,
                                                 const float* gate_out_w, float gate_out_b, const float* mlp_norm_w,
                                                 const float* mlp_norm_b, const float* mlp_in_w,
                                                 const float* mlp_in_b, const float* mlp_out_w,
                                                 const float* mlp_out_b, float scale, float* out);
MOON3_CUDA_API int moon3_cuda_fire_residual_f16_host(const uint16_t* h, const uint16_t* shallow, int64_t R, int64_t d,
                                                     int64_t Cs, int64_t H, const float* norm_w, const float* norm_b,
                                                     const float* gate_in_w, const float* gate_in_b,
                                                     const float* gate_out_w, float gate_out_b,
                                                     const float* mlp_norm_w, const float* mlp_norm_b,
                                                     const float* mlp_in_w, const float* mlp_in_b,
                                                     const float* mlp_out_w, const float* mlp_out_b, float scale,
                                                     uint16_t* out);
MOON3_CUDA_API int moon3_cuda_project_normalize_host(const float* q, const float* ln_w, const float* ln_b,
                                                     const float* w, const float* b, int64_t B, int64_t d, int64_t D,
                                                     int64_t dim, float* out);
MOON3_CUDA_API int moon3_cuda_project_normalize_f16_host(const uint16_t* q, const float* ln_w, const float* ln_b,
                                                         const float* w, const float* b, int64_t B, int64_t d,
                                                         int64_t D, int64_t dim, uint16_t* out);
MOON3_CUDA_API int moon3_cuda_l2_normalize_host(const float* x, int64_t B, int64_t D, int64_t dim, float* y);
MOON3_CUDA_API int moon3_cuda_l2_normalize_f16_host(const uint16_t* x, int64_t B, int64_t D, int64_t dim,
                                                    uint16_t* y);

#ifdef __cplusplus
}
#endif

#endif /* MOON3_CUDA_FUSED_H_ */
