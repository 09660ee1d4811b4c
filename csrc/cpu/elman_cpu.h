// The CPU Elman layer as building blocks for ops: the ops in elman_cpu.cpp and
// fused ops that run a layer inside them (a per-step loss) call these after
// their own argument checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

#include "../params.h"
#include "probe_cache.h"

namespace rnnkern::cpu {

// b_ih + b_hh, whichever are given; undefined when neither is.
at::Tensor bias_sum(const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh);

// acc [N] += the column sums of m [M, N] (unit column stride), each column
// summed over the rows in order: the same bits at any thread count (ATen's
// sum may split the rows across threads).
void add_column_sums(at::Tensor& acc, const at::Tensor& m);

// The products around the time loops whose shapes BLAS runs far below its
// rate: a side below 16 (the input projection at a small I, the logits of a
// head over a few classes, dW_ih at a small I), or a small output over the
// T*B rows (dW_hh at a small H). AMD EPYC (Zen 4), MKL, 2 threads: dW_ih =
// dz^T x at [3200,128]^T [3200,8] took 414 us, dx = dz W_ih at
// [3200,128] [128,8] 371 us. These run on the vector kernels instead
// (VecKernels::row_gemm, atb_block), each output element summed in a fixed
// order by one thread: the same bits at any thread count.
//
// Larger products run on those kernels too where they beat BLAS, which
// depends on the CPU and on the size of the panel a product reuses over its
// rows: on AMD EPYC Zen 5 MKL's sgemm takes a generic path at about 40% of the
// FMA peak, and the tiles ran the Elman `small` training step 1.6x faster; on
// Zen 4 the tiles lead for small panels and BLAS for large ones over many
// rows. The choice is made once per machine and build for each kind of
// product (probe_cache.h's GemmKind; gemm_backend()): RNNKERN_GEMM=blas or
// =rnnkern sets it, and by default (auto) a probe times both.
//
// out [R,N] (contiguous rows) = x [R,K] w [K,N] (+ bias [N], if defined);
// x and w any strides with unit column stride for x.
void small_mm_out(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                  const at::Tensor& bias = at::Tensor());

// x [T,B,I] (dense) as the right operand of dW_ih = dz^T x over all T*B rows,
// whose padded rows (t >= len_b) have dz = 0: the forward never read them
// (nn's PackedSequence semantics), so they may hold anything, but 0 * NaN is
// NaN. x itself where every padded row is finite (one pass over those rows),
// else a copy with the padded rows zeroed. lengths: [B] or nullptr (none).
at::Tensor finite_padding(const at::Tensor& x, const int64_t* lengths);

// small_mm_out for many products with one right operand (a head's weight over
// the chunks of a sweep): w and the bias packed once, when the vector kernel
// takes their shape.
class SmallMatmul {
 public:
  explicit SmallMatmul(const at::Tensor& w, const at::Tensor& bias = at::Tensor());
  // Whether the products run on the vector kernel (else on BLAS).
  bool packed() const { return wt_.defined(); }
  // As the vector kernel reads them (packed() only): w [K, NP] and the bias
  // [NP] (undefined without one), zero padded.
  const at::Tensor& packed_weight() const { return wt_; }
  const at::Tensor& packed_bias() const { return bp_; }
  void mm_out(at::Tensor& out, const at::Tensor& x) const;

 private:
  at::Tensor w_, bias_, wt_, bp_;
};

// c [M,N] (contiguous) = a^T b, or += with accumulate; a [K,M], b [K,N] with
// unit column stride: a sum over the K rows. K is split into fixed chunks
// whose partial sums are added in order, never into per-thread ranges.
void atb_out(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate);

// c += the sum of a_i^T b_i over the calls of add() (the head's dW_out, chunk
// by chunk), each product as atb_out takes it, except where BLAS runs c
// transposed (a tall narrow c, blas_atb): there the products accumulate in
// one [N,M] buffer from the CPU buffer cache, one BLAS call with beta = 1
// each, and finish() adds it into c, transposed, once instead of once per
// call. c must not be read before finish().
class AtbSum {
 public:
  explicit AtbSum(const at::Tensor& c);  // c [M,N] contiguous
  void add(const at::Tensor& a, const at::Tensor& b);
  void finish();

 private:
  at::Tensor c_, ct_;
  bool transposed_;  // BLAS runs c transposed: the products go to ct_ [N,M]
};

// Whether a^T b is exactly zero because b is (h0 when hx is None): every
// element of b is 0 and every element of a finite (0 * inf is NaN). a [K,M],
// b [K,N] with unit column stride. dW_hh's h0 term is then skipped: a
// separate product over B rows (9 us of an Elman `seed` backward's 187 at 2
// threads, Intel Xeon; for the GRU two BLAS calls).
bool vanishing_atb(const at::Tensor& a, const at::Tensor& b);

// Who runs the products that are not narrow, decided once per process.
struct GemmBackend {
  // Which backend runs each kind of product (probe_cache.h's GemmKind) and
  // the probe's fastest times (0 when not probed).
  ProbeVerdict verdict;
  // "RNNKERN_GEMM", "capability" (no vector unit), "probe" (timed in this
  // process) or "cache" (a verdict an earlier process stored).
  const char* source = "";
  std::string cache;  // the file holding the verdict ("" where none)
};
// Throws (c10::Error) when RNNKERN_GEMM is not auto, blas or rnnkern.
const GemmBackend& gemm_backend();

// Runs the layer. `s` comes from check_elman_args with s.lengths pointing at a
// contiguous int64 [B] copy (or null).
//   x [T,B,I] contiguous, hx [B,H], weight_ih [H,I], weight_hh [H,H], bias [H] or undefined
// Returns output [T,B,H] (0 where t >= len_b) and h_n [B,H].
std::tuple<at::Tensor, at::Tensor> elman_forward(const ElmanShape& s, const at::Tensor& x,
                                                 const at::Tensor& hx, const at::Tensor& weight_ih,
                                                 const at::Tensor& weight_hh,
                                                 const at::Tensor& bias);

struct ElmanGrads {
  at::Tensor input;      // [T,B,I]
  at::Tensor hx;         // [B,H]
  at::Tensor weight_ih;  // [H,I]
  at::Tensor weight_hh;  // [H,H]
  at::Tensor bias;       // [H], the gradient of b_ih and of b_hh alike
};

// The whole BPTT (truncated when s.truncate > 0).
//   grad_output [T,B,H] dL/dh_t from outside the recurrence, grad_h_n [B,H],
//   x [T,B,I] contiguous, output [T,B,H] from elman_forward.
// grad_h_norm, when defined: a contiguous [T,B] tensor of the input's dtype that
// receives ||dL/dh_t|| per sequence (through the recurrence included; 0 where t >= len_b).
// grad_input = false: ElmanGrads::input is an empty [0] tensor (not computed).
ElmanGrads elman_backward(const ElmanShape& s, const at::Tensor& grad_output,
                          const at::Tensor& grad_h_n, const at::Tensor& x, const at::Tensor& hx,
                          const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                          const at::Tensor& output, const at::Tensor& grad_h_norm = at::Tensor(),
                          bool grad_input = true);

}  // namespace rnnkern::cpu
