#pragma once
// Values in error messages, written so that the user sees exactly what was rejected: the one place xax
// turns numbers and shapes into message text.

#include <array>
#include <charconv>
#include <concepts>
#include <cstddef>
#include <string>
#include <system_error>

namespace xax::detail {

/// The shortest text that reads back as exactly `value` in its own type ("0.5", "3.4028235e+38", "inf",
/// "-nan"), where std::to_string would print "0.000000" for a tiny scale. Config fields are doubles, and
/// rounding them to float first would print 1e-50 as 0.
template <std::floating_point Real>
std::string shortest_text(Real value) {
  char buffer[64];
  const auto [end, error] = std::to_chars(buffer, buffer + sizeof buffer, value);
  return error == std::errc{} ? std::string(buffer, end) : std::to_string(value);
}

/// A shape: the extents joined by 'x' ("4x8", "7"), or "scalar" when there are none.
template <class Extents>
std::string shape_string(const Extents& extents) {
  std::string text;
  for (const auto extent : extents) {
    if (!text.empty()) text += 'x';
    text += std::to_string(extent);
  }
  return text.empty() ? std::string("scalar") : text;
}

/// The shape of a matrix, "rows x cols" without the spaces ("4x8").
inline std::string shape_string(std::ptrdiff_t rows, std::ptrdiff_t cols) {
  return shape_string(std::array<std::ptrdiff_t, 2>{rows, cols});
}

}  // namespace xax::detail
