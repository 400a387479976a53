#pragma once
/// \file
/// Element-wise precision conversions between contiguous arrays, at memory speed.
///
///     std::vector<float> master(n);
///     std::vector<xax::bfloat16> compute(n);
///     xax::convert(master, compute);  // round to nearest even, like Eigen
///
/// Rounding is Eigen's: to nearest, ties to even, overflow to infinity, subnormals kept. A NaN stays a NaN
/// of the same sign (narrowing gives the canonical quiet NaN; widening is exact). The same kernels serve
/// xax::tree_cast, chosen at run time for the CPU (AVX-512 with or without AVX512_BF16, AVX2 with F16C, or
/// portable code) and split across xax::num_threads() threads for large arrays.

#include <xax/detail/convert.hpp>

#include <cstddef>
#include <cstdint>
#include <ranges>
#include <string>
#include <type_traits>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>

namespace xax {

/// A contiguous, sized range of floating scalars: std::vector, std::array, std::span, a C array.
template <class R>
concept floating_array = std::ranges::contiguous_range<R> && std::ranges::sized_range<R> &&
    floating_scalar<std::remove_cv_t<std::ranges::range_value_t<R>>>;

/// A floating_array whose elements can be written.
template <class R>
concept writable_floating_array =
    floating_array<R> && !std::is_const_v<std::remove_reference_t<std::ranges::range_reference_t<R>>>;

/// Converts every element of `src` into the element of `dst` at the same index, e.g. float to bfloat16.
/// Throws ShapeError when the sizes differ, or when `src` and `dst` overlap other than as the same array of
/// the same type (which is left as it is): the pass is split across threads and vector lanes, so a shifted
/// overlap would read elements already overwritten.
template <floating_array Src, writable_floating_array Dst>
void convert(const Src& src, Dst&& dst) {
  const auto size = static_cast<std::size_t>(std::ranges::size(src));
  const auto dst_size = static_cast<std::size_t>(std::ranges::size(dst));
  if (size != dst_size) {
    throw ShapeError("xax::convert: the source has " + std::to_string(size) +
                     " elements but the destination has " + std::to_string(dst_size) +
                     "; give a destination of the same size");
  }
  using From = std::remove_cv_t<std::ranges::range_value_t<Src>>;
  using To = std::ranges::range_value_t<Dst>;
  const From* from = std::ranges::data(src);
  To* to = std::ranges::data(dst);
  if constexpr (std::is_same_v<From, To>) {
    if (static_cast<const void*>(from) == static_cast<const void*>(to)) return;
  }
  const auto first = [](const auto* p) { return reinterpret_cast<std::uintptr_t>(p); };
  if (size > 0 && first(from) < first(to + size) && first(to) < first(from + size)) {
    throw ShapeError(
        "xax::convert: the source and the destination overlap; give separate storage (or, for "
        "the same type, the same array, which is left as it is)");
  }
  detail::convert_n(from, to, size);
}

}  // namespace xax
