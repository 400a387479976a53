#pragma once
/// \file
/// The number of compute threads xax uses inside one operation (GEMMs, conversions, fused passes).
///
/// It is one count for the whole process. OpenMP keeps its default thread count per thread (the nthreads-var
/// ICV: omp_set_num_threads() changes only the calling thread's, and threads started later, e.g. a
/// std::thread, begin with OMP_NUM_THREADS or the CPU count), while Eigen keeps one global count. So xax
/// keeps its own process-wide count and hands it explicitly to everything it runs, from whichever thread it
/// runs on:
/// - xax's own parallel passes open their OpenMP regions with `num_threads(xax::num_threads())`;
/// - Eigen's GEMM reads Eigen::nbThreads(), which set_num_threads() sets (a global);
/// - oneDNN (Debian's build uses OpenMP) sizes a primitive from the calling thread's omp_get_max_threads(),
///   which xax's oneDNN backend sets to the count around each primitive it creates or runs.
/// set_num_threads() also sets the calling thread's OpenMP default, so the caller's own `#pragma omp
/// parallel` regions follow it; other threads' OpenMP defaults are theirs to set.

#include <xax/detail/eigen.hpp>

#include <algorithm>
#include <atomic>
#include <string>
#include <xax/utils/error.hpp>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace xax {

/// The most threads xax runs an operation on. No CPU xax targets has more hardware threads, and an OpenMP
/// team far larger overflows the stack of the thread that forks it (libgomp keeps each member's start data
/// there: OMP_NUM_THREADS=100000 crashed inside GOMP_parallel).
inline constexpr int max_num_threads = 1024;

namespace detail {
/// The count set_num_threads() chose, or 0 before the first call.
inline std::atomic<int>& configured_num_threads() {
  static std::atomic<int> count{0};
  return count;
}
}  // namespace detail

/// The thread count xax operations use, on every thread: set_num_threads()'s value, or before any call the
/// OpenMP default (OMP_NUM_THREADS, else the CPUs this process may use) capped at max_num_threads, as
/// OMP_THREAD_LIMIT caps a team (that default is read from every thread, where no error can be thrown
/// safely). 1 without OpenMP.
inline int num_threads() {
#if defined(_OPENMP)
  const int configured = detail::configured_num_threads().load(std::memory_order_relaxed);
  return configured > 0 ? configured : std::min(omp_get_max_threads(), max_num_threads);
#else
  return 1;
#endif
}

/// Sets the compute threads of every xax operation, on every thread, and Eigen's (a global count); see the
/// file comment for oneDNN and OpenMP. Throws ConfigError for a count below 1 or above max_num_threads.
/// Without OpenMP every operation is single-threaded and only 1 is accepted.
inline void set_num_threads(int threads) {
  if (threads < 1 || threads > max_num_threads) {
    throw ConfigError("thread count " + std::to_string(threads) + " is not accepted; give 1 to " +
                      std::to_string(max_num_threads));
  }
#if defined(_OPENMP)
  detail::configured_num_threads().store(threads, std::memory_order_relaxed);
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
