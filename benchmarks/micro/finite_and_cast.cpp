// The fused unscale-and-check and the precision casts, each next to a hand-written streaming pass over the
// same bytes (the memory-speed floor it is measured against), on 64 Mi elements spread across 64 tensors.
//
//     xax_micro_benchmarks --benchmark_filter='UnscaleAndCheck|StreamingRmw|Cast|StreamingCopy'
//                          --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
//
// GradientsToFp32 compares the cast and unscale of 16-bit gradients as two passes and as one.
//
// Targets (PERFORMANCE.md): UnscaleAndCheck within 1.1x of StreamingRmw, Cast within 1.15x of StreamingCopy,
// at the same thread count. Every buffer is allocated and touched once and reused, so no timed iteration pays
// for page faults.
#include <benchmark/benchmark.h>

#include "micro/common.hpp"

#include <bit>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <string>
#include <type_traits>
#include <vector>
#include <xax/detail/convert.hpp>
#include <xax/detail/finite_kernels.hpp>
#include <xax/utils/finite.hpp>
#include <xax/utils/threads.hpp>
#include <xax/utils/tree.hpp>
#include <xax/utils/tree_cast.hpp>

namespace {

constexpr std::size_t tensor_count = 64;
constexpr Eigen::Index tensor_size = Eigen::Index{1} << 20;  // 64 Mi elements in all
constexpr auto total_elements = static_cast<std::int64_t>(tensor_count) * tensor_size;

template <class T>
using Tensors = std::vector<Eigen::Matrix<T, Eigen::Dynamic, 1>>;

// 64 tensors of T, allocated and written once per (type, role), then reused by every benchmark. Role 1 is the
// float destination of widening passes, whose float source (role 0) must stay intact; a narrowing pass writes
// the 16-bit role-0 tensors that the widening passes then read. Integer T holds the bits of the same values.
template <class T, int Role = 0>
Tensors<T>& tensors() {
  static Tensors<T> storage = [] {
    Tensors<T> made(tensor_count);
    for (std::size_t t = 0; t < tensor_count; ++t) {
      made[t].resize(tensor_size);
      for (Eigen::Index i = 0; i < tensor_size; ++i) {
        // Gradient-like magnitudes, exact in every precision, so repeated passes never drift.
        const auto step = (i * 37 + static_cast<Eigen::Index>(t)) % 201 - 100;
        const float value = static_cast<float>(step) * 0x1p-10f;
        if constexpr (std::is_integral_v<T>) {
          made[t][i] = static_cast<T>(std::bit_cast<std::uint32_t>(value) >> (32 - 8 * sizeof(T)));
        } else {
          made[t][i] = static_cast<T>(value);
        }
      }
    }
    return made;
  }();
  return storage;
}

// Where a pass producing T writes: a separate float buffer for widening, the shared 16-bit one for narrowing.
template <class T>
Tensors<T>& destination() {
  return tensors < T, sizeof(T) == 4 ? 1 : 0 > ();
}

using xax_bench::ThreadScope;

// --------------------------------------------------------------------------------------------------------------
// Unscale and check

void UnscaleAndCheck(benchmark::State& state) {
  const ThreadScope threads(static_cast<int>(state.range(0)));
  Tensors<float>& grads = tensors<float>();
  // Alternating x0.5 and x2 keeps the values fixed and exact, and every pass really multiplies.
  float factor = 0.5f;
  for (auto _ : state) {
    const bool finite = xax::unscale_and_check(grads, factor);
    benchmark::DoNotOptimize(finite);
    factor = factor == 0.5f ? 2.0f : 0.5f;
  }
  state.SetBytesProcessed(state.iterations() * total_elements * 2 * static_cast<std::int64_t>(sizeof(float)));
  state.SetLabel(xax::detail::best_kernel(xax::detail::scale_magnitude_kernels(), xax::cpu_features()).name);
}

// The floor: one in-place multiply over the same tensors, no check, split the way OpenMP splits a loop.
void StreamingRmw(benchmark::State& state) {
  const int thread_count = static_cast<int>(state.range(0));
  Tensors<float>& grads = tensors<float>();
  float factor = 0.5f;
  for (auto _ : state) {
#if defined(_OPENMP)
#pragma omp parallel num_threads(thread_count)
#endif
    for (auto& tensor : grads) {
      float* x = tensor.data();
#if defined(_OPENMP)
#pragma omp for schedule(static) nowait
#endif
      for (Eigen::Index i = 0; i < tensor_size; ++i) x[i] *= factor;
    }
    benchmark::DoNotOptimize(grads.front().data());
    benchmark::ClobberMemory();
    factor = factor == 0.5f ? 2.0f : 0.5f;
  }
  static_cast<void>(thread_count);
  state.SetBytesProcessed(state.iterations() * total_elements * 2 * static_cast<std::int64_t>(sizeof(float)));
}

BENCHMARK(UnscaleAndCheck)->ArgName("threads")->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(StreamingRmw)->ArgName("threads")->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime();

// A mixed-precision step's bf16 gradients into the optimizer's fp32 ones, unscaled, checked and normed: as
// two passes (tree_cast_into, then unscale_check_and_norm) and as one (unscale_check_and_norm_into). Over
// the first `tensors` tensors: 64 (64 Mi elements, from memory) or 1 (1 Mi elements, a small model's
// gradients, from L3).
template <bool Fused>
void GradientsToFp32(benchmark::State& state) {
  const ThreadScope threads(static_cast<int>(state.range(0)));
  const auto count = static_cast<std::size_t>(state.range(1));
  const Tensors<xax::bfloat16> compute_grads(
      tensors<xax::bfloat16>().begin(),
      tensors<xax::bfloat16>().begin() + static_cast<std::ptrdiff_t>(count));
  Tensors<float>& all_grads = destination<float>();
  Tensors<float> grads(std::make_move_iterator(all_grads.begin()),
                       std::make_move_iterator(all_grads.begin() + static_cast<std::ptrdiff_t>(count)));
  for (auto _ : state) {
    xax::UnscaledGradients result;
    if constexpr (Fused) {
      result = xax::unscale_check_and_norm_into(compute_grads, grads, 0.5f);
    } else {
      xax::tree_cast_into(compute_grads, grads);
      result = xax::unscale_check_and_norm(grads, 0.5f);
    }
    benchmark::DoNotOptimize(result);
  }
  std::move(grads.begin(), grads.end(), all_grads.begin());  // keeps the shared buffers allocated and touched
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(count) * tensor_size);
}

BENCHMARK(GradientsToFp32<false>)
    ->Name("GradientsToFp32/cast_then_unscale")
    ->ArgNames({"threads", "tensors"})
    ->ArgsProduct({{1, 2}, {1, 64}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(GradientsToFp32<true>)
    ->Name("GradientsToFp32/unscale_into")
    ->ArgNames({"threads", "tensors"})
    ->ArgsProduct({{1, 2}, {1, 64}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// --------------------------------------------------------------------------------------------------------------
// Casts

template <class From, class To>
void Cast(benchmark::State& state) {
  const ThreadScope threads(static_cast<int>(state.range(0)));
  const Tensors<From>& src = tensors<From>();
  Tensors<To>& dst = destination<To>();
  for (auto _ : state) {
    xax::tree_cast_into(src, dst);
    benchmark::DoNotOptimize(dst.front().data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * total_elements *
                          static_cast<std::int64_t>(sizeof(From) + sizeof(To)));
  state.SetLabel(
      xax::detail::best_kernel(xax::detail::convert_kernels<From, To>(), xax::cpu_features()).name);
}

// Eigen's own cast, as a user would write it, for comparison (single-threaded: Eigen does not split casts).
template <class From, class To>
void EigenCast(benchmark::State& state) {
  const Tensors<From>& src = tensors<From>();
  Tensors<To>& dst = destination<To>();
  for (auto _ : state) {
    for (std::size_t t = 0; t < tensor_count; ++t) dst[t] = src[t].template cast<To>();
    benchmark::DoNotOptimize(dst.front().data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * total_elements *
                          static_cast<std::int64_t>(sizeof(From) + sizeof(To)));
}

// The floor for a cast: a streaming pass reading the source bytes and writing the destination bytes with no
// rounding (float -> upper 16 bits, 16 bits -> float with zero low bits), on integer buffers of the same
// sizes.
template <class FromBits, class ToBits>
void StreamingCopy(benchmark::State& state) {
  const int thread_count = static_cast<int>(state.range(0));
  const Tensors<FromBits>& src = tensors<FromBits>();
  Tensors<ToBits>& dst = destination<ToBits>();
  for (auto _ : state) {
#if defined(_OPENMP)
#pragma omp parallel num_threads(thread_count)
#endif
    for (std::size_t t = 0; t < tensor_count; ++t) {
      const FromBits* in = src[t].data();
      ToBits* out = dst[t].data();
#if defined(_OPENMP)
#pragma omp for schedule(static) nowait
#endif
      for (Eigen::Index i = 0; i < tensor_size; ++i) {
        if constexpr (sizeof(FromBits) > sizeof(ToBits)) {
          out[i] = static_cast<ToBits>(in[i] >> 16);
        } else {
          out[i] = static_cast<ToBits>(ToBits{in[i]} << 16);
        }
      }
    }
    benchmark::DoNotOptimize(dst.front().data());
    benchmark::ClobberMemory();
  }
  static_cast<void>(thread_count);
  state.SetBytesProcessed(state.iterations() * total_elements *
                          static_cast<std::int64_t>(sizeof(FromBits) + sizeof(ToBits)));
}

template <class From, class To>
void register_cast(const std::string& name) {
  benchmark::RegisterBenchmark(("Cast/" + name).c_str(), Cast<From, To>)
      ->ArgName("threads")
      ->Arg(1)
      ->Arg(2)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
  benchmark::RegisterBenchmark(("EigenCast/" + name).c_str(), EigenCast<From, To>)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
}

const bool registered = [] {
  register_cast<float, xax::bfloat16>("f32_to_bf16");
  register_cast<xax::bfloat16, float>("bf16_to_f32");
  register_cast<float, xax::float16>("f32_to_f16");
  register_cast<xax::float16, float>("f16_to_f32");
  benchmark::RegisterBenchmark("StreamingCopy/narrow_4_to_2_bytes",
                               StreamingCopy<std::uint32_t, std::uint16_t>)
      ->ArgName("threads")
      ->Arg(1)
      ->Arg(2)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
  benchmark::RegisterBenchmark("StreamingCopy/widen_2_to_4_bytes",
                               StreamingCopy<std::uint16_t, std::uint32_t>)
      ->ArgName("threads")
      ->Arg(1)
      ->Arg(2)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
  return true;
}();

}  // namespace
