#pragma once
/// \file
/// AdamW with torch.optim.AdamW's semantics (decoupled weight decay, bias-corrected moments; amsgrad off),
/// updating a tree of master weights in place from unscaled gradients in one fused pass per leaf.
///
///     xax::optim::AdamW<MlpParams<float>> adamw(masters, {.learning_rate = 1e-3, .weight_decay = 0.01});
///     adamw.step(masters, grads);   // grads: unscaled fp32, same tree shape
///
/// A tree of bfloat16 leaves is trained without masters when a BF16UpdateOptions is given (see
/// xax/optim/optimizer.hpp): fp32 moments, fp32 arithmetic, and stochastic rounding or Kahan compensation
/// when writing the parameter back.

#include <xax/detail/eigen.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>
#include <xax/optim/detail/elementwise_driver.hpp>
#include <xax/optim/optimizer.hpp>
#include <xax/optim/param_groups.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/tree.hpp>
#include <xax/utils/tree_cast.hpp>

namespace xax::optim {

/// torch.optim.AdamW's hyper-parameters and defaults.
struct AdamWOptions {
  double learning_rate = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
  /// Per-leaf learning-rate multipliers and weight decay by leaf path, e.g.
  /// `ParamGroups{}.no_weight_decay_if(is_bias_or_norm)`; empty: every leaf uses the values above.
  ParamGroups groups{};
};

/// AdamW's state over master weights: the step count and both moments, shaped like the params.
template <class Params>
struct AdamWState {
  std::int64_t step = 0;
  Params m;
  Params v;
  XAX_FIELDS(step, m, v);
};

/// AdamW's state over bf16 params: fp32 moments, and the Kahan compensation (empty unless BF16Update::kahan).
template <class Params>
struct AdamWBF16State {
  std::int64_t step = 0;
  moments_t<Params> m;
  moments_t<Params> v;
  Params compensation;
  XAX_FIELDS(step, m, v, compensation);
};

namespace detail {

/// The per-step constants of the update, in the arithmetic type S, computed as PyTorch computes them (in
/// double, then used at the tensor's precision).
template <class S>
struct AdamWConstants {
  S decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bias_correction2_sqrt, eps;

  static AdamWConstants make(const AdamWOptions& o, std::int64_t step, const LeafSettings& leaf) {
    const auto t = static_cast<double>(step);
    const double learning_rate = o.learning_rate * leaf.learning_rate_scale;
    return {static_cast<S>(1.0 - learning_rate * leaf.weight_decay),
            static_cast<S>(o.beta1),
            static_cast<S>(1.0 - o.beta1),
            static_cast<S>(o.beta2),
            static_cast<S>(1.0 - o.beta2),
            static_cast<S>(learning_rate / (1.0 - std::pow(o.beta1, t))),
            static_cast<S>(std::sqrt(1.0 - std::pow(o.beta2, t))),
            static_cast<S>(o.eps)};
  }

  /// Updates m and v in place and writes the new parameters (which may be `param` itself), for `count`
  /// elements. The order of operations is torch.optim.AdamW's single-tensor path: p *= 1 - lr wd;
  /// m = m b1 + (1 - b1) g; v = v b2 + (1 - b2) g g; p += -lr / (1 - b1^t) * (m / (sqrt(v) / sqrt(1 - b2^t) +
  /// eps)). Written as Eigen array expressions because their SIMD square root has no errno side effect: a
  /// plain loop calling std::sqrt is not vectorised unless the user compiles with -fno-math-errno, and runs
  /// ~10x slower.
  void update(const S* param, const S* grad, S* m, S* v, S* updated, std::size_t count) const noexcept {
    using Array = Eigen::Array<S, Eigen::Dynamic, 1>;
    const auto n = static_cast<Eigen::Index>(count);
    const Eigen::Map<const Array> p(param, n), g(grad, n);
    Eigen::Map<Array> first(m, n), second(v, n), out(updated, n);
    first = first * beta1 + one_minus_beta1 * g;
    second = second * beta2 + one_minus_beta2 * g * g;
    out = p * decay - step_size * (first / (second.sqrt() / bias_correction2_sqrt + eps));
  }
};

}  // namespace detail

/// AdamW over a tree of master weights (float or double leaves) or of bfloat16 params (pure-bf16 training).
template <class Params>
class AdamW {
  static_assert((detail::require_optimizer_params<Params>(), true));

 public:
  using params_type = Params;
  /// `{step, m, v}` for master weights; bf16 params add a compensation tree (see AdamWBF16State).
  using State = std::conditional_t<master_params<Params>, AdamWState<Params>, AdamWBF16State<Params>>;

  /// Zero moments shaped like `like`. Throws ConfigError for an option out of range.
  explicit AdamW(const Params& like, AdamWOptions options = {}) requires master_params<Params>
      : options_(options) {
    validate(options_);
    leaves_ = options_.groups.resolve(like, options_.weight_decay);
    state_.m = zeros_like(like);
    state_.v = zeros_like(like);
  }

  /// For bf16 params: zero fp32 moments, and the rounding of the update (stochastic by default).
  explicit AdamW(const Params& like, AdamWOptions options = {},
                 BF16UpdateOptions bf16 = {}) requires bf16_params<Params> : options_(options),
                                                                             bf16_(bf16) {
    validate(options_);
    detail::require_known_rounding(bf16_.rounding, "xax::optim::AdamW: the bf16 update's rounding");
    leaves_ = options_.groups.resolve(like, options_.weight_decay);
    state_.m = tree_cast<float>(like);
    fill_floating(state_.m, 0.0);
    state_.v = state_.m;
    if (bf16_.rounding == BF16Update::kahan) state_.compensation = zeros_like(like);
  }

  /// One update of `params` from `grads` (same structure and shapes as the params the optimizer was created
  /// for; ShapeError naming the leaf otherwise).
  void step(Params& params, const Params& grads) {
    const std::int64_t step = state_.step + 1;
    if constexpr (master_params<Params>) {
      driver().update_masters(params, grads, detail::no_tree, chunk_update(step), state_.m, state_.v);
    } else {
      driver().update_bf16(params, grads, bf16_, step, state_.compensation, chunk_update(step), state_.m,
                           state_.v);
    }
    state_.step = step;
  }

  /// step() that also writes the updated parameters, rounded to nearest, into `copy`: a tree of the same
  /// structure and shapes in another floating type, such as a train step's bf16 compute copy of its fp32
  /// masters. Each chunk is rounded while it is still in L1, so the copy costs its stores and not a second
  /// pass over the parameters. Non-floating leaves of `copy` are left alone. ShapeError naming the leaf when
  /// the trees differ.
  template <tree Copy>
  void step(Params& params, const Params& grads, Copy& copy) requires master_params<Params> {
    const std::int64_t step = state_.step + 1;
    driver().update_masters(params, grads, copy, chunk_update(step), state_.m, state_.v);
    state_.step = step;
  }

  /// One update of half-precision masters `masters` (bfloat16 or float16 leaves, and float leaves kept in
  /// full precision: the params' structure with their floating leaves narrowed, as TrainStep's float16 and
  /// bfloat16 params are) from fp32 `grads`, with this optimizer's fp32 state and no fp32 copy of the
  /// masters: each chunk is widened, updated and rounded back as `update` says, while it is in L1. The result
  /// is bit for bit that of step() on an fp32 copy rounded back with the same rounding. Kahan reads and
  /// writes `compensation` (shaped like the masters); other roundings take nullptr. ShapeError when the trees
  /// differ, ConfigError for Kahan without a compensation tree.
  template <tree Masters>
  void step_half_masters(
      Masters& masters, const Params& grads, const HalfMasterUpdate& update,
      std::type_identity_t<Masters>*
          compensation) requires(master_params<Params>&& detail::half_master_tree<Masters>&&
                                     std::is_same_v<rebind_scalar_t<Masters, float>, Params>) {
    const std::int64_t step = state_.step + 1;
    detail::with_compensation(compensation, update, "AdamW", [&](auto& carried) {
      driver().update_half_masters(masters, grads, update, carried, chunk_update(step), state_.m, state_.v);
    });
    state_.step = step;
  }

  /// The name train-state checkpoints record (and check on load).
  [[nodiscard]] static constexpr const char* name() { return "adamw"; }
  [[nodiscard]] const State& state() const { return state_; }
  [[nodiscard]] State& state() { return state_; }
  [[nodiscard]] const AdamWOptions& options() const { return options_; }

  /// Throws CheckpointError unless a state read from checkpoint entry `entry` is one a run can reach: finite
  /// moments, the second one >= 0 (train-state checkpoints call this after reading it).
  void require_reachable_state(const std::string& entry) const {
    detail::require_reachable_moments(state_.m, entry + ".m", false);
    detail::require_reachable_moments(state_.v, entry + ".v", true);
  }

  /// Changes the learning rate for the following steps (schedules call this). Throws ConfigError for a
  /// negative or non-finite rate.
  void set_learning_rate(double learning_rate) {
    AdamWOptions changed = options_;
    changed.learning_rate = learning_rate;
    validate(changed);
    options_ = changed;
  }

 private:
  static void validate(const AdamWOptions& o) {
    detail::require_option(std::isfinite(o.learning_rate) && o.learning_rate >= 0, "AdamW", "learning_rate",
                           o.learning_rate, "a finite value >= 0");
    detail::require_option(o.beta1 >= 0 && o.beta1 < 1, "AdamW", "beta1", o.beta1, "a value in [0, 1)");
    detail::require_option(o.beta2 >= 0 && o.beta2 < 1, "AdamW", "beta2", o.beta2, "a value in [0, 1)");
    // eps keeps the denominator of an element whose gradients have all been 0 away from 0: without it that
    // element's update is 0 / 0, a NaN parameter on a step that reports itself finite. It is applied in the
    // params' precision, so it must stay > 0 in float too.
    detail::require_option(std::isfinite(o.eps) && static_cast<float>(o.eps) > 0, "AdamW", "eps", o.eps,
                           "a finite value > 0 (1e-8 by default); 0 makes the update of an element whose "
                           "gradients have all been 0 a NaN");
    detail::require_option(std::isfinite(o.weight_decay) && o.weight_decay >= 0, "AdamW", "weight_decay",
                           o.weight_decay, "a finite value >= 0");
  }

  // Per element a master-weight update reads and writes the parameter and both moments and reads the
  // gradient.
  [[nodiscard]] detail::ElementwiseDriver driver() const { return {"AdamW", leaves_, 7, 14}; }

  // The update of one chunk of a leaf at `step`, for the driver.
  [[nodiscard]] auto chunk_update(std::int64_t step) const {
    return [this, step]<class A>(std::type_identity<A>, const LeafSettings& leaf, A* m, A* v) {
      const auto constants = detail::AdamWConstants<A>::make(options_, step, leaf);
      return [constants, m, v](const A* param, const A* grad, A* updated, std::size_t first,
                               std::size_t count) noexcept {
        constants.update(param, grad, m + first, v + first, updated, count);
      };
    };
  }

  AdamWOptions options_;
  std::vector<LeafSettings> leaves_;  // per floating leaf, in for_each_leaf order, from options_.groups
  BF16UpdateOptions bf16_{};
  State state_;
};

}  // namespace xax::optim
