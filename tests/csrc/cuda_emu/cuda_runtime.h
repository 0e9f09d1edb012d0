// CPU emulation of the part of the CUDA runtime csrc/cuda/fused.cu uses, so the kernels' source
// can be checked against the NumPy references on a machine without a GPU:
//
//   g++ -std=c++20 -pthread -shared -fPIC -I tests/csrc/cuda_emu -x c++ csrc/cuda/fused.cu
//
// A launch runs every thread of a block as a std::thread; the blocks of the grid run one after
// another. __syncthreads is a std::barrier over the block, __shfl_xor_sync exchanges through a
// per-warp buffer between two per-warp barriers, and shared memory is one static array, filled
// with NaN before each block so a read of a value no thread wrote shows. Device memory is host
// memory. It checks the kernels' arithmetic, indexing and barrier placement (a missing barrier
// often still passes here: threads are not in lockstep, but the timing differs from a GPU's).
#pragma once

#include <math.h>

#include <barrier>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __launch_bounds__(n)

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
using cudaStream_t = struct CUstream_st*;

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx, blockIdx;

namespace {
// The kernels' `extern __shared__ float smem[]` is this array (declared before them, in the same
// unnamed namespace). 227 KiB: an H100's per-block limit.
constexpr size_t kEmuSmemLimit = 227 * 1024;
alignas(16) float smem[kEmuSmemLimit / sizeof(float)];
}  // namespace

namespace cuda_emu {
inline std::barrier<>* block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline float shuffle[32][32];
inline std::map<const void*, int> smem_opt_in;
}  // namespace cuda_emu

inline void __syncthreads() { cuda_emu::block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int offset) {
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    cuda_emu::shuffle[warp][lane] = v;
    cuda_emu::warp_barriers[warp]->arrive_and_wait();
    const float r = cuda_emu::shuffle[warp][lane ^ offset];
    cuda_emu::warp_barriers[warp]->arrive_and_wait();
    return r;
}

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) {
    return e == cudaErrorInvalidValue ? "invalid argument" : "error";
}
inline cudaError_t cudaGetDeviceCount(int* n) {
    *n = 1;
    return cudaSuccess;
}
inline cudaError_t cudaMalloc(void** p, size_t bytes) {
    *p = std::malloc(bytes ? bytes : 1);
    return *p ? cudaSuccess : cudaErrorInvalidValue;
}
inline cudaError_t cudaFree(void* p) {
    std::free(p);
    return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
    std::memcpy(dst, src, bytes);
    return cudaSuccess;
}

template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*f)(P...), cudaFuncAttribute, int bytes) {
    if (bytes < 0 || static_cast<size_t>(bytes) > kEmuSmemLimit) return cudaErrorInvalidValue;
    cuda_emu::smem_opt_in[reinterpret_cast<const void*>(f)] = bytes;
    return cudaSuccess;
}

namespace cuda_emu {
template <typename... P, size_t... I>
void call(void (*f)(P...), void** args, std::index_sequence<I...>) {
    f(*static_cast<P*>(args[I])...);
}
}  // namespace cuda_emu

template <typename... P>
cudaError_t cudaLaunchKernel(void (*f)(P...), dim3 grid, dim3 block, void** args, size_t smem_bytes, cudaStream_t) {
    if (block.x == 0 || block.x % 32 || block.x > 1024 || block.y != 1 || grid.y != 1)
        return cudaErrorInvalidConfiguration;
    const auto opt = cuda_emu::smem_opt_in.find(reinterpret_cast<const void*>(f));
    const size_t limit = opt == cuda_emu::smem_opt_in.end() ? 48 * 1024 : static_cast<size_t>(opt->second);
    if (smem_bytes > limit) return cudaErrorInvalidValue;
    std::barrier<> bar(block.x);
    cuda_emu::block_barrier = &bar;
    cuda_emu::warp_barriers.clear();
    for (unsigned w = 0; w < block.x / 32; ++w) cuda_emu::warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block.x; ++t) {
        threads.emplace_back([&, t] {
            threadIdx = dim3(t);
            for (unsigned b = 0; b < grid.x; ++b) {
                blockIdx = dim3(b);
                if (t == 0)
                    for (size_t i = 0; i < sizeof(smem) / sizeof(float); ++i)
                        smem[i] = std::numeric_limits<float>::quiet_NaN();
                bar.arrive_and_wait();
                cuda_emu::call(f, args, std::index_sequence_for<P...>{});
                bar.arrive_and_wait();
            }
        });
    }
    for (auto& th : threads) th.join();
    return cudaSuccess;
}
