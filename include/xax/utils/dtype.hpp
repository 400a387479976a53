#pragma once
/// \file
/// Floating-point dtypes: the runtime enum, jmp's names, compile-time mappings to scalar types, and the
/// platform's preferred half type.

#include <xax/detail/eigen.hpp>

#include <array>
#include <concepts>
#include <cstddef>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <xax/utils/error.hpp>
#include <xax/utils/platform.hpp>

namespace xax {

using float16 = Eigen::half;
using bfloat16 = Eigen::bfloat16;

// GCC's -Wshadow flags scoped enumerators that share a name with a namespace-scope alias, although a scoped
// enumerator can only be named as DType::float16. The names are the contract, so silence that false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wshadow"
#endif
/// The floating-point types a policy can name.
enum class DType { float16, bfloat16, float32, float64 };
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

/// A floating-point scalar a tree leaf can hold: float, double, xax::float16 or xax::bfloat16.
template <class T>
concept floating_scalar = std::same_as<T, float> || std::same_as<T, double> || std::same_as<T, float16> ||
    std::same_as<T, bfloat16>;

/// A 16-bit floating-point scalar: xax::float16 or xax::bfloat16.
template <class T>
concept half_scalar = std::same_as<T, float16> || std::same_as<T, bfloat16>;

/// The scalar of a leaf kept in full precision when its tree is cast to `T`: float for a 16-bit `T`, `T`
/// otherwise. Declaring a field with it keeps that leaf wide under a 16-bit policy, in the masters, the
/// compute copy, the gradients and checkpoints alike, as Haiku's per-module policies keep norm layers in
/// fp32:
///
///     template <class T>
///     struct Block {
///       Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> w;            // bf16 under a bf16 compute policy
///       Eigen::Matrix<xax::full_precision_t<T>, Eigen::Dynamic, 1> gain;  // stays float
///       XAX_FIELDS(w, gain);
///     };
///
/// The choice is part of the type, so every cast, kernel and checkpoint sees it at compile time.
template <floating_scalar T>
using full_precision_t = std::conditional_t<half_scalar<T>, float, T>;

/// The DType of a floating scalar type, e.g. `dtype_of<bfloat16> == DType::bfloat16`.
template <floating_scalar T>
inline constexpr DType dtype_of = std::same_as<T, float16>    ? DType::float16
                                  : std::same_as<T, bfloat16> ? DType::bfloat16
                                  : std::same_as<T, float>    ? DType::float32
                                                              : DType::float64;

/// The scalar type of a DType, e.g. `scalar_of<DType::float32>` is `float`: the DType's position in the
/// enum picks from the scalars in the same order.
template <DType D>
using scalar_of =
    std::tuple_element_t<static_cast<std::size_t>(D), std::tuple<float16, bfloat16, float, double>>;

/// All dtypes, in enum order.
inline constexpr std::array<DType, 4> all_dtypes{DType::float16, DType::bfloat16, DType::float32,
                                                 DType::float64};

/// The canonical name: "float16", "bfloat16", "float32" or "float64".
constexpr std::string_view dtype_name(DType dtype) {
  switch (dtype) {
    case DType::float16:
      return "float16";
    case DType::bfloat16:
      return "bfloat16";
    case DType::float32:
      return "float32";
    case DType::float64:
      return "float64";
  }
  return "invalid DType";
}

/// Bytes per element.
constexpr std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::float16:
    case DType::bfloat16:
      return 2;
    case DType::float32:
      return 4;
    case DType::float64:
      return 8;
  }
  return 0;
}

/// The half type to prefer on a CPU with these features (DESIGN §5): bf16 where bf16 dot products are native,
/// float16 where only fp16 arithmetic is, bf16 otherwise because of its range.
constexpr DType half_dtype_for(const CpuFeatures& cpu) {
  if (cpu.native_bf16_dot()) return DType::bfloat16;
  if (cpu.native_fp16_math()) return DType::float16;
  return DType::bfloat16;
}

/// The half type to prefer on this machine. See half_dtype_for() and cpu_features().str() for what was found.
inline DType half_dtype() {
  return half_dtype_for(cpu_features());
}

/// Parses jmp's dtype names (case-sensitive): bf16 bfloat16 f16 float16 full f32 float32 f64 float64 half.
/// `half` is half_dtype(); `full` is float32. Throws ConfigError for anything else.
inline DType parse_dtype(std::string_view name) {
  if (name == "bf16" || name == "bfloat16") return DType::bfloat16;
  if (name == "f16" || name == "float16") return DType::float16;
  if (name == "f32" || name == "float32" || name == "full") return DType::float32;
  if (name == "f64" || name == "float64") return DType::float64;
  if (name == "half") return half_dtype();
  throw ConfigError(
      "unknown dtype '" + std::string(name) +
      "'; accepted (case-sensitive): bf16, bfloat16, f16, float16, full, f32, float32, f64, float64, "
      "half");
}

}  // namespace xax
