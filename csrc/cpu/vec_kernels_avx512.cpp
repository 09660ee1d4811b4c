// The AVX512 copy of vec_kernels_impl.h.
// Headers that must not be compiled for this instruction set come first, so
// their inline functions keep the baseline ISA; only ATen's vector classes
// (in their own CPU_CAPABILITY namespace) and our kernels are built for AVX512.
#if defined(__x86_64__)
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/complex.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/Load.h>
#include <c10/util/TypeCast.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>
#include <algorithm>
#include <cmath>
#include <functional>

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
// GCC's target pragma does not define the ISA macros that sleef.h and ATen's
// headers test, so they are defined here to match it.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define RNNKERN_CAP AVX512
#include "vec_kernels_impl.h"

RNNKERN_DEFINE_VEC_KERNELS(AVX512)
#else
// Not an x86-64 build: this capability does not exist, use the portable copy.
#include "vec_kernels.h"
namespace rnnkern::cpu {
VecKernelTable vec_kernels_AVX512() { return vec_kernels_DEFAULT(); }
}  // namespace rnnkern::cpu
#endif
