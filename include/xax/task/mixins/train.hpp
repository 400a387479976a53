#pragma once
/// \file
/// `TrainConfig` and `TrainMixin<Derived, Config>`: the training loop of the seed's
/// `xax/task/mixins/train.py`.
///
/// TrainMixin owns the config, the data order (a seeded, per-epoch shuffle), logging and progress, and
/// checkpoints of the whole train state. The step itself comes from `derived().train_step(...)`, which
/// MixedPrecisionMixin (or a TrainStep base) provides. The derived task supplies its data:
///
///     std::int64_t num_examples() const;
///     batch_type make_batch(std::span<const std::int64_t> example_indices) const;
///
/// A task that declares casts_batch_to_compute can write make_batch as a template over the batch's scalar,
/// `template <class T = float> Batch<T> make_batch(...) const` (xax::makes_batches_in): fit() then steps
/// through `train_step_on_examples`, which makes each batch directly in the policy's compute type, so a
/// 16-bit step never holds an fp32 batch (a task that wraps the step, to time it say, wraps that one).
///
/// and may define `void on_step(std::int64_t step, const xax::StepResult&)` and `void
/// on_epoch_end(std::int64_t epoch)` hooks. on_epoch_end receives the epoch just finished, and runs with the
/// loop already at the start of the next (epoch() is one more): a checkpoint it saves resumes there.

#include <algorithm>
#include <array>
#include <charconv>
#include <chrono>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <limits>
#include <numeric>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <vector>
#include <xax/detail/format.hpp>
#include <xax/task/checkpoint.hpp>
#include <xax/task/config.hpp>
#include <xax/task/train_step.hpp>
#include <xax/utils/error.hpp>

#if __has_include(<unistd.h>)
#include <unistd.h>
#endif

namespace xax {

/// The training loop's settings.
struct TrainConfig {
  double learning_rate = 1e-3;
  std::int64_t batch_size = 128;
  std::int64_t epochs = 1;
  std::int64_t max_steps = 0;  ///< stop after this many optimizer steps; 0 runs all epochs
  std::string optimizer = "adamw";
  double weight_decay = 1e-2;
  double momentum = 0.9;                 ///< SGD only
  std::int64_t log_interval = 100;       ///< steps between log lines; 0 never logs
  std::int64_t checkpoint_interval = 0;  ///< steps between checkpoints; 0 never writes one
  std::string checkpoint_path = "checkpoint.xax";
  std::int64_t seed = 0;
  bool progress = true;  ///< an updating progress line when stderr is a terminal

  template <class Self, class Visit>
  static void visit_train_fields(Self& self, Visit&& visit) {
    visit("learning_rate", self.learning_rate, "a finite number > 0");
    visit("batch_size", self.batch_size, "an integer >= 1");
    visit("epochs", self.epochs, "an integer >= 1");
    visit("max_steps", self.max_steps, "an integer >= 0; 0 runs all epochs");
    visit("optimizer", self.optimizer, "adamw or sgd");
    visit("weight_decay", self.weight_decay, "a finite number >= 0");
    visit("momentum", self.momentum, "a number in [0, 1)");
    visit("log_interval", self.log_interval, "an integer >= 0; 0 never logs");
    visit("checkpoint_interval", self.checkpoint_interval, "an integer >= 0; 0 never checkpoints");
    visit("checkpoint_path", self.checkpoint_path, "a file path");
    visit("seed", self.seed, "an integer");
    visit("progress", self.progress, "true or false");
  }

  void validate_train() const {
    const auto reject = [](const char* field, const std::string& value, const char* accepted) {
      return ConfigError(std::string("config field '") + field + "': " + value +
                         " is not accepted; expected " + accepted);
    };
    if (!(learning_rate > 0) || !std::isfinite(learning_rate)) {
      throw reject("learning_rate", detail::shortest_text(learning_rate), "a finite number > 0");
    }
    if (batch_size < 1) throw reject("batch_size", std::to_string(batch_size), "an integer >= 1");
    if (epochs < 1) throw reject("epochs", std::to_string(epochs), "an integer >= 1");
    if (max_steps < 0) throw reject("max_steps", std::to_string(max_steps), "an integer >= 0");
    if (optimizer != "adamw" && optimizer != "sgd")
      throw reject("optimizer", "'" + optimizer + "'", "adamw or sgd");
    if (!(weight_decay >= 0) || !std::isfinite(weight_decay)) {
      throw reject("weight_decay", detail::shortest_text(weight_decay), "a finite number >= 0");
    }
    if (!(momentum >= 0 && momentum < 1))
      throw reject("momentum", detail::shortest_text(momentum), "a number in [0, 1)");
    if (log_interval < 0) throw reject("log_interval", std::to_string(log_interval), "an integer >= 0");
    if (checkpoint_interval < 0) {
      throw reject("checkpoint_interval", std::to_string(checkpoint_interval), "an integer >= 0");
    }
    if (checkpoint_interval > 0 && checkpoint_path.empty()) {
      throw reject("checkpoint_path", "an empty path", "a file path when checkpoint_interval > 0");
    }
  }

  /// The optimizer these settings describe.
  [[nodiscard]] OptimizerOptions optimizer_options() const {
    if (optimizer == "sgd") {
      optim::SgdOptions sgd;
      sgd.learning_rate = learning_rate;
      sgd.momentum = momentum;
      sgd.weight_decay = weight_decay;
      return sgd;
    }
    optim::AdamWOptions adamw;
    adamw.learning_rate = learning_rate;
    adamw.weight_decay = weight_decay;
    return adamw;
  }
};

/// What fit() did.
struct TrainSummary {
  std::int64_t steps = 0;  ///< train steps run by this call, skipped ones included (fit_steps() counts all)
  std::int64_t skipped_steps = 0;  ///< skipped steps since the train state was reset, this call's included
  double last_loss = 0;
  double seconds = 0;
};

/// The data a task must provide to TrainMixin::fit.
template <class Task>
concept task_data = requires(const Task& task, std::span<const std::int64_t> indices) {
  typename Task::batch_type;
  { task.num_examples() } -> std::convertible_to<std::int64_t>;
  { task.make_batch(indices) } -> std::convertible_to<typename Task::batch_type>;
};

/// CRTP base with the training loop. `Config` derives from TrainConfig.
template <class Derived, class Config>
class TrainMixin {
 public:
  [[nodiscard]] const Config& config() const { return config_; }

  /// Train steps fit() has run so far, across resumes: one per accumulation_steps micro-batches, skipped ones
  /// included; the step number on_step() and the log lines show. Steps the task runs itself by calling
  /// train_step() are not counted here. (TrainStep::train_step_calls() counts every train_step call; its
  /// applied_steps() and the optimizer's step count only the updates applied.)
  [[nodiscard]] std::int64_t fit_steps() const { return fit_steps_; }
  [[deprecated("use fit_steps()")]] [[nodiscard]] std::int64_t global_step() const { return fit_steps(); }
  [[nodiscard]] std::int64_t epoch() const { return epoch_; }

  /// Where log lines and progress go (std::clog by default); nullptr silences both.
  void set_log_stream(std::ostream* stream) { log_ = stream; }

  /// The task's random generator, for augmentation or dropout; its state is checkpointed.
  std::mt19937_64& rng() { return rng_; }

  /// Trains for the configured epochs (or max_steps), resuming where a loaded checkpoint left off. Throws
  /// ConfigError before the first step if batch_size exceeds num_examples() or accumulation_steps exceeds
  /// the full batches in an epoch. If a step throws (LossScaleError), fit_steps() counts only the steps
  /// that returned, as the step's own counters do.
  TrainSummary fit();

  /// Writes the whole train state (the step's state, loop position, RNG) to `path` atomically.
  void save_checkpoint(const std::filesystem::path& path) const;

  /// Restores a checkpoint written by save_checkpoint. On any error the current state is unchanged. Under
  /// data parallelism (DataParallelMixin) it is collective: when any process cannot read or use its copy of
  /// the checkpoint, every process throws (that one its own error, the others a CheckpointError naming it)
  /// and none changes its state; when all can, all check that they now hold the same state.
  void load_checkpoint(const std::filesystem::path& path);

 protected:
  explicit TrainMixin(Config config) : config_(std::move(config)) {
    static_assert(std::derived_from<Config, TrainConfig>,
                  "xax::TrainMixin: Config must derive from xax::TrainConfig");
    validate_config(config_);
    rng_.seed(static_cast<std::uint64_t>(config_.seed));
    epoch_rng_ = rng_;
  }
  ~TrainMixin() = default;
  TrainMixin(const TrainMixin&) = default;
  TrainMixin(TrainMixin&&) noexcept = default;
  TrainMixin& operator=(const TrainMixin&) = default;
  TrainMixin& operator=(TrainMixin&&) noexcept = default;

  Derived& derived() { return static_cast<Derived&>(*this); }
  const Derived& derived() const { return static_cast<const Derived&>(*this); }

 private:
  void shuffle_epoch(std::int64_t examples) {
    order_.resize(static_cast<std::size_t>(examples));
    std::iota(order_.begin(), order_.end(), std::int64_t{0});
    // The generator's state at the epoch's start is kept so a resumed run rebuilds exactly this order.
    epoch_rng_ = rng_;
    std::shuffle(order_.begin(), order_.end(), rng_);
  }

  void log_line(const std::string& line, bool transient) const;

  // load_checkpoint's reading, checking and committing; `hook` runs between the last check and the commit.
  void read_checkpoint(const std::filesystem::path& path, const LoadCommitHook& hook);

  Config config_;
  std::mt19937_64 rng_;
  std::mt19937_64 epoch_rng_;
  std::vector<std::int64_t> order_;
  std::int64_t fit_steps_ = 0;
  std::int64_t epoch_ = 0;
  std::int64_t batch_in_epoch_ = 0;  // micro-batches of the current epoch already consumed
  bool resumed_ = false;
  std::ostream* log_ = &std::clog;
};

namespace detail {
inline bool stderr_is_terminal() {
#if __has_include(<unistd.h>)
  return ::isatty(STDERR_FILENO) != 0;
#else
  return false;
#endif
}
}  // namespace detail

template <class Derived, class Config>
void TrainMixin<Derived, Config>::log_line(const std::string& line, bool transient) const {
  if (log_ == nullptr) return;
  if (transient) {
    if (config_.progress && log_ == &std::clog && detail::stderr_is_terminal())
      *log_ << '\r' << line << "\x1b[K" << std::flush;
    return;
  }
  if (config_.progress && log_ == &std::clog && detail::stderr_is_terminal()) *log_ << "\r\x1b[K";
  *log_ << line << '\n';
}

template <class Derived, class Config>
TrainSummary TrainMixin<Derived, Config>::fit() {
  static_assert(
      task_data<Derived>,
      "xax::TrainMixin::fit: the task must define `std::int64_t num_examples() const` and `batch_type "
      "make_batch(std::span<const std::int64_t> example_indices) const`");
  using Batch = typename Derived::batch_type;
  const std::int64_t examples = derived().num_examples();
  if (examples < 1) {
    throw ConfigError("the task has no training examples (num_examples() returned " +
                      std::to_string(examples) + "); expected at least 1");
  }
  // Both checks run before the first step: a config that cannot make one full step per epoch would
  // otherwise train nothing and return normally, and a clamped batch would train with another batch size
  // than the one configured.
  const std::int64_t batch = config_.batch_size;
  if (batch > examples) {
    throw ConfigError("config field 'batch_size': " + std::to_string(batch) + " is larger than the " +
                      std::to_string(examples) + " training examples; expected an integer in [1, " +
                      std::to_string(examples) + "]");
  }
  const std::int64_t micro_per_step = [&] {
    if constexpr (requires { config_.accumulation_steps; }) {
      return static_cast<std::int64_t>(config_.accumulation_steps);
    } else {
      return std::int64_t{1};
    }
  }();
  const std::int64_t batches_per_epoch = examples / batch;  // the ragged tail is dropped, as drop_last=True
  if (micro_per_step > batches_per_epoch) {
    throw ConfigError("config field 'accumulation_steps': " + std::to_string(micro_per_step) +
                      " micro-batches per step, but an epoch has only " + std::to_string(batches_per_epoch) +
                      " batches (" + std::to_string(examples) + " examples / batch_size " +
                      std::to_string(batch) + ", the ragged tail dropped), so no step would run; expected " +
                      "accumulation_steps <= " + std::to_string(batches_per_epoch) +
                      (examples >= micro_per_step
                           ? " or a batch_size <= " + std::to_string(examples / micro_per_step)
                           : std::string()));
  }

  // Processes training together (DataParallelMixin) must agree on every number that decides which steps fit
  // takes: one with fewer would return while the others waited in the next step's collective for ever.
  if constexpr (requires(std::span<const std::int64_t> values, std::span<const char* const> names) {
                  derived().verify_fit_agrees(values, names);
                }) {
    const std::array<std::int64_t, 9> values{examples,          batch,        micro_per_step, config_.epochs,
                                             config_.max_steps, config_.seed, fit_steps_,     epoch_,
                                             batch_in_epoch_};
    static constexpr std::array<const char*, 9> names{
        "num_examples()", "batch_size", "accumulation_steps",    "epochs", "max_steps", "seed",
        "the step count", "the epoch",  "the batch in the epoch"};
    derived().verify_fit_agrees(values, names);
  }

  // A position past this epoch (the data or batch_size changed since it was reached) ends the epoch, as the
  // loop below does for any position at its end; load_checkpoint bounded it, so nothing overflows.
  TrainSummary summary;
  // The count so far, for a fit that runs no step (its loop already done, or max_steps reached).
  if constexpr (requires {
                  { derived().skipped_steps() } -> std::convertible_to<std::int64_t>;
                }) {
    summary.skipped_steps = derived().skipped_steps();
  }
  const auto start = std::chrono::steady_clock::now();
  // A task that makes its batches in any scalar (makes_batches_in) has the step make them, in its compute
  // type; otherwise fit makes them and hands them over.
  constexpr bool step_makes_batches = makes_batches_in<Derived, float>;
  std::vector<Batch> micro;
  std::vector<std::span<const std::int64_t>> micro_examples;
  if constexpr (step_makes_batches) {
    micro_examples.reserve(static_cast<std::size_t>(micro_per_step));
  } else {
    micro.reserve(static_cast<std::size_t>(micro_per_step));
  }

  while (epoch_ < config_.epochs) {
    if (resumed_) {
      // Rebuild the interrupted epoch's order from its starting generator, then continue from the saved
      // state.
      const std::mt19937_64 current = rng_;
      rng_ = epoch_rng_;
      shuffle_epoch(examples);
      rng_ = current;
      resumed_ = false;
    } else if (batch_in_epoch_ == 0) {
      shuffle_epoch(examples);
    }
    while (batch_in_epoch_ + micro_per_step <= batches_per_epoch) {
      if (config_.max_steps > 0 && fit_steps_ >= config_.max_steps) break;
      // The count stays below INT64_MAX, so that load_checkpoint (which requires room for the next step)
      // takes every checkpoint fit writes; only a crafted checkpoint starts this close.
      if (fit_steps_ >= std::numeric_limits<std::int64_t>::max() - 1) {
        throw CheckpointError("xax::TrainMixin::fit: the step count " + std::to_string(fit_steps_) +
                              " is the largest fit counts (INT64_MAX - 1); no further step is taken");
      }
      micro.clear();
      micro_examples.clear();
      for (std::int64_t m = 0; m < micro_per_step; ++m) {
        // Data-parallel training: each process makes only the micro-batches of the step that are its shard.
        if constexpr (requires { derived().owns_micro_batch(m, micro_per_step); }) {
          if (!derived().owns_micro_batch(m, micro_per_step)) continue;
        }
        const auto first = static_cast<std::size_t>((batch_in_epoch_ + m) * batch);
        const auto example_indices =
            std::span<const std::int64_t>(order_).subspan(first, static_cast<std::size_t>(batch));
        if constexpr (step_makes_batches) {
          micro_examples.push_back(example_indices);
        } else {
          micro.push_back(derived().make_batch(example_indices));
        }
      }
      const StepResult result = [&] {
        if constexpr (step_makes_batches) {
          return derived().train_step_on_examples(
              std::span<const std::span<const std::int64_t>>(micro_examples));
        } else {
          // Handed over, so that a step which casts each batch to the compute type frees the fp32 batch
          // first.
          return derived().train_step(std::move(micro));
        }
      }();
      batch_in_epoch_ += micro_per_step;
      ++fit_steps_;
      ++summary.steps;
      summary.last_loss = result.loss;
      summary.skipped_steps = result.skipped_steps;
      if constexpr (requires { derived().on_step(fit_steps_, result); })
        derived().on_step(fit_steps_, result);

      const bool log_now = config_.log_interval > 0 && fit_steps_ % config_.log_interval == 0;
      if (log_now || !result.finite) {
        const double seconds =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        std::ostringstream line;
        line << "step " << fit_steps_ << " | epoch " << epoch_ + 1 << "/" << config_.epochs << " | loss "
             << result.loss << " | scale " << result.loss_scale << " | skipped " << result.skipped_steps
             << " | " << static_cast<double>(summary.steps * micro_per_step * batch) / std::max(seconds, 1e-9)
             << " ex/s";
        if (!result.finite) line << " | skipped step: " << result.non_finite;
        log_line(line.str(), false);
      } else if (fit_steps_ % 10 == 0) {
        std::ostringstream line;
        line << "epoch " << epoch_ + 1 << "/" << config_.epochs << " [" << batch_in_epoch_ << "/"
             << batches_per_epoch << "] loss " << result.loss;
        log_line(line.str(), true);
      }
      if (config_.checkpoint_interval > 0 && fit_steps_ % config_.checkpoint_interval == 0) {
        // Data-parallel processes hold the same state; one of them (rank 0) writes it.
        // A task whose state is sharded over processes (ZeRO-1) first gathers it, on every process.
        if constexpr (requires { derived().prepare_checkpoint(); }) derived().prepare_checkpoint();
        bool writes = true;
        if constexpr (requires { derived().writes_checkpoints(); }) writes = derived().writes_checkpoints();
        if (writes) save_checkpoint(config_.checkpoint_path);
      }
    }
    if (config_.max_steps > 0 && fit_steps_ >= config_.max_steps) break;
    // The position moves to the next epoch before the hook: a checkpoint saved from on_epoch_end then
    // resumes at the next epoch, not at the start of the finished one.
    const std::int64_t finished = epoch_;
    ++epoch_;
    batch_in_epoch_ = 0;
    if constexpr (requires { derived().on_epoch_end(finished); }) derived().on_epoch_end(finished);
  }
  summary.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return summary;
}

template <class Derived, class Config>
void TrainMixin<Derived, Config>::save_checkpoint(const std::filesystem::path& path) const {
  CheckpointWriter writer;
  derived().save_train_state(writer);
  writer.add_tree("loop", std::array<std::int64_t, 3>{fit_steps_, epoch_, batch_in_epoch_});
  std::ostringstream rng_state, epoch_rng_state;
  rng_state << rng_;
  epoch_rng_state << epoch_rng_;
  writer.add_string("loop.rng", rng_state.str());
  writer.add_string("loop.epoch_rng", epoch_rng_state.str());
  writer.add_string("config", config_to_string(config_));
  writer.write(path);
}

namespace detail {
// The generator whose state `text` holds, as operator<< wrote it; CheckpointError naming `entry` otherwise.
inline std::mt19937_64 parse_rng_state(const std::string& text, const std::string& entry) {
  const auto refuse = [&](const std::string& why) {
    return CheckpointError("checkpoint entry '" + entry + "' is not the state of a std::mt19937_64 (" + why +
                           ")");
  };
  constexpr const char* what_is_written =
      "the unsigned 64-bit numbers its operator<< writes, separated by spaces, and nothing else";
  // operator>> alone also takes text no generator writes: "-1" wraps round to 2^64 - 1, and an all-zero
  // state (from which the generator returns 0 for ever) is read like any other.
  std::istringstream tokens(text);
  std::string token;
  std::size_t words = 0;
  bool all_state_words_zero = true;
  while (tokens >> token) {
    std::uint64_t value = 0;
    const auto [end, error] = std::from_chars(token.data(), token.data() + token.size(), value);
    if (error != std::errc{} || end != token.data() + token.size()) throw refuse(what_is_written);
    if (words < std::mt19937_64::state_size && value != 0) all_state_words_zero = false;
    ++words;
  }
  if (words < std::mt19937_64::state_size) throw refuse(what_is_written);
  if (all_state_words_zero) throw refuse("its state words are all zero, which no seeding produces");
  std::istringstream stream(text);
  std::mt19937_64 rng;
  stream >> rng;
  if (stream.fail() || !(stream >> std::ws).eof()) throw refuse(what_is_written);
  return rng;
}
}  // namespace detail

template <class Derived, class Config>
void TrainMixin<Derived, Config>::load_checkpoint(const std::filesystem::path& path) {
  if constexpr (requires(Derived & task, bool loaded) { task.agree_on_checkpoint_load(loaded); }) {
    static_assert(
        requires(Derived & task, const CheckpointReader& reader, const LoadCommitHook& hook) {
          task.load_train_state(reader, hook);
        },
        "xax::TrainMixin::load_checkpoint: a data-parallel task needs load_train_state(reader, "
        "LoadCommitHook), as TrainStep and MixedPrecisionMixin have it (bring it into scope with a using "
        "declaration if the task defines its own load_train_state), so that the processes agree after the "
        "last check and before the commit");
    // State built lazily by a collective (MixedPrecisionMixin's engine, whose construction broadcasts
    // process 0's initial params) is built first, on every process: otherwise a process whose file fails to
    // read would join the agreement below while the others waited in that broadcast.
    if constexpr (requires { derived().build_train_state(); }) derived().build_train_state();
    // Every process takes part in the agreement exactly once: in the hook when everything checked out,
    // otherwise on the way out with its own error, which it then rethrows.
    bool agreed = false;
    try {
      read_checkpoint(path, LoadCommitHook{[this, &agreed] {
                        agreed = true;
                        derived().agree_on_checkpoint_load(true);
                      }});
    } catch (...) {
      if (!agreed) derived().agree_on_checkpoint_load(false);
      throw;
    }
  } else {
    read_checkpoint(path, LoadCommitHook{});
  }
  // A data-parallel task checks, on every process, that all processes now hold the same state.
  if constexpr (requires { derived().verify_loaded_state(); }) derived().verify_loaded_state();
}

template <class Derived, class Config>
void TrainMixin<Derived, Config>::read_checkpoint(const std::filesystem::path& path,
                                                  const LoadCommitHook& hook) {
  const CheckpointReader reader(path);
  std::array<std::int64_t, 3> loop{};
  reader.read_tree("loop", loop);
  // Named variables, not a structured binding: clang 14 cannot capture those in the lambda below.
  const std::int64_t global_step = loop[0], epoch = loop[1], batch_in_epoch = loop[2];
  const auto refuse = [&](const std::string& expected) {
    return CheckpointError("checkpoint '" + path.string() + "': entry 'loop' holds step " +
                           std::to_string(global_step) + ", epoch " + std::to_string(epoch) +
                           ", batch in epoch " + std::to_string(batch_in_epoch) + "; " + expected);
  };
  if (global_step < 0 || epoch < 0 || batch_in_epoch < 0) throw refuse("each must be >= 0");
  // Upper bounds too: fit() adds to these, so a crafted position near INT64_MAX would overflow it. fit()
  // counts at most INT64_MAX - 1 steps (it refuses the step after that), and a position within an epoch is
  // at most the epoch's batches. (The epoch needs no bound: one past the configured epochs runs nothing.)
  if (global_step >= std::numeric_limits<std::int64_t>::max()) {
    throw refuse("expected a step < " + std::to_string(std::numeric_limits<std::int64_t>::max()) +
                 ", so that the next step can be counted");
  }
  if constexpr (task_data<Derived>) {
    const std::int64_t examples = derived().num_examples();
    const std::int64_t batch = config_.batch_size;
    // A batch_size above the examples is fit()'s ConfigError, not the checkpoint's.
    if (batch >= 1 && batch <= examples && batch_in_epoch > examples / batch) {
      throw CheckpointError("checkpoint '" + path.string() + "': entry 'loop' holds batch in epoch " +
                            std::to_string(batch_in_epoch) + ", but an epoch of the task's " +
                            std::to_string(examples) + " examples has " + std::to_string(examples / batch) +
                            " batches of batch_size " + std::to_string(batch) + "; expected at most " +
                            std::to_string(examples / batch) +
                            " (the checkpoint was written for another data set or batch_size)");
    }
  }
  const std::mt19937_64 rng = detail::parse_rng_state(reader.read_string("loop.rng"), "loop.rng");
  const std::mt19937_64 epoch_rng =
      detail::parse_rng_state(reader.read_string("loop.epoch_rng"), "loop.epoch_rng");
  // load_train_state validates everything before it changes anything, and runs the hook in between. A task
  // with only its own load_train_state(reader) is not data-parallel (load_checkpoint requires the hook's
  // overload there), so its hook is empty.
  if constexpr (requires { derived().load_train_state(reader, hook); }) {
    derived().load_train_state(reader, hook);
  } else {
    derived().load_train_state(reader);
  }
  fit_steps_ = global_step;
  epoch_ = epoch;
  batch_in_epoch_ = batch_in_epoch;
  rng_ = rng;
  epoch_rng_ = epoch_rng;
  resumed_ = batch_in_epoch_ > 0;
}

}  // namespace xax
