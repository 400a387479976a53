#pragma once
/// \file
/// Loss scaling (jmp's NoOpLossScale, StaticLossScale and DynamicLossScale): multiply the loss before the
/// backward pass so that small half-precision gradients do not flush to zero, divide the gradients after it,
/// and, for the dynamic kind, grow the scale while gradients stay finite and back off when they overflow.
///
///     xax::DynamicLossScale loss_scale;                       // 2^15, growth every 2000 finite steps
///     const float scaled_loss = loss_scale.scale(loss);
///     ...backward...
///     const bool finite = xax::unscale_and_check(grads, loss_scale.inverse_scale());
///     if (finite) optimizer.step(grads);
///     loss_scale.adjust(finite);
///
/// `LossScale` holds any of the three when the kind is chosen at run time.
///
/// Every kind saves and restores its whole state as a tree, without TrainStep:
///
///     auto state = scale.state();                  // NoOpLossScaleState, StaticLossScaleState, ...
///     writer.add_tree("ls", state);
///     ...
///     xax::DynamicLossScaleState state;
///     reader.read_tree("ls", state);
///     auto restored = xax::DynamicLossScale::from_state(state);  // ConfigError for impossible values
///
/// Static and dynamic scales can also be set by hand (`set_loss_scale`, PyTorch's
/// `scaler.update(new_scale)`). A type of your own plugs into TrainStep when it meets the `loss_scale`
/// concept below (and `checkpointable_loss_scale` to be saved with the train state).

#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <variant>
#include <xax/detail/format.hpp>
#include <xax/detail/ieee754.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/finite.hpp>
#include <xax/utils/tree.hpp>

namespace xax {

/// The options of a DynamicLossScale. Names and defaults follow jmp and PyTorch's GradScaler, plus min/max
/// bounds and Megatron's hysteresis. A tree (for checkpoints), as part of DynamicLossScaleState.
struct DynamicLossScaleOptions {
  float initial_scale = 32768;          ///< the scale before the first step (2^15)
  std::int64_t growth_interval = 2000;  ///< consecutive finite steps after which the scale grows
  float growth_factor = 2;              ///< multiplies the scale on growth; > 1
  float backoff_factor = 0.5f;          ///< multiplies the scale on overflow; in (0, 1)
  float min_scale = 1;                  ///< the scale never backs off below this
  float max_scale = FLT_MAX;            ///< the scale never grows above this
  int hysteresis = 1;  ///< the scale backs off on the hysteresis-th overflow since the last growth

  friend bool operator==(const DynamicLossScaleOptions&, const DynamicLossScaleOptions&) = default;
  XAX_FIELDS(initial_scale, growth_interval, growth_factor, backoff_factor, min_scale, max_scale, hysteresis);
};

/// Everything a DynamicLossScale is, as a tree for checkpoints: save `state()` (for example with
/// `CheckpointWriter::add_tree`), restore with `DynamicLossScale::from_state`. The options are part of it, so
/// a restored scale keeps its bounds.
struct DynamicLossScaleState {
  float scale = 32768;
  std::int64_t counter = 0;  ///< consecutive finite steps since the last growth or overflow
  int hysteresis_left = 1;   ///< the scale backs off on the hysteresis_left-th overflow from now
  DynamicLossScaleOptions options;

  friend bool operator==(const DynamicLossScaleState&, const DynamicLossScaleState&) = default;
  XAX_FIELDS(scale, counter, hysteresis_left, options);
};

/// A StaticLossScale's state as a tree: its scale.
struct StaticLossScaleState {
  float scale = 1;

  friend bool operator==(const StaticLossScaleState&, const StaticLossScaleState&) = default;
  XAX_FIELDS(scale);
};

/// A NoOpLossScale's state: an empty tree (it writes no checkpoint entries).
struct NoOpLossScaleState {
  friend bool operator==(const NoOpLossScaleState&, const NoOpLossScaleState&) = default;
  // XAX_FIELDS() needs at least one field; these are what it would define for none.
  static auto xax_fields() { return std::tuple<>(); }
  static constexpr std::array<std::string_view, 0> xax_field_names() { return {}; }
};

namespace detail {

/// The smallest scale accepted anywhere: FLT_MIN, the smallest normal float. Any smaller scale has a
/// reciprocal above FLT_MAX, and unscaling by an infinite factor would make every gradient non-finite.
inline constexpr float smallest_loss_scale = FLT_MIN;

[[noreturn]] inline void reject(std::string_view where, std::string_view field, const std::string& value,
                                std::string_view accepted) {
  throw ConfigError(std::string(where) + " " + std::string(field) + " = " + value +
                    " is not accepted: it must be " + std::string(accepted));
}

/// How loss-scale validation names what it rejects: the owner (message prefix) and each option's name.
/// DynamicLossScaleOptions uses its member names; MixedPrecisionConfig its config fields.
struct LossScaleOptionNames {
  std::string_view where;
  std::string_view initial_scale;
  std::string_view growth_interval;
  std::string_view growth_factor;
  std::string_view backoff_factor;
  std::string_view min_scale;
  std::string_view max_scale;
  std::string_view hysteresis;
};

inline constexpr LossScaleOptionNames dynamic_loss_scale_option_names{
    "DynamicLossScaleOptions:", "initial_scale", "growth_interval", "growth_factor",
    "backoff_factor",           "min_scale",     "max_scale",       "hysteresis"};

// Whether `value` (a float, or a double that will be rounded to one) is finite as a float.
template <class Real>
bool finite_as_float(Real value) {
  if constexpr (std::is_same_v<Real, float>) {
    return is_finite_bits(value);
  } else {
    return std::isfinite(value) && value >= -static_cast<double>(FLT_MAX) &&
           value <= static_cast<double>(FLT_MAX);
  }
}

/// Throws ConfigError naming `field` of `where` unless `value` is finite and at least smallest_loss_scale
/// once rounded to float (the rules of every scale, static, dynamic or set by hand).
template <class Real>
void require_scale_in_range(std::string_view where, std::string_view field, Real value) {
  if (!finite_as_float(value) || !(static_cast<float>(value) >= smallest_loss_scale)) {
    reject(where, field, shortest_text(value),
           "a number from " + shortest_text(smallest_loss_scale) + " to " + shortest_text(FLT_MAX) +
               " (from the smallest normal float, since a smaller scale has no finite reciprocal to unscale "
               "with, to the largest float)");
  }
}

/// The one validator of a dynamic loss scale's options, for DynamicLossScaleOptions (Real = float) and for
/// the config fields that make them (Real = double, checked as the floats they round to, quoted as given).
/// Throws ConfigError, naming the option by `names`, unless growth_interval >= 1, growth_factor > 1,
/// 0 < backoff_factor < 1, FLT_MIN <= min_scale <= initial_scale <= max_scale, all finite, and
/// 1 <= hysteresis <= INT_MAX.
template <class Real>
void validate_dynamic_loss_scale(Real initial_scale, std::int64_t growth_interval, Real growth_factor,
                                 Real backoff_factor, Real min_scale, Real max_scale, std::int64_t hysteresis,
                                 const LossScaleOptionNames& names) {
  const std::string_view where = names.where;
  if (growth_interval < 1) {
    reject(where, names.growth_interval, std::to_string(growth_interval),
           "at least 1 (the number of consecutive finite steps before the scale grows)");
  }
  if (!finite_as_float(growth_factor) || !(static_cast<float>(growth_factor) > 1.0f)) {
    reject(where, names.growth_factor, shortest_text(growth_factor),
           "a finite number greater than 1 as a float (2 doubles the scale on growth)");
  }
  if (!finite_as_float(backoff_factor) ||
      !(static_cast<float>(backoff_factor) > 0.0f && static_cast<float>(backoff_factor) < 1.0f)) {
    reject(where, names.backoff_factor, shortest_text(backoff_factor),
           "in (0, 1), between 0 and 1 with both excluded, as a float (0.5 halves the scale on overflow)");
  }
  require_scale_in_range(where, names.min_scale, min_scale);
  require_scale_in_range(where, names.max_scale, max_scale);
  const float min_float = static_cast<float>(min_scale);
  const float max_float = static_cast<float>(max_scale);
  if (min_float > max_float) {
    reject(where, names.min_scale, shortest_text(min_scale),
           "at most " + std::string(names.max_scale) + " = " + shortest_text(max_scale));
  }
  if (!finite_as_float(initial_scale) ||
      !(static_cast<float>(initial_scale) >= min_float && static_cast<float>(initial_scale) <= max_float)) {
    reject(where, names.initial_scale, shortest_text(initial_scale),
           "finite and within [" + std::string(names.min_scale) + ", " + std::string(names.max_scale) +
               "] = [" + shortest_text(min_scale) + ", " + shortest_text(max_scale) + "]");
  }
  if (hysteresis < 1 || hysteresis > std::numeric_limits<int>::max()) {
    reject(where, names.hysteresis, std::to_string(hysteresis),
           "at least 1 and at most " + std::to_string(std::numeric_limits<int>::max()) +
               " (1 backs off on every overflow; h absorbs the first h - 1 overflows after each growth)");
  }
}

inline void validate(const DynamicLossScaleOptions& options) {
  validate_dynamic_loss_scale(options.initial_scale, options.growth_interval, options.growth_factor,
                              options.backoff_factor, options.min_scale, options.max_scale,
                              options.hysteresis, dynamic_loss_scale_option_names);
}

/// `x` with every floating element multiplied by `factor`: in float for float, in double for double, and
/// through float with one rounding for 16-bit values. A factor of 1 returns an unchanged copy.
template <class T>
std::remove_cvref_t<T> scaled_copy(const T& x, float factor) {
  using Plain = std::remove_cvref_t<T>;
  if constexpr (floating_scalar<Plain>) {
    if constexpr (std::is_same_v<Plain, double>) {
      return x * static_cast<double>(factor);
    } else {
      return convert_scalar<Plain>(convert_scalar<float>(x) * factor);
    }
  } else {
    Plain copy = x;
    if (factor != 1.0f) static_cast<void>(scale_and_check_tree(copy, factor));
    return copy;
  }
}

/// 1 / scale computed in double and rounded to float once (PyTorch's unscale).
inline float reciprocal(float scale) {
  return static_cast<float>(1.0 / static_cast<double>(scale));
}

/// 1 / (scale * micro_batches), the factor that unscales and averages gradients summed over micro-batches:
/// the product is exact in double (for k < 2^29) and the reciprocal rounds to float once, as for one batch.
/// Computing it in float, as reciprocal(scale) / k, rounds twice and can be one ulp off.
inline float reciprocal(float scale, std::int64_t micro_batches) {
  return static_cast<float>(1.0 / (static_cast<double>(scale) * static_cast<double>(micro_batches)));
}

/// Throws ConfigError naming `scale` of `where` unless it is finite and within options' [min_scale,
/// max_scale]: the scales a DynamicLossScale with these options can hold.
inline void require_scale_within(std::string_view where, float scale,
                                 const DynamicLossScaleOptions& options) {
  if (!is_finite_bits(scale) || !(scale >= options.min_scale && scale <= options.max_scale)) {
    reject(where, "scale", shortest_text(scale),
           "finite and within [min_scale, max_scale] = [" + shortest_text(options.min_scale) + ", " +
               shortest_text(options.max_scale) + "]");
  }
}

/// The scale() and unscale() of a loss scale that multiplies by Derived's loss_scale() and inverse_scale()
/// (a CRTP base of StaticLossScale and DynamicLossScale).
template <class Derived>
class MultiplyingLossScale {
 public:
  /// `x` (a scalar such as the loss, or a tree) with every floating element multiplied by the scale.
  template <class T>
  [[nodiscard]] std::remove_cvref_t<T> scale(const T& x) const {
    return scaled_copy(x, derived().loss_scale());
  }
  /// `tree` with every floating element multiplied by inverse_scale().
  template <class T>
  [[nodiscard]] std::remove_cvref_t<T> unscale(const T& tree) const {
    return scaled_copy(tree, derived().inverse_scale());
  }

  friend bool operator==(const MultiplyingLossScale&, const MultiplyingLossScale&) = default;

 protected:
  MultiplyingLossScale() = default;
  MultiplyingLossScale(const MultiplyingLossScale&) = default;
  MultiplyingLossScale& operator=(const MultiplyingLossScale&) = default;
  ~MultiplyingLossScale() = default;

 private:
  [[nodiscard]] const Derived& derived() const { return static_cast<const Derived&>(*this); }
};

}  // namespace detail

/// No loss scaling: a scale of 1. scale() and unscale() return their input unchanged.
class NoOpLossScale {
 public:
  /// The loss_scaling config value that selects this kind.
  static constexpr std::string_view kind = "none";
  using state_type = NoOpLossScaleState;

  [[nodiscard]] float loss_scale() const { return 1.0f; }
  [[nodiscard]] float inverse_scale() const { return 1.0f; }
  /// Always true: the scale never moves, so an overflow cannot lower it.
  [[nodiscard]] bool at_min_scale() const { return true; }
  /// An empty tree: there is nothing to save.
  [[nodiscard]] state_type state() const { return {}; }
  [[nodiscard]] static NoOpLossScale from_state(const state_type& /*state*/) { return {}; }

  /// `x` unchanged.
  template <class T>
  [[nodiscard]] std::remove_cvref_t<T> scale(const T& x) const {
    return x;
  }
  /// `tree` unchanged.
  template <class T>
  [[nodiscard]] std::remove_cvref_t<T> unscale(const T& tree) const {
    return tree;
  }
  /// Does nothing: the scale is always 1.
  void adjust(bool /*grads_finite*/) {}

  friend bool operator==(const NoOpLossScale&, const NoOpLossScale&) = default;
};

/// A fixed loss scale.
class StaticLossScale : public detail::MultiplyingLossScale<StaticLossScale> {
 public:
  /// The loss_scaling config value that selects this kind.
  static constexpr std::string_view kind = "static";

  /// Throws ConfigError unless `scale` is finite and at least FLT_MIN (so that 1/scale is finite).
  explicit StaticLossScale(float scale) : scale_(scale) {
    detail::require_scale_in_range("StaticLossScale:", "scale", scale);
  }

  using state_type = StaticLossScaleState;
  /// The scale saved in `state`. Throws ConfigError as the constructor does (a corrupt checkpoint).
  [[nodiscard]] static StaticLossScale from_state(const state_type& state) {
    return StaticLossScale(state.scale);
  }
  [[nodiscard]] state_type state() const { return {scale_}; }

  [[nodiscard]] float loss_scale() const { return scale_; }
  /// 1 / loss_scale(), computed in double and rounded to float once.
  [[nodiscard]] float inverse_scale() const { return detail::reciprocal(scale_); }
  /// Always true: adjust() never lowers a static scale.
  [[nodiscard]] bool at_min_scale() const { return true; }
  /// Replaces the scale by hand (PyTorch's `scaler.update(new_scale)`). Throws ConfigError, leaving the scale
  /// unchanged, unless `scale` is finite and at least FLT_MIN.
  void set_loss_scale(float scale) {
    detail::require_scale_in_range("StaticLossScale::set_loss_scale:", "scale", scale);
    scale_ = scale;
  }

  /// Does nothing: the scale is fixed.
  void adjust(bool /*grads_finite*/) {}

  friend bool operator==(const StaticLossScale&, const StaticLossScale&) = default;

 private:
  float scale_;
};

/// A loss scale that grows after `growth_interval` consecutive finite steps and backs off on overflow.
///
/// `adjust(true)` counts a finite step. On the growth_interval-th in a row the counter restarts at 0 and the
/// scale becomes scale * growth_factor if that is finite and at most max_scale (otherwise it stays), as in
/// jmp and PyTorch. `adjust(false)` restarts the counter and backs the scale off to max(min_scale, scale *
/// backoff_factor). With hysteresis h > 1 the first h - 1 overflows since the last growth interval completed
/// (or since the start) are absorbed without backing off; the tracker refills only when a growth interval
/// completes (Megatron's rule; Apex refills on every finite step).
class DynamicLossScale : public detail::MultiplyingLossScale<DynamicLossScale> {
 public:
  /// The loss_scaling config value that selects this kind.
  static constexpr std::string_view kind = "dynamic";

  /// Throws ConfigError, naming the option, the value and what is accepted, unless growth_interval >= 1,
  /// growth_factor > 1, 0 < backoff_factor < 1, FLT_MIN <= min_scale <= initial_scale <= max_scale, all
  /// finite, and hysteresis >= 1.
  explicit DynamicLossScale(DynamicLossScaleOptions options = {})
      : options_(options), scale_(options.initial_scale), hysteresis_left_(options.hysteresis) {
    detail::validate(options_);
  }

  /// The scale exactly as it was when `state` was saved. Throws ConfigError when the state could not have
  /// been produced by a DynamicLossScale with its options (a corrupt or hand-edited checkpoint).
  [[nodiscard]] static DynamicLossScale from_state(const DynamicLossScaleState& state) {
    DynamicLossScale restored(state.options);
    constexpr std::string_view where = "DynamicLossScaleState:";
    const DynamicLossScaleOptions& options = restored.options_;
    detail::require_scale_within(where, state.scale, options);
    if (state.counter < 0 || state.counter >= options.growth_interval) {
      detail::reject(
          where, "counter", std::to_string(state.counter),
          "within [0, growth_interval - 1] = [0, " + std::to_string(options.growth_interval - 1) + "]");
    }
    if (state.hysteresis_left < 1 || state.hysteresis_left > options.hysteresis) {
      detail::reject(where, "hysteresis_left", std::to_string(state.hysteresis_left),
                     "within [1, hysteresis] = [1, " + std::to_string(options.hysteresis) + "]");
    }
    restored.scale_ = state.scale;
    restored.counter_ = state.counter;
    restored.hysteresis_left_ = state.hysteresis_left;
    return restored;
  }

  [[nodiscard]] float loss_scale() const { return scale_; }
  /// 1 / loss_scale(), computed in double and rounded to float once.
  [[nodiscard]] float inverse_scale() const { return detail::reciprocal(scale_); }
  /// Consecutive finite steps since the last growth interval completed or the last overflow.
  [[nodiscard]] std::int64_t counter() const { return counter_; }
  /// The scale backs off on the hysteresis_left()-th overflow from now, unless a growth interval completes
  /// first. Always in [1, options().hysteresis].
  [[nodiscard]] int hysteresis_left() const { return hysteresis_left_; }
  [[nodiscard]] const DynamicLossScaleOptions& options() const { return options_; }
  using state_type = DynamicLossScaleState;
  /// Everything needed to continue exactly from here; see from_state().
  [[nodiscard]] DynamicLossScaleState state() const { return {scale_, counter_, hysteresis_left_, options_}; }
  /// Whether an overflow can no longer lower the scale: it sits at min_scale (hysteresis only delays a
  /// backoff, so an absorbed overflow above the minimum does not count).
  [[nodiscard]] bool at_min_scale() const { return scale_ <= options_.min_scale; }

  /// Replaces the scale by hand (PyTorch's `scaler.update(new_scale)`) and starts afresh from it: the counter
  /// restarts at 0 and the hysteresis refills, as for a scale constructed with initial_scale = `scale`
  /// (PyTorch keeps its growth tracker instead). The options, initial_scale included, do not change. Throws
  /// ConfigError, leaving everything unchanged, unless `scale` is finite and within [min_scale, max_scale].
  void set_loss_scale(float scale) {
    detail::require_scale_within("DynamicLossScale::set_loss_scale:", scale, options_);
    scale_ = scale;
    counter_ = 0;
    hysteresis_left_ = options_.hysteresis;
  }

  /// Updates the scale after a step whose gradients were (or were not) all finite.
  void adjust(bool grads_finite) {
    if (grads_finite) {
      if (++counter_ < options_.growth_interval) return;
      counter_ = 0;
      hysteresis_left_ = options_.hysteresis;
      const float grown = scale_ * options_.growth_factor;
      if (detail::is_finite_bits(grown) && grown <= options_.max_scale) scale_ = grown;
      return;
    }
    counter_ = 0;
    if (hysteresis_left_ > 1) {
      --hysteresis_left_;
      return;
    }
    scale_ = std::max(options_.min_scale, scale_ * options_.backoff_factor);
  }

  friend bool operator==(const DynamicLossScale&, const DynamicLossScale&) = default;

 private:
  DynamicLossScaleOptions options_;
  float scale_;
  std::int64_t counter_ = 0;
  int hysteresis_left_;
};

/// A loss scale of any of the three kinds, for a kind chosen at run time ("none", "static", "dynamic").
using LossScale = std::variant<NoOpLossScale, StaticLossScale, DynamicLossScale>;

/// What a train step needs from a loss scale: a name for its kind (`static constexpr std::string_view kind`,
/// recorded in checkpoints), the current scale and its reciprocal, scale() and unscale() of scalars and trees
/// returning the same type, and adjust() after each step. TrainStep accepts any such type (and the LossScale
/// variant).
///
/// Optional members TrainStep uses when present:
/// - `bool at_min_scale() const`: whether an overflow can no longer lower the scale (for LossScaleError).
///   Without it, see loss_scale_at_min().
/// - `void set_loss_scale(float)`: set the scale by hand (TrainStep::set_loss_scale).
/// - the state of checkpointable_loss_scale, for save_train_state and load_train_state.
template <class T>
concept loss_scale = std::copyable<T> &&
    requires(T& scaler, const T& const_scaler, bool grads_finite, float value, const Eigen::MatrixXf& tree) {
  { T::kind } -> std::convertible_to<std::string_view>;
  // Static: `T::kind` above also names a non-static member (the requirement is not evaluated), which
  // TrainStep, having no scale object where it records the kind, could not read.
  requires !std::is_member_object_pointer_v<decltype(&T::kind)>;
  { const_scaler.loss_scale() } -> std::same_as<float>;
  { const_scaler.inverse_scale() } -> std::same_as<float>;
  { const_scaler.scale(value) } -> std::same_as<float>;
  { const_scaler.scale(tree) } -> std::same_as<Eigen::MatrixXf>;
  { const_scaler.unscale(tree) } -> std::same_as<Eigen::MatrixXf>;
  { scaler.adjust(grads_finite) } -> std::same_as<void>;
};

/// A loss scale whose whole state is a tree that can be saved and restored: `using state_type = ...;` (a
/// default-constructible tree), `state_type state() const`, and `static T from_state(const state_type&)`,
/// which throws ConfigError for a state no run could have produced. TrainStep checkpoints such a scale under
/// `<prefix>.loss_scale` and records `T::kind` beside it.
template <class T>
concept checkpointable_loss_scale = loss_scale<T> && tree<typename T::state_type> &&
    std::default_initializable<typename T::state_type> &&
    requires(const T& scaler, const typename T::state_type& state) {
  { scaler.state() } -> std::same_as<typename T::state_type>;
  { T::from_state(state) } -> std::same_as<T>;
};

static_assert(loss_scale<NoOpLossScale> && loss_scale<StaticLossScale> && loss_scale<DynamicLossScale>);
static_assert(checkpointable_loss_scale<NoOpLossScale> && checkpointable_loss_scale<StaticLossScale> &&
              checkpointable_loss_scale<DynamicLossScale>);

/// Whether an overflow can no longer lower `scale` (TrainStep then counts it towards LossScaleError). Uses
/// `scale.at_min_scale()` when the type has it. Otherwise it asks a copy: a scale whose `adjust(false)` does
/// not lower `loss_scale()` is at its floor. That default is exact for a scale that backs off on every
/// overflow or never moves; a scale that delays its backoff (hysteresis) should define at_min_scale().
template <loss_scale S>
[[nodiscard]] bool loss_scale_at_min(const S& scale) {
  if constexpr (requires {
                  { scale.at_min_scale() } -> std::convertible_to<bool>;
                }) {
    return static_cast<bool>(scale.at_min_scale());
  } else {
    S probe = scale;
    const float before = probe.loss_scale();
    probe.adjust(false);
    return !(probe.loss_scale() < before);
  }
}

/// The config name of the kind `scale` holds: "none", "static" or "dynamic".
[[nodiscard]] inline std::string_view loss_scale_name(const LossScale& scale) {
  return std::visit([](const auto& held) { return std::remove_cvref_t<decltype(held)>::kind; }, scale);
}

}  // namespace xax
