#pragma once
// Numbers in error messages, written so that the user sees exactly the value that was rejected.

#include <charconv>
#include <string>
#include <system_error>

namespace xax::detail {

/// The shortest text that reads back as exactly `value` ("0.5", "3.4028235e+38", "inf", "-nan"), where
/// std::to_string would print "0.000000" for a tiny scale.
inline std::string shortest_text(float value) {
  char buffer[32];
  const auto [end, error] = std::to_chars(buffer, buffer + sizeof buffer, value);
  return error == std::errc{} ? std::string(buffer, end) : std::to_string(value);
}

/// The same for a double: "1e-09" rather than std::to_string's "0.000000".
inline std::string shortest_text(double value) {
  char buffer[32];
  const auto [end, error] = std::to_chars(buffer, buffer + sizeof buffer, value);
  return error == std::errc{} ? std::string(buffer, end) : std::to_string(value);
}

}  // namespace xax::detail
