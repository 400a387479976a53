#pragma once
/// \file
/// The element types and Eigen objects xax::matmul accepts, apart from matmul itself: the reductions, losses
/// and activations take the same operands, and naming them must not pull in the GEMM backends (oneDNN).

#include <xax/detail/eigen.hpp>

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <iterator>
#include <string>
#include <utility>
#include <xax/detail/format.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>

namespace xax {

/// An element type matmul multiplies: float, xax::bfloat16 or xax::float16.
template <class T>
concept matmul_scalar = std::same_as<T, float> || half_scalar<T>;

/// An Eigen dense object matmul can read in place: a matmul_scalar, direct access, unit inner stride.
template <class M>
concept matmul_operand = requires {
  typename M::PlainObject;
  typename M::Scalar;
}
&&std::derived_from<M, Eigen::DenseBase<M>>&& matmul_scalar<typename M::Scalar> &&
    (static_cast<unsigned>(M::Flags) & Eigen::DirectAccessBit) != 0 && M::InnerStrideAtCompileTime == 1;

/// A matmul_operand matmul can write: an lvalue (not a const Map), column-major.
template <class M>
concept matmul_output = matmul_operand<M> &&(static_cast<unsigned>(M::Flags) & Eigen::LvalueBit) != 0 &&
                        !M::IsRowMajor;

namespace detail {

/// The leading dimension of a column-major operand: element (i, j) at `m.data()[i + j * ld]`. Eigen lets a
/// Map's outer stride be smaller than its rows (overlapping columns, such as a sliding window; 0 repeats one
/// column), which the ops' kernels cannot read as separate columns: that is a ShapeError naming `function`
/// (xax::matmul copies such operands instead). One column needs no stride.
template <class M>
Eigen::Index leading_dimension(const M& m, const char* function = nullptr) {
  const Eigen::Index rows = M::IsRowMajor ? m.cols() : m.rows(), cols = M::IsRowMajor ? m.rows() : m.cols();
  if (cols <= 1) return std::max<Eigen::Index>(rows, 1);
  if (m.outerStride() < rows) {
    throw ShapeError((function != nullptr ? std::string("xax::") + function : std::string("xax")) +
                     ": an operand is " + shape_string(m.rows(), m.cols()) + " with outer stride " +
                     std::to_string(m.outerStride()) + ", less than the " + std::to_string(rows) +
                     " elements of a column: its columns overlap. Pass operands whose " +
                     "columns are at least a column apart (a copy, e.g. .eval(), for a sliding-window Map)");
  }
  return m.outerStride();
}

/// Whether `m`'s columns overlap in memory (outer stride below the column length, with more than one column).
template <class M>
bool has_overlapping_columns(const M& m) {
  const Eigen::Index rows = M::IsRowMajor ? m.cols() : m.rows(), cols = M::IsRowMajor ? m.rows() : m.cols();
  return cols > 1 && m.outerStride() < rows;
}

/// The distance in elements between consecutive elements of a vector operand (one row or one column): 1 for
/// a vector type or a column block, the outer stride for a 1 x n block of a column-major matrix
/// (`m.topRows(1)`), whose elements are a column apart. It may be 0 (a Map with outer stride 0).
template <class V>
Eigen::Index vector_increment(const V& v) {
  if (v.size() <= 1) return 1;
  const bool one_column = v.cols() == 1;
  return one_column == static_cast<bool>(V::IsRowMajor) ? v.outerStride() : 1;
}

/// Where a column-major operand lies in memory.
struct StoredOperand {
  std::uintptr_t data;
  Eigen::Index rows, cols, ld;
  std::size_t element_size;
};

/// A column-major operand's storage (a row-major one as its column-major transpose). Its columns must not
/// overlap (leading_dimension).
template <class M>
StoredOperand matrix_storage(const M& m, const char* function) {
  return {reinterpret_cast<std::uintptr_t>(m.data()), M::IsRowMajor ? m.cols() : m.rows(),
          M::IsRowMajor ? m.rows() : m.cols(), leading_dimension(m, function), sizeof(typename M::Scalar)};
}

/// The storage of `count` adjacent elements (a contiguous tensor, a label vector), as one column.
inline StoredOperand contiguous_storage(const void* data, Eigen::Index count, std::size_t element_size) {
  return {reinterpret_cast<std::uintptr_t>(data), count, 1, std::max<Eigen::Index>(count, 1), element_size};
}

/// A vector operand's storage, one element per column when its elements are not adjacent. An output that is
/// not a vector yet (a plain matrix about to be resized, or one its op will refuse) is taken by its own
/// layout: read as a vector, its size times its outer stride would reach past its storage, into memory an
/// input may hold, and a refusal would name an overlap that is not there.
template <class V>
StoredOperand vector_storage(const V& v) {
  if (v.rows() > 1 && v.cols() > 1) {
    const Eigen::Index inner = V::IsRowMajor ? v.cols() : v.rows(),
                       outer = V::IsRowMajor ? v.rows() : v.cols();
    if (v.innerStride() == 1 && v.outerStride() >= inner) {
      return {reinterpret_cast<std::uintptr_t>(v.data()), inner, outer, v.outerStride(),
              sizeof(typename V::Scalar)};
    }
  }
  const Eigen::Index increment = vector_increment(v);
  if (increment == 1) return contiguous_storage(v.data(), v.size(), sizeof(typename V::Scalar));
  return {reinterpret_cast<std::uintptr_t>(v.data()), 1, v.size(), std::max<Eigen::Index>(increment, 1),
          sizeof(typename V::Scalar)};
}

/// The address range [first, last) a stored matrix spans.
inline std::pair<std::uintptr_t, std::uintptr_t> address_range(const void* data, Eigen::Index rows,
                                                               Eigen::Index cols, Eigen::Index ld,
                                                               std::size_t element_size) {
  const auto first = reinterpret_cast<std::uintptr_t>(data);
  if (rows == 0 || cols == 0) return {first, first};
  const auto count = static_cast<std::uintptr_t>((cols - 1) * ld + rows);
  return {first, first + count * element_size};
}

inline std::pair<std::uintptr_t, std::uintptr_t> address_range(const StoredOperand& m) {
  return address_range(reinterpret_cast<const void*>(m.data), m.rows, m.cols, m.ld, m.element_size);
}

/// Whether the address ranges of two operands intersect (a conservative test of sharing).
inline bool ranges_overlap(const StoredOperand& a, const StoredOperand& b) {
  const auto [a_first, a_last] = address_range(a);
  const auto [b_first, b_last] = address_range(b);
  return a_first < b_last && b_first < a_last;
}

/// Whether two operands share an element. Row blocks of one matrix (q, k and v of a fused projection, or
/// their gradients) interleave in memory without sharing one: with the same leading dimension and element
/// size, the blocks' rows and columns are compared; otherwise any overlap of the address ranges counts.
inline bool share_elements(const StoredOperand& a, const StoredOperand& b) {
  if (!ranges_overlap(a, b)) return false;
  if (a.ld != b.ld || a.element_size != b.element_size) return true;
  const StoredOperand& low = a.data <= b.data ? a : b;
  const StoredOperand& high = a.data <= b.data ? b : a;
  const std::uintptr_t bytes = high.data - low.data;
  if (bytes % low.element_size != 0) return true;
  const auto offset = static_cast<Eigen::Index>(bytes / low.element_size);
  const Eigen::Index row = offset % low.ld, col = offset / low.ld;
  if (row + high.rows > low.ld) return true;  // wraps into the next column: not a block of the same matrix
  return row < low.rows && col < low.cols;    // both the rows and the columns intersect
}

/// Whether two operands are the same elements in the same layout: an exact in-place call.
inline bool same_storage(const StoredOperand& a, const StoredOperand& b) {
  return a.data == b.data && a.rows == b.rows && a.cols == b.cols && a.element_size == b.element_size &&
         (a.cols <= 1 || a.ld == b.ld);
}

/// Throws ShapeError when `output` shares an element with any of `operands`: the ops read their inputs while
/// writing their outputs, so a partial overlap gives wrong values, and resizing a plain output frees storage
/// an input still points into. Call it on the output's storage before any resize. `in_place` is what the op
/// documents as allowed: the output may then be exactly the same elements as an operand (same_storage).
inline void check_no_overlap(const StoredOperand& output, std::initializer_list<StoredOperand> operands,
                             const char* function, const char* what, bool in_place = false) {
  for (const StoredOperand& operand : operands) {
    if (in_place && same_storage(output, operand)) continue;
    if (share_elements(output, operand)) {
      throw ShapeError(std::string("xax::") + function + ": " + what +
                       " shares memory with an input; write it into separate storage" +
                       (in_place ? " (or exactly over the input, in place)" : ""));
    }
  }
}

/// An op's output, by its storage and the name an error gives it.
struct NamedOutput {
  StoredOperand storage;
  const char* name;
};

/// Throws ShapeError when two of an op's outputs share an element. Call it before any output is resized, as a
/// resize frees storage another output may point into, and again once all are resized: one object passed as
/// two outputs has no storage to overlap while it is empty, and would otherwise be resized twice, the first
/// shape's writes landing in the second's buffer.
inline void check_outputs_apart(std::initializer_list<NamedOutput> outputs, const char* function) {
  for (auto a = outputs.begin(); a != outputs.end(); ++a) {
    for (auto b = std::next(a); b != outputs.end(); ++b) {
      if (share_elements(a->storage, b->storage)) {
        throw ShapeError(std::string("xax::") + function + ": " + a->name + " shares memory with " + b->name +
                         "; write each output into separate storage");
      }
    }
  }
}

}  // namespace detail

}  // namespace xax
