#include <gtest/gtest.h>

#include <string>
#include <xax/utils/platform.hpp>

#include "cpu_flags.hpp"

namespace {

// Every feature xax detects with cpuid/xgetbv (or hwcaps) against what the kernel reports in /proc/cpuinfo,
// which it derives from cpuid and the register state it enabled: a wrong bit, leaf or XCR0 mask in
// detect_cpu_features() shows up as a disagreement on any machine that has (or lacks) the feature.
TEST(CpuFeatures, AgreeWithTheFlagsTheOperatingSystemReports) {
  const auto flags = xax_test::os_cpu_flags();
  if (!flags) GTEST_SKIP() << "no flags line in /proc/cpuinfo to compare with";
  const auto has = [&](const char* flag) { return flags->contains(flag); };
  const xax::CpuFeatures& f = xax::cpu_features();
  SCOPED_TRACE("detected " + f.str());
#if defined(__x86_64__) || defined(__i386__)
  EXPECT_EQ(f.avx2, has("avx2"));
  EXPECT_EQ(f.fma, has("fma"));
  EXPECT_EQ(f.f16c, has("f16c"));
  EXPECT_EQ(f.avx512f, has("avx512f"));
  EXPECT_EQ(f.avx512bw, has("avx512bw"));
  EXPECT_EQ(f.avx512vl, has("avx512vl"));
  EXPECT_EQ(f.avx512dq, has("avx512dq"));
  EXPECT_EQ(f.avx512_bf16, has("avx512_bf16"));
  EXPECT_EQ(f.avx512_fp16, has("avx512_fp16"));
  EXPECT_EQ(f.amx_bf16, has("amx_bf16"));
  // Kernels before Linux 6.4 do not know amx_fp16 and never list it, so only a listed flag is conclusive.
  if (has("amx_fp16")) {
    EXPECT_TRUE(f.amx_fp16);
  }
#elif defined(__aarch64__)
  EXPECT_EQ(f.arm_fp16, has("fphp") && has("asimdhp"));
  EXPECT_EQ(f.arm_bf16, has("bf16"));
#endif
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// The compiler runtime's own detection (libgcc/compiler-rt, which also checks the OS-enabled XSAVE state),
// for platforms without /proc/cpuinfo.
TEST(CpuFeatures, AgreeWithTheCompilerRuntime) {
  __builtin_cpu_init();
  const xax::CpuFeatures& f = xax::cpu_features();
  SCOPED_TRACE("detected " + f.str());
  EXPECT_EQ(f.avx2, __builtin_cpu_supports("avx2") != 0);
  EXPECT_EQ(f.fma, __builtin_cpu_supports("fma") != 0);
  EXPECT_EQ(f.avx512f, __builtin_cpu_supports("avx512f") != 0);
  EXPECT_EQ(f.avx512bw, __builtin_cpu_supports("avx512bw") != 0);
  EXPECT_EQ(f.avx512vl, __builtin_cpu_supports("avx512vl") != 0);
  EXPECT_EQ(f.avx512dq, __builtin_cpu_supports("avx512dq") != 0);
}
#endif

TEST(CpuFeatures, DetectedOnceAndTheSameWhenDetectedAgain) {
  EXPECT_EQ(xax::cpu_features(),
            xax::cap_cpu_features(xax::detail::detect_cpu_features(), xax::max_cpu_isa()));
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
