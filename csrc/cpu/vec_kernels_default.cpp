// The DEFAULT copy of vec_kernels_impl.h.
// Headers that must not be compiled for this instruction set come first, so
// their inline functions keep the baseline ISA; only ATen's vector classes
// (in their own CPU_CAPABILITY namespace) and our kernels are built for DEFAULT.
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/complex.h>
#include <algorithm>
#include <cmath>
#include <functional>

#define CPU_CAPABILITY DEFAULT

#define RNNKERN_CAP DEFAULT
#include "vec_kernels_impl.h"

RNNKERN_DEFINE_VEC_KERNELS(DEFAULT)
