// The optimizer update, the step's largest memory-bound pass, next to a hand-written streaming pass over the
// same bytes: AdamW with fp32 masters reads param, grad, m and v and writes param, m, v and the bf16 compute
// copy (30 bytes per parameter), whatever the compute precision. Two sizes: the benchmark MLP's 0.67 M
// parameters (its step, 20 MB of traffic, runs mostly from L2/L3) and 16 Mi parameters (480 MB, from memory).
//
//     xax_micro_benchmarks --benchmark_filter='AdamWUpdate|StreamingUpdate' --benchmark_repetitions=7
//                          --benchmark_enable_random_interleaving=true
//                          --benchmark_report_aggregates_only=true
//
// AdamWUpdate / StreamingUpdate at the same size and threads is how far the update is from the memory (or
// cache) speed floor (issue 12, point 4). Both pass over leaves of the same sizes, so the split across
// threads and the per-leaf overhead are comparable.
#include <benchmark/benchmark.h>

#include "micro/common.hpp"

#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <vector>
#include <xax/optim/adamw.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/tree.hpp>
#include <xax/utils/tree_cast.hpp>

namespace {

template <class T>
using Leaves = std::vector<Eigen::Matrix<T, Eigen::Dynamic, 1>>;

// The MLP 784-512-512-10's leaves (weights and biases), and 16 leaves of 1 Mi.
Leaves<float> mlp_shaped() {
  Leaves<float> leaves;
  for (const Eigen::Index size : {784 * 512, 512, 512 * 512, 512, 512 * 10, 10}) {
    leaves.emplace_back(Eigen::VectorXf::Constant(size, 0.5f));
  }
  return leaves;
}

Leaves<float> large() {
  return Leaves<float>(16, Eigen::VectorXf::Constant(Eigen::Index{1} << 20, 0.5f));
}

Leaves<float> shaped(std::int64_t which) {
  return which == 0 ? mlp_shaped() : large();
}

std::int64_t element_count(const Leaves<float>& leaves) {
  std::int64_t count = 0;
  for (const auto& leaf : leaves) count += leaf.size();
  return count;
}

// param, grad, m, v read (16 bytes); param, m, v written (12) and the bf16 copy written (2).
constexpr std::int64_t bytes_per_parameter = 30;

using xax_bench::ThreadScope;

void AdamWUpdate(benchmark::State& state) {
  const ThreadScope threads(static_cast<int>(state.range(1)));
  Leaves<float> params = shaped(state.range(0));
  const Leaves<float> grads = [&] {
    Leaves<float> g = params;
    for (auto& leaf : g) leaf.setConstant(1e-3f);
    return g;
  }();
  Leaves<xax::bfloat16> copy = xax::tree_cast<xax::bfloat16>(params);
  // No weight decay and a tiny rate keep the values in range over any number of iterations.
  xax::optim::AdamW<Leaves<float>> adamw(params, {.learning_rate = 1e-9, .weight_decay = 0.0});
  for (auto _ : state) {
    adamw.step(params, grads, copy);
    benchmark::DoNotOptimize(params.front().data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * element_count(params) * bytes_per_parameter);
}

// The floor: the same four reads and four writes per element with the least arithmetic that keeps every
// stream live, split into one contiguous block per thread like xax's passes.
void StreamingUpdate(benchmark::State& state) {
  const int thread_count = static_cast<int>(state.range(1));
  Leaves<float> params = shaped(state.range(0));
  Leaves<float> grads = params;
  Leaves<float> m = params;
  Leaves<float> v = params;
  Leaves<std::uint16_t> copy(params.size());
  for (std::size_t l = 0; l < params.size(); ++l) copy[l].setZero(params[l].size());
  float factor = 0.5f;
  for (auto _ : state) {
    for (std::size_t l = 0; l < params.size(); ++l) {
      float* p = params[l].data();
      const float* g = grads[l].data();
      float* ml = m[l].data();
      float* vl = v[l].data();
      std::uint16_t* c = copy[l].data();
      const Eigen::Index n = params[l].size();
#if defined(_OPENMP)
#pragma omp parallel for num_threads(thread_count) schedule(static) if (n >= 65536)
#endif
      for (Eigen::Index i = 0; i < n; ++i) {
        const float updated = p[i] * factor + g[i];
        p[i] = updated;
        ml[i] = ml[i] * factor + g[i];
        vl[i] = vl[i] * factor + g[i];
        c[i] = static_cast<std::uint16_t>(std::bit_cast<std::uint32_t>(updated) >> 16);
      }
    }
    benchmark::DoNotOptimize(params.front().data());
    benchmark::ClobberMemory();
    factor = factor == 0.5f ? 2.0f : 0.5f;
  }
  static_cast<void>(thread_count);
  state.SetBytesProcessed(state.iterations() * element_count(params) * bytes_per_parameter);
}

void sizes_and_threads(benchmark::internal::Benchmark* b) {
  b->ArgNames({"size", "threads"});
  for (const std::int64_t size : {0, 1}) {
    for (const std::int64_t threads : {1, 2}) b->Args({size, threads});
  }
  b->Unit(benchmark::kMicrosecond)->UseRealTime();
}

BENCHMARK(AdamWUpdate)->Apply(sizes_and_threads);
BENCHMARK(StreamingUpdate)->Apply(sizes_and_threads);

}  // namespace
