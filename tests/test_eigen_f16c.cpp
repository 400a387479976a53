// Eigen::half conversions in a translation unit compiled for F16C (CMake adds -mf16c where the build machine
// runs it), with xax included before Eigen as users do. Eigen 3.4 only uses _cvtss_sh/_cvtsh_ss when
// EIGEN_HAS_FP16_C is defined, and under GCC it never defines it itself; xax/detail/eigen.hpp does. Without
// it every conversion runs a ~20-instruction software routine, 40 times slower in a half GEMM.
//
// Checking that the macro is defined would only repeat eigen.hpp. What matters is which code Eigen runs, and
// the two paths differ observably on NaNs only: the software routine turns every NaN into the canonical
// quiet NaN 0x7e00 (keeping the sign) and widens a signalling half NaN into a signalling float NaN, while the
// F16C instructions keep the top payload bits and quieten the NaN in both directions. Finite values, ties,
// subnormals and infinities round identically on both paths; they are compared with the instructions too, so
// that a third path (say, a compiler builtin that truncates) fails here as well.
//
// A translation unit that includes Eigen before any xax header is too late for eigen.hpp to change Eigen's
// inline functions and gets the software path; eigen.hpp documents that, so it is not tested here.

#include <xax/utils/dtype.hpp>  // first, so that xax configures Eigen

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

#if defined(__F16C__)

std::uint16_t eigen_half_bits(float value) {
  return std::bit_cast<std::uint16_t>(Eigen::half(value));
}

std::uint32_t eigen_float_bits(std::uint16_t half_bits) {
  return std::bit_cast<std::uint32_t>(static_cast<float>(std::bit_cast<Eigen::half>(half_bits)));
}

TEST(EigenHalf, NarrowsNaNsAsF16cDoesKeepingThePayload) {
  // float NaN bits -> what vcvtps2ph gives: sign kept, quiet bit set, top 9 payload bits kept. The software
  // routine would give 0x7e00 or 0xfe00 for every one of these.
  const std::pair<std::uint32_t, std::uint16_t> cases[] = {
      {0x7f80'2000u, 0x7e01},  // signalling, lowest kept payload bit
      {0xffc0'2000u, 0xfe01},  // quiet, negative
      {0x7fff'e000u, 0x7fff},  // every kept payload bit
      {0xffa0'0000u, 0xff00},  // signalling, top payload bit
  };
  for (const auto& [float_bits, half_bits] : cases) {
    const volatile float nan = std::bit_cast<float>(float_bits);  // volatile: convert at run time
    EXPECT_EQ(eigen_half_bits(nan), half_bits) << std::hex << "float bits 0x" << float_bits;
  }
}

TEST(EigenHalf, WidensSignallingNaNsAsF16cDoesQuietingThem) {
  // The software routine would keep these signalling: 0x7f802000 and 0xffaaa000.
  const volatile std::uint16_t signalling_positive = 0x7c01;
  const volatile std::uint16_t signalling_negative = 0xfd55;
  EXPECT_EQ(eigen_float_bits(signalling_positive), 0x7fc0'2000u);
  EXPECT_EQ(eigen_float_bits(signalling_negative), 0xffea'a000u);
}

TEST(EigenHalf, EveryHalfWidensExactlyAsF16cDoes) {
  for (std::uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const auto half_bits = static_cast<std::uint16_t>(bits);
    const auto hardware = std::bit_cast<std::uint32_t>(_cvtsh_ss(half_bits));
    ASSERT_EQ(eigen_float_bits(half_bits), hardware) << std::hex << "half bits 0x" << bits;
  }
}

TEST(EigenHalf, NarrowsExactlyAsF16cDoes) {
  std::vector<float> values;
  // Every half value, and the midpoints (ties) and near-midpoints on either side of each, which include the
  // subnormal range, the overflow threshold 65520 and the infinities and NaNs.
  for (std::uint32_t bits = 0; bits < 0xffff; ++bits) {
    const float low = _cvtsh_ss(static_cast<std::uint16_t>(bits));
    const float high = _cvtsh_ss(static_cast<std::uint16_t>(bits + 1));
    values.push_back(low);
    const float mid = low / 2 + high / 2;
    values.push_back(mid);
    values.push_back(std::nextafter(mid, low));
    values.push_back(std::nextafter(mid, high));
  }
  // The overflow threshold (halfway between 65504 and the next power of two) and the smallest subnormal's
  // half, which the midpoints above do not reach.
  for (const float edge : {65520.0f, 0x1p-25f}) {
    for (const float value : {edge, std::nextafter(edge, 0.0f), std::nextafter(edge, 1e9f)}) {
      values.push_back(value);
      values.push_back(-value);
    }
  }
  std::mt19937 rng(3);
  std::uniform_int_distribution<std::uint32_t> any_bits;
  for (int i = 0; i < 100'000; ++i) values.push_back(std::bit_cast<float>(any_bits(rng)));
  for (const float value : values) {
    // The vector form: clang's scalar _cvtss_sh macro builds a compound literal, which -Wpedantic refuses.
    const auto hardware = static_cast<std::uint16_t>(
        _mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(value), _MM_FROUND_TO_NEAREST_INT), 0));
    ASSERT_EQ(eigen_half_bits(value), hardware)
        << std::hex << "float bits 0x" << std::bit_cast<std::uint32_t>(value);
  }
}

#else

TEST(EigenHalf, UsesTheF16cInstructions) {
  GTEST_SKIP()
      << "not compiled for F16C: the build machine cannot run F16C instructions or the compiler is not "
         "GCC/Clang on x86 (see tests/CMakeLists.txt)";
}

#endif

}  // namespace
