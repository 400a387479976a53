// The arithmetic ceilings the matmul figures are compared with, measured rather than taken from a data sheet:
// independent chains of one instruction, long enough that the loop overhead vanishes.
//
//     xax_micro_benchmarks --benchmark_filter='^Peak/' --benchmark_repetitions=5
//         --benchmark_report_aggregates_only=true
//
// Names: Peak/<instruction>/threads:<t>; each of the t threads (Google Benchmark's ->Threads) runs its own
// chains.
//   vdpbf16ps    bf16 dot products accumulated in fp32 (AVX512_BF16): 32 bf16 pairs per zmm instruction, i.e.
//                64 FLOP (a multiply and an add per pair);
//   vfmadd231ps  fp32 FMA on zmm: 16 lanes, 32 FLOP.
// Counter FLOPS is the rate. The peak is f x (instructions per cycle) x FLOP per instruction: on Zen 4 one
// zmm vdpbf16ps per cycle (two 256-bit pipes of 16 pairs each), 64 FLOP/cycle; on Intel with two 512-bit FMA
// ports, 128 FLOP/cycle. Counter GHz_implied is the clock the measured rate implies under Zen 4's 64 (bf16)
// and 32 (fp32) FLOP/cycle. A CPU (or an XAX_MAX_CPU_ISA cap) without the instruction skips the benchmark
// with a message.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <string>
#include <xax/utils/platform.hpp>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define XAX_PEAK_X86 1
#else
#define XAX_PEAK_X86 0
#endif

namespace {

constexpr int chains = 12;  // > latency x throughput of either instruction on Zen 4 and Intel
constexpr std::int64_t iterations_per_call = 1 << 16;

#if XAX_PEAK_X86
// Through memory: GCC 12 warns (falsely, -Werror) inside _mm512_reduce_add_ps.
__attribute__((target("avx512f"))) float horizontal_sum(__m512 v) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  float sum = 0.0f;
  for (const float lane : lanes) sum += lane;
  return sum;
}

__attribute__((target("avx512f,avx512bf16"))) float dpbf16_chains(std::int64_t iterations, float seed) {
  __m512 acc[chains];
  for (auto& a : acc) a = _mm512_set1_ps(seed);
  const __m512bh x = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(seed));
  const __m512bh y = _mm512_cvtne2ps_pbh(_mm512_set1_ps(seed), _mm512_set1_ps(1e-3f));
  for (std::int64_t i = 0; i < iterations; ++i) {
    for (auto& a : acc) a = _mm512_dpbf16_ps(a, x, y);
  }
  __m512 sum = acc[0];
  for (int c = 1; c < chains; ++c) sum = _mm512_add_ps(sum, acc[c]);
  return horizontal_sum(sum);
}

__attribute__((target("avx512f"))) float fma_chains(std::int64_t iterations, float seed) {
  __m512 acc[chains];
  for (auto& a : acc) a = _mm512_set1_ps(seed);
  const __m512 x = _mm512_set1_ps(0.999f);
  const __m512 y = _mm512_set1_ps(1e-4f);
  for (std::int64_t i = 0; i < iterations; ++i) {
    for (auto& a : acc) a = _mm512_fmadd_ps(a, x, y);
  }
  __m512 sum = acc[0];
  for (int c = 1; c < chains; ++c) sum = _mm512_add_ps(sum, acc[c]);
  return horizontal_sum(sum);
}
#endif

template <class Kernel>
void run_peak(benchmark::State& state, bool supported, const char* missing, Kernel kernel,
              double flop_per_instruction, double flop_per_cycle) {
  if (!supported) {
    state.SkipWithError(missing);
    return;
  }
  float seed = 1.0f;
  for (auto _ : state) {
    seed = kernel(iterations_per_call, seed) * 1e-9f + 1.0f;
    benchmark::DoNotOptimize(seed);
  }
  const double flops = static_cast<double>(iterations_per_call) * chains * flop_per_instruction;
  state.counters["FLOPS"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GHz_implied"] =
      benchmark::Counter(flops / flop_per_cycle / 1e9,
                         benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kAvgThreads);
}

[[maybe_unused]] const bool registered = [] {
#if XAX_PEAK_X86
  for (const int threads : {1, 2}) {
    benchmark::RegisterBenchmark("Peak/vdpbf16ps",
                                 [](benchmark::State& state) {
                                   const auto& cpu = xax::detail::cpu_features_or_detected();
                                   run_peak(state, cpu.avx512_bf16 && cpu.avx512f,
                                            "this CPU (or XAX_MAX_CPU_ISA) has no AVX512_BF16", dpbf16_chains,
                                            64.0, 64.0);
                                 })
        ->Threads(threads)
        ->UseRealTime();
    benchmark::RegisterBenchmark("Peak/vfmadd231ps",
                                 [](benchmark::State& state) {
                                   const auto& cpu = xax::detail::cpu_features_or_detected();
                                   run_peak(state, cpu.avx512f,
                                            "this CPU (or XAX_MAX_CPU_ISA) has no AVX-512", fma_chains, 32.0,
                                            32.0);
                                 })
        ->Threads(threads)
        ->UseRealTime();
  }
#endif
  return true;
}();

}  // namespace
