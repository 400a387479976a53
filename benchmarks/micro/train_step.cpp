// One full training step of an MLP 784-512-512-10 (ReLU) at batch 256 with AdamW, run by xax::TrainStep: the
// step PyTorch's reference (benchmarks/peers/torch_mlp.py) times.
//
//     xax_micro_benchmarks --benchmark_filter='^TrainStep/'
//         --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
//     /usr/bin/python3 benchmarks/peers/torch_mlp.py --threads 1 --policy mixed
//
// Names: TrainStep/<policy>/threads:<t>, <t> = xax::set_num_threads(). Policies, as xax::get_policy names
// them:
//   default           params, compute and output float32; no loss scaling;
//   mixed             float32 params, compute in half_dtype() (bfloat16 on CPUs with native bf16 dot
//                     products), float32 output; no loss scaling for bf16 (as jmp and PyTorch autocast),
//                     dynamic for f16;
//   float16           everything float16 under a dynamic loss scale (2^15 initially); the update runs in
//                     fp32 on a working copy and rounds back to f16;
//   mixed_cast_grads  mixed with a trainer that writes its gradients in the compute type, which TrainStep
//                     then casts to fp32 in a separate pass (the literal DESIGN.md section 6 sequence).
// One step (xax::TrainStep::train_step): forward, fp32 softmax cross-entropy, backward of the scaled loss
// into fp32 gradients, unscale_and_check, global gradient norm, AdamW update of the masters that also
// rounds them into the compute copy (or a skip), loss-scale adjustment. Every buffer is reused, so after
// the first step nothing is allocated. Counters: loss (last step's), skipped (steps skipped for overflow).
// The label names the compute type and the matmul kernel. Targets (PERFORMANCE.md): mixed <= 0.55x default,
// and <= 0.85x PyTorch autocast-bf16 at the same threads.
#include <benchmark/benchmark.h>

#include "micro/common.hpp"

#include <concepts>
#include <cstdint>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>
#include <xax/nn/mlp.hpp>
#include <xax/ops/matmul.hpp>
#include <xax/task/train_step.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/policy.hpp>

namespace {

constexpr Eigen::Index batch_size = 256;

struct Batch {
  Eigen::MatrixXf inputs;  // features x batch
  std::vector<std::int32_t> labels;
};

Batch make_batch() {
  Batch batch{Eigen::MatrixXf(784, batch_size),
              std::vector<std::int32_t>(static_cast<std::size_t>(batch_size))};
  std::mt19937_64 rng(2);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (Eigen::Index i = 0; i < batch.inputs.size(); ++i) batch.inputs.data()[i] = normal(rng);
  for (auto& label : batch.labels) label = static_cast<std::int32_t>(rng() % 10);
  return batch;
}

// The MLP as a TrainStep trainer. With WritesFloatGrads it also accepts fp32 gradients of half parameters,
// which TrainStep then asks for: the backward's matmuls write them from their fp32 accumulators.
template <class Policy, class LossScaleT, bool WritesFloatGrads>
class MlpTrainer
    : public xax::TrainStep<MlpTrainer<Policy, LossScaleT, WritesFloatGrads>, Policy, LossScaleT> {
 public:
  template <class T>
  using params_type = xax::nn::MlpParams<T>;
  using batch_type = Batch;
  using compute = typename Policy::compute_type;

  explicit MlpTrainer(LossScaleT loss_scale) {
    this->reset_train_state(xax::nn::mlp_init({784, 512, 512, 10}, 1),
                            xax::optim::AdamWOptions{.learning_rate = 1e-3}, std::move(loss_scale));
  }

  static constexpr bool writes_fp32_gradients = WritesFloatGrads;

  template <class T, class G>
  requires(WritesFloatGrads || std::same_as<T, G>) double loss_and_grads(const xax::nn::MlpParams<T>& params,
                                                                         const Batch& batch, float loss_scale,
                                                                         xax::nn::MlpParams<G>& grads) {
    return static_cast<double>(xax::nn::mlp_loss_and_gradients(params, batch.inputs, batch.labels, grads,
                                                               workspace_, {.loss_scale = loss_scale}));
  }

 private:
  xax::nn::MlpWorkspace<compute> workspace_;
};

template <class Trainer, class LossScaleT>
void run_train_step(benchmark::State& state, int threads, LossScaleT loss_scale) {
  const xax_bench::ThreadScope scope(threads);
  const Batch batch = make_batch();
  Trainer trainer(std::move(loss_scale));
  const std::string implementation = xax_bench::time_train_steps(state, trainer, batch);
  using Compute = typename Trainer::compute;
  std::string note;
  if constexpr (!std::is_same_v<Compute, float>) {
    if (!xax::half_matmul_support(xax::dtype_of<Compute>).native)
      note = " [no native half dot product: saves memory, not time]";
  }
  state.SetLabel(std::string(xax::dtype_name(xax::dtype_of<Compute>)) + " compute, " + implementation + note);
}

template <class Policy, bool WritesFloatGrads = true, class LossScaleT>
void register_train_step(const std::string& name, LossScaleT loss_scale) {
  using Trainer = MlpTrainer<Policy, LossScaleT, WritesFloatGrads>;
  for (const int threads : {1, 2}) {
    const std::string full_name = "TrainStep/" + name + "/threads:" + std::to_string(threads);
    benchmark::RegisterBenchmark(full_name.c_str(),
                                 [threads, loss_scale](benchmark::State& state) {
                                   run_train_step<Trainer>(state, threads, loss_scale);
                                 })
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
}

template <class Half, class LossScaleT>
void register_mixed(LossScaleT loss_scale) {
  using Mixed = xax::Policy<float, Half, float>;
  register_train_step<Mixed>("mixed", loss_scale);
  register_train_step<Mixed, false>("mixed_cast_grads", loss_scale);
}

[[maybe_unused]] const bool registered = [] {
  register_train_step<xax::Policy<float, float, float>>("default", xax::NoOpLossScale{});
  if (xax_bench::registration_half_dtype() == xax::DType::bfloat16) {
    register_mixed<xax::bfloat16>(xax::NoOpLossScale{});
  } else {
    register_mixed<xax::float16>(xax::DynamicLossScale{});  // f16 needs loss scaling
  }
  register_train_step<xax::Policy<xax::float16, xax::float16, xax::float16>>("float16",
                                                                             xax::DynamicLossScale{});
  return true;
}();

}  // namespace
