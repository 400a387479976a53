#pragma once
// Numbers as the console shows them.

#include <cmath>
#include <cstddef>
#include <cstdio>
#include <string>

namespace xax_bench {

/// `value` with `decimals` digits after the point; "n/a" for NaN or infinity.
inline std::string fixed(double value, int decimals) {
  if (!std::isfinite(value)) return "n/a";
  char text[64];
  std::snprintf(text, sizeof text, "%.*f", decimals, value);
  return text;
}

/// Bytes as MiB with one decimal: "12.5 MiB".
inline std::string mib(std::size_t bytes) {
  return fixed(static_cast<double>(bytes) / 1048576.0, 1) + " MiB";
}

/// Bytes as GiB with one decimal: "34.1 GiB". A double, as the estimates of a configuration's memory are.
inline std::string gib(double bytes) {
  return fixed(bytes / (1024.0 * 1024.0 * 1024.0), 1) + " GiB";
}

/// A loss scale in its shortest exact-looking form: 1, 32768, 0.5.
inline std::string scale_text(float scale) {
  char text[32];
  std::snprintf(text, sizeof text, "%g", static_cast<double>(scale));
  return text;
}

}  // namespace xax_bench
