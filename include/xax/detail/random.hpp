#pragma once
// SplitMix64 (Steele, Lea, Flood 2014), the one generator behind xax's initialisers, synthetic data and
// rounding keys. Its output is fixed by its definition, unlike std::uniform_*_distribution and
// std::normal_distribution, whose results differ between standard libraries: initial weights and data
// must not depend on the toolchain.

#include <cmath>
#include <cstdint>
#include <numbers>

namespace xax::detail {

/// SplitMix64's finaliser: a 64-bit bijection with full avalanche, for deriving keys.
constexpr std::uint64_t mix64(std::uint64_t z) noexcept {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

class SplitMix64 {
 public:
  explicit constexpr SplitMix64(std::uint64_t seed) noexcept : state_(seed) {}

  constexpr std::uint64_t next() noexcept { return mix64(state_ += 0x9e3779b97f4a7c15ull); }

  /// Uniform in (0, 1]: never 0, so a logarithm of it stays finite.
  double uniform() noexcept { return (static_cast<double>(next() >> 11) + 1.0) * 0x1.0p-53; }

  /// Uniform on [-bound, bound), from the top 24 bits (every value exact in float).
  float uniform_symmetric(float bound) noexcept {
    const auto unit = static_cast<float>(next() >> 40) * 0x1p-24f;
    return (2.0f * unit - 1.0f) * bound;
  }

  /// Standard normal (Box-Muller, one value per call).
  double normal() noexcept {
    const double radius = std::sqrt(-2.0 * std::log(uniform()));
    return radius * std::cos(2.0 * std::numbers::pi * uniform());
  }

  /// Uniform on [0, bound) for bound >= 1 (modulo bias below 2^-32 for the bounds xax uses).
  int below(int bound) noexcept { return static_cast<int>(next() % static_cast<std::uint64_t>(bound)); }

 private:
  std::uint64_t state_;
};

}  // namespace xax::detail
