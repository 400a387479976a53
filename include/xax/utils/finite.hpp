#pragma once
/// \file
/// Finiteness of gradient trees: the check behind dynamic loss scaling, the fused unscale-and-check of a
/// train step, selecting between trees, and naming the leaves that overflowed.
///
///     const bool finite = xax::unscale_and_check(grads, loss_scale.inverse_scale());
///     if (!finite) log(xax::describe_non_finite(grads));  // "2 of 6 tensors non-finite: layers[1].w, ..."
///
/// Only floating leaves (float, double, bfloat16, float16) are scaled and checked; integer leaves are always
/// finite. Large trees are processed by xax::num_threads() threads in one pass. Compiling with fast-math is
/// refused (it would delete these checks).

#include <xax/detail/finite_kernels.hpp>
#include <xax/detail/format.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <vector>
#include <xax/detail/ieee754.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/tree.hpp>
#include <xax/utils/tree_cast.hpp>

namespace xax {

namespace detail {

/// Per-thread storage for erased_floating_leaves, shared by every tree type.
template <class Void>
std::vector<ErasedLeaf<Void>>& erased_leaf_scratch() {
  thread_local std::vector<ErasedLeaf<Void>> leaves;
  return leaves;
}

/// The floating leaves of `tree`, type-erased for one pass over all of them. A const tree gives read-only
/// leaves. The list lives in per-thread storage reused by the next call, so a train step allocates nothing.
template <class Tree>
std::span<const ErasedLeaf<std::conditional_t<std::is_const_v<Tree>, const void, void>>>
erased_floating_leaves(Tree& tree) {
  constexpr bool read_only = std::is_const_v<Tree>;
  using Void = std::conditional_t<read_only, const void, void>;
  std::vector<ErasedLeaf<Void>>& leaves = erased_leaf_scratch<Void>();
  leaves.clear();
  for_each_leaf(
      [&leaves]<class L>(L& leaf) {
        if constexpr (floating_leaf<std::remove_const_t<L>>) {
          static_assert(
              read_only || !std::is_const_v<std::remove_pointer_t<decltype(leaf_span(leaf).data())>>,
              "xax: scaling a tree writes its leaves, but this one holds a read-only leaf (such as an "
              "Eigen::Map<const ...>); pass a tree of writable leaves");
          const auto elements = leaf_span(leaf);
          using Scalar = leaf_scalar_t<std::remove_const_t<L>>;
          if (!elements.empty()) leaves.push_back({elements.data(), elements.size(), dtype_of<Scalar>});
        }
      },
      tree);
  return leaves;
}

/// Multiplies every floating element of `tree` by `factor` in one pass and returns whether every result is
/// finite. A factor of exactly 1 only checks.
template <class Tree>
bool scale_and_check_tree(Tree& tree, float factor) {
  return all_over_leaves(erased_floating_leaves(tree), [factor]<class T>(T* x, std::size_t n) noexcept {
    return scale_and_check_n(x, n, factor);
  });
}

/// Elements per partial sum of the gradient norm: every partial is a sum over one such block of one leaf,
/// so the blocks, and the order the partials are added in, do not depend on the thread count.
inline constexpr std::size_t norm_block = 1024;

/// The sum of squares of x[0, n) (n <= norm_block), in double: added lane by lane in eight accumulators
/// and then pairwise, an order fixed by n alone.
template <class T>
double sum_of_squares_in_double(const T* x, std::size_t n) noexcept {
  double lanes[8] = {};
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (std::size_t k = 0; k < 8; ++k)
      lanes[k] += static_cast<double>(x[i + k]) * static_cast<double>(x[i + k]);
  }
  double tail = 0;
  for (; i < n; ++i) tail += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7])) +
         tail;
}

/// The sum of squares of x[0, n) (n <= norm_block). Floats (and widened 16-bit values) are summed by Eigen's
/// vectorised float reduction, which is accurate to a few float roundings whenever no square overflows and
/// the sum lies far above the subnormal range, where a square that underflowed could have mattered. A block
/// outside that (huge, tiny or all-zero values) is summed again in double, three times slower. The order
/// of the additions depends only on n and on the data's address modulo the vector size; a block of a leaf
/// sits at the same address whichever thread sums it, and 16-bit values are widened into a
/// cache-line-aligned buffer, so the result does not depend on the thread count.
template <floating_scalar T>
double sum_of_squares(const T* x, std::size_t n) noexcept {
  if constexpr (half_scalar<T>) {
    alignas(64) float buffer[norm_block];
    convert_serial(x, buffer, n);
    return sum_of_squares<float>(buffer, n);
  } else if constexpr (std::is_same_v<T, float>) {
    const float sum = Eigen::Map<const Eigen::ArrayXf>(x, static_cast<Eigen::Index>(n)).square().sum();
    if (is_finite_bits(sum) && sum >= 0x1p-60f) return static_cast<double>(sum);
    return sum_of_squares_in_double(x, n);
  } else {
    return sum_of_squares_in_double(x, n);
  }
}

/// Per-thread storage for the norm's partial sums and each leaf's first partial.
struct NormScratch {
  std::vector<double> partials;
  std::vector<std::size_t> first_block;
};
inline NormScratch& norm_scratch() {
  thread_local NormScratch scratch;
  return scratch;
}

/// A floating factor an unscale may use: finite and greater than zero.
inline void require_usable_factor(float factor, const char* function) {
  if (!is_finite_bits(factor) || !(factor > 0.0f)) {
    throw ConfigError(
        std::string("xax::") + function + ": the inverse loss scale must be finite and > 0, got " +
        shortest_text(factor) +
        "; pass loss_scale.inverse_scale() of a valid loss scale (1 / scale, computed in double)");
  }
}

}  // namespace detail

/// True when every element of every floating leaf of `tree` is finite (neither inf nor NaN).
template <class Tree>
[[nodiscard]] bool all_finite(const Tree& tree) {
  return detail::all_over_leaves(
      detail::erased_floating_leaves(tree),
      []<class T>(const T* x, std::size_t n) noexcept { return detail::all_finite_n(x, n); });
}

/// Multiplies every floating element of `grads` in place by `inv_scale` in one pass over memory and returns
/// whether every **result** is finite. Checking the results rather than the inputs also catches an overflow
/// that the unscaling itself causes when the loss scale is below 1. Every leaf is processed even when an
/// early one overflows. An `inv_scale` of exactly 1 leaves `grads` bit-identical and only checks it.
/// 16-bit leaves are computed in float and rounded once. Throws ConfigError unless `inv_scale` is finite and
/// positive.
template <class Tree>
[[nodiscard]] bool unscale_and_check(Tree& grads, float inv_scale) {
  static_assert(!std::is_const_v<Tree>,
                "xax::unscale_and_check writes the gradients in place; pass them non-const");
  detail::require_usable_factor(inv_scale, "unscale_and_check");
  return detail::scale_and_check_tree(grads, inv_scale);
}

/// What unscale_check_and_norm found.
struct UnscaledGradients {
  bool finite = true;  ///< every unscaled element is finite
  double norm = 0;     ///< the global L2 norm of the unscaled gradients; +inf unless finite
};

namespace detail {

/// The pass behind unscale_check_and_norm and unscale_check_and_norm_into. `fill_block(leaf_index, begin,
/// end)` runs on each block of a leaf just before the block is unscaled, checked and squared (so that a
/// block can be written from another tree while it stays in L1); `extent(leaf_index)` gives the bytes a
/// leaf's pass touches, by which the threads share the work.
template <class FillBlock, class Extent>
UnscaledGradients unscale_check_and_norm_pass(std::span<const ErasedLeaf<void>> leaves, float inv_scale,
                                              Extent&& extent, FillBlock&& fill_block) {
  using Leaf = ErasedLeaf<void>;
  NormScratch& scratch = norm_scratch();
  scratch.first_block.clear();
  std::size_t blocks = 0;
  for (const Leaf& leaf : leaves) {
    scratch.first_block.push_back(blocks);
    blocks += (leaf.size + norm_block - 1) / norm_block;
  }
  scratch.partials.assign(blocks, 0.0);
  double* const partials = scratch.partials.data();
  const std::size_t* const first_block = scratch.first_block.data();
  const auto leaf_extent = [&](const Leaf& leaf) {
    return extent(static_cast<std::size_t>(&leaf - leaves.data()));
  };
  // Pieces are cut on block boundaries, so every block is summed whole by one thread.
  const bool finite = parallel_pieces_all(
      leaves, leaf_extent, norm_block, [&](const Leaf& leaf, std::size_t begin, std::size_t end) noexcept {
        const auto index = static_cast<std::size_t>(&leaf - leaves.data());
        double* const leaf_partials = partials + first_block[index];
        bool all = true;
        for (std::size_t i = begin; i < end; i += norm_block) {
          const std::size_t stop = std::min(i + norm_block, end);
          fill_block(index, i, stop);
          visit_erased(leaf, i, stop, [&]<class T>(T* x, std::size_t n) noexcept {
            all = scale_and_check_n(x, n, inv_scale) && all;
            leaf_partials[i / norm_block] = sum_of_squares(x, n);
          });
        }
        return all;
      });
  if (!finite) return {false, std::numeric_limits<double>::infinity()};
  double sum = 0;
  for (const double partial : scratch.partials) sum += partial;
  return {true, std::sqrt(sum)};
}

}  // namespace detail

/// unscale_and_check that also computes the global L2 norm of the results (what gradient clipping and
/// logging need) in the same pass over memory: each block of 1024 elements is squared and summed while it
/// is still in L1 after its unscale (see detail::sum_of_squares), and the block sums are added in double in
/// a fixed order, so the norm is identical on every thread count and within about 1e-6 relative of the
/// exact one. Float and 16-bit gradients always give a finite norm when they are finite; double leaves with
/// values beyond about 1e154 give +inf. Throws ConfigError unless `inv_scale` is finite and positive.
template <class Tree>
[[nodiscard]] UnscaledGradients unscale_check_and_norm(Tree& grads, float inv_scale) {
  static_assert(!std::is_const_v<Tree>,
                "xax::unscale_check_and_norm writes the gradients in place; pass them non-const");
  detail::require_usable_factor(inv_scale, "unscale_check_and_norm");
  const std::span<const detail::ErasedLeaf<void>> leaves = detail::erased_floating_leaves(grads);
  return detail::unscale_check_and_norm_pass(
      leaves, inv_scale,
      [&](std::size_t leaf) {
        return detail::ArrayExtent{leaves[leaf].size, dtype_size(leaves[leaf].dtype)};
      },
      [](std::size_t, std::size_t, std::size_t) noexcept {});
}

/// `tree_cast_into(compute_grads, grads)` followed by `unscale_check_and_norm(grads, inv_scale)`, with the
/// same results to the bit, in one pass over memory: each block of 1024 elements is cast into `grads` and
/// unscaled, checked and squared while it is in L1. This is the step of a mixed-precision trainer whose
/// backward gives 16-bit gradients and whose optimizer reads fp32 ones; it saves writing the cast and
/// reading it back (8 of the 14 bytes per element for bf16 into fp32). `grads` is resized and validated as
/// tree_cast_into does (ShapeError where it cannot take `compute_grads`' shape). Leaves cast between
/// layouts (a row-major into a column-major matrix) and scalar leaves take the two passes. Throws
/// ConfigError unless `inv_scale` is finite and positive.
template <class Src, class Dst>
[[nodiscard]] UnscaledGradients unscale_check_and_norm_into(const Src& compute_grads, Dst& grads,
                                                            float inv_scale) {
  static_assert(!std::is_const_v<Dst>,
                "xax::unscale_check_and_norm_into writes the gradients; pass them non-const");
  detail::require_tree<Src>();
  detail::require_tree<Dst>();
  detail::require_usable_factor(inv_scale, "unscale_check_and_norm_into");
  // Recording the cast resizes and validates `grads` and does the casts that cannot be cut into blocks.
  thread_local detail::ConversionBatch batch;
  batch.clear();
  TreePath path;
  detail::cast_into(path, compute_grads, grads, batch);
  const auto jobs = batch.jobs();
  const std::span<const detail::ErasedLeaf<void>> leaves = detail::erased_floating_leaves(grads);
  const bool job_per_leaf = jobs.size() == leaves.size() && [&] {
    for (std::size_t l = 0; l < leaves.size(); ++l) {
      if (jobs[l].dst != leaves[l].data || jobs[l].extent.size != leaves[l].size) return false;
    }
    return true;
  }();
  if (!job_per_leaf) {
    batch.run();
    return unscale_check_and_norm(grads, inv_scale);
  }
  return detail::unscale_check_and_norm_pass(
      leaves, inv_scale, [&](std::size_t leaf) { return jobs[leaf].extent; },
      [&](std::size_t leaf, std::size_t begin, std::size_t end) noexcept {
        jobs[leaf].convert_range(begin, end);
      });
}

/// `a` when `pred` is true, else `b` (jmp's select_tree), e.g. to keep the old parameters on a skipped step.
/// Throws ShapeError, naming the path, when the two trees differ in structure or leaf shapes.
template <class Tree>
[[nodiscard]] Tree select_tree(bool pred, const Tree& a, const Tree& b) {
  // Walking both trees validates them, so a mismatch is reported whichever one is selected.
  for_each_leaf([](const auto&, const auto&) {}, a, b);
  return pred ? a : b;
}

/// The paths of the leaves holding at least one inf or NaN, in walk order, e.g. {"layers[1].w"}.
template <class Tree>
[[nodiscard]] std::vector<std::string> non_finite_leaf_paths(const Tree& tree) {
  std::vector<std::string> paths;
  for_each_leaf_with_path(
      [&paths]<class L>(const TreePath& path, const L& leaf) {
        if constexpr (floating_leaf<L>) {
          const auto elements = leaf_span(leaf);
          if (!detail::all_finite_n(elements.data(), elements.size())) paths.push_back(path.display());
        }
      },
      tree);
  return paths;
}

/// A one-line diagnosis for a skipped step, e.g. "2 of 6 tensors non-finite: layers[1].w, layers[1].b", or
/// "all 6 tensors finite". Tensors are the floating leaves. At most `max_listed` paths are listed, then
/// "and N more".
template <class Tree>
[[nodiscard]] std::string describe_non_finite(const Tree& tree, std::size_t max_listed = 10) {
  std::size_t tensors = 0;
  for_each_leaf(
      [&tensors]<class L>(const L&) {
        if constexpr (floating_leaf<L>) ++tensors;
      },
      tree);
  const std::vector<std::string> paths = non_finite_leaf_paths(tree);
  if (paths.empty()) return "all " + std::to_string(tensors) + " tensors finite";
  std::string text =
      std::to_string(paths.size()) + " of " + std::to_string(tensors) + " tensors non-finite: ";
  for (std::size_t i = 0; i < paths.size() && i < max_listed; ++i) {
    if (i != 0) text += ", ";
    text += paths[i];
  }
  if (paths.size() > max_listed) text += ", and " + std::to_string(paths.size() - max_listed) + " more";
  return text;
}

}  // namespace xax
