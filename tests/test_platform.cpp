#include <gtest/gtest.h>

#include <string>
#include <xax/utils/platform.hpp>

namespace {

TEST(CpuFeatures, DetectionIsStable) {
  EXPECT_EQ(&xax::cpu_features(), &xax::cpu_features());
}

TEST(CpuFeatures, DescriptionNamesTheArchitectureAndEveryFeatureFound) {
  xax::CpuFeatures f;
  f.avx512_bf16 = true;
  f.f16c = true;
  const std::string text = f.str();
  EXPECT_NE(text.find("avx512_bf16"), std::string::npos) << text;
  EXPECT_NE(text.find("f16c"), std::string::npos) << text;
  EXPECT_EQ(text.find("avx512_fp16"), std::string::npos) << text;
  EXPECT_NE(xax::CpuFeatures{}.str().find("no half-precision features"), std::string::npos);
}

TEST(CpuFeatures, DerivedPredicates) {
  xax::CpuFeatures f;
  EXPECT_FALSE(f.native_bf16_dot());
  EXPECT_FALSE(f.native_fp16_math());
  f.arm_bf16 = true;
  EXPECT_TRUE(f.native_bf16_dot());
  f = {};
  f.avx512_fp16 = true;
  EXPECT_TRUE(f.native_fp16_math());
}

#if defined(__x86_64__)
TEST(CpuFeatures, AgreesWithTheCompilerWhereTheTargetRequiresAFeature) {
  const xax::CpuFeatures& f = xax::cpu_features();
#if defined(__AVX2__)
  EXPECT_TRUE(f.avx2);
#endif
#if defined(__F16C__)
  EXPECT_TRUE(f.f16c);
#endif
#if defined(__AVX512F__)
  EXPECT_TRUE(f.avx512f);
#endif
#if defined(__AVX512DQ__)
  EXPECT_TRUE(f.avx512dq);
#endif
#if defined(__AVX512BF16__)
  EXPECT_TRUE(f.avx512_bf16);
#endif
  // Dependent features never appear without their base.
  EXPECT_TRUE(!f.avx512_bf16 || f.avx512f);
  EXPECT_TRUE(!f.avx512bw || f.avx512f);
  EXPECT_TRUE(!f.avx512dq || f.avx512f);
}
#endif

}  // namespace
