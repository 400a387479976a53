#pragma once
/// \file
/// Casting trees between precisions: tree_cast, tree_cast_into and zeros_like.
///
///     Params<float> masters = ...;
///     Params<xax::bfloat16> compute = xax::tree_cast<xax::bfloat16>(masters);  // Params<bfloat16>
///     xax::tree_cast_into(masters, compute);  // again, reusing compute's storage
///
/// Apart from xax/utils/tree.hpp (structure, walks, paths and the type-level rebind) because the value casts
/// run xax's vectorised, multi-threaded conversion kernels, which a user of the tree structure alone should
/// not compile.

#include <array>
#include <cstddef>
#include <string>
#include <type_traits>
#include <utility>
#include <xax/detail/convert.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/tree.hpp>

namespace xax {

namespace detail {

/// Converts between leaves of the same shape whose layouts differ, element (i, j, ...) to (i, j, ...).
template <class SrcScalar, class DstScalar, std::size_t N>
void convert_reordered(const SrcScalar* src, bool src_row_major, DstScalar* dst, bool dst_row_major,
                       const std::array<Eigen::Index, N>& dims) {
  for_each_reordered(dims, src_row_major, dst_row_major, [&](std::size_t k, std::size_t src_offset) {
    dst[k] = convert_scalar<DstScalar>(src[src_offset]);
  });
}

// Leaves are resized during the walk and converted afterwards, all in one pass (ConversionBatch): a tree of
// many leaves then costs one fork/join rather than one per leaf.
template <class Src, class Dst>
void cast_leaf_into(const TreePath& path, const Src& src, Dst& dst, ConversionBatch& batch) {
  using SrcScalar = leaf_scalar_t<Src>;
  using DstScalar = leaf_scalar_t<Dst>;
  static_assert(
      std::is_same_v<SrcScalar, DstScalar> || (floating_scalar<SrcScalar> && floating_scalar<DstScalar>),
      "xax: a cast changes floating leaves only; a non-floating leaf must keep its type");
  if constexpr (scalar_leaf<Src>) {
    static_assert(scalar_leaf<Dst>, "xax: a scalar leaf can only be cast into a scalar leaf");
    dst = convert_scalar<DstScalar>(src);
    return;
  } else if constexpr (!require_writable_leaf<Dst>()) {
    return;
  } else {
    if constexpr (eigen_plain_object<Dst> && eigen_dense_leaf<Src>) {
      resize_plain_if_possible(dst, src.rows(), src.cols());  // check_same_shape reports any other shape
    } else if constexpr (requires { dst.resize(src.dimensions()); } && eigen_tensor_leaf<Src>) {
      if constexpr (!requires { Dst::Dimensions::total_size; }) dst.resize(src.dimensions());
    }
    check_same_shape(path, src, dst);
    if constexpr (leaf_row_major<Src>() != leaf_row_major<Dst>()) {
      // Another layout puts the elements in another order (unless at most one dimension exceeds 1): a
      // straight copy of the storage would transpose the leaf.
      const auto shape = leaf_shape(src);
      if (layout_matters(shape)) {
        convert_reordered(src.data(), leaf_row_major<Src>(), dst.data(), leaf_row_major<Dst>(), shape);
        return;
      }
    }
    batch.add(src.data(), dst.data(), static_cast<std::size_t>(src.size()));
  }
}

template <class Src, class Dst>
void cast_into(TreePath& path, const Src& src, Dst& dst, ConversionBatch& batch) {
  if constexpr (tree_leaf<Src>) {
    cast_leaf_into(path, src, dst, batch);
  } else if constexpr (is_std_vector<Src>::value) {
    dst.resize(src.size());
    for (std::size_t i = 0; i < src.size(); ++i) {
      path.push_index(i);
      cast_into(path, src[i], dst[i], batch);
      path.pop();
    }
  } else if constexpr (is_string_map<Src>::value) {
    std::erase_if(dst, [&src](const auto& entry) { return !src.contains(entry.first); });
    for (const auto& [key, value] : src) {
      path.push_key(key);
      cast_into(path, value, dst[key], batch);
      path.pop();
    }
  } else if constexpr (is_std_array<Src>::value) {
    if constexpr (is_std_vector<Dst>::value) {
      dst.resize(src.size());  // a cast resizes the destination's vectors
    } else {
      require_same_array_size(path, src, dst);
    }
    for (std::size_t i = 0; i < src.size(); ++i) {
      path.push_index(i);
      cast_into(path, src[i], dst[i], batch);
      path.pop();
    }
  } else if constexpr (is_tuple_like_node<Src>::value) {
    static_assert(std::tuple_size_v<Dst> == std::tuple_size_v<Src>,
                  "xax: a cast's trees differ in structure: tuples (or pairs) of different sizes");
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      ((path.push_index(I), cast_into(path, std::get<I>(src), std::get<I>(dst), batch), path.pop()), ...);
    }
    (std::make_index_sequence<std::tuple_size_v<Src>>{});
  } else if constexpr (reflected_struct<Src>) {
    constexpr auto names = field_names<Src>();
    static_assert(std::tuple_size_v<field_types_t<Dst>> == names.size(),
                  "xax: a cast's trees differ in structure: structs with different numbers of fields");
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      ((path.push_field(names[I]),
        cast_into(path, std::get<I>(tie_fields(src)), std::get<I>(tie_fields(dst)), batch), path.pop()),
       ...);
    }
    (std::make_index_sequence<names.size()>{});
  } else {
    static_assert(always_false<Src>, "xax: this type is not a tree");
  }
}

}  // namespace detail

/// Casts every floating leaf of `src` into the corresponding leaf of `dst`, resizing `dst`'s vectors, maps
/// and dynamic leaves to match (storage is reused when the shapes already agree, so a train step allocates
/// nothing). Non-floating leaves are copied. Throws ShapeError where `dst` cannot take `src`'s shape (a Map
/// or fixed size).
template <class Src, class Dst>
void tree_cast_into(const Src& src, Dst& dst) {
  detail::require_tree<Src>();
  detail::require_tree<Dst>();
  TreePath path;
  // Reused across calls so that a cast into already-sized leaves allocates nothing.
  thread_local detail::ConversionBatch batch;
  batch.clear();
  detail::cast_into(path, src, dst, batch);
  batch.run();
}

/// Returns a copy of `src` whose floating leaves hold `S`: `tree_cast<bfloat16>(Params<float>)` is a
/// `Params<bfloat16>`. Rounding is Eigen's round-to-nearest-even, through xax's vectorised kernels.
template <floating_scalar S, class Tree>
rebind_scalar_t<Tree, S> tree_cast(const Tree& src) {
  detail::require_tree<Tree>();
  rebind_scalar_t<Tree, S> out{};
  tree_cast_into(src, out);
  return out;
}

/// A tree of the same type and shapes with every floating element zero.
template <class Tree>
std::remove_cvref_t<Tree> zeros_like(const Tree& tree) {
  std::remove_cvref_t<Tree> out{};
  tree_cast_into(tree, out);
  fill_floating(out, 0.0);
  return out;
}

}  // namespace xax
