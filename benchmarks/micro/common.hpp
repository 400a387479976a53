#pragma once
// What the micro-benchmarks share.

#include <cstdio>
#include <cstdlib>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/threads.hpp>

namespace xax_bench {

/// Sets xax's compute threads (the threads inside one operation, not Google Benchmark's ->Threads()) for
/// one benchmark and restores the previous count afterwards.
class ThreadScope {
 public:
  explicit ThreadScope(int threads) : previous_(xax::num_threads()) { xax::set_num_threads(threads); }
  ~ThreadScope() { xax::set_num_threads(previous_); }
  ThreadScope(const ThreadScope&) = delete;
  ThreadScope& operator=(const ThreadScope&) = delete;

 private:
  int previous_;
};

/// xax::half_dtype() for code that registers benchmarks before main: a bad XAX_MAX_CPU_ISA must end the
/// program with its message rather than std::terminate's.
inline xax::DType registration_half_dtype() {
  try {
    return xax::half_dtype();
  } catch (const xax::Error& error) {
    std::fprintf(stderr, "%s\n", error.what());
    std::exit(2);  // NOLINT(concurrency-mt-unsafe): before main, single-threaded
  }
}

}  // namespace xax_bench
