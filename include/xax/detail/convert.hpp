#pragma once
// Element-wise conversions between xax's floating scalars: the bit-exact reference, the SIMD kernels, and
// convert_n, which every xax cast goes through.
//
// Rounding is Eigen's: to nearest, ties to even; overflow goes to infinity (a float of 65520 or more becomes
// an f16 infinity); subnormals are rounded, never flushed. NaN follows one rule for both 16-bit types,
// whatever the build flags or the CPU:
//   - narrowing (float -> bf16/f16) gives the target's quiet NaN with the sign kept and the payload dropped:
//     Eigen's rule for bf16 (0x7fc0 | sign) and its portable rule for f16 (0x7e00 | sign);
//   - widening (bf16/f16 -> float) is exact, payload and signalling bit included: Eigen's bf16 rule and its
//     portable f16 rule.
// Eigen's own Eigen::half conversions switch to F16C instructions when EIGEN_HAS_FP16_C is defined (xax's
// eigen.hpp defines it under GCC with -mf16c); those keep the top payload bits when narrowing and quiet
// signalling NaNs when widening. xax's kernels correct exactly those lanes, so a cast gives the same bits in
// every build. Only NaN payloads are concerned: every other value rounds identically on both Eigen paths.
//
// The bit functions below are the reference; convert_portable applies them one element at a time and the
// tests hold every SIMD kernel bit-identical to it. The SIMD kernels are chosen at run time (detail/simd.hpp)
// and none of them depends on MXCSR: rounding is fixed to nearest-even and FTZ/DAZ are ignored.

#include <xax/detail/eigen.hpp>

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <type_traits>
#include <vector>
#include <xax/detail/ieee754.hpp>
#include <xax/detail/parallel.hpp>
#include <xax/detail/simd.hpp>
#include <xax/utils/dtype.hpp>

namespace xax::detail {

// ---------------------------------------------------------------------------------------------------------------
// The reference, on bits. Integer-only, so that it is exact under any MXCSR rounding or flush mode.

/// float -> bf16 bits: round to nearest even (Eigen's float_to_bfloat16_rtne); NaN -> 0x7fc0 | sign.
constexpr std::uint16_t float_to_bfloat16_bits(float value) noexcept {
  const auto bits = std::bit_cast<std::uint32_t>(value);
  if ((bits & 0x7fff'ffffu) > 0x7f80'0000u)
    return static_cast<std::uint16_t>(((bits >> 16) & 0x8000u) | 0x7fc0u);
  // Adding 0x7fff plus the bit that becomes the last kept one carries into the kept bits exactly when the
  // dropped half is above one half ulp, or equal to it with an odd kept part. Infinity has no dropped bits.
  return static_cast<std::uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/// bf16 bits -> float: exact (bf16 is the upper half of a float).
constexpr float bfloat16_bits_to_float(std::uint16_t bits) noexcept {
  return std::bit_cast<float>(std::uint32_t{bits} << 16);
}

/// float -> f16 bits: round to nearest even (Eigen's float_to_half_rtne); overflow -> inf; NaN -> 0x7e00 |
/// sign.
constexpr std::uint16_t float_to_half_bits(float value) noexcept {
  const auto bits = std::bit_cast<std::uint32_t>(value);
  const auto sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
  const std::uint32_t magnitude = bits & 0x7fff'ffffu;
  if (magnitude > 0x7f80'0000u) return static_cast<std::uint16_t>(sign | 0x7e00u);
  if (magnitude >= 0x4780'0000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // >= 65536, or inf
  if (magnitude >= 0x3880'0000u) {
    // A normal f16 (>= 2^-14): rebias the exponent from 127 to 15 and round away the low 13 mantissa bits as
    // in float_to_bfloat16_bits. A carry out of the mantissa correctly bumps the exponent, up to infinity
    // for [65520, 65536).
    const std::uint32_t rebiased = magnitude - 0x3800'0000u;
    return static_cast<std::uint16_t>(sign | ((rebiased + 0x0fffu + ((rebiased >> 13) & 1u)) >> 13));
  }
  // A subnormal f16 or zero: the result counts units of 2^-24. Below 2^-25 everything rounds to zero, and
  // 2^-25 itself ties to the even zero.
  const std::uint32_t exponent = magnitude >> 23;
  if (exponent < 102) return sign;
  const std::uint32_t mantissa = (magnitude & 0x007f'ffffu) | 0x0080'0000u;
  const std::uint32_t shift = 126 - exponent;  // 14..24
  const std::uint32_t kept = mantissa >> shift;
  const std::uint32_t dropped = mantissa & ((1u << shift) - 1u);
  const std::uint32_t half_ulp = 1u << (shift - 1);
  const std::uint32_t round_up = (dropped > half_ulp || (dropped == half_ulp && (kept & 1u) != 0)) ? 1u : 0u;
  return static_cast<std::uint16_t>(sign | (kept + round_up));
}

/// f16 bits -> float: exact; infinities and NaNs keep their payload and signalling bit (Eigen's
/// half_to_float).
constexpr float half_bits_to_float(std::uint16_t bits) noexcept {
  const std::uint32_t sign = std::uint32_t{bits & 0x8000u} << 16;
  const std::uint32_t exponent = (bits >> 10) & 0x1fu;
  const std::uint32_t mantissa = bits & 0x03ffu;
  if (exponent == 0x1f) return std::bit_cast<float>(sign | 0x7f80'0000u | (mantissa << 13));
  if (exponent != 0) return std::bit_cast<float>(sign | ((exponent + 112) << 23) | (mantissa << 13));
  if (mantissa == 0) return std::bit_cast<float>(sign);
  // A subnormal f16 is mantissa * 2^-24: a normal float whose leading one moves into the implicit bit.
  const auto leading = static_cast<std::uint32_t>(std::bit_width(mantissa) - 1);  // 0..9
  return std::bit_cast<float>(sign | ((leading + 103) << 23) | ((mantissa << (23 - leading)) & 0x007f'ffffu));
}

/// One element, with the rounding and NaN rule above. Conversions between the two 16-bit types and from
/// double to a 16-bit type go through float, as Eigen's do.
template <class To, class From>
constexpr To convert_scalar(From value) noexcept {
  if constexpr (std::is_same_v<To, From>) {
    return value;
  } else if constexpr (std::is_same_v<From, bfloat16>) {
    return convert_scalar<To>(bfloat16_bits_to_float(std::bit_cast<std::uint16_t>(value)));
  } else if constexpr (std::is_same_v<From, float16>) {
    return convert_scalar<To>(half_bits_to_float(std::bit_cast<std::uint16_t>(value)));
  } else if constexpr (std::is_same_v<To, bfloat16>) {
    return std::bit_cast<bfloat16>(float_to_bfloat16_bits(static_cast<float>(value)));
  } else if constexpr (std::is_same_v<To, float16>) {
    return std::bit_cast<float16>(float_to_half_bits(static_cast<float>(value)));
  } else {
    return static_cast<To>(value);
  }
}

/// The reference conversion: convert_scalar on every element.
template <class From, class To>
void convert_portable(const From* src, To* dst, std::size_t n) noexcept {
  if constexpr (std::is_same_v<From, To>) {
    if (n != 0) std::memcpy(dst, src, n * sizeof(From));
  } else {
    for (std::size_t i = 0; i < n; ++i) dst[i] = convert_scalar<To>(src[i]);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// SIMD kernels. Each converts n elements, any n, any alignment. The AVX-512 ones align their stores to cache
// lines with a masked head and finish with a masked tail (for_each_line_avx512); the AVX2 ones finish with
// the reference.

#if XAX_X86_KERNELS
XAX_SIMD_DIAGNOSTICS_BEGIN

/// for_each_line_avx512 for a conversion src -> dst: `Masked(src, dst, count)` converts count <= 16 elements
/// with masked loads and stores, `whole(i)` converts the 32 from i, whose stores fill whole cache lines of
/// dst. `whole` is passed on unwrapped: GCC inlines an operation needing more than this function's target
/// (the AVX512_BF16 one) only when it is called directly from the loop.
template <bool Streaming, auto Masked, class From, class To, class Whole>
[[gnu::always_inline]] XAX_TARGET_AVX512 inline void convert_lines_avx512(const From* src, To* dst,
                                                                          std::size_t n, Whole&& whole) {
  for_each_line_avx512<Streaming>(
      dst, n, [=](std::size_t i, std::size_t count) XAX_TARGET_AVX512 { Masked(src + i, dst + i, count); },
      whole);
}

/// for_each_line_avx2 for a conversion src -> dst: `whole(i)` converts the 16 elements from i, the reference
/// the rest.
template <class From, class To, class Whole>
[[gnu::always_inline]] XAX_TARGET_AVX2 inline void convert_lines_avx2(const From* src, To* dst, std::size_t n,
                                                                      Whole&& whole) {
  for_each_line_avx2(n, whole,
                     [=](std::size_t i, std::size_t rest) { convert_portable(src + i, dst + i, rest); });
}

// vfpclassps categories.
inline constexpr int fpclass_nan = 0x01 | 0x80;  // quiet | signalling
inline constexpr int fpclass_subnormal = 0x20;

// --- float -> bf16 ---

// 16 floats rounded to bf16 with the reference rule; each result is in the upper half of its 32-bit lane.
XAX_TARGET_AVX512 inline __m512i bfloat16_round_avx512(__m512 values) {
  const __m512i bits = _mm512_castps_si512(values);
  const __mmask16 nan = _mm512_fpclass_ps_mask(values, fpclass_nan);
  const __m512i last_kept = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), last_kept);
  // (bits & sign) | 0x7fc0'0000: the sign and a quiet NaN with no payload, in one ternary-logic op.
  const __m512i quiet =
      _mm512_ternarylogic_epi32(bits, _mm512_set1_epi32(INT32_MIN), _mm512_set1_epi32(0x7fc0'0000), 0xea);
  return _mm512_mask_mov_epi32(rounded, nan, quiet);
}

// The upper halves of the 32 lanes of two vectors, in order: the 32 bf16 results of bfloat16_round_avx512.
XAX_TARGET_AVX512 inline __m512i upper_halves_avx512(__m512i low, __m512i high) {
  const __m512i odd_words = _mm512_set_epi32(
      0x003f'003d, 0x003b'0039, 0x0037'0035, 0x0033'0031, 0x002f'002d, 0x002b'0029, 0x0027'0025, 0x0023'0021,
      0x001f'001d, 0x001b'0019, 0x0017'0015, 0x0013'0011, 0x000f'000d, 0x000b'0009, 0x0007'0005, 0x0003'0001);
  return _mm512_permutex2var_epi16(low, odd_words, high);
}

// Up to 16 elements, masked.
XAX_TARGET_AVX512 inline void float_to_bfloat16_masked_avx512(const float* src, bfloat16* dst,
                                                              std::size_t count) {
  const __mmask16 lanes = low_lanes16(count);
  const __m512i rounded = bfloat16_round_avx512(_mm512_maskz_loadu_ps(lanes, src));
  _mm512_mask_cvtepi32_storeu_epi16(dst, lanes, _mm512_srli_epi32(rounded, 16));
}

template <bool Streaming>
XAX_TARGET_AVX512 inline void float_to_bfloat16_avx512(const float* src, bfloat16* dst, std::size_t n) {
  convert_lines_avx512<Streaming, float_to_bfloat16_masked_avx512>(
      src, dst, n, [=](std::size_t i) XAX_TARGET_AVX512 {
        const __m512i low = bfloat16_round_avx512(_mm512_loadu_ps(src + i));
        const __m512i high = bfloat16_round_avx512(_mm512_loadu_ps(src + i + 16));
        store_line<Streaming>(dst + i, upper_halves_avx512(low, high));
      });
}

// The bf16 instruction rounds like the reference except on NaNs (it keeps payload bits) and subnormals (it
// flushes them to zero). One vfpclassps per vector spots those lanes; a block holding any (rare in practice)
// takes the integer rounding instead. vfpclassps sees subnormals as zeros when MXCSR.DAZ is set (as training
// code sometimes does for speed), so then the integer rounding does all the work.
template <bool Streaming>
XAX_TARGET_AVX512_BF16 inline void float_to_bfloat16_avx512_bf16(const float* src, bfloat16* dst,
                                                                 std::size_t n) {
  constexpr unsigned denormals_are_zero = 0x40;
  if ((_mm_getcsr() & denormals_are_zero) != 0) return float_to_bfloat16_avx512<Streaming>(src, dst, n);
  convert_lines_avx512<Streaming, float_to_bfloat16_masked_avx512>(
      src, dst, n, [=](std::size_t i) XAX_TARGET_AVX512_BF16 {
        const __m512 low = _mm512_loadu_ps(src + i);
        const __m512 high = _mm512_loadu_ps(src + i + 16);
        const __mmask16 low_differs = _mm512_fpclass_ps_mask(low, fpclass_nan | fpclass_subnormal);
        const __mmask16 high_differs = _mm512_fpclass_ps_mask(high, fpclass_nan | fpclass_subnormal);
        __m512i converted;
        if (_kortestz_mask16_u8(low_differs, high_differs) != 0) {
          const __m512bh instruction = _mm512_cvtne2ps_pbh(high, low);
          std::memcpy(&converted, &instruction, sizeof converted);
        } else {
          converted = upper_halves_avx512(bfloat16_round_avx512(low), bfloat16_round_avx512(high));
        }
        store_line<Streaming>(dst + i, converted);
      });
}

XAX_TARGET_AVX2 inline __m256i bfloat16_round_avx2(__m256i bits) {
  const __m256i magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(0x7fff'ffff));
  // Signed compare is safe: the magnitude has no sign bit.
  const __m256i nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7f80'0000));
  const __m256i last_kept = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), last_kept), 16);
  const __m256i quiet = _mm256_or_si256(
      _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x8000)), _mm256_set1_epi32(0x7fc0));
  return _mm256_blendv_epi8(rounded, quiet, nan);
}

XAX_TARGET_AVX2 inline void float_to_bfloat16_avx2(const float* src, bfloat16* dst, std::size_t n) {
  convert_lines_avx2(src, dst, n, [=](std::size_t i) XAX_TARGET_AVX2 {
    const __m256i low = bfloat16_round_avx2(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
    const __m256i high =
        bfloat16_round_avx2(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 8)));
    // packus interleaves 128-bit lanes (low0 high0 low1 high1); the permute restores element order.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(low, high), 0b11'01'10'00);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), packed);
  });
}

// --- bf16 -> float ---

// Word i of `halves` into the upper half of 32-bit lane i, lower halves zero: 16 floats in one vpermw.
XAX_TARGET_AVX512 inline __m512i bfloat16_widen_avx512(__m512i halves, __m512i word_index) {
  return _mm512_maskz_permutexvar_epi16(0xaaaa'aaaa, word_index, halves);
}

XAX_TARGET_AVX512 inline __m512i bfloat16_low_words_index() {
  return _mm512_set_epi32(0x000f'0000, 0x000e'0000, 0x000d'0000, 0x000c'0000, 0x000b'0000, 0x000a'0000,
                          0x0009'0000, 0x0008'0000, 0x0007'0000, 0x0006'0000, 0x0005'0000, 0x0004'0000,
                          0x0003'0000, 0x0002'0000, 0x0001'0000, 0x0000'0000);
}

XAX_TARGET_AVX512 inline void bfloat16_to_float_masked_avx512(const bfloat16* src, float* dst,
                                                              std::size_t count) {
  const __mmask16 lanes = low_lanes16(count);
  const __m512i halves = _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(lanes, src));
  _mm512_mask_storeu_epi32(dst, lanes, bfloat16_widen_avx512(halves, bfloat16_low_words_index()));
}

XAX_TARGET_AVX512 inline void bfloat16_to_float_avx512(const bfloat16* src, float* dst, std::size_t n) {
  const __m512i low_words = bfloat16_low_words_index();
  const __m512i high_words = _mm512_add_epi16(low_words, _mm512_set1_epi32(0x0010'0000));
  convert_lines_avx512<false, bfloat16_to_float_masked_avx512>(
      src, dst, n, [=](std::size_t i) XAX_TARGET_AVX512 {
        const __m512i halves = _mm512_loadu_si512(src + i);
        store_line<false>(dst + i, bfloat16_widen_avx512(halves, low_words));
        store_line<false>(dst + i + 16, bfloat16_widen_avx512(halves, high_words));
      });
}

/// The eight bf16 in `halves` as floats: exact, each bf16 the upper half of its float's bits.
XAX_TARGET_AVX2 inline __m256 bfloat16_to_float_avx2_lanes(__m128i halves) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}

XAX_TARGET_AVX2 inline void bfloat16_to_float_avx2(const bfloat16* src, float* dst, std::size_t n) {
  convert_lines_avx2(src, dst, n, [=](std::size_t i) XAX_TARGET_AVX2 {
    _mm256_storeu_ps(
        dst + i, bfloat16_to_float_avx2_lanes(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
    _mm256_storeu_ps(dst + i + 8, bfloat16_to_float_avx2_lanes(
                                      _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 8))));
  });
}

// --- float -> f16 ---

XAX_TARGET_AVX512 inline __m256i float_to_half_instruction_avx512(__m512 values) {
  // The all-lanes mask form: GCC's unmasked _mm512_cvtps_ph macro trips -Wsign-conversion without
  // optimisation.
  return _mm512_mask_cvtps_ph(_mm256_setzero_si256(), static_cast<__mmask16>(0xffff), values,
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// vcvtps2ph rounds like the reference but keeps the top 9 payload bits of a NaN, where the reference keeps
// none (0x7e00 | sign): clears them in the `nan` lanes.
XAX_TARGET_AVX512 inline __m256i half_canonical_nans_avx512(__m256i halves, __mmask16 nan) {
  return _mm256_mask_blend_epi16(nan, halves,
                                 _mm256_and_si256(halves, _mm256_set1_epi16(INT16_MIN | 0x7e00)));
}

XAX_TARGET_AVX512 inline void float_to_half_masked_avx512(const float* src, float16* dst, std::size_t count) {
  const __mmask16 lanes = low_lanes16(count);
  const __m512 values = _mm512_maskz_loadu_ps(lanes, src);
  const __m256i halves = half_canonical_nans_avx512(float_to_half_instruction_avx512(values),
                                                    _mm512_fpclass_ps_mask(values, fpclass_nan));
  _mm256_mask_storeu_epi16(dst, lanes, halves);
}

template <bool Streaming>
XAX_TARGET_AVX512 inline void float_to_half_avx512(const float* src, float16* dst, std::size_t n) {
  convert_lines_avx512<Streaming, float_to_half_masked_avx512>(
      src, dst, n, [=](std::size_t i) XAX_TARGET_AVX512 {
        const __m512 low = _mm512_loadu_ps(src + i);
        const __m512 high = _mm512_loadu_ps(src + i + 16);
        const __mmask16 low_nan = _mm512_fpclass_ps_mask(low, fpclass_nan);
        const __mmask16 high_nan = _mm512_fpclass_ps_mask(high, fpclass_nan);
        __m256i low_halves = float_to_half_instruction_avx512(low);
        __m256i high_halves = float_to_half_instruction_avx512(high);
        // NaNs are rare: only a block holding one pays for the correction.
        if (_kortestz_mask16_u8(low_nan, high_nan) == 0) {
          low_halves = half_canonical_nans_avx512(low_halves, low_nan);
          high_halves = half_canonical_nans_avx512(high_halves, high_nan);
        }
        store_line<Streaming>(dst + i,
                              _mm512_inserti64x4(_mm512_castsi256_si512(low_halves), high_halves, 1));
      });
}

XAX_TARGET_AVX2 inline __m128i float_to_half_avx2_lanes(__m256 values) {
  const __m128i halves = _mm256_cvtps_ph(values, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m128i magnitude = _mm_and_si128(halves, _mm_set1_epi16(0x7fff));
  const __m128i nan = _mm_cmpgt_epi16(magnitude, _mm_set1_epi16(0x7c00));  // signed is safe: no sign bit
  return _mm_blendv_epi8(halves, _mm_and_si128(halves, _mm_set1_epi16(INT16_MIN | 0x7e00)), nan);
}

XAX_TARGET_AVX2 inline void float_to_half_avx2(const float* src, float16* dst, std::size_t n) {
  convert_lines_avx2(src, dst, n, [=](std::size_t i) XAX_TARGET_AVX2 {
    const __m128i low = float_to_half_avx2_lanes(_mm256_loadu_ps(src + i));
    const __m128i high = float_to_half_avx2_lanes(_mm256_loadu_ps(src + i + 8));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_set_m128i(high, low));
  });
}

// --- f16 -> float ---

// vcvtph2ps widens exactly but quiets signalling NaNs (sets bit 22), where the reference keeps them
// signalling: clears the bit again in the `signalling` lanes.
XAX_TARGET_AVX512 inline __m512 keep_signalling_nans_avx512(__m512 widened, __mmask16 signalling) {
  const __m512i bits = _mm512_castps_si512(widened);
  return _mm512_castsi512_ps(_mm512_mask_and_epi32(bits, signalling, bits, _mm512_set1_epi32(~0x0040'0000)));
}

// The f16 signalling NaNs among 32 halves: magnitudes 0x7c01..0x7dff.
XAX_TARGET_AVX512 inline __mmask32 half_signalling_nans_avx512(__m512i halves) {
  const __m512i offset =
      _mm512_sub_epi16(_mm512_and_si512(halves, _mm512_set1_epi16(0x7fff)), _mm512_set1_epi16(0x7c01));
  return _mm512_cmplt_epu16_mask(offset, _mm512_set1_epi16(0x01ff));
}

XAX_TARGET_AVX512 inline void half_to_float_masked_avx512(const float16* src, float* dst, std::size_t count) {
  const __mmask16 lanes = low_lanes16(count);
  const __m256i halves = _mm256_maskz_loadu_epi16(lanes, src);
  const auto signalling = static_cast<__mmask16>(half_signalling_nans_avx512(_mm512_castsi256_si512(halves)));
  _mm512_mask_storeu_ps(dst, lanes, keep_signalling_nans_avx512(_mm512_cvtph_ps(halves), signalling));
}

XAX_TARGET_AVX512 inline void half_to_float_avx512(const float16* src, float* dst, std::size_t n) {
  convert_lines_avx512<false, half_to_float_masked_avx512>(src, dst, n, [=](std::size_t i) XAX_TARGET_AVX512 {
    const __m512i halves = _mm512_loadu_si512(src + i);
    const __mmask32 signalling = half_signalling_nans_avx512(halves);
    __m512 low = _mm512_cvtph_ps(_mm512_castsi512_si256(halves));
    __m512 high = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(halves, 1));
    // Signalling NaNs are rare: only a block holding one pays for the correction.
    if (_kortestz_mask32_u8(signalling, 0) == 0) {
      low = keep_signalling_nans_avx512(low, static_cast<__mmask16>(signalling));
      high = keep_signalling_nans_avx512(high, static_cast<__mmask16>(signalling >> 16));
    }
    store_line<false>(dst + i, _mm512_castps_si512(low));
    store_line<false>(dst + i + 16, _mm512_castps_si512(high));
  });
}

XAX_TARGET_AVX2 inline __m256 half_to_float_avx2_lanes(__m128i halves) {
  const __m256 widened = _mm256_cvtph_ps(halves);
  const __m128i magnitude = _mm_and_si128(halves, _mm_set1_epi16(0x7fff));
  const __m128i signalling = _mm_and_si128(_mm_cmpgt_epi16(magnitude, _mm_set1_epi16(0x7c00)),
                                           _mm_cmplt_epi16(magnitude, _mm_set1_epi16(0x7e00)));
  const __m256i quiet_bit =
      _mm256_and_si256(_mm256_cvtepi16_epi32(signalling), _mm256_set1_epi32(0x0040'0000));
  return _mm256_castsi256_ps(_mm256_andnot_si256(quiet_bit, _mm256_castps_si256(widened)));
}

XAX_TARGET_AVX2 inline void half_to_float_avx2(const float16* src, float* dst, std::size_t n) {
  convert_lines_avx2(src, dst, n, [=](std::size_t i) XAX_TARGET_AVX2 {
    _mm256_storeu_ps(dst + i,
                     half_to_float_avx2_lanes(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
    _mm256_storeu_ps(dst + i + 8, half_to_float_avx2_lanes(
                                      _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 8))));
  });
}

XAX_SIMD_DIAGNOSTICS_END
#endif  // XAX_X86_KERNELS

// ---------------------------------------------------------------------------------------------------------------
// Kernel lists and dispatch

template <class From, class To>
using ConvertFunction = void(const From*, To*, std::size_t);

/// A pair of types with SIMD kernels of its own: float to or from a 16-bit type.
template <class From, class To>
inline constexpr bool has_direct_kernels = (std::is_same_v<From, float> && half_scalar<To>) ||
                                           (half_scalar<From> && std::is_same_v<To, float>);

/// Every kernel converting From to To, best first; the last is convert_portable. The AVX-512 narrowing
/// kernels also come in a streaming-store form for destinations far larger than the caches: over 64 Mi floats
/// on Zen 5 it measured 15-20 % faster than regular stores (and faster than a plain copy with regular
/// stores). Widening measured no faster with streaming stores, so it has none.
template <class From, class To>
std::span<const Kernel<ConvertFunction<From, To>>> convert_kernels() {
  using K = Kernel<ConvertFunction<From, To>>;
#if XAX_X86_KERNELS
  if constexpr (std::is_same_v<From, float> && std::is_same_v<To, bfloat16>) {
    static constexpr K kernels[] = {
        {"avx512_bf16", supports_avx512_bf16_kernels, float_to_bfloat16_avx512_bf16<false>,
         float_to_bfloat16_avx512_bf16<true>},
        {"avx512", supports_avx512_kernels, float_to_bfloat16_avx512<false>, float_to_bfloat16_avx512<true>},
        {"avx2", supports_avx2_kernels, float_to_bfloat16_avx2},
        {"portable", supports_portable_kernels, convert_portable<From, To>}};
    return kernels;
  } else if constexpr (std::is_same_v<From, bfloat16> && std::is_same_v<To, float>) {
    static constexpr K kernels[] = {{"avx512", supports_avx512_kernels, bfloat16_to_float_avx512},
                                    {"avx2", supports_avx2_kernels, bfloat16_to_float_avx2},
                                    {"portable", supports_portable_kernels, convert_portable<From, To>}};
    return kernels;
  } else if constexpr (std::is_same_v<From, float> && std::is_same_v<To, float16>) {
    static constexpr K kernels[] = {
        {"avx512", supports_avx512_kernels, float_to_half_avx512<false>, float_to_half_avx512<true>},
        {"avx2", supports_avx2_kernels, float_to_half_avx2},
        {"portable", supports_portable_kernels, convert_portable<From, To>}};
    return kernels;
  } else if constexpr (std::is_same_v<From, float16> && std::is_same_v<To, float>) {
    static constexpr K kernels[] = {{"avx512", supports_avx512_kernels, half_to_float_avx512},
                                    {"avx2", supports_avx2_kernels, half_to_float_avx2},
                                    {"portable", supports_portable_kernels, convert_portable<From, To>}};
    return kernels;
  }
#endif
  static constexpr K kernels[] = {{"portable", supports_portable_kernels, convert_portable<From, To>}};
  return kernels;
}

/// A pass writing at least this many bytes uses streaming stores where the kernel has them: such a
/// destination cannot stay in a last-level cache (32 MiB per CCD on Zen 4/5) anyway, and bypassing the cache
/// saves reading every destination line before overwriting it. Smaller casts, such as the compute copy of a
/// model's parameters that the next matmul reads, keep their result in cache.
inline constexpr std::size_t streaming_store_min_bytes = std::size_t{32} << 20;

/// The fastest kernel this CPU runs for From -> To, chosen once per process, in its streaming form if asked.
template <class From, class To>
ConvertFunction<From, To>* best_convert_kernel(bool streaming = false) {
  static const Kernel<ConvertFunction<From, To>>& kernel =
      best_kernel(convert_kernels<From, To>(), cpu_features_or_detected());
  return streaming && kernel.run_streaming != nullptr ? kernel.run_streaming : kernel.run;
}

/// Converts on the calling thread. Pairs without kernels of their own (between the two 16-bit types, and
/// between double and a 16-bit type) go through float in cache-sized chunks, so they round exactly as
/// convert_scalar does and still use the float kernels.
template <class From, class To>
void convert_serial(const From* src, To* dst, std::size_t n, bool streaming = false) noexcept {
  if constexpr (std::is_same_v<From, To> || !(half_scalar<From> || half_scalar<To>) ||
                has_direct_kernels<From, To>) {
    best_convert_kernel<From, To>(streaming)(src, dst, n);
  } else {
    constexpr std::size_t chunk = 1024;
    float buffer[chunk];
    for (std::size_t i = 0; i < n; i += chunk) {
      const std::size_t count = std::min(chunk, n - i);
      convert_serial(src + i, buffer, count);
      convert_serial(buffer, dst + i, count);
    }
  }
}

/// The conversion every xax cast goes through: the fastest bit-identical kernel, split across xax's threads
/// when the array is large.
template <class From, class To>
void convert_n(const From* src, To* dst, std::size_t n) {
  const bool streaming = n * sizeof(To) >= streaming_store_min_bytes;
  // Blocks of 64 elements keep every thread's stores on whole cache lines.
  parallel_blocks(n, sizeof(From) + sizeof(To), 64, [=](std::size_t begin, std::size_t end) noexcept {
    convert_serial(src + begin, dst + begin, end - begin, streaming);
  });
}

/// Conversions of many arrays, such as the leaves of a tree cast, collected and then run as one pass: one
/// fork/join for the whole tree, threads split by bytes (parallel_pieces_all).
class ConversionBatch {
 public:
  /// Records the conversion of src[0, n) into dst[0, n); both must stay valid until run().
  template <class From, class To>
  void add(const From* src, To* dst, std::size_t n) {
    if (n == 0) return;
    if constexpr (std::is_same_v<From, To>) {
      if (static_cast<const void*>(src) == static_cast<const void*>(dst)) return;
    }
    jobs_.push_back(
        {src, dst, ArrayExtent{n, sizeof(From) + sizeof(To)}, n * sizeof(To), &convert_piece<From, To>});
  }

  /// Forgets every recorded conversion, keeping the storage.
  void clear() { jobs_.clear(); }

  /// One recorded conversion.
  struct Job {
    const void* src;
    void* dst;
    ArrayExtent extent;
    std::size_t destination_bytes;
    void (*convert)(const void*, void*, std::size_t, std::size_t, bool) noexcept;

    /// Converts elements [begin, end) of this job on the calling thread.
    void convert_range(std::size_t begin, std::size_t end, bool streaming = false) const noexcept {
      convert(src, dst, begin, end, streaming);
    }
  };

  /// The recorded conversions in the order they were added, for a pass that does more with each piece while
  /// it is in cache (unscale_check_and_norm_into).
  [[nodiscard]] std::span<const Job> jobs() const { return jobs_; }

  /// Converts everything recorded.
  void run() const {
    std::size_t written = 0;
    for (const Job& job : jobs_) written += job.destination_bytes;
    const bool streaming = written >= streaming_store_min_bytes;
    const auto extent = [](const Job& job) { return job.extent; };
    // Pieces of 64 elements keep every thread's stores on whole cache lines.
    parallel_pieces_all(std::span<const Job>(jobs_), extent, 64,
                        [streaming](const Job& job, std::size_t begin, std::size_t end) noexcept {
                          job.convert_range(begin, end, streaming);
                          return true;
                        });
  }

 private:
  template <class From, class To>
  static void convert_piece(const void* src, void* dst, std::size_t begin, std::size_t end,
                            bool streaming) noexcept {
    convert_serial(static_cast<const From*>(src) + begin, static_cast<To*>(dst) + begin, end - begin,
                   streaming);
  }

  std::vector<Job> jobs_;
};

}  // namespace xax::detail
