#pragma once
// Two independent pieces of work side by side, one thread each.
//
// The backward pass of a Linear layer has two independent products, dW = dz x^T and dx = w^T dz. On two
// threads, running each on one thread at the same time beats running each on both threads in turn: every
// product then runs at single-thread efficiency and nobody waits at a barrier between the halves (measured
// ~15 % faster for 512x512x256 bf16 on two cores). With more threads the work would have to nest, which
// oneDNN does not do, so it runs one piece after the other there, each on every thread.

#include <exception>
#include <xax/utils/threads.hpp>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace xax::detail {

/// Calls `first()` and `second()`, concurrently when xax has exactly two threads and is not already inside
/// a parallel region. An exception from either is rethrown after both have finished.
template <class First, class Second>
void run_side_by_side(First&& first, Second&& second) {
#if defined(_OPENMP)
  if (num_threads() == 2 && omp_in_parallel() == 0) {
    std::exception_ptr errors[2];
#pragma omp parallel num_threads(2)
    {
      const int index = omp_get_thread_num();
      try {
        if (index == 0) {
          first();
          // The runtime may grant fewer threads than asked for; then this thread does both.
          if (omp_get_num_threads() == 1) second();
        } else if (index == 1) {
          second();
        }
      } catch (...) {
        errors[index] = std::current_exception();
      }
    }
    for (const std::exception_ptr& error : errors) {
      if (error) std::rethrow_exception(error);
    }
    return;
  }
#endif
  first();
  second();
}

}  // namespace xax::detail
