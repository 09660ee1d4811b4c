// Row-major GEMM for the CPU time loops: MKL's Fortran BLAS called directly
// (no trip through the dispatcher, which costs as much as a small step), or
// ATen's addmm where torch was built without MKL.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Config.h>

#include <cstdint>
#include <type_traits>

#if AT_MKL_ENABLED()
// libtorch_cpu exports MKL's Fortran BLAS symbols (LP64: 32-bit integers; the
// ops' checks bound every size below 2^31).
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc);
}
#endif

namespace rnnkern::cpu {

// Row-major C[m,n] = alpha * op(A)[m,k] op(B)[k,n] + beta * C.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
          int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
#if AT_MKL_ENABLED()
  // Column-major BLAS sees C^T = op(B)^T op(A)^T.
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int mi = int(m), ni = int(n), ki = int(k);
  const int la = int(lda), lb = int(ldb), lc = int(ldc);
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&tb, &ta, &ni, &mi, &ki, &alpha, b, &lb, a, &la, &beta, c, &lc);
  } else {
    dgemm_(&tb, &ta, &ni, &mi, &ki, &alpha, b, &lb, a, &la, &beta, c, &lc);
  }
#else
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor A = at::from_blob(const_cast<T*>(a), {trans_a ? k : m, trans_a ? m : k}, {lda, 1}, opts);
  at::Tensor Bm = at::from_blob(const_cast<T*>(b), {trans_b ? n : k, trans_b ? k : n}, {ldb, 1}, opts);
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::addmm_out(C, C, trans_a ? A.t() : A, trans_b ? Bm.t() : Bm, beta, alpha);
#endif
}

}  // namespace rnnkern::cpu
