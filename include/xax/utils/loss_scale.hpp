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

#include <algorithm>
#include <cfloat>
#include <concepts>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <variant>
#include <xax/detail/format.hpp>
#include <xax/detail/ieee754.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/finite.hpp>
#include <xax/utils/tree.hpp>

namespace xax {

/// The options of a DynamicLossScale. Names and defaults follow jmp and PyTorch's GradScaler, plus min/max
/// bounds and Megatron's hysteresis.
struct DynamicLossScaleOptions {
  float initial_scale = 32768;          ///< the scale before the first step (2^15)
  std::int64_t growth_interval = 2000;  ///< consecutive finite steps after which the scale grows
  float growth_factor = 2;              ///< multiplies the scale on growth; > 1
  float backoff_factor = 0.5f;          ///< multiplies the scale on overflow; in (0, 1)
  float min_scale = 1;                  ///< the scale never backs off below this
  float max_scale = FLT_MAX;            ///< the scale never grows above this
  int hysteresis = 1;  ///< the scale backs off on the hysteresis-th overflow since the last growth

  friend bool operator==(const DynamicLossScaleOptions&, const DynamicLossScaleOptions&) = default;
};

/// Everything a DynamicLossScale is, as plain data for checkpoints: save `state()`, restore with
/// `DynamicLossScale::from_state`. The options are part of it, so a restored scale keeps its bounds.
struct DynamicLossScaleState {
  float scale = 32768;
  std::int64_t counter = 0;  ///< consecutive finite steps since the last growth or overflow
  int hysteresis_left = 1;   ///< the scale backs off on the hysteresis_left-th overflow from now
  DynamicLossScaleOptions options;

  friend bool operator==(const DynamicLossScaleState&, const DynamicLossScaleState&) = default;
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

inline void require_scale_in_range(std::string_view where, std::string_view field, float value) {
  if (!is_finite_bits(value) || !(value >= smallest_loss_scale)) {
    reject(where, field, shortest_text(value),
           "a finite number of at least " + shortest_text(smallest_loss_scale) +
               " (the smallest normal float; a smaller scale has no finite reciprocal to unscale with)");
  }
}

inline void validate(const DynamicLossScaleOptions& options) {
  constexpr std::string_view where = "DynamicLossScaleOptions:";
  if (options.growth_interval < 1) {
    reject(where, "growth_interval", std::to_string(options.growth_interval),
           "at least 1 (the number of consecutive finite steps before the scale grows)");
  }
  if (!is_finite_bits(options.growth_factor) || !(options.growth_factor > 1.0f)) {
    reject(where, "growth_factor", shortest_text(options.growth_factor),
           "a finite number greater than 1 (2 doubles the scale on growth)");
  }
  if (!is_finite_bits(options.backoff_factor) ||
      !(options.backoff_factor > 0.0f && options.backoff_factor < 1.0f)) {
    reject(where, "backoff_factor", shortest_text(options.backoff_factor),
           "between 0 and 1, both excluded (0.5 halves the scale on overflow)");
  }
  require_scale_in_range(where, "min_scale", options.min_scale);
  require_scale_in_range(where, "max_scale", options.max_scale);
  if (options.min_scale > options.max_scale) {
    reject(where, "min_scale", shortest_text(options.min_scale),
           "at most max_scale = " + shortest_text(options.max_scale));
  }
  if (!is_finite_bits(options.initial_scale) ||
      !(options.initial_scale >= options.min_scale && options.initial_scale <= options.max_scale)) {
    reject(where, "initial_scale", shortest_text(options.initial_scale),
           "finite and within [min_scale, max_scale] = [" + shortest_text(options.min_scale) + ", " +
               shortest_text(options.max_scale) + "]");
  }
  if (options.hysteresis < 1) {
    reject(
        where, "hysteresis", std::to_string(options.hysteresis),
        "at least 1 (1 backs off on every overflow; h absorbs the first h - 1 overflows after each growth)");
  }
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

}  // namespace detail

/// No loss scaling: a scale of 1. scale() and unscale() return their input unchanged.
class NoOpLossScale {
 public:
  /// The loss_scaling config value that selects this kind.
  static constexpr std::string_view kind = "none";

  [[nodiscard]] float loss_scale() const { return 1.0f; }
  [[nodiscard]] float inverse_scale() const { return 1.0f; }

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
class StaticLossScale {
 public:
  /// The loss_scaling config value that selects this kind.
  static constexpr std::string_view kind = "static";

  /// Throws ConfigError unless `scale` is finite and at least FLT_MIN (so that 1/scale is finite).
  explicit StaticLossScale(float scale) : scale_(scale) {
    detail::require_scale_in_range("StaticLossScale:", "scale", scale);
  }

  [[nodiscard]] float loss_scale() const { return scale_; }
  /// 1 / loss_scale(), computed in double and rounded to float once.
  [[nodiscard]] float inverse_scale() const { return detail::reciprocal(scale_); }

  /// `x` (a scalar such as the loss, or a tree) with every floating element multiplied by the scale.
  template <class T>
  [[nodiscard]] std::remove_cvref_t<T> scale(const T& x) const {
    return detail::scaled_copy(x, scale_);
  }
  /// `tree` with every floating element multiplied by inverse_scale().
  template <class T>
  [[nodiscard]] std::remove_cvref_t<T> unscale(const T& tree) const {
    return detail::scaled_copy(tree, inverse_scale());
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
class DynamicLossScale {
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
    if (!detail::is_finite_bits(state.scale) ||
        !(state.scale >= options.min_scale && state.scale <= options.max_scale)) {
      detail::reject(where, "scale", detail::shortest_text(state.scale),
                     "finite and within [min_scale, max_scale] = [" +
                         detail::shortest_text(options.min_scale) + ", " +
                         detail::shortest_text(options.max_scale) + "]");
    }
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
  /// Everything needed to continue exactly from here; see from_state().
  [[nodiscard]] DynamicLossScaleState state() const { return {scale_, counter_, hysteresis_left_, options_}; }

  /// `x` (a scalar such as the loss, or a tree) with every floating element multiplied by the scale.
  template <class T>
  [[nodiscard]] std::remove_cvref_t<T> scale(const T& x) const {
    return detail::scaled_copy(x, scale_);
  }
  /// `tree` with every floating element multiplied by inverse_scale().
  template <class T>
  [[nodiscard]] std::remove_cvref_t<T> unscale(const T& tree) const {
    return detail::scaled_copy(tree, inverse_scale());
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

/// What a train step needs from a loss scale: the current scale and its reciprocal, scale() and unscale()
/// of scalars and trees returning the same type, and adjust() after each step.
template <class T>
concept loss_scale = std::copyable<T> &&
    requires(T& scaler, const T& const_scaler, bool grads_finite, float value, const Eigen::MatrixXf& tree) {
  { T::kind } -> std::convertible_to<std::string_view>;
  { const_scaler.loss_scale() } -> std::same_as<float>;
  { const_scaler.inverse_scale() } -> std::same_as<float>;
  { const_scaler.scale(value) } -> std::same_as<float>;
  { const_scaler.scale(tree) } -> std::same_as<Eigen::MatrixXf>;
  { const_scaler.unscale(tree) } -> std::same_as<Eigen::MatrixXf>;
  { scaler.adjust(grads_finite) } -> std::same_as<void>;
};

static_assert(loss_scale<NoOpLossScale> && loss_scale<StaticLossScale> && loss_scale<DynamicLossScale>);

/// The config name of the kind `scale` holds: "none", "static" or "dynamic".
[[nodiscard]] inline std::string_view loss_scale_name(const LossScale& scale) {
  return std::visit([](const auto& held) { return std::remove_cvref_t<decltype(held)>::kind; }, scale);
}

}  // namespace xax
