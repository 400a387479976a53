#pragma once
// One training run of the character-level GPT (workloads/char_gpt.hpp) under one precision policy, built as
// a user's task: TrainMixin + MixedPrecisionMixin over a config that inherits both, AdamW with parameter
// groups (no weight decay on biases and LayerNorm parameters), gradient clipping and nanoGPT's learning-rate
// schedule (linear warm-up, cosine decay to a tenth). Measured for the report: step times, train and
// validation loss curves, the loss-scale trajectory, skipped steps, peak memory.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <numbers>
#include <span>
#include <string>
#include <tuple>
#include <vector>
#include <xax/nn/loss.hpp>
#include <xax/optim/param_groups.hpp>
#include <xax/task/mixins/mixed_precision.hpp>
#include <xax/task/mixins/train.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/policy.hpp>

#include "report/format.hpp"
#include "report/results.hpp"
#include "runner/memory.hpp"
#include "runner/progress.hpp"
#include "runner/training.hpp"
#include "workloads/char_data.hpp"
#include "workloads/char_gpt.hpp"

namespace xax_bench {

/// What the GPT trains on and how (nanoGPT's train_shakespeare_char on CPU, by default).
struct CharTrainingSetup {
  std::string policy = "default";
  std::string loss_scaling = "none";
  GptShape shape{};
  std::int64_t batch_size = 12;
  std::int64_t steps = 2000;
  double learning_rate = 1e-3;
  double min_learning_rate = 1e-4;
  std::int64_t warmup_steps = 100;
  double weight_decay = 0.1;
  double beta2 = 0.99;
  double max_grad_norm = 1.0;
  std::int64_t eval_interval = 250;       ///< steps between validation estimates (and one at the end)
  std::int64_t eval_batches = 20;         ///< batches per intermediate estimate (fixed windows, every policy)
  std::int64_t final_eval_batches = 200;  ///< batches of the final validation loss (nanoGPT's eval_iters)
  std::uint64_t seed = 0;
  bool progress = true;
};

/// nanoGPT's get_lr: linear warm-up over `warmup` steps, then cosine decay to `min_lr` at `total`.
inline double nanogpt_learning_rate(std::int64_t step, const CharTrainingSetup& setup) {
  if (step < setup.warmup_steps) {
    return setup.learning_rate * static_cast<double>(step + 1) / static_cast<double>(setup.warmup_steps + 1);
  }
  if (step > setup.steps) return setup.min_learning_rate;
  const double ratio = static_cast<double>(step - setup.warmup_steps) /
                       static_cast<double>(std::max<std::int64_t>(setup.steps - setup.warmup_steps, 1));
  const double coefficient = 0.5 * (1.0 + std::cos(std::numbers::pi * std::min(ratio, 1.0)));
  return setup.min_learning_rate + coefficient * (setup.learning_rate - setup.min_learning_rate);
}

/// Throws xax::ConfigError when the GPT of `setup` would keep more activations between its forward and
/// backward than `budget` (the memory this process may use) holds. Refused before anything is allocated:
/// the alternative is std::bad_alloc midway, or, where the kernel overcommits, the OOM killer.
inline void require_gpt_fits(const CharTrainingSetup& setup, const MemoryBudget& budget) {
  const std::size_t compute_bytes = xax::dtype_size(xax::get_policy(setup.policy).compute);
  const GptShape& shape = setup.shape;
  const double bytes = gpt_activation_bytes(shape, setup.batch_size, shape.block_size, compute_bytes);
  if (bytes <= static_cast<double>(budget.bytes)) return;
  const double probs = gpt_probability_bytes(shape, setup.batch_size, shape.block_size, compute_bytes);
  throw xax::ConfigError("the GPT at --gpt-batch-size " + std::to_string(setup.batch_size) +
                         " and --gpt-block-size " + std::to_string(shape.block_size) + " keeps " +
                         gib(bytes) + " of activations per step under '" + setup.policy +
                         "' (its attention probabilities, batch x heads x block^2 per layer, are " +
                         gib(probs) + " of them), more than " + budget.describe() +
                         "; give a smaller --gpt-batch-size or --gpt-block-size, or fewer --gpt-layers");
}

namespace detail {

/// The benchmark's config, with AdamW's settings for a transformer: the config's optimizer_options() is what
/// MixedPrecisionMixin builds its optimizer from.
struct GptConfig : xax::TrainConfig, xax::MixedPrecisionConfig {
  double beta2 = 0.99;
  [[nodiscard]] xax::OptimizerOptions optimizer_options() const {
    xax::optim::AdamWOptions adamw;
    adamw.learning_rate = learning_rate;
    adamw.beta1 = 0.9;
    adamw.beta2 = beta2;
    adamw.weight_decay = weight_decay;
    adamw.groups = xax::optim::ParamGroups{}.no_weight_decay_if(xax::optim::is_bias_or_norm);
    return adamw;
  }
};

struct CharRecorder {
  std::vector<double> step_ms;
  std::vector<double> step_loss;  // NaN for skipped steps
  std::vector<double> loss_scale;
  std::vector<LossPoint> val_curve;
  std::string last_non_finite;
  std::size_t activation_bytes = 0;
  std::string matmul_implementation;
};

/// The user task: the GPT, its corpus, and the hooks that feed the recorder.
class CharGptTask : public xax::TrainMixin<CharGptTask, GptConfig>,
                    public xax::MixedPrecisionMixin<CharGptTask, GptConfig> {
 public:
  using compiled_policies = BenchmarkPolicies;
  template <class T>
  using params_type = GptParams<T>;
  using batch_type = TokenBatch;

  CharGptTask(GptConfig config, const CharTrainingSetup& setup, const CharCorpus& corpus,
              CharRecorder& recorder, Progress& progress)
      : TrainMixin(std::move(config)),
        setup_(&setup),
        corpus_(&corpus),
        recorder_(&recorder),
        progress_(&progress) {
    set_log_stream(nullptr);
    // The validation windows: non-overlapping, spread over the split, the same for every policy and for the
    // PyTorch peer. The intermediate estimates use the first eval_batches of them.
    const std::int64_t block = setup.shape.block_size;
    const auto starts = spread_window_starts(
        corpus.val.size(), block, static_cast<std::size_t>(setup.final_eval_batches * setup.batch_size));
    for (std::size_t first = 0; first + static_cast<std::size_t>(setup.batch_size) <= starts.size();
         first += static_cast<std::size_t>(setup.batch_size)) {
      val_batches_.push_back(make_token_batch(
          corpus.val,
          std::span<const std::int64_t>(starts).subspan(first, static_cast<std::size_t>(setup.batch_size)),
          block));
    }
    if (val_batches_.empty()) {
      throw xax::DataError("the validation split (" + std::to_string(corpus.val.size()) +
                           " characters) is shorter than one batch of windows (" +
                           std::to_string(setup.batch_size) + " x " + std::to_string(block) +
                           "); give a longer text or a smaller --gpt-batch-size");
    }
  }

  [[nodiscard]] GptParams<float> init_params() const { return gpt_init(setup_->shape, setup_->seed + 1); }

  /// Every window start of the training split is an example; an epoch's shuffle draws random windows, as
  /// nanoGPT's get_batch does (without replacement within an epoch).
  [[nodiscard]] std::int64_t num_examples() const {
    return static_cast<std::int64_t>(corpus_->train.size()) - setup_->shape.block_size;
  }

  [[nodiscard]] TokenBatch make_batch(std::span<const std::int64_t> starts) const {
    return make_token_batch(corpus_->train, starts, setup_->shape.block_size);
  }

  static constexpr bool writes_fp32_gradients = true;

  template <class T, class G>
  requires(std::same_as<G, T> ||
           std::same_as<G, float>) double loss_and_grads(const GptParams<T>& params, const TokenBatch& batch,
                                                         float loss_scale, GptParams<G>& grads) {
    auto& workspace = std::get<GptWorkspace<T>>(workspaces_);
    const double loss = gpt_loss_and_gradients(params, setup_->shape, batch, loss_scale, grads, workspace);
    recorder_->activation_bytes = std::max(recorder_->activation_bytes, workspace.activation_bytes());
    recorder_->matmul_implementation = xax::last_matmul_implementation();
    return loss;
  }

  /// The batch's mean loss and, through `correct_`, its next-character accuracy, in the compute type.
  template <class T>
  double evaluate(const GptParams<T>& params, const TokenBatch& batch) {
    auto& workspace = std::get<GptWorkspace<T>>(eval_workspaces_);
    const double loss = gpt_loss(params, setup_->shape, batch, workspace);
    correct_ += static_cast<double>(xax::nn::count_correct(workspace.logits, batch.targets));
    return loss;
  }

  /// Mean validation loss and next-character accuracy over the first `batches` fixed validation batches.
  std::pair<double, double> validation(std::size_t batches) {
    batches = std::min(batches, val_batches_.size());
    double total = 0;
    correct_ = 0;
    std::size_t tokens = 0;
    for (std::size_t b = 0; b < batches; ++b) {
      total += evaluate_batch(val_batches_[b]);
      tokens += val_batches_[b].targets.size();
    }
    return {total / static_cast<double>(batches), tokens == 0 ? 0.0 : correct_ / static_cast<double>(tokens)};
  }

  xax::StepResult train_step(std::span<const TokenBatch> micro_batches) {
    const auto start = std::chrono::steady_clock::now();
    const xax::StepResult result = MixedPrecisionMixin::train_step(micro_batches);
    recorder_->step_ms.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
    return result;
  }

  void on_step(std::int64_t step, const xax::StepResult& result) {
    recorder_->step_loss.push_back(result.finite ? result.loss : std::numeric_limits<double>::quiet_NaN());
    recorder_->loss_scale.push_back(static_cast<double>(current_loss_scale()));
    if (!result.finite) recorder_->last_non_finite = result.non_finite;
    set_learning_rate(nanogpt_learning_rate(step, *setup_));
    if (setup_->eval_interval > 0 && step % setup_->eval_interval == 0 && step < setup_->steps) {
      recorder_->val_curve.push_back(
          {step, validation(static_cast<std::size_t>(setup_->eval_batches)).first});
    }
    if (step % 10 == 0 || step == setup_->steps) {
      char detail[128];
      std::snprintf(detail, sizeof detail, "loss %.4f, scale %g, skipped %lld", result.loss,
                    static_cast<double>(result.loss_scale), static_cast<long long>(result.skipped_steps));
      progress_->update(step, detail);
    }
  }

 private:
  const CharTrainingSetup* setup_;
  const CharCorpus* corpus_;
  CharRecorder* recorder_;
  Progress* progress_;
  std::vector<TokenBatch> val_batches_;
  double correct_ = 0;
  std::tuple<GptWorkspace<float>, GptWorkspace<xax::bfloat16>, GptWorkspace<xax::float16>> workspaces_;
  std::tuple<GptWorkspace<float>, GptWorkspace<xax::bfloat16>, GptWorkspace<xax::float16>> eval_workspaces_;
};

}  // namespace detail

/// Trains the GPT under one policy and measures it (peak RSS reset first, as for the MLP runs).
inline TrainingRun run_char_training(const CharTrainingSetup& setup, const CharCorpus& corpus) {
  setup.shape.validate();
  TrainingRun run;
  run.workload = "char-transformer";
  run.configuration = "char-transformer";  // keeps the MLP's "standard" comparisons and plots to the MLP
  run.policy = setup.policy;
  run.policy_spec = xax::get_policy(setup.policy).str();
  run.loss_scaling = setup.loss_scaling;
  run.layer_sizes = {setup.shape.vocabulary, setup.shape.block_size, setup.shape.layers, setup.shape.heads,
                     setup.shape.embedding};
  run.batch_size = setup.batch_size;
  run.epochs = 1;
  run.train_samples = static_cast<std::int64_t>(corpus.train.size());
  run.test_samples = setup.final_eval_batches * setup.batch_size * setup.shape.block_size;

  detail::GptConfig config;
  config.learning_rate = nanogpt_learning_rate(0, setup);
  config.weight_decay = setup.weight_decay;
  config.beta2 = setup.beta2;
  config.batch_size = setup.batch_size;
  config.epochs = 1;
  config.max_steps = setup.steps;
  config.seed = static_cast<std::int64_t>(setup.seed);
  config.log_interval = 0;
  config.progress = false;
  config.enable_mixed_precision = true;
  config.precision_policy = setup.policy;
  config.loss_scaling = setup.loss_scaling;
  config.max_grad_norm = setup.max_grad_norm;

  detail::CharRecorder recorder;
  detail::measure_fit(
      run, "char-transformer " + run.policy + ":", setup.steps, setup.progress,
      [&](Progress& progress) { return detail::CharGptTask(config, setup, corpus, recorder, progress); },
      [&](detail::CharGptTask& task) {
        const auto [val_loss, val_accuracy] =
            task.validation(static_cast<std::size_t>(setup.final_eval_batches));
        run.val_loss = val_loss;
        run.test_accuracy = val_accuracy;
        recorder.val_curve.push_back({static_cast<std::int64_t>(recorder.step_ms.size()), val_loss});
      });
  run.tensor_bytes.activations = recorder.activation_bytes;
  run.steps = static_cast<std::int64_t>(recorder.step_ms.size());
  run.loss_curve = detail::loss_curve(recorder.step_loss);
  run.val_curve = recorder.val_curve;
  const std::size_t interval = std::max<std::size_t>(1, recorder.loss_scale.size() / 200);
  for (std::size_t i = 0; i < recorder.loss_scale.size(); i += interval)
    run.loss_scale_curve.push_back({static_cast<std::int64_t>(i + 1), recorder.loss_scale[i]});
  if (!recorder.loss_scale.empty() && (recorder.loss_scale.size() - 1) % interval != 0)
    run.loss_scale_curve.push_back(
        {static_cast<std::int64_t>(recorder.loss_scale.size()), recorder.loss_scale.back()});
  run.last_non_finite = recorder.last_non_finite;
  run.matmul_implementation = recorder.matmul_implementation;
  // nanoGPT-style estimate of the final training loss: the mean of the last tenth of the steps.
  const std::size_t tail = std::max<std::size_t>(1, recorder.step_loss.size() / 10);
  run.final_train_loss = detail::MlpTask::finite_mean(
      std::span(recorder.step_loss)
          .subspan(recorder.step_loss.size() - std::min(tail, recorder.step_loss.size())));
  std::vector<double> steady(
      recorder.step_ms.begin() +
          std::min<std::ptrdiff_t>(static_cast<std::ptrdiff_t>(recorder.step_ms.size()) / 10, 5),
      recorder.step_ms.end());
  if (steady.empty()) steady = recorder.step_ms;
  run.step_time_ms = detail::percentile(steady, 0.5);
  run.step_time_p10_ms = detail::percentile(steady, 0.1);
  run.step_time_p90_ms = detail::percentile(steady, 0.9);
  run.throughput_samples_per_s =
      run.step_time_ms > 0 ? 1000.0 * static_cast<double>(run.batch_size) / run.step_time_ms : 0;
  run.tokens_per_s = run.throughput_samples_per_s * static_cast<double>(setup.shape.block_size);
  return run;
}

}  // namespace xax_bench
