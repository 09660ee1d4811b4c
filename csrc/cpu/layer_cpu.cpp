// The CPU time loop of the gated cells (csrc/cells/lstm.h, gru.h) and
// TORCH_LIBRARY_IMPL(rnnkern, CPU) for layer_fwd / layer_bwd.
//
// One loop for every gated cell; it alone owns lengths (frozen states, zero
// outputs), reverse, truncation, grad_norm and threading. The cells supply
// only the pointwise math of one row (cells/lstm.h, gru.h), run a vector of
// units at a time by vec_kernels (compiled per CPU capability).
// Forward:  ax = x W_ih^T + b  (one GEMM over all T*B rows, before the loop)
//           per step: ah = h_prev W_hh^T (one GEMM), the cell's row pass, and
//           with a projection h = m W_hr^T (one GEMM). Up to H = 512 without
//           a projection, each step is one fused register-tiled kernel
//           (VecKernels::gated_fwd_step), which can also take the input
//           projection in place of ax (fused_input).
// Backward: per step, last to first: the cell's row pass gives the
//           pre-activation gradients (and the carry of c), then
//           dh_prev = dah W_hh (one GEMM); after the loop dW_ih, dW_hh, db,
//           dW_hr and dx are each one GEMM or row-ordered sum over all rows,
//           but for H <= 64 on the fused path, where the loop sums dW_ih,
//           dW_hh and db row tile by row tile (tile_sums.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>

#include "../checks.h"
#include "../params.h"
#include "aligned.h"
#include "pack.h"
#include "blas.h"
#include "elman_cpu.h"
#include "host_cache.h"
#include "tile_sums.h"
#include "time_order.h"
#include "vec_kernels.h"

namespace rnnkern::cpu {
namespace {

// Pointers of one call, all contiguous in the layout beside them.
template <typename T>
struct LayerPtrs {
  const T* ax;       // [T,B,G] x W_ih^T + b (LSTM: b_ih + b_hh; GRU: b_ih)
  // Instead of ax, where fused_x (fused_input(), on the fused path):
  bool fused_x;
  const T* x;        // [T,B,I]
  const T* w_ih;     // [G,I]
  const T* b_x;      // [G] LSTM b_ih + b_hh, GRU b_ih, or nullptr without biases
  const T* b_hh;     // [G] GRU only, else nullptr (added to ah each step)
  const T* w_hh;     // [G,P]
  const T* w_hr;     // [P,H] or nullptr
  const T* h0;       // [B,P]
  const T* c0;       // [B,H] LSTM
  T* out;            // [T,B,P]
  T* gates;          // [T,B,4H] (null: not saved, the fused forward without train)
  T* cell;           // [T,B,H] LSTM (null: GRU, or not saved)
  T* proj_in;        // [T,B,H] projection
};

struct Steps {
  const LayerShape& s;
  int64_t len(int64_t b) const { return s.lengths ? s.lengths[b] : s.T; }
  // Processing step -> time index of sequence b.
  int64_t time(int64_t step, int64_t b) const { return s.reverse ? len(b) - 1 - step : step; }
  bool cut_before(int64_t step) const {
    return s.truncate > 0 && step > 0 && step % s.truncate == 0;
  }
  int64_t max_len() const {
    int64_t m = s.lengths ? 0 : s.T;
    for (int64_t b = 0; s.lengths && b < s.B; ++b) m = std::max(m, s.lengths[b]);
    return m;
  }
};

template <typename F>
void for_rows(int64_t B, int64_t width, const F& f) {
  constexpr int64_t kGrainElems = 16384;
  at::parallel_for(0, B, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(width, 1)), f);
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

// The fused steps (VecKernels::gated_fwd_step) never write ah, and each
// thread runs its own rows through the whole sequence with no barrier. Up to
// H = 512 (a 4 MB float32 LSTM W_hh, past L2: each unit block's panel is
// reused from L2 by every row tile) they beat a per-step BLAS call, measured
// interleaved on 2 cores of an AMD EPYC (Zen 4): at H = 512, B = 64 the forward
// 20% faster and the training step 10-14% for both cells; at B = 8, 40%.
// Past it (H = 768: even for the LSTM, H = 1024: BLAS 15% ahead) every thread
// streaming all of W_hh each step loses to BLAS splitting it between threads.
constexpr int64_t kGatedFusedMaxH = 512;
// Work (multiply-adds over the sequence) below which the fused loop keeps to one thread.
constexpr int64_t kGatedLoopGrainFma = int64_t(1) << 18;

// A projection puts a GEMM between the cell and h. Reverse with lengths runs
// as a forward call on the sequences reversed within their lengths
// (time_order.h), since a fused step reads one time block.
bool gated_fused_path(const LayerShape& s) { return !s.proj && s.H <= kGatedFusedMaxH; }

// The input projection inside the fused step's register tile
// (GatedStepArgs::fused_x) rather than one GEMM over all T*B rows before the
// loop. It saves writing and reading back the [T,B,G] projection, but each
// step streams the packed W_ih once per pass over a thread's row tiles: that
// pays when the rows make a few tiles to share the pass, or when W_ih is small
// enough to stay in L2, and not in tiles of one or two rows, where the k-loop
// waits on loads. Measured interleaved (in random order) on 2 cores of an AMD
// EPYC (Zen 4), medians of the forward / training step against the GEMM:
//   LSTM: seed -10% / -5%, small -17% / -7%, long -51% / -15%, large -11% / 0-4%;
//   GRU: seed -10% / -3-17%, small -15% / -8%, long -12% / -20%, large -26% / -7-10%;
//   B = 8, I = 64, H = 256: GRU -7%, LSTM even; but
//   B = 8, I = H = 256 (LSTM): +11%; B = 2, I = H = 512 (LSTM): +65%;
//   B = 4, I = H = 128 (GRU): +8%; B = 2, I = H = 64: +12% (GRU), +14% (LSTM).
// The choice looks at B, not at the rows per thread, so that the bits do not
// depend on the thread count.
constexpr int64_t kFusedInputMinB = 8, kFusedInputAnySizeB = 24;
constexpr int64_t kFusedInputMaxBytes = int64_t(256) << 10;
bool fused_input(const LayerShape& s, int64_t elem_bytes) {
  if (!gated_fused_path(s) || s.I == 0 || s.B < kFusedInputMinB) return false;
  return s.B >= kFusedInputAnySizeB || s.I * s.G * elem_bytes <= kFusedInputMaxBytes;
}

// W [NG*H, K] (W_hh: K = H; W_ih: K = I; gate g's rows g*H..) -> M
// [NB, K, NG*VL], gate-interleaved so that a register tile loads all NG gates
// of VL units from one contiguous run, and unit-block-major so that a tile
// streams its block's panel in order: M[jb][k][g*VL + l] = W[g*H + jb*VL +
// l][k], zero past unit H. Against [K, NB*NG*VL] (each k a run of
// the whole width), measured interleaved on 2 cores of an AMD EPYC (Zen 4),
// LSTM forward: B = 1, H = 512 -15%, H = 256 -13%; large -13%; B = 16, H = 256
// -5%; GRU B = 8, H = 512 -9%; seed and small even.
template <typename T>
AlignedVector<T> pack_gates(const T* w, int64_t H, int64_t K, int64_t NG, int64_t VL,
                            int64_t* NB) {
  *NB = (H + VL - 1) / VL;
  const int64_t ld = NG * VL;
  AlignedVector<T> m(size_t(*NB * K * ld), T(0));
  // A transpose, a VL x kKb block at a time through a buffer in L1 (whole
  // cache lines read and written), the (gate, unit block) pairs split over
  // the threads.
  constexpr int64_t kKb = 16;
  TORCH_INTERNAL_ASSERT(VL <= 64, "pack_gates: a vector of ", VL, " elements");
  at::parallel_for(0, NG * *NB, std::max<int64_t>(1, 65536 / (VL * K + 1)),
                   [&](int64_t q0, int64_t q1) {
    T buf[kKb][64];
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t g = q % NG, jb = q / NG;
      const int64_t nl = std::min(VL, H - jb * VL);
      const T* src = w + (g * H + jb * VL) * K;
      T* dst = m.data() + jb * K * ld + g * VL;
      for (int64_t k0 = 0; k0 < K; k0 += kKb) {
        const int64_t nk = std::min(kKb, K - k0);
        for (int64_t l = 0; l < nl; ++l)
          for (int64_t k = 0; k < nk; ++k) buf[k][l] = src[l * K + k0 + k];
        for (int64_t k = 0; k < nk; ++k)
          for (int64_t l = 0; l < nl; ++l) dst[(k0 + k) * ld + l] = buf[k][l];
      }
    }
  });
  return m;
}

// With a row or two per thread, every thread would stream all of W_hh each
// step for one short tile: the threads split the unit blocks instead, with a
// barrier per step. Each unit's sums are the same either way, so the bits are
// too. Measured interleaved on 2 cores of an AMD EPYC (Zen 4), LSTM forward,
// T = 100, I = H: B = 1, H = 256 -34%, H = 512 -25%; B = 4, H = 256 -19%;
// B = 1, H = 32 (T = 50, I = 8) -19%; but B = 8, H = 128: +17%, and B = 12,
// H = 256: +17%. From H = 512 (4 MB of LSTM W_hh, beyond L2) the split pays at
// any B in a forward that saves nothing: Intel Xeon, 2 threads, `large`
// (T = 200, B = 64, I = 256), A/B in alternating processes, LSTM -10% to
// -17%, GRU -6% to -9%; a training forward, which also writes the gates, did
// not gain (LSTM within noise, GRU 3-9% slower).
constexpr int64_t kColumnSplitMaxB = 4;
constexpr int64_t kColumnSplitMinH = 512;
bool column_split(const LayerShape& s, int64_t threads, int64_t NB, bool inference) {
  return threads > 1 && NB >= 2 &&
         (s.B <= kColumnSplitMaxB || (inference && s.H >= kColumnSplitMinH));
}

// The fused forward: each thread runs the whole time loop over its own row
// tiles (sequences are independent), one fork/join per call, or with very
// few rows over its own unit blocks (column_split). Each unit of each row is
// summed by the same tile code either way, so the results do not depend on
// the thread count.
template <typename T>
void layer_fwd_fused(const LayerShape& s, const LayerPtrs<T>& p, T* h_n, T* c_n) {
  const int64_t B = s.B, H = s.H, G = s.G, S = 4 * H;
  const VecKernels<T>& vk = vec_kernels_for<T>();
  const bool lstm = s.cell == CellKind::kLstm;
  const int64_t ng = lstm ? 4 : 3;
  const Steps st{s};
  const int64_t t_max = st.max_len();
  int64_t NB = 0;
  const AlignedVector<T> mp = pack_gates(p.w_hh, H, H, ng, vk.pack_width, &NB);
  const AlignedVector<T> mx =
      p.fused_x ? pack_gates(p.w_ih, H, s.I, ng, vk.pack_width, &NB) : AlignedVector<T>();
  if (lstm) std::memcpy(c_n, p.c0, sizeof(T) * B * H);
  // The time loop over rows [b0, b1) and unit blocks [jb0, jb1); sync() after
  // each step; zero: this caller zeroes rows [b0, b1) at steps past every end.
  auto run = [&](int64_t b0, int64_t b1, int64_t jb0, int64_t jb1, bool zero, auto&& sync) {
    GatedStepArgs<T> a;
    a.ng = int(ng);
    a.H = H;
    a.jb0 = jb0, a.jb1 = jb1;
    a.mp = mp.data();
    a.lens = s.lengths;
    a.b_hh = p.b_hh;
    a.c = c_n;
    a.fused_x = p.fused_x;
    a.I = s.I;
    a.mx = mx.data();
    a.bias = p.b_x;
    a.prefetch_w = (jb1 - jb0) * H * ng * vk.pack_width * int64_t(sizeof(T)) >= kPrefetchMinBytes;
    for (int64_t step = 0; step < s.T; ++step) {
      // One time index per step: without lengths when reversed, so it is uniform.
      const int64_t t = s.reverse ? s.T - 1 - step : step;
      if (step >= t_max) {  // every sequence has ended: zeros, as for any padded step
        if (!zero) continue;
        std::memset(p.out + (t * B + b0) * H, 0, sizeof(T) * (b1 - b0) * H);
        if (p.gates) std::memset(p.gates + (t * B + b0) * S, 0, sizeof(T) * (b1 - b0) * S);
        if (p.cell) std::memset(p.cell + (t * B + b0) * H, 0, sizeof(T) * (b1 - b0) * H);
        continue;
      }
      a.a = step == 0 ? p.h0 : p.out + (s.reverse ? t + 1 : t - 1) * B * H;
      a.step = step;
      if (p.fused_x) a.x = p.x + t * B * s.I;
      else a.ax = p.ax + t * B * G;
      a.out = p.out + t * B * H;
      a.gates = p.gates ? p.gates + t * B * S : nullptr;
      a.cell = p.cell ? p.cell + t * B * H : nullptr;
      vk.gated_fwd_step(a, b0, b1);
      sync();
    }
  };
  const int64_t threads = B * s.T * G * H >= kGatedLoopGrainFma ? at::get_num_threads() : 1;
#ifdef _OPENMP
  if (column_split(s, threads, NB, p.gates == nullptr)) {
    // Every thread runs every row over its own unit blocks, and waits for
    // the others after each step, whose h the next step reads whole.
#pragma omp parallel num_threads(int(std::min(threads, NB)))
    {
      const int64_t team = omp_get_num_threads(), id = omp_get_thread_num();
      run(0, B, NB * id / team, NB * (id + 1) / team, id == 0, [] {
#pragma omp barrier
      });
    }
  } else
#endif
  {
    // An even split of the rows over the threads (each then tiles its own),
    // so no thread is left a short tile's worth more than another.
    const int64_t grain = std::max<int64_t>(1, (B + threads - 1) / threads);
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) { run(b0, b1, 0, NB, true, [] {}); });
  }
  // h_n: each sequence's last processed step (h0 for an empty one); c_n is
  // the running c, which steps past a sequence's end leave alone.
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = st.len(b);
    const T* src = len == 0 ? p.h0 + b * H : p.out + ((s.reverse ? 0 : len - 1) * B + b) * H;
    std::memcpy(h_n + b * H, src, sizeof(T) * H);
  }
}

// Reverse with lengths on the fused path (see gated_fused_path).
template <typename T>
void layer_fwd_fused_reversed(const LayerShape& s, const LayerPtrs<T>& p, T* h_n, T* c_n) {
  const auto in = p.fused_x ? reversed_within_lengths(p.x, s.T, s.B, s.I, s.lengths)
                            : reversed_within_lengths(p.ax, s.T, s.B, s.G, s.lengths);
  LayerShape f = s;
  f.reverse = false;  // h_n is then each sequence's last step: time 0
  LayerPtrs<T> q = p;
  (p.fused_x ? q.x : q.ax) = in.get();
  layer_fwd_fused(f, q, h_n, c_n);
  reverse_within_lengths(p.out, p.out, s.T, s.B, s.H, s.lengths);
  if (p.gates) reverse_within_lengths(p.gates, p.gates, s.T, s.B, 4 * s.H, s.lengths);
  if (p.cell) reverse_within_lengths(p.cell, p.cell, s.T, s.B, s.H, s.lengths);
}

template <typename T>
void layer_fwd_kernel(const LayerShape& s, const LayerPtrs<T>& p, T* h_n, T* c_n) {
  if (gated_fused_path(s) && s.reverse && s.lengths) return layer_fwd_fused_reversed(s, p, h_n, c_n);
  if (gated_fused_path(s)) return layer_fwd_fused(s, p, h_n, c_n);
  const int64_t B = s.B, H = s.H, P = s.P, G = s.G, S = 4 * H;
  const VecKernels<T>& vk = vec_kernels_for<T>();
  const bool lstm = s.cell == CellKind::kLstm;
  const Steps st{s};
  const int64_t t_max = st.max_len();
  AlignedVector<T> ah(size_t(B * G)), m(s.proj ? size_t(B * H) : 0), hp(s.proj ? size_t(B * P) : 0);
  T* h = h_n;  // [B,P], the running state, frozen per row after its last step
  T* c = c_n;  // [B,H] LSTM
  std::memcpy(h, p.h0, sizeof(T) * B * P);
  if (lstm) std::memcpy(c, p.c0, sizeof(T) * B * H);
  for (int64_t step = 0; step < s.T; ++step) {
    if (step < t_max) gemm<T>(false, true, B, G, P, T(1), h, P, p.w_hh, P, T(0), ah.data(), G);
    for_rows(B, G, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        if (step >= st.len(b)) {
          // Steps len..T-1 are, in either direction, the padded times len..T-1:
          // every output is 0 there (saved state included, so no output of
          // the op is ever uninitialised memory).
          const int64_t r = step * B + b;
          std::memset(p.out + r * P, 0, sizeof(T) * P);
          std::memset(p.gates + r * S, 0, sizeof(T) * S);
          if (lstm) std::memset(p.cell + r * H, 0, sizeof(T) * H);
          continue;
        }
        const int64_t r = st.time(step, b) * B + b;  // row of [T,B,*]
        T* hb = h + b * P;
        if (lstm) {
          T* cr = p.cell + r * H;
          T* mr = s.proj ? m.data() + b * H : p.out + r * P;
          vk.lstm_fwd_row(H, p.ax + r * G, ah.data() + b * G, c + b * H, p.gates + r * S, cr, mr);
          std::memcpy(c + b * H, cr, sizeof(T) * H);
          if (s.proj) std::memcpy(p.proj_in + r * H, mr, sizeof(T) * H);
          else std::memcpy(hb, mr, sizeof(T) * P);
        } else {
          T* hr = p.out + r * P;
          vk.gru_fwd_row(H, p.ax + r * G, ah.data() + b * G, p.b_hh, hb, p.gates + r * S, hr);
          std::memcpy(hb, hr, sizeof(T) * P);
        }
      }
    });
    if (s.proj && step < t_max) {
      gemm<T>(false, true, B, P, H, T(1), m.data(), H, p.w_hr, H, T(0), hp.data(), P);
      for (int64_t b = 0; b < B; ++b) {
        if (step >= st.len(b)) continue;
        const int64_t r = st.time(step, b) * B + b;
        std::memcpy(p.out + r * P, hp.data() + b * P, sizeof(T) * P);
        std::memcpy(h + b * P, hp.data() + b * P, sizeof(T) * P);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------

template <typename T>
struct LayerGradPtrs {
  const T* grad_out;  // [T,B,P]
  T* dh;              // [B,P] dL/dh_n in, dL/dh0 out
  T* dc;              // [B,H] dL/dc_n in, dL/dc0 out (LSTM)
  T* dax;             // [T,B,G] written at every step a sequence reaches; zero
                      // on entry with lengths (the others stay 0)
  T* dahn;            // [T,B,H] GRU: dL/d(W_hn h + b_hn), zero on entry as dax;
                      // dah's r, z columns are dax's. Null for the LSTM (dah = dax)
  T* dh_all;          // [T,B,P] dL/dh_t in total, for dW_hr (projection; zero on entry)
  T* grad_norm;       // [T,B] ||dL/dh_t|| (zero on entry), or nullptr
};

// The parameter gradients' sums over the rows, taken inside the fused loop
// (tile_sums.h) where gated_row_sums_in_loop says, else null: dW_hh's terms of
// every step but each sequence's first (h0's), dW_ih, b_ih's gradient (the
// column sums of dax) and the GRU's b_hn's (of dahn).
template <typename T>
struct LayerRowSums {
  T* w_hh;      // [G,P]
  T* w_ih;      // [G,I]
  T* b_ih;      // [G]
  T* b_hn;      // [H] GRU, else null
  const T* x;   // [T,B,I], padded rows finite
};

// Where tile_sums.h's row_sums_fit says, on the fused path.
bool gated_row_sums_in_loop(const LayerShape& s) {
  return row_sums_fit(s.T * s.B, s.H, s.I, s.reverse && s.lengths) && gated_fused_path(s);
}

template <typename T>
T norm_of(const T* v, int64_t n) {
  double acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += double(v[i]) * double(v[i]);
  return T(std::sqrt(acc));
}

// The fused backward (VecKernels::gated_bwd_step), on the fused forward's
// paths: per step the carry from the step after is a register-tiled GEMM with
// the packed W_hh whose epilogue is the cell's backward, each thread running
// the whole loop over its own row tiles. Same semantics as the loop below.
template <typename T>
void layer_bwd_fused(const LayerShape& s, const LayerPtrs<T>& p, const LayerGradPtrs<T>& g,
                     const LayerRowSums<T>* sums = nullptr) {
  const int64_t B = s.B, H = s.H, G = s.G, S = 4 * H, I = s.I;
  const VecKernels<T>& vk = vec_kernels_for<T>();
  const bool lstm = s.cell == CellKind::kLstm;
  const Steps st{s};
  const int64_t t_max = st.max_len();
  // M = W_hh [G,H] as it is (carry = dah W_hh), in panels.
  int64_t NP = 0;
  const int64_t pw = panel_width_for(vk, H);
  const AlignedVector<T> mp =
      pack_panels(p.w_hh, G, H, H, 1, pw, vk.pack_width, &NP);
  AlignedVector<T> dtot(g.grad_norm ? size_t(B * H) : 0);
  auto time_of = [&](int64_t step) { return s.reverse ? s.T - 1 - step : step; };
  const int64_t rb = vk.row_block, tiles = (B + rb - 1) / rb;
  const int64_t grain = B * s.T * G * H >= kGatedLoopGrainFma ? 1 : tiles;
  // Each row tile's partial sums: dW_hh's rows from dax (all G for the LSTM,
  // the GRU's r and z), the GRU's n rows from dahn, dW_ih, then the column
  // sums of dax and of dahn.
  RowTileSums<T> rs(vk, B);
  int k_hh = 0, k_hn = 0, k_ih = 0, k_b = 0, k_bn = 0;
  if (sums) {
    k_hh = rs.atb(lstm ? G : 2 * H, H, sums->w_hh);
    if (!lstm) k_hn = rs.atb(H, H, sums->w_hh + 2 * H * H);
    k_ih = rs.atb(G, I, sums->w_ih);
    k_b = rs.cols(G, sums->b_ih);
    if (!lstm) k_bn = rs.cols(H, sums->b_hn);
    rs.start();
  }
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    const int64_t b0 = t0 * rb, b1 = std::min(B, t1 * rb);
    // The sums over the rows of dax (and dahn) at `step`, just written.
    auto add_sums = [&](int64_t step) {
      const int64_t t = time_of(step);
      const T* dx = g.dax + t * B * G;
      const T* dn = lstm ? nullptr : g.dahn + t * B * H;
      const T* hp = step > 0 ? p.out + time_of(step - 1) * B * H : nullptr;
      const T* xt = I > 0 ? sums->x + t * B * I : nullptr;
      rs.for_tiles(b0, b1, [&](T* part, int64_t r0, int64_t n) {
        if (hp) {
          rs.add_atb(k_hh, part, dx + r0 * G, G, hp + r0 * H, H, n);
          if (!lstm) rs.add_atb(k_hn, part, dn + r0 * H, H, hp + r0 * H, H, n);
        }
        rs.add_atb(k_ih, part, dx + r0 * G, G, xt + r0 * I, I, n);
        rs.add_cols(k_b, part, dx + r0 * G, n, G);
        if (!lstm) rs.add_cols(k_bn, part, dn + r0 * H, n, H);
      });
    };
    auto cut_rows = [&] {
      std::memset(g.dh + b0 * H, 0, sizeof(T) * (b1 - b0) * H);
      if (lstm) std::memset(g.dc + b0 * H, 0, sizeof(T) * (b1 - b0) * H);
    };
    GatedBwdArgs<T> a;
    a.ng = lstm ? 4 : 3;
    a.H = H, a.K = G, a.NP = NP, a.pw = pw, a.lda = G;
    a.mp = mp.data();
    a.prefetch_w = G * H * int64_t(sizeof(T)) >= kPrefetchMinBytes;  // every thread, every panel
    a.lens = s.lengths;
    a.dh = g.dh;
    a.dc = g.dc;
    a.dtot = g.grad_norm ? dtot.data() : nullptr;
    // dL/dah of the step processed before (step + 1), or none: dax's row (all
    // of dah for the LSTM, its r and z parts for the GRU) and the GRU's dahn.
    const T* dah_next = nullptr;
    const T* a_n_next = nullptr;
    for (int64_t step = s.T - 1; step >= 0; --step) {
      const int64_t t = time_of(step);
      if (step >= t_max) {  // every sequence has ended: only a cut acts
        if (st.cut_before(step)) cut_rows();
        continue;
      }
      a.a = dah_next;
      a.a_n = a_n_next;
      a.step = step, a.step_a = step + 1;
      a.grad_out = g.grad_out + t * B * H;
      a.gates = p.gates + t * B * S;
      a.cell = lstm ? p.cell + t * B * H : nullptr;
      a.prev = step == 0 ? (lstm ? p.c0 : p.h0)
                         : (lstm ? p.cell : p.out) + time_of(step - 1) * B * H;
      a.dax = g.dax + t * B * G;
      if (!lstm) a.dahn = g.dahn + t * B * H;
      vk.gated_bwd_step(a, b0, b1);
      if (sums) add_sums(step);
      if (g.grad_norm)
        for (int64_t b = b0; b < b1; ++b)
          if (step < st.len(b)) g.grad_norm[t * B + b] = norm_of(dtot.data() + b * H, H);
      if (st.cut_before(step)) {
        cut_rows();
        dah_next = nullptr;
      } else {
        dah_next = g.dax + t * B * G;
        a_n_next = lstm ? nullptr : g.dahn + t * B * H;
      }
    }
    if (dah_next) {  // dL/dh0 from the first step's gates
      a.a = dah_next;
      a.a_n = a_n_next;
      a.step_a = 0;
      a.final_carry = true;
      vk.gated_bwd_step(a, b0, b1);
    }
  });
  if (sums) rs.finish();
}

// Reverse with lengths on the fused path (see gated_fused_path): the saved
// state and dL/dh_t reordered in, the gradients of the pre-activations and
// ||dL/dh_t|| reordered back. The state gradients (dh, dc) are per sequence.
template <typename T>
void layer_bwd_fused_reversed(const LayerShape& s, const LayerPtrs<T>& p,
                              const LayerGradPtrs<T>& g) {
  const int64_t T_ = s.T, B = s.B, H = s.H, G = s.G;
  const bool lstm = s.cell == CellKind::kLstm;
  const auto grad_out = reversed_within_lengths(g.grad_out, T_, B, H, s.lengths);
  const auto gates = reversed_within_lengths(p.gates, T_, B, 4 * H, s.lengths);
  const auto state = reversed_within_lengths(lstm ? p.cell : p.out, T_, B, H, s.lengths);
  LayerShape f = s;
  f.reverse = false;
  LayerPtrs<T> q = p;
  q.gates = gates.get();
  (lstm ? q.cell : q.out) = state.get();
  LayerGradPtrs<T> r = g;
  r.grad_out = grad_out.get();
  layer_bwd_fused(f, q, r);
  reverse_within_lengths(g.dax, g.dax, T_, B, G, s.lengths);
  if (g.dahn) reverse_within_lengths(g.dahn, g.dahn, T_, B, H, s.lengths);
  if (g.grad_norm) reverse_within_lengths(g.grad_norm, g.grad_norm, T_, B, int64_t(1), s.lengths);
}

template <typename T>
void layer_bwd_kernel(const LayerShape& s, const LayerPtrs<T>& p, const LayerGradPtrs<T>& g,
                      const LayerRowSums<T>* sums) {
  TORCH_INTERNAL_ASSERT(!sums || gated_row_sums_in_loop(s), "layer_bwd_kernel: row sums");
  if (gated_fused_path(s) && s.reverse && s.lengths) return layer_bwd_fused_reversed(s, p, g);
  if (gated_fused_path(s)) return layer_bwd_fused(s, p, g, sums);
  const int64_t B = s.B, H = s.H, P = s.P, G = s.G, S = 4 * H;
  const VecKernels<T>& vk = vec_kernels_for<T>();
  const bool lstm = s.cell == CellKind::kLstm;
  const Steps st{s};
  const int64_t t_max = st.max_len();
  AlignedVector<T> dah_step(size_t(B * G)), carry(size_t(B * P));
  // dL/dm_t of the LSTM without a projection (= dL/dh_t), a row per sequence:
  // allocated once per call, not per step.
  AlignedVector<T> dm_rows(lstm && !s.proj ? size_t(B * H) : 0);
  AlignedVector<T> dh_step(s.proj ? size_t(B * P) : 0), dm(s.proj ? size_t(B * H) : 0);
  // The state a row read at `step` (its value before that step).
  auto prev_row = [&](int64_t step, int64_t b) -> int64_t {
    return step == 0 ? -1 : st.time(step - 1, b) * B + b;
  };
  for (int64_t step = s.T - 1; step >= 0; --step) {
    if (step >= t_max) {
      // Every sequence has ended: the frozen states pass their gradients
      // through, unless a truncation boundary cuts them (as it cuts every
      // state, finished or not).
      if (st.cut_before(step)) {
        std::memset(g.dh, 0, sizeof(T) * B * P);
        if (lstm) std::memset(g.dc, 0, sizeof(T) * B * H);
      }
      continue;
    }
    if (s.proj) {
      // dL/dh_t of the active rows, then dm = dh_t W_hr for all of them at once.
      for (int64_t b = 0; b < B; ++b) {
        T* d = dh_step.data() + b * P;
        if (step >= st.len(b)) {
          std::memset(d, 0, sizeof(T) * P);
          continue;
        }
        const int64_t r = st.time(step, b) * B + b;
        for (int64_t j = 0; j < P; ++j) d[j] = g.grad_out[r * P + j] + g.dh[b * P + j];
        std::memcpy(g.dh_all + r * P, d, sizeof(T) * P);
        if (g.grad_norm) g.grad_norm[r] = norm_of(d, P);
      }
      gemm<T>(false, false, B, H, P, T(1), dh_step.data(), P, p.w_hr, H, T(0), dm.data(), H);
    }
    for_rows(B, G, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        T* dahb = dah_step.data() + b * G;
        if (step >= st.len(b)) {
          // A frozen state passes its gradients through unchanged.
          std::memset(dahb, 0, sizeof(T) * G);
          continue;
        }
        const int64_t r = st.time(step, b) * B + b, pr = prev_row(step, b);
        if (lstm) {
          const T* dmb;
          if (s.proj) {
            dmb = dm.data() + b * H;
          } else {
            T* d = dm_rows.data() + b * H;
            for (int64_t j = 0; j < H; ++j) d[j] = g.grad_out[r * P + j] + g.dh[b * P + j];
            dmb = d;
            if (g.grad_norm) g.grad_norm[r] = norm_of(dmb, H);
          }
          const T* c_prev = pr < 0 ? p.c0 + b * H : p.cell + pr * H;
          vk.lstm_bwd_row(H, p.gates + r * S, p.cell + r * H, c_prev, dmb, g.dc + b * H,
                          g.dax + r * G);
          std::memcpy(dahb, g.dax + r * G, sizeof(T) * G);
        } else {
          T* dhb = g.dh + b * P;  // becomes the direct part of dL/dh_prev
          for (int64_t j = 0; j < H; ++j) dhb[j] += g.grad_out[r * P + j];
          if (g.grad_norm) g.grad_norm[r] = norm_of(dhb, H);
          const T* h_prev = pr < 0 ? p.h0 + b * P : p.out + pr * P;
          vk.gru_bwd_row(H, p.gates + r * S, h_prev, dhb, g.dax + r * G, g.dahn + r * H);
          std::memcpy(dahb, g.dax + r * G, sizeof(T) * 2 * H);
          std::memcpy(dahb + 2 * H, g.dahn + r * H, sizeof(T) * H);
        }
      }
    });
    if (st.cut_before(step)) {
      std::memset(g.dh, 0, sizeof(T) * B * P);
      if (lstm) std::memset(g.dc, 0, sizeof(T) * B * H);
      continue;
    }
    gemm<T>(false, false, B, P, G, T(1), dah_step.data(), G, p.w_hh, P, T(0), carry.data(), P);
    for (int64_t b = 0; b < B; ++b) {
      if (step >= st.len(b)) continue;
      T* dhb = g.dh + b * P;
      const T* cb = carry.data() + b * P;
      if (lstm) std::memcpy(dhb, cb, sizeof(T) * P);
      else
        for (int64_t j = 0; j < P; ++j) dhb[j] += cb[j];
    }
  }
}

// ---------------------------------------------------------------------------
// ATen glue
// ---------------------------------------------------------------------------

at::Tensor empty0(const at::Tensor& like) { return at::empty({0}, like.options()); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_fwd_cpu(
    const at::Tensor& input, const at::Tensor& h0, const c10::optional<at::Tensor>& c0,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const c10::optional<at::Tensor>& bias_ih, const c10::optional<at::Tensor>& bias_hh,
    const c10::optional<at::Tensor>& weight_hr, const c10::optional<at::Tensor>& lengths,
    c10::string_view mode, bool reverse, int64_t truncate, bool train) {
  LayerShape s = check_layer_args("rnnkern.layer_fwd", input, h0, c0, weight_ih, weight_hh,
                                  bias_ih, bias_hh, weight_hr, lengths, mode, reverse, truncate);
  const bool lstm = s.cell == CellKind::kLstm;
  const auto opts = input.options();
  const auto x = dense(input);
  const at::Tensor len = lengths.has_value() ? dense(*lengths) : at::Tensor();
  s.lengths = len.defined() ? len.const_data_ptr<int64_t>() : nullptr;
  // Every operand in the one layout the GEMMs read (a view gives its copy's bits).
  const auto w_ih = dense(weight_ih), w_hh = dense(weight_hh);
  const at::Tensor w_hr = s.proj ? dense(*weight_hr) : at::Tensor();
  const auto hx = dense(h0);
  const at::Tensor cx = lstm ? dense(*c0) : at::Tensor();
  // The LSTM adds both biases before the loop; the GRU's b_hh stays inside r * (.)
  const at::Tensor b_x = lstm ? bias_sum(bias_ih, bias_hh)
                              : (bias_ih.has_value() ? *bias_ih : at::Tensor());
  const at::Tensor b_h = !lstm && bias_hh.has_value() ? dense(*bias_hh) : at::Tensor();

  const bool fuse_x = fused_input(s, int64_t(input.element_size()));
  auto ax = fuse_x ? empty0(input) : big_empty({s.T, s.B, s.G}, opts);  // [T,B,G]
  const at::Tensor b_xc = b_x.defined() ? dense(b_x) : b_x;
  if (s.T * s.B > 0 && !fuse_x) {
    auto ax2 = ax.view({s.T * s.B, s.G});
    small_mm_out(ax2, x.view({s.T * s.B, s.I}), w_ih.t(), b_xc);
  }
  auto out = big_empty({s.T, s.B, s.P}, opts);
  auto h_n = at::empty({s.B, s.P}, opts);
  auto c_n = lstm ? at::empty({s.B, s.H}, opts) : empty0(input);
  // Backward's state. Without train the fused step saves none of it; the
  // step-by-step loop uses gates and cell as its scratch.
  const bool state = train || !gated_fused_path(s);
  auto gates = state ? big_empty({s.T, s.B, 4 * s.H}, opts) : empty0(input);
  auto cell = lstm && state ? big_empty({s.T, s.B, s.H}, opts) : empty0(input);
  // Zero at padded steps (written by no step): dW_hr multiplies all of it.
  auto proj_in = s.proj ? big_zeros({s.T, s.B, s.H}, opts) : empty0(input);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "layer_fwd", [&] {
    LayerPtrs<scalar_t> p{};
    p.ax = fuse_x ? nullptr : ax.const_data_ptr<scalar_t>();
    p.fused_x = fuse_x;
    p.x = x.const_data_ptr<scalar_t>();
    p.w_ih = w_ih.const_data_ptr<scalar_t>();
    p.b_x = fuse_x && b_xc.defined() ? b_xc.const_data_ptr<scalar_t>() : nullptr;
    p.b_hh = b_h.defined() ? b_h.const_data_ptr<scalar_t>() : nullptr;
    p.w_hh = w_hh.const_data_ptr<scalar_t>();
    p.w_hr = s.proj ? w_hr.const_data_ptr<scalar_t>() : nullptr;
    p.h0 = hx.const_data_ptr<scalar_t>();
    p.c0 = lstm ? cx.const_data_ptr<scalar_t>() : nullptr;
    p.out = out.data_ptr<scalar_t>();
    p.gates = state ? gates.data_ptr<scalar_t>() : nullptr;
    p.cell = lstm && state ? cell.data_ptr<scalar_t>() : nullptr;
    p.proj_in = s.proj ? proj_in.data_ptr<scalar_t>() : nullptr;
    layer_fwd_kernel(s, p, h_n.data_ptr<scalar_t>(), lstm ? c_n.data_ptr<scalar_t>() : nullptr);
  });
  if (!train) return {out, h_n, c_n, empty0(input), empty0(input), empty0(input)};
  return {out, h_n, c_n, gates, cell, proj_in};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
layer_bwd_cpu(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
              const c10::optional<at::Tensor>& grad_c_n, const at::Tensor& input,
              const at::Tensor& h0, const c10::optional<at::Tensor>& c0,
              const at::Tensor& weight_ih, const at::Tensor& weight_hh,
              const c10::optional<at::Tensor>& weight_hr, const at::Tensor& output,
              const at::Tensor& gates, const at::Tensor& cell, const at::Tensor& proj_in,
              const c10::optional<at::Tensor>& lengths, c10::string_view mode, bool reverse,
              int64_t truncate, bool grad_input, bool want_grad_norm) {
  const char* op = "rnnkern.layer_bwd";
  LayerShape s = check_layer_args(op, input, h0, c0, weight_ih, weight_hh, c10::nullopt,
                                  c10::nullopt, weight_hr, lengths, mode, reverse, truncate);
  check_layer_bwd_args(op, s, input, grad_output, grad_h_n, grad_c_n, output, gates, cell,
                       proj_in);
  const bool lstm = s.cell == CellKind::kLstm;
  const int64_t T = s.T, B = s.B, I = s.I, H = s.H, P = s.P, G = s.G;
  const auto opts = input.options();
  const auto x = dense(input);
  const at::Tensor len = lengths.has_value() ? dense(*lengths) : at::Tensor();
  s.lengths = len.defined() ? len.const_data_ptr<int64_t>() : nullptr;
  const auto w_ih = dense(weight_ih), w_hh = dense(weight_hh);
  const at::Tensor w_hr = s.proj ? dense(*weight_hr) : at::Tensor();
  const auto hx = dense(h0);
  const at::Tensor cx = lstm ? dense(*c0) : at::Tensor();
  const auto out = dense(output), g_out = dense(grad_output);
  const auto gts = dense(gates), cl = dense(cell), pin = dense(proj_in);

  auto dh = dense(grad_h_n).clone();                              // [B,P] -> dL/dh0
  auto dc = lstm ? dense(*grad_c_n).clone() : empty0(input);      // [B,H] -> dL/dc0
  // dax and dahn must be zero where no step writes them: the steps a sequence
  // does not reach. Without lengths every step writes every row, so a [T,B,G]
  // fill would be dead work (tests/test_uninitialized.py holds both cases).
  const auto grads_of_steps = [&](int64_t n) {
    return s.lengths ? big_zeros({T, B, n}, opts) : big_empty({T, B, n}, opts);
  };
  auto dax = grads_of_steps(G);                                             // [T,B,G]
  auto dahn = lstm ? empty0(input) : grads_of_steps(H);                     // [T,B,H] GRU
  auto dh_all = s.proj ? big_zeros({T, B, P}, opts) : empty0(input);        // [T,B,P]
  auto grad_norm = want_grad_norm ? at::zeros({T, B}, opts) : empty0(input);  // [T,B]
  // The parameter gradients' row sums inside the loop where it takes them.
  const bool in_loop = gated_row_sums_in_loop(s);
  const at::Tensor x_finite = finite_padding(x, s.lengths);  // [T,B,I]
  at::Tensor g_w_ih, g_b_ih, loop_b_hn;
  auto g_w_hh = at::empty({G, P}, opts);
  if (in_loop) {
    g_w_ih = at::empty({G, I}, opts);
    g_b_ih = at::empty({G}, opts);
    loop_b_hn = lstm ? empty0(input) : at::empty({H}, opts);
  }
  if (T * B > 0) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "layer_bwd", [&] {
      LayerPtrs<scalar_t> p{};
      p.w_hh = w_hh.const_data_ptr<scalar_t>();
      p.w_hr = s.proj ? w_hr.const_data_ptr<scalar_t>() : nullptr;
      p.h0 = hx.const_data_ptr<scalar_t>();
      p.c0 = lstm ? cx.const_data_ptr<scalar_t>() : nullptr;
      p.out = const_cast<scalar_t*>(out.const_data_ptr<scalar_t>());
      p.gates = const_cast<scalar_t*>(gts.const_data_ptr<scalar_t>());
      p.cell = lstm ? const_cast<scalar_t*>(cl.const_data_ptr<scalar_t>()) : nullptr;
      LayerGradPtrs<scalar_t> gp{};
      gp.grad_out = g_out.const_data_ptr<scalar_t>();
      gp.dh = dh.data_ptr<scalar_t>();
      gp.dc = lstm ? dc.data_ptr<scalar_t>() : nullptr;
      gp.dax = dax.data_ptr<scalar_t>();
      gp.dahn = lstm ? nullptr : dahn.data_ptr<scalar_t>();
      gp.dh_all = s.proj ? dh_all.data_ptr<scalar_t>() : nullptr;
      gp.grad_norm = want_grad_norm ? grad_norm.data_ptr<scalar_t>() : nullptr;
      LayerRowSums<scalar_t> rs{};
      if (in_loop) {
        rs.w_hh = g_w_hh.data_ptr<scalar_t>();
        rs.w_ih = g_w_ih.data_ptr<scalar_t>();
        rs.b_ih = g_b_ih.data_ptr<scalar_t>();
        rs.b_hn = lstm ? nullptr : loop_b_hn.data_ptr<scalar_t>();
        rs.x = x_finite.const_data_ptr<scalar_t>();
      }
      layer_bwd_kernel(s, p, gp, in_loop ? &rs : nullptr);
    });
  }
  const auto dax2 = dax.view({T * B, G});
  auto g_in = empty0(input);
  if (grad_input) {
    g_in = big_empty({T, B, I}, opts);
    auto gi2 = g_in.view({T * B, I});
    small_mm_out(gi2, dax2, w_ih);
  }
  if (!in_loop) {
    g_w_ih = at::empty({G, I}, opts);
    atb_out(g_w_ih, dax2, x_finite.view({T * B, I}), false);
    g_b_ih = at::zeros({G}, opts);
    add_column_sums(g_b_ih, dax2);
  }
  // dah = dax but for the GRU's n columns, which are dahn: b_hh's and W_hh's
  // gradients take their r, z rows from dax and their n rows from dahn.
  at::Tensor g_b_hh = g_b_ih;
  if (!lstm) {
    g_b_hh = at::empty({G}, opts);
    g_b_hh.narrow(0, 0, 2 * H).copy_(g_b_ih.narrow(0, 0, 2 * H));
    auto n_rows = g_b_hh.narrow(0, 2 * H, H);
    if (in_loop) {
      n_rows.copy_(loop_b_hn);
    } else {
      n_rows.zero_();
      add_column_sums(n_rows, dahn.view({T * B, H}));
    }
  }
  // dW_hh = sum_t dah_t^T h_prev(t): h0 at each sequence's first processed
  // step, the neighbouring step's output otherwise (0 at padded times, whose
  // dah is 0 too). rows: dW_hh's rows for dah's columns src [T*B, n].
  // With in_loop, rows already hold their sums over every step but the first.
  auto add_w_hh = [&](at::Tensor rows, const at::Tensor& src) {
    const int64_t n = src.size(1);
    at::Tensor first;
    if (T == 0) {
      first = at::zeros({B, n}, opts);
    } else if (s.reverse && s.lengths) {
      first = at::zeros({B, n}, opts);
      for (int64_t b = 0; b < B; ++b)
        if (s.lengths[b] > 0) first[b].copy_(src[(s.lengths[b] - 1) * B + b]);
    } else {
      first = src.narrow(0, (s.reverse ? T - 1 : 0) * B, B);
    }
    // Skipped when exactly zero (elman_cpu.h vanishing_atb).
    const bool with_first = !vanishing_atb(first, hx);
    if (in_loop) {
      if (with_first) {
        auto term = at::empty_like(rows);
        atb_out(term, first, hx, false);
        rows.add_(term);
      }
      return;
    }
    if (with_first) atb_out(rows, first, hx, false);
    if (T > 1) {
      const auto rest = src.narrow(0, (s.reverse ? 0 : 1) * B, (T - 1) * B);
      const auto h_prev = s.reverse ? out.narrow(0, 1, T - 1) : out.narrow(0, 0, T - 1);
      atb_out(rows, rest, h_prev.reshape({(T - 1) * B, P}), with_first);
    } else if (!with_first) {
      rows.zero_();
    }
  };
  if (lstm) {
    add_w_hh(g_w_hh, dax2);
  } else {
    add_w_hh(g_w_hh.narrow(0, 0, 2 * H), dax2.narrow(1, 0, 2 * H));
    add_w_hh(g_w_hh.narrow(0, 2 * H, H), dahn.view({T * B, H}));
  }
  auto g_w_hr = empty0(input);
  if (s.proj) {
    g_w_hr = at::empty({P, H}, opts);
    atb_out(g_w_hr, dh_all.view({T * B, P}), pin.view({T * B, H}), false);
  }
  return {g_in, dh, dc, g_w_ih, g_w_hh, g_b_ih, g_b_hh.clone(), g_w_hr, grad_norm};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnkern, CPU, m) {
  m.impl("layer_fwd", &layer_fwd_cpu);
  m.impl("layer_bwd", &layer_bwd_cpu);
}

}  // namespace rnnkern::cpu
