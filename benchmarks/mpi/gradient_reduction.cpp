// Gradient reduction across processes, run under mpirun: xax's GradientReducer in its four modes against
// MPI_Allreduce of the same fp32 gradients (the reference: what DDP and Horovod do without compression), and
// the part of a step after the backward (reduction, unscale-check-norm, AdamW update) at ZeRO stage 0 and 1.
//
//   mpirun -np 2 build/release/benchmarks/xax_mpi_benchmarks
//   mpirun -np 4 --oversubscribe build/release/benchmarks/xax_mpi_benchmarks --benchmark_filter=269322
//
// Every rank runs every benchmark; each iteration is a collective, so the iteration count is fixed (ranks
// that chose their own counts would wait for each other for ever). Rank 0 reports. A step's 4 micro-batches
// are shared by the ranks as in training; each argument is the gradient's element count (269322 is the MLP
// 784-256-256-10). `bucketed/...` takes (elements, bucket size) and reports the reducer's buffer bytes:
//
//   mpirun -np 2 build/release/benchmarks/xax_mpi_benchmarks --benchmark_filter=bucketed
#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>
#include <xax/distributed/data_parallel.hpp>
#include <xax/distributed/gradient_reducer.hpp>
#include <xax/optim/adamw.hpp>
#include <xax/utils/finite.hpp>

namespace {

using Grads = std::vector<Eigen::VectorXf>;
constexpr int micro_batches = 4;
constexpr int iterations = 100;

Grads random_grads(Eigen::Index n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Grads g{Eigen::VectorXf(n)};
  for (Eigen::Index i = 0; i < n; ++i) g[0](i) = normal(rng);
  return g;
}

// The reducer summing `micro_batches` micro-batches of `state.range(0)` floats in buckets of `bucket_size`
// elements (0: one bucket). Reports the bytes on the wire and of the reducer's buffers on this rank, which
// the bucket bounds (except the staged micro-batch gradients).
void run_reducer(benchmark::State& state, xax::DType wire, bool deterministic, std::size_t bucket_size) {
  xax::distributed::GradientReducer reducer(
      xax::distributed::Communicator{},
      {.wire = wire, .deterministic = deterministic, .bucket_size = bucket_size});
  const int world = reducer.communicator().size();
  const int per_rank = micro_batches / world;
  const Grads local = random_grads(state.range(0), static_cast<std::uint64_t>(reducer.communicator().rank()));
  Grads sum = local;
  for (auto _ : state) {
    for (int m = 0; m < per_rank; ++m) reducer.collect(static_cast<std::size_t>(m), 1.0, local);
    benchmark::DoNotOptimize(reducer.reduce(sum));
    benchmark::ClobberMemory();
  }
  state.counters["ranks"] = world;
  state.counters["buckets"] = static_cast<double>(reducer.stats().buckets_last);
  state.counters["buffer_bytes_per_rank"] = static_cast<double>(reducer.stats().buffer_bytes);
  state.counters["wire_bytes_per_rank"] = static_cast<double>(reducer.stats().wire_bytes_last);
}

void reducer(benchmark::State& state, xax::DType wire, bool deterministic) {
  run_reducer(state, wire, deterministic, 0);
}

// Arguments (elements, bucket size in elements; 0 = one bucket).
void bucketed(benchmark::State& state, xax::DType wire, bool deterministic) {
  run_reducer(state, wire, deterministic, static_cast<std::size_t>(state.range(1)));
}

void mpi_allreduce(benchmark::State& state) {
  const xax::distributed::Communicator comm;
  const int per_rank = micro_batches / comm.size();
  const Grads local = random_grads(state.range(0), static_cast<std::uint64_t>(comm.rank()));
  Grads sum = local;
  Eigen::VectorXf local_sum(state.range(0));
  for (auto _ : state) {
    // The same work as the fast mode: the rank's micro-batches summed locally, then one fp32 all-reduce.
    local_sum = local[0];
    for (int m = 1; m < per_rank; ++m) local_sum += local[0];
    comm.all_reduce(local_sum.data(), sum[0].data(), static_cast<std::size_t>(local_sum.size()), MPI_SUM);
    benchmark::ClobberMemory();
  }
  state.counters["ranks"] = comm.size();
}

// The data-parallel side of a step at a ZeRO stage: DataParallelMixin's hooks as TrainStep calls them.
class ZeroStep : public xax::distributed::DataParallelMixin<ZeroStep> {
 public:
  explicit ZeroStep(int stage) : DataParallelMixin(xax::distributed::ReducerOptions{}, stage) {}
};

void after_backward(benchmark::State& state, int stage) {
  ZeroStep step(stage);
  const int world = step.world_size();
  const int per_rank = micro_batches / world;
  const Grads local = random_grads(state.range(0), static_cast<std::uint64_t>(step.rank()));
  Grads params = random_grads(state.range(0), 99);
  Grads sum = local;
  const xax::optim::AdamWOptions options{};
  // Stage 0 runs the built-in AdamW over the whole tree, as TrainStep does; stage 1 the sharded one.
  xax::optim::AdamW<Grads> whole(params, options);
  auto sharded = step.sharded_optimizer(params, options);
  for (auto _ : state) {
    for (int m = 0; m < per_rank; ++m) step.collect_micro_gradients(static_cast<std::size_t>(m), 1.0, local);
    benchmark::DoNotOptimize(step.reduce_gradients(sum));
    benchmark::DoNotOptimize(step.unscale_check_and_norm_reduced(sum, 1.0f / 1024.0f));
    if (stage == 0) {
      whole.step(params, sum);
    } else {
      sharded.step(params, sum);
    }
    benchmark::ClobberMemory();
  }
  state.counters["ranks"] = world;
  state.counters["optimizer_state_bytes_per_rank"] = static_cast<double>(
      stage == 0 ? xax::payload_bytes(whole.state()) : xax::payload_bytes(sharded.state()));
}

void sizes(benchmark::internal::Benchmark* b) {
  b->Arg(269322)->Arg(1 << 22)->Iterations(iterations)->Unit(benchmark::kMillisecond);
}

BENCHMARK_CAPTURE(reducer, deterministic_fp32, xax::DType::float32, true)->Apply(sizes);
BENCHMARK_CAPTURE(reducer, fast_fp32, xax::DType::float32, false)->Apply(sizes);
BENCHMARK_CAPTURE(reducer, deterministic_bf16, xax::DType::bfloat16, true)->Apply(sizes);
BENCHMARK_CAPTURE(reducer, fast_bf16, xax::DType::bfloat16, false)->Apply(sizes);
BENCHMARK(mpi_allreduce)->Apply(sizes);

void bucket_sizes(benchmark::internal::Benchmark* b) {
  for (const std::int64_t bucket : {0, 1 << 16, 1 << 18, 1 << 20})
    b->Args({1 << 22, bucket})->Iterations(iterations)->Unit(benchmark::kMillisecond);
}
BENCHMARK_CAPTURE(bucketed, deterministic_fp32, xax::DType::float32, true)->Apply(bucket_sizes);
BENCHMARK_CAPTURE(bucketed, fast_fp32, xax::DType::float32, false)->Apply(bucket_sizes);
BENCHMARK_CAPTURE(bucketed, fast_bf16, xax::DType::bfloat16, false)->Apply(bucket_sizes);
BENCHMARK_CAPTURE(after_backward, zero0, 0)->Apply(sizes);
BENCHMARK_CAPTURE(after_backward, zero1, 1)->Apply(sizes);

// Reports nothing: the other ranks run the same collectives, rank 0 tells.
class SilentReporter : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>&) override {}
};

}  // namespace

int main(int argc, char** argv) {
  xax::distributed::Environment mpi(argc, argv);
  return xax::distributed::run_or_abort([&] {
    benchmark::Initialize(&argc, argv);
    const xax::distributed::Communicator comm;
    if (comm.rank() == 0) {
      benchmark::RunSpecifiedBenchmarks();
    } else {
      SilentReporter silent;
      benchmark::RunSpecifiedBenchmarks(&silent);
    }
    benchmark::Shutdown();
    return 0;
  });
}
