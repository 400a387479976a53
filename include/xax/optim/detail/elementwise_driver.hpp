#pragma once
// The walk that xax's element-wise optimizers (AdamW, Sgd) share, written once: checking the trees before
// anything is written, numbering the floating leaves for their parameter-group settings, splitting each leaf
// across threads in L1-sized chunks, rounding the updated chunk into a compute copy while it is still in L1
// (master weights), and widening half-precision params or masters and storing the update back with HalfStore
// (pure-bf16 training, float16/bfloat16 masters).
// An optimizer supplies only its arithmetic on one chunk.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <xax/detail/convert.hpp>
#include <xax/detail/parallel.hpp>
#include <xax/optim/optimizer.hpp>
#include <xax/optim/param_groups.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/tree.hpp>

namespace xax::optim::detail {

/// Stands for "no tree" where a walk takes an optional extra tree (the copy of a master-weight step, the
/// compensation of a bf16 step that does not use Kahan summation).
struct NoTree {};
inline constexpr NoTree no_tree{};

/// Calls `f(*compensation)` for Kahan rounding and `f(no_tree)` otherwise, leaving the compensation tree
/// alone. Kahan without a compensation tree is a ConfigError naming `optimizer`.
template <class Masters, class F>
void with_compensation(Masters* compensation, const HalfMasterUpdate& update, const char* optimizer, F&& f) {
  // Checked before the message is built: this runs on every step, and the message is for the rare misuse.
  if (!is_known_rounding(update.rounding)) {
    throw_unknown_rounding(update.rounding,
                           std::string("xax::optim::") + optimizer + "::step_half_masters: the rounding");
  }
  if (update.rounding != MasterRounding::kahan) {
    NoTree none;
    f(none);
    return;
  }
  if (compensation == nullptr) {
    throw ConfigError(std::string("xax::optim::") + optimizer +
                      "::step_half_masters: Kahan rounding needs the compensation tree (shaped like the "
                      "masters); pass it, or choose round_to_nearest or stochastic_rounding");
  }
  f(*compensation);
}

/// Calls `f(param_leaf, grad_leaf, extra_leaf_pointer, state_leaves...)` on matching leaves of trees already
/// checked to match; the extra pointer is a null `void*` when `extra` is no_tree.
template <class F, class Params, class Extra, class... States>
void zip_update_leaves(F&& f, Params& params, const Params& grads, Extra& extra, States&... states) {
  if constexpr (std::is_same_v<std::remove_const_t<Extra>, NoTree>) {
    for_each_leaf([&]<class L, class... S>(L& p, const L& g,
                                           S&... state) { f(p, g, static_cast<void*>(nullptr), state...); },
                  params, grads, states...);
  } else {
    for_each_leaf(
        [&]<class L, class E, class... S>(L& p, const L& g, E& e, S&... state) { f(p, g, &e, state...); },
        params, grads, extra, states...);
  }
}

/// Drives an element-wise optimizer over one step.
///
/// The optimizer's arithmetic comes as `make_update(std::type_identity<A>{}, settings, state...)`, called
/// once per floating leaf with the leaf's parameter-group settings and a pointer to element 0 of the matching
/// leaf of each state tree. It returns the update of one chunk, `update(param, grad, updated, first, count)`,
/// which reads param[0, count) and grad[0, count), writes updated[0, count) (possibly param itself) and
/// updates elements [first, first + count) of its state arrays. A is the leaf's scalar for master weights and
/// float for bf16 params (whose state is fp32).
struct ElementwiseDriver {
  /// The optimizer's class name, for errors ("AdamW").
  const char* optimizer;
  /// The settings of each floating leaf in for_each_leaf order (the optimizer's ParamGroups, resolved).
  std::span<const LeafSettings> leaves;
  /// Memory traffic per element, which decides how many threads share a leaf: in master scalars (a compute
  /// copy adds its own element size) and in bytes for a bf16 update.
  std::size_t master_scalars_per_element;
  std::size_t bf16_bytes_per_element;

  /// One step over master weights (float or double leaves), updated in place. `copy` is no_tree or a tree of
  /// the params' structure and shapes in another floating type that receives the updated params rounded to
  /// nearest (a train step's compute copy); its non-floating leaves are left alone. Throws ShapeError, with
  /// nothing written, unless params, grads, the state trees and the copy match.
  template <class Params, class Copy, class MakeUpdate, class... States>
  void update_masters(Params& params, const Params& grads, Copy& copy, MakeUpdate&& make_update,
                      States&... states) const {
    require_fit(params, grads, copy, states...);
    std::size_t leaf = 0;
    zip_update_leaves(
        [&]<class L, class C, class... S>(L& p, const L& g, C* copy_leaf, S&... state) {
          if constexpr (floating_leaf<L>) {
            using A = leaf_scalar_t<L>;
            auto* const target = copy_pointer(p, copy_leaf);
            using Target = std::remove_pointer_t<decltype(target)>;
            const auto update =
                make_update(std::type_identity<A>{}, leaves[leaf++], leaf_span(state).data()...);
            A* const param = leaf_span(p).data();
            const A* const grad = leaf_span(g).data();
            parallel_chunks(leaf_span(p).size(),
                            master_scalars_per_element * sizeof(A) + copy_bytes<Target>(),
                            [=](std::size_t first, std::size_t count) noexcept {
                              update(param + first, grad + first, param + first, first, count);
                              if constexpr (!std::is_void_v<Target>) {
                                // The chunk was just written and is still in L1.
                                xax::detail::convert_serial(param + first, target + first, count);
                              }
                            });
          }
        },
        params, grads, copy, states...);
  }

  /// One step over bfloat16 params without masters: each chunk is widened to fp32, updated in fp32 and stored
  /// back with `rounding` (BF16Store); Kahan summation reads and writes `compensation`, a tree shaped like
  /// the params, which no other rounding touches. Throws ShapeError, with nothing written, unless the trees
  /// it uses match.
  template <class Params, class MakeUpdate, class... States>
  void update_bf16(Params& params, const Params& grads, const BF16UpdateOptions& rounding, std::int64_t step,
                   Params& compensation, MakeUpdate&& make_update, States&... states) const {
    const HalfMasterUpdate update{rounding.rounding, rounding.seed, step};
    if (rounding.rounding == BF16Update::kahan) {
      require_fit(params, grads, compensation, states...);
      update_half_leaves(params, grads, update, bf16_bytes_per_element, compensation, make_update, states...);
    } else {
      require_fit(params, grads, no_tree, states...);
      update_half_leaves(params, grads, update, bf16_bytes_per_element, no_tree, make_update, states...);
    }
  }

  /// One step over half-precision masters (bfloat16 or float16 leaves, and float leaves a policy keeps in
  /// full precision) whose gradients and optimizer state are fp32 trees of the same structure, with no fp32
  /// copy of the masters: each chunk of a half leaf is widened, updated in fp32 and rounded back with
  /// `update.rounding` (HalfStore; stochastic rounding keyed by seed, step and floating-leaf number, Kahan
  /// through `compensation`, a tree shaped like the masters), and a float leaf is updated in place. The same
  /// arithmetic and rounding, element for element, as updating an fp32 copy and rounding it back. Throws
  /// ShapeError, with nothing written, unless the trees match.
  template <class Masters, class Params, class Compensation, class MakeUpdate, class... States>
  void update_half_masters(Masters& masters, const Params& grads, const HalfMasterUpdate& update,
                           Compensation& compensation, MakeUpdate&& make_update, States&... states) const {
    // Walking the trees together checks them all before anything is written.
    if constexpr (!std::is_same_v<Compensation, NoTree>) {
      for_each_leaf([](const auto&...) {}, masters, grads, compensation, states...);
    } else {
      for_each_leaf([](const auto&...) {}, masters, grads, states...);
    }
    require_leaf_count(masters);
    update_half_leaves(masters, grads, update, master_scalars_per_element * sizeof(float), compensation,
                       make_update, states...);
  }

 private:
  /// Memory traffic per element of writing the copy (zero without one).
  template <class Target>
  static constexpr std::size_t copy_bytes() {
    if constexpr (std::is_void_v<Target>) {
      return 0;
    } else {
      return sizeof(Target);
    }
  }

  /// Where a master-weight step writes the rounded copy of floating leaf `p`: element 0 of the copy's leaf,
  /// or a null `void*` without a copy or where the copy's leaf is not floating.
  template <class L, class C>
  static auto* copy_pointer(const L&, C* copy_leaf) noexcept {
    if constexpr (!std::is_void_v<C> && floating_leaf<C>) {
      return leaf_span(*copy_leaf).data();
    } else {
      return static_cast<void*>(nullptr);
    }
  }

  /// Calls `f(first, count)` on consecutive chunks of at most update_chunk elements covering [0, n), the
  /// chunks split across xax's threads when n elements of `bytes_per_element` traffic are worth it.
  template <class F>
  static void parallel_chunks(std::size_t n, std::size_t bytes_per_element, const F& f) {
    xax::detail::parallel_blocks(n, bytes_per_element, 16, [&f](std::size_t begin, std::size_t end) noexcept {
      for (std::size_t i = begin; i < end; i += update_chunk) f(i, std::min(update_chunk, end - i));
    });
  }

  /// Throws ShapeError unless params, grads, the state trees and the extra tree match in structure and leaf
  /// shapes (zipped in that order, as the optimizers always have, so the error names the same tree), and the
  /// params have one floating leaf per settings entry: the settings are indexed by leaf
  /// number, and an optimizer without state trees has nothing else pinning the params' structure.
  template <class Params, class Extra, class... States>
  void require_fit(const Params& params, const Params& grads, const Extra& extra,
                   const States&... states) const {
    if constexpr (std::is_same_v<Extra, NoTree>) {
      for_each_leaf([](const auto&...) {}, params, grads, states...);
    } else {
      for_each_leaf([](const auto&...) {}, params, grads, states..., extra);
    }
    require_leaf_count(params);
  }

  /// Throws ShapeError unless the params have one floating leaf per settings entry.
  template <class Params>
  void require_leaf_count(const Params& params) const {
    std::size_t count = 0;
    for_each_leaf([&]<class L>(const L&) { count += floating_leaf<L> ? 1 : 0; }, params);
    if (count != leaves.size()) {
      throw ShapeError(std::string("xax::optim::") + optimizer + ": the params have " +
                       std::to_string(count) + " floating leaves; the optimizer was built for " +
                       std::to_string(leaves.size()));
    }
  }

  /// The walk behind update_bf16 and update_half_masters, over trees already checked to match. Each chunk of
  /// a half leaf (bfloat16 or float16) is widened, with its gradients when they are half too, updated in fp32
  /// and rounded back with `update.rounding` (HalfStore; stochastic rounding keyed by seed, step and
  /// floating-leaf number, Kahan through `compensation`, a tree shaped like `params`, or NoTree). A float
  /// leaf (one a policy keeps in full precision) is updated in place.
  template <class Params, class Grads, class Compensation, class MakeUpdate, class... States>
  void update_half_leaves(Params& params, const Grads& grads, const HalfMasterUpdate& update,
                          std::size_t bytes_per_element, Compensation& compensation, MakeUpdate& make_update,
                          States&... states) const {
    std::size_t leaf = 0;
    const auto update_leaf = [&]<class P, class G, class C, class... S>(P& p, const G& g,
                                                                        C* compensation_leaf, S&... state) {
      if constexpr (floating_leaf<P>) {
        using H = leaf_scalar_t<P>;
        using GradScalar = leaf_scalar_t<G>;
        const std::size_t number = leaf++;
        const auto chunk_update =
            make_update(std::type_identity<float>{}, leaves[number], leaf_span(state).data()...);
        H* const param = leaf_span(p).data();
        const GradScalar* const grad = leaf_span(g).data();
        if constexpr (std::is_same_v<H, float>) {
          static_assert(std::is_same_v<GradScalar, float>, "a float leaf takes float gradients");
          parallel_chunks(leaf_span(p).size(), bytes_per_element,
                          [=](std::size_t first, std::size_t count) noexcept {
                            chunk_update(param + first, grad + first, param + first, first, count);
                          });
        } else {
          const HalfStore<H> store{update.rounding, rounding_key(update.seed, update.step, number)};
          H* carried = nullptr;
          if constexpr (!std::is_void_v<C>) carried = leaf_span(*compensation_leaf).data();
          parallel_chunks(leaf_span(p).size(), bytes_per_element,
                          [=](std::size_t first, std::size_t count) noexcept {
                            alignas(64) float old[update_chunk];
                            alignas(64) float updated[update_chunk];
                            xax::detail::convert_serial(param + first, old, count);
                            if constexpr (std::is_same_v<GradScalar, float>) {
                              chunk_update(old, grad + first, updated, first, count);
                            } else {
                              alignas(64) float gradient[update_chunk];
                              xax::detail::convert_serial(grad + first, gradient, count);
                              chunk_update(old, gradient, updated, first, count);
                            }
                            store(param + first, carried != nullptr ? carried + first : nullptr, old, updated,
                                  count, first);
                          });
        }
      }
    };
    if constexpr (!std::is_same_v<std::remove_const_t<Compensation>, NoTree>) {
      for_each_leaf([&]<class P, class G, class... S>(P& p, const G& g, P& c,
                                                      S&... state) { update_leaf(p, g, &c, state...); },
                    params, grads, compensation, states...);
    } else {
      for_each_leaf(
          [&]<class P, class G, class... S>(P& p, const G& g, S&... state) {
            update_leaf(p, g, static_cast<void*>(nullptr), state...);
          },
          params, grads, states...);
    }
  }
};

}  // namespace xax::optim::detail
