#pragma once
/// \file
/// SGD with momentum, Nesterov momentum and weight decay, with torch.optim.SGD's semantics (dampening 0),
/// updating a tree of master weights in place in one fused pass per leaf:
///
///     d = g + wd p;  b = mu b + d (b = d on the first step);  d = nesterov ? d + mu b : b;  p -= lr d
///
/// A tree of bfloat16 leaves is trained without masters when a BF16UpdateOptions is given (fp32 momentum,
/// see xax/optim/optimizer.hpp).

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

/// torch.optim.SGD's hyper-parameters (dampening is always 0) and defaults, with learning rate 1e-2.
struct SgdOptions {
  double learning_rate = 1e-2;
  double momentum = 0.0;
  double weight_decay = 0.0;
  bool nesterov = false;
  /// Per-leaf learning-rate multipliers and weight decay by leaf path, e.g.
  /// `ParamGroups{}.no_weight_decay_if(is_bias_or_norm)`; empty: every leaf uses the values above.
  ParamGroups groups{};
};

/// SGD's state over master weights: the step count and the momentum buffer (an empty tree when momentum is
/// 0, which needs none).
template <class Params>
struct SgdState {
  std::int64_t step = 0;
  Params momentum_buffer;
  XAX_FIELDS(step, momentum_buffer);
};

/// SGD's state over bf16 params: an fp32 momentum buffer, and the Kahan compensation (empty unless
/// BF16Update::kahan).
template <class Params>
struct SgdBF16State {
  std::int64_t step = 0;
  moments_t<Params> momentum_buffer;
  Params compensation;
  XAX_FIELDS(step, momentum_buffer, compensation);
};

namespace detail {

template <class S>
struct SgdConstants {
  S learning_rate, momentum, weight_decay;
  bool nesterov, first_step;

  /// Writes the new parameters (which may be `param` itself) for `count <= update_chunk` elements and
  /// updates the momentum buffer, when there is one, in torch.optim.SGD's order of operations:
  /// d = g + wd p; b = b mu + d (b = d on the first step, where PyTorch clones d); d = nesterov ? d + mu b :
  /// b; p = p - lr d.
  void update(const S* param, const S* grad, S* buffer, S* updated, std::size_t count) const noexcept {
    using Array = Eigen::Array<S, Eigen::Dynamic, 1>;
    const auto n = static_cast<Eigen::Index>(count);
    alignas(64) S direction_storage[update_chunk];
    const Eigen::Map<const Array> p(param, n), g(grad, n);
    Eigen::Map<Array> d(direction_storage, n), out(updated, n);
    if (weight_decay != S(0)) {
      d = g + weight_decay * p;
    } else {
      d = g;
    }
    if (buffer != nullptr) {
      Eigen::Map<Array> b(buffer, n);
      if (first_step) {
        b = d;
      } else {
        b = b * momentum + d;
      }
      if (nesterov) {
        d = d + momentum * b;
      } else {
        d = b;
      }
    }
    out = p - learning_rate * d;
  }
};

}  // namespace detail

/// SGD over a tree of master weights (float or double leaves) or of bfloat16 params.
template <class Params>
class Sgd {
  static_assert((detail::require_optimizer_params<Params>(), true));

 public:
  using params_type = Params;
  /// `{step, momentum_buffer}` for master weights; bf16 params add a compensation tree.
  using State = std::conditional_t<master_params<Params>, SgdState<Params>, SgdBF16State<Params>>;

  /// A momentum buffer shaped like `like` when momentum > 0. Throws ConfigError for an option out of range.
  explicit Sgd(const Params& like, SgdOptions options = {}) requires master_params<Params>
      : options_(options) {
    validate(options_);
    leaves_ = options_.groups.resolve(like, options_.weight_decay);
    if (options_.momentum != 0) state_.momentum_buffer = zeros_like(like);
  }

  /// For bf16 params: an fp32 momentum buffer, and the rounding of the update (stochastic by default).
  explicit Sgd(const Params& like, SgdOptions options = {},
               BF16UpdateOptions bf16 = {}) requires bf16_params<Params> : options_(options),
                                                                           bf16_(bf16) {
    validate(options_);
    detail::require_known_rounding(bf16_.rounding, "xax::optim::Sgd: the bf16 update's rounding");
    leaves_ = options_.groups.resolve(like, options_.weight_decay);
    if (options_.momentum != 0) {
      state_.momentum_buffer = tree_cast<float>(like);
      fill_floating(state_.momentum_buffer, 0.0);
    }
    if (bf16_.rounding == BF16Update::kahan) state_.compensation = zeros_like(like);
  }

  /// One update of `params` from `grads` (same structure and shapes; ShapeError naming the leaf otherwise).
  void step(Params& params, const Params& grads) {
    const std::int64_t step = state_.step + 1;
    with_momentum_buffer([&](auto&... momentum_buffer) {
      if constexpr (master_params<Params>) {
        driver().update_masters(params, grads, detail::no_tree, chunk_update(step), momentum_buffer...);
      } else {
        driver().update_bf16(params, grads, bf16_, step, state_.compensation, chunk_update(step),
                             momentum_buffer...);
      }
    });
    state_.step = step;
  }

  /// step() that also writes the updated parameters, rounded to nearest, into `copy`: a tree of the same
  /// structure and shapes in another floating type (see AdamW::step with a copy).
  template <tree Copy>
  void step(Params& params, const Params& grads, Copy& copy) requires master_params<Params> {
    const std::int64_t step = state_.step + 1;
    with_momentum_buffer([&](auto&... momentum_buffer) {
      driver().update_masters(params, grads, copy, chunk_update(step), momentum_buffer...);
    });
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
    detail::with_compensation(compensation, update, "Sgd", [&](auto& carried) {
      with_momentum_buffer([&](auto&... momentum_buffer) {
        driver().update_half_masters(masters, grads, update, carried, chunk_update(step), momentum_buffer...);
      });
    });
    state_.step = step;
  }

  /// The name train-state checkpoints record (and check on load).
  [[nodiscard]] static constexpr const char* name() { return "sgd"; }
  [[nodiscard]] const State& state() const { return state_; }
  [[nodiscard]] State& state() { return state_; }
  [[nodiscard]] const SgdOptions& options() const { return options_; }

  /// Throws CheckpointError unless a state read from checkpoint entry `entry` is one a run can reach: a
  /// finite momentum buffer (train-state checkpoints call this after reading it).
  void require_reachable_state(const std::string& entry) const {
    detail::require_reachable_moments(state_.momentum_buffer, entry + ".momentum_buffer", false);
  }

  /// Changes the learning rate for the following steps. Throws ConfigError for a negative or non-finite rate.
  void set_learning_rate(double learning_rate) {
    SgdOptions changed = options_;
    changed.learning_rate = learning_rate;
    validate(changed);
    options_ = changed;
  }

 private:
  static void validate(const SgdOptions& o) {
    detail::require_option(std::isfinite(o.learning_rate) && o.learning_rate >= 0, "Sgd", "learning_rate",
                           o.learning_rate, "a finite value >= 0");
    detail::require_option(std::isfinite(o.momentum) && o.momentum >= 0, "Sgd", "momentum", o.momentum,
                           "a finite value >= 0");
    detail::require_option(std::isfinite(o.weight_decay) && o.weight_decay >= 0, "Sgd", "weight_decay",
                           o.weight_decay, "a finite value >= 0");
    detail::require_option(!o.nesterov || o.momentum > 0, "Sgd", "momentum (with nesterov = true)",
                           o.momentum, "a value > 0: Nesterov momentum needs momentum");
  }

  // Per element an update reads and writes the parameter and the momentum buffer and reads the gradient.
  [[nodiscard]] detail::ElementwiseDriver driver() const { return {"Sgd", leaves_, 5, 12}; }

  // Calls `f(state_.momentum_buffer)`, or `f()` without momentum, which needs no buffer.
  template <class F>
  void with_momentum_buffer(F&& f) {
    if (options_.momentum != 0) {
      f(state_.momentum_buffer);
    } else {
      f();
    }
  }

  // The update of one chunk of a leaf at `step`, for the driver; `buffer` is null without momentum.
  [[nodiscard]] auto chunk_update(std::int64_t step) const {
    return [this, step]<class A>(std::type_identity<A>, const LeafSettings& leaf, A* buffer = nullptr) {
      const detail::SgdConstants<A> constants{
          static_cast<A>(options_.learning_rate * leaf.learning_rate_scale),
          static_cast<A>(options_.momentum), static_cast<A>(leaf.weight_decay), options_.nesterov, step == 1};
      return [constants, buffer](const A* param, const A* grad, A* updated, std::size_t first,
                                 std::size_t count) noexcept {
        constants.update(param, grad, buffer != nullptr ? buffer + first : nullptr, updated, count);
      };
    };
  }

  SgdOptions options_;
  std::vector<LeafSettings> leaves_;  // per floating leaf, in for_each_leaf order, from options_.groups
  BF16UpdateOptions bf16_{};
  State state_;
};

}  // namespace xax::optim
