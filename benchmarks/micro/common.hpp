#pragma once
// What the micro-benchmarks share.

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

}  // namespace xax_bench
