// CPU time loops of the Elman layer and TORCH_LIBRARY_IMPL(rnnkern, CPU).
//
// Forward:  out = x W_ih^T + b   (one GEMM over all T*B rows, before the loop)
//           for each step: out[t] = act(out[t] + h_prev W_hh^T)
// Backward: for each step, last to first:
//             dz_t = (g_t + carry) * act'(h_t);  carry = dz_t W_hh
//           then dW_ih, dW_hh, db and dx as one GEMM or reduction over all rows
//           (but for H, I <= 64 on the fused path, where the loop sums dW_ih,
//           dW_hh and db row tile by row tile: tile_sums.h, row_sums_in_loop).
// A step is one fused pass (vec_kernels: a register-tiled GEMM whose epilogue
// applies act, or forms dz_{t-1}) for H up to kFusedMaxH, else BLAS called
// directly plus an element-wise pass. At B*H of a few thousand a step costs
// about a microsecond, the same as one trip through the dispatcher, so the
// loops never go through it.
#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <unistd.h>
#include <vector>

#include "../checks.h"
#include "../params.h"
#include "aligned.h"
#include "pack.h"
#include "probe_cache.h"
#include "blas.h"
#include "elman_cpu.h"
#include "host_cache.h"
#include "tile_sums.h"
#include "time_order.h"
#include "vec_kernels.h"

namespace rnnkern::cpu {

// ---------------------------------------------------------------------------
// Capability choice
// ---------------------------------------------------------------------------

const VecKernelTable& vec_kernels() {
  static const VecKernelTable table = [] {
    int best = 0;  // 0 DEFAULT, 1 AVX2, 2 AVX512
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = 1;
    if (best == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      best = 2;
#endif
    if (const char* env = std::getenv("RNNKERN_CPU_CAPABILITY")) {
      const std::string want(env);
      if (want == "DEFAULT") best = 0;
      else if (want == "AVX2") best = std::min(best, 1);
      else if (want == "AVX512") best = std::min(best, 2);
    }
    return best == 2 ? vec_kernels_AVX512() : best == 1 ? vec_kernels_AVX2() : vec_kernels_DEFAULT();
  }();
  return table;
}

namespace {

// Rows [0, B) of H elements each, split across ATen's threads when a pass is
// large enough to pay for it. Element-wise work only, so results do not
// depend on the thread count.
template <typename F>
void for_rows(int64_t B, int64_t H, const F& f) {
  constexpr int64_t kGrainElems = 32768;
  at::parallel_for(0, B, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(H, 1)), f);
}

// Processing order -> time index for sequence b (see ElmanShape::reverse).
inline int64_t time_of(const ElmanShape& s, int64_t step, int64_t len) {
  return s.reverse ? len - 1 - step : step;
}

inline bool cut_before(const ElmanShape& s, int64_t step) {
  return s.truncate > 0 && step > 0 && step % s.truncate == 0;
}

int64_t max_length(const ElmanShape& s) {
  if (!s.lengths) return s.T;
  int64_t m = 0;
  for (int64_t b = 0; b < s.B; ++b) m = std::max(m, s.lengths[b]);
  return m;
}

// ||g + c|| over n elements: the whole gradient reaching h_t.
template <typename T>
T norm_of_sum(const T* g, const T* c, int64_t n) {
  double acc = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double v = double(g[i]) + double(c[i]);
    acc += v * v;
  }
  return T(std::sqrt(acc));
}

// ---------------------------------------------------------------------------
// Time loops
// ---------------------------------------------------------------------------

// The fused steps keep the packed W_hh in cache for the whole sequence. Up to
// H = 256 they beat a per-step MKL call plus a separate pass (measured at
// B in {16,32,64}: 1.3-2x forward, 1.2-1.4x backward). At H = 512 (1 MB of
// W_hh in float32), B = 64, T = 200, 2 threads: the fused backward took 9%
// less than BLAS on an AMD EPYC Zen 3 (512 KB L2); the fused forward 8% more
// there, but 6-11% less on the Intel Xeon (2 MB L2; A/B in alternating
// processes, three pairs, W_hh prefetched from kPrefetchMinBytes). So past
// kFusedAnyL2H the forward stays fused while W_hh fits in L2. Past 512, BLAS.
constexpr int64_t kFusedMaxH = 512;
constexpr int64_t kFusedAnyL2H = 256;

// L2 per core as the OS reports it (sysconf), 1 MB where it does not.
inline int64_t l2_bytes() {
  static const int64_t bytes = [] {
    const long n = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return n > 0 ? int64_t(n) : int64_t(1) << 20;
  }();
  return bytes;
}

// Work (multiply-adds over the whole sequence) below which the fused loop
// stays on one thread.
constexpr int64_t kLoopGrainFma = int64_t(1) << 18;

// The sequences of a batch are independent, so the fused loops split the
// batch, not the steps: each thread runs the whole time loop over its own row
// tiles, with one fork/join per call instead of one per step (a per-step
// fork/join costs more than a step at small H). Row-wise work only: results do
// not depend on the thread count.
template <typename F>
void for_row_tiles(int64_t B, int64_t row_block, int64_t fma_per_row, const F& loop) {
  const int64_t tiles = (B + row_block - 1) / row_block;
  const int64_t grain = B * fma_per_row >= kLoopGrainFma ? 1 : tiles;
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    loop(t0 * row_block, std::min(B, t1 * row_block));
  });
}

template <typename T>
bool fused_path(const ElmanShape& s, bool backward) {
  if (s.H > kFusedMaxH) return false;
  return backward || s.H <= kFusedAnyL2H || s.H * s.H * int64_t(sizeof(T)) <= l2_bytes();
}

// Reverse with lengths on the fused path: a forward call on the sequences
// reversed within their lengths (time_order.h), since a fused step reads one
// time block.
template <typename T>
bool fused_reversed(const ElmanShape& s, bool backward) {
  return fused_path<T>(s, backward) && s.reverse && s.lengths;
}

// The input projection inside the fused forward loop, each thread projecting
// its own rows of a step just before the step reads them, rather than one
// product over all T*B rows before the loop that writes every pre-activation
// row once to memory (half of them then read by the other core). Where the
// vector kernel takes the product (SmallMatmul::packed); not with reverse and
// lengths, whose loop runs on a reordered copy of the pre-activations.
bool projection_in_loop(const ElmanShape& s) {
  return s.I > 0 && s.H <= kFusedAnyL2H && !(s.reverse && s.lengths);
}

template <typename T>
void elman_fwd_kernel(const ElmanFwdParams<T>& p) {
  const ElmanShape& s = p.shape;
  const VecKernels<T>& vk = vec_kernels_for<T>();
  const int64_t B = s.B, H = s.H, BH = B * H;
  const int64_t t_max = max_length(s);
  if (fused_reversed<T>(s, false)) {
    TORCH_INTERNAL_ASSERT(!p.x, "elman_fwd_kernel: projection in the loop, reverse and lengths");
    reverse_within_lengths(p.out, p.out, s.T, B, H, s.lengths);  // the pre-activations
    ElmanFwdParams<T> q = p;
    q.shape.reverse = false;  // h_n is then each sequence's last step: time 0
    elman_fwd_kernel(q);
    reverse_within_lengths(p.out, p.out, s.T, B, H, s.lengths);
    return;
  }
  if (fused_path<T>(s, false)) {
    int64_t NP = 0;
    const int64_t pw = panel_width_for(vk, H);
    // z += h_prev W_hh^T: M = W_hh^T, M[k][j] = W_hh[j][k]
    const AlignedVector<T> mp =
        pack_panels(p.w_hh, H, H, 1, H, pw, vk.pack_width, &NP);
    for_row_tiles(B, vk.row_block, s.T * H * H, [&](int64_t b0, int64_t b1) {
      StepArgs<T> a;
      a.act = s.act;
      a.K = H, a.N = H, a.NP = NP, a.pw = pw, a.lda = H, a.ldz = H;
      a.mp = mp.data();
      a.prefetch_w = H * H * int64_t(sizeof(T)) >= kPrefetchMinBytes;
      a.lens = s.lengths;
      for (int64_t step = 0; step < s.T; ++step) {
        const int64_t t = time_of(s, step, s.T);
        if (step >= t_max) {  // every sequence has ended
          std::memset(p.out + t * BH + b0 * H, 0, sizeof(T) * (b1 - b0) * H);
          continue;
        }
        a.a = step == 0 ? p.h0 : p.out + (s.reverse ? t + 1 : t - 1) * BH;
        a.z = p.out + t * BH;
        a.step_out = step;
        // This thread's rows of the step's input projection, as the one
        // product before the loop computes each row (the same bits).
        if (p.x)
          vk.row_gemm(p.x + t * B * s.I, s.I, b0, b1, s.I, p.w_x, H, p.np_x, p.b_x, a.z, H);
        vk.fwd_step(a, b0, b1);
      }
    });
    if (!s.lengths) {
      std::memcpy(p.h_n, p.out + time_of(s, s.T - 1, s.T) * BH, sizeof(T) * BH);
    } else {
      for (int64_t b = 0; b < B; ++b) {
        const int64_t len = s.lengths[b];
        std::memcpy(p.h_n + b * H, len > 0 ? p.out + ((len - 1) * B + b) * H : p.h0 + b * H,
                    sizeof(T) * H);
      }
    }
    return;
  }
  TORCH_INTERNAL_ASSERT(!p.x, "elman_fwd_kernel: projection in the loop off the fused path");
  if (!s.lengths) {
    // Every sequence is at the same time index: step t reads the previous
    // step's block of `out` in place, with no copy of the state.
    for (int64_t step = 0; step < s.T; ++step) {
      const int64_t t = time_of(s, step, s.T);
      const T* prev = step == 0 ? p.h0 : p.out + (s.reverse ? t + 1 : t - 1) * BH;
      T* z = p.out + t * BH;
      gemm<T>(false, true, B, H, H, T(1), prev, H, p.w_hh, H, T(1), z, H);
      for_rows(B, H, [&](int64_t b0, int64_t b1) { vk.act_inplace(s.act, z + b0 * H, (b1 - b0) * H); });
    }
    std::memcpy(p.h_n, p.out + time_of(s, s.T - 1, s.T) * BH, sizeof(T) * BH);
    return;
  }
  // Variable lengths: each sequence keeps its own state, frozen after its
  // last step; its output is 0 from then on.
  std::memcpy(p.state, p.h0, sizeof(T) * BH);
  for (int64_t step = 0; step < s.T; ++step) {
    if (step < t_max) gemm<T>(false, true, B, H, H, T(1), p.state, H, p.w_hh, H, T(0), p.gemm, H);
    for_rows(B, H, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t len = s.lengths[b];
        if (step < len) {
          T* z = p.out + (time_of(s, step, len) * B + b) * H;
          vk.act_add(s.act, z, z, p.gemm + b * H, H);
          std::memcpy(p.state + b * H, z, sizeof(T) * H);
        } else {
          // Steps len..T-1 are, in either direction, the padded times len..T-1.
          std::memset(p.out + (step * B + b) * H, 0, sizeof(T) * H);
        }
      }
    });
  }
  std::memcpy(p.h_n, p.state, sizeof(T) * BH);
}

// The parameter gradients' sums over the rows inside the fused backward loop
// (ElmanBwdParams::sum_*) where tile_sums.h's row_sums_fit says, and not when
// the loop also takes ||dL/dh_t||.
bool row_sums_in_loop(const ElmanShape& s, bool grad_norm) {
  return row_sums_fit(s.T * s.B, s.H, s.I, s.reverse && s.lengths) && !grad_norm;
}

// Backward through the fused steps: the epilogue of step s's GEMM
// (carry = dz_s W_hh) already forms dz_{s-1} = (g_{s-1} + carry) * act'(h_{s-1}).
template <typename T>
void elman_bwd_fused(const ElmanBwdParams<T>& p) {
  const ElmanShape& s = p.shape;
  const VecKernels<T>& vk = vec_kernels_for<T>();
  const int64_t T_ = s.T, B = s.B, H = s.H, I = s.I, BH = B * H;
  int64_t NP = 0;
  const int64_t pw = panel_width_for(vk, H);
  // carry = dz W_hh: M = W_hh, M[k][j] = W_hh[k][j]
  const AlignedVector<T> mp =
      pack_panels(p.w_hh, H, H, H, 1, pw, vk.pack_width, &NP);
  // Each row tile's partial sums (sums: the caller asked for them).
  const bool sums = p.sum_w_hh != nullptr;
  RowTileSums<T> rs(vk, B);
  int k_hh = 0, k_ih = 0, k_b = 0;
  if (sums) {
    k_hh = rs.atb(H, H, p.sum_w_hh);
    k_ih = rs.atb(H, I, p.sum_w_ih);
    k_b = rs.cols(H, p.sum_b);
    rs.start();
  }
  for_row_tiles(B, vk.row_block, T_ * H * H, [&](int64_t b0, int64_t b1) {
    // The sums of the rows of dz at `step` (just written), each tile's own.
    auto add_sums = [&](int64_t step) {
      const int64_t t = time_of(s, step, T_);
      const T* dz = p.grad_z + t * BH;
      const T* hp = step > 0 ? p.out + time_of(s, step - 1, T_) * BH : nullptr;
      const T* xt = I > 0 ? p.x + t * B * I : nullptr;
      rs.for_tiles(b0, b1, [&](T* part, int64_t r0, int64_t n) {
        if (hp) rs.add_atb(k_hh, part, dz + r0 * H, H, hp + r0 * H, H, n);
        rs.add_atb(k_ih, part, dz + r0 * H, H, xt + r0 * I, I, n);
        rs.add_cols(k_b, part, dz + r0 * H, n, H);
      });
    };
    StepArgs<T> a;
    a.act = s.act;
    a.K = H, a.N = H, a.NP = NP, a.pw = pw, a.lda = H, a.ldz = H;
    a.mp = mp.data();
    a.prefetch_w = H * H * int64_t(sizeof(T)) >= kPrefetchMinBytes;
    a.lens = s.lengths;
    a.pass = p.carry;  // dL/dh_n, passed through frozen states until a cut zeroes it
    auto at_step = [&](int64_t step) {
      const int64_t t = time_of(s, step, T_);
      a.g = p.grad_out + t * BH;
      a.h = p.out + t * BH;
      a.dz = p.grad_z + t * BH;
      a.step_out = step;
    };
    a.a = nullptr;  // the last step's carry is dL/dh_n itself
    at_step(T_ - 1);
    vk.bwd_step(a, b0, b1);
    if (sums) add_sums(T_ - 1);
    for (int64_t step = T_ - 1; step > 0; --step) {
      if (cut_before(s, step)) {
        std::memset(p.carry + b0 * H, 0, sizeof(T) * (b1 - b0) * H);
        a.a = nullptr;
      } else {
        a.a = p.grad_z + time_of(s, step, T_) * BH;
        a.step_a = step;
      }
      at_step(step - 1);
      vk.bwd_step(a, b0, b1);
      if (sums) add_sums(step - 1);
    }
  });
  if (sums) rs.finish();
  // dL/dh0 = dz_0 W_hh for sequences that ran, the passed-through carry otherwise.
  const T* dz0 = p.grad_z + time_of(s, 0, T_) * BH;
  gemm<T>(false, false, B, H, H, T(1), dz0, H, p.w_hh, H, T(0), p.gemm, H);
  for (int64_t b = 0; b < B; ++b)
    if (!s.lengths || s.lengths[b] > 0) std::memcpy(p.carry + b * H, p.gemm + b * H, sizeof(T) * H);
}

template <typename T>
void elman_bwd_kernel(const ElmanBwdParams<T>& p) {
  const ElmanShape& s = p.shape;
  const VecKernels<T>& vk = vec_kernels_for<T>();
  const int64_t B = s.B, H = s.H, BH = B * H;
  if (fused_reversed<T>(s, true) && !p.grad_h_norm) {
    TORCH_INTERNAL_ASSERT(!p.sum_w_hh, "elman_bwd_kernel: row sums with reverse and lengths");
    const auto g = reversed_within_lengths(p.grad_out, s.T, B, H, s.lengths);
    const auto h = reversed_within_lengths(p.out, s.T, B, H, s.lengths);
    ElmanBwdParams<T> q = p;
    q.shape.reverse = false;
    q.grad_out = g.get();
    q.out = h.get();
    elman_bwd_fused(q);
    // Each sequence's first processed step is time 0 of the reversed order.
    std::memcpy(p.grad_z_first, p.grad_z, sizeof(T) * BH);
    reverse_within_lengths(p.grad_z, p.grad_z, s.T, B, H, s.lengths);
    return;
  }
  if (fused_path<T>(s, true) && !p.grad_h_norm) {
    elman_bwd_fused(p);
    return;
  }
  TORCH_INTERNAL_ASSERT(!p.sum_w_hh, "elman_bwd_kernel: row sums off the fused path");
  if (!s.lengths) {
    for (int64_t step = s.T - 1; step >= 0; --step) {
      const int64_t t = time_of(s, step, s.T);
      T* dz = p.grad_z + t * BH;
      for_rows(B, H, [&](int64_t b0, int64_t b1) {
        const int64_t o = t * BH + b0 * H, n = (b1 - b0) * H;
        if (p.grad_h_norm) {
          for (int64_t b = b0; b < b1; ++b)
            p.grad_h_norm[t * B + b] = norm_of_sum(p.grad_out + t * BH + b * H, p.carry + b * H, H);
        }
        vk.grad_z(s.act, dz + b0 * H, p.grad_out + o, p.carry + b0 * H, p.out + o, n);
      });
      if (cut_before(s, step)) std::memset(p.carry, 0, sizeof(T) * BH);
      else gemm<T>(false, false, B, H, H, T(1), dz, H, p.w_hh, H, T(0), p.carry, H);
    }
    return;
  }
  // grad_z_first doubles as this step's dz rows, gathered (they lie at
  // different times when running in reverse); after step 0 it holds dz at
  // each sequence's first processed step, which pairs with h0 in dW_hh.
  T* dz_step = p.grad_z_first;
  const int64_t t_max = max_length(s);
  for (int64_t step = s.T - 1; step >= 0; --step) {
    for_rows(B, H, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t len = s.lengths[b];
        T* d = dz_step + b * H;
        if (step < len) {
          const int64_t t = time_of(s, step, len), o = (t * B + b) * H;
          if (p.grad_h_norm) p.grad_h_norm[t * B + b] = norm_of_sum(p.grad_out + o, p.carry + b * H, H);
          vk.grad_z(s.act, d, p.grad_out + o, p.carry + b * H, p.out + o, H);
          std::memcpy(p.grad_z + o, d, sizeof(T) * H);
        } else {
          // A frozen state passes its gradient through unchanged (carry stays).
          std::memset(d, 0, sizeof(T) * H);
          std::memset(p.grad_z + (step * B + b) * H, 0, sizeof(T) * H);
          if (p.grad_h_norm) p.grad_h_norm[step * B + b] = T(0);
        }
      }
    });
    if (cut_before(s, step)) {
      std::memset(p.carry, 0, sizeof(T) * BH);
    } else if (step < t_max) {
      gemm<T>(false, false, B, H, H, T(1), dz_step, H, p.w_hh, H, T(0), p.gemm, H);
      for_rows(B, H, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b)
          if (step < s.lengths[b]) std::memcpy(p.carry + b * H, p.gemm + b * H, sizeof(T) * H);
      });
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// ATen glue (elman_cpu.h), shared by the ops below and by fused ops built on a
// layer (the per-step loss)
// ---------------------------------------------------------------------------

at::Tensor bias_sum(const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh) {
  if (b_ih.has_value() && b_hh.has_value()) {
    // One scan, the same bits as b_ih + b_hh: an ATen add builds a
    // TensorIterator, which costs more than a tiny call's whole layer.
    auto sum = at::empty({b_ih->numel()}, b_ih->options());
    AT_DISPATCH_FLOATING_TYPES(sum.scalar_type(), "bias_sum", [&] {
      const scalar_t* a = b_ih->const_data_ptr<scalar_t>();
      const scalar_t* b = b_hh->const_data_ptr<scalar_t>();
      const int64_t sa = b_ih->stride(0), sb = b_hh->stride(0);
      scalar_t* out = sum.data_ptr<scalar_t>();
      for (int64_t i = 0; i < sum.numel(); ++i) out[i] = a[i * sa] + b[i * sb];
    });
    return sum;
  }
  if (b_ih.has_value()) return *b_ih;
  if (b_hh.has_value()) return *b_hh;
  return at::Tensor();
}

void add_column_sums(at::Tensor& acc, const at::Tensor& m) {
  TORCH_INTERNAL_ASSERT(m.dim() == 2 && m.stride(1) == 1 && acc.is_contiguous() &&
                        acc.numel() == m.size(1));
  const int64_t M = m.size(0), N = m.size(1);
  if (M == 0 || N == 0) return;
  // Threads split the columns in blocks of fixed width, never the rows.
  constexpr int64_t kCols = 64;
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "add_column_sums", [&] {
    const auto& vk = vec_kernels_for<scalar_t>();
    scalar_t* a = acc.data_ptr<scalar_t>();
    const scalar_t* p = m.const_data_ptr<scalar_t>();
    const int64_t ld = m.stride(0);
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(M * kCols, 1));
    at::parallel_for(0, (N + kCols - 1) / kCols, grain, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t j = c * kCols;
        vk.add_column_sums(a + j, p + j, M, std::min(kCols, N - j), ld);
      }
    });
  });
}

namespace {

// Where the vector kernels beat BLAS whatever the CPU (AMD EPYC Zen 4, 2
// threads): a side below kNarrow, within a panel that stays in cache; for
// a^T b also any output of at most kSmallOut elements. Beyond these,
// gemm_backend() decides.
constexpr int64_t kNarrow = 16, kPanel = 16384, kSmallOut = 4096;
constexpr int64_t kChunkRows = 512;  // a^T b: rows per partial sum
// a^T b: the partial sums of at most this many elements in flight (4 MB of
// float32); more chunks than fit run in groups, folded in chunk order.
constexpr int64_t kPartialElems = int64_t(1) << 20;

// gemm_backend()'s verdict for a product of this kind and panel size
// (probe_cache.h: x w's K*N, a^T b's M*N).
bool tiles_for(GemmKind small, int64_t panel) {
  return gemm_backend().verdict.kind[panel <= kSmallPanel ? small : kLarge].tiles;
}

bool row_gemm_wins(int64_t K, int64_t N) {
  return ((K < kNarrow || N < kNarrow) && K * N <= kPanel) || tiles_for(kXw, K * N);
}

bool atb_wins(int64_t M, int64_t N) {
  return std::min(M, N) < kNarrow || M * N <= kSmallOut || tiles_for(kAtb, M * N);
}

// c (+)= t^T for t [N,M] contiguous, c [M,N] contiguous, in 16 x 16 blocks
// (copy_ of a transposed view, a TensorIterator, took 70 us for 512 x 64).
template <typename T>
void add_transposed(T* c, const T* t, int64_t M, int64_t N, bool accumulate) {
  constexpr int64_t kB = 16;
  for (int64_t i0 = 0; i0 < M; i0 += kB)
    for (int64_t j0 = 0; j0 < N; j0 += kB) {
      const int64_t i1 = std::min(M, i0 + kB), j1 = std::min(N, j0 + kB);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = j0; j < j1; ++j)
          c[i * N + j] = accumulate ? c[i * N + j] + t[j * M + i] : t[j * M + i];
    }
}

// c = a^T b (+ c) by BLAS. MKL runs a^T b for a tall, narrow c (M = G rows,
// N = I columns: dW_ih) well below its rate; b^T a, a short wide [N,M], then
// transposed into c, runs near it. Measured on 2 threads of an Intel Xeon
// (model 167), GFLOP/s of the product alone, a^T b -> b^T a:
//   M x N x K = 512 x 64 x 3200 (LSTM `small` dW_ih) 162 -> 215,
//   96 x 8 x 3200 58 -> 92, 256 x 32 x 16000 162 -> 196, 128 x 32 x 16000
//   150 -> 175, 1536 x 256 x 12800 214 -> 270, 2048 x 256 x 12800 225 -> 243;
//   but 512 x 128 x 3200 237 -> 253 and 2048 x 512 x 12800 265 -> 265 hardly
//   move, and 64 x 128 x 3200 228 -> 186 loses.
constexpr int64_t kAtbTransposeRatio = 4;

bool blas_transposed(int64_t M, int64_t N) { return M >= kAtbTransposeRatio * N; }

void blas_atb(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const int64_t M = a.size(1), N = b.size(1);
  if (blas_transposed(M, N)) {
    const at::Tensor ct = at::mm(b.t(), a);  // [N,M], contiguous
    AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "blas_atb", [&] {
      add_transposed(c.data_ptr<scalar_t>(), ct.const_data_ptr<scalar_t>(), M, N, accumulate);
    });
    return;
  }
  if (accumulate) c.addmm_(a.t(), b);
  else at::mm_out(c, a.t(), b);
}

// w [K,N] (any strides) as row_gemm reads it: [K, NP], NP = N rounded up to
// the vector width, zero padded. One panel of width NP (not zeros + narrow +
// copy_, a TensorIterator, which at a tiny call's sizes costs more than the
// product).
at::Tensor pack_row_operand(const at::Tensor& w) {
  const int64_t K = w.size(0), N = w.size(1);
  const int64_t vl = w.scalar_type() == at::kFloat ? vec_kernels_for<float>().pack_width
                                                   : vec_kernels_for<double>().pack_width;
  auto wt = at::zeros({K, (N + vl - 1) / vl * vl}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "pack_row_operand", [&] {
    pack_panels_to(wt.data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), K, N, w.stride(0),
                   w.stride(1), wt.size(1));
  });
  return wt;
}

template <typename T>
void row_gemm_out(at::Tensor& out, const at::Tensor& x, const at::Tensor& wt, int64_t N,
                  const at::Tensor& bp) {
  const auto& vk = vec_kernels_for<T>();
  const int64_t R = x.size(0), K = x.size(1), NP = wt.size(1);
  const T* xp = x.const_data_ptr<T>();
  const T* wp = wt.const_data_ptr<T>();
  const T* bptr = bp.defined() ? bp.const_data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  const int64_t ldx = x.stride(0), ldo = out.stride(0);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * NP));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    vk.row_gemm(xp, ldx, r0, r1, K, wp, N, NP, bptr, op, ldo);
  });
}

// c = a^T b (+ c), with a's columns along the vectors: trans_c stores the
// result transposed (c holds b^T a's transpose when the caller swapped a, b).
// Each output element is the sum over chunks of kChunkRows rows, in chunk
// order, of the chunk's sum over its rows in row order: ((p0 + p1) + p2) ...
// The chunks run in groups whose partial sums fit kPartialElems, the groups one
// after another, each folded into `folded`; the bits do not depend on the group
// size or the thread count.
template <typename T>
void atb_impl(at::Tensor& c, bool trans_c, const at::Tensor& a, const at::Tensor& b,
              bool accumulate) {
  const auto& vk = vec_kernels_for<T>();
  const int64_t K = a.size(0), M = a.size(1), N = b.size(1);
  const int64_t MR = vk.atb_width, NR = kAtbCols;
  const int64_t mb = (M + MR - 1) / MR, nb = (N + NR - 1) / NR;
  const int64_t chunks = std::max<int64_t>(1, (K + kChunkRows - 1) / kChunkRows);
  const int64_t blocks = mb * nb, block_size = NR * MR, per_chunk = blocks * block_size;
  const int64_t group = std::clamp<int64_t>(kPartialElems / per_chunk, 1, chunks);
  // With one group its partial sums are added in the last pass below; with
  // more, each group is folded into `folded` and the last pass reads that.
  const bool grouped = group < chunks;
  auto partial = at::empty({group * per_chunk}, c.options());
  auto folded = grouped ? at::empty({per_chunk}, c.options()) : partial;
  T* pp = partial.data_ptr<T>();
  T* sp = folded.data_ptr<T>();
  const T* ap = a.const_data_ptr<T>();
  const T* bp = b.const_data_ptr<T>();
  const int64_t lda = a.stride(0), ldb = b.stride(0);
  for (int64_t g0 = 0; g0 < chunks; g0 += group) {
    const int64_t gl = std::min(group, chunks - g0);
    // One task per (chunk of rows, block of the output).
    at::parallel_for(0, gl * blocks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t ch = g0 + t / blocks, blk = t % blocks;
        const int64_t i0 = (blk / nb) * MR, n0 = (blk % nb) * NR;
        const int64_t k0 = ch * kChunkRows, kl = std::min(kChunkRows, K - k0);
        vk.atb_block(ap + k0 * lda + i0, lda, bp + k0 * ldb + n0, ldb, std::max<int64_t>(kl, 0),
                     std::min(MR, M - i0), std::min(NR, N - n0), pp + t * block_size, MR, false);
      }
    });
    if (!grouped) break;
    // folded (= chunk 0's partial sum at the first group) += each chunk's, in order.
    at::parallel_for(0, per_chunk, 4096, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        T s = g0 == 0 ? pp[e] : sp[e] + pp[e];
        for (int64_t ch = 1; ch < gl; ++ch) s += pp[ch * per_chunk + e];
        sp[e] = s;
      }
    });
  }
  const int64_t fold = grouped ? 1 : chunks;  // the partial sums left to add, in chunk order
  T* cp = c.data_ptr<T>();
  const int64_t ldc = c.stride(0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    // A block's sums over the chunks, chunk by chunk over the whole block (the
    // same order per element as a loop over chunks per element, whose strided
    // loads do not vectorise).
    AlignedVector<T> buf(static_cast<size_t>(block_size));
    T* __restrict sum = buf.data();
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = (blk / nb) * MR, n0 = (blk % nb) * NR;
      const int64_t ml = std::min(MR, M - i0), nl = std::min(NR, N - n0);
      const T* first = sp + blk * block_size;
      std::copy(first, first + block_size, sum);
      for (int64_t ch = 1; ch < fold; ++ch) {
        const T* __restrict part = first + ch * per_chunk;
        for (int64_t e = 0; e < block_size; ++e) sum[e] += part[e];
      }
      for (int64_t n = 0; n < nl; ++n)
        for (int64_t i = 0; i < ml; ++i) {
          const T v = sum[n * MR + i];
          T& dst = trans_c ? cp[(n0 + n) * ldc + i0 + i] : cp[(i0 + i) * ldc + n0 + n];
          dst = accumulate ? dst + v : v;
        }
    }
  });
}

// RNNKERN_GEMM, or the probe's verdict for this machine and build
// (probe_cache.h), or the probe: for each kind of product, float32 products
// of that kind timed on BLAS and on the tiles (fastest of kProbeRuns,
// interleaved) at the current thread count. The tiles are taken for a kind
// where they are faster by its margin: 5% for the small panels, 25% for the
// large ones. On a Zen 4, products alone (BLAS time / tiles time): x w panels
// up to 128 x 512 over 3200 rows 1.10-1.27, small a^T b 0.97-1.30; 512 x 512
// panels over 12800 rows 0.84-1.01, though the tiles led at 1024-2048 rows,
// hence the large probe's 8192 rows and a margin the tiles clear only where
// they win outright (a Zen 5, 1.6x end to end).
constexpr int kProbeRuns = 7;
constexpr double kProbeMargin[kGemmKinds] = {1.05, 1.05, 1.25};

void probe_fill(at::Tensor& t, uint32_t seed) {
  float* p = t.data_ptr<float>();
  uint32_t s = seed;  // an LCG: the user's torch generator is left alone
  for (int64_t i = 0; i < t.numel(); ++i) {
    s = s * 1664525u + 1013904223u;
    p[i] = float(int32_t(s >> 8) % 2001 - 1000) * 1e-3f;
  }
}

double time_s(const std::function<void()>& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The fastest of kProbeRuns timings of each, interleaved, after a warm-up.
std::pair<double, double> race(const std::function<void()>& tiles,
                               const std::function<void()>& blas) {
  tiles(), blas();
  double best_tiles = 1e30, best_blas = 1e30;
  for (int i = 0; i < kProbeRuns; ++i) {
    best_tiles = std::min(best_tiles, time_s(tiles));
    best_blas = std::min(best_blas, time_s(blas));
  }
  return {best_tiles, best_blas};
}

ProbeVerdict probe_gemm_backend() {
  ProbeVerdict r;
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor no_bias;
  auto make = [&](int64_t rows, int64_t cols, uint32_t seed) {
    auto t = at::empty({rows, cols}, opts);
    probe_fill(t, seed);
    return t;
  };
  auto decide = [&](GemmKind k, std::pair<double, double> times) {
    auto& d = r.kind[k];
    std::tie(d.tiles_s, d.blas_s) = times;
    d.tiles = d.tiles_s * kProbeMargin[k] < d.blas_s;
  };
  {  // xw: [2048,128] x [128,256], an input projection at the `small` sizes
    const auto x = make(2048, 128, 1), w = make(128, 256, 2);
    auto out = at::empty({2048, 256}, opts);
    const auto wt = pack_row_operand(w);
    decide(kXw, race([&] { row_gemm_out<float>(out, x, wt, 256, no_bias); },
                     [&] { at::mm_out(out, x, w); }));
  }
  {  // atb: a 256 x 128 a^T b over 2048 rows, a dW at the `small` sizes
    const auto a = make(2048, 256, 3), b = make(2048, 128, 4);
    auto c = at::empty({256, 128}, opts);
    decide(kAtb, race([&] { atb_impl<float>(c, false, a, b, false); },
                      [&] { blas_atb(c, a, b, false); }));
  }
  {  // large: [8192,256] x [256,512] and a 512 x 256 a^T b over the 8192 rows
    const auto x = make(8192, 256, 5), w = make(256, 512, 6), d = make(8192, 512, 7);
    auto y = at::empty({8192, 512}, opts), dw = at::empty({512, 256}, opts);
    const auto wt = pack_row_operand(w);
    decide(kLarge, race(
                       [&] {
                         row_gemm_out<float>(y, x, wt, 512, no_bias);
                         atb_impl<float>(dw, false, d, x, false);
                       },
                       [&] {
                         at::mm_out(y, x, w);
                         blas_atb(dw, d, x, false);
                       }));
  }
  return r;
}

GemmBackend choose_gemm_backend() {
  const char* env = std::getenv("RNNKERN_GEMM");
  const std::string want = env ? env : "auto";
  TORCH_CHECK(want == "auto" || want == "blas" || want == "rnnkern",
              "RNNKERN_GEMM must be 'auto', 'blas' or 'rnnkern', got '", want, "'");
  GemmBackend r;
  if (want != "auto") {
    for (auto& d : r.verdict.kind) d.tiles = want == "rnnkern";
    r.source = "RNNKERN_GEMM";
    return r;
  }
  if (std::string(vec_kernels().capability) == "DEFAULT") {
    r.source = "capability";  // the portable kernels: no vector unit to race BLAS with
    return r;
  }
  // One verdict per machine and build, whatever the thread count: a probe in
  // each process could flip where the two run within the margin's noise, and
  // a verdict per thread count could differ between counts (on a Zen 4, BLAS
  // at 1 thread and the tiles at 2); either would change the bits between
  // processes. The probe runs at the first process's thread count.
  const std::string path = probe_cache_path(vec_kernels().capability);
  if (!path.empty()) {
    if (const auto held = read_probe_cache(path)) {
      r.verdict = *held;
      r.source = "cache";
      r.cache = path;
      return r;
    }
  }
  r.verdict = probe_gemm_backend();
  r.source = "probe";
  if (path.empty()) return r;
  if (const auto held = store_probe_cache(path, r.verdict)) {
    r.cache = path;
    if (!(*held == r.verdict)) {  // another process stored first
      r.verdict = *held;
      r.source = "cache";
    }
  }
  return r;
}

}  // namespace

const GemmBackend& gemm_backend() {
  static const GemmBackend backend = choose_gemm_backend();
  return backend;
}

SmallMatmul::SmallMatmul(const at::Tensor& w, const at::Tensor& bias) : w_(w), bias_(bias) {
  TORCH_INTERNAL_ASSERT(w.dim() == 2 &&
                        (!bias.defined() || (bias.dim() == 1 && bias.numel() == w.size(1))));
  const int64_t K = w.size(0), N = w.size(1);
  if (N == 0 || !row_gemm_wins(K, N)) return;
  // w and the bias as row_gemm reads them: [K, NP], [NP], zero padded.
  wt_ = pack_row_operand(w);
  if (!bias.defined()) return;
  const int64_t NP = wt_.size(1);
  bp_ = at::zeros({NP}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "small_matmul_pack", [&] {
    pack_panels_to(bp_.data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(), 1, N, 0,
                   bias.stride(0), NP);
  });
}

void SmallMatmul::mm_out(at::Tensor& out, const at::Tensor& x) const {
  TORCH_INTERNAL_ASSERT(x.dim() == 2 && out.dim() == 2 && x.size(1) == w_.size(0) &&
                        out.size(0) == x.size(0) && out.size(1) == w_.size(1) &&
                        out.stride(1) == 1);
  if (!packed()) {
    if (bias_.defined()) at::addmm_out(out, bias_, x, w_);
    else at::mm_out(out, x, w_);
    return;
  }
  if (x.size(0) == 0) return;
  const auto xc = x.stride(1) == 1 ? x : dense(x);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "small_mm_out",
                             [&] { row_gemm_out<scalar_t>(out, xc, wt_, w_.size(1), bp_); });
}

void small_mm_out(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                  const at::Tensor& bias) {
  SmallMatmul(w, bias).mm_out(out, x);
}

at::Tensor finite_padding(const at::Tensor& x, const int64_t* lengths) {
  if (!lengths) return x;
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2);
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "finite_padding", [&] {
    const scalar_t* p = x.const_data_ptr<scalar_t>();
    for (int64_t b = 0; b < B && finite; ++b) {
      for (int64_t t = lengths[b]; t < T && finite; ++t) {
        const scalar_t* row = p + (t * B + b) * I;
        int ok = 1;
        for (int64_t i = 0; i < I; ++i) ok &= (row[i] - row[i] == scalar_t(0));  // NaN, Inf: 0
        finite = ok != 0;
      }
    }
  });
  if (finite) return x;
  at::Tensor zeroed = x.clone();
  auto z = zeroed.view({T, B, I});
  for (int64_t b = 0; b < B; ++b)
    if (lengths[b] < T) z.narrow(0, lengths[b], T - lengths[b]).select(1, b).zero_();
  return zeroed;
}

void atb_out(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  TORCH_INTERNAL_ASSERT(a.dim() == 2 && b.dim() == 2 && c.is_contiguous() &&
                        a.size(0) == b.size(0) && c.size(0) == a.size(1) &&
                        c.size(1) == b.size(1) && a.stride(1) == 1 && b.stride(1) == 1);
  const int64_t M = a.size(1), N = b.size(1);
  if (M == 0 || N == 0) return;
  if (!atb_wins(M, N)) return blas_atb(c, a, b, accumulate);
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "atb_out", [&] {
    // The wider side along the vectors.
    if (M >= N) atb_impl<scalar_t>(c, false, a, b, accumulate);
    else atb_impl<scalar_t>(c, true, b, a, accumulate);
  });
}

AtbSum::AtbSum(const at::Tensor& c)
    : c_(c),
      transposed_(c.numel() > 0 && !atb_wins(c.size(0), c.size(1)) &&
                  blas_transposed(c.size(0), c.size(1))) {}

void AtbSum::add(const at::Tensor& a, const at::Tensor& b) {
  if (!transposed_) return atb_out(c_, a, b, true);
  TORCH_INTERNAL_ASSERT(a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0) &&
                        a.size(1) == c_.size(0) && b.size(1) == c_.size(1) &&
                        a.stride(1) == 1 && b.stride(1) == 1 && c_.is_contiguous());
  if (!ct_.defined()) {
    ct_ = big_empty({c_.size(1), c_.size(0)}, c_.options());
    at::mm_out(ct_, b.t(), a);
  } else {
    ct_.addmm_(b.t(), a);
  }
}

void AtbSum::finish() {
  if (!ct_.defined()) return;
  const int64_t M = c_.size(0), N = c_.size(1);
  AT_DISPATCH_FLOATING_TYPES(c_.scalar_type(), "atb_sum", [&] {
    add_transposed(c_.data_ptr<scalar_t>(), ct_.const_data_ptr<scalar_t>(), M, N, true);
  });
  ct_ = at::Tensor();  // back to the buffer cache
}

bool vanishing_atb(const at::Tensor& a, const at::Tensor& b) {
  TORCH_INTERNAL_ASSERT(a.dim() == 2 && b.dim() == 2 && a.stride(1) == 1 && b.stride(1) == 1 &&
                        a.scalar_type() == b.scalar_type());
  bool vanishes = true;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "vanishing_atb", [&] {
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    for (int64_t k = 0; k < b.size(0) && vanishes; ++k)
      for (int64_t j = 0; j < b.size(1); ++j) vanishes &= bp[k * b.stride(0) + j] == scalar_t(0);
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    for (int64_t k = 0; k < a.size(0) && vanishes; ++k)
      for (int64_t i = 0; i < a.size(1); ++i) vanishes &= std::isfinite(ap[k * a.stride(0) + i]);
  });
  return vanishes;
}

std::tuple<at::Tensor, at::Tensor> elman_forward(const ElmanShape& s, const at::Tensor& x,
                                                 const at::Tensor& hx, const at::Tensor& weight_ih,
                                                 const at::Tensor& weight_hh,
                                                 const at::Tensor& bias) {
  // Every operand in the one layout the GEMMs see, so a strided view gives the
  // same bits as its contiguous copy (BLAS may round differently per layout).
  const auto h0 = dense(hx);  // [B,H]
  const auto w_hh = dense(weight_hh);
  const auto w_ih = dense(weight_ih);
  auto out = big_empty({s.T, s.B, s.H}, x.options());  // [T,B,H]
  auto h_n = at::empty({s.B, s.H}, x.options());        // [B,H]
  if (s.T * s.B == 0) {
    h_n.copy_(h0);
    return {out, h_n};
  }
  // The input projection of every step, bias included: one GEMM before the
  // loop, or each step's rows inside it where the vector kernel takes the
  // product (projection_in_loop).
  const auto x2 = x.view({s.T * s.B, s.I});
  auto out2 = out.view({s.T * s.B, s.H});
  const SmallMatmul proj(w_ih.t(), bias.defined() ? dense(bias) : bias);
  const bool in_loop = projection_in_loop(s) && proj.packed();
  if (!in_loop) proj.mm_out(out2, x2);

  at::Tensor state, gemm_buf;
  if (s.lengths) {
    state = at::empty({s.B, s.H}, x.options());
    gemm_buf = at::empty({s.B, s.H}, x.options());
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "elman_forward", [&] {
    ElmanFwdParams<scalar_t> p;
    p.shape = s;
    p.h0 = h0.const_data_ptr<scalar_t>();
    p.w_hh = w_hh.const_data_ptr<scalar_t>();
    p.out = out.data_ptr<scalar_t>();
    p.h_n = h_n.data_ptr<scalar_t>();
    p.state = state.defined() ? state.data_ptr<scalar_t>() : nullptr;
    p.gemm = gemm_buf.defined() ? gemm_buf.data_ptr<scalar_t>() : nullptr;
    if (in_loop) {
      p.x = x.const_data_ptr<scalar_t>();
      p.w_x = proj.packed_weight().const_data_ptr<scalar_t>();
      p.b_x = proj.packed_bias().defined() ? proj.packed_bias().const_data_ptr<scalar_t>()
                                           : nullptr;
      p.np_x = proj.packed_weight().size(1);
    }
    elman_fwd_kernel(p);
  });
  return {out, h_n};
}

ElmanGrads elman_backward(const ElmanShape& s, const at::Tensor& grad_output,
                          const at::Tensor& grad_h_n, const at::Tensor& x, const at::Tensor& hx,
                          const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                          const at::Tensor& output, const at::Tensor& grad_h_norm,
                          bool grad_input) {
  const auto h0 = dense(hx);
  const auto w_hh = dense(weight_hh);
  const auto w_ih = dense(weight_ih);
  const auto out = dense(output);
  const auto g_out = dense(grad_output);
  const int64_t T = s.T, B = s.B, H = s.H, I = s.I;
  auto carry = dense(grad_h_n).clone();  // [B,H] -> dL/dh0
  auto grad_z = big_empty({T, B, H}, x.options());     // [T,B,H]
  auto grad_z_first = at::empty({B, H}, x.options());  // [B,H]
  auto gemm_buf = at::empty({B, H}, x.options());      // [B,H]
  TORCH_INTERNAL_ASSERT(!grad_h_norm.defined() ||
                        (grad_h_norm.is_contiguous() && grad_h_norm.sizes().equals({T, B}) &&
                         grad_h_norm.scalar_type() == x.scalar_type()));
  // The parameter gradients' row sums inside the loop where it takes them.
  const bool in_loop = row_sums_in_loop(s, grad_h_norm.defined());
  const at::Tensor x_finite = finite_padding(x, s.lengths);  // [T,B,I]
  ElmanGrads g;
  g.weight_hh = at::empty({H, H}, x.options());
  if (in_loop) {
    g.weight_ih = at::empty({H, I}, x.options());
    g.bias = at::empty({H}, x.options());
  }
  if (T * B > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "elman_backward", [&] {
      ElmanBwdParams<scalar_t> p;
      if (in_loop) {
        p.sum_w_hh = g.weight_hh.data_ptr<scalar_t>();
        p.sum_w_ih = g.weight_ih.data_ptr<scalar_t>();
        p.sum_b = g.bias.data_ptr<scalar_t>();
        p.x = x_finite.const_data_ptr<scalar_t>();
      }
      p.shape = s;
      p.w_hh = w_hh.const_data_ptr<scalar_t>();
      p.out = out.const_data_ptr<scalar_t>();
      p.grad_out = g_out.const_data_ptr<scalar_t>();
      p.carry = carry.data_ptr<scalar_t>();
      p.grad_z = grad_z.data_ptr<scalar_t>();
      p.grad_z_first = grad_z_first.data_ptr<scalar_t>();
      p.gemm = gemm_buf.data_ptr<scalar_t>();
      p.grad_h_norm = grad_h_norm.defined() ? grad_h_norm.data_ptr<scalar_t>() : nullptr;
      elman_bwd_kernel(p);
    });
  } else {
    grad_z.zero_();
  }
  // Every other parameter gradient is one GEMM or reduction over all T*B rows.
  const auto gz2 = grad_z.view({T * B, H});
  g.input = at::empty({0}, x.options());
  if (grad_input) {
    g.input = big_empty({T, B, I}, x.options());
    auto gi2 = g.input.view({T * B, I});
    small_mm_out(gi2, gz2, w_ih);
  }
  if (!in_loop) {
    g.weight_ih = at::empty({H, I}, x.options());
    atb_out(g.weight_ih, gz2, x_finite.view({T * B, I}), false);
    g.bias = at::zeros({H}, x.options());
    add_column_sums(g.bias, gz2);
  }
  // dW_hh = sum_t dz_t^T h_prev(t). h_prev is the neighbouring step's output,
  // or h0 at each sequence's first processed step (dz_first).
  const at::Tensor dz_first = (s.lengths && s.reverse)
                                   ? grad_z_first
                                   : (T > 0 ? grad_z[s.reverse ? T - 1 : 0] : grad_z_first.zero_());
  // Skipped when exactly zero: the rest then stores its sums, the same bits
  // as 0 + each sum.
  const bool first = !vanishing_atb(dz_first, h0);
  if (in_loop) {  // g.weight_hh holds the loop's sums
    if (first) {
      auto term = at::empty({H, H}, x.options());
      atb_out(term, dz_first, h0, false);
      g.weight_hh.add_(term);
    }
  } else {
    if (first) atb_out(g.weight_hh, dz_first, h0, false);
    if (T > 1) {
      const auto dz_rest = s.reverse ? grad_z.narrow(0, 0, T - 1) : grad_z.narrow(0, 1, T - 1);
      const auto h_prev = s.reverse ? out.narrow(0, 1, T - 1) : out.narrow(0, 0, T - 1);
      atb_out(g.weight_hh, dz_rest.reshape({(T - 1) * B, H}), h_prev.reshape({(T - 1) * B, H}),
              first);
    } else if (!first) {
      g.weight_hh.zero_();
    }
  }
  g.hx = carry;
  return g;
}

namespace {

std::tuple<at::Tensor, at::Tensor> elman_fwd_cpu(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const c10::optional<at::Tensor>& bias_ih,
    const c10::optional<at::Tensor>& bias_hh, const c10::optional<at::Tensor>& lengths,
    c10::string_view nonlinearity, bool reverse, int64_t truncate) {
  ElmanShape s = check_elman_args("rnnkern.elman_fwd", input, hx, weight_ih, weight_hh, bias_ih,
                                  bias_hh, lengths, nonlinearity, reverse, truncate);
  const auto x = dense(input);  // [T,B,I]
  const at::Tensor len = lengths.has_value() ? dense(*lengths) : at::Tensor();
  s.lengths = len.defined() ? len.const_data_ptr<int64_t>() : nullptr;
  return elman_forward(s, x, hx, weight_ih, weight_hh, bias_sum(bias_ih, bias_hh));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> elman_bwd_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& input,
    const at::Tensor& hx, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const at::Tensor& output, const c10::optional<at::Tensor>& lengths,
    c10::string_view nonlinearity, bool reverse, int64_t truncate, bool grad_input) {
  ElmanShape s = check_elman_args("rnnkern.elman_bwd", input, hx, weight_ih, weight_hh,
                                  c10::nullopt, c10::nullopt, lengths, nonlinearity, reverse,
                                  truncate);
  check_elman_bwd_args(s, input, grad_output, grad_h_n, output);
  const auto x = dense(input);
  const at::Tensor len = lengths.has_value() ? dense(*lengths) : at::Tensor();
  s.lengths = len.defined() ? len.const_data_ptr<int64_t>() : nullptr;
  ElmanGrads g = elman_backward(s, grad_output, grad_h_n, x, hx, weight_ih, weight_hh, output,
                                at::Tensor(), grad_input);
  return {g.input, g.hx, g.weight_ih, g.weight_hh, g.bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnkern, CPU, m) {
  m.impl("elman_fwd", &elman_fwd_cpu);
  m.impl("elman_bwd", &elman_bwd_cpu);
}

}  // namespace rnnkern::cpu
