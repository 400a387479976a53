#pragma once
/// \file
/// Trees of tensors: walk, zip and inspect nested parameter structures, and rebind their scalar type. The
/// value casts (tree_cast, tree_cast_into, zeros_like) are in xax/utils/tree_cast.hpp.
///
/// Leaves are Eigen dense plain objects (`Matrix`, `Array`), contiguous `Eigen::Map`s of them,
/// `Eigen::Tensor`, `Eigen::TensorFixedSize`, `Eigen::TensorMap`, and arithmetic scalars (including
/// xax::float16/bfloat16). Nodes are `std::tuple`, `std::pair`, `std::array`, `std::vector`,
/// `std::map<std::string, T>` and user structs that opt in with one line:
///
///     template <class T>
///     struct Layer {
///       Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> w;
///       Eigen::Matrix<T, Eigen::Dynamic, 1> b;
///       XAX_FIELDS(w, b);
///     };
///
/// Field names become leaf paths in diagnostics (`layers[1].w`). A struct that is a class template over its
/// scalar (as above) can be rebound: `rebind_scalar_t<Layer<float>, bfloat16>` is `Layer<bfloat16>`, the type
/// `tree_cast<bfloat16>(Layer<float>{})` returns.

#include <xax/detail/eigen_tensor.hpp>

#include <algorithm>
#include <array>
#include <concepts>
#include <cstddef>
#include <iterator>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
#include <xax/detail/format.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>

namespace xax {

// ---------------------------------------------------------------------------------------------------------------
// Leaves

/// An Eigen dense plain object: `Matrix` or `Array` of any size. Probes `PlainObject` before `DenseBase` so
/// that non-Eigen types never instantiate Eigen's bases.
template <class T>
concept eigen_plain_object = requires {
  typename T::PlainObject;
}
&&std::same_as<typename T::PlainObject, T>&& std::derived_from<T, Eigen::DenseBase<T>>;

namespace detail {
template <class T>
struct is_contiguous_eigen_map : std::false_type {};
template <class Plain, int Options>
struct is_contiguous_eigen_map<Eigen::Map<Plain, Options, Eigen::Stride<0, 0>>>
    : std::bool_constant<eigen_plain_object<std::remove_const_t<Plain>>> {};

template <class T>
struct is_eigen_tensor : std::false_type {};
template <class S, int N, int O, class I>
struct is_eigen_tensor<Eigen::Tensor<S, N, O, I>> : std::true_type {};
template <class S, class Dims, int O, class I>
struct is_eigen_tensor<Eigen::TensorFixedSize<S, Dims, O, I>> : std::true_type {};
template <class Plain, int O, template <class> class MakePointer>
struct is_eigen_tensor<Eigen::TensorMap<Plain, O, MakePointer>> : std::true_type {};
}  // namespace detail

/// A contiguous Eigen dense leaf: a plain `Matrix`/`Array`, or a default-stride `Map` of one.
template <class T>
concept eigen_dense_leaf = eigen_plain_object<T> || detail::is_contiguous_eigen_map<T>::value;

/// An Eigen tensor leaf: `Tensor`, `TensorFixedSize` or `TensorMap`.
template <class T>
concept eigen_tensor_leaf = detail::is_eigen_tensor<T>::value;

/// A scalar leaf: any arithmetic type, xax::float16 or xax::bfloat16.
template <class T>
concept scalar_leaf = std::is_arithmetic_v<T> || floating_scalar<T>;

/// Anything a tree can hold at its leaves.
template <class T>
concept tree_leaf = eigen_dense_leaf<T> || eigen_tensor_leaf<T> || scalar_leaf<T>;

namespace detail {
template <class T>
struct leaf_scalar_impl {
  using type = T;
};
template <class T>
requires(eigen_dense_leaf<T> || eigen_tensor_leaf<T>) struct leaf_scalar_impl<T> {
  using type = typename T::Scalar;
};
}  // namespace detail

/// The element type of a leaf (`float` for `Eigen::MatrixXf`, `T` for a scalar leaf `T`).
template <tree_leaf T>
using leaf_scalar_t = typename detail::leaf_scalar_impl<T>::type;

/// A leaf whose elements are floating point; only these are cast, scaled and checked.
template <class T>
concept floating_leaf = tree_leaf<T> && floating_scalar<leaf_scalar_t<T>>;

namespace detail {
/// False for a non-const Map of const data: a leaf all the same (it can be read, cast from, checked and
/// saved), but one whose elements cannot be written.
template <class L>
inline constexpr bool writable_leaf = true;
template <class Plain, int Options, class Stride>
inline constexpr bool writable_leaf<Eigen::Map<const Plain, Options, Stride>> = false;
template <class Plain, int Options, template <class> class MakePointer>
inline constexpr bool writable_leaf<Eigen::TensorMap<const Plain, Options, MakePointer>> = false;

/// Stops a walk that writes the leaf `L` at a Map of const data with one clear message, where it would
/// otherwise fail deep inside std::span or the conversion kernels, in a page of errors. Returns whether the
/// walk may go on; a const `L` (only read) always may.
template <class L>
constexpr bool require_writable_leaf() {
  static_assert(writable_leaf<L>,
                "xax: this operation writes the tree's leaves, and one is an Eigen::Map of const data "
                "(Map<const Matrix>), which can only be read; give it a tree whose leaves are writable (a "
                "Matrix, or a Map of non-const data)");
  return writable_leaf<L>;
}
}  // namespace detail

/// The contiguous elements of a leaf, e.g. to hand to a kernel.
template <class L>
requires tree_leaf<std::remove_const_t<L>>
auto leaf_span(L& leaf) {
  using Scalar = leaf_scalar_t<std::remove_const_t<L>>;
  using Element = std::conditional_t<std::is_const_v<L>, const Scalar, Scalar>;
  if constexpr (scalar_leaf<std::remove_const_t<L>>) {
    return std::span<Element>(&leaf, 1);
  } else if constexpr (!detail::require_writable_leaf<L>()) {
    return std::span<Element>();
  } else {
    return std::span<Element>(leaf.data(), static_cast<std::size_t>(leaf.size()));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// User structs

/// Non-intrusive opt-in for a struct you cannot edit: specialise with `static auto tie(T&)`, `static auto
/// tie(const T&)` (each returning `std::tie(fields...)`) and `static constexpr std::array<std::string_view,
/// N> names`.
template <class T>
struct fields_of;

namespace detail {
constexpr std::size_t count_field_names(std::string_view list) {
  std::size_t count = 1;
  for (char c : list) count += (c == ',') ? 1 : 0;
  return count;
}
template <std::size_t N>
constexpr std::array<std::string_view, N> split_field_names(std::string_view list) {
  std::array<std::string_view, N> names{};
  std::size_t index = 0;
  while (index < N) {
    const std::size_t comma = list.find(',');
    std::string_view name = list.substr(0, comma);
    while (!name.empty() && (name.front() == ' ' || name.front() == '\n')) name.remove_prefix(1);
    while (!name.empty() && (name.back() == ' ' || name.back() == '\n')) name.remove_suffix(1);
    names[index++] = name;
    if (comma == std::string_view::npos) break;
    list.remove_prefix(comma + 1);
  }
  return names;
}
}  // namespace detail

}  // namespace xax

/// Opts a struct into xax's trees: list its tree fields, in order, inside the struct body.
#define XAX_FIELDS(...)                                                                                    \
  auto xax_fields()& {                                                                                     \
    return std::tie(__VA_ARGS__);                                                                          \
  }                                                                                                        \
  auto xax_fields() const& {                                                                               \
    return std::tie(__VA_ARGS__);                                                                          \
  }                                                                                                        \
  static constexpr auto xax_field_names() {                                                                \
    return ::xax::detail::split_field_names<::xax::detail::count_field_names(#__VA_ARGS__)>(#__VA_ARGS__); \
  }                                                                                                        \
  static_assert(true, "")

namespace xax {

/// A struct that opted in with XAX_FIELDS(...) inside its body.
template <class T>
concept struct_with_member_fields = requires(T& t, const T& ct) {
  t.xax_fields();
  ct.xax_fields();
  T::xax_field_names();
};

/// A struct described by a `fields_of<T>` specialisation.
template <class T>
concept struct_with_fields_of = requires(T& t, const T& ct) {
  fields_of<T>::tie(t);
  fields_of<T>::tie(ct);
  fields_of<T>::names;
};

/// A user struct whose fields xax can walk.
template <class T>
concept reflected_struct = struct_with_member_fields<T> || struct_with_fields_of<T>;

namespace detail {
template <class T>
decltype(auto) tie_fields(T& value) {
  using U = std::remove_const_t<T>;
  if constexpr (struct_with_member_fields<U>) {
    return value.xax_fields();
  } else {
    return fields_of<U>::tie(value);
  }
}
template <class T>
constexpr auto field_names() {
  if constexpr (struct_with_member_fields<T>) {
    return T::xax_field_names();
  } else {
    return fields_of<T>::names;
  }
}
template <class T>
using field_types_t = decltype(tie_fields(std::declval<T&>()));
}  // namespace detail

// ---------------------------------------------------------------------------------------------------------------
// Tree detection

namespace detail {
template <class T>
struct is_std_vector : std::false_type {};
template <class T, class A>
struct is_std_vector<std::vector<T, A>> : std::true_type {};
// std::vector<bool> packs its elements into bits: no element has an address, so it cannot be a leaf's storage
// nor a node of leaves. Not a tree: hold masks as Eigen::Array<bool, ...> or std::vector<std::uint8_t>.
template <class A>
struct is_std_vector<std::vector<bool, A>> : std::false_type {};
template <class T>
struct is_string_map : std::false_type {};
template <class T, class C, class A>
struct is_string_map<std::map<std::string, T, C, A>> : std::true_type {};
template <class T>
struct is_std_array : std::false_type {};
template <class T, std::size_t N>
struct is_std_array<std::array<T, N>> : std::true_type {};
template <class T>
struct is_tuple_like_node : std::false_type {};
template <class... Ts>
struct is_tuple_like_node<std::tuple<Ts...>> : std::true_type {};
template <class A, class B>
struct is_tuple_like_node<std::pair<A, B>> : std::true_type {};

template <class T>
struct is_tree;

template <class Tuple>
struct all_trees;
template <class... Ts>
struct all_trees<std::tuple<Ts...>> : std::bool_constant<(is_tree<std::remove_cvref_t<Ts>>::value && ...)> {};
template <class A, class B>
struct all_trees<std::pair<A, B>>
    : std::bool_constant<is_tree<std::remove_cvref_t<A>>::value && is_tree<std::remove_cvref_t<B>>::value> {};

template <class T>
struct is_tree : std::false_type {};
template <class T>
requires tree_leaf<T>
struct is_tree<T> : std::true_type {
};
template <class T>
requires(is_std_vector<T>::value || is_std_array<T>::value) struct is_tree<T>
    : is_tree<typename T::value_type> {
};
template <class T>
requires(is_string_map<T>::value) struct is_tree<T> : is_tree<typename T::mapped_type> {
};
template <class T>
requires(is_tuple_like_node<T>::value) struct is_tree<T> : all_trees<T> {
};
template <class T>
requires(reflected_struct<T> && !tree_leaf<T>) struct is_tree<T> : all_trees<field_types_t<T>> {
};
}  // namespace detail

/// A type xax can walk: a leaf, or a node whose children are all trees.
template <class T>
concept tree = detail::is_tree<std::remove_cvref_t<T>>::value;

// ---------------------------------------------------------------------------------------------------------------
// Leaf paths

/// The path of a leaf inside a tree, such as `encoder.layers[2].w`, built while walking.
class TreePath {
 public:
  [[nodiscard]] std::string_view str() const { return path_; }
  [[nodiscard]] std::string display() const { return path_.empty() ? std::string("<root>") : path_; }

  void push_field(std::string_view name) {
    marks_.push_back(path_.size());
    if (!path_.empty()) path_ += '.';
    path_ += name;
  }
  void push_index(std::size_t index) {
    marks_.push_back(path_.size());
    ((path_ += '[') += std::to_string(index)) += ']';
  }
  void push_key(std::string_view key) {
    marks_.push_back(path_.size());
    ((path_ += "[\"") += key) += "\"]";
  }
  void pop() {
    path_.resize(marks_.back());
    marks_.pop_back();
  }

 private:
  std::string path_;
  std::vector<std::size_t> marks_;
};

namespace detail {

template <class T>
inline constexpr bool always_false = false;

inline constexpr const char* not_a_tree_message =
    "xax: this type is not a tree. Leaves are Eigen Matrix/Array (or a contiguous Map), Eigen::Tensor/"
    "TensorFixedSize/TensorMap and arithmetic scalars; nodes are std::tuple, std::pair, std::array, "
    "std::vector and "
    "std::map<std::string, T>. A struct opts in with one line inside its body listing its fields, e.g. "
    "XAX_FIELDS(w, b); or specialise xax::fields_of<T> for a type you cannot edit.";

template <class L>
auto leaf_shape(const L& leaf) {
  if constexpr (eigen_dense_leaf<L>) {
    return std::array<Eigen::Index, 2>{leaf.rows(), leaf.cols()};
  } else if constexpr (eigen_tensor_leaf<L>) {
    std::array<Eigen::Index, static_cast<std::size_t>(L::NumDimensions)> dims{};
    for (std::size_t i = 0; i < dims.size(); ++i) dims[i] = leaf.dimension(i);
    return dims;
  } else {
    return std::array<Eigen::Index, 0>{};
  }
}

/// Whether a leaf stores its elements row-major (the last index fastest). Scalars count as column-major.
template <class L>
constexpr bool leaf_row_major() {
  if constexpr (eigen_dense_leaf<L>) {
    return L::IsRowMajor;
  } else if constexpr (eigen_tensor_leaf<L>) {
    return static_cast<int>(L::Layout) == static_cast<int>(Eigen::RowMajor);
  } else {
    return false;
  }
}

/// Whether the layout of a leaf of this shape decides the order of its elements in storage: more than one
/// dimension above 1.
template <std::size_t N>
bool layout_matters(const std::array<Eigen::Index, N>& shape) {
  return std::count_if(shape.begin(), shape.end(), [](Eigen::Index d) { return d > 1; }) > 1;
}

/// Calls `f(k, offset)` for every element of a `shape`d leaf: k counts the elements in the destination
/// layout's memory order, offset is the same element's position in the source layout's. The one index walk
/// behind every change of layout (tree_cast_into, checkpoints).
template <std::size_t N, class F>
void for_each_reordered(const std::array<Eigen::Index, N>& shape, bool src_row_major, bool dst_row_major,
                        F&& f) {
  std::size_t total = 1;
  for (const Eigen::Index dim : shape) total *= static_cast<std::size_t>(dim);
  if (total == 0) return;
  std::array<std::size_t, N> src_stride{};
  std::size_t stride = 1;
  for (std::size_t step = 0; step < N; ++step) {
    const std::size_t axis = src_row_major ? N - 1 - step : step;
    src_stride[axis] = stride;
    stride *= static_cast<std::size_t>(shape[axis]);
  }
  std::array<std::size_t, N> index{};
  std::size_t src_offset = 0;
  for (std::size_t k = 0; k < total; ++k) {
    f(k, src_offset);
    // Advance the multi-index by one in the destination's memory order, keeping src_offset in step.
    for (std::size_t step = 0; step < N; ++step) {
      const std::size_t axis = dst_row_major ? N - 1 - step : step;
      if (++index[axis] < static_cast<std::size_t>(shape[axis])) {
        src_offset += src_stride[axis];
        break;
      }
      src_offset -= (index[axis] - 1) * src_stride[axis];
      index[axis] = 0;
    }
  }
}

template <class L0, class L>
void check_same_shape(const TreePath& path, const L0& first, const L& other) {
  const auto a = leaf_shape(first);
  const auto b = leaf_shape(other);
  bool same = a.size() == b.size();
  if (same) {
    for (std::size_t i = 0; i < a.size(); ++i) same = same && a[i] == b[i];
  }
  if (!same) {
    throw ShapeError("tree leaves do not match at '" + path.display() + "': shape " + shape_string(a) +
                     " vs " + shape_string(b) +
                     "; zipped trees must have the same structure and leaf shapes");
  }
}

/// Throws ShapeError unless two leaves of the same shape also store their elements in the same order.
template <class L0, class L>
void check_same_layout([[maybe_unused]] const TreePath& path, [[maybe_unused]] const L0& first, const L&) {
  if constexpr (leaf_row_major<L0>() != leaf_row_major<L>()) {
    const auto a = leaf_shape(first);
    if (layout_matters(a)) {
      throw ShapeError("tree leaves do not match at '" + path.display() + "': shape " + shape_string(a) +
                       " " + (leaf_row_major<L0>() ? "row-major" : "column-major") + " vs " +
                       (leaf_row_major<L>() ? "row-major" : "column-major") +
                       "; zipped leaves are combined element by element in storage order, so they must share "
                       "a layout (tree_cast_into converts between layouts)");
    }
  }
}

// A std::array zipped with another node: its size is the other array's at compile time, or a vector's at run
// time. Unchecked, a shorter node was read past its end and a longer one's extra leaves were ignored.
template <class A, class Other>
void require_same_array_size(const TreePath& path, const A& array, const Other& other) {
  if constexpr (is_std_array<std::remove_const_t<Other>>::value) {
    static_assert(std::tuple_size_v<std::remove_const_t<Other>> == std::tuple_size_v<std::remove_const_t<A>>,
                  "xax: zipped trees differ in structure: std::arrays of different sizes");
  } else if (std::size(other) != array.size()) {
    throw ShapeError("tree structure does not match at '" + path.display() + "': an array of " +
                     std::to_string(array.size()) + " elements zipped with a node of " +
                     std::to_string(std::size(other)));
  }
}

template <class F, class T0, class... Ts>
void walk(F& f, TreePath& path, T0& first, Ts&... rest) {
  using U = std::remove_const_t<T0>;
  if constexpr (tree_leaf<U>) {
    (check_same_shape(path, first, rest), ...);
    (check_same_layout(path, first, rest), ...);
    f(std::as_const(path), first, rest...);
  } else if constexpr (is_std_vector<U>::value) {
    [[maybe_unused]] const auto check_size = [&](std::size_t size) {
      if (size != first.size()) {
        throw ShapeError("tree structure does not match at '" + path.display() + "': a vector of " +
                         std::to_string(first.size()) + " elements zipped with one of " +
                         std::to_string(size));
      }
    };
    (check_size(rest.size()), ...);
    for (std::size_t i = 0; i < first.size(); ++i) {
      path.push_index(i);
      walk(f, path, first[i], rest[i]...);
      path.pop();
    }
  } else if constexpr (is_string_map<U>::value) {
    [[maybe_unused]] const auto check_size = [&](std::size_t size) {
      if (size != first.size()) {
        throw ShapeError("tree structure does not match at '" + path.display() + "': a map of " +
                         std::to_string(first.size()) + " keys zipped with one of " + std::to_string(size));
      }
    };
    (check_size(rest.size()), ...);
    auto iterators = std::tuple{rest.begin()...};
    for (auto& entry : first) {
      // Named references rather than structured bindings: clang 14 cannot capture bindings in lambdas.
      const std::string& key = entry.first;
      auto& value = entry.second;
      std::apply(
          [&](auto&... its) {
            [[maybe_unused]] const auto check_key = [&](const std::string& other_key) {
              if (other_key != key) {
                throw ShapeError("tree structure does not match at '" + path.display() + "': key '" + key +
                                 "' zipped with key '" + other_key + "'");
              }
            };
            (check_key(its->first), ...);
            path.push_key(key);
            walk(f, path, value, its->second...);
            path.pop();
            (++its, ...);
          },
          iterators);
    }
  } else if constexpr (is_std_array<U>::value) {
    (require_same_array_size(path, first, rest), ...);
    for (std::size_t i = 0; i < first.size(); ++i) {
      path.push_index(i);
      walk(f, path, first[i], rest[i]...);
      path.pop();
    }
  } else if constexpr (is_tuple_like_node<U>::value) {
    static_assert(((std::tuple_size_v<std::remove_const_t<Ts>> == std::tuple_size_v<U>)&&...),
                  "xax: zipped trees differ in structure: tuples (or pairs) of different sizes");
    const auto walk_element = [&]<std::size_t I>(std::integral_constant<std::size_t, I>) {
      path.push_index(I);
      walk(f, path, std::get<I>(first), std::get<I>(rest)...);
      path.pop();
    };
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      (walk_element(std::integral_constant<std::size_t, I>{}), ...);
    }
    (std::make_index_sequence<std::tuple_size_v<U>>{});
  } else if constexpr (reflected_struct<U>) {
    constexpr auto names = field_names<U>();
    static_assert(((std::tuple_size_v<field_types_t<std::remove_const_t<Ts>>> == names.size()) && ...),
                  "xax: zipped trees differ in structure: structs with different numbers of fields");
    // One field of every tree at a time; a separate lambda keeps the field index and the tree pack apart.
    const auto walk_field = [&]<std::size_t I>(std::integral_constant<std::size_t, I>) {
      path.push_field(names[I]);
      walk(f, path, std::get<I>(tie_fields(first)), std::get<I>(tie_fields(rest))...);
      path.pop();
    };
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      (walk_field(std::integral_constant<std::size_t, I>{}), ...);
    }
    (std::make_index_sequence<names.size()>{});
  } else {
    static_assert(always_false<U>, "xax: this type is not a tree; see xax::detail::not_a_tree_message");
  }
}

template <class T>
void require_tree() {
  static_assert(
      tree<T>,
      "xax: this type is not a tree. Leaves are Eigen Matrix/Array (or a contiguous Map), Eigen::Tensor "
      "and arithmetic scalars; nodes are std::tuple, pair, array, vector and map<std::string, T>. A "
      "struct opts in with one line inside its body that lists its fields, e.g. XAX_FIELDS(w, b);");
}

}  // namespace detail

/// Calls `f(leaf, other_leaves...)` for every leaf of `tree`, zipped with the corresponding leaves of
/// `others`. Throws ShapeError, naming the path, when the trees differ in structure or leaf shape.
template <class F, class Tree, class... Others>
void for_each_leaf(F&& f, Tree&& tree, Others&&... others) {
  detail::require_tree<Tree>();
  (detail::require_tree<Others>(), ...);
  TreePath path;
  auto drop_path = [&f](const TreePath&, auto&... leaves) { f(leaves...); };
  detail::walk(drop_path, path, tree, others...);
}

/// Like for_each_leaf, with the leaf's path first: `f(const TreePath&, leaf, other_leaves...)`.
template <class F, class Tree, class... Others>
void for_each_leaf_with_path(F&& f, Tree&& tree, Others&&... others) {
  detail::require_tree<Tree>();
  (detail::require_tree<Others>(), ...);
  TreePath path;
  detail::walk(f, path, tree, others...);
}

/// The number of leaves.
template <class Tree>
std::size_t leaf_count(const Tree& tree) {
  std::size_t count = 0;
  for_each_leaf([&count](const auto&) { ++count; }, tree);
  return count;
}

/// The paths of all leaves, in walk order (`layers[0].w`, `layers[0].b`, ...).
template <class Tree>
std::vector<std::string> leaf_paths(const Tree& tree) {
  std::vector<std::string> paths;
  for_each_leaf_with_path([&paths](const TreePath& path, const auto&) { paths.push_back(path.display()); },
                          tree);
  return paths;
}

/// The number of floating-point elements.
template <class Tree>
std::size_t floating_element_count(const Tree& tree) {
  std::size_t count = 0;
  for_each_leaf(
      [&count]<class L>(const L& leaf) {
        if constexpr (floating_leaf<L>) count += leaf_span(leaf).size();
      },
      tree);
  return count;
}

/// The bytes held by the elements of every leaf (the tensor payload, without container overhead).
template <class Tree>
std::size_t payload_bytes(const Tree& tree) {
  std::size_t bytes = 0;
  for_each_leaf([&bytes](const auto& leaf) { bytes += leaf_span(leaf).size_bytes(); }, tree);
  return bytes;
}

/// Sets every floating element to `value`; other leaves are left alone.
template <class Tree>
void fill_floating(Tree& tree, double value) {
  for_each_leaf(
      [value]<class L>(L& leaf) {
        if constexpr (floating_leaf<L>) {
          using S = leaf_scalar_t<L>;
          for (auto& x : leaf_span(leaf)) x = static_cast<S>(value);
        }
      },
      tree);
}

// ---------------------------------------------------------------------------------------------------------------
// Rebinding and casting

namespace detail {
template <class T, class S>
struct rebind;

template <class T, class S>
using rebind_t = typename rebind<T, S>::type;

template <class T, class S>
struct rebind_leaf_scalar {
  using type = std::conditional_t<floating_scalar<T>, S, T>;
};

// Eigen::Matrix and Eigen::Array share this template shape.
template <template <class, int, int, int, int, int> class M, class Sc, int R, int C, int O, int MR, int MC,
          class S>
requires eigen_plain_object<M<Sc, R, C, O, MR, MC>>
struct rebind<M<Sc, R, C, O, MR, MC>, S> {
  using type = M<typename rebind_leaf_scalar<Sc, S>::type, R, C, O, MR, MC>;
};
template <class Plain, int Options, class S>
requires is_contiguous_eigen_map<Eigen::Map<Plain, Options, Eigen::Stride<0, 0>>>::value struct rebind<
    Eigen::Map<Plain, Options, Eigen::Stride<0, 0>>, S> : rebind<std::remove_const_t<Plain>, S> {
};
template <class Sc, int N, int O, class I, class S>
struct rebind<Eigen::Tensor<Sc, N, O, I>, S> {
  using type = Eigen::Tensor<typename rebind_leaf_scalar<Sc, S>::type, N, O, I>;
};
template <class Sc, class Dims, int O, class I, class S>
struct rebind<Eigen::TensorFixedSize<Sc, Dims, O, I>, S> {
  using type = Eigen::TensorFixedSize<typename rebind_leaf_scalar<Sc, S>::type, Dims, O, I>;
};
template <class Plain, int O, template <class> class MP, class S>
struct rebind<Eigen::TensorMap<Plain, O, MP>, S> : rebind<std::remove_const_t<Plain>, S> {};
template <class T, class S>
requires scalar_leaf<T>
struct rebind<T, S> : rebind_leaf_scalar<T, S> {
};

// A node keeps its comparator and allocator: a map rebound to the default order would iterate its keys in
// another order than the tree it came from, and no longer zip with it.
template <class T, class A, class S>
struct rebind<std::vector<T, A>, S> {
  using type =
      std::vector<rebind_t<T, S>, typename std::allocator_traits<A>::template rebind_alloc<rebind_t<T, S>>>;
};
template <class T, class C, class A, class S>
struct rebind<std::map<std::string, T, C, A>, S> {
  using type = std::map<
      std::string, rebind_t<T, S>, C,
      typename std::allocator_traits<A>::template rebind_alloc<std::pair<const std::string, rebind_t<T, S>>>>;
};
template <class T, std::size_t N, class S>
struct rebind<std::array<T, N>, S> {
  using type = std::array<rebind_t<T, S>, N>;
};
template <class... Ts, class S>
struct rebind<std::tuple<Ts...>, S> {
  using type = std::tuple<rebind_t<Ts, S>...>;
};
template <class A, class B, class S>
struct rebind<std::pair<A, B>, S> {
  using type = std::pair<rebind_t<A, S>, rebind_t<B, S>>;
};

template <class Tuple, class S>
struct fields_unchanged;
template <class... Fs, class S>
struct fields_unchanged<std::tuple<Fs...>, S>
    : std::bool_constant<(std::is_same_v<rebind_t<std::remove_cvref_t<Fs>, S>, std::remove_cvref_t<Fs>> &&
                          ...)> {};

// TT<S, Rest...>, or TT<S> alone (the defaults after the scalar taken anew) when the struct was spelled with
// its defaults.
template <bool SpelledByDefaults, template <class...> class TT, class S, class... Rest>
struct rebound_template {
  using type = TT<S, Rest...>;
};
template <template <class...> class TT, class S, class... Rest>
struct rebound_template<true, TT, S, Rest...> {
  using type = TT<S>;
};

template <class T>
struct template_over_scalar : std::false_type {};
template <template <class...> class TT, class Sc, class... Rest>
requires floating_scalar<Sc>
struct template_over_scalar<TT<Sc, Rest...>> : std::true_type {
  // A struct spelled with its defaults after the scalar (`template <class T, class Layer = Linear<T>>`)
  // takes the defaults of the new scalar: keeping Rest would keep Linear<float>, whose leaves a cast would
  // then silently leave uncast. Parameters given explicitly are kept.
  static constexpr bool spelled_by_defaults = sizeof...(Rest) > 0 && requires {
    requires std::is_same_v<TT<Sc>, TT<Sc, Rest...>>;
  };
  template <class S>
  using with = typename rebound_template<spelled_by_defaults, TT, S, Rest...>::type;
};

template <class T, class S, bool Unchanged>
struct rebind_struct {
  using type = T;
};
template <class T, class S>
struct rebind_struct<T, S, false> {
  static_assert(
      template_over_scalar<T>::value,
      "xax: casting this struct changes the scalar of its floating fields, so it must be a class template "
      "whose parameters are types, the first one its scalar: template <class T> struct Params { "
      "Eigen::Matrix<T, ...> w; XAX_FIELDS(w); };");
  using type = typename template_over_scalar<T>::template with<S>;
};

template <class T, class S>
requires(reflected_struct<T> && !tree_leaf<T>) struct rebind<T, S>
    : rebind_struct<T, S, fields_unchanged<field_types_t<T>, S>::value> {
};

}  // namespace detail

/// The tree type `T` with the scalar of every floating leaf replaced by `S` (`Params<float>` -> `Params<S>`).
template <class T, floating_scalar S>
using rebind_scalar_t = detail::rebind_t<std::remove_cvref_t<T>, S>;

}  // namespace xax
