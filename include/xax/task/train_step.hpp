#pragma once
/// \file
/// `TrainStep<Derived, Policy, LossScale>`: the mixed-precision train step as a CRTP base (DESIGN §6).
///
/// The derived trainer supplies its parameter tree as a template over the scalar, its batch type, and its
/// loss and gradients as a template over the compute scalar:
///
///     class MyTrainer : public xax::TrainStep<MyTrainer, xax::Policy<float, xax::bfloat16, float>> {
///      public:
///       template <class T> using params_type = MlpParams<T>;
///       using batch_type = Batch;
///       MyTrainer() { reset_train_state(init_mlp<float>(...), xax::optim::AdamWOptions{},
///       xax::DynamicLossScale{}); }
///       // Returns the unscaled fp32 loss and writes the gradients of (loss * loss_scale) into `grads`.
///       template <class T>
///       double loss_and_grads(const MlpParams<T>& params, const Batch& batch, float loss_scale,
///       MlpParams<T>& grads);
///     };
///
/// One `train_step(batch)` runs the trainer's forward/backward in the compute type with the loss scaled,
/// gets the gradients in fp32, unscales, checks and measures them in one pass, clips (optionally) and updates
/// the masters, or skips the step leaving masters and optimizer state bit-identical, and adjusts the loss
/// scale.
///
/// Two fusions keep the step to the passes over memory it needs:
/// - The compute copy of fp32 masters is written by the optimizer, in the same pass as the update (and once
///   when the state is reset or loaded), instead of by a separate cast at the start of every step.
///   (Half-precision masters with a different compute type still take one cast after the update.) The
///   built-in optimizers update half-precision masters in place, chunk by chunk (step_half_masters), so no
///   fp32 copy of them is held; an optimizer without it updates an fp32 copy, which is rounded back.
/// - A trainer whose `loss_and_grads` also accepts gradients of `update_type` (float unless the params are
///   double) through a second template parameter, `template <class T, class G> requires(std::same_as<G, T>
///   || std::same_as<G, float>) ... params_type<G>& grads`, receives them directly: its matmuls then write
///   them from their fp32 accumulators, which skips the cast and never rounds a gradient to 16 bits. A
///   trainer that only takes `params_type<T>& grads` gets the cast. Declare the path with `static constexpr
///   bool writes_fp32_gradients = true;` in the trainer, so that a loss_and_grads that does not accept fp32
///   gradients is a compile error rather than a silent fallback to the cast (trainers without the
///   declaration are still probed, which is kept for existing code).
///
/// A trainer whose batch is a template over its scalar (`Batch<float>`) may declare `static constexpr bool
/// casts_batch_to_compute = true;`: each batch is then cast to the compute type with the params, and
/// loss_and_grads takes `const Batch<T>&` (see xax::declares_batch_cast).
///
/// Open points (DESIGN §11): any optimizer meeting xax::train_optimizer plugs in through reset_train_state
/// (an optimizer object or a factory; AdamW and SGD go through the same door), and `on_unscaled_gradients`
/// (see xax::unscaled_gradients_hook) sees the unscaled gradients before clipping and the update.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>
#include <xax/detail/convert.hpp>
#include <xax/detail/format.hpp>
#include <xax/optim/adamw.hpp>
#include <xax/optim/sgd.hpp>
#include <xax/task/any_optimizer.hpp>
#include <xax/task/checkpoint.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/finite.hpp>
#include <xax/utils/loss_scale.hpp>
#include <xax/utils/policy.hpp>
#include <xax/utils/tree.hpp>
#include <xax/utils/tree_cast.hpp>

namespace xax {

/// What one train step did.
struct StepResult {
  double loss = 0;       ///< mean unscaled loss over the step's micro-batches, rounded to the output type
  bool finite = true;    ///< whether every unscaled gradient (and the loss) was finite
  float loss_scale = 1;  ///< the scale this step's backward used
  std::int64_t skipped_steps = 0;  ///< skipped steps so far, this one included
  double grad_norm = 0;    ///< global L2 norm of the unscaled gradients before clipping; +inf if skipped
  std::string non_finite;  ///< which tensors were non-finite ("2 of 6 tensors non-finite: ..."), or empty
};

/// Options of the step itself (the optimizer and the loss scale have their own).
struct TrainStepOptions {
  /// Clip the unscaled gradients to this global L2 norm; 0 disables clipping.
  double max_grad_norm = 0;
  /// Throw LossScaleError on the step that makes this many consecutive steps with non-finite gradients at a
  /// scale that cannot go lower (a dynamic scale at its minimum, or a static/no-op scale); 0 never throws.
  /// That step is not taken: it changes no counter, scale or parameter. A non-finite loss with finite
  /// gradients is skipped but not counted here (the scale did not cause it).
  std::int64_t max_overflows_at_min_scale = 100;
  /// How half-precision masters (float16 or bfloat16 params) take their fp32 update: round to nearest (small
  /// updates are lost), stochastic rounding (unbiased; its random stream is keyed by rounding_seed, the
  /// number of the update (applied_steps(), so a skipped step shifts nothing), the leaf and the element, so a
  /// resumed run rounds identically), or Kahan compensation (a
  /// half-precision compensation tree, checkpointed). fp32 masters ignore it.
  optim::MasterRounding master_rounding = optim::MasterRounding::round_to_nearest;
  std::uint64_t rounding_seed = 0;
};

/// Bytes held by a train state, by kind (payload only, no allocator overhead).
struct TrainStateBytes {
  std::size_t params = 0;          ///< the master weights
  std::size_t compute_params = 0;  ///< their compute-type copy (0 when the types agree)
  std::size_t grads = 0;           ///< gradient buffers
  std::size_t optimizer = 0;       ///< optimizer state (moments, momentum)
  [[nodiscard]] std::size_t total() const { return params + compute_params + grads + optimizer; }
};

/// The built-in optimizers a train step can run on its masters, by their options. Any other optimizer plugs
/// in through the reset_train_state overload that takes an optimizer or a factory (see
/// xax/task/any_optimizer.hpp).
using OptimizerOptions = std::variant<optim::AdamWOptions, optim::SgdOptions>;

/// A loss scale TrainStep can drive: any type meeting xax::loss_scale (the built-in kinds or a user's own),
/// or the LossScale variant of the built-in kinds. Checkpointing it also needs
/// xax::checkpointable_loss_scale.
template <class T>
concept train_loss_scale = loss_scale<T> || std::same_as<T, LossScale>;

/// Whether trainer `D` has its batches cast to the compute type with the params, as jmp casts `(params,
/// batch)`: `static constexpr bool casts_batch_to_compute = true;` with a `batch_type` that is a tree over
/// its scalar (`Batch<float>`, a class template declaring XAX_FIELDS). The caller passes `batch_type`;
/// TrainStep casts its floating leaves (non-floating ones, such as labels, are copied) into a buffer it
/// keeps, and loss_and_grads receives `rebind_scalar_t<batch_type, T>` (`Batch<T>`). Without the declaration
/// the batch is passed as it is.
template <class D>
concept declares_batch_cast = requires {
  { D::casts_batch_to_compute } -> std::convertible_to<bool>;
}
&&static_cast<bool>(D::casts_batch_to_compute);

namespace detail {
template <class D, class T, bool Cast = declares_batch_cast<D>>
struct step_batch {
  using type = typename D::batch_type;
};
template <class D, class T>
struct step_batch<D, T, true> {
  using type = rebind_scalar_t<typename D::batch_type, T>;
};
}  // namespace detail

/// The batch type trainer `D`'s loss_and_grads receives for compute scalar `T`: `batch_type`, or, for a
/// trainer that declares casts_batch_to_compute, `batch_type` rebound to T.
template <class D, class T>
using step_batch_t = typename detail::step_batch<D, T>::type;

/// Whether trainer `D` makes its batches from example indices: `batch_type make_batch(std::span<const
/// std::int64_t> example_indices) const` (the data TrainMixin::fit asks of a task).
template <class D>
concept makes_batches = requires(const D& trainer, std::span<const std::int64_t> example_indices) {
  typename D::batch_type;
  { trainer.make_batch(example_indices) } -> std::convertible_to<typename D::batch_type>;
};

/// Whether trainer `D`, which declares casts_batch_to_compute, can also make its batches directly in
/// compute scalar `T`: `template <class T = float> Batch<T> make_batch(std::span<const std::int64_t>
/// example_indices) const`. TrainStep::train_step_on_examples then never holds an fp32 batch beside its
/// 16-bit copy, which is what a batch costs at the peak of a 16-bit step (the 16-bit batch alone).
template <class D, class T>
concept makes_batches_in = declares_batch_cast<D> && makes_batches<D> &&
    requires(const D& trainer, std::span<const std::int64_t> example_indices) {
  { trainer.template make_batch<T>(example_indices) } -> std::convertible_to<step_batch_t<D, T>>;
};

/// What TrainStep requires of its derived trainer for compute scalar `T`: gradients written as `G` (by
/// default T; a trainer that can also write TrainStep's update_type gets its gradients without a cast).
template <class D, class T, class G = T>
concept trainer_for = requires {
  typename D::batch_type;
  typename D::template params_type<T>;
  typename D::template params_type<G>;
}
&&requires(D& trainer, const typename D::template params_type<T>& params, const step_batch_t<D, T>& batch,
           float loss_scale, typename D::template params_type<G>& grads) {
  { trainer.loss_and_grads(params, batch, loss_scale, grads) } -> std::convertible_to<double>;
};

/// Whether trainer `D` opts in to writing its gradients in TrainStep's update_type (fp32) straight from
/// compute-type params: `static constexpr bool writes_fp32_gradients = true;`. TrainStep then checks, with
/// a static_assert naming what is missing, that its loss_and_grads accepts them.
template <class D>
concept declares_fp32_gradients = requires {
  { D::writes_fp32_gradients } -> std::convertible_to<bool>;
}
&&static_cast<bool>(D::writes_fp32_gradients);

/// The customization point between unscale-and-check and the update (PyTorch's `scaler.unscale_(opt)`
/// followed by clipping or logging): a trainer that defines `void on_unscaled_gradients(params_type<
/// update_type>& grads, const UnscaledGradients& info)` is called with the unscaled, averaged gradients and
/// their global norm, on finite steps only (a skipped step never reaches the optimizer), before clipping and
/// the update. It may read, log or change the gradients; what it leaves is what clipping and the optimizer
/// see. The reported grad_norm, and the norm clipping compares against, is the one measured before the hook.
template <class D, class Grads>
concept unscaled_gradients_hook = requires(D& trainer, Grads& grads, const UnscaledGradients& info) {
  trainer.on_unscaled_gradients(grads, info);
};

/// What a gradient reducer hands back to the step (see xax::gradient_reducer): the loss summed over every
/// micro-batch of the step on every process, and how many micro-batches that was.
struct ReducedGradients {
  double loss_sum = 0;
  std::int64_t micro_batches = 0;
};

/// The customization point between the backward and unscale-and-check, for data-parallel training (DESIGN
/// §12; xax/distributed/data_parallel.hpp implements it over MPI). A trainer that defines `void
/// collect_micro_gradients(std::size_t index, double loss, const params_type<update_type>& grads)` and
/// `ReducedGradients reduce_gradients(params_type<update_type>& grads)` is handed each micro-batch's scaled
/// gradients and loss as they are computed (TrainStep then does not sum them itself: the reducer owns the
/// order of summation), and is then asked for the sum over every micro-batch of the step, on all processes,
/// in `grads`. TrainStep averages over the count it returns and unscales, checks and updates as usual, so
/// every process that receives the same reduced gradients takes the same skip decision and the same scale.
template <class D, class Grads>
concept gradient_reducer = requires(D& trainer, std::size_t index, double loss, const Grads& micro,
                                    Grads& grads) {
  trainer.collect_micro_gradients(index, loss, micro);
  { trainer.reduce_gradients(grads) } -> std::same_as<ReducedGradients>;
};

/// The customization point that replaces unscale-and-check when a gradient reducer leaves each process only
/// its shard of the summed gradients (ZeRO-1, xax/distributed/zero.hpp): a trainer that defines
/// `UnscaledGradients unscale_check_and_norm_reduced(params_type<update_type>& grads, float inverse_scale)`
/// is asked for it after reduce_gradients, and must return the same finite flag and norm on every process
/// (those of unscale_check_and_norm over the whole summed gradients).
template <class D, class Grads>
concept reduced_gradients_check = requires(D& trainer, Grads& grads, float inverse_scale) {
  { trainer.unscale_check_and_norm_reduced(grads, inverse_scale) } -> std::same_as<UnscaledGradients>;
};

namespace detail {

template <class L>
decltype(auto) visit_loss_scale(L& scale, auto&& f) {
  if constexpr (std::same_as<std::remove_const_t<L>, LossScale>) {
    return std::visit(f, scale);
  } else {
    return f(scale);
  }
}

/// Whether a non-finite step can no longer lower the scale (see xax::loss_scale_at_min).
template <class L>
bool scale_at_floor(const L& scale) {
  return visit_loss_scale(scale, [](const auto& s) { return loss_scale_at_min(s); });
}

// The loss scale as checkpoints before the per-kind state trees recorded it (one record for every kind, with
// the kind's index in the LossScale variant); still read, no longer written.
struct LossScaleRecord {
  std::int32_t kind = 0;  // index in the LossScale variant
  float scale = 1;
  std::int64_t counter = 0;
  std::int32_t hysteresis_left = 0;
  float initial_scale = 0;
  std::int64_t growth_interval = 0;
  float growth_factor = 0;
  float backoff_factor = 0;
  float min_scale = 0;
  float max_scale = 0;
  std::int32_t hysteresis = 0;
  XAX_FIELDS(kind, scale, counter, hysteresis_left, initial_scale, growth_interval, growth_factor,
             backoff_factor, min_scale, max_scale, hysteresis);
};

inline LossScale from_record(const LossScaleRecord& r) {
  switch (r.kind) {
    case 0:
      return NoOpLossScale{};
    case 1:
      return StaticLossScale(r.scale);
    case 2: {
      DynamicLossScaleState state;
      state.scale = r.scale;
      state.counter = r.counter;
      state.hysteresis_left = r.hysteresis_left;
      state.options.initial_scale = r.initial_scale;
      state.options.growth_interval = r.growth_interval;
      state.options.growth_factor = r.growth_factor;
      state.options.backoff_factor = r.backoff_factor;
      state.options.min_scale = r.min_scale;
      state.options.max_scale = r.max_scale;
      state.options.hysteresis = r.hysteresis;
      return DynamicLossScale::from_state(state);
    }
    default:
      throw CheckpointError("checkpoint holds an unknown loss-scale kind " + std::to_string(r.kind));
  }
}

// Reads the state tree of loss-scale type S under `name` and restores the scale from it; a state no run can
// reach is a CheckpointError that quotes the loss scale's own complaint.
template <checkpointable_loss_scale S>
S read_loss_scale(const CheckpointReader& reader, const std::string& name) {
  typename S::state_type state{};
  reader.read_tree(name, state);
  try {
    return S::from_state(state);
  } catch (const ConfigError& invalid) {
    throw CheckpointError("checkpoint entry '" + name +
                          "' holds a loss scale no run can reach: " + invalid.what());
  }
}

// Restores the loss scale TrainStep saved under `name`: the recorded `kind` selects the state tree to read
// (for the LossScale variant, any of its kinds; otherwise only L's own).
template <class L>
L read_loss_scale_of_kind(const CheckpointReader& reader, const std::string& name, const std::string& kind) {
  if constexpr (std::same_as<L, LossScale>) {
    std::optional<LossScale> restored;
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      (
          [&] {
            using S = std::variant_alternative_t<I, LossScale>;
            if (!restored && kind == S::kind)
              restored.emplace(std::in_place_index<I>, read_loss_scale<S>(reader, name));
          }(),
          ...);
    }
    (std::make_index_sequence<std::variant_size_v<LossScale>>{});
    if (!restored) {
      throw CheckpointError("checkpoint holds a loss scale of kind '" + kind +
                            "', which the LossScale variant does not hold (none, static or dynamic)");
    }
    return std::move(*restored);
  } else {
    if (kind != L::kind) {
      throw CheckpointError("checkpoint holds a loss scale of kind '" + kind +
                            "', but this train step uses '" + std::string(L::kind) + "'");
    }
    return read_loss_scale<L>(reader, name);
  }
}

template <class S>
using ArrayMap = Eigen::Map<Eigen::Array<S, Eigen::Dynamic, 1>>;

// Multiplies every gradient by `factor` rounded to the leaf's type, as torch.nn.utils.clip_grad_norm_ does.
// A factor below the type's normal range would lose its digits or become 0 when rounded first, so it is then
// applied in a wider type: float for half leaves (a half gradient's norm is far below FLT_MAX), double for
// float leaves (whose norm, taken in double, can exceed FLT_MAX).
template <class Tree>
void scale_in_place(Tree& tree, double factor) {
  for_each_leaf(
      [factor]<class L>(L& leaf) {
        if constexpr (floating_leaf<L>) {
          using S = leaf_scalar_t<L>;
          const auto x = leaf_span(leaf);
          ArrayMap<S> values(x.data(), static_cast<Eigen::Index>(x.size()));
          const S rounded_factor = static_cast<S>(factor);
          if (rounded_factor >= std::numeric_limits<S>::min()) {
            values *= rounded_factor;
          } else if constexpr (half_scalar<S>) {
            values = (values.template cast<float>() * static_cast<float>(factor)).template cast<S>();
          } else {
            values = (values.template cast<double>() * factor).template cast<S>();
          }
        }
      },
      tree);
}

template <class Tree>
void add_in_place(Tree& sum, const Tree& addend) {
  for_each_leaf(
      []<class L>(L& s, const L& a) {
        if constexpr (floating_leaf<L>) {
          auto out = leaf_span(s);
          const auto in = leaf_span(a);
          for (std::size_t i = 0; i < out.size(); ++i) out[i] += in[i];
        }
      },
      sum, addend);
}

}  // namespace detail

/// The CRTP train step. `Derived` provides `template <class T> using params_type`, `using batch_type`, and
/// `template <class T> double loss_and_grads(const params_type<T>&, const batch_type&, float loss_scale,
/// params_type<T>& grads)`. Call `reset_train_state` (typically from the constructor) before the first step.
template <class Derived, precision_policy Policy, train_loss_scale LossScaleT = DynamicLossScale>
class TrainStep {
 public:
  using policy_type = Policy;
  using param_type = typename Policy::param_type;
  using compute_type = typename Policy::compute_type;
  using output_type = typename Policy::output_type;
  using loss_scale_type = LossScaleT;
  /// The scalar the optimizer works in: the param type, or float when params are stored in half precision.
  using update_type = full_precision_t<param_type>;

  /// One optimizer step from one batch.
  template <class D = Derived>
  StepResult train_step(const typename D::batch_type& batch) {
    return train_step<D>(std::span<const typename D::batch_type>(&batch, 1));
  }

  /// One optimizer step from several micro-batches whose gradients are averaged (gradient accumulation).
  template <class D = Derived>
  StepResult train_step(std::span<const typename D::batch_type> micro_batches) {
    return run_step<D>(micro_batches.size(), [&](std::size_t i) -> decltype(auto) {
      return step_batch<D>(micro_batches[i], nullptr);
    });
  }

  /// The same steps, from batches the caller hands over (`train_step(std::move(batches))`, or a temporary).
  /// For a trainer that declares casts_batch_to_compute, each batch is freed as soon as it is cast, so the
  /// forward and backward run with the compute-type copy of the batch alone in memory rather than with both
  /// (the fp32 batch of a bf16 run would otherwise cost twice its bf16 copy). The batches are left
  /// moved-from.
  template <class D = Derived>
  StepResult train_step(typename D::batch_type&& batch) {
    return run_step<D>(1, [&](std::size_t) -> decltype(auto) { return step_batch<D>(batch, &batch); });
  }
  template <class D = Derived>
  StepResult train_step(std::vector<typename D::batch_type>&& micro_batches) {
    return run_step<D>(micro_batches.size(), [&](std::size_t i) -> decltype(auto) {
      return step_batch<D>(micro_batches[i], &micro_batches[i]);
    });
  }

  /// One optimizer step from the example indices of each micro-batch: the trainer makes each batch
  /// (makes_batches) just before its forward, and it is freed after its backward, so one micro-batch at a
  /// time is held. A trainer that makes its batches in the compute type (makes_batches_in) has them made
  /// so, and no fp32 copy of a 16-bit step's batch ever exists; others have each fp32 batch cast and freed
  /// before the forward, as a batch handed over. TrainMixin::fit steps through this.
  template <class D = Derived>
  StepResult train_step_on_examples(std::span<const std::span<const std::int64_t>> micro_batch_examples) {
    static_assert(makes_batches<D>,
                  "xax::TrainStep::train_step_on_examples: the trainer must define `batch_type "
                  "make_batch(std::span<const std::int64_t> example_indices) const`");
    return run_step<D>(micro_batch_examples.size(), [&](std::size_t i) -> decltype(auto) {
      const auto examples = micro_batch_examples[i];
      if constexpr (makes_batches_in<D, compute_type>) {
        return step_batch_t<D, compute_type>(derived().template make_batch<compute_type>(examples));
      } else if constexpr (!std::is_same_v<step_batch_t<D, compute_type>, typename D::batch_type>) {
        typename D::batch_type made = derived().make_batch(examples);
        return step_batch<D>(made, &made);  // a reference to the kept cast; `made` is freed on return
      } else {
        return typename D::batch_type(derived().make_batch(examples));
      }
    });
  }

  /// The master parameters. Throws Error when the optimizer owns them (sharded over processes, ZeRO-1 with
  /// sharded masters): no process then holds them whole; gather_params() is the collective replacement.
  template <class D = Derived>
  const typename D::template params_type<param_type>& params() const {
    const auto& s = state();
    if (s.masters_owned) {
      throw Error(
          "xax::TrainStep::params(): the optimizer '" + s.optimizer->name() +
          "' holds the masters, sharded over the processes (ZeRO-1 with sharded fp32 masters), so no "
          "process has them whole; call gather_params() on every process (a collective that returns a whole "
          "copy), or with_compute_params() for the compute copy, which every process holds whole");
    }
    return s.masters;
  }
  /// A copy of the whole master parameters. When the optimizer owns them (sharded over processes), this is
  /// a collective: every process must call it, and each gets the whole masters.
  template <class D = Derived>
  typename D::template params_type<param_type> gather_params() const {
    return state().whole_masters();
  }
  /// Whether the optimizer owns the masters (see xax/task/any_optimizer.hpp), so that params() throws and
  /// gather_params() is collective.
  [[nodiscard]] bool optimizer_owns_masters() const { return state().masters_owned; }
  /// Calls `f(compute_params)` with the masters cast to the compute type (for evaluation in the policy's
  /// precision).
  template <class F>
  decltype(auto) with_compute_params(F&& f) const {
    return f(state().compute_params());
  }

  /// The loss-scale object (a LossScaleT), whose own loss_scale() is the float current_loss_scale() returns.
  [[nodiscard]] const LossScaleT& loss_scaler() const { return state().loss_scale; }
  /// Every other loss_scale() in xax is a float (the loss-scale kinds' own, DESIGN §3); this one was the
  /// object.
  [[deprecated("use loss_scaler()")]] [[nodiscard]] const LossScaleT& loss_scale() const {
    return loss_scaler();
  }
  /// The scale the next step's backward will use.
  [[nodiscard]] float current_loss_scale() const {
    return detail::visit_loss_scale(state().loss_scale, [](const auto& s) { return s.loss_scale(); });
  }
  /// Sets the scale by hand between steps (PyTorch's `scaler.update(new_scale)`), through the loss scale's
  /// `set_loss_scale(float)`: a static scale takes any finite value >= FLT_MIN; a dynamic one a value within
  /// [min_scale, max_scale], and restarts its growth counter and hysteresis. The count of consecutive
  /// overflows toward max_overflows_at_min_scale restarts too: they were overflows at another scale. Throws
  /// ConfigError, changing nothing, for a bad value or a kind that cannot be set (no-op, or a user type
  /// without set_loss_scale).
  void set_loss_scale(float scale) {
    detail::visit_loss_scale(state().loss_scale, [&]<class S>(S& held) {
      if constexpr (requires { held.set_loss_scale(scale); }) {
        held.set_loss_scale(scale);
      } else {
        throw ConfigError("set_loss_scale(" + detail::shortest_text(scale) + "): a loss scale of kind '" +
                          std::string(S::kind) +
                          "' cannot be set by hand; use static or dynamic loss scaling to set it");
      }
    });
    state().overflows_at_floor = 0;
  }
  /// Calls to train_step that returned, skipped ones included (one per call, whatever the micro-batches):
  /// applied_steps() + skipped_steps(). TrainMixin::fit_steps() counts only the steps its fit() ran.
  [[nodiscard]] std::int64_t train_step_calls() const { return state().calls; }
  [[deprecated("use train_step_calls()")]] [[nodiscard]] std::int64_t steps() const {
    return train_step_calls();
  }
  /// Calls to train_step whose update was skipped because gradients or loss were not finite.
  [[nodiscard]] std::int64_t skipped_steps() const { return state().skipped; }
  /// Updates applied to the masters: train_step_calls() - skipped_steps(), which is the optimizer's own step
  /// count (the one AdamW's bias correction uses).
  [[nodiscard]] std::int64_t applied_steps() const { return state().calls - state().skipped; }
  [[nodiscard]] const TrainStepOptions& train_step_options() const { return state().options; }
  [[nodiscard]] static PolicySpec policy() { return Policy::spec(); }

  /// Calls `f(optimizer)` with the active built-in optimizer, read-only: an optim::AdamW or optim::Sgd over
  /// `params_type<update_type>`, whose `state()` holds the step count and moments. Throws Error when the step
  /// runs a user optimizer (reach that one with `optimizer<O>()`).
  template <class F>
  decltype(auto) visit_optimizer(F&& f) const {
    const auto& s = state();
    if (const auto* adamw = s.optimizer.template get_if<typename State::AdamW>()) return f(*adamw);
    if (const auto* sgd = s.optimizer.template get_if<typename State::Sgd>()) return f(*sgd);
    throw Error(
        "xax::TrainStep::visit_optimizer visits the built-in AdamW and Sgd; this step runs optimizer '" +
        s.optimizer->name() + "': reach it with optimizer<YourOptimizer>()");
  }

  /// The active optimizer, read-only, as the type `O` it was given as (optim::AdamW<params_type<update_type>>
  /// for AdamWOptions). Throws Error when the step runs an optimizer of another type.
  template <class O>
  const O& optimizer() const {
    const auto& s = state();
    if (const O* active = s.optimizer.template get_if<O>()) return *active;
    throw Error("xax::TrainStep::optimizer<O>(): this step runs optimizer '" + s.optimizer->name() +
                "', which is not of the type asked for");
  }

  /// Sets the learning rate of the optimizer (schedules call this between steps).
  void set_learning_rate(double learning_rate) { state().optimizer->set_learning_rate(learning_rate); }
  /// The optimizer's learning rate, when it reports one (`learning_rate()` or `options().learning_rate`).
  [[nodiscard]] std::optional<double> learning_rate() const { return state().optimizer->learning_rate(); }

  /// Bytes held by the train state, by kind: masters, their compute copy, gradients, optimizer state.
  using StateBytes = TrainStateBytes;
  [[nodiscard]] TrainStateBytes state_bytes() const {
    const auto& s = state();
    TrainStateBytes bytes;
    bytes.params = payload_bytes(s.masters) + s.optimizer->master_bytes();  // one of them is empty
    bytes.compute_params = std::is_same_v<compute_type, param_type> ? 0 : payload_bytes(s.compute);
    bytes.grads = payload_bytes(s.grads) + payload_bytes(s.grads_micro) +
                  (std::is_same_v<compute_type, update_type> ? 0 : payload_bytes(s.compute_grads)) +
                  payload_bytes(s.work);
    bytes.optimizer = s.optimizer->state_bytes() + payload_bytes(s.compensation);
    return bytes;
  }

  /// Adds the whole step state under `prefix`: masters, optimizer state, loss scale, counters, policy.
  template <class D = Derived>
  void save_train_state(CheckpointWriter& writer, const std::string& prefix = "train") const {
    const auto& s = state();
    writer.add_string(prefix + ".policy", recorded_policy<D>().str());
    writer.add_string(prefix + ".optimizer", s.optimizer->name());
    if (s.masters_owned) {
      s.optimizer->save_masters(writer, prefix + ".params", s.grads);  // the whole masters, as below
    } else {
      writer.add_tree(prefix + ".params", s.masters);
    }
    s.optimizer->save_state(writer, prefix + ".optimizer_state", s.grads);  // grads: the shapes
    if (uses_master_compensation(s)) writer.add_tree(prefix + ".master_compensation", s.compensation);
    // The loss scale's own state tree, and its kind to pick the tree type when reading.
    detail::visit_loss_scale(s.loss_scale, [&]<class S>(const S& held) {
      static_assert(
          checkpointable_loss_scale<S>,
          "xax::TrainStep::save_train_state: the loss scale must meet xax::checkpointable_loss_scale "
          "(using state_type = a tree; state_type state() const; static S from_state(const "
          "state_type&))");
      writer.add_string(prefix + ".loss_scale_kind", std::string(S::kind));
      writer.add_tree(prefix + ".loss_scale", held.state());
    });
    writer.add_tree(prefix + ".counters",
                    std::array<std::int64_t, 3>{s.calls, s.skipped, s.overflows_at_floor});
  }

  /// Restores what save_train_state wrote. Throws CheckpointError if it was written under another policy or
  /// optimizer, for another model structure or shape, or holds counters or a loss scale no run can reach; the
  /// current state is unchanged then.
  template <class D = Derived>
  void load_train_state(const CheckpointReader& reader, const std::string& prefix = "train") {
    load_train_state<D>(reader, LoadCommitHook{}, prefix);
  }

  /// As above; `hook.before_commit` (when set) runs once everything has been read and checked, and a throw
  /// from it leaves the current state unchanged.
  template <class D = Derived>
  void load_train_state(const CheckpointReader& reader, const LoadCommitHook& hook,
                        const std::string& prefix = "train") {
    auto& s = state();
    const std::string expected_policy = recorded_policy<D>().str();
    const std::string saved_policy = reader.read_string(prefix + ".policy");
    if (saved_policy != expected_policy) {
      throw CheckpointError("checkpoint was written under policy " + saved_policy + ", not " +
                            expected_policy);
    }
    const std::string saved_optimizer = reader.read_string(prefix + ".optimizer");
    if (saved_optimizer != s.optimizer->name()) {
      throw CheckpointError("checkpoint was written with optimizer " + saved_optimizer + ", not " +
                            s.optimizer->name());
    }
    // Read everything into copies first, so that a failure halfway leaves the live state untouched. Shapes
    // must match the live state exactly: a checkpoint of another model width is refused, not adopted.
    auto masters = s.masters_like();
    reader.read_tree(prefix + ".params", masters);
    auto optimizer = s.optimizer->with_loaded_state(reader, prefix + ".optimizer_state", s.grads);
    auto compensation = s.compensation;
    if (uses_master_compensation(s)) reader.read_tree(prefix + ".master_compensation", compensation);
    LossScaleT loss_scale = read_saved_loss_scale(reader, prefix);
    std::array<std::int64_t, 3> counters{};
    reader.read_tree(prefix + ".counters", counters);
    const auto [steps, skipped, overflows_at_floor] = counters;
    // Skipped steps are among the steps, and the overflows at the scale's floor are consecutive skipped ones.
    // The steps stay below INT64_MAX, so that the next step (which adds one) can be counted.
    constexpr std::int64_t step_limit = std::numeric_limits<std::int64_t>::max();
    if (steps < 0 || steps >= step_limit || skipped < 0 || skipped > steps || overflows_at_floor < 0 ||
        overflows_at_floor > skipped) {
      throw CheckpointError("checkpoint entry '" + prefix + ".counters' holds steps " +
                            std::to_string(steps) + ", skipped " + std::to_string(skipped) +
                            ", overflows at the minimum scale " + std::to_string(overflows_at_floor) +
                            "; expected 0 <= overflows at the minimum scale <= skipped <= steps < " +
                            std::to_string(step_limit));
    }
    if (hook.before_commit) hook.before_commit();

    s.masters = std::move(masters);
    s.refresh_compute_copy();
    s.optimizer = typename State::Optimizer(std::move(optimizer));
    s.offer_masters_to_optimizer();
    s.compensation = std::move(compensation);
    s.loss_scale = std::move(loss_scale);
    s.calls = steps;
    s.skipped = skipped;
    s.overflows_at_floor = overflows_at_floor;
  }

 protected:
  TrainStep() = default;
  ~TrainStep() = default;
  TrainStep(TrainStep&&) noexcept = default;
  TrainStep& operator=(TrainStep&&) noexcept = default;
  TrainStep(const TrainStep& other)
      : state_(other.state_ ? std::make_unique<State>(*other.state_) : nullptr) {}
  TrainStep& operator=(const TrainStep& other) {
    state_ = other.state_ ? std::make_unique<State>(*other.state_) : nullptr;
    return *this;
  }

  /// (Re)starts training from `initial` params (any floating scalar; cast to the param type) with one of the
  /// built-in optimizers (checkpoints name it "adamw" or "sgd").
  template <class InitialParams, class D = Derived>
  void reset_train_state(const InitialParams& initial, const OptimizerOptions& optimizer,
                         LossScaleT loss_scale, TrainStepOptions options = {}) {
    using Params = typename State::template Params<update_type>;
    reset_with<InitialParams, D>(
        initial,
        [&optimizer](const Params& like) {
          return std::visit(
              [&]<class O>(const O& chosen) {
                if constexpr (std::same_as<O, optim::AdamWOptions>) {
                  return State::Optimizer::hold(typename State::AdamW(like, chosen));
                } else {
                  return State::Optimizer::hold(typename State::Sgd(like, chosen));
                }
              },
              optimizer);
        },
        std::move(loss_scale), options);
  }

  /// (Re)starts training from `initial` params with any optimizer over `params_type<update_type>` (see
  /// xax::train_optimizer): the optimizer object itself, or a factory `f(const params_type<update_type>&
  /// like) -> optimizer` called with zeros shaped like the params (the built-ins are made this way).
  template <class InitialParams, class OptimizerOrFactory, class D = Derived>
  requires(!std::convertible_to<const OptimizerOrFactory&, OptimizerOptions>) void reset_train_state(
      const InitialParams& initial, OptimizerOrFactory&& optimizer, LossScaleT loss_scale,
      TrainStepOptions options = {}) {
    using Params = typename State::template Params<update_type>;
    using Box = typename State::Optimizer;
    reset_with<InitialParams, D>(
        initial,
        [&optimizer](const Params& like) -> Box {
          if constexpr (std::same_as<std::remove_cvref_t<OptimizerOrFactory>, Box>) {
            return optimizer;
          } else if constexpr (std::invocable<OptimizerOrFactory&, const Params&>) {
            using O = std::remove_cvref_t<std::invoke_result_t<OptimizerOrFactory&, const Params&>>;
            require_train_optimizer<O, Params>();
            return Box::hold(O(std::invoke(optimizer, like)));
          } else {
            using O = std::remove_cvref_t<OptimizerOrFactory>;
            require_train_optimizer<O, Params>();
            return Box::hold(O(std::forward<OptimizerOrFactory>(optimizer)));
          }
        },
        std::move(loss_scale), options);
  }

  Derived& derived() { return static_cast<Derived&>(*this); }
  const Derived& derived() const { return static_cast<const Derived&>(*this); }

 private:
  // Every train_step overload: `micro_batch(i)` gives micro-batch i as loss_and_grads takes it
  // (step_batch_t), by reference or by value; a value lives until that micro-batch's backward returns.
  template <class D, class MicroBatch>
  StepResult run_step(std::size_t micro_batch_count, MicroBatch&& micro_batch);

  // The batch loss_and_grads sees: the caller's, or its cast to compute_type (see declares_batch_cast). A
  // batch the step may free (`release`, the caller's own when handed over) is freed once cast, by moving it
  // into a local: its buffers go here, before the forward, not after the step.
  template <class D>
  const step_batch_t<D, compute_type>& step_batch(const typename D::batch_type& batch,
                                                  typename D::batch_type* release);

  // Whether half-precision masters carry a Kahan compensation, which checkpoints then hold.
  template <class S>
  static bool uses_master_compensation(const S& s) {
    return !std::is_same_v<update_type, param_type> &&
           s.options.master_rounding == optim::MasterRounding::kahan;
  }

  template <class O, class Params>
  static constexpr void require_train_optimizer() {
    static_assert(train_optimizer<O, Params>,
                  "xax::TrainStep::reset_train_state: the optimizer (or what the factory returns) must be "
                  "copyable and provide `step(params, grads)` over params_type<update_type>, "
                  "`set_learning_rate(double)`, and `state()` (const and non-const) returning a tree by "
                  "reference, which checkpoints save and restore; see xax/task/any_optimizer.hpp");
  }

  // Every reset goes through here: `make_optimizer(like)` returns the type-erased optimizer.
  template <class InitialParams, class D, class MakeOptimizer>
  void reset_with(const InitialParams& initial, MakeOptimizer&& make_optimizer, LossScaleT loss_scale,
                  TrainStepOptions options) {
    auto fresh = std::make_unique<State>(std::move(loss_scale));
    tree_cast_into(initial, fresh->masters);
    fresh->refresh_compute_copy();
    check_declared_fp32_gradients<D>();
    if constexpr (!writes_update_grads<D>) fresh->compute_grads = zeros_like(fresh->compute_params());
    fresh->grads = tree_cast<update_type>(fresh->masters);
    fill_floating(fresh->grads, 0.0);
    if constexpr (!std::is_same_v<update_type, param_type>) {
      if (options.master_rounding == optim::MasterRounding::kahan)
        fresh->compensation = zeros_like(fresh->masters);
    }
    fresh->optimizer = make_optimizer(std::as_const(fresh->grads));
    fresh->offer_masters_to_optimizer();
    if (options.max_grad_norm < 0 || !std::isfinite(options.max_grad_norm)) {
      throw ConfigError("max_grad_norm " + detail::shortest_text(options.max_grad_norm) +
                        " is not accepted; give a finite value >= 0 (0 disables clipping)");
    }
    optim::detail::require_known_rounding(options.master_rounding, "master_rounding");
    if (options.max_overflows_at_min_scale < 0) {
      throw ConfigError("max_overflows_at_min_scale " + std::to_string(options.max_overflows_at_min_scale) +
                        " is not accepted; give 0 (never stop) or more");
    }
    fresh->options = options;
    state_ = std::move(fresh);
  }

  // The state's types name Derived's params_type, which is incomplete while Derived's base list (this class)
  // is instantiated, so the state cannot be a plain member of this class: it is a member class that is only
  // defined (below) when first used inside a member function, by which time Derived is complete, and it is
  // held by pointer. That is a deferral, not type erasure: nothing is virtual. The pointer also keeps the
  // state's address stable when the trainer moves.
  struct State;

  // Whether the trainer's gradients already have the optimizer's type, so that no cast is needed: declared
  // by `writes_fp32_gradients = true` (checked), or, for trainers written before that opt-in, probed (a
  // probe that fails, say from a wrong requires clause, silently falls back to the cast; prefer declaring).
  template <class D>
  static constexpr bool writes_update_grads =
      std::is_same_v<compute_type, update_type> || declares_fp32_gradients<D> ||
      trainer_for<D, compute_type, update_type>;

  template <class D>
  static constexpr void check_declared_fp32_gradients() {
    if constexpr (declares_fp32_gradients<D>) {
      static_assert(trainer_for<D, compute_type, update_type>,
                    "xax::TrainStep: the trainer declares `writes_fp32_gradients = true`, but its "
                    "loss_and_grads does not accept `params_type<update_type>& grads` with compute-type "
                    "params; write it as `template <class T, class G> requires(std::same_as<G, T> || "
                    "std::same_as<G, float>) double loss_and_grads(const params_type<T>&, const batch_type&, "
                    "float loss_scale, params_type<G>& grads)`, or drop the declaration");
    }
  }

  template <class D>
  static constexpr void check_declared_batch_cast() {
    if constexpr (declares_batch_cast<D>) {
      static_assert(
          tree<typename D::batch_type>,
          "xax::TrainStep: the trainer declares `casts_batch_to_compute = true`, but its batch_type "
          "is not a tree; declare it as a class template over its scalar with XAX_FIELDS, e.g. "
          "`template <class T> struct Batch { Eigen::Matrix<T, -1, -1> x; Eigen::VectorXi y; "
          "XAX_FIELDS(x, y); };` and `using batch_type = Batch<float>;`");
      static_assert(trainer_for<D, compute_type> || trainer_for<D, compute_type, update_type>,
                    "xax::TrainStep: the trainer declares `casts_batch_to_compute = true`, but its "
                    "loss_and_grads does not accept the batch cast to the compute type; take it as `const "
                    "xax::step_batch_t<Trainer, T>&` (`const Batch<T>&`), or drop the declaration");
    }
  }

  template <class D, class Grads>
  static constexpr void check_unscaled_gradients_hook() {
    if constexpr (requires { &D::on_unscaled_gradients; }) {
      static_assert(unscaled_gradients_hook<D, Grads>,
                    "xax::TrainStep: the trainer's on_unscaled_gradients must be callable as "
                    "`void on_unscaled_gradients(params_type<update_type>& grads, const "
                    "xax::UnscaledGradients& info)` (public)");
    }
  }

  // The gradients loss_and_grads wrote must have the params' shapes. Checked right after the call, before
  // anything is cast, reduced or counted, so that a mismatch is named as the trainer's and the step changes
  // nothing. Returns the mismatch (tree_cast's ShapeError text), if any.
  template <class Params, class Grads>
  static std::optional<std::string> gradient_shape_mismatch(const Params& params, const Grads& grads) {
    try {
      for_each_leaf([](const auto&, const auto&) noexcept {}, params, grads);
    } catch (const ShapeError& error) {
      return std::string(error.what());
    }
    return std::nullopt;
  }
  static ShapeError gradient_shape_error(const std::string& mismatch) {
    return ShapeError("xax::TrainStep: loss_and_grads wrote gradients that are not shaped like the params (" +
                      mismatch +
                      "). Give every gradient leaf its parameter's shape; this step was not taken");
  }

  std::unique_ptr<State> state_;

  // The policy a checkpoint records and must match on load: Policy, unless the derived trainer runs under a
  // policy of its own (MixedPrecisionMixin's engine compiles a double output and rounds to the configured
  // one).
  template <class D>
  PolicySpec recorded_policy() const {
    if constexpr (requires(const D& trainer) {
                    { trainer.checkpoint_policy() } -> std::same_as<PolicySpec>;
                  }) {
      return static_cast<const D&>(*this).checkpoint_policy();
    } else {
      return Policy::spec();
    }
  }

  // The loss scale save_train_state wrote under `prefix`: a kind and its state tree, or, in checkpoints
  // written before those, one record for every built-in kind.
  static LossScaleT read_saved_loss_scale(const CheckpointReader& reader, const std::string& prefix) {
    static_assert(std::same_as<LossScaleT, LossScale> || checkpointable_loss_scale<LossScaleT>,
                  "xax::TrainStep::load_train_state: the loss scale must meet xax::checkpointable_loss_scale "
                  "(using state_type = a tree; state_type state() const; static S from_state(const "
                  "state_type&))");
    const std::string name = prefix + ".loss_scale";
    if (reader.contains(prefix + ".loss_scale_kind")) {
      return detail::read_loss_scale_of_kind<LossScaleT>(reader, name,
                                                         reader.read_string(prefix + ".loss_scale_kind"));
    }
    constexpr bool built_in =
        std::same_as<LossScaleT, LossScale> || std::same_as<LossScaleT, NoOpLossScale> ||
        std::same_as<LossScaleT, StaticLossScale> || std::same_as<LossScaleT, DynamicLossScale>;
    if constexpr (built_in) {
      detail::LossScaleRecord record;
      reader.read_tree(name, record);
      LossScale restored;
      try {
        restored = detail::from_record(record);
      } catch (const ConfigError& invalid) {
        throw CheckpointError("checkpoint entry '" + name +
                              "' holds a loss scale no run can reach: " + invalid.what());
      }
      if constexpr (std::same_as<LossScaleT, LossScale>) {
        return restored;
      } else {
        if (!std::holds_alternative<LossScaleT>(restored)) {
          throw CheckpointError("checkpoint holds a loss scale of kind '" +
                                std::string(loss_scale_name(restored)) + "', but this train step uses '" +
                                std::string(LossScaleT::kind) + "'");
        }
        return std::get<LossScaleT>(std::move(restored));
      }
    } else {
      throw CheckpointError("checkpoint has no entry '" + prefix +
                            ".loss_scale_kind': it was written before loss scales of other kinds than none, "
                            "static and dynamic could be saved, and this train step uses '" +
                            std::string(LossScaleT::kind) + "'");
    }
  }

  State& state() {
    if (!state_) throw Error("xax::TrainStep used before reset_train_state(); call it from your constructor");
    return *state_;
  }
  const State& state() const { return const_cast<TrainStep*>(this)->state(); }
};

template <class Derived, precision_policy Policy, train_loss_scale LossScaleT>
struct TrainStep<Derived, Policy, LossScaleT>::State {
  // Constructed from the caller's scale: a loss scale need not be default-constructible.
  explicit State(LossScaleT initial_loss_scale) : loss_scale(std::move(initial_loss_scale)) {}
  template <class T>
  using Params = typename Derived::template params_type<T>;
  using AdamW = optim::AdamW<Params<update_type>>;
  using Sgd = optim::Sgd<Params<update_type>>;
  // The tree a fused optimizer step also writes: the compute copy of masters kept in update_type, or the
  // half-precision masters themselves, updated through the fp32 `work` copy.
  using FusedCopy =
      std::conditional_t<std::is_same_v<update_type, param_type>, Params<compute_type>, Params<param_type>>;
  using Optimizer = detail::OptimizerBox<Params<update_type>, FusedCopy>;

  Params<param_type> masters;
  Params<compute_type> compute;        // always the masters cast to compute; unused when the types agree
  Params<compute_type> compute_grads;  // the trainer's gradients, before the cast to update_type
  Params<update_type> grads;           // unscaled fp32 gradients the optimizer reads
  Params<update_type> grads_micro;     // one micro-batch's gradients under accumulation
  bool micro_shaped = false;           // whether grads_micro has the gradients' shapes yet
  Params<update_type> work;            // fp32 copy of half-precision masters, for an optimizer without
                                       // step_half_masters; empty otherwise
  Params<param_type> compensation;     // Kahan compensation of half-precision masters; empty otherwise
  Optimizer optimizer;
  // Whether the optimizer owns the masters (see xax/task/any_optimizer.hpp): `masters` is then empty.
  bool masters_owned = false;
  // The micro-batch cast to compute_type, for a trainer that declares casts_batch_to_compute: kept so that a
  // step after the first allocates nothing.
  static constexpr bool casts_batch =
      !std::is_same_v<step_batch_t<Derived, compute_type>,
                      typename Derived::batch_type>;  // float compute passes it on
  std::conditional_t<casts_batch, step_batch_t<Derived, compute_type>, std::monostate> compute_batch{};

  LossScaleT loss_scale;
  TrainStepOptions options{};
  std::int64_t calls = 0;  // train_step calls that returned, skipped ones included
  std::int64_t skipped = 0;
  std::int64_t overflows_at_floor = 0;

  // The number of the update being applied, counting from 1, which keys stochastic rounding's random stream:
  // read during the update, before `calls` counts the step. Skipped steps do not count: a skip must leave
  // every later update as it would have been without it.
  [[nodiscard]] std::int64_t update_number() const { return calls - skipped + 1; }

  [[nodiscard]] const auto& compute_params() const {
    if constexpr (std::is_same_v<compute_type, param_type>) {
      return masters;
    } else {
      return compute;
    }
  }
  // Hands the (whole) masters to an optimizer that can own them, e.g. each process its shard, and frees them
  // here when it does. Only offered when the compute copy is a tree of its own (fp32 masters, narrower
  // compute): the forward then never needs the masters.
  void offer_masters_to_optimizer() {
    masters_owned = false;
    if constexpr (std::is_same_v<update_type, param_type> && !std::is_same_v<compute_type, param_type>) {
      if (optimizer->adopt_masters(masters)) {
        masters_owned = true;
        masters = Params<param_type>{};
      }
    }
  }
  // The masters, or, when the optimizer owns them, a tree shaped like them (to read a checkpoint into).
  Params<param_type> masters_like() const {
    if constexpr (std::is_same_v<update_type, param_type>) {
      if (masters_owned) return grads;
    }
    return masters;
  }
  // A whole copy of the masters; collective when the optimizer owns them sharded.
  Params<param_type> whole_masters() const {
    if constexpr (std::is_same_v<update_type, param_type>) {
      if (masters_owned) {
        Params<param_type> whole = grads;
        optimizer->gather_masters(whole);
        return whole;
      }
    }
    return masters;
  }
  // Re-establishes `compute` == masters cast to compute_type, after the masters were replaced wholesale.
  void refresh_compute_copy() {
    if constexpr (!std::is_same_v<compute_type, param_type>) tree_cast_into(masters, compute);
  }

  // The optimizer step on the masters, which also keeps the compute copy current: in the same pass when the
  // optimizer fuses it (AdamW, Sgd), by a cast afterwards otherwise. Half-precision masters are updated
  // through the fp32 `work` copy, and the update rounds straight back into them.
  void update_masters() {
    if constexpr (std::is_same_v<update_type, param_type>) {
      if constexpr (std::is_same_v<compute_type, param_type>) {
        optimizer->step(masters, grads, nullptr);
      } else {
        if (masters_owned) {
          optimizer->step_owned_masters(grads, compute);
        } else if (!optimizer->step(masters, grads, &compute)) {
          tree_cast_into(masters, compute);
        }
      }
    } else {
      const optim::MasterRounding rounding = options.master_rounding;
      // The built-in optimizers widen, update and round the masters chunk by chunk; another optimizer updates
      // the fp32 `work` copy, which is then rounded back (made on its first use, so only then is it held).
      const bool kahan = rounding == optim::MasterRounding::kahan;
      if (!optimizer->step_half_masters(masters, grads, {rounding, options.rounding_seed, update_number()},
                                        kahan ? &compensation : nullptr)) {
        tree_cast_into(masters, work);
        if (rounding == optim::MasterRounding::round_to_nearest) {
          if (!optimizer->step(work, grads, &masters)) tree_cast_into(work, masters);
        } else {
          optimizer->step(work, grads, nullptr);
          round_work_into_masters(rounding);
        }
      }
      refresh_compute_copy();
    }
  }

  // Rounds the updated `work` into the half-precision masters, which still hold the values before the update.
  void round_work_into_masters(optim::MasterRounding rounding) {
    std::size_t leaf = 0;
    const auto round_leaf = [&]<class W, class M>(const W& updated_leaf, M& master_leaf,
                                                  M* compensation_leaf) {
      if constexpr (floating_leaf<W> && floating_leaf<M>) {
        using H = leaf_scalar_t<M>;
        const auto updated = leaf_span(updated_leaf);
        auto param = leaf_span(master_leaf);
        if constexpr (!half_scalar<H>) {
          // A leaf kept in full precision (xax::full_precision_t) takes its fp32 update as it is.
          std::copy(updated.begin(), updated.end(), param.begin());
        } else {
          // The rounding the built-in optimizers' step_half_masters applies, chunk by chunk.
          const optim::detail::HalfStore<H> store{
              rounding, optim::detail::rounding_key(options.rounding_seed, update_number(), leaf)};
          H* const carried = compensation_leaf != nullptr ? leaf_span(*compensation_leaf).data() : nullptr;
          alignas(64) float old[optim::detail::update_chunk];
          for (std::size_t first = 0; first < param.size(); first += optim::detail::update_chunk) {
            const std::size_t count = std::min(optim::detail::update_chunk, param.size() - first);
            xax::detail::convert_serial(param.data() + first, old, count);
            store(param.data() + first, carried != nullptr ? carried + first : nullptr, old,
                  updated.data() + first, count, first);
          }
        }
        ++leaf;
      }
    };
    if (rounding == optim::MasterRounding::kahan) {
      for_each_leaf([&]<class W, class M>(const W& w, M& m, M& c) { round_leaf(w, m, &c); }, work, masters,
                    compensation);
    } else {
      for_each_leaf([&]<class W, class M>(const W& w, M& m) { round_leaf(w, m, static_cast<M*>(nullptr)); },
                    work, masters);
    }
  }
};

template <class Derived, precision_policy Policy, train_loss_scale LossScaleT>
template <class D>
const step_batch_t<D, typename Policy::compute_type>& TrainStep<Derived, Policy, LossScaleT>::step_batch(
    const typename D::batch_type& batch, typename D::batch_type* release) {
  if constexpr (State::casts_batch) {
    auto& cast = state().compute_batch;
    tree_cast_into(batch, cast);
    if (release != nullptr) [[maybe_unused]]
      const typename D::batch_type released = std::move(*release);
    return cast;
  } else {
    return batch;
  }
}

template <class Derived, precision_policy Policy, train_loss_scale LossScaleT>
template <class D, class MicroBatch>
StepResult TrainStep<Derived, Policy, LossScaleT>::run_step(std::size_t micro_batch_count,
                                                            MicroBatch&& micro_batch) {
  check_declared_batch_cast<D>();  // first: its message is the more specific one
  static_assert(
      declares_batch_cast<D> || trainer_for<D, compute_type> || trainer_for<D, compute_type, update_type>,
      "xax::TrainStep: the derived trainer must define `template <class T> using params_type = ...;`, "
      "`using batch_type = ...;` and `template <class T> double loss_and_grads(const params_type<T>& "
      "params, const batch_type& batch, float loss_scale, params_type<T>& grads)` (public), returning "
      "the unscaled loss and writing the gradients of loss * loss_scale; the grads may also be "
      "`params_type<G>&` for a second template parameter G, to receive fp32 gradients directly");
  check_declared_fp32_gradients<D>();
  check_unscaled_gradients_hook<D, typename State::template Params<update_type>>();
  auto& s = state();
  if (micro_batch_count == 0) throw ConfigError("train_step needs at least one batch; got none");
  const float scale = current_loss_scale();
  const auto& compute_params = s.compute_params();

  // A gradient reducer (data-parallel training) takes every micro-batch's gradients as they come and sums
  // them itself, so each one is written as if it were the first.
  constexpr bool reduces = gradient_reducer<D, typename State::template Params<update_type>>;
  // One micro-batch's compute-type gradients go to the optimizer's type in the unscale pass itself
  // (unscale_check_and_norm_into): the fp32 cast is then never written and read back. Only where nothing
  // reads the cast before the unscale, i.e. without accumulation and without a reducer.
  constexpr bool may_cast_in_unscale =
      !writes_update_grads<D> && !reduces &&
      !reduced_gradients_check<D, typename State::template Params<update_type>>;
  const bool cast_in_unscale = may_cast_in_unscale && micro_batch_count == 1;
  double loss_sum = 0;
  for (std::size_t i = 0; i < micro_batch_count; ++i) {
    const bool first = i == 0 || reduces;
    double micro_loss = 0;
    auto&& batch = micro_batch(i);
    static_assert(std::is_same_v<std::remove_cvref_t<decltype(batch)>, step_batch_t<D, compute_type>>);
    if constexpr (writes_update_grads<D>) {
      // The trainer writes gradients of the optimizer's type: in place, no cast.
      auto& target = first ? s.grads : s.grads_micro;
      if (!first && !s.micro_shaped) {
        s.grads_micro = s.grads;  // shaped on the first accumulating step, reused after
        s.micro_shaped = true;
      }
      micro_loss =
          static_cast<double>(derived().loss_and_grads(compute_params, std::as_const(batch), scale, target));
      if (const auto mismatch = gradient_shape_mismatch(compute_params, target)) {
        // Shaped anew, so that the next call does not inherit the trainer's shapes.
        s.grads = tree_cast<update_type>(compute_params);
        fill_floating(s.grads, 0.0);
        s.micro_shaped = false;
        throw gradient_shape_error(*mismatch);
      }
      if (!first) detail::add_in_place(s.grads, s.grads_micro);
    } else {
      micro_loss = static_cast<double>(
          derived().loss_and_grads(compute_params, std::as_const(batch), scale, s.compute_grads));
      if (const auto mismatch = gradient_shape_mismatch(compute_params, s.compute_grads)) {
        s.compute_grads = zeros_like(compute_params);  // shaped anew, as above
        throw gradient_shape_error(*mismatch);
      }
      if (cast_in_unscale) {
        // Cast below, in the unscale pass.
      } else if (first) {
        tree_cast_into(s.compute_grads, s.grads);
      } else {
        tree_cast_into(s.compute_grads, s.grads_micro);
        detail::add_in_place(s.grads, s.grads_micro);
      }
    }
    loss_sum += micro_loss;
    if constexpr (reduces) derived().collect_micro_gradients(i, micro_loss, std::as_const(s.grads));
  }
  auto averaged_over = static_cast<std::int64_t>(micro_batch_count);
  if constexpr (reduces) {
    const ReducedGradients reduced = derived().reduce_gradients(s.grads);
    if (reduced.micro_batches < 1) {
      throw Error("xax::TrainStep: reduce_gradients reported " + std::to_string(reduced.micro_batches) +
                  " micro-batches; a reducer must report at least the ones it was given");
    }
    loss_sum = reduced.loss_sum;
    averaged_over = reduced.micro_batches;
  }
  const double loss = loss_sum / static_cast<double>(averaged_over);

  // One pass unscales, averages over micro-batches, checks the results and takes their norm. The factor
  // 1 / (scale * k) is computed in double and rounded to float once (PyTorch), so k = 1 multiplies by
  // exactly inverse_scale().
  const float inverse = detail::reciprocal(scale, averaged_over);
  const UnscaledGradients unscaled = [&] {
    if constexpr (reduced_gradients_check<D, typename State::template Params<update_type>>) {
      return derived().unscale_check_and_norm_reduced(s.grads, inverse);
    } else {
      if constexpr (may_cast_in_unscale) {
        if (cast_in_unscale) return unscale_check_and_norm_into(s.compute_grads, s.grads, inverse);
      }
      return unscale_check_and_norm(s.grads, inverse);
    }
  }();
  const bool grads_finite = unscaled.finite;
  const bool finite = grads_finite && std::isfinite(loss);

  StepResult result;
  result.loss_scale = scale;
  if constexpr (std::is_same_v<output_type, double>) {
    result.loss = loss;
  } else {
    result.loss = static_cast<double>(static_cast<float>(static_cast<output_type>(static_cast<float>(loss))));
  }
  if (!finite) {
    result.grad_norm = std::numeric_limits<double>::infinity();
    result.non_finite = grads_finite ? std::string() : describe_non_finite(s.grads);
    if (!std::isfinite(loss)) {
      result.non_finite = "loss is " + detail::shortest_text(loss) + (result.non_finite.empty() ? "" : "; ") +
                          result.non_finite;
    }
  }

  // Only non-finite gradients count towards LossScaleError: a non-finite loss with finite gradients was not
  // caused by the scale (DESIGN §4). The step that reaches the limit throws before it changes anything
  // (counters, loss scale, masters), so it is not counted as a step: the caller's step count, which the
  // throw also leaves alone, agrees with train_step_calls() afterwards.
  const std::int64_t overflows_at_floor =
      grads_finite ? (finite ? 0 : s.overflows_at_floor)
                   : (detail::scale_at_floor(s.loss_scale) ? s.overflows_at_floor + 1 : 0);
  const std::int64_t limit = s.options.max_overflows_at_min_scale;
  if (!grads_finite && limit > 0 && overflows_at_floor >= limit) {
    throw LossScaleError(
        std::to_string(overflows_at_floor) + " consecutive steps overflowed with the loss scale at " +
        detail::shortest_text(scale) +
        ", which cannot go lower; training would only skip steps from here. This step was not taken: " +
        result.non_finite +
        ". Lower the learning rate, lower min_scale, check the data for inf/NaN, or use a wider "
        "compute type (bfloat16 or float32)");
  }

  if (finite) {
    result.grad_norm = unscaled.norm;
    if constexpr (unscaled_gradients_hook<D, typename State::template Params<update_type>>) {
      derived().on_unscaled_gradients(s.grads, unscaled);
    }
    const double max_norm = s.options.max_grad_norm;
    if (max_norm > 0 && result.grad_norm > max_norm) {
      detail::scale_in_place(s.grads,
                             max_norm / (result.grad_norm + 1e-6));  // torch.nn.utils.clip_grad_norm_
    }
    s.update_masters();
  } else {
    ++s.skipped;
  }
  // Counted once the step is taken: a hook or an optimizer that throws above leaves every counter (and with
  // them the next update's number) as it was.
  ++s.calls;
  s.overflows_at_floor = overflows_at_floor;
  // The scale follows the gradients alone (DESIGN §4).
  detail::visit_loss_scale(s.loss_scale, [&](auto& l) { l.adjust(grads_finite); });
  result.finite = finite;
  result.skipped_steps = s.skipped;
  return result;
}

}  // namespace xax
