#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <xax/utils/dtype.hpp>

#include "cpu_flags.hpp"

namespace {

TEST(ParseDtype, AcceptsJmpNames) {
  EXPECT_EQ(xax::parse_dtype("bf16"), xax::DType::bfloat16);
  EXPECT_EQ(xax::parse_dtype("bfloat16"), xax::DType::bfloat16);
  EXPECT_EQ(xax::parse_dtype("f16"), xax::DType::float16);
  EXPECT_EQ(xax::parse_dtype("float16"), xax::DType::float16);
  EXPECT_EQ(xax::parse_dtype("full"), xax::DType::float32);
  EXPECT_EQ(xax::parse_dtype("f32"), xax::DType::float32);
  EXPECT_EQ(xax::parse_dtype("float32"), xax::DType::float32);
  EXPECT_EQ(xax::parse_dtype("f64"), xax::DType::float64);
  EXPECT_EQ(xax::parse_dtype("float64"), xax::DType::float64);
  EXPECT_EQ(xax::parse_dtype("half"), xax::half_dtype());
}

TEST(ParseDtype, IsCaseSensitiveAndListsAcceptedNames) {
  for (const char* bad : {"BF16", "Float32", "", " f32", "f32 ", "fp16", "double", "half "}) {
    try {
      (void)xax::parse_dtype(bad);
      FAIL() << "accepted '" << bad << "'";
    } catch (const xax::ConfigError& error) {
      const std::string message = error.what();
      EXPECT_NE(message.find("'" + std::string(bad) + "'"), std::string::npos) << message;
      EXPECT_NE(message.find("bf16, bfloat16, f16, float16, full, f32, float32, f64, float64, half"),
                std::string::npos)
          << message;
    }
  }
}

TEST(ParseDtype, ConfigErrorIsAnXaxError) {
  EXPECT_THROW((void)xax::parse_dtype("int8"), xax::Error);
}

TEST(DtypeName, RoundTripsThroughParse) {
  EXPECT_EQ(xax::dtype_name(xax::DType::float16), "float16");
  EXPECT_EQ(xax::dtype_name(xax::DType::bfloat16), "bfloat16");
  EXPECT_EQ(xax::dtype_name(xax::DType::float32), "float32");
  EXPECT_EQ(xax::dtype_name(xax::DType::float64), "float64");
  for (const xax::DType dtype : xax::all_dtypes) EXPECT_EQ(xax::parse_dtype(xax::dtype_name(dtype)), dtype);
}

TEST(DtypeSize, MatchesScalarSizes) {
  EXPECT_EQ(xax::dtype_size(xax::DType::float16), sizeof(xax::float16));
  EXPECT_EQ(xax::dtype_size(xax::DType::bfloat16), sizeof(xax::bfloat16));
  EXPECT_EQ(xax::dtype_size(xax::DType::float32), sizeof(float));
  EXPECT_EQ(xax::dtype_size(xax::DType::float64), sizeof(double));
}

TEST(HalfDtypeFor, FollowsDesignRules) {
  xax::CpuFeatures none;
  EXPECT_EQ(xax::half_dtype_for(none), xax::DType::bfloat16) << "bf16 for its range when nothing is native";
  xax::CpuFeatures fp16_only;
  fp16_only.avx512_fp16 = true;
  EXPECT_EQ(xax::half_dtype_for(fp16_only), xax::DType::float16);
  xax::CpuFeatures arm_fp16;
  arm_fp16.arm_fp16 = true;
  EXPECT_EQ(xax::half_dtype_for(arm_fp16), xax::DType::float16);
  xax::CpuFeatures both = fp16_only;
  both.avx512_bf16 = true;
  EXPECT_EQ(xax::half_dtype_for(both), xax::DType::bfloat16) << "native bf16 dot products win";
  xax::CpuFeatures amx;
  amx.amx_bf16 = true;
  EXPECT_EQ(xax::half_dtype_for(amx), xax::DType::bfloat16);
}

// What "half" resolves to on this machine, from the flags the operating system reports rather than from
// xax's own detection: a CPU with native bf16 dot products must get bfloat16 whatever else it has, one with
// only native fp16 arithmetic float16, and anything else bfloat16 for its range (HalfDtypeFor checks the
// rule on made-up CPUs; this checks that the rule is fed the right facts).
TEST(HalfDtype, FollowsTheFeaturesTheOperatingSystemReports) {
  const auto flags = xax_test::os_cpu_flags();
  if (!flags) GTEST_SKIP() << "no flags line in /proc/cpuinfo to compare with";
  const auto has = [&](const char* flag) { return flags->contains(flag); };
#if defined(__x86_64__) || defined(__i386__)
  const bool native_bf16 = has("avx512_bf16") || has("amx_bf16");
  const bool native_fp16 = has("avx512_fp16") || has("amx_fp16");
#elif defined(__aarch64__)
  const bool native_bf16 = has("bf16");
  const bool native_fp16 = has("fphp") && has("asimdhp");
#else
  const bool native_bf16 = false;
  const bool native_fp16 = false;
#endif
  const xax::DType expected = native_bf16   ? xax::DType::bfloat16
                              : native_fp16 ? xax::DType::float16
                                            : xax::DType::bfloat16;
  EXPECT_EQ(xax::half_dtype(), expected) << "detected " << xax::cpu_features().str();
  EXPECT_EQ(xax::parse_dtype("half"), expected);
}

template <class T>
class DtypeMapping : public ::testing::Test {};
using Scalars = ::testing::Types<xax::float16, xax::bfloat16, float, double>;
TYPED_TEST_SUITE(DtypeMapping, Scalars);

TYPED_TEST(DtypeMapping, DtypeOfAndScalarOfAreInverse) {
  constexpr xax::DType dtype = xax::dtype_of<TypeParam>;
  static_assert(std::is_same_v<xax::scalar_of<dtype>, TypeParam>);
  EXPECT_EQ(xax::dtype_size(dtype), sizeof(TypeParam));
}

TYPED_TEST(DtypeMapping, RoundTripThroughFloatIsExactForRepresentableValues) {
  for (const float value : {0.0f, -0.0f, 1.0f, -2.5f, 0.125f, 1024.0f}) {
    EXPECT_EQ(static_cast<float>(static_cast<TypeParam>(value)), value);
  }
}

// Both Eigen::half conversion paths (software and F16C) round to nearest even; test_eigen_f16c checks that a
// translation unit compiled for F16C gets the hardware one.
TEST(Float16, ConversionRoundsToNearestEven) {
  // 1 + 2^-11 lies exactly between 1 and the next float16 (1 + 2^-10): ties go to the even mantissa, 1.
  EXPECT_EQ(static_cast<float>(xax::float16(1.0f + 0x1p-11f)), 1.0f);
  EXPECT_EQ(static_cast<float>(xax::float16(1.0f + 3 * 0x1p-11f)), 1.0f + 0x1p-9f);
  EXPECT_EQ(static_cast<float>(xax::float16(65520.0f)), std::numeric_limits<float>::infinity());
}

}  // namespace
