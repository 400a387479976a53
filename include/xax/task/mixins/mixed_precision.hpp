#pragma once
/// \file
/// `MixedPrecisionConfig` and `MixedPrecisionMixin<Derived, Config>`: the seed's
/// `xax/task/mixins/mixed_precision.py`.
///
/// The mixin is the config-driven face of TrainStep: it reads `precision_policy` and `loss_scaling` at run
/// time and runs the matching compile-time TrainStep. The task supplies, besides what TrainMixin needs:
///
///     template <class T> using params_type = MyParams<T>;  // the model's tree, over its scalar
///     using batch_type = MyBatch;
///     params_type<float> init_params() const;               // the fp32 initial parameters
///     template <class T>
///     double loss_and_grads(const params_type<T>&, const batch_type&, float loss_scale,
///                           params_type<T>& grads);
///
/// `loss_and_grads` may also take the gradients as `params_type<G>&` for a second template parameter G: the
/// step then asks for fp32 gradients of half-precision parameters and skips their cast (see TrainStep).
/// A task that defines `make_optimizer(const params_type<float>& like)`, returning any optimizer TrainStep
/// accepts (xax::train_optimizer over params_type<float>), trains with it instead of the config's
/// `optimizer`; the config's learning-rate schedule still drives it through `set_learning_rate`. A task may
/// declare `static constexpr bool writes_fp32_gradients = true;` and define `on_unscaled_gradients(
/// params_type<float>& grads, const UnscaledGradients&)`, with TrainStep's meaning, and `static constexpr
/// bool casts_batch_to_compute = true;` with a batch_type that is a tree over its scalar (`MyBatch<float>`):
/// the step then casts each batch to the policy's compute type and loss_and_grads and evaluate take
/// `const MyBatch<T>&` (see xax::declares_batch_cast). Optionally
/// the task defines `template <class T> double evaluate(const params_type<T>&, const batch_type&)` for
/// MixedPrecisionMixin::evaluate_batch, which runs it in the policy's compute type.
///
/// By default the mixin compiles a TrainStep for each of the nine params × compute pairs of float16, bfloat16
/// and float32, so that any policy string runs; those nine are most of a task's compile time. A task that
/// declares `using compiled_policies = xax::PolicyList<...>;` compiles the params × compute pairs of the
/// listed policies alone (the output dtype is applied at run time, so any output runs with a listed pair).
/// "mixed" computes in half_dtype(), bfloat16 or float16 by CPU, so a task that runs it on every CPU lists
/// both:
///
///     using compiled_policies = xax::PolicyList<xax::Policy<float>,
///                                               xax::Policy<float, xax::bfloat16, float>,
///                                               xax::Policy<float, xax::float16, float>>;
///
/// A config that asks for an unlisted pair throws ConfigError when the engine is built (the first step),
/// before init_params is called.

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>
#include <xax/detail/format.hpp>
#include <xax/task/checkpoint.hpp>
#include <xax/task/config.hpp>
#include <xax/task/train_step.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/loss_scale.hpp>
#include <xax/utils/policy.hpp>

namespace xax {

/// Mixed-precision settings, with the seed's names and defaults.
struct MixedPrecisionConfig {
  bool enable_mixed_precision =
      false;  ///< false: plain float32, no loss scaling, whatever the fields below say
  std::string precision_policy = "mixed";
  /// none, static, dynamic, or auto (dynamic where the compute type is float16, none otherwise)
  std::string loss_scaling = "dynamic";
  double loss_scale_value = 32768;  ///< the static scale, or the dynamic scale's initial value (2^15)
  std::int64_t loss_scale_growth_interval = 2000;
  double loss_scale_growth_factor = 2.0;
  double loss_scale_backoff_factor = 0.5;
  double loss_scale_min = 1.0;
  double loss_scale_max = FLT_MAX;
  std::int64_t loss_scale_hysteresis = 1;
  double max_grad_norm = 0;  ///< clip unscaled gradients to this global L2 norm; 0 disables
  std::int64_t accumulation_steps = 1;
  std::int64_t max_overflows_at_min_scale = 100;  ///< LossScaleError after this many; 0 never
  /// How half-precision masters (params float16 or bfloat16, as in the float16 preset) take their fp32
  /// update: stochastic (unbiased), nearest (updates under half an ulp are lost) or kahan (compensated).
  std::string master_rounding = "stochastic";

  template <class Self, class Visit>
  static void visit_mixed_precision_fields(Self& self, Visit&& visit) {
    visit("enable_mixed_precision", self.enable_mixed_precision, "true or false");
    visit("precision_policy", self.precision_policy,
          "default, mixed, float16, half, a dtype name, or key=dtype pairs such as "
          "params=float32,compute=bfloat16");
    visit("loss_scaling", self.loss_scaling,
          "none, static, dynamic, or auto (dynamic where the compute type is float16, none otherwise)");
    visit("loss_scale_value", self.loss_scale_value,
          "a finite number within [loss_scale_min, loss_scale_max], at least FLT_MIN");
    visit("loss_scale_growth_interval", self.loss_scale_growth_interval, "an integer >= 1");
    visit("loss_scale_growth_factor", self.loss_scale_growth_factor, "a finite number > 1");
    visit("loss_scale_backoff_factor", self.loss_scale_backoff_factor, "a number in (0, 1)");
    visit("loss_scale_min", self.loss_scale_min, "a finite number >= FLT_MIN and <= loss_scale_value");
    visit("loss_scale_max", self.loss_scale_max, "a finite number >= loss_scale_value, at most FLT_MAX");
    visit("loss_scale_hysteresis", self.loss_scale_hysteresis, "an integer in [1, 2147483647]");
    visit("max_grad_norm", self.max_grad_norm, "a finite number >= 0; 0 disables clipping");
    visit("accumulation_steps", self.accumulation_steps, "an integer >= 1");
    visit("max_overflows_at_min_scale", self.max_overflows_at_min_scale, "an integer >= 0; 0 never stops");
    visit("master_rounding", self.master_rounding, "stochastic, nearest or kahan");
  }

  /// The policy this config runs: float32 throughout when mixed precision is disabled.
  [[nodiscard]] PolicySpec policy_spec() const {
    return enable_mixed_precision ? requested_policy() : get_policy("default");
  }

  /// The loss-scale kind this config runs: "none" when mixed precision is disabled; for "auto", "dynamic"
  /// when the policy computes in float16 (whose narrow range underflows gradients) and "none" otherwise
  /// (bfloat16 has float32's range; float32 needs no scaling). Throws ConfigError for an unknown
  /// loss_scaling, or for a bad precision_policy under "auto".
  [[nodiscard]] std::string resolved_loss_scaling() const {
    if (loss_scaling != "none" && loss_scaling != "static" && loss_scaling != "dynamic" &&
        loss_scaling != "auto") {
      throw ConfigError("config field 'loss_scaling': '" + loss_scaling +
                        "' is not accepted; expected none, static, dynamic or auto");
    }
    if (!enable_mixed_precision) return "none";
    if (loss_scaling == "auto") return policy_spec().compute == DType::float16 ? "dynamic" : "none";
    return loss_scaling;
  }

  /// The loss scale this config runs: none when mixed precision is disabled. Throws ConfigError for bad
  /// loss-scale fields (see validate_loss_scaling).
  [[nodiscard]] LossScale make_loss_scale() const {
    const std::string kind = resolved_loss_scaling();
    if (kind == "none") return NoOpLossScale{};
    validate_loss_scaling();  // the casts to float below are then in range
    if (kind == "static") return StaticLossScale(static_cast<float>(loss_scale_value));
    return DynamicLossScale(dynamic_loss_scale_options());
  }

  /// The loss_scale_* fields as DynamicLossScaleOptions. Throws ConfigError naming the field for a bad value
  /// (validate_loss_scaling).
  [[nodiscard]] DynamicLossScaleOptions dynamic_loss_scale_options() const {
    validate_loss_scaling();  // the casts to float below are then in range
    DynamicLossScaleOptions options;
    options.initial_scale = static_cast<float>(loss_scale_value);
    options.growth_interval = loss_scale_growth_interval;
    options.growth_factor = static_cast<float>(loss_scale_growth_factor);
    options.backoff_factor = static_cast<float>(loss_scale_backoff_factor);
    options.min_scale = static_cast<float>(loss_scale_min);
    options.max_scale = static_cast<float>(loss_scale_max);
    options.hysteresis = static_cast<int>(loss_scale_hysteresis);
    return options;
  }

  /// Throws ConfigError naming the config field unless the loss_scale_* fields make valid
  /// DynamicLossScaleOptions (whose rules also cover a static scale): the loss scale's own validator
  /// (xax::detail::validate_dynamic_loss_scale) checks them, as the floats they become, so the config accepts
  /// exactly what DynamicLossScale and StaticLossScale accept. Checked whatever the kind, so that switching
  /// loss_scaling never uncovers a bad value.
  void validate_loss_scaling() const {
    static constexpr detail::LossScaleOptionNames config_names{"config field",
                                                               "'loss_scale_value'",
                                                               "'loss_scale_growth_interval'",
                                                               "'loss_scale_growth_factor'",
                                                               "'loss_scale_backoff_factor'",
                                                               "'loss_scale_min'",
                                                               "'loss_scale_max'",
                                                               "'loss_scale_hysteresis'"};
    detail::validate_dynamic_loss_scale(loss_scale_value, loss_scale_growth_interval,
                                        loss_scale_growth_factor, loss_scale_backoff_factor, loss_scale_min,
                                        loss_scale_max, loss_scale_hysteresis, config_names);
  }

  void validate_mixed_precision() const {
    const auto reject = [](const char* field, const std::string& value, const char* accepted) {
      return ConfigError(std::string("config field '") + field + "': " + value +
                         " is not accepted; expected " + accepted);
    };
    // The policy is checked even while mixed precision is disabled, as the loss-scale fields are: a typo
    // must not wait until the day it is switched on.
    const PolicySpec spec = requested_policy();
    for (const DType dtype : {spec.param, spec.compute}) {
      if (dtype == DType::float64) {
        throw reject(
            "precision_policy", "'" + precision_policy + "' (float64 params or compute)",
            "float16, bfloat16 or float32 for params and compute; MixedPrecisionMixin compiles those nine "
            "combinations; for float64 inherit xax::TrainStep with your policy directly");
      }
    }
    static_cast<void>(resolved_loss_scaling());
    validate_loss_scaling();
    if (!(std::isfinite(max_grad_norm) && max_grad_norm >= 0)) {
      throw reject("max_grad_norm", detail::shortest_text(max_grad_norm), "a finite number >= 0");
    }
    if (accumulation_steps < 1)
      throw reject("accumulation_steps", std::to_string(accumulation_steps), "an integer >= 1");
    if (max_overflows_at_min_scale < 0) {
      throw reject("max_overflows_at_min_scale", std::to_string(max_overflows_at_min_scale),
                   "an integer >= 0");
    }
    if (master_rounding != "stochastic" && master_rounding != "nearest" && master_rounding != "kahan") {
      throw reject("master_rounding", "'" + master_rounding + "'", "stochastic, nearest or kahan");
    }
  }

  [[nodiscard]] TrainStepOptions train_step_options() const {
    const optim::MasterRounding rounding =
        master_rounding == "nearest" ? optim::MasterRounding::round_to_nearest
        : master_rounding == "kahan" ? optim::MasterRounding::kahan
                                     : optim::MasterRounding::stochastic_rounding;
    return {.max_grad_norm = max_grad_norm,
            .max_overflows_at_min_scale = max_overflows_at_min_scale,
            .master_rounding = rounding};
  }

 private:
  // precision_policy parsed, whether or not mixed precision is enabled.
  [[nodiscard]] PolicySpec requested_policy() const {
    try {
      return get_policy(precision_policy);
    } catch (const ConfigError& error) {
      throw ConfigError(std::string("config field 'precision_policy': ") + error.what());
    }
  }
};

namespace detail {

// MixedPrecisionMixin compiles a TrainStep per listed params × compute pair, which float64 params or compute
// would not fit (see validate_mixed_precision).
template <class List>
inline constexpr bool lists_half_or_float_policies = false;
template <precision_policy... Policies>
inline constexpr bool lists_half_or_float_policies<PolicyList<Policies...>> =
    ((!std::is_same_v<typename Policies::param_type, double> &&
      !std::is_same_v<typename Policies::compute_type, double>)&&...);

template <class Policy>
bool has_params_and_compute_of(const PolicySpec& spec) {
  return Policy::spec().param == spec.param && Policy::spec().compute == spec.compute;
}

// Whether a listed policy has `spec`'s params and compute: the mixin applies the output dtype at run time, so
// a listed policy stands for its params × compute pair.
template <class... Policies>
bool lists_params_and_compute(PolicyList<Policies...> /*list*/, const PolicySpec& spec) {
  return (has_params_and_compute_of<Policies>(spec) || ...);
}

// Calls f(P{}) with the first listed policy P that has `spec`'s params and compute, if there is one.
template <class F, class... Policies>
void visit_listed_params_and_compute(PolicyList<Policies...> /*list*/, const PolicySpec& spec, F& f) {
  static_cast<void>(((has_params_and_compute_of<Policies>(spec) && (f(Policies{}), true)) || ...));
}

inline std::string params_and_compute_text(const PolicySpec& spec) {
  std::string text = "params=";
  text += dtype_name(spec.param);
  text += ",compute=";
  text += dtype_name(spec.compute);
  return text;
}

// "params=float32,compute=bfloat16 | ...": the listed pairs, for messages.
template <class... Policies>
std::string compiled_pairs_text(PolicyList<Policies...> /*list*/) {
  std::string text;
  ((text += (text.empty() ? "" : " | ") + params_and_compute_text(Policies::spec())), ...);
  return text;
}

// How a C++ user spells the policy that runs `spec`'s pair: `xax::Policy<float, xax::bfloat16>`.
inline std::string policy_spelling(const PolicySpec& spec) {
  const auto scalar = [](DType dtype) -> std::string {
    return dtype == DType::float32 ? "float" : "xax::" + std::string(dtype_name(dtype));
  };
  return "xax::Policy<" + scalar(spec.param) + ", " + scalar(spec.compute) + ">";
}

// The step engine behind MixedPrecisionMixin: an interface over the task's types, and one implementation per
// compile-time policy, each a TrainStep whose "derived trainer" forwards to the task. This interface is the
// only type erasure between the config's run-time strings and the compile-time TrainStep: the mixin holds
// the engine through it, and TrainStep holds its own state by a plain (non-virtual) pointer.
template <class Task>
class StepEngine {
 public:
  template <class T>
  using params_type = typename Task::template params_type<T>;
  using batch_type = typename Task::batch_type;

  virtual ~StepEngine() = default;
  // The task is passed on every call rather than kept: a task that is moved takes its engine along, and
  // the engine must then call the task it now belongs to, not the moved-from one.
  virtual StepResult train_step(Task& task, std::span<const batch_type> micro_batches) = 0;
  // Batches the step may free once cast (TrainStep::train_step's overloads for batches passed by rvalue).
  virtual StepResult train_step(Task& task, std::vector<batch_type>&& micro_batches) = 0;
  // TrainStep::train_step_on_examples; throws for a task that cannot make batches (it is never called then).
  virtual StepResult train_step_on_examples(
      Task& task, std::span<const std::span<const std::int64_t>> micro_batch_examples) = 0;
  virtual params_type<float> params_float32() const = 0;
  virtual double evaluate(Task& task, const batch_type& batch) = 0;
  virtual float current_loss_scale() const = 0;
  virtual void set_loss_scale(float scale) = 0;
  virtual std::int64_t skipped_steps() const = 0;
  virtual void set_learning_rate(double learning_rate) = 0;
  virtual TrainStateBytes state_bytes() const = 0;
  virtual void save(CheckpointWriter& writer) const = 0;
  virtual void load(const CheckpointReader& reader, const LoadCommitHook& hook) = 0;
};

template <class Task, class StepPolicy>
class PolicyStepEngine final : public StepEngine<Task>,
                               public TrainStep<PolicyStepEngine<Task, StepPolicy>, StepPolicy, LossScale> {
  using Step = TrainStep<PolicyStepEngine<Task, StepPolicy>, StepPolicy, LossScale>;

 public:
  template <class T>
  using params_type = typename Task::template params_type<T>;
  using batch_type = typename Task::batch_type;

  // `optimizer`: the config's OptimizerOptions, or a factory over params_type<float> (every compiled policy
  // updates in float).
  template <class OptimizerSource>
  PolicyStepEngine(DType output, const params_type<float>& initial, OptimizerSource&& optimizer,
                   LossScale loss_scale, TrainStepOptions options)
      : output_(output) {
    static_assert(std::is_same_v<typename Step::update_type, float>);
    if constexpr (requires { &Task::on_unscaled_gradients; }) {
      static_assert(unscaled_gradients_hook<Task, params_type<float>>,
                    "xax::MixedPrecisionMixin: the task's on_unscaled_gradients must be callable as `void "
                    "on_unscaled_gradients(params_type<float>& grads, const xax::UnscaledGradients& info)` "
                    "(public)");
    }
    this->reset_train_state(initial, std::forward<OptimizerSource>(optimizer), std::move(loss_scale),
                            options);
  }

  // Forwards gradients of any scalar the task accepts, so a task that writes fp32 gradients of half
  // parameters gets TrainStep's cast-free path.
  template <class T, class G>
  requires requires(Task& task, const params_type<T>& params, const step_batch_t<Task, T>& batch, float scale,
                    params_type<G>& grads) {
    task.loss_and_grads(params, batch, scale, grads);
  }
  double loss_and_grads(const params_type<T>& params, const step_batch_t<Task, T>& batch, float loss_scale,
                        params_type<G>& grads) {
    return static_cast<double>(task_->loss_and_grads(params, batch, loss_scale, grads));
  }

  // Forwards the task's opt-ins to fp32 gradients and to cast batches, so that TrainStep checks them, and its
  // gradient hook.
  static constexpr bool writes_fp32_gradients = declares_fp32_gradients<Task>;
  static constexpr bool casts_batch_to_compute = declares_batch_cast<Task>;
  void on_unscaled_gradients(params_type<float>& grads, const UnscaledGradients& info) requires
      unscaled_gradients_hook<Task, params_type<float>> {
    task_->on_unscaled_gradients(grads, info);
  }

  // Forwards the task's gradient reducer (data-parallel training, xax::gradient_reducer), if it has one.
  void collect_micro_gradients(std::size_t index, double loss, const params_type<float>& grads) requires
      gradient_reducer<Task, params_type<float>> {
    task_->collect_micro_gradients(index, loss, grads);
  }
  ReducedGradients reduce_gradients(params_type<float>& grads) requires
      gradient_reducer<Task, params_type<float>> {
    return task_->reduce_gradients(grads);
  }
  UnscaledGradients unscale_check_and_norm_reduced(params_type<float>& grads, float inverse_scale) requires
      reduced_gradients_check<Task, params_type<float>> {
    return task_->unscale_check_and_norm_reduced(grads, inverse_scale);
  }

  StepResult train_step(Task& task, std::span<const batch_type> micro_batches) override {
    const BoundTask bound(*this, task);
    StepResult result = Step::train_step(micro_batches);
    result.loss = round_to_output(result.loss);
    return result;
  }
  StepResult train_step(Task& task, std::vector<batch_type>&& micro_batches) override {
    const BoundTask bound(*this, task);
    StepResult result = Step::train_step(std::move(micro_batches));
    result.loss = round_to_output(result.loss);
    return result;
  }
  StepResult train_step_on_examples(
      Task& task, std::span<const std::span<const std::int64_t>> micro_batch_examples) override {
    if constexpr (makes_batches<Task>) {
      const BoundTask bound(*this, task);
      StepResult result = Step::train_step_on_examples(micro_batch_examples);
      result.loss = round_to_output(result.loss);
      return result;
    } else {
      throw Error(
          "MixedPrecisionMixin::train_step_on_examples: the task defines no `batch_type make_batch(std::span<"
          "const std::int64_t> example_indices) const`");
    }
  }

  // Forwards the task's batch makers to TrainStep::train_step_on_examples.
  batch_type make_batch(std::span<const std::int64_t> example_indices) const requires makes_batches<Task> {
    return task_->make_batch(example_indices);
  }
  template <class T>
  step_batch_t<Task, T> make_batch(std::span<const std::int64_t> example_indices) const requires
      makes_batches_in<Task, T> {
    return task_->template make_batch<T>(example_indices);
  }
  // Collective when the optimizer owns the masters (sharded over processes): see TrainStep::gather_params.
  params_type<float> params_float32() const override {
    if (this->optimizer_owns_masters()) return tree_cast<float>(Step::gather_params());
    return tree_cast<float>(Step::params());
  }
  double evaluate(Task& task, const batch_type& batch) override {
    using Compute = typename StepPolicy::compute_type;
    if constexpr (requires(const params_type<Compute>& params,
                           const step_batch_t<Task, Compute>& compute_batch) {
                    task.evaluate(params, compute_batch);
                  }) {
      return this->with_compute_params([&](const auto& params) {
        if constexpr (!std::is_same_v<step_batch_t<Task, Compute>, batch_type>) {
          return static_cast<double>(task.evaluate(params, tree_cast<Compute>(batch)));
        } else {
          return static_cast<double>(task.evaluate(params, batch));
        }
      });
    } else {
      throw Error(
          "MixedPrecisionMixin::evaluate: the task defines no `template <class T> double evaluate(const "
          "params_type<T>&, const batch_type&)`");
    }
  }
  float current_loss_scale() const override { return Step::current_loss_scale(); }
  void set_loss_scale(float scale) override { Step::set_loss_scale(scale); }
  std::int64_t skipped_steps() const override { return Step::skipped_steps(); }
  void set_learning_rate(double learning_rate) override { Step::set_learning_rate(learning_rate); }
  TrainStateBytes state_bytes() const override { return Step::state_bytes(); }
  void save(CheckpointWriter& writer) const override { Step::save_train_state(writer); }
  void load(const CheckpointReader& reader, const LoadCommitHook& hook) override {
    Step::load_train_state(reader, hook);
  }

  // What TrainStep records in and demands of a checkpoint: the configured policy, output type included,
  // rather than the double output this engine is compiled with.
  [[nodiscard]] PolicySpec checkpoint_policy() const {
    PolicySpec spec = StepPolicy::spec();
    spec.output = output_;
    return spec;
  }

 private:
  // The output type only rounds the reported loss, so it is applied at run time rather than compiled 4 times
  // over.
  double round_to_output(double loss) const {
    return visit_dtype(
        output_, [&]<class O>(std::type_identity<O>) { return static_cast<double>(static_cast<O>(loss)); });
  }

  // Points task_ at the calling task for the duration of one step only, so that no pointer to a task
  // outlives the call that supplied it.
  struct BoundTask {
    PolicyStepEngine& engine;
    BoundTask(PolicyStepEngine& e, Task& task) : engine(e) { engine.task_ = &task; }
    ~BoundTask() { engine.task_ = nullptr; }
    BoundTask(const BoundTask&) = delete;
    BoundTask& operator=(const BoundTask&) = delete;
  };

  Task* task_ = nullptr;  // the task of the step in progress; null between steps
  DType output_;
};

}  // namespace detail

/// CRTP base that runs the train step under the config's precision policy and loss scaling.
template <class Derived, class Config>
class MixedPrecisionMixin {
 public:
  /// One optimizer step (built on first use from `derived().init_params()` and the config).
  template <class D = Derived>
  StepResult train_step(const typename D::batch_type& batch) {
    return engine().train_step(derived(), std::span<const typename D::batch_type>(&batch, 1));
  }
  /// One optimizer step averaged over micro-batches (gradient accumulation).
  template <class D = Derived>
  StepResult train_step(std::span<const typename D::batch_type> micro_batches) {
    return engine().train_step(derived(), micro_batches);
  }
  /// The same steps from batches handed over (`train_step(std::move(batches))`, or a temporary): a task that
  /// declares casts_batch_to_compute has each freed once it is cast (see TrainStep::train_step). fit() hands
  /// over the batches it makes.
  template <class D = Derived>
  StepResult train_step(typename D::batch_type&& batch) {
    std::vector<typename D::batch_type> micro_batches;
    micro_batches.push_back(std::move(batch));
    return engine().train_step(derived(), std::move(micro_batches));
  }
  template <class D = Derived>
  StepResult train_step(std::vector<typename D::batch_type>&& micro_batches) {
    return engine().train_step(derived(), std::move(micro_batches));
  }
  /// One optimizer step from the example indices of each micro-batch, the batches made by the task's
  /// make_batch: in the compute type for a task that can (see TrainStep::train_step_on_examples and
  /// xax::makes_batches_in). fit() steps through this for such a task.
  template <class D = Derived>
  StepResult train_step_on_examples(std::span<const std::span<const std::int64_t>> micro_batch_examples) {
    static_assert(makes_batches<D>,
                  "xax::MixedPrecisionMixin::train_step_on_examples: the task must define `batch_type "
                  "make_batch(std::span<const std::int64_t> example_indices) const`");
    return engine().train_step_on_examples(derived(), micro_batch_examples);
  }

  /// The policy the config selects (float32 throughout when mixed precision is disabled).
  [[nodiscard]] PolicySpec policy() const { return mp_config().policy_spec(); }
  /// The scale the next step's backward will use (before the first step, the configured initial scale).
  [[nodiscard]] float current_loss_scale() const {
    return engine_ ? engine_->current_loss_scale() : initial_scale();
  }
  [[deprecated("use current_loss_scale()")]] [[nodiscard]] float loss_scale() const {
    return current_loss_scale();
  }
  /// Sets the loss scale by hand between steps (see TrainStep::set_loss_scale); builds the train state first
  /// if no step ran yet. Throws ConfigError, changing nothing, for a bad value or loss_scaling none.
  void set_loss_scale(float scale) { engine().set_loss_scale(scale); }
  [[nodiscard]] std::int64_t skipped_steps() const { return engine_ ? engine_->skipped_steps() : 0; }

  /// A float32 copy of the master parameters (whatever the policy's param type). A collective when the
  /// masters are sharded over processes (ZeRO-1, xax/distributed/zero.hpp): every process must call it.
  template <class D = Derived>
  typename D::template params_type<float> params_float32() {
    return engine().params_float32();
  }
  /// TrainStep::params() is a reference to the masters in their own type; this was a float32 copy.
  template <class D = Derived>
  [[deprecated("use params_float32()")]] typename D::template params_type<float> params() {
    return params_float32<D>();
  }
  /// Runs the task's `evaluate(params, batch)` on the masters cast to the compute type.
  template <class D = Derived>
  double evaluate_batch(const typename D::batch_type& batch) {
    return engine().evaluate(derived(), batch);
  }
  void set_learning_rate(double learning_rate) { engine().set_learning_rate(learning_rate); }
  /// Bytes of masters, compute copy, gradients and optimizer state.
  TrainStateBytes train_state_bytes() { return engine().state_bytes(); }

  /// Builds the train state now (init_params(), the policy's step engine and, on a data-parallel task, the
  /// broadcast of process 0's initial params) rather than on its first use. Collective on a data-parallel
  /// task: TrainMixin::load_checkpoint calls it on every process before any of them reads its file.
  void build_train_state() { static_cast<void>(engine()); }

  /// Checkpoint hooks (TrainMixin::save_checkpoint and load_checkpoint call these).
  void save_train_state(CheckpointWriter& writer) const {
    const_cast<MixedPrecisionMixin*>(this)->engine().save(writer);
  }
  void load_train_state(const CheckpointReader& reader, const LoadCommitHook& hook = {}) {
    engine().load(reader, hook);
  }

 protected:
  MixedPrecisionMixin() = default;
  ~MixedPrecisionMixin() = default;
  MixedPrecisionMixin(MixedPrecisionMixin&&) noexcept = default;
  MixedPrecisionMixin& operator=(MixedPrecisionMixin&&) noexcept = default;
  // Moving is supported: the engine keeps no pointer to its task (each call passes the task in), and moves
  // with the task as a pointer. Copying is not: the type-erased engine has no clone.
  MixedPrecisionMixin(const MixedPrecisionMixin&) = delete;
  MixedPrecisionMixin& operator=(const MixedPrecisionMixin&) = delete;

  /// Rebuilds the train state from `derived().init_params()` and the current config.
  void reset_mixed_precision() {
    engine_.reset();
    (void)engine();
  }

  Derived& derived() { return static_cast<Derived&>(*this); }
  const Derived& derived() const { return static_cast<const Derived&>(*this); }

 private:
  const MixedPrecisionConfig& mp_config() const {
    static_assert(std::derived_from<Config, MixedPrecisionConfig>,
                  "xax::MixedPrecisionMixin: Config must derive from xax::MixedPrecisionConfig");
    return static_cast<const MixedPrecisionConfig&>(derived().config());
  }
  float initial_scale() const {
    return std::visit([](const auto& s) { return s.loss_scale(); }, mp_config().make_loss_scale());
  }

  detail::StepEngine<Derived>& engine() {
    if (!engine_) engine_ = build();
    return *engine_;
  }

  std::unique_ptr<detail::StepEngine<Derived>> build() {
    static_assert(
        requires(const Derived& task) {
          { task.init_params() } -> std::convertible_to<typename Derived::template params_type<float>>;
        },
        "xax::MixedPrecisionMixin: the task must define `params_type<float> init_params() const`");
    const auto& config = derived().config();
    validate_config(config);
    const MixedPrecisionConfig& mp = config;
    const PolicySpec spec = mp.policy_spec();
    if constexpr (requires { typename Derived::compiled_policies; }) {
      using Listed = typename Derived::compiled_policies;
      static_assert(policy_list<Listed>,
                    "xax::MixedPrecisionMixin: `compiled_policies` must be a non-empty xax::PolicyList, e.g. "
                    "xax::PolicyList<xax::Policy<float>, xax::Policy<float, xax::bfloat16, float>>");
      static_assert(
          !policy_list<Listed> || detail::lists_half_or_float_policies<Listed>,
          "xax::MixedPrecisionMixin: `compiled_policies` may list float16, bfloat16 or float32 params "
          "and compute only; for float64 inherit xax::TrainStep with your policy directly");
      // Before init_params and its synchronisation across processes: nothing has run when this throws.
      if constexpr (policy_list<Listed>) {
        if (!detail::lists_params_and_compute(Listed{}, spec)) {
          const std::string asked = mp.enable_mixed_precision
                                        ? "config field 'precision_policy': '" + mp.precision_policy + "'"
                                        : std::string("config field 'enable_mixed_precision': false");
          throw ConfigError(
              asked + " (" + spec.str() +
              ") is not accepted by this task; expected a policy with the params and compute of "
              "one of its compiled_policies: " +
              detail::compiled_pairs_text(Listed{}) + "; to run it, list " + detail::policy_spelling(spec) +
              " in compiled_policies");
        }
      }
    }
    auto initial = derived().init_params();
    // A data-parallel task starts every process from one set of initial params (rank 0's).
    if constexpr (requires(Derived & task) { task.synchronize_initial_params(initial); })
      derived().synchronize_initial_params(initial);
    std::unique_ptr<detail::StepEngine<Derived>> engine;
    const auto build_engine = [&](auto&& optimizer) {
      // One TrainStep per (params, compute) pair: the output dtype is applied at run time (round_to_output),
      // so the engine's own output is double, which leaves the loss unrounded until then. Only
      // float16/bfloat16/float32 params and compute are compiled (validate_mixed_precision rejects float64),
      // so nine TrainStep instantiations rather than visit_policy's 64, or the task's compiled_policies.
      const auto make_engine = [&]<class P>(P) {
        using Param = typename P::param_type;
        using Compute = typename P::compute_type;
        if constexpr (!std::is_same_v<Param, double> && !std::is_same_v<Compute, double>) {
          engine = std::make_unique<detail::PolicyStepEngine<Derived, Policy<Param, Compute, double>>>(
              spec.output, initial, optimizer, mp.make_loss_scale(), mp.train_step_options());
        }
      };
      if constexpr (requires { typename Derived::compiled_policies; }) {
        if constexpr (policy_list<typename Derived::compiled_policies>) {
          // The check above found a listed policy with the spec's params and compute.
          detail::visit_listed_params_and_compute(typename Derived::compiled_policies{}, spec, make_engine);
        }
      } else {
        visit_policy(spec, make_engine);
      }
    };
    if constexpr (requires(Derived & task, const typename Derived::template params_type<float>& like) {
                    task.make_optimizer(like);
                  }) {
      // The task's own optimizer replaces the config's `optimizer` choice.
      build_engine([this](const typename Derived::template params_type<float>& like) {
        return derived().make_optimizer(like);
      });
    } else {
      build_engine(config.optimizer_options());
    }
    return engine;
  }

  // Declared over the incomplete Derived: StepEngine<Derived> is only instantiated where the engine is used,
  // inside member functions, by which time Derived is complete.
  std::unique_ptr<detail::StepEngine<Derived>> engine_;
};

}  // namespace xax
