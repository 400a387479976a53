#pragma once
// Kernels behind xax/utils/finite.hpp: a fused in-place multiply-and-check over one array, and the driver
// that runs it over every floating leaf of a tree in one parallel pass.
//
// The fused kernel checks the product it stores, not the input: with a loss scale below 1 the unscaling
// multiplies by more than 1 and can itself overflow (PyTorch's check-before-unscale misses that, #99640).
// Finiteness is read from the bits (detail/ieee754.hpp): the kernels return the largest magnitude they saw as
// an integer (the bits of |x|), and a float is inf or NaN exactly when those bits reach 0x7f800000. An
// integer maximum cannot be reassociated or assumed away, and it costs two instructions per vector, hidden
// under the memory traffic. The same maximum also answers "does this overflow once rounded to bf16 or f16?",
// which is how 16-bit leaves are checked without a second look at memory.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>
#include <xax/detail/convert.hpp>
#include <xax/detail/ieee754.hpp>
#include <xax/detail/parallel.hpp>
#include <xax/detail/simd.hpp>
#include <xax/utils/dtype.hpp>

namespace xax::detail {

/// Multiplies x[0, n) by `factor` in place and returns the largest magnitude of the products, as the bits of
/// |product| (0 for n = 0).
using ScaleMagnitudeFunction = std::uint32_t(float* x, std::size_t n, float factor);
/// The largest magnitude in x[0, n), as the bits of |x| (0 for n = 0).
using MagnitudeFunction = std::uint32_t(const float* x, std::size_t n);

/// The smallest float magnitude (as bits) that is not finite once stored as T: inf and NaN for float, and for
/// a 16-bit type every float that rounds to its infinity (from 0x1.ffp127 for bf16, from 65520 for f16).
template <floating_scalar T>
inline constexpr std::uint32_t non_finite_magnitude = std::is_same_v<T, bfloat16>  ? 0x7f7f'8000u
                                                      : std::is_same_v<T, float16> ? 0x477f'f000u
                                                                                   : 0x7f80'0000u;

// ---------------------------------------------------------------------------------------------------------------
// Portable

inline std::uint32_t scale_magnitude_portable(float* x, std::size_t n, float factor) noexcept {
  std::uint32_t largest = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const float product = x[i] * factor;
    x[i] = product;
    largest = std::max(largest, to_bits(product) & 0x7fff'ffffu);
  }
  return largest;
}

inline std::uint32_t magnitude_portable(const float* x, std::size_t n) noexcept {
  std::uint32_t largest = 0;
  for (std::size_t i = 0; i < n; ++i) largest = std::max(largest, to_bits(x[i]) & 0x7fff'ffffu);
  return largest;
}

#if XAX_X86_KERNELS
XAX_SIMD_DIAGNOSTICS_BEGIN

// ---------------------------------------------------------------------------------------------------------------
// AVX-512: 32 floats per iteration, stores aligned to cache lines by a masked head, a masked tail
// (for_each_line_avx512).

// 16 floats, or the `lanes` of them when Masked, multiplied in place by `factor` when Multiply, and their
// largest magnitude folded into `largest`. An unmasked block's store is aligned: for_each_line_avx512 calls
// it on cache lines.
template <bool Multiply, bool Masked>
XAX_TARGET_AVX512 inline __m512i scale_block_avx512(std::conditional_t<Multiply, float*, const float*> x,
                                                    __mmask16 lanes, __m512 factor, __m512i largest) {
  __m512 values = Masked ? _mm512_maskz_loadu_ps(lanes, x) : _mm512_loadu_ps(x);
  if constexpr (Multiply) {
    values = _mm512_mul_ps(values, factor);
    if constexpr (Masked) {
      _mm512_mask_storeu_ps(x, lanes, values);
    } else {
      _mm512_store_ps(x, values);
    }
  }
  // Masked-off lanes are zero, the smallest magnitude.
  return _mm512_max_epu32(largest,
                          _mm512_and_si512(_mm512_castps_si512(values), _mm512_set1_epi32(0x7fff'ffff)));
}

template <bool Multiply>
XAX_TARGET_AVX512 inline std::uint32_t scale_magnitude_avx512_impl(
    std::conditional_t<Multiply, float*, const float*> x, std::size_t n, float factor_value) {
  const __m512 factor = _mm512_set1_ps(factor_value);
  // Two accumulators, so that the maxima of a line's two halves do not wait on each other.
  __m512i largest0 = _mm512_setzero_si512();
  __m512i largest1 = _mm512_setzero_si512();
  for_each_line_avx512<false>(
      x, n,
      [&](std::size_t i, std::size_t count) XAX_TARGET_AVX512 {
        largest0 = scale_block_avx512<Multiply, true>(x + i, low_lanes16(count), factor, largest0);
      },
      [&](std::size_t i) XAX_TARGET_AVX512 {
        largest0 = scale_block_avx512<Multiply, false>(x + i, 0xffff, factor, largest0);
        largest1 = scale_block_avx512<Multiply, false>(x + i + 16, 0xffff, factor, largest1);
      });
  return _mm512_reduce_max_epu32(_mm512_max_epu32(largest0, largest1));
}

XAX_TARGET_AVX512 inline std::uint32_t scale_magnitude_avx512(float* x, std::size_t n, float factor) {
  return scale_magnitude_avx512_impl<true>(x, n, factor);
}

XAX_TARGET_AVX512 inline std::uint32_t magnitude_avx512(const float* x, std::size_t n) {
  return scale_magnitude_avx512_impl<false>(x, n, 1.0f);
}

// ---------------------------------------------------------------------------------------------------------------
// AVX2: 16 floats per iteration, the remainder with the portable loop.

// 8 floats multiplied in place by `factor` when Multiply, and their largest magnitude folded into `largest`.
template <bool Multiply>
XAX_TARGET_AVX2 inline __m256i scale_block_avx2(std::conditional_t<Multiply, float*, const float*> x,
                                                __m256 factor, __m256i largest) {
  __m256 values = _mm256_loadu_ps(x);
  if constexpr (Multiply) {
    values = _mm256_mul_ps(values, factor);
    _mm256_storeu_ps(x, values);
  }
  return _mm256_max_epu32(largest,
                          _mm256_and_si256(_mm256_castps_si256(values), _mm256_set1_epi32(0x7fff'ffff)));
}

template <bool Multiply>
XAX_TARGET_AVX2 inline std::uint32_t scale_magnitude_avx2_impl(
    std::conditional_t<Multiply, float*, const float*> x, std::size_t n, float factor_value) {
  const __m256 factor = _mm256_set1_ps(factor_value);
  __m256i largest0 = _mm256_setzero_si256();
  __m256i largest1 = _mm256_setzero_si256();
  std::uint32_t largest_rest = 0;
  for_each_line_avx2(
      n,
      [&](std::size_t i) XAX_TARGET_AVX2 {
        largest0 = scale_block_avx2<Multiply>(x + i, factor, largest0);
        largest1 = scale_block_avx2<Multiply>(x + i + 8, factor, largest1);
      },
      [&](std::size_t i, std::size_t rest) {
        if constexpr (Multiply) {
          largest_rest = scale_magnitude_portable(x + i, rest, factor_value);
        } else {
          largest_rest = magnitude_portable(x + i, rest);
        }
      });
  alignas(32) std::uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_max_epu32(largest0, largest1));
  return std::max(*std::max_element(lanes, lanes + 8), largest_rest);
}

XAX_TARGET_AVX2 inline std::uint32_t scale_magnitude_avx2(float* x, std::size_t n, float factor) {
  return scale_magnitude_avx2_impl<true>(x, n, factor);
}

XAX_TARGET_AVX2 inline std::uint32_t magnitude_avx2(const float* x, std::size_t n) {
  return scale_magnitude_avx2_impl<false>(x, n, 1.0f);
}

XAX_SIMD_DIAGNOSTICS_END
#endif  // XAX_X86_KERNELS

// ---------------------------------------------------------------------------------------------------------------
// Kernel lists and dispatch

/// Every fused multiply-and-measure kernel for float, best first; the last is portable.
inline std::span<const Kernel<ScaleMagnitudeFunction>> scale_magnitude_kernels() {
  static constexpr Kernel<ScaleMagnitudeFunction> kernels[] = {
#if XAX_X86_KERNELS
    {"avx512", supports_avx512_kernels, scale_magnitude_avx512},
    {"avx2", supports_avx2_kernels, scale_magnitude_avx2},
#endif
    {"portable", supports_portable_kernels, scale_magnitude_portable}
  };
  return kernels;
}

/// Every read-only magnitude kernel for float, best first; the last is portable.
inline std::span<const Kernel<MagnitudeFunction>> magnitude_kernels() {
  static constexpr Kernel<MagnitudeFunction> kernels[] = {
#if XAX_X86_KERNELS
    {"avx512", supports_avx512_kernels, magnitude_avx512},
    {"avx2", supports_avx2_kernels, magnitude_avx2},
#endif
    {"portable", supports_portable_kernels, magnitude_portable}
  };
  return kernels;
}

inline ScaleMagnitudeFunction* best_scale_magnitude_kernel() {
  static ScaleMagnitudeFunction* const kernel =
      best_kernel(scale_magnitude_kernels(), cpu_features_or_detected()).run;
  return kernel;
}

inline MagnitudeFunction* best_magnitude_kernel() {
  static MagnitudeFunction* const kernel = best_kernel(magnitude_kernels(), cpu_features_or_detected()).run;
  return kernel;
}

// ---------------------------------------------------------------------------------------------------------------
// One array of any floating type

/// Elements of a 16-bit array handled per step through a float buffer that stays in L1.
inline constexpr std::size_t half_chunk = 1024;

/// The largest magnitude `measure(buffer, count)` returns over a 16-bit array x[0, n) widened to float
/// half_chunk elements at a time (exact, and mapping the 16-bit infinities and NaNs onto float ones). With
/// WriteBack, each chunk as `measure` left it is rounded back into x: one pass over memory, three over an
/// L1-resident chunk.
template <bool WriteBack, half_scalar T, class Measure>
std::uint32_t largest_through_float(std::conditional_t<WriteBack, T*, const T*> x, std::size_t n,
                                    const Measure& measure) noexcept {
  float buffer[half_chunk];
  std::uint32_t largest = 0;
  for (std::size_t i = 0; i < n; i += half_chunk) {
    const std::size_t count = std::min(half_chunk, n - i);
    convert_serial(x + i, buffer, count);
    largest = std::max(largest, measure(buffer, count));
    if constexpr (WriteBack) convert_serial(buffer, x + i, count);
  }
  return largest;
}

/// True when every element of x[0, n) is finite.
template <floating_scalar T>
bool all_finite_n(const T* x, std::size_t n) noexcept {
  if constexpr (std::is_same_v<T, float>) {
    return best_magnitude_kernel()(x, n) < non_finite_magnitude<float>;
  } else if constexpr (std::is_same_v<T, double>) {
    constexpr auto exponent = ieee754_traits<double>::exponent_mask;
    bool finite = true;
    for (std::size_t i = 0; i < n; ++i) finite &= (to_bits(x[i]) & exponent) != exponent;
    return finite;
  } else {
    return largest_through_float<false, T>(x, n, best_magnitude_kernel()) < non_finite_magnitude<float>;
  }
}

/// Multiplies x[0, n) by `factor` in place and returns whether every stored result is finite. A factor of
/// exactly 1 leaves the memory untouched (and bit-identical) and only checks it. Doubles are multiplied by
/// the factor widened exactly. 16-bit values are widened to float, multiplied and rounded once; the check
/// asks whether the float product rounds to infinity in T, so 65504 * 1.0005 in f16 is caught.
template <floating_scalar T>
bool scale_and_check_n(T* x, std::size_t n, float factor) noexcept {
  if (factor == 1.0f) return all_finite_n<T>(x, n);
  if constexpr (std::is_same_v<T, float>) {
    return best_scale_magnitude_kernel()(x, n, factor) < non_finite_magnitude<float>;
  } else if constexpr (std::is_same_v<T, double>) {
    const double wide_factor = factor;
    for (std::size_t i = 0; i < n; ++i) x[i] *= wide_factor;
    return all_finite_n<double>(x, n);
  } else {
    ScaleMagnitudeFunction* const kernel = best_scale_magnitude_kernel();
    const auto scale = [kernel, factor](float* buffer, std::size_t count) {
      return kernel(buffer, count, factor);
    };
    return largest_through_float<true, T>(x, n, scale) < non_finite_magnitude<T>;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Every floating leaf of a tree in one pass

/// A floating leaf's elements with the type erased, so that one pass can walk leaves of mixed precision.
/// `Void` is `void` for a pass that writes and `const void` for one that only reads.
template <class Void>
struct ErasedLeaf {
  Void* data;
  std::size_t size;
  DType dtype;
};

/// Calls `f(typed_pointer, count)` on elements [begin, end) of `leaf`.
template <class Void, class F>
auto visit_erased(const ErasedLeaf<Void>& leaf, std::size_t begin, std::size_t end, F&& f) {
  constexpr bool writable = !std::is_const_v<Void>;
  const auto typed = [&]<class T>(T*) {
    using Pointer = std::conditional_t<writable, T*, const T*>;
    return f(static_cast<Pointer>(leaf.data) + begin, end - begin);
  };
  switch (leaf.dtype) {
    case DType::float16:
      return typed(static_cast<float16*>(nullptr));
    case DType::bfloat16:
      return typed(static_cast<bfloat16*>(nullptr));
    case DType::float32:
      return typed(static_cast<float*>(nullptr));
    case DType::float64:
      break;
  }
  return typed(static_cast<double*>(nullptr));
}

/// Runs `f(typed_pointer, count) -> bool` over every element of `leaves` in one pass split across threads
/// (parallel_pieces_all), and returns the AND of the results. Every element is visited even after a false
/// result: a pass that writes must leave every leaf processed.
template <class Void, class F>
bool all_over_leaves(std::span<const ErasedLeaf<Void>> leaves, F&& f) {
  const auto extent = [](const ErasedLeaf<Void>& leaf) {
    return ArrayExtent{leaf.size, dtype_size(leaf.dtype)};
  };
  // Pieces of 64 elements keep every thread's stores on whole cache lines.
  return parallel_pieces_all(leaves, extent, 64,
                             [&f](const ErasedLeaf<Void>& leaf, std::size_t begin, std::size_t end) noexcept {
                               return visit_erased(leaf, begin, end, f);
                             });
}

}  // namespace xax::detail
