#pragma once
/// \file
/// What xax's optimizers share: the concept a train step checks, the parameter trees they accept, and the
/// rounding of a pure-bf16 update (stochastic rounding or Kahan compensation).
///
/// Master weights (float or double leaves) are updated in place, element by element in one fused pass per
/// leaf. A tree of bfloat16 leaves can be trained without fp32 masters: the update is computed in fp32 from
/// fp32 moments and written back with one of the BF16Update roundings, because round-to-nearest silently
/// drops every update smaller than half a bf16 ulp (2^-9 relative), which is most of them late in training.

#include <xax/detail/eigen.hpp>

#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <xax/detail/convert.hpp>
#include <xax/detail/format.hpp>
#include <xax/detail/parallel.hpp>
#include <xax/detail/random.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/tree.hpp>

namespace xax::optim {

/// An optimizer that can update `Params` from gradients of the same shape: what xax::TrainStep drives.
template <class O, class Params>
concept optimizer_for = requires(O& o, Params& p, const Params& g, double lr) {
  o.step(p, g);
  o.state();
  o.set_learning_rate(lr);
};

/// How an update of bfloat16 parameters (without fp32 masters) is rounded back to bf16.
enum class BF16Update {
  /// Round to nearest even: updates below half an ulp are lost. For comparison; do not train with it.
  round_to_nearest,
  /// Round up with probability equal to the fraction of an ulp: unbiased, E[p_new] equals the fp32 update.
  stochastic_rounding,
  /// Keep the rounding error in a bf16 compensation buffer and add it back on the next step (Kahan
  /// summation): deterministic, two bytes more per parameter.
  kahan,
};

/// How TrainStep rounds the fp32 update of half-precision masters (float16 or bfloat16 params) back into
/// them: the same three choices as a pure-bf16 update.
using MasterRounding = BF16Update;

/// How an optimizer that updates half-precision masters directly (AdamW::step_half_masters,
/// Sgd::step_half_masters) rounds each fp32 update back into them: TrainStep's master_rounding, and the seed
/// and step that key stochastic rounding's random stream (by leaf and element, as for a pure-bf16 update).
struct HalfMasterUpdate {
  MasterRounding rounding = MasterRounding::round_to_nearest;
  std::uint64_t seed = 0;
  std::int64_t step = 0;
};

/// The rounding of a pure-bf16 update and the seed of its random stream (stochastic rounding draws its bits
/// from a counter-based hash of seed, step and element index, so a run is reproducible at any thread count
/// and resumes bit-identically from (seed, step)).
struct BF16UpdateOptions {
  BF16Update rounding = BF16Update::stochastic_rounding;
  std::uint64_t seed = 0;
};

namespace detail {

template <class T>
struct is_master_scalar : std::bool_constant<std::is_same_v<T, float> || std::is_same_v<T, double>> {};
template <class T>
struct is_bfloat16 : std::is_same<T, bfloat16> {};

template <class T, template <class> class Pred>
struct all_floating_leaves;

template <class Tuple, template <class> class Pred>
struct all_floating_leaves_of_tuple;
template <class... Ts, template <class> class Pred>
struct all_floating_leaves_of_tuple<std::tuple<Ts...>, Pred>
    : std::bool_constant<(all_floating_leaves<std::remove_cvref_t<Ts>, Pred>::value && ...)> {};
template <class A, class B, template <class> class Pred>
struct all_floating_leaves_of_tuple<std::pair<A, B>, Pred>
    : std::bool_constant<all_floating_leaves<A, Pred>::value && all_floating_leaves<B, Pred>::value> {};

template <class T, template <class> class Pred>
struct all_floating_leaves : std::false_type {};
template <class T, template <class> class Pred>
requires tree_leaf<T>
struct all_floating_leaves<T, Pred> : std::bool_constant<!floating_leaf<T> || Pred<leaf_scalar_t<T>>::value> {
};
template <class T, template <class> class Pred>
requires(xax::detail::is_std_vector<T>::value ||
         xax::detail::is_std_array<T>::value) struct all_floating_leaves<T, Pred>
    : all_floating_leaves<typename T::value_type, Pred> {
};
template <class T, template <class> class Pred>
requires(xax::detail::is_string_map<T>::value) struct all_floating_leaves<T, Pred>
    : all_floating_leaves<typename T::mapped_type, Pred> {
};
template <class T, template <class> class Pred>
requires(xax::detail::is_tuple_like_node<T>::value) struct all_floating_leaves<T, Pred>
    : all_floating_leaves_of_tuple<T, Pred> {
};
template <class T, template <class> class Pred>
requires(reflected_struct<T> && !tree_leaf<T>) struct all_floating_leaves<T, Pred>
    : all_floating_leaves_of_tuple<xax::detail::field_types_t<T>, Pred> {
};

}  // namespace detail

/// A tree of master weights: every floating leaf holds float or double.
template <class P>
concept master_params = tree<P> && detail::all_floating_leaves<P, detail::is_master_scalar>::value;

/// A tree of bfloat16 parameters trained without masters (see BF16Update).
template <class P>
concept bf16_params =
    tree<P> && !master_params<P> && detail::all_floating_leaves<P, detail::is_bfloat16>::value;

/// A tree an xax optimizer updates: master weights, or bf16 parameters.
template <class P>
concept optimizer_params = master_params<P> || bf16_params<P>;

namespace detail {
template <class T>
struct is_half_or_float : std::bool_constant<half_scalar<T> || std::is_same_v<T, float>> {};

/// Masters step_half_masters updates in place: float16 or bfloat16 leaves, and float ones where a leaf keeps
/// full precision (full_precision_t), but no double, which has no half-master update (a float/double policy
/// updates its fp32 params and writes the double copy instead).
template <class M>
concept half_master_tree = tree<M> && all_floating_leaves<M, is_half_or_float>::value;
}  // namespace detail

/// The tree an optimizer keeps its moments in: the params' own type for masters, fp32 for bf16 params.
template <optimizer_params P>
using moments_t = std::conditional_t<master_params<P>, P, rebind_scalar_t<P, float>>;

namespace detail {

/// Throws ConfigError naming the optimizer, the option, the value seen and what is accepted.
inline void require_option(bool accepted, const char* optimizer, const char* option, double value,
                           const char* expected) {
  if (!accepted) {
    throw ConfigError(std::string("xax::optim::") + optimizer + ": " + option + " = " +
                      xax::detail::shortest_text(value) + " is not accepted; give " + expected);
  }
}

/// Whether `rounding` is one of BF16Update's values: one cast from an integer (read from a config, say) may
/// be any, and would otherwise leave every parameter unchanged while the step count moves.
[[nodiscard]] constexpr bool is_known_rounding(BF16Update rounding) noexcept {
  switch (rounding) {
    case BF16Update::round_to_nearest:
    case BF16Update::stochastic_rounding:
    case BF16Update::kahan:
      return true;
  }
  return false;
}

/// The ConfigError for a rounding that is_known_rounding refuses; `what` names the setting in the message.
[[noreturn]] inline void throw_unknown_rounding(BF16Update rounding, std::string_view what) {
  throw ConfigError(std::string(what) + " " + std::to_string(static_cast<int>(rounding)) +
                    " is not accepted; give round_to_nearest, stochastic_rounding or kahan");
}

/// Throws ConfigError unless is_known_rounding(rounding); `what` names the setting in the message.
inline void require_known_rounding(BF16Update rounding, std::string_view what) {
  if (!is_known_rounding(rounding)) throw_unknown_rounding(rounding, what);
}

/// Throws CheckpointError unless every element of `moments`' floating leaves, read from checkpoint entry
/// `entry`, is one a run can reach: finite and, for a second moment (`non_negative`), >= 0. A run skips every
/// step with a non-finite gradient, and squares only add to a second moment; a crafted value would instead
/// turn every later update into NaN while the steps still report finite gradients.
template <class Moments>
void require_reachable_moments(const Moments& moments, const std::string& entry, bool non_negative) {
  for_each_leaf_with_path(
      [&]<class Leaf>(const TreePath& path, const Leaf& leaf) {
        if constexpr (floating_leaf<Leaf>) {
          for (const auto element : leaf_span(leaf)) {
            const auto value = static_cast<double>(element);
            if (!std::isfinite(value) || (non_negative && value < 0)) {
              throw CheckpointError("checkpoint entry '" + entry + "." + path.display() + "' holds " +
                                    xax::detail::shortest_text(value) + "; expected finite values" +
                                    (non_negative ? " >= 0 (a second moment)" : "") +
                                    ", as every run's optimizer state holds");
            }
          }
        }
      },
      moments);
}

template <class Params>
constexpr void require_optimizer_params() {
  static_assert(
      optimizer_params<Params>,
      "xax::optim: Params must be a tree whose floating leaves are all float/double (master weights) "
      "or all xax::bfloat16 (pure-bf16 training); keep float16 or mixed parameters as fp32 masters "
      "(xax::TrainStep does)");
}

/// Passes over one leaf are split across xax's threads when large. Per element an update reads and writes
/// the parameter and two moments and reads the gradient.
template <class F>
void update_in_blocks(std::size_t n, std::size_t bytes_per_element, F&& f) {
  xax::detail::parallel_blocks(n, bytes_per_element, 16, std::forward<F>(f));
}

/// Throws ShapeError, naming the path, unless the trees match in structure and leaf shapes. Checked before an
/// update touches anything, so a mismatch leaves parameters and optimizer state as they were.
template <class... Trees>
void require_matching_trees(const Trees&... trees) {
  for_each_leaf([](const auto&...) {}, trees...);
}

/// The scalar pointer an update writes a rounded copy of its parameters through: `no_copy` for a plain step,
/// `copy_target` for a floating leaf of the copy tree (nullptr-typed `void` for any other leaf).
template <class L>
constexpr void* no_copy(const L&) noexcept {
  return nullptr;
}
template <class L, class C>
auto* copy_target(const L&, C& copy) noexcept {
  if constexpr (floating_leaf<L> && floating_leaf<C>) {
    return leaf_span(copy).data();
  } else {
    return static_cast<void*>(nullptr);
  }
}

/// Memory traffic per element of writing the copy (zero without one).
template <class Copy>
inline constexpr std::size_t copy_bytes = sizeof(Copy);
template <>
inline constexpr std::size_t copy_bytes<void> = 0;

/// Rounds `count` updated parameters into the copy at offset `index` (nothing without a copy). Called on a
/// chunk just written, which is still in L1.
template <class S, class Copy>
void write_copy(const S* updated, Copy* copy, std::size_t index, std::size_t count) noexcept {
  if constexpr (!std::is_void_v<Copy>) xax::detail::convert_serial(updated, copy + index, count);
}

using xax::detail::mix64;

/// The key of one leaf's random stream at one step.
constexpr std::uint32_t rounding_key(std::uint64_t seed, std::int64_t step, std::size_t leaf) noexcept {
  const std::uint64_t key = mix64(mix64(seed + 0x9e3779b97f4a7c15ull * static_cast<std::uint64_t>(step)) ^
                                  (0xd1b54a32d192ed03ull * (static_cast<std::uint64_t>(leaf) + 1)));
  return static_cast<std::uint32_t>(key ^ (key >> 32));
}

/// 32 random bits for element `index` of a stream (Wellons' lowbias32 hash: 32-bit multiplies and shifts,
/// which vectorise). Only the low 32 bits of the index count: in a leaf of more than 2^32 elements, elements
/// 2^32 apart draw the same bits at a step. Each rounding stays unbiased; only those pairs are correlated,
/// and a 64-bit index would cost the hot loop 64-bit multiplies that AVX2 does not have.
constexpr std::uint32_t random_bits(std::uint32_t key, std::size_t index) noexcept {
  std::uint32_t x = static_cast<std::uint32_t>(index) * 0x9e3779b1u + key;
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

/// float -> bf16 rounded up in magnitude with probability (dropped bits) / 2^16, from 16 random bits.
/// Unbiased: E[result] = value. NaN stays NaN; values near the top of the range may round to infinity with
/// the same probability rule.
constexpr std::uint16_t float_to_bfloat16_stochastic(float value, std::uint32_t random) noexcept {
  const auto bits = std::bit_cast<std::uint32_t>(value);
  if ((bits & 0x7fff'ffffu) > 0x7f80'0000u)
    return static_cast<std::uint16_t>(((bits >> 16) & 0x8000u) | 0x7fc0u);
  return static_cast<std::uint16_t>((bits + (random & 0xffffu)) >> 16);
}

/// float -> H (float16 or bfloat16) rounded to one of the two neighbours of `value` with probabilities that
/// make it unbiased, E[result] = value, from 32 random bits. Exact values, NaN, and values whose nearest
/// rounding overflows round to nearest.
template <class H>
H round_stochastic(float value, std::uint32_t random) noexcept {
  if constexpr (std::is_same_v<H, bfloat16>) {
    return std::bit_cast<bfloat16>(float_to_bfloat16_stochastic(value, random));
  } else {
    const H nearest = static_cast<H>(value);
    const auto n = static_cast<float>(nearest);
    if (n == value || !std::isfinite(n) || std::isnan(value)) return nearest;
    const auto bits = std::bit_cast<std::uint16_t>(nearest);
    const bool negative = (bits & 0x8000u) != 0;
    // The other neighbour of `value`: one ulp further from zero when value lies beyond `nearest`, or nearer.
    std::uint16_t other_bits = 0;
    if ((bits & 0x7fffu) == 0) {
      other_bits = value > n ? std::uint16_t{0x0001} : std::uint16_t{0x8001};
    } else {
      other_bits = static_cast<std::uint16_t>((value > n) != negative ? bits + 1u : bits - 1u);
    }
    const H other = std::bit_cast<H>(other_bits);
    const auto o = static_cast<float>(other);
    if (!std::isfinite(o)) return nearest;
    // value - n and o - n are exact (Sterbenz), so the probability is the rounded ratio of exact distances.
    const float probability = std::abs(value - n) / std::abs(o - n);
    const float uniform = static_cast<float>(random >> 8) * 0x1p-24f;
    return uniform < probability ? other : nearest;
  }
}

inline bfloat16 round_nearest(float value) noexcept {
  return std::bit_cast<bfloat16>(xax::detail::float_to_bfloat16_bits(value));
}
inline float widen(bfloat16 value) noexcept {
  return xax::detail::bfloat16_bits_to_float(std::bit_cast<std::uint16_t>(value));
}
// float16 has no bit-level helpers here: Eigen's conversions (F16C where the CPU has it) round to nearest.
inline float16 round_nearest_to_float16(float value) noexcept {
  return static_cast<float16>(value);
}
inline float widen(float16 value) noexcept {
  return static_cast<float>(value);
}

/// Elements per chunk of an update: a few float arrays of this length stay in L1, so the statements of an
/// update run one after another over a chunk still make a single pass over memory.
inline constexpr std::size_t update_chunk = 512;

/// Writes the fp32 updates `updated[k]` of the half-precision (bfloat16 or float16) parameters `param[k]`,
/// whose values before the update were `old[k]`, with the chosen rounding; `first_index` numbers `param[0]`
/// in the leaf (the random stream of stochastic rounding is indexed by it). `compensation` is read and
/// written only for Kahan. Each rounding is its own branch-free loop, which compilers vectorise.
template <class H>
struct HalfStore {
  BF16Update rounding = BF16Update::stochastic_rounding;
  std::uint32_t key = 0;

  void operator()(H* param, H* compensation, const float* old, const float* updated, std::size_t count,
                  std::size_t first_index) const noexcept {
    switch (rounding) {
      case BF16Update::round_to_nearest:
        xax::detail::convert_serial(updated, param, count);
        return;
      case BF16Update::stochastic_rounding:
        for (std::size_t k = 0; k < count; ++k)
          param[k] = round_stochastic<H>(updated[k], random_bits(key, first_index + k));
        return;
      case BF16Update::kahan:
        for (std::size_t k = 0; k < count; ++k) {
          // The parameter's true value is param + compensation; adding the update to the compensation first
          // lets small updates accumulate there until they move the half-precision parameter.
          const float corrected = (updated[k] - old[k]) + widen(compensation[k]);
          const H sum = nearest(old[k] + corrected);
          compensation[k] = nearest(corrected - (widen(sum) - old[k]));
          param[k] = sum;
        }
        return;
    }
  }

 private:
  static H nearest(float value) noexcept {
    if constexpr (std::is_same_v<H, bfloat16>) {
      return round_nearest(value);
    } else {
      return round_nearest_to_float16(value);
    }
  }
};

/// The store of a pure-bf16 update.
using BF16Store = HalfStore<bfloat16>;

}  // namespace detail
}  // namespace xax::optim
