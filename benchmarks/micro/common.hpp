#pragma once
// What the micro-benchmarks share.

#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <xax/ops/matmul.hpp>
#include <xax/task/train_step.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/threads.hpp>

namespace xax_bench {

/// A rows x cols matrix of N(0, 1) samples rounded to T, deterministic in `seed`.
template <class T>
Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> normal_matrix(Eigen::Index rows, Eigen::Index cols,
                                                               std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(normal(rng));
  return m;
}

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

/// Times `trainer.train_step(batch)` over the benchmark's iterations after one untimed step (which sizes
/// every buffer and creates every primitive), and sets the loss and skipped-step counters. Returns the matmul
/// implementation the untimed step used, for the label.
template <class Trainer, class Batch>
std::string time_train_steps(benchmark::State& state, Trainer& trainer, const Batch& batch) {
  xax::StepResult result = trainer.train_step(batch);
  std::string implementation = xax::last_matmul_implementation();
  for (auto _ : state) {
    result = trainer.train_step(batch);
    benchmark::ClobberMemory();
  }
  state.counters["loss"] = result.loss;
  state.counters["skipped"] = static_cast<double>(trainer.skipped_steps());
  return implementation;
}

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
