// The CUDA time loop of every cell (Elman, LSTM, GRU) and
// TORCH_LIBRARY_IMPL(rnnkern, CUDA) for elman_fwd/bwd and layer_fwd/bwd.
//
// The structure of cuDNN's standard algorithm (and haste's):
// Forward:  ax = x W_ih^T + b             one GEMM over all T*B rows, before the loop
//           per step: ah = h_prev W_hh^T  one cuBLAS GEMM (at::mm_out, current stream)
//                     the cell            one fused pointwise kernel: cells/*.h, lengths
//                                         (frozen state, zero output), reverse
//                     (LSTM projection: h = m W_hr^T, a GEMM and a scatter)
// Backward: per step, last to first:
//                     (||dL/dh_t|| when asked: a row-norm kernel)
//                     the cell's backward one fused pointwise kernel -> dax_t, dah_t
//                     carry = dah_t W_hh  one GEMM, and a kernel that hands it to the
//                                         sequences still running (or cuts it: truncate)
//           then dx, dW_ih, dW_hh, dW_hr as whole GEMMs and the biases as
//           ordered column sums (no atomics: bitwise the same run to run).
// Small layers (W_hh fits in one block's shared memory, G <= 1024, no
// projection) run each loop as one persistent kernel instead: "Persistent steps".
// The semantics are cpu/elman_cpu.cpp's and cpu/layer_cpu.cpp's exactly; the
// math is cells/*.h, marked RNNKERN_HD, which the CPU tests cover.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "../cells/elman.h"
#include "../cells/gru.h"
#include "../cells/lstm.h"
#include "../checks.h"
#include "../params.h"
#include "common_cuda.cuh"

namespace rnnkern::cuda {

// ---------------------------------------------------------------------------
// Shared helpers (common_cuda.cuh)
// ---------------------------------------------------------------------------

DeviceLengths device_lengths(const c10::optional<at::Tensor>& lengths, int64_t T,
                             const at::Device& device) {
  DeviceLengths d;
  d.max = T;
  if (!lengths.has_value()) return d;
  const at::Tensor& len = *lengths;
  if (len.device() == device) {
    d.dev = len.contiguous();  // reading the maximum back would be a sync: run all T steps
    return d;
  }
  const at::Tensor host = len.contiguous();
  const int64_t* l = host.const_data_ptr<int64_t>();
  d.max = 0;
  for (int64_t b = 0; b < host.numel(); ++b) d.max = std::max(d.max, l[b]);
  // A pinned staging copy, so the upload is asynchronous on the current stream
  // (a pageable one would wait for every kernel queued before it).
  at::Tensor pinned = at::empty({host.numel()}, host.options().pinned_memory(true));
  pinned.copy_(host);
  d.dev = pinned.to(device, /*non_blocking=*/true);
  return d;
}

at::Tensor bias_sum(const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh) {
  if (b_ih.has_value() && b_hh.has_value()) return *b_ih + *b_hh;
  if (b_ih.has_value()) return *b_ih;
  if (b_hh.has_value()) return *b_hh;
  return at::Tensor();
}

namespace {

constexpr int64_t kColumnChunk = 256;  // rows summed by one thread in the first pass

// partial[c, j] = sum of m[i, j] over the rows i of chunk c, in order.
template <typename T>
__global__ void column_chunk_sums(const T* m, int64_t M, int64_t N, T* partial) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t c = blockIdx.y;
  if (j >= N) return;
  const int64_t i1 = std::min(M, (c + 1) * kColumnChunk);
  T acc = T(0);
  for (int64_t i = c * kColumnChunk; i < i1; ++i) acc += m[i * N + j];
  partial[c * N + j] = acc;
}

// acc[j] += sum over the chunks c of partial[c, j], in order.
template <typename T>
__global__ void add_chunk_sums(T* acc, const T* partial, int64_t chunks, int64_t N) {
  RNNKERN_GRID_STRIDE(j, N) {
    T s = T(0);
    for (int64_t c = 0; c < chunks; ++c) s += partial[c * N + j];
    acc[j] += s;
  }
}

}  // namespace

void add_column_sums(at::Tensor& acc, const at::Tensor& m) {
  TORCH_INTERNAL_ASSERT(m.dim() == 2 && m.is_contiguous() && acc.is_contiguous() &&
                        acc.numel() == m.size(1) && acc.scalar_type() == m.scalar_type());
  const int64_t M = m.size(0), N = m.size(1);
  if (M == 0 || N == 0) return;
  // Grid y holds the chunks: at most 65535 of them at once.
  constexpr int64_t kMaxChunks = 65535;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "add_column_sums_cuda", [&] {
    for (int64_t r0 = 0; r0 < M; r0 += kMaxChunks * kColumnChunk) {
      const int64_t rows = std::min(M - r0, kMaxChunks * kColumnChunk);
      const int64_t ch = (rows + kColumnChunk - 1) / kColumnChunk;
      auto partial = at::empty({ch, N}, m.options());
      const dim3 grid(unsigned((N + kThreads - 1) / kThreads), unsigned(ch));
      column_chunk_sums<scalar_t><<<grid, kThreads, 0, stream>>>(
          m.const_data_ptr<scalar_t>() + r0 * N, rows, N, partial.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      add_chunk_sums<scalar_t><<<blocks_for(N), kThreads, 0, stream>>>(
          acc.data_ptr<scalar_t>(), partial.const_data_ptr<scalar_t>(), ch, N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

namespace {

// ---------------------------------------------------------------------------
// The loop's shape and per-step kernels
// ---------------------------------------------------------------------------

enum class Cell { kElman, kLstm, kGru };

// One layer call, whatever the cell: G gate rows (H, 4H, 3H), P the emitted
// h's size (H, or the LSTM's proj_size), S the saved activations per row (4H
// for the gated cells, none for Elman).
struct Loop {
  int64_t T = 0, B = 0, I = 0, H = 0, P = 0, G = 0;
  Cell cell = Cell::kElman;
  bool proj = false, reverse = false;
  int64_t truncate = 0;
  Activation act = Activation::kTanh;
  const int64_t* lengths = nullptr;  // [B] on the device, or nullptr
  int64_t t_max = 0;                 // no sequence runs at steps >= t_max

  bool cut_before(int64_t step) const { return truncate > 0 && step > 0 && step % truncate == 0; }
};

Loop loop_of(const ElmanShape& s, int64_t t_max) {
  Loop l;
  l.T = s.T, l.B = s.B, l.I = s.I, l.H = s.H, l.P = s.H, l.G = s.H;
  l.cell = Cell::kElman;
  l.act = s.act, l.reverse = s.reverse, l.truncate = s.truncate;
  l.lengths = s.lengths, l.t_max = std::min(t_max, s.T);
  return l;
}

Loop loop_of(const LayerShape& s, int64_t t_max) {
  Loop l;
  l.T = s.T, l.B = s.B, l.I = s.I, l.H = s.H, l.P = s.P, l.G = s.G;
  l.cell = s.cell == CellKind::kLstm ? Cell::kLstm : Cell::kGru;
  l.proj = s.proj, l.reverse = s.reverse, l.truncate = s.truncate;
  l.lengths = s.lengths, l.t_max = std::min(t_max, s.T);
  return l;
}

// Where sequence b stands at processing step `step` (ElmanShape::reverse).
struct Pos {
  bool active;  // step < len_b
  int64_t r;    // row of [T,B,*] at that step's time
  int64_t pr;   // row of the state it read (the previous processed step), -1 at step 0
};

// ... for a sequence b of length len.
__device__ __forceinline__ Pos pos_at(int64_t len, int64_t B, bool reverse, int64_t step,
                                      int64_t b) {
  Pos p;
  p.active = step < len;
  const int64_t t = reverse ? len - 1 - step : step;
  p.r = t * B + b;
  p.pr = step == 0 ? -1 : (reverse ? t + 1 : t - 1) * B + b;
  return p;
}

__device__ __forceinline__ Pos pos_of(const int64_t* lengths, int64_t T, int64_t B, bool reverse,
                                      int64_t step, int64_t b) {
  return pos_at(lengths ? lengths[b] : T, B, reverse, step, b);
}

template <typename T>
struct FwdStep {
  int64_t T_, B, H, P, G, step;
  bool reverse;
  Activation act;
  const int64_t* lengths;
  const T* ax;     // [T,B,G] x W_ih^T + b (GRU: b_ih only)
  const T* ah;     // [B,G] this step's h_prev W_hh^T
  const T* b_hh;   // [G] GRU's b_hh (inside r * (.)), or nullptr
  T* h;            // [B,P] the running state, frozen per row after its last step
  T* c;            // [B,H] LSTM's running cell state
  T* out;          // [T,B,P]
  T* gates;        // [T,B,4H] saved activations (gated cells)
  T* cell;         // [T,B,H] LSTM's c_t
  T* m;            // [B,H] projection: this step's o * tanh(c)
  T* proj_in;      // [T,B,H] projection: m at every step
};

// One step of the cell for every (b, j < H).
template <typename T, Cell C, bool kProj>
__global__ void fwd_step_kernel(FwdStep<T> p) {
  const int64_t H = p.H;
  RNNKERN_GRID_STRIDE(i, p.B * H) {
    const int64_t b = i / H, j = i - b * H;
    const Pos q = pos_of(p.lengths, p.T_, p.B, p.reverse, p.step, b);
    if (!q.active) {
      // Steps len..T-1 are, in either direction, the padded times len..T-1:
      // every output is 0 there (saved state included).
      const int64_t r = p.step * p.B + b;
      if (j < p.P) p.out[r * p.P + j] = T(0);
      if constexpr (C != Cell::kElman) {
        for (int k = 0; k < 4; ++k) p.gates[r * 4 * H + k * H + j] = T(0);
      }
      if constexpr (C == Cell::kLstm) p.cell[r * H + j] = T(0);
      continue;
    }
    const int64_t r = q.r;
    if constexpr (C == Cell::kElman) {
      const T h = act_forward(p.act, p.ax[r * H + j] + p.ah[b * H + j]);
      p.out[r * H + j] = h;
      p.h[b * H + j] = h;
    } else if constexpr (C == Cell::kLstm) {
      const T* ax = p.ax + r * p.G + j;
      const T* ah = p.ah + b * p.G + j;
      T gi, gf, gg, go, c, m;
      cells::lstm::forward<T>(ax[0] + ah[0], ax[H] + ah[H], ax[2 * H] + ah[2 * H],
                              ax[3 * H] + ah[3 * H], p.c[b * H + j], gi, gf, gg, go, c, m);
      T* act = p.gates + r * 4 * H + j;
      act[0] = gi;
      act[H] = gf;
      act[2 * H] = gg;
      act[3 * H] = go;
      p.cell[r * H + j] = c;
      p.c[b * H + j] = c;
      if constexpr (kProj) {
        p.m[b * H + j] = m;
        p.proj_in[r * H + j] = m;
      } else {  // P == H
        p.out[r * H + j] = m;
        p.h[b * H + j] = m;
      }
    } else {
      const T* ax = p.ax + r * p.G + j;
      const T* ah = p.ah + b * p.G + j;
      const T ahr = p.b_hh ? ah[0] + p.b_hh[j] : ah[0];
      const T ahz = p.b_hh ? ah[H] + p.b_hh[H + j] : ah[H];
      const T ahn = p.b_hh ? ah[2 * H] + p.b_hh[2 * H + j] : ah[2 * H];
      T gr, gz, gn, h;
      cells::gru::forward<T>(ax[0], ax[H], ax[2 * H], ahr, ahz, ahn, p.h[b * H + j], gr, gz, gn, h);
      T* act = p.gates + r * 4 * H + j;
      act[0] = gr;
      act[H] = gz;
      act[2 * H] = gn;
      act[3 * H] = ahn;
      p.out[r * H + j] = h;
      p.h[b * H + j] = h;
    }
  }
}

// The projection's result hp = m W_hr^T [B,P] into the running rows' output and state.
template <typename T>
__global__ void proj_out_kernel(FwdStep<T> p, const T* hp) {
  RNNKERN_GRID_STRIDE(i, p.B * p.P) {
    const int64_t b = i / p.P, j = i - b * p.P;
    const Pos q = pos_of(p.lengths, p.T_, p.B, p.reverse, p.step, b);
    if (!q.active) continue;
    const T v = hp[i];
    p.out[q.r * p.P + j] = v;
    p.h[i] = v;
  }
}

template <typename T>
struct BwdStep {
  int64_t T_, B, H, P, G, step;
  bool reverse;
  Activation act;
  const int64_t* lengths;
  const T* grad_out;  // [T,B,P] dL/dh_t from outside the recurrence
  const T* out;       // [T,B,P] every h_t (Elman: act'; GRU: h_prev)
  const T* h0;        // [B,P]
  const T* c0;        // [B,H] LSTM
  const T* gates;     // [T,B,4H] gated cells
  const T* cell;      // [T,B,H] LSTM
  const T* dm;        // [B,H] projection: dL/dm_t = dL/dh_t W_hr
  T* dh;              // [B,P] the carry dL/dh (dL/dh_n in, dL/dh0 out)
  T* dc;              // [B,H] LSTM: dL/dc (dL/dc_n in, dL/dc0 out)
  T* dax;             // [T,B,G] zero on entry
  T* dah;             // [T,B,G] GRU's hidden-side gradient (zero on entry); else dax
  T* dah_step;        // [B,G] this step's dah rows (0 for finished sequences)
  T* dh_step;         // [B,P] projection: this step's dL/dh_t rows
  T* dh_all;          // [T,B,P] projection: dL/dh_t at every step (zero on entry)
  T* grad_norm;       // [T,B] ||dL/dh_t|| (zero on entry), or nullptr
};

// ||dL/dh_t|| = ||grad_out + carry|| per running sequence: a block per row,
// summed in double in a fixed order.
template <typename T>
__global__ void grad_norm_kernel(BwdStep<T> p) {
  for (int64_t b = blockIdx.x; b < p.B; b += gridDim.x) {
    const Pos q = pos_of(p.lengths, p.T_, p.B, p.reverse, p.step, b);
    if (!q.active) continue;  // uniform over the block
    double acc = 0;
    for (int64_t j = threadIdx.x; j < p.P; j += blockDim.x) {
      const double v = double(p.grad_out[q.r * p.P + j] + p.dh[b * p.P + j]);
      acc += v * v;
    }
    acc = block_reduce(acc, SumOp(), 0.0);
    if (threadIdx.x == 0) p.grad_norm[q.r] = T(std::sqrt(acc));
  }
}

// Projection: dL/dh_t of the running rows (0 for the others) before dm = dh_t W_hr.
template <typename T>
__global__ void proj_grad_kernel(BwdStep<T> p) {
  RNNKERN_GRID_STRIDE(i, p.B * p.P) {
    const int64_t b = i / p.P, j = i - b * p.P;
    const Pos q = pos_of(p.lengths, p.T_, p.B, p.reverse, p.step, b);
    if (!q.active) {
      p.dh_step[i] = T(0);
      continue;
    }
    const T d = p.grad_out[q.r * p.P + j] + p.dh[i];
    p.dh_step[i] = d;
    p.dh_all[q.r * p.P + j] = d;
  }
}

// The cell's backward at one step for every (b, j < H).
template <typename T, Cell C, bool kProj>
__global__ void bwd_step_kernel(BwdStep<T> p) {
  const int64_t H = p.H, G = p.G;
  RNNKERN_GRID_STRIDE(i, p.B * H) {
    const int64_t b = i / H, j = i - b * H;
    const Pos q = pos_of(p.lengths, p.T_, p.B, p.reverse, p.step, b);
    if (!q.active) {
      // A frozen state passes its gradients through unchanged.
      for (int64_t k = 0; k < G; k += H) p.dah_step[b * G + k + j] = T(0);
      continue;
    }
    const int64_t r = q.r;
    if constexpr (C == Cell::kElman) {
      const T dz = act_backward(p.act, p.grad_out[r * H + j] + p.dh[b * H + j], p.out[r * H + j]);
      p.dax[r * H + j] = dz;
      p.dah_step[b * H + j] = dz;
    } else if constexpr (C == Cell::kLstm) {
      const T dm = kProj ? p.dm[b * H + j] : p.grad_out[r * H + j] + p.dh[b * H + j];
      const T* a = p.gates + r * 4 * H + j;
      const T c_prev = q.pr < 0 ? p.c0[b * H + j] : p.cell[q.pr * H + j];
      T dai, daf, dag, dao, dcp;
      cells::lstm::backward<T>(a[0], a[H], a[2 * H], a[3 * H], p.cell[r * H + j], c_prev, dm,
                               p.dc[b * H + j], dai, daf, dag, dao, dcp);
      T* d = p.dax + r * G + j;
      T* ds = p.dah_step + b * G + j;
      d[0] = ds[0] = dai;
      d[H] = ds[H] = daf;
      d[2 * H] = ds[2 * H] = dag;
      d[3 * H] = ds[3 * H] = dao;
      p.dc[b * H + j] = dcp;
    } else {
      const T dh = p.dh[b * H + j] + p.grad_out[r * H + j];
      const T* a = p.gates + r * 4 * H + j;
      const T h_prev = q.pr < 0 ? p.h0[b * H + j] : p.out[q.pr * H + j];
      T dar, daz, daxn, dahn, direct;
      cells::gru::backward<T>(a[0], a[H], a[2 * H], a[3 * H], h_prev, dh, dar, daz, daxn, dahn,
                              direct);
      T* dx = p.dax + r * G + j;
      T* dhh = p.dah + r * G + j;
      T* ds = p.dah_step + b * G + j;
      dx[0] = dhh[0] = ds[0] = dar;
      dx[H] = dhh[H] = ds[H] = daz;
      dx[2 * H] = daxn;
      dhh[2 * H] = ds[2 * H] = dahn;
      p.dh[b * H + j] = direct;  // the direct part of dL/dh_prev; the GEMM adds the rest
    }
  }
}

// carry = dah_step W_hh [B,P] to the running sequences: it replaces their dL/dh
// (Elman, LSTM) or adds to its direct part (GRU); finished ones keep theirs.
template <typename T, bool kAdd>
__global__ void carry_kernel(BwdStep<T> p, const T* carry) {
  RNNKERN_GRID_STRIDE(i, p.B * p.P) {
    const int64_t b = i / p.P;
    const Pos q = pos_of(p.lengths, p.T_, p.B, p.reverse, p.step, b);
    if (!q.active) continue;
    p.dh[i] = kAdd ? p.dh[i] + carry[i] : carry[i];
  }
}

template <typename K, typename P>
void launch(K kernel, int64_t n, const P& p) {
  if (n == 0) return;
  kernel<<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename K, typename P, typename X>
void launch(K kernel, int64_t n, const P& p, X x) {
  if (n == 0) return;
  kernel<<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(p, x);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------
// Persistent steps: a small layer's whole time loop in one kernel
// ---------------------------------------------------------------------------
// The per-step loop above launches a GEMM and one to three kernels per step:
// at small sizes each step then costs several launches (about 15 us a step on
// an H100 for H = 64), far more than its arithmetic. The sequences of a layer
// are independent, so when W_hh fits in one block's shared memory (and G <=
// 1024, no projection) each block runs every step of its own rb sequences
// (cuDNN's persistent RNN and haste's idea, without a grid-wide barrier):
//   forward, per step:  a = h_prev W_hh^T        thread (slice of k, g): a
//                                                partial sum over its slice of
//                                                W_hh^T's column g in shared
//                                                memory, h_prev broadcast
//                       the cell (cells/*.h)      thread (row, j): the slices'
//                                                sums in order, lengths,
//                                                reverse, the saved state
//   backward, per step: the cell's backward      thread (row, j) -> dz_t [rb,G]
//                       carry = dz_t W_hh        thread (slice of G, row, k):
//                                                partial sums, added in order
//                       grad_norm, truncation, the frozen states
// dW_hh, dW_ih, dx and the biases stay whole GEMMs and ordered column sums
// after the loop (param_grads). Every sum runs in a fixed order: the same bits
// on every run (they differ from the per-step loop's cuBLAS bits by rounding).
// Each step's global reads are issued one step ahead, so their latency hides
// behind the previous step's product.

constexpr int kMaxRowsPerBlock = 8;
constexpr int kMinSlice = 16;  // the shortest slice of a sum one thread runs

// The block's rows: their lengths (0 past B) and the longest, in shared memory.
struct BlockRows {
  int64_t b0, len[kMaxRowsPerBlock], max_len;
};

struct Persist {
  bool ok = false;
  int rows = 1;         // sequences per block (rb)
  int fwd_splits = 1;   // forward: slices of P, one thread per (slice, g)
  int fwd_threads = 32;
  int bwd_splits = 1;   // backward: slices of G, one thread per (slice, row, k)
  int bwd_threads = 32;
  size_t fwd_smem = 0, bwd_smem = 0;  // dynamic shared memory, bytes
};

int64_t round_up_warp(int64_t n) { return (n + 31) / 32 * 32; }

// Threads for `units` sums of length `len` each, in slices of at least
// kMinSlice, and at least `floor` threads: (splits, threads).
std::pair<int64_t, int64_t> slice_sums(int64_t units, int64_t len, int64_t floor) {
  int64_t splits = std::max<int64_t>(1, std::min(1024 / units, (len + kMinSlice - 1) / kMinSlice));
  return {splits, round_up_warp(std::max(splits * units, floor))};
}

template <typename T>
Persist persist_plan(const Loop& s) {
  Persist p;
  if (s.proj || s.G > 1024 || s.B == 0) return p;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t sms = std::max(1, prop->multiProcessorCount);
  int64_t rb = std::clamp<int64_t>((s.B + sms - 1) / sms, 1, kMaxRowsPerBlock);
  while (rb > 1 && rb * s.H > 1024) --rb;
  const auto [fs, ft] = slice_sums(s.G, s.P, rb * s.H);
  const auto [bs, bt] = slice_sums(rb * s.P, s.G, std::max(s.G, rb * s.H));
  // forward:  W^T [P,G], partial sums [fs,rb,G], h [rb,P]
  // backward: ||.||^2 [2,rb,H] (double), W [G,P], dz [rb,G], partial sums [bs,rb,P]
  p.fwd_smem = size_t(s.G * s.P + fs * rb * s.G + rb * s.P) * sizeof(T);
  p.bwd_smem = 2 * size_t(rb * s.H) * sizeof(double) +
               size_t(s.G * s.P + rb * s.G + bs * rb * s.P) * sizeof(T);
  // (BlockRows, the kernels' static shared memory, comes on top.)
  const size_t limit = prop->sharedMemPerBlockOptin - sizeof(BlockRows);
  if (std::max(p.fwd_smem, p.bwd_smem) > limit ||
      std::max(ft, bt) > prop->maxThreadsPerBlock) {
    return p;
  }
  p.ok = true;
  p.rows = int(rb);
  p.fwd_splits = int(fs), p.fwd_threads = int(ft);
  p.bwd_splits = int(bs), p.bwd_threads = int(bt);
  return p;
}

template <typename K>
void launch_persistent(K kernel, int64_t B, int rows, int threads, size_t smem,
                       const auto&... args) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      int(smem)));
  const unsigned blocks = unsigned((B + rows - 1) / rows);
  kernel<<<blocks, threads, smem, at::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

__device__ __forceinline__ void load_block_rows(BlockRows& rows, const int64_t* lengths,
                                                int64_t T, int64_t B, int rb_n) {
  if (threadIdx.x == 0) {
    rows.b0 = int64_t(blockIdx.x) * rb_n;
    rows.max_len = 0;
    for (int q = 0; q < rb_n; ++q) {
      const int64_t b = rows.b0 + q;
      rows.len[q] = b < B ? (lengths ? lengths[b] : T) : 0;
      rows.max_len = std::max(rows.max_len, rows.len[q]);
    }
  }
}

// A thread's unit in a persistent kernel: row q of the block, unit j (P == H).
struct BlockUnit {
  int q, j;
  bool unit;    // q is one of the block's rows
  bool item;    // ... and holds a sequence (b < B)
  int64_t b, len;
};

__device__ __forceinline__ BlockUnit unit_of(const BlockRows& rows, int H, int rb_n, int64_t B) {
  BlockUnit u;
  u.q = int(threadIdx.x) / H;
  u.j = int(threadIdx.x) - u.q * H;
  u.unit = u.q < rb_n;
  u.b = rows.b0 + u.q;
  u.item = u.unit && u.b < B;
  u.len = u.unit ? rows.len[u.q] : 0;
  return u;
}

template <typename T, Cell C>
__global__ void __launch_bounds__(1024) fwd_persistent_kernel(FwdStep<T> p, const T* w_hh,
                                                              int rb_n, int splits) {
  constexpr int NG = C == Cell::kElman ? 1 : (C == Cell::kLstm ? 4 : 3);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ BlockRows rows;
  const int64_t B = p.B;
  const int H = int(p.H), G = int(p.G), P = int(p.P);  // G * P fits shared memory
  T* wt = reinterpret_cast<T*>(smem_raw);  // [P,G]: W_hh^T
  T* part = wt + G * P;                     // [splits,rb,G]: slices of h_prev W_hh^T
  T* h_s = part + splits * rb_n * G;        // [rb,P]: the running states
  const int tid = threadIdx.x;
  load_block_rows(rows, p.lengths, p.T_, B, rb_n);
  for (int i = tid; i < G * P; i += blockDim.x) {
    const int g = i / P, k = i - g * P;
    wt[k * G + g] = w_hh[i];
  }
  __syncthreads();
  const auto [q, j, unit, item, b, len] = unit_of(rows, H, rb_n, B);
  // This thread's slice of the product: column g, rows k0..k1 of W_hh^T.
  const int sl = tid / G, g = tid - sl * G;
  const int kc = (P + splits - 1) / splits;
  const int k0 = sl * kc, k1 = std::min(P, k0 + kc);
  T c = T(0), bh[3] = {T(0), T(0), T(0)};
  if (unit) h_s[q * P + j] = item ? p.h[b * P + j] : T(0);
  if constexpr (C == Cell::kLstm) {
    if (item) c = p.c[b * H + j];
  }
  if constexpr (C == Cell::kGru) {
    if (item && p.b_hh) {
      for (int k = 0; k < 3; ++k) bh[k] = p.b_hh[k * H + j];
    }
  }
  // This thread's input projection at a step, read one step ahead.
  T x[NG];
  auto load_x = [&](int64_t step) {
    if (item && step < len) {
      const int64_t r = pos_at(len, B, p.reverse, step, b).r;
#pragma unroll
      for (int k = 0; k < NG; ++k) x[k] = p.ax[r * G + k * H + j];
    }
  };
  load_x(0);
  __syncthreads();
  const int64_t steps = rows.max_len;
  for (int64_t step = 0; step < p.T_; ++step) {
    if (step >= steps) {
      // Every row of the block is past its end: zero outputs, no product.
      if (item) {
        const int64_t r = step * B + b;
        p.out[r * P + j] = T(0);
        if constexpr (C != Cell::kElman) {
          for (int k = 0; k < 4; ++k) p.gates[r * 4 * H + k * H + j] = T(0);
        }
        if constexpr (C == Cell::kLstm) p.cell[r * H + j] = T(0);
      }
      continue;
    }
    if (sl < splits) {
      const T* w = wt + g;
      for (int rr = 0; rr < rb_n; ++rr) {
        const T* h = h_s + rr * P;
        T acc = T(0);
#pragma unroll 8
        for (int k = k0; k < k1; ++k) acc += w[k * G] * h[k];
        part[(sl * rb_n + rr) * G + g] = acc;
      }
    }
    __syncthreads();
    if (item) {
      if (step >= len) {
        const int64_t r = step * B + b;  // a padded time, in either direction
        p.out[r * P + j] = T(0);
        if constexpr (C != Cell::kElman) {
          for (int k = 0; k < 4; ++k) p.gates[r * 4 * H + k * H + j] = T(0);
        }
        if constexpr (C == Cell::kLstm) p.cell[r * H + j] = T(0);
      } else {
        const int64_t r = pos_at(len, B, p.reverse, step, b).r;
        T a[NG];
#pragma unroll
        for (int k = 0; k < NG; ++k) {
          const T* pk = part + q * G + k * H + j;
          a[k] = pk[0];
          for (int s2 = 1; s2 < splits; ++s2) a[k] += pk[s2 * rb_n * G];
        }
        T h;
        if constexpr (C == Cell::kElman) {
          h = act_forward(p.act, x[0] + a[0]);
        } else if constexpr (C == Cell::kLstm) {
          T gi, gf, gg, go;
          cells::lstm::forward<T>(x[0] + a[0], x[1] + a[1], x[2] + a[2], x[3] + a[3], c, gi, gf,
                                  gg, go, c, h);
          T* act = p.gates + r * 4 * H + j;
          act[0] = gi;
          act[H] = gf;
          act[2 * H] = gg;
          act[3 * H] = go;
          p.cell[r * H + j] = c;
        } else {
          const T ahn = a[2] + bh[2];
          T gr, gz, gn;
          cells::gru::forward<T>(x[0], x[1], x[2], a[0] + bh[0], a[1] + bh[1], ahn,
                                 h_s[q * P + j], gr, gz, gn, h);
          T* act = p.gates + r * 4 * H + j;
          act[0] = gr;
          act[H] = gz;
          act[2 * H] = gn;
          act[3 * H] = ahn;
        }
        p.out[r * P + j] = h;
        h_s[q * P + j] = h;
      }
      load_x(step + 1);
    }
    __syncthreads();
  }
  if (item) {
    p.h[b * P + j] = h_s[q * P + j];
    if constexpr (C == Cell::kLstm) p.c[b * H + j] = c;
  }
}

template <typename T, Cell C>
__global__ void __launch_bounds__(1024) bwd_persistent_kernel(BwdStep<T> p, const T* w_hh,
                                                              int64_t truncate, int rb_n,
                                                              int splits) {
  constexpr int NG = C == Cell::kElman ? 1 : (C == Cell::kLstm ? 4 : 3);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ BlockRows rows;
  const int64_t B = p.B;
  const int H = int(p.H), G = int(p.G), P = int(p.P);  // G * P fits shared memory
  double* sq_s = reinterpret_cast<double*>(smem_raw);  // [2,rb,H]: (dL/dh_t)^2, by step parity
  T* w = reinterpret_cast<T*>(sq_s + 2 * rb_n * H);    // [G,P]: W_hh
  T* dz_s = w + G * P;                                 // [rb,G]: this step's dah
  T* part = dz_s + rb_n * G;                           // [splits,rb,P]: carry partial sums
  const int tid = threadIdx.x;
  load_block_rows(rows, p.lengths, p.T_, B, rb_n);
  for (int i = tid; i < G * P; i += blockDim.x) w[i] = w_hh[i];
  __syncthreads();
  const auto [q, j, unit, item, b, len] = unit_of(rows, H, rb_n, B);
  T dh = item ? p.dh[b * P + j] : T(0);  // the carry dL/dh (P == H)
  T dc = T(0);
  if constexpr (C == Cell::kLstm) {
    if (item) dc = p.dc[b * H + j];
  }
  // This thread's slice of the carry: row rr, column k, rows g0..g1 of W_hh.
  const int sums = splits * rb_n * P;
  const int sl = tid / (rb_n * P), rem = tid - sl * (rb_n * P);
  const int rr = rem / P, k = rem - rr * P;
  const int gc = (G + splits - 1) / splits;
  const int g0 = sl * gc, g1 = std::min(G, g0 + gc);
  // This thread's saved state at a step, read one step ahead: dL/dh_t from
  // outside, then the cell's (Elman: h_t; LSTM: i, f, g, o, c_t, c_prev;
  // GRU: r, z, n, ah_n, h_prev).
  constexpr int NS = C == Cell::kElman ? 1 : (C == Cell::kLstm ? 6 : 5);
  T gout = T(0), sv[NS];
  int64_t r_cur = 0;  // the row the loaded state belongs to
  auto load = [&](int64_t step) {
    if (!(item && step >= 0 && step < len)) return;
    const Pos at = pos_at(len, B, p.reverse, step, b);
    const int64_t r = r_cur = at.r, pr = at.pr;
    gout = p.grad_out[r * P + j];
    if constexpr (C == Cell::kElman) {
      sv[0] = p.out[r * H + j];
    } else {
      const T* a = p.gates + r * 4 * H + j;
      for (int kk = 0; kk < 4; ++kk) sv[kk] = a[kk * H];
      if constexpr (C == Cell::kLstm) {
        sv[4] = p.cell[r * H + j];
        sv[5] = pr < 0 ? p.c0[b * H + j] : p.cell[pr * H + j];
      } else {
        sv[4] = pr < 0 ? p.h0[b * H + j] : p.out[pr * H + j];
      }
    }
  };
  const int64_t steps = rows.max_len;
  load(std::min(p.T_, steps) - 1);
  for (int64_t step = p.T_ - 1; step >= 0; --step) {
    const bool cut = truncate > 0 && step > 0 && step % truncate == 0;
    if (step >= steps) {
      // Every row of the block has ended: frozen states pass their gradients
      // through, unless a truncation boundary cuts them.
      if (cut) dh = dc = T(0);
      continue;
    }
    const bool active = item && step < len;
    const int64_t r = r_cur;
    double* sq = sq_s + (step & 1) * rb_n * H;
    T direct = T(0);
    if (unit) {
      T dz[NG];
#pragma unroll
      for (int kk = 0; kk < NG; ++kk) dz[kk] = T(0);
      if (active) {
        const T dht = gout + dh;
        if (p.grad_norm) sq[q * H + j] = double(dht) * double(dht);
        if constexpr (C == Cell::kElman) {
          dz[0] = act_backward(p.act, dht, sv[0]);
          p.dax[r * H + j] = dz[0];
        } else if constexpr (C == Cell::kLstm) {
          T dcp;
          cells::lstm::backward<T>(sv[0], sv[1], sv[2], sv[3], sv[4], sv[5], dht, dc, dz[0],
                                   dz[1], dz[2], dz[3], dcp);
          dc = dcp;
          for (int kk = 0; kk < 4; ++kk) p.dax[r * G + kk * H + j] = dz[kk];
        } else {
          T daxn;
          cells::gru::backward<T>(sv[0], sv[1], sv[2], sv[3], sv[4], dht, dz[0], dz[1], daxn,
                                  dz[2], direct);
          T* dx = p.dax + r * G + j;
          T* dhh = p.dah + r * G + j;
          dx[0] = dhh[0] = dz[0];
          dx[H] = dhh[H] = dz[1];
          dx[2 * H] = daxn;
          dhh[2 * H] = dz[2];
        }
      }
#pragma unroll
      for (int kk = 0; kk < NG; ++kk) dz_s[q * G + kk * H + j] = dz[kk];
      if (step == 0 && item) {
        for (int kk = 0; kk < NG; ++kk) p.dah_step[b * G + kk * H + j] = dz[kk];
      }
    }
    load(step - 1);  // the next step's reads, in flight during the product
    __syncthreads();
    if (tid < sums) {
      const T* z = dz_s + rr * G;
      T acc = T(0);
#pragma unroll 8
      for (int gg = g0; gg < g1; ++gg) acc += z[gg] * w[gg * P + k];
      part[tid] = acc;
    }
    __syncthreads();
    if (item) {
      if (active && p.grad_norm && j == 0) {
        double acc = 0;
        for (int jj = 0; jj < H; ++jj) acc += sq[q * H + jj];
        p.grad_norm[r] = T(std::sqrt(acc));
      }
      if (cut) {
        dh = dc = T(0);
      } else if (active) {
        T carry = part[q * P + j];
        for (int s2 = 1; s2 < splits; ++s2) carry += part[(s2 * rb_n + q) * P + j];
        dh = C == Cell::kGru ? direct + carry : carry;
      }
    }
  }
  if (item) {
    p.dh[b * P + j] = dh;
    if constexpr (C == Cell::kLstm) p.dc[b * H + j] = dc;
  }
}

// ---------------------------------------------------------------------------
// Host loops
// ---------------------------------------------------------------------------

// The tensors of a forward call, all contiguous on one device.
struct FwdTensors {
  at::Tensor ax;                        // [T,B,G] x W_ih^T + b
  at::Tensor b_hh, w_hh, w_hr;          // [G] GRU or undefined, [G,P], [P,H] or undefined
  at::Tensor h, c;                      // [B,P], [B,H]: h0, c0 on entry, h_n, c_n on exit
  at::Tensor out, gates, cell, proj_in;  // as layer_fwd's outputs (gates/cell undefined for Elman)
};

template <typename T, Cell C, bool kProj>
void forward_loop(const Loop& s, FwdTensors& f) {
  const auto opts = f.ax.options();
  auto ah = at::empty({s.B, s.G}, opts);                                // [B,G]
  auto m = kProj ? at::zeros({s.B, s.H}, opts) : at::Tensor();          // [B,H]
  auto hp = kProj ? at::empty({s.B, s.P}, opts) : at::Tensor();         // [B,P]
  const auto w_hh_t = f.w_hh.t(), w_hr_t = kProj ? f.w_hr.t() : at::Tensor();
  FwdStep<T> p{};
  p.T_ = s.T, p.B = s.B, p.H = s.H, p.P = s.P, p.G = s.G;
  p.reverse = s.reverse, p.act = s.act, p.lengths = s.lengths;
  p.ax = f.ax.const_data_ptr<T>();
  p.ah = ah.const_data_ptr<T>();
  p.b_hh = f.b_hh.defined() ? f.b_hh.const_data_ptr<T>() : nullptr;
  p.h = f.h.data_ptr<T>();
  p.c = f.c.defined() ? f.c.data_ptr<T>() : nullptr;
  p.out = f.out.data_ptr<T>();
  p.gates = f.gates.defined() ? f.gates.data_ptr<T>() : nullptr;
  p.cell = f.cell.defined() ? f.cell.data_ptr<T>() : nullptr;
  p.m = kProj ? m.data_ptr<T>() : nullptr;
  p.proj_in = kProj ? f.proj_in.data_ptr<T>() : nullptr;
  if constexpr (!kProj) {
    const Persist plan = persist_plan<T>(s);
    if (plan.ok) {
      launch_persistent(fwd_persistent_kernel<T, C>, s.B, plan.rows, plan.fwd_threads,
                        plan.fwd_smem, p, f.w_hh.const_data_ptr<T>(), plan.rows, plan.fwd_splits);
      return;
    }
  }
  for (int64_t step = 0; step < s.T; ++step) {
    p.step = step;
    const bool running = step < s.t_max;  // else every row is padding: no GEMM
    if (running) at::mm_out(ah, f.h, w_hh_t);
    launch(fwd_step_kernel<T, C, kProj>, s.B * s.H, p);
    if (kProj && running) {
      at::mm_out(hp, m, w_hr_t);
      launch(proj_out_kernel<T>, s.B * s.P, p, hp.const_data_ptr<T>());
    }
  }
}

struct BwdTensors {
  at::Tensor grad_out, out, h0, c0, gates, cell;  // inputs (gates/cell/c0 as the cell has them)
  at::Tensor w_hh, w_hr;                          // [G,P], [P,H] or undefined
  at::Tensor dh, dc;                              // [B,P], [B,H] carries
  at::Tensor dax, dah, dah_step, dh_all;          // see BwdStep
  at::Tensor grad_norm;                           // [T,B] or undefined
};

template <typename T, Cell C, bool kProj>
void backward_loop(const Loop& s, BwdTensors& g) {
  const auto opts = g.dax.options();
  auto carry = at::empty({s.B, s.P}, opts);                        // [B,P]
  auto dh_step = kProj ? at::empty({s.B, s.P}, opts) : at::Tensor();  // [B,P]
  auto dm = kProj ? at::empty({s.B, s.H}, opts) : at::Tensor();       // [B,H]
  BwdStep<T> p{};
  p.T_ = s.T, p.B = s.B, p.H = s.H, p.P = s.P, p.G = s.G;
  p.reverse = s.reverse, p.act = s.act, p.lengths = s.lengths;
  p.grad_out = g.grad_out.const_data_ptr<T>();
  p.out = g.out.const_data_ptr<T>();
  p.h0 = g.h0.const_data_ptr<T>();
  p.c0 = g.c0.defined() ? g.c0.const_data_ptr<T>() : nullptr;
  p.gates = g.gates.defined() ? g.gates.const_data_ptr<T>() : nullptr;
  p.cell = g.cell.defined() ? g.cell.const_data_ptr<T>() : nullptr;
  p.dm = kProj ? dm.const_data_ptr<T>() : nullptr;
  p.dh = g.dh.data_ptr<T>();
  p.dc = g.dc.defined() ? g.dc.data_ptr<T>() : nullptr;
  p.dax = g.dax.data_ptr<T>();
  p.dah = g.dah.data_ptr<T>();
  p.dah_step = g.dah_step.data_ptr<T>();
  p.dh_step = kProj ? dh_step.data_ptr<T>() : nullptr;
  p.dh_all = kProj ? g.dh_all.data_ptr<T>() : nullptr;
  p.grad_norm = g.grad_norm.defined() ? g.grad_norm.data_ptr<T>() : nullptr;
  if constexpr (!kProj) {
    const Persist plan = persist_plan<T>(s);
    if (plan.ok) {
      launch_persistent(bwd_persistent_kernel<T, C>, s.B, plan.rows, plan.bwd_threads,
                        plan.bwd_smem, p, g.w_hh.const_data_ptr<T>(), s.truncate, plan.rows,
                        plan.bwd_splits);
      return;
    }
  }
  auto cut = [&] {
    g.dh.zero_();
    if (g.dc.defined()) g.dc.zero_();
  };
  for (int64_t step = s.T - 1; step >= 0; --step) {
    p.step = step;
    if (step >= s.t_max) {
      // Every sequence has ended: the frozen states pass their gradients
      // through, unless a truncation boundary cuts them.
      if (s.cut_before(step)) cut();
      continue;
    }
    if (p.grad_norm && s.B > 0) {
      grad_norm_kernel<T><<<unsigned(std::min<int64_t>(s.B, 65535)), kThreads, 0,
                            at::cuda::getCurrentCUDAStream()>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if constexpr (kProj) {
      launch(proj_grad_kernel<T>, s.B * s.P, p);
      at::mm_out(dm, dh_step, g.w_hr);
    }
    launch(bwd_step_kernel<T, C, kProj>, s.B * s.H, p);
    if (s.cut_before(step)) {
      cut();
      continue;
    }
    at::mm_out(carry, g.dah_step, g.w_hh);
    launch(carry_kernel<T, C == Cell::kGru>, s.B * s.P, p, carry.const_data_ptr<T>());
  }
}

template <typename T>
void run_forward(const Loop& s, FwdTensors& f) {
  switch (s.cell) {
    case Cell::kElman: return forward_loop<T, Cell::kElman, false>(s, f);
    case Cell::kGru: return forward_loop<T, Cell::kGru, false>(s, f);
    case Cell::kLstm:
      return s.proj ? forward_loop<T, Cell::kLstm, true>(s, f)
                    : forward_loop<T, Cell::kLstm, false>(s, f);
  }
}

template <typename T>
void run_backward(const Loop& s, BwdTensors& g) {
  switch (s.cell) {
    case Cell::kElman: return backward_loop<T, Cell::kElman, false>(s, g);
    case Cell::kGru: return backward_loop<T, Cell::kGru, false>(s, g);
    case Cell::kLstm:
      return s.proj ? backward_loop<T, Cell::kLstm, true>(s, g)
                    : backward_loop<T, Cell::kLstm, false>(s, g);
  }
}

at::Tensor empty0(const at::Tensor& like) { return at::empty({0}, like.options()); }

// x W_ih^T + bias over all T*B rows: one GEMM.
at::Tensor input_projection(const Loop& s, const at::Tensor& x, const at::Tensor& w_ih,
                            const at::Tensor& bias) {
  auto ax = at::empty({s.T, s.B, s.G}, x.options());  // [T,B,G]
  if (s.T * s.B > 0) {
    auto ax2 = ax.view({s.T * s.B, s.G});
    const auto x2 = x.view({s.T * s.B, s.I});
    if (bias.defined()) at::addmm_out(ax2, bias.contiguous(), x2, w_ih.t());
    else at::mm_out(ax2, x2, w_ih.t());
  }
  return ax;
}

// The gradients every cell has after its loop, as whole GEMMs and ordered sums.
struct ParamGrads {
  at::Tensor input, weight_ih, weight_hh, bias_ih, bias_hh;
};

// x [T,B,I] as the right operand of dW_ih = dax^T x over all T*B rows, whose
// padded rows (t >= len_b) have dax = 0: the forward never read them (nn's
// PackedSequence semantics), so they may hold anything, but 0 * NaN is NaN.
// With lengths, a copy with those rows zeroed (the CPU backend's
// finite_padding copies only where a padded value is non-finite; finding one
// here would cost a device sync).
at::Tensor zero_padding(const Loop& s, const at::Tensor& x) {
  if (!s.lengths) return x;
  const auto lens = at::from_blob(const_cast<int64_t*>(s.lengths), {s.B},
                                  x.options().dtype(at::kLong));          // [B]
  const auto pad = at::arange(s.T, lens.options()).unsqueeze(1) >= lens.unsqueeze(0);  // [T,B]
  return x.masked_fill(pad.unsqueeze(2), 0);
}

ParamGrads param_grads(const Loop& s, const at::Tensor& x, const at::Tensor& w_ih,
                       const at::Tensor& h0, const at::Tensor& out, const at::Tensor& dax,
                       const at::Tensor& dah, const at::Tensor& dah_first, bool grad_input) {
  const int64_t T = s.T, B = s.B, I = s.I, G = s.G, P = s.P;
  ParamGrads r;
  const auto dax2 = dax.view({T * B, G}), dah2 = dah.view({T * B, G});
  r.input = grad_input ? at::mm(dax2, w_ih).view({T, B, I}) : empty0(x);
  r.weight_ih = at::mm(dax2.t(), zero_padding(s, x).view({T * B, I}));
  r.bias_ih = at::zeros({G}, x.options());
  add_column_sums(r.bias_ih, dax2);
  if (s.cell == Cell::kGru) {
    r.bias_hh = at::zeros({G}, x.options());
    add_column_sums(r.bias_hh, dah2);
  } else {
    r.bias_hh = r.bias_ih;
  }
  // dW_hh = sum_t dah_t^T h_prev(t): h0 at each sequence's first processed
  // step (dah_first: the loop's last dah_step), the neighbouring step's output
  // otherwise (0 at padded times, whose dah is 0 too).
  r.weight_hh = at::mm(dah_first.t(), h0);
  if (T > 1) {
    const auto rest = s.reverse ? dah.narrow(0, 0, T - 1) : dah.narrow(0, 1, T - 1);
    const auto h_prev = s.reverse ? out.narrow(0, 1, T - 1) : out.narrow(0, 0, T - 1);
    r.weight_hh.addmm_(rest.reshape({(T - 1) * B, G}).t(), h_prev.reshape({(T - 1) * B, P}));
  }
  return r;
}

}  // namespace

// ---------------------------------------------------------------------------
// The Elman layer (common_cuda.cuh), shared with the fused loss
// ---------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> elman_forward(const ElmanShape& shape, int64_t t_max,
                                                 const at::Tensor& x, const at::Tensor& hx,
                                                 const at::Tensor& weight_ih,
                                                 const at::Tensor& weight_hh,
                                                 const at::Tensor& bias) {
  const Loop s = loop_of(shape, t_max);
  FwdTensors f;
  f.ax = input_projection(s, x, weight_ih.contiguous(), bias);
  f.w_hh = weight_hh.contiguous();
  f.h = hx.contiguous().clone();  // [B,H] -> h_n
  f.out = f.ax;                   // each step writes h_t over its own input projection
  if (s.T * s.B > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "elman_forward_cuda",
                               [&] { run_forward<scalar_t>(s, f); });
  }
  return {f.out, f.h};
}

ElmanGrads elman_backward(const ElmanShape& shape, int64_t t_max, const at::Tensor& grad_output,
                          const at::Tensor& grad_h_n, const at::Tensor& x, const at::Tensor& hx,
                          const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                          const at::Tensor& output, const at::Tensor& grad_h_norm,
                          bool grad_input) {
  const Loop s = loop_of(shape, t_max);
  const auto opts = x.options();
  TORCH_INTERNAL_ASSERT(!grad_h_norm.defined() ||
                        (grad_h_norm.is_contiguous() && grad_h_norm.sizes().equals({s.T, s.B}) &&
                         grad_h_norm.scalar_type() == x.scalar_type()));
  BwdTensors g;
  g.grad_out = grad_output.contiguous();
  g.out = output.contiguous();
  g.h0 = hx.contiguous();
  g.w_hh = weight_hh.contiguous();
  g.dh = grad_h_n.contiguous().clone();         // [B,H] -> dL/dh0
  g.dax = at::zeros({s.T, s.B, s.H}, opts);     // [T,B,H] dL/dz_t
  g.dah = g.dax;
  g.dah_step = at::zeros({s.B, s.H}, opts);     // [B,H]
  g.grad_norm = grad_h_norm;
  if (s.T * s.B > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "elman_backward_cuda",
                               [&] { run_backward<scalar_t>(s, g); });
  }
  ParamGrads pg = param_grads(s, x, weight_ih.contiguous(), g.h0, g.out, g.dax, g.dah,
                              g.dah_step, grad_input);
  return {pg.input, g.dh, pg.weight_ih, pg.weight_hh, pg.bias_ih};
}

namespace {

// ---------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> elman_fwd_cuda(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const c10::optional<at::Tensor>& bias_ih,
    const c10::optional<at::Tensor>& bias_hh, const c10::optional<at::Tensor>& lengths,
    c10::string_view nonlinearity, bool reverse, int64_t truncate) {
  ElmanShape s = check_elman_args("rnnkern.elman_fwd", input, hx, weight_ih, weight_hh, bias_ih,
                                  bias_hh, lengths, nonlinearity, reverse, truncate);
  const c10::cuda::CUDAGuard guard(input.device());
  const DeviceLengths len = device_lengths(lengths, s.T, input.device());
  s.lengths = len.ptr();
  return elman_forward(s, len.max, input.contiguous(), hx, weight_ih, weight_hh,
                       bias_sum(bias_ih, bias_hh));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> elman_bwd_cuda(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& input,
    const at::Tensor& hx, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const at::Tensor& output, const c10::optional<at::Tensor>& lengths,
    c10::string_view nonlinearity, bool reverse, int64_t truncate, bool grad_input) {
  ElmanShape s = check_elman_args("rnnkern.elman_bwd", input, hx, weight_ih, weight_hh,
                                  c10::nullopt, c10::nullopt, lengths, nonlinearity, reverse,
                                  truncate);
  check_elman_bwd_args(s, input, grad_output, grad_h_n, output);
  const c10::cuda::CUDAGuard guard(input.device());
  const DeviceLengths len = device_lengths(lengths, s.T, input.device());
  s.lengths = len.ptr();
  ElmanGrads g = elman_backward(s, len.max, grad_output, grad_h_n, input.contiguous(), hx,
                                weight_ih, weight_hh, output, at::Tensor(), grad_input);
  return {g.input, g.hx, g.weight_ih, g.weight_hh, g.bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_fwd_cuda(
    const at::Tensor& input, const at::Tensor& h0, const c10::optional<at::Tensor>& c0,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const c10::optional<at::Tensor>& bias_ih, const c10::optional<at::Tensor>& bias_hh,
    const c10::optional<at::Tensor>& weight_hr, const c10::optional<at::Tensor>& lengths,
    c10::string_view mode, bool reverse, int64_t truncate, bool train) {
  LayerShape shape = check_layer_args("rnnkern.layer_fwd", input, h0, c0, weight_ih, weight_hh,
                                      bias_ih, bias_hh, weight_hr, lengths, mode, reverse,
                                      truncate);
  const c10::cuda::CUDAGuard guard(input.device());
  const DeviceLengths len = device_lengths(lengths, shape.T, input.device());
  shape.lengths = len.ptr();
  const Loop s = loop_of(shape, len.max);
  const bool lstm = s.cell == Cell::kLstm;
  const auto opts = input.options();
  const auto x = input.contiguous();
  // The LSTM adds both biases before the loop; the GRU's b_hh stays inside r * (.)
  const at::Tensor b_x = lstm ? bias_sum(bias_ih, bias_hh)
                              : (bias_ih.has_value() ? *bias_ih : at::Tensor());
  FwdTensors f;
  f.ax = input_projection(s, x, weight_ih.contiguous(), b_x);
  f.b_hh = !lstm && bias_hh.has_value() ? bias_hh->contiguous() : at::Tensor();
  f.w_hh = weight_hh.contiguous();
  f.w_hr = s.proj ? weight_hr->contiguous() : at::Tensor();
  f.h = h0.contiguous().clone();                            // [B,P] -> h_n
  f.c = lstm ? c0->contiguous().clone() : empty0(input);    // [B,H] -> c_n
  f.out = at::empty({s.T, s.B, s.P}, opts);
  f.gates = at::empty({s.T, s.B, 4 * s.H}, opts);
  f.cell = lstm ? at::empty({s.T, s.B, s.H}, opts) : empty0(input);
  // Zero at padded steps (written by no step): dW_hr multiplies all of it.
  f.proj_in = s.proj ? at::zeros({s.T, s.B, s.H}, opts) : empty0(input);
  if (s.T * s.B > 0) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "layer_fwd_cuda",
                               [&] { run_forward<scalar_t>(s, f); });
  }
  // The CUDA step writes backward's state either way; without train it is not returned.
  if (!train) return {f.out, f.h, f.c, empty0(input), empty0(input), empty0(input)};
  return {f.out, f.h, f.c, f.gates, f.cell, f.proj_in};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
layer_bwd_cuda(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
               const c10::optional<at::Tensor>& grad_c_n, const at::Tensor& input,
               const at::Tensor& h0, const c10::optional<at::Tensor>& c0,
               const at::Tensor& weight_ih, const at::Tensor& weight_hh,
               const c10::optional<at::Tensor>& weight_hr, const at::Tensor& output,
               const at::Tensor& gates, const at::Tensor& cell, const at::Tensor& proj_in,
               const c10::optional<at::Tensor>& lengths, c10::string_view mode, bool reverse,
               int64_t truncate, bool grad_input, bool want_grad_norm) {
  const char* op = "rnnkern.layer_bwd";
  LayerShape shape = check_layer_args(op, input, h0, c0, weight_ih, weight_hh, c10::nullopt,
                                      c10::nullopt, weight_hr, lengths, mode, reverse, truncate);
  check_layer_bwd_args(op, shape, input, grad_output, grad_h_n, grad_c_n, output, gates, cell,
                       proj_in);
  const c10::cuda::CUDAGuard guard(input.device());
  const DeviceLengths len = device_lengths(lengths, shape.T, input.device());
  shape.lengths = len.ptr();
  const Loop s = loop_of(shape, len.max);
  const bool lstm = s.cell == Cell::kLstm;
  const int64_t T = s.T, B = s.B, H = s.H, P = s.P, G = s.G;
  const auto opts = input.options();
  const auto x = input.contiguous();
  BwdTensors g;
  g.grad_out = grad_output.contiguous();
  g.out = output.contiguous();
  g.h0 = h0.contiguous();
  g.c0 = lstm ? c0->contiguous() : at::Tensor();
  g.gates = gates.contiguous();
  g.cell = lstm ? cell.contiguous() : at::Tensor();
  g.w_hh = weight_hh.contiguous();
  g.w_hr = s.proj ? weight_hr->contiguous() : at::Tensor();
  g.dh = grad_h_n.contiguous().clone();                              // [B,P] -> dL/dh0
  g.dc = lstm ? grad_c_n->contiguous().clone() : at::Tensor();       // [B,H] -> dL/dc0
  g.dax = at::zeros({T, B, G}, opts);                                // [T,B,G]
  g.dah = lstm ? g.dax : at::zeros({T, B, G}, opts);                 // [T,B,G]
  g.dah_step = at::zeros({B, G}, opts);                              // [B,G]
  g.dh_all = s.proj ? at::zeros({T, B, P}, opts) : at::Tensor();     // [T,B,P]
  g.grad_norm = want_grad_norm ? at::zeros({T, B}, opts) : at::Tensor();  // [T,B]
  if (T * B > 0) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "layer_bwd_cuda",
                               [&] { run_backward<scalar_t>(s, g); });
  }
  ParamGrads pg = param_grads(s, x, weight_ih.contiguous(), g.h0, g.out, g.dax, g.dah,
                              g.dah_step, grad_input);
  auto g_w_hr = s.proj ? at::mm(g.dh_all.view({T * B, P}).t(),
                                proj_in.contiguous().view({T * B, H}))
                       : empty0(input);
  return {pg.input,
          g.dh,
          lstm ? g.dc : empty0(input),
          pg.weight_ih,
          pg.weight_hh,
          pg.bias_ih,
          pg.bias_hh.clone(),  // never the same tensor as grad_bias_ih
          g_w_hr,
          want_grad_norm ? g.grad_norm : empty0(input)};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnkern, CUDA, m) {
  m.impl("elman_fwd", &elman_fwd_cuda);
  m.impl("elman_bwd", &elman_bwd_cuda);
  m.impl("layer_fwd", &layer_fwd_cuda);
  m.impl("layer_bwd", &layer_bwd_cuda);
}

}  // namespace rnnkern::cuda
