// Attention's batched products at the character-level GPT's shapes (head 32, block 64, 48 = batch 12 x 4
// heads slices), through xax::batched_matmul (one 3-D oneDNN primitive where the dispatch allows it) next to
// one xax::matmul per slice (what batched_matmul did before issue 14's batched primitive), on one thread:
//
//     xax_micro_benchmarks --benchmark_filter='^AttentionMatmul/' --benchmark_repetitions=7
//         --benchmark_enable_random_interleaving=true --benchmark_report_aggregates_only=true
//
// Names: AttentionMatmul/<dtype>/<product>/<path>; <product> is one of the four products of an attention
// layer's forward and backward (scores = K^T Q, y = V P, dV = dY P^T, dP = V^T dY), <path> is `batched` or
// `per_slice`. Counters: FLOPS (a rate). The label is the kernel that ran.
#include <benchmark/benchmark.h>

#include "micro/common.hpp"

#include <cstdint>
#include <random>
#include <string>
#include <xax/ops/batched_matmul.hpp>
#include <xax/ops/matmul.hpp>
#include <xax/utils/dtype.hpp>

namespace {

template <class T>
using Tensor3 = Eigen::Tensor<T, 3>;

template <class T>
Tensor3<T> normal_tensor(Eigen::Index rows, Eigen::Index cols, Eigen::Index batch, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Tensor3<T> t(rows, cols, batch);
  for (Eigen::Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<T>(normal(rng));
  return t;
}

struct AttentionProduct {
  const char* name;
  Eigen::Index a_rows, a_cols, b_rows, b_cols;
  bool transpose_a, transpose_b;
};

constexpr Eigen::Index head = 32, block = 64, slices = 48;
constexpr AttentionProduct products[] = {
    {"scores_KtQ", head, block, head, block, true, false},
    {"y_VP", head, block, block, block, false, false},
    {"dV_dYPt", head, block, block, block, false, true},
    {"dP_VtdY", head, block, head, block, true, false},
};

template <class T>
void run_attention_product(benchmark::State& state, const AttentionProduct& p, bool batched) {
  const xax_bench::ThreadScope scope(1);
  const Tensor3<T> a = normal_tensor<T>(p.a_rows, p.a_cols, slices, 1);
  const Tensor3<T> b = normal_tensor<T>(p.b_rows, p.b_cols, slices, 2);
  const Eigen::Index m = p.transpose_a ? p.a_cols : p.a_rows, k = p.transpose_a ? p.a_rows : p.a_cols;
  const Eigen::Index n = p.transpose_b ? p.b_rows : p.b_cols;
  Tensor3<T> c(m, n, slices);
  const xax::MatmulOptions options{.transpose_a = p.transpose_a, .transpose_b = p.transpose_b};
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  const auto run = [&] {
    if (batched) {
      xax::batched_matmul(a, b, c, options);
      return;
    }
    for (Eigen::Index i = 0; i < slices; ++i) {
      const Eigen::Map<const Matrix> a_slice(a.data() + i * p.a_rows * p.a_cols, p.a_rows, p.a_cols);
      const Eigen::Map<const Matrix> b_slice(b.data() + i * p.b_rows * p.b_cols, p.b_rows, p.b_cols);
      Eigen::Map<Matrix> c_slice(c.data() + i * m * n, m, n);
      xax::matmul(a_slice, b_slice, c_slice, options);
    }
  };
  run();  // creates the primitives
  state.SetLabel(xax::last_matmul_implementation());
  for (auto _ : state) {
    run();
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  state.counters["FLOPS"] = benchmark::Counter(2.0 * static_cast<double>(m * n * k * slices),
                                               benchmark::Counter::kIsIterationInvariantRate);
}

template <class T>
void register_dtype() {
  for (const AttentionProduct& p : products) {
    for (const bool batched : {true, false}) {
      const std::string name = std::string("AttentionMatmul/") +
                               std::string(xax::dtype_name(xax::dtype_of<T>)) + "/" + p.name + "/" +
                               (batched ? "batched" : "per_slice");
      benchmark::RegisterBenchmark(name.c_str(), [&p, batched](benchmark::State& state) {
        run_attention_product<T>(state, p, batched);
      })->Unit(benchmark::kMicrosecond);
    }
  }
}

[[maybe_unused]] const bool attention_registered = [] {
  register_dtype<float>();
  register_dtype<xax::bfloat16>();
  return true;
}();

}  // namespace
