// Square matmuls C = A B (n x n x n) from float, bfloat16 and float16 inputs into a float output, with fp32
// accumulation, on the backend xax::matmul picks, next to Eigen's own float GEMM and the portable Eigen
// fallback for bf16 (the 1.1x claim):
//
//     xax_micro_benchmarks --benchmark_filter='^Matmul/'
//         --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
//
// Names: Matmul/<dtype>/<n>/threads:<t>, where <t> is xax::set_num_threads() (the threads inside one product,
// not Google Benchmark's ->Threads()). <dtype> is float32, bfloat16 or float16 on the default backend;
// eigen_float32 is Eigen's `C.noalias() = A * B` on MatrixXf, untouched by xax; eigen_fallback_bfloat16 is
// xax's portable backend on bf16 inputs (widen, Eigen float GEMM).
//
// Counters: FLOPS (2 n^3 per iteration, a rate), rel_error = ||C - C_ref||_F / ||C_ref||_F against a double
// product of the same (already rounded) inputs, i.e. the error of the accumulation and output rounding.
// The label is the kernel that ran (xax::last_matmul_implementation()).
// Targets (PERFORMANCE.md): bfloat16 at n = 1024 >= 195 GFLOP/s per thread with rel_error <= 2e-3 on
// AVX512_BF16 CPUs; eigen_fallback_bfloat16 within 1.1x of eigen_float32.
#include <benchmark/benchmark.h>

#include "micro/common.hpp"

#include <string>
#include <xax/ops/matmul.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/threads.hpp>

namespace {

template <class T>
using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;

using xax_bench::ThreadScope;

template <class T>
Eigen::MatrixXd to_double(const Matrix<T>& m) {
  Eigen::MatrixXd out(m.rows(), m.cols());
  for (Eigen::Index i = 0; i < m.size(); ++i)
    out.data()[i] = static_cast<double>(static_cast<float>(m.data()[i]));
  return out;
}

enum class Path { xax_default, eigen_native, xax_eigen_backend };

template <class T>
void run_matmul(benchmark::State& state, Eigen::Index n, int threads, Path path) {
  const ThreadScope scope(threads);
  const Matrix<T> a = xax_bench::normal_matrix<T>(n, n, 1);
  const Matrix<T> b = xax_bench::normal_matrix<T>(n, n, 2);
  Eigen::MatrixXf c(n, n);
  const auto multiply = [&] {
    if constexpr (std::is_same_v<T, float>) {
      if (path == Path::eigen_native) {
        c.noalias() = a * b;
        return;
      }
    }
    xax::matmul(a, b, c,
                {.backend = path == Path::xax_eigen_backend ? xax::MatmulBackend::eigen
                                                            : xax::MatmulBackend::automatic});
  };
  multiply();  // creates and caches the primitive, touches every buffer
  const std::string implementation =
      path == Path::eigen_native ? std::string("eigen:MatrixXf product") : xax::last_matmul_implementation();

  for (auto _ : state) {
    multiply();
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }

  const Eigen::MatrixXd reference = to_double(a) * to_double(b);
  const double error = (c.cast<double>() - reference).norm() / reference.norm();
  const double flops = 2.0 * static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(n);
  state.counters["FLOPS"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["rel_error"] = error;
  state.SetLabel(implementation);
}

template <class T>
void register_matmul(const std::string& dtype, Path path) {
  for (const Eigen::Index n : {256, 512, 1024}) {
    for (const int threads : {1, 2}) {
      const std::string name =
          "Matmul/" + dtype + "/" + std::to_string(n) + "/threads:" + std::to_string(threads);
      benchmark::RegisterBenchmark(name.c_str(),
                                   [=](benchmark::State& state) { run_matmul<T>(state, n, threads, path); })
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
    }
  }
}

[[maybe_unused]] const bool registered = [] {
  register_matmul<float>("float32", Path::xax_default);
  register_matmul<xax::bfloat16>("bfloat16", Path::xax_default);
  register_matmul<xax::float16>("float16", Path::xax_default);
  register_matmul<float>("eigen_float32", Path::eigen_native);
  register_matmul<xax::bfloat16>("eigen_fallback_bfloat16", Path::xax_eigen_backend);
  return true;
}();

}  // namespace
