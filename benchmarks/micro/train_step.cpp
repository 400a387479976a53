// One full mixed-precision training step of an MLP 784-512-512-10 (ReLU) at batch 256 with AdamW, the step
// PyTorch's reference (benchmarks/peers/torch_mlp.py) times:
//
//     xax_micro_benchmarks --benchmark_filter='^TrainStep/'
//         --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
//     /usr/bin/python3 benchmarks/peers/torch_mlp.py --threads 1 --policy mixed
//
// Names: TrainStep/<policy>/threads:<t>, <t> = xax::set_num_threads(). Policies (all with fp32 master
// weights and an fp32 loss):
//   default           compute float32, no loss scaling;
//   mixed             compute in half_dtype() (bfloat16 on CPUs with native bf16 dot products), no loss
//                     scaling, as jmp and PyTorch autocast do for bf16;
//   float16           compute float16 under a dynamic loss scale (2^15 initially), the f16 recipe of jmp/AMP;
//   mixed_cast_grads  mixed, with the gradients computed in the compute type and then cast to fp32 as a
//                     separate pass (the literal DESIGN.md section 6 sequence, for comparison).
// One step: cast the masters to the compute type, forward, fp32 softmax cross-entropy, backward of the scaled
// loss, fp32 gradients, unscale_and_check, AdamW update of the masters when finite (else skip), adjust the
// loss scale. In mixed and float16 the backward's matmuls write the weight gradients in fp32 straight from
// their fp32 accumulators (xax::nn::mlp_loss_and_gradients with float gradients), so the "cast gradients to
// fp32" step costs nothing and no gradient is ever rounded to 16 bits; mixed_cast_grads shows the separate
// cast. Every buffer is reused, so after the first step nothing is allocated. Counters: loss (last step's),
// skipped (steps skipped for overflow). The label names the compute type and the matmul kernel. Targets
// (PERFORMANCE.md): mixed <= 0.55x default, and <= 0.85x PyTorch autocast-bf16 at the same threads.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>
#include <xax/nn/mlp.hpp>
#include <xax/ops/matmul.hpp>
#include <xax/optim/adamw.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/finite.hpp>
#include <xax/utils/loss_scale.hpp>
#include <xax/utils/threads.hpp>
#include <xax/utils/tree.hpp>

namespace {

class ThreadScope {
 public:
  explicit ThreadScope(int threads) : previous_(xax::num_threads()) { xax::set_num_threads(threads); }
  ~ThreadScope() { xax::set_num_threads(previous_); }
  ThreadScope(const ThreadScope&) = delete;
  ThreadScope& operator=(const ThreadScope&) = delete;

 private:
  int previous_;
};

constexpr Eigen::Index batch_size = 256;

template <class Compute, class LossScaleT, bool CastGradients = false>
class MlpTrainStep {
 public:
  explicit MlpTrainStep(LossScaleT loss_scale)
      : masters_(xax::nn::mlp_init({784, 512, 512, 10}, 1)),
        adamw_(masters_, {.learning_rate = 1e-3}),
        loss_scale_(std::move(loss_scale)),
        inputs_(784, batch_size),
        labels_(static_cast<std::size_t>(batch_size)) {
    std::mt19937_64 rng(2);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (Eigen::Index i = 0; i < inputs_.size(); ++i) inputs_.data()[i] = normal(rng);
    for (auto& label : labels_) label = static_cast<std::int32_t>(rng() % 10);
  }

  void step() {
    const xax::nn::MlpBackwardOptions options{.loss_scale = loss_scale_.loss_scale()};
    if constexpr (std::is_same_v<Compute, float>) {
      loss_ = xax::nn::mlp_loss_and_gradients(masters_, inputs_, labels_, grads_, workspace_, options);
    } else {
      xax::tree_cast_into(masters_, compute_);
      loss_ =
          xax::nn::mlp_loss_and_gradients(compute_, inputs_, labels_, compute_grads_, workspace_, options);
      xax::tree_cast_into(compute_grads_, grads_);
    }
    const bool finite = xax::unscale_and_check(grads_, loss_scale_.inverse_scale());
    if (finite) {
      adamw_.step(masters_, grads_);
    } else {
      ++skipped_;
    }
    loss_scale_.adjust(finite);
  }

  [[nodiscard]] float loss() const { return loss_; }
  [[nodiscard]] std::int64_t skipped() const { return skipped_; }

 private:
  xax::nn::MlpParams<float> masters_;
  xax::nn::MlpParams<Compute> compute_;
  xax::nn::MlpParams<Compute> compute_grads_;
  xax::nn::MlpParams<float> grads_;
  xax::nn::MlpWorkspace<Compute> workspace_;
  xax::optim::AdamW<xax::nn::MlpParams<float>> adamw_;
  LossScaleT loss_scale_;
  Eigen::MatrixXf inputs_;
  std::vector<std::int32_t> labels_;
  float loss_ = 0;
  std::int64_t skipped_ = 0;
};

template <class Compute, bool CastGradients, class LossScaleT>
void run_train_step(benchmark::State& state, int threads, LossScaleT loss_scale) {
  const ThreadScope scope(threads);
  MlpTrainStep<Compute, LossScaleT, CastGradients> step(std::move(loss_scale));
  step.step();  // sizes every buffer and creates every matmul primitive
  const std::string implementation = xax::last_matmul_implementation();
  for (auto _ : state) {
    step.step();
    benchmark::ClobberMemory();
  }
  state.counters["loss"] = step.loss();
  state.counters["skipped"] = static_cast<double>(step.skipped());
  state.SetLabel(std::string(xax::dtype_name(xax::dtype_of<Compute>)) + " compute, " + implementation);
}

template <class Compute, bool CastGradients = false, class LossScaleT>
void register_train_step(const std::string& policy, LossScaleT loss_scale) {
  for (const int threads : {1, 2}) {
    const std::string name = "TrainStep/" + policy + "/threads:" + std::to_string(threads);
    benchmark::RegisterBenchmark(name.c_str(),
                                 [threads, loss_scale](benchmark::State& state) {
                                   run_train_step<Compute, CastGradients>(state, threads, loss_scale);
                                 })
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
}

[[maybe_unused]] const bool registered = [] {
  register_train_step<float>("default", xax::NoOpLossScale{});
  if (xax::half_dtype() == xax::DType::bfloat16) {
    register_train_step<xax::bfloat16>("mixed", xax::NoOpLossScale{});
    register_train_step<xax::bfloat16, true>("mixed_cast_grads", xax::NoOpLossScale{});
  } else {
    register_train_step<xax::float16>("mixed", xax::DynamicLossScale{});  // f16 needs loss scaling
    register_train_step<xax::float16, true>("mixed_cast_grads", xax::DynamicLossScale{});
  }
  register_train_step<xax::float16>("float16", xax::DynamicLossScale{});
  return true;
}();

}  // namespace
