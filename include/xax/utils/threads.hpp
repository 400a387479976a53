#pragma once
/// \file
/// The number of compute threads xax uses inside one operation (GEMMs, conversions, fused passes).
///
/// xax parallelises with OpenMP when the translation unit is built with it (the CMake target links OpenMP
/// where found), and Eigen's GEMM and oneDNN (Debian's build uses OpenMP) follow the same setting.

#include <xax/detail/eigen.hpp>

#include <string>
#include <xax/utils/error.hpp>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace xax {

/// The thread count xax operations use: set_num_threads()'s value, or the OpenMP default when never set.
inline int num_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

/// Sets the compute threads for xax, Eigen and oneDNN. Throws ConfigError for a count below 1. Without OpenMP
/// every operation is single-threaded and only 1 is accepted.
inline void set_num_threads(int threads) {
  if (threads < 1) {
    throw ConfigError("thread count " + std::to_string(threads) + " is not accepted; give 1 or more");
  }
#if defined(_OPENMP)
  omp_set_num_threads(threads);
  Eigen::setNbThreads(threads);
#else
  if (threads != 1) {
    throw ConfigError("thread count " + std::to_string(threads) +
                      " needs OpenMP, which this build of xax does not have; give 1, or build with OpenMP");
  }
#endif
}

}  // namespace xax
