// Data-parallel training over MPI: the custom trainer's task with one more base, DataParallelMixin, and one
// more config section, DataParallelConfig. Every rank starts from rank 0's params, trains on its share of
// every global batch (batch_size * accumulation_steps examples), and the gradients are summed in fp32 so that
// every rank takes the same step. In deterministic mode (the default) the final params are bit-identical
// for 1, 2 and 4 ranks: compare the params_crc32 lines.
//
//   mpirun -np 2 ./data_parallel                                  # Fashion-MNIST if installed, else
//   synthetic mpirun -np 4 ./data_parallel epochs=1 gradient_wire_dtype=bfloat16 mpirun -H a,b -np 2
//   ./data_parallel                           # two machines, one rank each
//
// zero_stage=1 shards the optimizer state over the ranks (ZeRO-1), and under a mixed policy the fp32 masters
// too (each rank holds its shard; the bf16 compute copy is all-gathered); the params_crc32 stays the same.
// Any field of the config can be given as key=value. A rank that fails ends the whole job with its message.
#include <xax/distributed/data_parallel.hpp>
#include <xax/nn/mlp.hpp>
#include <xax/task/mixins/mixed_precision.hpp>
#include <xax/task/mixins/train.hpp>
#include <xax/utils/tree_crc32.hpp>
#include <xax_datasets/fashion_mnist.hpp>
#include <xax_datasets/synthetic.hpp>

#include <concepts>
#include <cstdint>
#include <cstdio>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

struct ParallelConfig : xax::TrainConfig, xax::MixedPrecisionConfig, xax::distributed::DataParallelConfig {
  std::int64_t hidden = 256;
  // As in custom_trainer: a wider MLP would only end in an allocation failure on the machines this is for.
  static constexpr std::int64_t max_hidden = 16384;
  ParallelConfig() {
    enable_mixed_precision = true;
    precision_policy = "mixed";
    loss_scaling = "dynamic";
    learning_rate = 1e-3;
    batch_size = 64;         // per micro-batch
    accumulation_steps = 4;  // micro-batches per step: a global batch of 256, shared by 1, 2 or 4 ranks
    epochs = 3;
    log_interval = 0;
  }
  template <class Self, class Visit>
  static void visit_fields(Self& self, Visit&& visit) {
    visit("hidden", self.hidden, "an integer from 1 to 16384");
  }
  void validate() const {
    if (hidden < 1 || hidden > max_hidden) {
      throw xax::ConfigError("config field 'hidden': " + std::to_string(hidden) +
                             " is out of range; accepted: an integer from 1 to " +
                             std::to_string(max_hidden));
    }
  }
};

struct Batch {
  Eigen::MatrixXf x;  // features x samples
  Eigen::VectorX<std::int32_t> labels;
};

class ParallelTask : public xax::TrainMixin<ParallelTask, ParallelConfig>,
                     public xax::MixedPrecisionMixin<ParallelTask, ParallelConfig>,
                     public xax::distributed::DataParallelMixin<ParallelTask> {
 public:
  template <class T>
  using params_type = xax::nn::MlpParams<T>;
  using batch_type = Batch;

  ParallelTask(const ParallelConfig& config, xax::ClassificationSplits data)
      : TrainMixin(config),
        DataParallelMixin(static_cast<const xax::distributed::DataParallelConfig&>(config)),
        data_(std::move(data)) {
    if (rank() != 0) set_log_stream(nullptr);  // one rank reports
  }

  params_type<float> init_params() const {
    const auto features = data_.train.feature_count();
    const auto hidden = static_cast<Eigen::Index>(config().hidden);
    return xax::nn::mlp_init({features, hidden, hidden, data_.train.num_classes},
                             static_cast<std::uint64_t>(config().seed));
  }
  // The config's optimizer, its state sharded over the ranks when zero_stage=1.
  auto make_optimizer(const params_type<float>& like) const {
    return sharded_optimizer(like, config().optimizer_options());
  }
  std::int64_t num_examples() const { return data_.train.size(); }
  Batch make_batch(std::span<const std::int64_t> indices) const {
    Batch batch{Eigen::MatrixXf(data_.train.feature_count(), static_cast<Eigen::Index>(indices.size())),
                Eigen::VectorX<std::int32_t>(static_cast<Eigen::Index>(indices.size()))};
    for (std::size_t i = 0; i < indices.size(); ++i) {
      batch.x.col(static_cast<Eigen::Index>(i)) = data_.train.features.col(indices[i]);
      batch.labels(static_cast<Eigen::Index>(i)) = data_.train.labels(indices[i]);
    }
    return batch;
  }

  static constexpr bool writes_fp32_gradients = true;
  template <class T, class G>
  requires(std::same_as<G, T> ||
           std::same_as<G, float>) double loss_and_grads(const params_type<T>& params, const Batch& batch,
                                                         float loss_scale, params_type<G>& grads) {
    return xax::nn::mlp_loss_and_gradients(params, batch.x, batch.labels, grads, workspace<T>(),
                                           {.loss_scale = loss_scale});
  }
  template <class T>
  double evaluate(const params_type<T>& params, const Batch& batch) {
    const auto& logits = xax::nn::mlp_forward(params, batch.x, workspace<T>());
    return static_cast<double>(xax::nn::count_correct(logits, batch.labels)) /
           static_cast<double>(batch.x.cols());
  }

  void on_epoch_end(std::int64_t epoch) {
    const Batch test{data_.test.features, data_.test.labels};
    const double accuracy = evaluate_batch(test);  // every rank holds the same params
    if (rank() == 0) {
      std::printf("epoch %lld: test accuracy %.2f%% (%d ranks, loss scale %g, %lld skipped steps)\n",
                  static_cast<long long>(epoch + 1), 100.0 * accuracy, world_size(),
                  static_cast<double>(current_loss_scale()), static_cast<long long>(skipped_steps()));
    }
  }

 private:
  template <class T>
  xax::nn::MlpWorkspace<T>& workspace() {
    return std::get<xax::nn::MlpWorkspace<T>>(workspaces_);
  }
  xax::ClassificationSplits data_;
  std::tuple<xax::nn::MlpWorkspace<float>, xax::nn::MlpWorkspace<xax::bfloat16>,
             xax::nn::MlpWorkspace<xax::float16>>
      workspaces_;
};

int main(int argc, char** argv) {
  xax::distributed::Environment mpi(argc, argv);
  return xax::distributed::run_or_abort([&] {
    ParallelConfig config;
    std::vector<std::string_view> args(argv + 1, argv + argc);
    xax::apply_config_args(config, args);
    const auto fashion = xax::find_fashion_mnist();
    xax::ClassificationSplits data;
    if (fashion) {
      data = xax::load_fashion_mnist(*fashion);
    } else {
      xax::SyntheticClassificationOptions options;
      options.train_samples = 8192;
      options.test_samples = 2048;
      data = xax::make_synthetic_classification(options);
    }
    ParallelTask task(config, std::move(data));
    if (task.rank() == 0) {
      std::printf(
          "data-parallel training on %d ranks: %s, global batch %lld (%lld micro-batches of %lld), %s "
          "wire, %s reduction, zero stage %d, policy %s\n",
          task.world_size(), fashion ? "Fashion-MNIST" : "a synthetic task (Fashion-MNIST not installed)",
          static_cast<long long>(config.batch_size * config.accumulation_steps),
          static_cast<long long>(config.accumulation_steps), static_cast<long long>(config.batch_size),
          config.gradient_wire_dtype.c_str(), config.deterministic_reduction ? "deterministic" : "fast",
          task.zero_stage(), task.policy().str().c_str());
    }
    const xax::TrainSummary summary = task.fit();
    const auto params = task.params_float32();
    // Bytes of masters and optimizer state this rank holds, and the optimizer state over all ranks.
    const xax::TrainStateBytes bytes = task.train_state_bytes();
    const auto optimizer_bytes = static_cast<std::int64_t>(bytes.optimizer);
    std::int64_t optimizer_bytes_all = 0;
    task.communicator().all_reduce(&optimizer_bytes, &optimizer_bytes_all, 1, MPI_SUM);
    if (task.rank() == 0) {
      std::printf(
          "zero stage %d: rank 0 holds %zu bytes of fp32 masters and %zu bytes of optimizer state "
          "(%lld over all ranks)\n",
          task.zero_stage(), bytes.params, bytes.optimizer, static_cast<long long>(optimizer_bytes_all));
      const xax::distributed::ReductionStats& stats = task.reduction_stats();
      std::printf(
          "%lld steps in %.2f s, final loss %.4f; gradient reduction %.3f s (%.1f%% of the run), %zu bytes "
          "sent per rank per step (gradients, and under ZeRO-1 the masters' all-gather)\n",
          static_cast<long long>(summary.steps), summary.seconds, summary.last_loss, stats.seconds,
          100.0 * stats.seconds / summary.seconds,
          stats.wire_bytes_last + task.master_gather_bytes_per_step());
#if XAX_HAS_ZLIB
      // The CRC-32 of the final master params' bytes in tree order: equal across world sizes in deterministic
      // mode.
      std::printf("params_crc32 %08lx\n", static_cast<unsigned long>(xax::tree_crc32(params)));
#endif
    }
    return 0;
  });
}
