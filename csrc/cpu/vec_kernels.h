// The element-wise passes of the CPU time loops, compiled once per CPU
// capability (DEFAULT, AVX2, AVX512) in vec_kernels_<cap>.cpp and chosen once at
// run time, as ATen's DispatchStub does.
//
// Two kinds of pass:
//  - element-wise passes over contiguous runs (act_inplace, act_add, grad_z),
//    used around a BLAS GEMM;
//  - fused steps (fwd_step, bwd_step): the recurrent GEMM of one time step with
//    the activation (or its derivative) applied to the accumulators before they
//    are stored. For the small H of most RNNs a step is a few microseconds, so
//    BLAS's per-call overhead and the extra pass over z would dominate; here
//    the packed weight stays in L1/L2 across the whole sequence.
//
// In an extension, at::vec::Vectorized<float> is ATen's scalar fallback unless
// the translation unit defines CPU_CAPABILITY_<cap> and enables the matching
// instruction set, which is what the per-capability files do.
#pragma once

#include <cstdint>

#include "../cells/elman.h"
#include "../loss.h"

namespace rnnkern::cpu {

// Packed W_hh streamed by a thread each step from this size on outgrows L2 on
// some of this project's CPUs (1 MB on the AMD EPYC Zen 4): the step tiles
// then prefetch it kPrefetchK rows ahead (prefetch_w below). Measured on the
// Intel Xeon (2 MB L2), A/B in alternating processes: LSTM `large` forward
// -3% to -7%, training step -5% to -7%; below the size, the `long` steps
// (a 16 KB panel) lost 5-8% to it.
constexpr int64_t kPrefetchMinBytes = int64_t(1) << 20;

// One time step of the recurrence, for rows [b0, b1) of the batch.
//   a   [B,K] left operand (row stride lda); null in backward means "no GEMM"
//   mp  right operand M [K,N] in panels of pw columns (panel_width_for), each
//       contiguous over k (pack_panels); NP = N rounded up to pack_width
//   lens [B] or null (all rows active); a row is active at step s if s < lens[b]
// fwd_step: z[b,:] = act(z[b,:] + a[b,:] M) for rows active at step_out, 0 for
//           the others. z [B,N], row stride ldz, holds the input projection.
// bwd_step: dz[b,:] = (g[b,:] + c) * act'(h[b,:]) for rows active at step_out,
//           0 for the others; c = a[b,:] M for rows active at step_a, else
//           pass[b,:] (a frozen state passes its gradient through).
//           g, h, dz: [B,N] with row stride ldz; pass [B,N] contiguous.
template <typename T>
struct StepArgs {
  Activation act;
  int64_t K = 0, N = 0, NP = 0;
  int64_t pw = 0;  // mp's panel width (VecKernels::panel_width_for)
  const T* a = nullptr;
  int64_t lda = 0;
  const T* mp = nullptr;
  const int64_t* lens = nullptr;
  int64_t step_a = 0, step_out = 0;
  int64_t ldz = 0;
  T* z = nullptr;
  const T* g = nullptr;
  const T* h = nullptr;
  const T* pass = nullptr;
  T* dz = nullptr;
  bool prefetch_w = false;  // as GatedStepArgs::prefetch_w
};

// One fused forward step of a gated cell without a projection (P = H), for
// rows [b0, b1): the recurrent GEMM ah = a W_hh^T on a register tile that holds
// all NG gates (4 LSTM, 3 GRU) of one vector of hidden units, then the cell's
// pointwise forward (cells/lstm.h, gru.h) on the accumulators, in registers.
//   a    [B,H] h_prev (row stride H)
//   mp   W_hh packed gate-interleaved and unit-block-major (pack_gates):
//        [NB, H, NG*VL], mp[jb][k][g*VL + l] holding W_hh[g*H + jb*VL + l][k],
//        zero padded
//   lens [B] or null; a row is active at `step` if step < lens[b]; inactive
//        rows get 0 in out, gates and cell and leave c alone
//   ax   [B,NG*H] the step's input projection (LSTM: + b_ih + b_hh; GRU: + b_ih)
//   b_hh [3H] GRU (added to ah) or null
//   out  [B,H] h_t;  gates [B,4H];  cell [B,H] (LSTM c_t);  c [B,H] running c (LSTM)
//   gates, cell: null when backward's state is not wanted (nothing saved)
// The input projection can instead run in the same register tile (fused_x,
// ax unused): the tile's sums then run over h_prev, then over the I inputs
// of the step's x rows, and the epilogue adds bias.
//   x    [B,I] the step's input rows;  mx W_ih packed as mp: [NB, I, NG*VL]
//   bias [NG*H] LSTM b_ih + b_hh, GRU b_ih; or null
template <typename T>
struct GatedStepArgs {
  int ng = 4;
  int64_t H = 0;
  int64_t jb0 = 0, jb1 = 0;  // the unit blocks to compute, [jb0, jb1) of NB
  const T* a = nullptr;
  const T* mp = nullptr;
  const int64_t* lens = nullptr;
  int64_t step = 0;
  const T* ax = nullptr;
  bool fused_x = false;
  int64_t I = 0;
  const T* x = nullptr;
  const T* mx = nullptr;
  const T* bias = nullptr;
  const T* b_hh = nullptr;
  T* out = nullptr;
  T* gates = nullptr;
  T* cell = nullptr;
  T* c = nullptr;
  // Prefetch packed W_hh a few k ahead: set when the panels a thread streams
  // each step outgrow its caches (kPrefetchMinBytes).
  bool prefetch_w = false;
};

// One fused backward step of a gated cell without a projection, for rows
// [b0, b1): the carry a W_hh (a = the previous processed step's dL/dah: for
// the LSTM its dax; for the GRU its dax's r and z columns, which equal dah's,
// then its dahn) on a register tile of units, then the cell's pointwise
// backward (cells/lstm.h, gru.h) on it. Per row b and unit j, with inc the
// gradient reaching h_t from later steps:
//   inc = a_b W_hh[:, j] (LSTM) or dh[b,j] + a_b W_hh[:, j] (GRU, dh holding the
//         direct part z * dh of the step after) for rows active at step_a;
//         dh[b,j] otherwise (a frozen state passes its gradient through; a is
//         null at the first processed step and after a truncation cut);
//   dL/dh_t = grad_out + inc, into dtot when given (for ||dL/dh_t||), then
//   the cell's backward writes dax (and dahn for the GRU), the carry dc (LSTM)
//   and, for the GRU, the direct part into dh. Rows inactive at `step` are
//   left alone. final_carry: only dh = a W_hh (LSTM) or dh += a W_hh (GRU) for
//   rows active at step_a, after the last processed step.
//   mp: W_hh [G, H] in panels of panel_width units (pack_panels)
//   grad_out, cell, prev (LSTM c_prev / GRU h_prev), dh, dc, dtot: [B,H] rows;
//   gates [B,4H]; a, dax: [B,G]; a_n, dahn: [B,H] (GRU)
template <typename T>
struct GatedBwdArgs {
  int ng = 4;
  int64_t H = 0, K = 0, NP = 0, lda = 0;  // K = G rows of W_hh; lda = G
  int64_t pw = 0;  // mp's panel width (VecKernels::panel_width_for)
  const T* a = nullptr;
  const T* a_n = nullptr;  // GRU: the carry's last H columns (dahn), a's first 2H
  const T* mp = nullptr;
  const int64_t* lens = nullptr;
  int64_t step = 0, step_a = 0;
  bool final_carry = false;
  const T* grad_out = nullptr;
  const T* gates = nullptr;
  const T* cell = nullptr;
  const T* prev = nullptr;
  T* dh = nullptr;
  T* dc = nullptr;
  T* dax = nullptr;
  T* dahn = nullptr;  // GRU: dL/d(W_hn h + b_hn); dah's r, z parts are dax's
  T* dtot = nullptr;
  bool prefetch_w = false;  // as GatedStepArgs::prefetch_w
};

template <typename T>
struct VecKernels {
  // Padding width of packed matrices and the row block of the fused steps
  // (ranges handed to fwd_step/bwd_step should start at a multiple of it).
  int64_t pack_width;
  int64_t row_block;
  // The column widths of the panels the register tiles of fwd_step, bwd_step
  // and gated_bwd_step stream (pack_panels): two vectors, and three where the
  // register file holds a tile of row_block rows by three (AVX-512), else 0.
  // Each panel is one column tile, so a tile never straddles two.
  int64_t panel_width, wide_panel_width;
  void (*fwd_step)(const StepArgs<T>& p, int64_t b0, int64_t b1);
  void (*bwd_step)(const StepArgs<T>& p, int64_t b0, int64_t b1);
  // z[0:n] = act(z[0:n])
  void (*act_inplace)(Activation a, T* z, int64_t n);
  // dst[0:n] = act(a[0:n] + b[0:n]); dst may alias a
  void (*act_add)(Activation a, T* dst, const T* x, const T* y, int64_t n);
  // dz[0:n] = act_backward(g[0:n] + c[0:n], h[0:n]) (cells/elman.h), h = act(z)
  void (*grad_z)(Activation a, T* dz, const T* g, const T* c, const T* h, int64_t n);
  // One row of the head's output x[0:O] + b[0:O] (b may be null: no bias)
  // against class y: returns the cross-entropy with label smoothing eps
  // (loss.h). With grad, x is overwritten with g = coef * dl/dx.
  T (*ce_row)(T* x, const T* b, int64_t O, int64_t y, T eps, T coef, bool grad);
  // The same for the MSE against y[0:O] (loss.h).
  T (*mse_row)(T* x, const T* b, const T* y, int64_t O, T coef, bool grad);
  // acc[0:N] += the sum of the rows of m [M, N] (row stride ld), in row order.
  void (*add_column_sums)(T* acc, const T* m, int64_t M, int64_t N, int64_t ld);
  // The gated cells' rows (cells/lstm.h, cells/gru.h), a vector of units at a time.
  // LSTM: ax, ah [4H] pre-activations -> act [4H] (i, f, g, o), c [H], m [H].
  void (*lstm_fwd_row)(int64_t H, const T* ax, const T* ah, const T* c_prev, T* act, T* c, T* m);
  // dm [H] = dL/dm_t; dc [H]: dL/dc_t in, dL/dc_prev out; dax [4H] out.
  void (*lstm_bwd_row)(int64_t H, const T* act, const T* c, const T* c_prev, const T* dm, T* dc,
                       T* dax);
  // GRU: ax [3H] (with b_ih), ah [3H] (h W_hh^T; b_hh [3H] or null added here)
  //   -> act [4H] (r, z, n, ah_n + b_hn), h [H].
  void (*gru_fwd_row)(int64_t H, const T* ax, const T* ah, const T* b_hh, const T* h_prev, T* act,
                      T* h);
  // dh [H]: dL/dh_t in, the direct part of dL/dh_prev out; dax [3H], dahn [H] out.
  void (*gru_bwd_row)(int64_t H, const T* act, const T* h_prev, T* dh, T* dax, T* dahn);
  // The fused gated step (GatedStepArgs), rows [b0, b1) in register tiles.
  void (*gated_fwd_step)(const GatedStepArgs<T>& p, int64_t b0, int64_t b1);
  // The fused gated backward step (GatedBwdArgs); its row block is row_block.
  void (*gated_bwd_step)(const GatedBwdArgs<T>& p, int64_t b0, int64_t b1);
  // Small products where BLAS is slow (a side below 16, or a small output),
  // each output element summed over k in order, by one call: the same bits
  // however callers split the blocks across threads.
  // atb_block: one block of a^T b over K rows:
  //   out[n * ldo + i] (+)= sum over k < K of a[k * lda + i] * b[k * ldb + n]
  //   for i < ml <= atb_width, n < nl <= kAtbCols; with accumulate, the sum
  //   starts from out's value (out + (a0 b0 + a1 b1 ...), left to right).
  void (*atb_block)(const T* a, int64_t lda, const T* b, int64_t ldb, int64_t K, int64_t ml,
                    int64_t nl, T* out, int64_t ldo, bool accumulate);
  int64_t atb_width;
  // row_gemm: rows [r0, r1) of out = bias + x w, w given as wt [K, NP]
  // (row-major, NP = N rounded up to pack_width, zero padded), bias [NP]
  // padded the same way or null:
  //   out[r * ldo + n] = bias[n] + sum over k < K of x[r * ldx + k] * wt[k * NP + n]
  void (*row_gemm)(const T* x, int64_t ldx, int64_t r0, int64_t r1, int64_t K, const T* wt,
                   int64_t N, int64_t NP, const T* bias, T* out, int64_t ldo);
};

constexpr int64_t kAtbCols = 8;  // the broadcast side of an atb_block

// The panel width for W_hh's N columns (hidden units) in a fused step:
// three-vector panels where the kernels have them (AVX-512: 8 x 3 tiles, 24
// accumulators), for N up to kWidePanelMaxN whose vectors split into threes
// and at most one two (N = 128 float32: 3 + 3 + 2); else two-vector panels
// (N = 64: 2 + 2, not 3 + 1, whose one-vector tile spends a broadcast per
// FMA). Interleaved A/B on an AMD EPYC Zen 5, 2 threads, training step, two
// runs: `small` (H = 128) Elman +8% / +13%, LSTM +3% / +5%, GRU 0 / +3%;
// `large` (H = 512) -2% to +1%, so two there. Each output's sum over k runs
// in the same order either way: the bits do not depend on the width.
constexpr int64_t kWidePanelMaxN = 256;

template <typename T>
int64_t panel_width_for(const VecKernels<T>& vk, int64_t N) {
  const int64_t vl = vk.pack_width, nv = (N + vl - 1) / vl;
  return vk.wide_panel_width > 0 && N <= kWidePanelMaxN && nv % 3 != 1 ? vk.wide_panel_width
                                                                       : vk.panel_width;
}

struct VecKernelTable {
  VecKernels<float> f32;
  VecKernels<double> f64;
  const char* capability;
};

// The table for the best capability this CPU supports. RNNKERN_CPU_CAPABILITY
// (DEFAULT, AVX2 or AVX512) lowers the choice, e.g. to test the portable path.
const VecKernelTable& vec_kernels();

template <typename T>
const VecKernels<T>& vec_kernels_for();
template <>
inline const VecKernels<float>& vec_kernels_for<float>() { return vec_kernels().f32; }
template <>
inline const VecKernels<double>& vec_kernels_for<double>() { return vec_kernels().f64; }

VecKernelTable vec_kernels_DEFAULT();
VecKernelTable vec_kernels_AVX2();
VecKernelTable vec_kernels_AVX512();

}  // namespace rnnkern::cpu
