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
/// - rank 0 alone writes checkpoints (the state is replicated, or gathered to rank 0 under ZeRO-1; each rank
///   can load the file); after TrainMixin::load_checkpoint every rank checks that all ranks hold (or, with
///   sharded masters, read) the same masters (verify_loaded_state).
///
/// ZeRO stage 1 (`zero_stage = 1`, see xax/distributed/zero.hpp) shards the optimizer state over the ranks,
/// and the fp32 masters too when the compute type is narrower (the mixed policies; the full compute copy
/// stays on every rank, and TrainStep::params() gives way to the collective gather_params()): the train
/// step's optimizer must then be `sharded_optimizer(like, options)`, which a mixin task returns from
/// `make_optimizer` (one line, below) and a TrainStep trainer passes to reset_train_state. Under
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

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>
#include <xax/detail/random.hpp>
#include <xax/distributed/communicator.hpp>
#include <xax/distributed/gradient_reducer.hpp>
#include <xax/distributed/replica_check.hpp>
#include <xax/distributed/zero.hpp>
#include <xax/task/train_step.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/finite.hpp>

namespace xax::distributed {

/// The data-parallel config section (xax's config files and `key=value` arguments read it).
struct DataParallelConfig {
  /// The type gradients travel in: float32 (default) or bfloat16 (half the bytes; each element summed in
  /// fp32 and rounded once).
  std::string gradient_wire_dtype = "float32";
  /// Bit-identical results for any number of processes (each micro-batch's gradients travel on their own);
  /// false sums each process's micro-batches locally first.
  bool deterministic_reduction = true;
  /// ZeRO stage: 0 (every rank holds the whole optimizer state) or 1 (each rank holds its shard of it, and of
  /// the fp32 masters when the compute type is narrower; the task's optimizer must come from
  /// DataParallelMixin::sharded_optimizer).
  std::int64_t zero_stage = 0;
  /// Gradient elements exchanged per bucket (see GradientReducer): 0 (the default) reduces the whole
  /// gradient in one bucket; N > 0 bounds the reducer's receive, sum and gather buffers and every message to
  /// N elements (4 N bytes on the fp32 wire, 2 N on bf16). Bit-identical results for every value.
  std::int64_t bucket_size = 0;

  template <class Self, class Visit>
  static void visit_data_parallel_fields(Self& self, Visit&& visit) {
    visit("gradient_wire_dtype", self.gradient_wire_dtype, "float32 or bfloat16 (also f32, bf16)");
    visit("deterministic_reduction", self.deterministic_reduction, "true or false");
    visit("zero_stage", self.zero_stage, "0 or 1");
    visit("bucket_size", self.bucket_size, "0 (one bucket) or a positive number of gradient elements");
  }

  void validate_data_parallel() const {
    static_cast<void>(wire_dtype());
    static_cast<void>(checked_zero_stage());
    static_cast<void>(checked_bucket_size());
  }

  /// The bucket size in elements, or ConfigError naming the field.
  [[nodiscard]] std::size_t checked_bucket_size() const {
    if (bucket_size < 0) {
      throw ConfigError(
          "config field 'bucket_size': " + std::to_string(bucket_size) +
          " is not accepted; expected 0 (the whole gradient in one bucket) or a positive number "
          "of gradient elements per bucket");
    }
    return static_cast<std::size_t>(bucket_size);
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
    return {
        .wire = wire_dtype(), .deterministic = deterministic_reduction, .bucket_size = checked_bucket_size()};
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
  /// Under zero_stage 1 the gradients are reduce-scattered: `grads` receives the step's sums on this rank's
  /// shard only (zeros elsewhere), and unscale_check_and_norm_reduced combines the shards' findings.
  template <class Grads>
  ReducedGradients reduce_gradients(Grads& grads) {
    if (zero_stage_ != 1) return reducer_.reduce(grads);
    if (zero_registry_->live() == nullptr) {
      throw ConfigError(
          "zero_stage 1 shards the optimizer state, but this train step's optimizer is not sharded: make it "
          "with sharded_optimizer(like, options) (a mixin task: `auto make_optimizer(const "
          "params_type<float>& like) const { return sharded_optimizer(like, config().optimizer_options()); "
          "}`), or set zero_stage 0");
    }
    // By call as TrainStep calls it: a hook written as a template (or overloaded) has no address to take,
    // and would otherwise see this rank's shard alone.
    if constexpr (requires { &Derived::on_unscaled_gradients; } || unscaled_gradients_hook<Derived, Grads>) {
      throw ConfigError(
          "zero_stage 1 leaves each rank only its shard of the summed gradients, so on_unscaled_gradients "
          "would see a partial tree; remove the hook or set zero_stage 0");
    }
    const ZeroShardLayout& layout = live_layout();
    const auto world = static_cast<std::size_t>(world_size());
    shard_bounds_.resize(world + 1);
    for (std::size_t q = 0; q < world; ++q) shard_bounds_[q] = layout.shard_begin(static_cast<int>(q));
    shard_bounds_[world] = layout.elements();
    return reducer_.reduce_scatter(grads, shard_bounds_);
  }

  /// TrainStep's reduced_gradients_check: under zero_stage 1, unscales and checks this rank's shard and
  /// combines every shard's finite flag and per-block sums of squares, in the global block order, into the
  /// finite flag and norm unscale_check_and_norm gives over the whole gradient (the same bits: the same
  /// blocks, summed by the same function at the same addresses, added in the same order). Collective.
  template <class Grads>
  UnscaledGradients unscale_check_and_norm_reduced(Grads& grads, float inverse_scale) {
    if (zero_stage_ != 1) return unscale_check_and_norm(grads, inverse_scale);
    xax::detail::require_usable_factor(inverse_scale, "unscale_check_and_norm");
    const ZeroShardLayout& layout = live_layout();
    const std::vector<float*> leaves = detail::floating_leaf_pointers(grads);
    constexpr std::size_t block = xax::detail::norm_block;
    const auto blocks_of = [&](int q) {
      std::size_t count = 0;
      for (const ZeroSegment& piece : layout.segments(q)) count += (piece.count + block - 1) / block;
      return count;
    };
    local_partials_.clear();
    int finite = 1;
    for (const ZeroSegment& piece : layout.segments(rank())) {
      for (std::size_t i = 0; i < piece.count; i += block) {
        float* const x = leaves[piece.leaf] + piece.begin + i;
        const std::size_t n = std::min(block, piece.count - i);
        if (!xax::detail::scale_and_check_n(x, n, inverse_scale)) finite = 0;
        local_partials_.push_back(xax::detail::sum_of_squares(x, n));
      }
    }
    int all_finite = 0;
    communicator().all_reduce(&finite, &all_finite, 1, MPI_MIN);
    if (all_finite == 0) return {false, std::numeric_limits<double>::infinity()};
    const auto world = static_cast<std::size_t>(world_size());
    partial_counts_.resize(world);
    partial_offsets_.resize(world);
    std::size_t total = 0;
    for (std::size_t q = 0; q < world; ++q) {
      const std::size_t count = blocks_of(static_cast<int>(q));
      partial_counts_[q] = Communicator::as_count(count, "MPI_Allgatherv");
      partial_offsets_[q] = Communicator::as_count(total, "MPI_Allgatherv");
      total += count;
    }
    all_partials_.resize(total);
    communicator().all_gather_v(local_partials_.data(), static_cast<int>(local_partials_.size()),
                                all_partials_.data(), partial_counts_.data(), partial_offsets_.data());
    double sum = 0;
    for (const double partial : all_partials_) sum += partial;
    return {true, std::sqrt(sum)};
  }

  /// The ZeRO stage (0 or 1).
  [[nodiscard]] int zero_stage() const { return zero_stage_; }
  /// Bytes this rank sent in the last step's ZeRO-1 all-gather: of its updated shard of the fp32 masters,
  /// or, when the masters are sharded (the optimizer owns them), of its shard of the compute copy in the
  /// compute type (half the bytes for bf16), to each other rank. The reducer's stats count the gradients'
  /// reduce-scatter. 0 under zero_stage 0.
  [[nodiscard]] std::size_t master_gather_bytes_per_step() const {
    if (zero_stage_ != 1 || zero_registry_->live() == nullptr) return 0;
    return zero_registry_->live()->master_gather_bytes();
  }
  /// Whether this task's train step has its fp32 masters sharded over the ranks (ZeRO-1 with a compute type
  /// narrower than the masters; see xax/distributed/zero.hpp): TrainStep::params() then throws, and
  /// gather_params() / params_float32() are collectives.
  [[nodiscard]] bool masters_sharded() const {
    return zero_stage_ == 1 && zero_registry_->live() != nullptr &&
           zero_registry_->live()->owned_masters_digest().has_value();
  }

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
    if (zero_registry_->live() == nullptr) {
      throw ConfigError(
          "prepare_checkpoint: zero_stage 1, but no sharded optimizer was made with "
          "sharded_optimizer() for this task's train step");
    }
    zero_registry_->live()->gather();
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

  /// TrainMixin's before-fit hook: collective. Throws ConfigError on every rank alike, naming each number
  /// the ranks disagree on and its range, unless all of `values` (named by `names`) are the same on every
  /// rank.
  void verify_fit_agrees(std::span<const std::int64_t> values, std::span<const char* const> names) {
    std::vector<std::int64_t> lowest(values.size()), highest(values.size());
    communicator().all_reduce(values.data(), lowest.data(), values.size(), MPI_MIN);
    communicator().all_reduce(values.data(), highest.data(), values.size(), MPI_MAX);
    std::string differing;
    for (std::size_t i = 0; i < values.size(); ++i) {
      if (lowest[i] == highest[i]) continue;
      differing += (differing.empty() ? "" : ", ") + std::string(names[i]) + " (from " +
                   std::to_string(lowest[i]) + " to " + std::to_string(highest[i]) + ")";
    }
    if (!differing.empty()) {
      throw ConfigError(
          "xax::distributed::DataParallelMixin: the " + std::to_string(world_size()) +
          " processes disagree on " + differing +
          "; every process must load the whole data set and the same config (fit gives each its "
          "share of every step) and resume from the same checkpoint");
    }
  }

  /// TrainMixin's checkpoint hook: rank 0 writes; the state is the same on every rank (under ZeRO-1,
  /// prepare_checkpoint gathered its shards to rank 0).
  [[nodiscard]] bool writes_checkpoints() const { return rank() == 0; }

  /// TrainMixin::load_checkpoint's agreement: collective. Each process says whether it read and checked its
  /// copy of the checkpoint (`loaded`); a process that did throws CheckpointError, naming the processes that
  /// did not, unless all did. A process that did not returns, and rethrows its own error. Either way the
  /// load has not changed any state yet, so when one process cannot load, none does, and none waits for ever
  /// in the collectives that follow.
  void agree_on_checkpoint_load(bool loaded) {
    const int mine = loaded ? 1 : 0;
    std::vector<int> all(static_cast<std::size_t>(world_size()));
    communicator().all_gather(&mine, 1, all.data());
    if (!loaded) return;
    std::string failed;
    int failures = 0;
    for (std::size_t r = 0; r < all.size(); ++r) {
      if (all[r] == 1) continue;
      failed += (failed.empty() ? "" : ", ") + std::to_string(r);
      ++failures;
    }
    if (failures > 0) {
      throw CheckpointError(
          "xax::distributed::DataParallelMixin: " + std::string(failures == 1 ? "process " : "processes ") +
          failed + " of " + std::to_string(world_size()) +
          " could not load the checkpoint (each reports its own error), so no process "
          "changed its state; every process must be able to read the same checkpoint");
    }
  }

  /// TrainMixin's after-load hook (a TrainStep trainer calls it after its own load_train_state): collective;
  /// throws ReplicaMismatchError on every rank, naming the ranks, unless every rank now holds the same
  /// masters (see xax/distributed/replica_check.hpp: a CRC-32 of each rank's masters, all-gathered).
  void verify_loaded_state() {
    // The masters alone do not show every difference: two checkpoints on either side of a skipped step hold
    // the same masters but another loss scale, other step counts and another loop position, and ranks that
    // resumed from them would sum gradients at different scales (or, under fit, take different numbers of
    // steps and wait for each other for ever).
    verify_replica_digests_equal(communicator(), train_state_digest(),
                                 "loss scale, step counts and loop position after a checkpoint load");
    if (zero_stage_ == 1 && zero_registry_->live() != nullptr) {
      // Sharded masters: no rank holds them whole any more, so each compares the digest of the whole masters
      // it read (taken before it kept its shard); gathering the shards would hide a difference.
      if (const auto digest = zero_registry_->live()->owned_masters_digest()) {
        verify_replica_digests_equal(communicator(), *digest, "masters after a checkpoint load");
        return;
      }
    }
    if constexpr (requires(Derived & task) { task.params_float32(); }) {
      verify_replicas_equal(communicator(), data_parallel_task().params_float32(),
                            "masters after a checkpoint load");
    } else {
      static_assert(
          requires(Derived & task) { task.params(); },
          "xax::distributed::DataParallelMixin::verify_loaded_state: the task needs params_float32() "
          "(MixedPrecisionMixin) or params() (TrainStep)");
      verify_replicas_equal(communicator(), data_parallel_task().params(), "masters after a checkpoint load");
    }
  }

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
  // A digest of what a train state holds beside the masters (and the optimizer state, which is the masters'
  // history): the loss scale, the step counts and, under TrainMixin, the loop position.
  [[nodiscard]] std::uint64_t train_state_digest() {
    Derived& task = data_parallel_task();
    std::uint64_t digest = 0;
    const auto add = [&digest](std::uint64_t value) {
      digest = xax::detail::mix64(digest + 0x9e3779b97f4a7c15ull + value);
    };
    if constexpr (requires { task.current_loss_scale(); })
      add(std::bit_cast<std::uint32_t>(task.current_loss_scale()));
    if constexpr (requires { task.skipped_steps(); }) add(static_cast<std::uint64_t>(task.skipped_steps()));
    if constexpr (requires { task.train_step_calls(); })
      add(static_cast<std::uint64_t>(task.train_step_calls()));
    if constexpr (requires { task.fit_steps(); }) add(static_cast<std::uint64_t>(task.fit_steps()));
    if constexpr (requires { task.epoch(); }) add(static_cast<std::uint64_t>(task.epoch()));
    return digest;
  }

  const ZeroShardLayout& live_layout() const {
    if (zero_registry_->live() == nullptr) {
      throw ConfigError(
          "zero_stage 1: no sharded optimizer (sharded_optimizer()) runs this task's train step");
    }
    return *zero_registry_->live()->layout;
  }

  Derived& data_parallel_task() { return static_cast<Derived&>(*this); }

  static int checked_stage(int stage) {
    DataParallelConfig config;
    config.zero_stage = stage;
    return config.checked_zero_stage();
  }

  GradientReducer reducer_;
  int zero_stage_ = 0;
  std::vector<std::size_t> shard_bounds_;
  std::vector<double> local_partials_, all_partials_;
  std::vector<int> partial_counts_, partial_offsets_;
  std::shared_ptr<detail::ZeroRegistry> zero_registry_ = std::make_shared<detail::ZeroRegistry>();
};

}  // namespace xax::distributed
