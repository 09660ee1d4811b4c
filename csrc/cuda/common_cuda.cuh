// What the CUDA translation units share: launch sizes, deterministic block
// reductions, lengths on the device, column sums, and the Elman layer as a
// building block for the fused loss (loss_cuda.cu). Indexing and launches
// only: every formula comes from cells/*.h and loss.h.
//
// Everything runs on at::cuda::getCurrentCUDAStream() of the input's device
// (each op holds a device guard), with no host synchronisation inside a time
// loop or a chunk loop.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "../params.h"

namespace rnnkern::cuda {

constexpr int kThreads = 256;  // a multiple of 32: block_reduce assumes whole warps

// Blocks for a grid-stride loop over n elements (the kernels loop, so the
// grid is capped; 0 elements launch nothing: callers skip n == 0).
inline unsigned blocks_for(int64_t n) {
  return unsigned(std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 16));
}

#define RNNKERN_GRID_STRIDE(i, n)                                                 \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n);      \
       i += int64_t(gridDim.x) * blockDim.x)

#if defined(__CUDACC__)
// A reduction over the block in a fixed order (each warp by shuffles, then
// warp 0 over the warps' partials): the same bits on every run. Every thread
// of the block must call it; every thread gets the result.
template <typename A, typename Op>
__device__ __forceinline__ A block_reduce(A v, Op op, A identity) {
  __shared__ A partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, o));
  __syncthreads();  // a previous call's readers of partial are done
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < int((blockDim.x + 31) >> 5) ? partial[lane] : identity;
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, o));
    if (lane == 0) partial[0] = v;
  }
  __syncthreads();
  return partial[0];
}

struct SumOp {
  template <typename A>
  __device__ __forceinline__ A operator()(A a, A b) const { return a + b; }
};

// max that propagates NaN (as ATen's maximum): a NaN logit makes the row NaN.
struct MaxOp {
  template <typename A>
  __device__ __forceinline__ A operator()(A a, A b) const { return (a != a || a > b) ? a : b; }
};
#endif

// lengths on the device the kernels run on, copied once per call.
struct DeviceLengths {
  at::Tensor dev;  // [B] int64 on the input's device, or undefined (every length is T)
  // The longest sequence, when known without a device sync: from lengths
  // given on the CPU (the usual case: the Python API passes them there), T
  // otherwise (steps past the longest one then run as all-padding steps).
  int64_t max = 0;
  const int64_t* ptr() const { return dev.defined() ? dev.const_data_ptr<int64_t>() : nullptr; }
};

// lengths already checked (check_lengths: int64 [B] in [0, T], on the CPU or
// on `device`).
DeviceLengths device_lengths(const c10::optional<at::Tensor>& lengths, int64_t T,
                             const at::Device& device);

// acc [N] += the column sums of m [M,N] (contiguous), each column summed over
// the rows in a fixed order (no atomics): the same bits on every run.
void add_column_sums(at::Tensor& acc, const at::Tensor& m);

// b_ih + b_hh, whichever are given; undefined when neither is.
at::Tensor bias_sum(const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh);

// The Elman layer on the device (layer_cuda.cu), for fused ops built on it.
// `s` from check_elman_args with s.lengths pointing at the device lengths and
// t_max their maximum (DeviceLengths::max).
//   x [T,B,I] contiguous, hx [B,H], weight_ih [H,I], weight_hh [H,H], bias [H] or undefined
// -> output [T,B,H] (0 where t >= len_b), h_n [B,H]
std::tuple<at::Tensor, at::Tensor> elman_forward(const ElmanShape& s, int64_t t_max,
                                                 const at::Tensor& x, const at::Tensor& hx,
                                                 const at::Tensor& weight_ih,
                                                 const at::Tensor& weight_hh,
                                                 const at::Tensor& bias);

struct ElmanGrads {
  at::Tensor input;      // [T,B,I], or [0] without grad_input
  at::Tensor hx;         // [B,H]
  at::Tensor weight_ih;  // [H,I]
  at::Tensor weight_hh;  // [H,H]
  at::Tensor bias;       // [H], the gradient of b_ih and of b_hh alike
};

// The whole BPTT (truncated when s.truncate > 0), as cpu::elman_backward.
// grad_h_norm, when defined: a contiguous [T,B] tensor of the input's dtype,
// zero on entry, that receives ||dL/dh_t|| (0 where t >= len_b).
ElmanGrads elman_backward(const ElmanShape& s, int64_t t_max, const at::Tensor& grad_output,
                          const at::Tensor& grad_h_n, const at::Tensor& x, const at::Tensor& hx,
                          const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                          const at::Tensor& output, const at::Tensor& grad_h_norm,
                          bool grad_input);

}  // namespace rnnkern::cuda
