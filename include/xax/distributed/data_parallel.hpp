#pragma once
/// \file
/// `DataParallelConfig` and `DataParallelMixin<Derived>`: data-parallel training over MPI for a task built
/// on xax's mixins or directly on xax::TrainStep (DESIGN §12).
///
/// A mixin task adds one base and one config section, and runs under `mpirun -np N`:
///
///     struct MyConfig : xax::TrainConfig, xax::MixedPrecisionConfig, xax::distributed::DataParallelConfig
///     {}; class MyTask : public xax::TrainMixin<MyTask, MyConfig>,
///                    public xax::MixedPrecisionMixin<MyTask, MyConfig>,
///                    public xax::distributed::DataParallelMixin<MyTask> {
///      public:
///       MyTask(MyConfig c) : TrainMixin(c), DataParallelMixin(c) {}
///       ...  // init_params, num_examples, make_batch, loss_and_grads as without MPI
///     };
///
/// Then:
/// - every process starts from rank 0's init_params() (broadcast when the train state is built);
/// - a step is `accumulation_steps` micro-batches of `batch_size` examples (the global batch), the same
///   micro-batches whatever the number of processes; each process computes its share of them, a contiguous
///   block of accumulation_steps / W (TrainMixin's seeded per-epoch shuffle is the same on every process);
/// - their gradients are summed in fp32 by xax::distributed::GradientReducer and averaged over all
///   micro-batches, so every process takes the same skip decision and keeps the same loss scale and
///   counters; in deterministic mode (the default) the masters are bit-identical to a single process
///   running the same config;
/// - rank 0 alone writes checkpoints (the state is replicated; each rank can load the file).
///
/// ZeRO stage 1 (`zero_stage = 1`, see xax/distributed/zero.hpp) shards the optimizer state over the ranks:
/// the train step's optimizer must then be `sharded_optimizer(like, options)`, which a mixin task returns
/// from `make_optimizer` (one line, below) and a TrainStep trainer passes to reset_train_state. Under
/// zero_stage 0 the same optimizer runs unsharded. Before rank 0 writes a checkpoint every rank calls
/// prepare_checkpoint() (TrainMixin::fit does), which gathers the shards to rank 0.
///
///     auto make_optimizer(const params_type<float>& like) const {
///       return sharded_optimizer(like, config().optimizer_options());
///     }
///
/// A task on xax::TrainStep directly inherits DataParallelMixin too, broadcasts its initial params with
/// `synchronize_initial_params` before reset_train_state, and passes its rank's micro-batches to
/// train_step (xax::distributed::ShardSampler picks them).

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <xax/distributed/communicator.hpp>
#include <xax/distributed/gradient_reducer.hpp>
#include <xax/distributed/zero.hpp>
#include <xax/task/train_step.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>

namespace xax::distributed {

/// The data-parallel config section (xax's config files and `key=value` arguments read it).
struct DataParallelConfig {
  /// The type gradients travel in: float32 (default) or bfloat16 (half the bytes; each element summed in
  /// fp32 and rounded once).
  std::string gradient_wire_dtype = "float32";
  /// Bit-identical results for any number of processes (each micro-batch's gradients travel on their own);
  /// false sums each process's micro-batches locally first.
  bool deterministic_reduction = true;
  /// ZeRO stage: 0 (every rank holds the whole optimizer state) or 1 (each rank holds its shard of it; the
  /// task's optimizer must come from DataParallelMixin::sharded_optimizer).
  std::int64_t zero_stage = 0;

  template <class Self, class Visit>
  static void visit_data_parallel_fields(Self& self, Visit&& visit) {
    visit("gradient_wire_dtype", self.gradient_wire_dtype, "float32 or bfloat16 (also f32, bf16)");
    visit("deterministic_reduction", self.deterministic_reduction, "true or false");
    visit("zero_stage", self.zero_stage, "0 or 1");
  }

  void validate_data_parallel() const {
    static_cast<void>(wire_dtype());
    static_cast<void>(checked_zero_stage());
  }

  /// The ZeRO stage, or ConfigError naming the field.
  [[nodiscard]] int checked_zero_stage() const {
    if (zero_stage != 0 && zero_stage != 1) {
      throw ConfigError("config field 'zero_stage': " + std::to_string(zero_stage) +
                        " is not accepted; expected 0 (optimizer state replicated) or 1 (optimizer state "
                        "sharded over the ranks, ZeRO-1)");
    }
    return static_cast<int>(zero_stage);
  }

  /// The wire type, or ConfigError naming the field.
  [[nodiscard]] DType wire_dtype() const {
    DType wire{};
    try {
      wire = parse_dtype(gradient_wire_dtype);
    } catch (const ConfigError&) {
      wire = DType::float64;  // rejected below with the field's own message
    }
    if (wire != DType::float32 && wire != DType::bfloat16) {
      throw ConfigError("config field 'gradient_wire_dtype': '" + gradient_wire_dtype +
                        "' is not accepted; expected float32 or bfloat16 (also f32, bf16)");
    }
    return wire;
  }

  [[nodiscard]] ReducerOptions reducer_options() const {
    return {.wire = wire_dtype(), .deterministic = deterministic_reduction};
  }
};

/// CRTP base that makes a task data-parallel: it is TrainStep's gradient reducer, TrainMixin's sharding
/// and checkpoint-writer hooks, and MixedPrecisionMixin's initial-params hook (see the file comment).
template <class Derived>
class DataParallelMixin {
 public:
  /// The communicator (a private duplicate of MPI_COMM_WORLD unless another was given).
  [[nodiscard]] const Communicator& communicator() const { return reducer_.communicator(); }
  [[nodiscard]] int rank() const { return communicator().rank(); }
  [[nodiscard]] int world_size() const { return communicator().size(); }
  /// Communication time and bytes so far.
  [[nodiscard]] const ReductionStats& reduction_stats() const { return reducer_.stats(); }
  [[nodiscard]] const ReducerOptions& reducer_options() const { return reducer_.options(); }

  /// TrainStep's gradient_reducer hooks.
  template <class Grads>
  void collect_micro_gradients(std::size_t index, double loss, const Grads& grads) {
    reducer_.collect(index, loss, grads);
  }
  template <class Grads>
  ReducedGradients reduce_gradients(Grads& grads) {
    if (zero_stage_ == 1 && zero_registry_->live == nullptr) {
      throw ConfigError(
          "zero_stage 1 shards the optimizer state, but this train step's optimizer is not sharded: make it "
          "with sharded_optimizer(like, options) (a mixin task: `auto make_optimizer(const "
          "params_type<float>& like) const { return sharded_optimizer(like, config().optimizer_options()); "
          "}`), or set zero_stage 0");
    }
    return reducer_.reduce(grads);
  }

  /// The ZeRO stage (0 or 1).
  [[nodiscard]] int zero_stage() const { return zero_stage_; }

  /// The optimizer a data-parallel train step runs: AdamW or SGD (`options`, parameter groups included) over
  /// params shaped like `like`, whose state is sharded over the ranks under zero_stage 1 and whole under 0
  /// (see xax/distributed/zero.hpp). The communicator must outlive it (it does inside this task).
  template <class Params>
  [[nodiscard]] ZeroOptimizer<Params> sharded_optimizer(const Params& like,
                                                        const OptimizerOptions& options) const {
    return ZeroOptimizer<Params>(like, options, communicator().native(), zero_stage_ == 1, zero_registry_);
  }

  /// Collective: before rank 0 writes a checkpoint under zero_stage 1, every rank calls this, which gathers
  /// the optimizer state's shards to rank 0 (TrainMixin::fit calls it). Nothing to do under zero_stage 0.
  void prepare_checkpoint() {
    if (zero_stage_ != 1) return;
    if (!zero_registry_->gather) {
      throw ConfigError(
          "prepare_checkpoint: zero_stage 1, but no sharded optimizer was made with "
          "sharded_optimizer() for this task's train step");
    }
    zero_registry_->gather();
  }

  /// TrainMixin's sharding hook: whether micro-batch `index` of a step of `per_step` is this process's.
  /// Process r takes the block [r·per_step/W, (r+1)·per_step/W). Throws ConfigError (on every process alike)
  /// when a process would get none, or, in deterministic mode, when per_step is not a multiple of W.
  [[nodiscard]] bool owns_micro_batch(std::int64_t index, std::int64_t per_step) const {
    const std::int64_t world = world_size();
    if (per_step < world || (reducer_options().deterministic && per_step % world != 0)) {
      throw ConfigError(
          "config field 'accumulation_steps': " + std::to_string(per_step) +
          " micro-batches per step cannot be shared by " + std::to_string(world) + " processes; expected " +
          (reducer_options().deterministic ? "a multiple of the world size (4 serves 1, 2 and 4 processes)"
                                           : "at least the world size") +
          ". A step's global batch is batch_size * accumulation_steps examples");
    }
    const std::int64_t r = rank();
    return index >= r * per_step / world && index < (r + 1) * per_step / world;
  }

  /// MixedPrecisionMixin's initial-params hook: every process takes rank 0's initial params.
  template <class Params>
  void synchronize_initial_params(Params& params) const {
    broadcast_tree(communicator(), params, 0);
  }

  /// TrainMixin's checkpoint hook: rank 0 writes; the state is the same on every rank.
  [[nodiscard]] bool writes_checkpoints() const { return rank() == 0; }

 protected:
  explicit DataParallelMixin(ReducerOptions options = {}, Communicator comm = Communicator{})
      : reducer_(std::move(comm), options) {}
  /// `zero_stage`: 0 or 1 (ConfigError otherwise).
  DataParallelMixin(ReducerOptions options, int zero_stage, Communicator comm = Communicator{})
      : reducer_(std::move(comm), options), zero_stage_(checked_stage(zero_stage)) {}
  explicit DataParallelMixin(const DataParallelConfig& config, Communicator comm = Communicator{})
      : reducer_(std::move(comm), config.reducer_options()), zero_stage_(config.checked_zero_stage()) {}
  ~DataParallelMixin() = default;
  DataParallelMixin(DataParallelMixin&&) noexcept = default;
  DataParallelMixin& operator=(DataParallelMixin&&) noexcept = default;
  DataParallelMixin(const DataParallelMixin&) = delete;
  DataParallelMixin& operator=(const DataParallelMixin&) = delete;

 private:
  static int checked_stage(int stage) {
    DataParallelConfig config;
    config.zero_stage = stage;
    return config.checked_zero_stage();
  }

  GradientReducer reducer_;
  int zero_stage_ = 0;
  std::shared_ptr<detail::ZeroRegistry> zero_registry_ = std::make_shared<detail::ZeroRegistry>();
};

}  // namespace xax::distributed
