#pragma once
// Bit-level views of xax's floating scalars, and the guard that keeps fast-math out of every translation unit
// that checks finiteness or converts between precisions.
//
// Finiteness is tested on the bits (exponent field all ones) rather than with std::isfinite: the bit test is
// an integer operation the optimiser cannot reason away, and it reads the same for every precision, including
// the 16-bit ones that have no std::isfinite overload.

#if defined(__FAST_MATH__) || (defined(__FINITE_MATH_ONLY__) && __FINITE_MATH_ONLY__) || defined(_M_FP_FAST)
#error \
    "xax must not be compiled with -ffast-math, -ffinite-math-only or /fp:fast: they let the compiler \
assume no value is ever inf or NaN, which deletes the overflow check behind dynamic loss scaling (every step \
would be reported finite and training would continue on inf/NaN gradients) and changes NaN handling in the \
precision conversions. Remove the flag from the translation units that include xax."
#endif

#include <bit>
#include <cstdint>
#include <xax/utils/dtype.hpp>

namespace xax::detail {

/// The storage layout of a floating scalar: an unsigned integer of the same width and its exponent field.
template <floating_scalar T>
struct ieee754_traits;

template <>
struct ieee754_traits<float> {
  using bits_type = std::uint32_t;
  static constexpr bits_type exponent_mask = 0x7f80'0000u;
};
template <>
struct ieee754_traits<double> {
  using bits_type = std::uint64_t;
  static constexpr bits_type exponent_mask = 0x7ff0'0000'0000'0000u;
};
template <>
struct ieee754_traits<bfloat16> {
  using bits_type = std::uint16_t;
  static constexpr bits_type exponent_mask = 0x7f80u;
};
template <>
struct ieee754_traits<float16> {
  using bits_type = std::uint16_t;
  static constexpr bits_type exponent_mask = 0x7c00u;
};

template <floating_scalar T>
using bits_of_t = typename ieee754_traits<T>::bits_type;

/// The raw bits of `value`.
template <floating_scalar T>
constexpr bits_of_t<T> to_bits(T value) noexcept {
  static_assert(sizeof(T) == sizeof(bits_of_t<T>), "xax: a floating scalar must be exactly its bits");
  return std::bit_cast<bits_of_t<T>>(value);
}

/// The scalar whose raw bits are `bits`.
template <floating_scalar T>
constexpr T from_bits(bits_of_t<T> bits) noexcept {
  return std::bit_cast<T>(bits);
}

/// True unless `value` is an infinity or a NaN (its exponent field is all ones).
template <floating_scalar T>
constexpr bool is_finite_bits(T value) noexcept {
  constexpr auto exponent = ieee754_traits<T>::exponent_mask;
  return (to_bits(value) & exponent) != exponent;
}

}  // namespace xax::detail
