#pragma once
// One training run of the comparison: an MLP classifier trained under one precision policy by a small task
// class built the way the seed's quick example builds one (TrainMixin + MixedPrecisionMixin over a config
// that inherits both configs), instrumented for the report: step times, loss curve, test accuracy per epoch,
// memory.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <numbers>
#include <span>
#include <string>
#include <tuple>
#include <vector>
#include <xax/nn/loss.hpp>
#include <xax/nn/mlp.hpp>
#include <xax/ops/convert.hpp>
#include <xax/ops/matmul.hpp>
#include <xax/task/mixins/mixed_precision.hpp>
#include <xax/task/mixins/train.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/policy.hpp>
#include <xax/utils/tree.hpp>
#include <xax/utils/tree_crc32.hpp>
#include <xax_datasets/dataset.hpp>

#if XAX_HAS_MPI
#include <xax/distributed/data_parallel.hpp>
#endif

#include "report/results.hpp"
#include "runner/batch_size.hpp"
#include "runner/memory.hpp"
#include "runner/policies.hpp"
#include "runner/progress.hpp"

namespace xax_bench {

/// What to train, on which configuration.
struct TrainingSetup {
  std::string configuration = "standard";
  std::string policy = "default";
  std::string loss_scaling = "none";
  std::vector<std::int64_t> layer_sizes{784, 512, 512, 10};
  std::int64_t batch_size = 256;
  /// Whether the user typed batch_size (then it must fit the train split) and under which option, for
  /// effective_batch_size and the messages.
  bool batch_size_given = false;
  std::string batch_size_option = "--batch-size";
  int epochs = 1;
  std::int64_t max_steps = 0;  ///< 0: all epochs
  double learning_rate = 1e-3;
  std::uint64_t seed = 0;
  bool evaluate = true;  ///< test accuracy after each epoch (the memory probe skips it)
  bool progress = true;
  /// Micro-batches per step: the step's batch_size examples are split into this many micro-batches of
  /// batch_size / accumulation_steps (the global batch stays batch_size).
  std::int64_t accumulation_steps = 1;
  /// Train data-parallel over MPI_COMM_WORLD (every rank its share of each step's micro-batches, gradients
  /// summed in fp32, deterministic): needs a build with MPI and MPI initialised.
  bool data_parallel = false;
  /// Data-parallel only: xax::distributed::DataParallelConfig's gradient_wire_dtype, zero_stage and
  /// bucket_size (validated, with the field's name, when the task is built).
  std::string wire_dtype = "float32";
  std::int64_t zero_stage = 0;
  std::int64_t bucket_size = 0;
};

/// "onednn" or "eigen": what xax::matmul picks in this build when asked for nothing in particular.
inline std::string matmul_backend_description() {
  return std::string(xax::matmul_backend_name(xax::default_matmul_backend())) +
         (xax::default_matmul_backend() == xax::MatmulBackend::onednn
              ? " (oneDNN, fp32 accumulation)"
              : " (portable Eigen path, fp32 accumulation)");
}

namespace detail {

/// A mini-batch: features x samples, and one label per column, over the features' scalar. The task declares
/// casts_batch_to_compute, so TrainStep casts the fp32 batch to the policy's compute type with the params (as
/// jmp casts `(params, batch)`), and the model reads it without a conversion of its own.
template <class T>
struct MlpBatch {
  xax::nn::Matrix<T> x;
  Eigen::VectorX<std::int32_t> y;
  XAX_FIELDS(x, y);
};

/// The benchmark's config: the seed's `MyConfig(TrainConfig, MixedPrecisionConfig)`.
struct MlpConfig : xax::TrainConfig, xax::MixedPrecisionConfig {};

template <class T>
std::size_t workspace_bytes(const xax::nn::MlpWorkspace<T>& workspace) {
  const auto bytes = [](const auto& m) { return static_cast<std::size_t>(m.size()) * sizeof(T); };
  std::size_t total = bytes(workspace.input) + bytes(workspace.grad) + bytes(workspace.grad_below);
  for (const auto& m : workspace.outputs) total += bytes(m);
  for (const auto& m : workspace.pre_activations) total += bytes(m);
  return total;
}

/// What the task records while fit() runs.
struct RunRecorder {
  std::vector<double> step_ms;
  std::vector<double> step_loss;  // NaN for skipped steps
  std::vector<xax_bench::EpochRecord> epochs;
  std::string last_non_finite;
  std::size_t activation_bytes = 0;
  std::string matmul_implementation;
};

/// No extra base: the single-process task.
template <class Derived>
struct SingleProcess {
  explicit SingleProcess(const TrainingSetup& /*setup*/) {}
};

#if XAX_HAS_MPI
/// The data-parallel base: DataParallelMixin configured from the setup's wire type, ZeRO stage and bucket
/// size, and the optimizer ZeRO-1 needs (under zero_stage 0 the same optimizer, unsharded).
template <class Derived>
class ConfiguredDataParallel : public xax::distributed::DataParallelMixin<Derived> {
 public:
  explicit ConfiguredDataParallel(const TrainingSetup& setup)
      : xax::distributed::DataParallelMixin<Derived>(data_parallel_config(setup)) {}

  template <class Params>
  auto make_optimizer(const Params& like) const {
    return this->sharded_optimizer(like, static_cast<const Derived&>(*this).config().optimizer_options());
  }

 private:
  static xax::distributed::DataParallelConfig data_parallel_config(const TrainingSetup& setup) {
    xax::distributed::DataParallelConfig config;
    config.gradient_wire_dtype = setup.wire_dtype;
    config.zero_stage = setup.zero_stage;
    config.bucket_size = setup.bucket_size;
    config.validate_data_parallel();
    return config;
  }
};
#endif

/// The user task: an MLP classifier, its data, and hooks that feed the recorder and the progress line.
/// `Extra` is one more CRTP base, constructed from the setup: SingleProcess, or ConfiguredDataParallel
/// (xax::distributed::DataParallelMixin with the setup's wire type, ZeRO stage and bucket size, deterministic
/// reduction), which is all it takes to train data-parallel.
template <template <class> class Extra>
class BasicMlpTask : public xax::TrainMixin<BasicMlpTask<Extra>, MlpConfig>,
                     public xax::MixedPrecisionMixin<BasicMlpTask<Extra>, MlpConfig>,
                     public Extra<BasicMlpTask<Extra>> {
  using TrainMixin = xax::TrainMixin<BasicMlpTask<Extra>, MlpConfig>;
  using MixedPrecisionMixin = xax::MixedPrecisionMixin<BasicMlpTask<Extra>, MlpConfig>;

 public:
  using compiled_policies = BenchmarkPolicies;
  template <class T>
  using params_type = xax::nn::MlpParams<T>;
  using batch_type = MlpBatch<float>;
  static constexpr bool casts_batch_to_compute = true;

  BasicMlpTask(MlpConfig config, const TrainingSetup& setup, const xax::ClassificationSplits& data,
               RunRecorder& recorder, Progress& progress, std::int64_t total_steps)
      : TrainMixin(std::move(config)),
        Extra<BasicMlpTask<Extra>>(setup),
        setup_(&setup),
        data_(&data),
        recorder_(&recorder),
        progress_(&progress),
        total_steps_(total_steps) {
    this->set_log_stream(
        nullptr);  // the benchmark draws its own progress line and reports skipped steps itself
  }

  [[nodiscard]] xax::nn::MlpParams<float> init_params() const {
    std::vector<Eigen::Index> sizes(setup_->layer_sizes.begin(), setup_->layer_sizes.end());
    return xax::nn::mlp_init<float>(std::span<const Eigen::Index>(sizes), setup_->seed + 1);
  }

  [[nodiscard]] std::int64_t num_examples() const { return data_->train.size(); }

  /// The batch of the given examples, made directly in `T` (xax::makes_batches_in): fit() has the step make
  /// each batch in the policy's compute type, so a 16-bit run never holds an fp32 batch. The features are
  /// rounded from the fp32 dataset once, as a cast would round them.
  template <class T = float>
  [[nodiscard]] MlpBatch<T> make_batch(std::span<const std::int64_t> indices) const {
    const auto start = std::chrono::steady_clock::now();
    MlpBatch<T> batch;
    const auto columns = static_cast<Eigen::Index>(indices.size());
    batch.x.resize(data_->train.feature_count(), columns);
    batch.y.resize(columns);
    for (Eigen::Index i = 0; i < columns; ++i) {
      const auto example = static_cast<Eigen::Index>(indices[static_cast<std::size_t>(i)]);
      if constexpr (std::is_same_v<T, float>) {
        batch.x.col(i) = data_->train.features.col(example);
      } else {
        xax::convert(std::span<const float>(data_->train.features.col(example).data(),
                                            static_cast<std::size_t>(batch.x.rows())),
                     std::span<T>(batch.x.col(i).data(), static_cast<std::size_t>(batch.x.rows())));
      }
      batch.y[i] = data_->train.labels[example];
    }
    batch_ms_ += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    return batch;
  }

  /// Declares the fp32-gradient path of loss_and_grads below (checked at compile time).
  static constexpr bool writes_fp32_gradients = true;

  /// G is T or float: TrainStep asks for fp32 gradients of half parameters, which the backward's matmuls
  /// write straight from their fp32 accumulators.
  template <class T, class G>
  requires(std::same_as<G, T> ||
           std::same_as<G, float>) double loss_and_grads(const xax::nn::MlpParams<T>& params,
                                                         const MlpBatch<T>& batch, float loss_scale,
                                                         xax::nn::MlpParams<G>& grads) {
    auto& workspace = std::get<xax::nn::MlpWorkspace<T>>(workspaces_);
    const float loss = xax::nn::mlp_loss_and_gradients(params, batch.x, batch.y, grads, workspace,
                                                       {.loss_scale = loss_scale});
    recorder_->activation_bytes = std::max(recorder_->activation_bytes, workspace_bytes(workspace));
    recorder_->matmul_implementation = xax::last_matmul_implementation();
    return static_cast<double>(loss);
  }

  /// The number of correctly classified samples of the batch, computed in the policy's compute type.
  template <class T>
  double evaluate(const xax::nn::MlpParams<T>& params, const MlpBatch<T>& batch) {
    auto& workspace = std::get<xax::nn::MlpWorkspace<T>>(eval_workspaces_);
    return static_cast<double>(
        xax::nn::count_correct(xax::nn::mlp_forward(params, batch.x, workspace), batch.y));
  }

  /// TrainMixin calls this for every step; it wraps MixedPrecisionMixin's step to time it alone: the step
  /// makes its batches (make_batch above), and their assembly is not counted, nor is evaluation.
  xax::StepResult train_step_on_examples(
      std::span<const std::span<const std::int64_t>> micro_batch_examples) {
    batch_ms_ = 0;
    const auto start = std::chrono::steady_clock::now();
    const xax::StepResult result = MixedPrecisionMixin::train_step_on_examples(micro_batch_examples);
    recorder_->step_ms.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count() -
        batch_ms_);
    return result;
  }

  void on_step(std::int64_t step, const xax::StepResult& result) {
    recorder_->step_loss.push_back(result.finite ? result.loss : std::numeric_limits<double>::quiet_NaN());
    if (!result.finite) recorder_->last_non_finite = result.non_finite;
    // Cosine decay to zero over the run: the end of training settles instead of wandering, which is what
    // makes final accuracies of different policies comparable to a few tenths of a point.
    const double progress =
        static_cast<double>(step) / static_cast<double>(std::max<std::int64_t>(total_steps_, 1));
    this->set_learning_rate(setup_->learning_rate * 0.5 *
                            (1.0 + std::cos(std::numbers::pi * std::min(progress, 1.0))));
    if (step % 10 == 0 || step == total_steps_) {
      char detail[128];
      std::snprintf(detail, sizeof detail, "epoch %lld/%d, loss %.4f, scale %g, skipped %lld",
                    static_cast<long long>(this->epoch() + 1), setup_->epochs, result.loss,
                    static_cast<double>(result.loss_scale), static_cast<long long>(result.skipped_steps));
      progress_->update(step, detail);
    }
  }

  void on_epoch_end(std::int64_t epoch_index) {
    const auto steps_so_far = static_cast<std::ptrdiff_t>(recorder_->step_loss.size());
    const std::ptrdiff_t first = recorder_->epochs.empty() ? 0 : epoch_first_step_;
    epoch_first_step_ = steps_so_far;
    EpochRecord record;
    record.epoch = static_cast<int>(epoch_index + 1);
    record.train_loss = finite_mean(std::span(recorder_->step_loss).subspan(static_cast<std::size_t>(first)));
    double seconds = 0;
    for (std::ptrdiff_t i = first; i < steps_so_far; ++i)
      seconds += recorder_->step_ms[static_cast<std::size_t>(i)];
    record.seconds = seconds / 1000.0;
    record.loss_scale = this->current_loss_scale();
    record.skipped_steps = this->skipped_steps();
    if (setup_->evaluate) record.test_accuracy = test_accuracy();
    recorder_->epochs.push_back(record);
  }

  /// The fraction of the test split classified correctly, in the policy's compute precision.
  double test_accuracy() {
    const xax::ClassificationDataset& test = data_->test;
    constexpr Eigen::Index chunk = 1000;  // bounds the evaluation's memory, whatever the split's size
    double correct = 0;
    MlpBatch<float> batch;
    for (Eigen::Index start = 0; start < test.size(); start += chunk) {
      const Eigen::Index count = std::min(chunk, test.size() - start);
      batch.x = test.features.middleCols(start, count);
      batch.y = test.labels.segment(start, count);
      correct += this->evaluate_batch(batch);
    }
    return test.size() == 0 ? 0.0 : correct / static_cast<double>(test.size());
  }

  static double finite_mean(std::span<const double> values) {
    double sum = 0;
    std::size_t count = 0;
    for (double v : values) {
      if (std::isfinite(v)) {
        sum += v;
        ++count;
      }
    }
    return count == 0 ? std::numeric_limits<double>::quiet_NaN() : sum / static_cast<double>(count);
  }

 private:
  const TrainingSetup* setup_;
  const xax::ClassificationSplits* data_;
  RunRecorder* recorder_;
  Progress* progress_;
  std::int64_t total_steps_;
  std::ptrdiff_t epoch_first_step_ = 0;
  mutable double batch_ms_ = 0;  // time this step spent making its batches, not counted as step time
  std::tuple<xax::nn::MlpWorkspace<float>, xax::nn::MlpWorkspace<xax::bfloat16>,
             xax::nn::MlpWorkspace<xax::float16>>
      workspaces_;
  std::tuple<xax::nn::MlpWorkspace<float>, xax::nn::MlpWorkspace<xax::bfloat16>,
             xax::nn::MlpWorkspace<xax::float16>>
      eval_workspaces_;
};

using MlpTask = BasicMlpTask<SingleProcess>;
#if XAX_HAS_MPI
using DataParallelMlpTask = BasicMlpTask<ConfiguredDataParallel>;
#endif

inline double percentile(std::vector<double> values, double fraction) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const double position = fraction * static_cast<double>(values.size() - 1);
  const auto below = static_cast<std::size_t>(std::floor(position));
  const std::size_t above = std::min(below + 1, values.size() - 1);
  return values[below] + (position - static_cast<double>(below)) * (values[above] - values[below]);
}

/// The loss curve: the mean finite loss of every `interval` steps, about 200 points per run.
inline std::vector<LossPoint> loss_curve(const std::vector<double>& step_loss) {
  const std::size_t interval = std::max<std::size_t>(1, step_loss.size() / 200);
  std::vector<LossPoint> curve;
  for (std::size_t first = 0; first < step_loss.size(); first += interval) {
    const std::size_t count = std::min(interval, step_loss.size() - first);
    curve.push_back({static_cast<std::int64_t>(first + count),
                     MlpTask::finite_mean(std::span(step_loss).subspan(first, count))});
  }
  return curve;
}

/// Runs one measured fit() for both workloads: resets the peak RSS, then builds the task with
/// `make_task(progress)` (so its parameters and optimizer state count towards the run's growth), times fit(),
/// keeps a LossScaleError as the run's result (training that can only skip steps from here on is a result to
/// report, not a reason to lose the other runs), and reads the peak and the parameter and train-state bytes
/// before `after_fit(task)` evaluates, which then cannot move the peak. The activation bytes are the
/// workload's recorder's to fill in.
template <class MakeTask, class AfterFit>
void measure_fit(TrainingRun& run, const std::string& title, std::int64_t total_steps, bool show_progress,
                 MakeTask&& make_task, AfterFit&& after_fit) {
  // The matmul scratch an earlier run left on this thread would otherwise count as this run's baseline, and
  // make one run's peak growth depend on the runs before it.
  xax::release_matmul_scratch();
  run.peak_rss_reset = reset_peak_rss();
  run.rss_before_bytes = current_rss_bytes();
  Progress progress(title, total_steps, show_progress);
  auto task = make_task(progress);
  const auto start = std::chrono::steady_clock::now();
  try {
    task.fit();
  } catch (const xax::LossScaleError& error) {
    run.error = error.what();
  }
  run.train_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  progress.finish();
  run.peak_rss_bytes = peak_rss_bytes();
  const xax::TrainStateBytes state = task.train_state_bytes();
  run.tensor_bytes.params = state.params;
  run.tensor_bytes.train_state = state.total() - state.params;
  run.skipped_steps = task.skipped_steps();
  run.final_loss_scale = task.current_loss_scale();
  after_fit(task);
}

}  // namespace detail

/// Trains one configuration under one policy and measures it. The peak RSS is reset first, so the run's own
/// allocations (parameters, optimizer state, activations, batches) are what its peak growth shows.
inline TrainingRun run_training(const TrainingSetup& setup, const xax::ClassificationSplits& data) {
  TrainingRun run;
  run.configuration = setup.configuration;
  run.policy = setup.policy;
  run.policy_spec = xax::get_policy(setup.policy).str();
  run.loss_scaling = setup.loss_scaling;
  run.layer_sizes = setup.layer_sizes;
  run.train_samples = data.train.size();
  run.test_samples = data.test.size();

  if (setup.accumulation_steps < 1) {
    throw xax::ConfigError("--accumulation-steps " + std::to_string(setup.accumulation_steps) +
                           " is not >= 1; a step is split into that many micro-batches");
  }
  const std::int64_t global_batch = effective_batch_size(setup.batch_size, setup.batch_size_given,
                                                         setup.batch_size_option, data.train.size());
  if (global_batch % setup.accumulation_steps != 0) {
    // Quotes the batch as typed, or says where a reduced default came from.
    const std::string batch =
        global_batch == setup.batch_size
            ? setup.batch_size_option + " " + std::to_string(global_batch)
            : "the batch " + std::to_string(global_batch) + " (" + setup.batch_size_option + "'s default " +
                  std::to_string(setup.batch_size) + ", reduced to the training samples)";
    throw xax::ConfigError(batch + " is not a multiple of --accumulation-steps " +
                           std::to_string(setup.accumulation_steps) +
                           "; the global batch is split into micro-batches of equal size");
  }
  detail::MlpConfig config;
  config.learning_rate = setup.learning_rate;
  config.batch_size = global_batch / setup.accumulation_steps;  // per micro-batch
  config.accumulation_steps = setup.accumulation_steps;
  config.epochs = setup.epochs;
  config.max_steps = setup.max_steps;
  config.seed = static_cast<std::int64_t>(setup.seed);
  config.log_interval = 0;
  config.progress = false;
  config.enable_mixed_precision = true;
  config.precision_policy = setup.policy;
  config.loss_scaling = setup.loss_scaling;
  run.batch_size = global_batch;
  run.epochs = setup.epochs;

  const std::int64_t steps_per_epoch = data.train.size() / global_batch;
  const std::int64_t total_steps = setup.max_steps > 0
                                       ? std::min(setup.max_steps, steps_per_epoch * setup.epochs)
                                       : steps_per_epoch * setup.epochs;

  detail::RunRecorder recorder;
  const auto after_fit = [&](auto& task) {
    // The memory probe does not evaluate while its peak is measured; its accuracy after a few steps is
    // taken once, after the peak was read, as a sanity check only.
    if (!setup.evaluate || !run.error.empty()) run.test_accuracy = task.test_accuracy();
    if constexpr (xax::has_tree_crc32) run.params_crc32 = xax::tree_crc32(task.params_float32());
  };
  if (!setup.data_parallel) {
    detail::measure_fit(
        run, run.label() + ":", total_steps, setup.progress,
        [&](Progress& progress) {
          return detail::MlpTask(config, setup, data, recorder, progress, total_steps);
        },
        after_fit);
  } else {
#if XAX_HAS_MPI
    detail::measure_fit(
        run, run.label() + ":", total_steps, setup.progress,
        [&](Progress& progress) {
          return detail::DataParallelMlpTask(config, setup, data, recorder, progress, total_steps);
        },
        [&](detail::DataParallelMlpTask& task) {
          after_fit(task);
          const xax::distributed::ReductionStats& stats = task.reduction_stats();
          DataParallelRecord record;
          record.world_size = task.world_size();
          record.accumulation_steps = config.accumulation_steps;
          record.micro_batch_size = config.batch_size;
          record.wire_dtype = std::string(xax::dtype_name(task.reducer_options().wire));
          record.deterministic = task.reducer_options().deterministic;
          record.communication_seconds = stats.seconds;
          double step_seconds = 0;
          for (const double ms : recorder.step_ms) step_seconds += ms / 1000.0;
          record.communication_share = step_seconds > 0 ? stats.seconds / step_seconds : 0;
          record.wire_bytes_per_step = stats.wire_bytes_last;
          record.zero_stage = task.zero_stage();
          record.bucket_size = static_cast<std::int64_t>(task.reducer_options().bucket_size);
          record.buckets_per_step = stats.buckets_last;
          record.reducer_buffer_bytes = stats.buffer_bytes;
          record.master_gather_bytes_per_step = task.master_gather_bytes_per_step();
          record.optimizer_state_bytes = task.train_state_bytes().optimizer;
          record.master_bytes = task.train_state_bytes().params;
          run.data_parallel = record;
        });
#else
    throw xax::ConfigError(
        "data-parallel training needs a mixed_precision_benchmark built with MPI (xax::mpi; install "
        "libopenmpi-dev openmpi-bin and reconfigure)");
#endif
  }
  run.tensor_bytes.activations = recorder.activation_bytes;
  run.steps = static_cast<std::int64_t>(recorder.step_ms.size());
  run.epoch_records = recorder.epochs;
  run.loss_curve = detail::loss_curve(recorder.step_loss);
  run.last_non_finite = recorder.last_non_finite;
  run.matmul_implementation = recorder.matmul_implementation;
  if (setup.evaluate && run.error.empty() && !run.epoch_records.empty()) {
    run.test_accuracy = run.epoch_records.back().test_accuracy;
  }
  // The last epoch's mean loss: one step's loss is a noisy sample of the model's training loss.
  run.final_train_loss = run.epoch_records.empty() ? detail::MlpTask::finite_mean(recorder.step_loss)
                                                   : run.epoch_records.back().train_loss;

  // The first steps pay for first-touch page faults and backend set-up; time the steady state.
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
  return run;
}

}  // namespace xax_bench
