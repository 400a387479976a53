#pragma once
// Element-wise conversions between xax's floating scalars. This is the portable reference: every fast kernel
// must be bit-identical to it (Eigen's round-to-nearest-even, NaN stays NaN, overflow to inf).

#include <xax/detail/eigen.hpp>

#include <cstddef>
#include <cstring>
#include <type_traits>

namespace xax::detail {

template <class To, class From>
constexpr To convert_scalar(From value) {
  if constexpr (std::is_same_v<To, From>) {
    return value;
  } else if constexpr ((std::is_same_v<From, Eigen::half> || std::is_same_v<From, Eigen::bfloat16>)&&(
                           std::is_same_v<To, Eigen::half> || std::is_same_v<To, Eigen::bfloat16>)) {
    return static_cast<To>(static_cast<float>(value));  // exact widening first, then one rounding
  } else {
    return static_cast<To>(value);
  }
}

template <class From, class To>
void convert_portable(const From* src, To* dst, std::size_t n) {
  if constexpr (std::is_same_v<From, To>) {
    if (n != 0) std::memcpy(dst, src, n * sizeof(From));
  } else {
    for (std::size_t i = 0; i < n; ++i) dst[i] = convert_scalar<To>(src[i]);
  }
}

}  // namespace xax::detail

namespace xax::detail {

/// The conversion every xax cast goes through. Dispatches to the fastest bit-identical kernel available.
template <class From, class To>
void convert_n(const From* src, To* dst, std::size_t n) {
  convert_portable(src, dst, n);
}

}  // namespace xax::detail
