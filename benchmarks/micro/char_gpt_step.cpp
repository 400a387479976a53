// One full training step of the character-level GPT (benchmarks/workloads/char_gpt.hpp) at nanoGPT's CPU
// configuration (4 layers, 4 heads, n_embd 128, block 64, batch 12, vocabulary 65), run by xax::TrainStep
// with AdamW (no weight decay on biases and LayerNorm parameters, as the benchmark's training run): the step
// whose time the targets compare, mixed against fp32 and against PyTorch autocast-bf16.
//
//     xax_micro_benchmarks --benchmark_filter='^CharGptStep/' --benchmark_repetitions=7
//         --benchmark_enable_random_interleaving=true --benchmark_report_aggregates_only=true
//     OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 /usr/bin/python3 benchmarks/peers/torch_char_gpt.py ...
//
// Names: CharGptStep/<policy>/threads:<t>, <t> = xax::set_num_threads(); policies as xax::get_policy names
// them: `default` (fp32 throughout) and `mixed` (fp32 masters, compute in half_dtype(), bf16 on CPUs with
// native bf16 dot products, no loss scaling for bf16, dynamic for f16). The tokens are random ids (the
// step's cost does not depend on the text); the same batch is used every step, so the loss falls, which
// changes nothing in the work done. Counters: loss (the last step's), skipped (overflowed steps).
// CharGptStepPairs/threads:<t> runs both policies' steps alternately in one benchmark, for their ratio
// (below). Not in the default filter of mixed_precision_benchmark: run it with
// --benchmark_filter=^CharGptStep.
#include <benchmark/benchmark.h>

#include "micro/common.hpp"

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>
#include <xax/ops/matmul.hpp>
#include <xax/optim/param_groups.hpp>
#include <xax/task/train_step.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/policy.hpp>

#include "workloads/char_gpt.hpp"

namespace {

constexpr std::int64_t gpt_batch_size = 12;

xax_bench::TokenBatch make_gpt_batch(const xax_bench::GptShape& shape) {
  std::mt19937_64 rng(3);
  xax_bench::TokenBatch batch;
  batch.batch = gpt_batch_size;
  batch.block = shape.block_size;
  const auto tokens = static_cast<std::size_t>(gpt_batch_size * shape.block_size);
  batch.tokens.resize(tokens);
  batch.targets.resize(tokens);
  const auto vocabulary = static_cast<std::uint64_t>(shape.vocabulary);
  for (std::size_t n = 0; n < tokens; ++n) {
    batch.tokens[n] = static_cast<std::int32_t>(rng() % vocabulary);
    batch.targets[n] = static_cast<std::int32_t>(rng() % vocabulary);
  }
  return batch;
}

// The GPT as a TrainStep trainer; it writes fp32 gradients of 16-bit parameters straight from the matmuls'
// fp32 accumulators, as the benchmark's training task does.
template <class Policy, class LossScaleT>
class GptTrainer : public xax::TrainStep<GptTrainer<Policy, LossScaleT>, Policy, LossScaleT> {
 public:
  template <class T>
  using params_type = xax_bench::GptParams<T>;
  using batch_type = xax_bench::TokenBatch;
  using compute = typename Policy::compute_type;

  GptTrainer(const xax_bench::GptShape& shape, LossScaleT loss_scale) : shape_(shape) {
    xax::optim::AdamWOptions adamw;
    adamw.learning_rate = 1e-3;
    adamw.beta2 = 0.99;
    adamw.weight_decay = 0.1;
    adamw.groups = xax::optim::ParamGroups{}.no_weight_decay_if(xax::optim::is_bias_or_norm);
    this->reset_train_state(xax_bench::gpt_init(shape, 1), adamw, std::move(loss_scale));
  }

  static constexpr bool writes_fp32_gradients = true;

  template <class T, class G>
  double loss_and_grads(const xax_bench::GptParams<T>& params, const xax_bench::TokenBatch& batch,
                        float loss_scale, xax_bench::GptParams<G>& grads) {
    return xax_bench::gpt_loss_and_gradients(params, shape_, batch, loss_scale, grads, workspace_);
  }

 private:
  xax_bench::GptShape shape_;
  xax_bench::GptWorkspace<compute> workspace_;
};

template <class Policy, class LossScaleT>
void run_gpt_step(benchmark::State& state, int threads, LossScaleT loss_scale) {
  const xax_bench::ThreadScope scope(threads);
  const xax_bench::GptShape shape{};
  const xax_bench::TokenBatch batch = make_gpt_batch(shape);
  GptTrainer<Policy, LossScaleT> trainer(shape, std::move(loss_scale));
  const std::string implementation = xax_bench::time_train_steps(state, trainer, batch);
  state.counters["tokens_per_s"] = benchmark::Counter(static_cast<double>(batch.tokens.size()),
                                                      benchmark::Counter::kIsIterationInvariantRate);
  using Compute = typename Policy::compute_type;
  state.SetLabel(std::string(xax::dtype_name(xax::dtype_of<Compute>)) + " compute, " + implementation);
}

template <class Policy, class LossScaleT>
void register_gpt_step(const std::string& name, LossScaleT loss_scale) {
  for (const int threads : {1, 2}) {
    const std::string full_name = "CharGptStep/" + name + "/threads:" + std::to_string(threads);
    benchmark::RegisterBenchmark(
        full_name.c_str(),
        [threads, loss_scale](benchmark::State& state) { run_gpt_step<Policy>(state, threads, loss_scale); })
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
}

// One fp32 step and one mixed step in every iteration, each timed alone, their order swapped from one
// iteration to the next. On the 2-vCPU machines this project is measured on, a 2-thread step's time can shift
// by 20-30 % for a second or more, both policies' steps by the same milliseconds; two benchmarks run one
// after the other then see different machines, and their ratio carries the shift. Steps 30 ms apart see the
// same one, so the ratio of each pair does not. Counters: fp32_ms and mixed_ms (medians of the steps' times),
// mixed_over_fp32 (median of the pairs' ratios).
template <class MixedPolicy, class MixedLossScale>
void run_gpt_step_pairs(benchmark::State& state, int threads, MixedLossScale mixed_loss_scale) {
  const xax_bench::ThreadScope scope(threads);
  const xax_bench::GptShape shape{};
  const xax_bench::TokenBatch batch = make_gpt_batch(shape);
  GptTrainer<xax::Policy<float, float, float>, xax::NoOpLossScale> fp32(shape, xax::NoOpLossScale{});
  GptTrainer<MixedPolicy, MixedLossScale> mixed(shape, std::move(mixed_loss_scale));
  (void)fp32.train_step(batch);  // sizes every buffer and creates every primitive
  (void)mixed.train_step(batch);
  const auto seconds_of = [&batch](auto& trainer) {
    const auto start = std::chrono::steady_clock::now();
    (void)trainer.train_step(batch);
    benchmark::ClobberMemory();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  std::vector<double> fp32_seconds, mixed_seconds, ratios;
  bool fp32_first = true;
  for (auto _ : state) {
    double fp32_time = 0, mixed_time = 0;
    if (fp32_first) {
      fp32_time = seconds_of(fp32);
      mixed_time = seconds_of(mixed);
    } else {
      mixed_time = seconds_of(mixed);
      fp32_time = seconds_of(fp32);
    }
    fp32_first = !fp32_first;
    fp32_seconds.push_back(fp32_time);
    mixed_seconds.push_back(mixed_time);
    ratios.push_back(mixed_time / fp32_time);
  }
  const auto median = [](std::vector<double> values) {
    const auto middle = values.begin() + static_cast<std::ptrdiff_t>(values.size() / 2);
    std::nth_element(values.begin(), middle, values.end());
    return *middle;
  };
  state.counters["fp32_ms"] = 1e3 * median(fp32_seconds);
  state.counters["mixed_ms"] = 1e3 * median(mixed_seconds);
  state.counters["mixed_over_fp32"] = median(ratios);
  using Compute = typename MixedPolicy::compute_type;
  state.SetLabel(std::string("fp32 and ") + std::string(xax::dtype_name(xax::dtype_of<Compute>)) +
                 " compute, " + xax::last_matmul_implementation());
}

template <class MixedPolicy, class MixedLossScale>
void register_gpt_step_pairs(MixedLossScale mixed_loss_scale) {
  for (const int threads : {1, 2}) {
    const std::string name = "CharGptStepPairs/threads:" + std::to_string(threads);
    benchmark::RegisterBenchmark(name.c_str(),
                                 [threads, mixed_loss_scale](benchmark::State& state) {
                                   run_gpt_step_pairs<MixedPolicy>(state, threads, mixed_loss_scale);
                                 })
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
}

[[maybe_unused]] const bool gpt_registered = [] {
  register_gpt_step<xax::Policy<float, float, float>>("default", xax::NoOpLossScale{});
  if (xax_bench::registration_half_dtype() == xax::DType::bfloat16) {
    register_gpt_step<xax::Policy<float, xax::bfloat16, float>>("mixed", xax::NoOpLossScale{});
    register_gpt_step_pairs<xax::Policy<float, xax::bfloat16, float>>(xax::NoOpLossScale{});
  } else {
    register_gpt_step<xax::Policy<float, xax::float16, float>>("mixed", xax::DynamicLossScale{});
    register_gpt_step_pairs<xax::Policy<float, xax::float16, float>>(xax::DynamicLossScale{});
  }
  return true;
}();

}  // namespace
