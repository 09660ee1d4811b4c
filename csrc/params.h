// Plain structs between the ATen glue and the kernels: pointers and sizes only,
// so a kernel never sees an at::Tensor. Every pointer is to contiguous memory
// in the layout given beside it.
#pragma once

#include <cstdint>

#include "cells/elman.h"

namespace rnnkern {

// What a layer's time loop needs to know, whatever the dtype.
struct ElmanShape {
  int64_t T = 0, B = 0, I = 0, H = 0;
  Activation act = Activation::kTanh;
  // Run each sequence from its last valid step back to step 0 (the reverse
  // direction of a bidirectional layer). Step s of sequence b then reads time
  // t = len_b - 1 - s; otherwise t = s.
  bool reverse = false;
  // Truncated BPTT: cut the gradient through h between steps jK-1 and jK,
  // counted in processing order from step 0. 0 means no truncation.
  int64_t truncate = 0;
  const int64_t* lengths = nullptr;  // [B], 0 <= len <= T; nullptr: all T
};

template <typename scalar_t>
struct ElmanFwdParams {
  ElmanShape shape;
  const scalar_t* h0;    // [B,H]
  const scalar_t* w_hh;  // [H,H]
  scalar_t* out;         // [T,B,H] holds x W_ih^T + b on entry, every h_t on exit
  scalar_t* h_n;         // [B,H]
  scalar_t* state;       // [B,H] scratch, used with lengths only
  scalar_t* gemm;        // [B,H] scratch, used with lengths only
  // Where the backend projects the input step by step inside the loop (CPU:
  // elman_cpu.cpp projection_in_loop), out holds nothing on entry and these
  // are set, else nullptr: x [T,B,I], W_ih^T packed [I,NP] and the bias [NP]
  // (or nullptr) as the backend's row product reads them.
  const scalar_t* x = nullptr;
  const scalar_t* w_x = nullptr;
  const scalar_t* b_x = nullptr;
  int64_t np_x = 0;
};

template <typename scalar_t>
struct ElmanBwdParams {
  ElmanShape shape;
  const scalar_t* w_hh;      // [H,H]
  const scalar_t* out;       // [T,B,H] every h_t from forward
  const scalar_t* grad_out;  // [T,B,H] dL/dh_t from outside the recurrence
  scalar_t* carry;           // [B,H] holds dL/dh_n on entry, dL/dh0 on exit
  scalar_t* grad_z;          // [T,B,H] dL/dz_t on exit; zero where t >= len_b
  scalar_t* grad_z_first;    // [B,H] dL/dz at each sequence's first processed step
  scalar_t* gemm;            // [B,H] scratch
  scalar_t* grad_h_norm;     // [T,B] ||dL/dh_t|| per sequence (0 where t >= len_b), or nullptr
  // The parameter gradients' sums over the rows, taken inside the fused time
  // loop where the backend does (CPU: elman_cpu.cpp row_sums_in_loop), else
  // nullptr: dW_hh's terms of every step but each sequence's first (h0's),
  // dW_ih = sum dz^T x over x (x [T,B,I], padded rows finite) and db.
  scalar_t* sum_w_hh = nullptr;  // [H,H]
  scalar_t* sum_w_ih = nullptr;  // [H,I]
  scalar_t* sum_b = nullptr;     // [H]
  const scalar_t* x = nullptr;   // [T,B,I]
};

// One layer of a gated cell (LSTM or GRU), whatever the dtype.
//   G gate rows (4H LSTM, 3H GRU); P the size of the emitted h (H, or the
//   LSTM's proj_size); S the saved activations per unit block (4H for both).
enum class CellKind { kLstm, kGru };

struct LayerShape {
  int64_t T = 0, B = 0, I = 0, H = 0, P = 0, G = 0;
  CellKind cell = CellKind::kLstm;
  bool proj = false;     // LSTM with weight_hr (P = proj_size)
  bool reverse = false;  // as ElmanShape::reverse
  int64_t truncate = 0;  // as ElmanShape::truncate
  const int64_t* lengths = nullptr;  // [B], 0 <= len <= T; nullptr: all T
};

}  // namespace rnnkern
