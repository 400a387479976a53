#pragma once
// Every xax header includes Eigen through this file, so that Eigen's fp16 conversions are configured first.
//
// Eigen 3.4 enables its F16C conversions with
//   #if defined(__F16C__) && (... (!defined(EIGEN_COMP_CLANG) || EIGEN_COMP_CLANG>=380))
// but EIGEN_COMP_CLANG is always defined (to 0 under GCC), so GCC never gets EIGEN_HAS_FP16_C and every
// Eigen::half conversion runs a ~20-instruction software routine (0.33 GFLOP/s half GEMM instead of 13.6).
// Defining the macro ourselves when the target has F16C restores the hardware path without asking users for
// anything. If Eigen was already included before xax, it is too late for Eigen's own inline functions; xax's
// own conversion kernels (xax/ops/convert.hpp) do not depend on this and are fast either way.
#if defined(__F16C__) && defined(__GNUC__) && !defined(__clang__) && !defined(EIGEN_HAS_FP16_C) && \
    !defined(EIGEN_CORE_H)
#define EIGEN_HAS_FP16_C
#include <immintrin.h>
#endif

#include <Eigen/Core>
