// Dispatch by capability (issue 12): XAX_MAX_CPU_ISA parsing and capping, the rule that names native half
// kernels, which path a half matmul takes on the CPU class this process runs as, the panel-widening path's
// numerics and its bounded, releasable scratch.
//
// ctest also runs this binary under each CPU class this machine can stand in for (tests/CMakeLists.txt sets
// XAX_MAX_CPU_ISA and ONEDNN_MAX_CPU_ISA), and under a bad XAX_MAX_CPU_ISA. The expectations are derived
// independently of xax's code: from the flags the operating system reports and from the environment.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <xax/ops/backend/native_kernel.hpp>
#include <xax/ops/matmul.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/platform.hpp>
#include <xax/utils/policy.hpp>
#include <xax/utils/threads.hpp>

#include "cpu_flags.hpp"

namespace {

using xax::CpuIsa;
using xax::DType;
template <class T>
using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
template <class T>
using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

constexpr bool built_with_onednn = xax::matmul_backend_available(xax::MatmulBackend::onednn);

std::string environment(const char* name) {
  const char* value = std::getenv(name);  // NOLINT(concurrency-mt-unsafe): tests do not change it
  return value != nullptr ? value : "";
}

bool bad_cap_in_environment() {
  try {
    static_cast<void>(xax::parse_cpu_isa(environment("XAX_MAX_CPU_ISA")));
    return false;
  } catch (const xax::ConfigError&) {
    return true;
  }
}

// --- XAX_MAX_CPU_ISA values --------------------------------------------------------------------------------

TEST(CpuIsa, ParsesOneDnnNamesCaseInsensitively) {
  EXPECT_EQ(xax::parse_cpu_isa("AVX2"), CpuIsa::avx2);
  EXPECT_EQ(xax::parse_cpu_isa("avx2"), CpuIsa::avx2);
  EXPECT_EQ(xax::parse_cpu_isa("Avx512_Core"), CpuIsa::avx512_core);
  EXPECT_EQ(xax::parse_cpu_isa("AVX512_CORE_BF16"), CpuIsa::avx512_core_bf16);
  EXPECT_EQ(xax::parse_cpu_isa("AVX512_CORE_FP16"), CpuIsa::avx512_core_fp16);
  EXPECT_EQ(xax::parse_cpu_isa("AVX512_CORE_AMX"), CpuIsa::avx512_core_amx);
  EXPECT_EQ(xax::parse_cpu_isa("ALL"), CpuIsa::all);
  EXPECT_EQ(xax::parse_cpu_isa(""), CpuIsa::all) << "an empty value is no cap, as for oneDNN";
  for (const CpuIsa isa : {CpuIsa::sse41, CpuIsa::avx, CpuIsa::avx2, CpuIsa::avx2_vnni, CpuIsa::avx512_core,
                           CpuIsa::avx512_core_vnni, CpuIsa::avx512_core_bf16, CpuIsa::avx512_core_fp16,
                           CpuIsa::avx512_core_amx, CpuIsa::avx512_core_amx_fp16, CpuIsa::all}) {
    EXPECT_EQ(xax::parse_cpu_isa(xax::cpu_isa_name(isa)), isa) << xax::cpu_isa_name(isa);
  }
}

TEST(CpuIsa, UnknownValuesThrowNamingTheValueAndTheAcceptedOnes) {
  for (const char* bad : {"AVX9", "AVX512", " AVX2", "AVX2 ", "avx512-core", "none", "0"}) {
    try {
      static_cast<void>(xax::parse_cpu_isa(bad));
      ADD_FAILURE() << "'" << bad << "' was accepted";
    } catch (const xax::ConfigError& error) {
      EXPECT_THAT(error.what(), ::testing::HasSubstr(std::string("'") + bad + "'"));
      EXPECT_THAT(error.what(), ::testing::HasSubstr("XAX_MAX_CPU_ISA"));
      EXPECT_THAT(error.what(), ::testing::HasSubstr("AVX512_CORE_BF16"));
      EXPECT_THAT(error.what(), ::testing::HasSubstr("ALL"));
    }
  }
}

xax::CpuFeatures everything() {
  xax::CpuFeatures f;
  f.avx2 = f.fma = f.f16c = f.avx512f = f.avx512bw = f.avx512vl = f.avx512dq = true;
  f.avx512_bf16 = f.avx512_fp16 = f.amx_bf16 = f.amx_fp16 = true;
  return f;
}

TEST(CpuIsa, CapClearsExactlyTheFeaturesAboveTheClass) {
  xax::CpuFeatures avx2;
  avx2.avx2 = avx2.fma = avx2.f16c = true;
  EXPECT_EQ(xax::cap_cpu_features(everything(), CpuIsa::avx2), avx2);
  EXPECT_EQ(xax::cap_cpu_features(everything(), CpuIsa::avx2_vnni), avx2);

  xax::CpuFeatures skylake = avx2;  // AVX-512 without BF16: Skylake-SP, Cascade Lake
  skylake.avx512f = skylake.avx512bw = skylake.avx512vl = skylake.avx512dq = true;
  EXPECT_EQ(xax::cap_cpu_features(everything(), CpuIsa::avx512_core), skylake);
  EXPECT_EQ(xax::cap_cpu_features(everything(), CpuIsa::avx512_core_vnni), skylake);

  xax::CpuFeatures zen4 = skylake;
  zen4.avx512_bf16 = true;
  EXPECT_EQ(xax::cap_cpu_features(everything(), CpuIsa::avx512_core_bf16), zen4);

  xax::CpuFeatures fp16 = zen4;
  fp16.avx512_fp16 = true;
  EXPECT_EQ(xax::cap_cpu_features(everything(), CpuIsa::avx512_core_fp16), fp16);

  xax::CpuFeatures amx = fp16;
  amx.amx_bf16 = true;
  EXPECT_EQ(xax::cap_cpu_features(everything(), CpuIsa::avx512_core_amx), amx);
  EXPECT_EQ(xax::cap_cpu_features(everything(), CpuIsa::all), everything());

  xax::CpuFeatures avx;
  avx.f16c = true;
  EXPECT_EQ(xax::cap_cpu_features(everything(), CpuIsa::avx), avx);
  EXPECT_EQ(xax::cap_cpu_features(everything(), CpuIsa::sse41), xax::CpuFeatures{});
}

TEST(CpuIsa, CapNeverAddsAFeatureAndLeavesArmAlone) {
  xax::CpuFeatures arm;
  arm.arm_bf16 = arm.arm_fp16 = true;
  EXPECT_EQ(xax::cap_cpu_features(arm, CpuIsa::all), arm);
  EXPECT_EQ(xax::cap_cpu_features(arm, CpuIsa::avx2), arm);
  EXPECT_EQ(xax::cap_cpu_features(xax::CpuFeatures{}, CpuIsa::all), xax::CpuFeatures{});
}

// --- The process's own class
// --------------------------------------------------------------------------------

// What the environment says this process stands in for, read without xax's own parsing of the variable.
struct ClassUnderTest {
  CpuIsa xax_cap = CpuIsa::all;
  CpuIsa onednn_cap = CpuIsa::all;
  bool os_bf16 = false;  // avx512_bf16 as the kernel lists it
  bool os_amx_bf16 = false;
  bool os_fp16 = false;
  bool os_avx512f = false;
  bool os_avx2 = false;  // avx2, fma and f16c: what xax's AVX2 kernels need
};

ClassUnderTest class_under_test() {
  ClassUnderTest c;
  c.xax_cap = xax::parse_cpu_isa(environment("XAX_MAX_CPU_ISA"));
  const std::string onednn = environment("ONEDNN_MAX_CPU_ISA");
  if (!onednn.empty()) {
    c.onednn_cap = xax::parse_cpu_isa(onednn);
  } else if (c.xax_cap != CpuIsa::avx512_core_fp16 && c.xax_cap != CpuIsa::avx512_core_amx_fp16) {
    c.onednn_cap = c.xax_cap;  // xax caps oneDNN itself when only XAX_MAX_CPU_ISA is set
  }
  if (const auto flags = xax_test::os_cpu_flags()) {
    c.os_bf16 = flags->contains("avx512_bf16");
    c.os_amx_bf16 = flags->contains("amx_bf16");
    c.os_fp16 = flags->contains("avx512_fp16");
    c.os_avx512f = flags->contains("avx512f");
    c.os_avx2 = flags->contains("avx2") && flags->contains("fma") && flags->contains("f16c");
  }
  return c;
}

class CpuClass : public ::testing::Test {
 protected:
  void SetUp() override {
    if (bad_cap_in_environment()) GTEST_SKIP() << "XAX_MAX_CPU_ISA is invalid here (BadCapEnvironment runs)";
    if (!xax_test::os_cpu_flags()) GTEST_SKIP() << "no /proc/cpuinfo flags to derive the class from";
#if !defined(__x86_64__)
    GTEST_SKIP() << "the CPU classes are x86 ones";
#endif
    cls_ = class_under_test();
  }
  [[nodiscard]] bool cpu_has_native_bf16() const {
    return (cls_.os_bf16 && cls_.xax_cap >= CpuIsa::avx512_core_bf16) ||
           (cls_.os_amx_bf16 && cls_.xax_cap >= CpuIsa::avx512_core_amx);
  }
  [[nodiscard]] bool onednn_runs_native_bf16() const {
    const CpuIsa cap = std::min(cls_.xax_cap, cls_.onednn_cap);
    return built_with_onednn && ((cls_.os_bf16 && cap >= CpuIsa::avx512_core_bf16) ||
                                 (cls_.os_amx_bf16 && cap >= CpuIsa::avx512_core_amx));
  }
  // An fp32 product, and a half product without a native kernel, runs on xax's AVX2 GEMM where the class has
  // AVX2 but not AVX-512 (oneDNN's fp32 kernel is twice as wide there), or on any AVX2 class without oneDNN.
  [[nodiscard]] bool products_run_on_xax_avx2_gemm() const {
    const bool avx512 = cls_.os_avx512f && cls_.xax_cap >= CpuIsa::avx512_core;
    return cls_.os_avx2 && cls_.xax_cap >= CpuIsa::avx2 && (!built_with_onednn || !avx512);
  }
  ClassUnderTest cls_;
};

TEST_F(CpuClass, CpuFeaturesAreTheDetectedOnesUnderTheCap) {
  const xax::CpuFeatures& f = xax::cpu_features();
  SCOPED_TRACE("XAX_MAX_CPU_ISA=" + environment("XAX_MAX_CPU_ISA") + ", detected " + f.str());
  EXPECT_EQ(f.avx512f, cls_.os_avx512f && cls_.xax_cap >= CpuIsa::avx512_core);
  EXPECT_EQ(f.avx512_bf16, cls_.os_bf16 && cls_.xax_cap >= CpuIsa::avx512_core_bf16);
  EXPECT_EQ(f.avx512_fp16, cls_.os_fp16 && cls_.xax_cap >= CpuIsa::avx512_core_fp16);
  EXPECT_EQ(f.native_bf16_dot(), cpu_has_native_bf16());
  EXPECT_EQ(xax::max_cpu_isa(), cls_.xax_cap);
}

TEST_F(CpuClass, HalfDtypeAndTheMixedPresetFollowTheCappedFeatures) {
  const DType expected = cpu_has_native_bf16()                                        ? DType::bfloat16
                         : (cls_.os_fp16 && cls_.xax_cap >= CpuIsa::avx512_core_fp16) ? DType::float16
                                                                                      : DType::bfloat16;
  EXPECT_EQ(xax::half_dtype(), expected);
  EXPECT_EQ(xax::get_policy("mixed").compute, expected);
}

TEST_F(CpuClass, Bfloat16ProductsGoToOneDnnOnlyWhereItsKernelIsNative) {
  const bool native = onednn_runs_native_bf16();
  const xax::HalfMatmulSupport support = xax::half_matmul_support(DType::bfloat16);
  SCOPED_TRACE("XAX_MAX_CPU_ISA=" + environment("XAX_MAX_CPU_ISA") +
               " ONEDNN_MAX_CPU_ISA=" + environment("ONEDNN_MAX_CPU_ISA") + ": " + support.explanation);
  EXPECT_EQ(support.native, native);

  const Matrix<xax::bfloat16> a = Matrix<float>::Random(96, 200).cast<xax::bfloat16>();
  const Matrix<xax::bfloat16> b = Matrix<float>::Random(200, 72).cast<xax::bfloat16>();
  Matrix<float> c;
  xax::matmul(a, b, c);
  const std::string kernel = xax::last_matmul_implementation();
  if (native) {
    EXPECT_THAT(kernel, ::testing::StartsWith("onednn:"));
    EXPECT_TRUE(xax::detail::native_half_kernel(kernel.substr(7), DType::bfloat16)) << kernel;
    EXPECT_EQ(kernel, support.kernel);
  } else if (products_run_on_xax_avx2_gemm()) {
    EXPECT_EQ(kernel, "xax:avx2_gemm (bfloat16 packed to float32)");
    EXPECT_EQ(kernel, support.kernel);
  } else {
    EXPECT_THAT(kernel, ::testing::EndsWith("(bfloat16 widened to float32 in panels)"));
    EXPECT_THAT(kernel, ::testing::StartsWith(built_with_onednn ? "onednn:" : "eigen:"));
  }
  const bool says_no_native =
      support.explanation.find("this CPU has no native bf16 dot product: mixed saves memory, not time") !=
      std::string::npos;
  EXPECT_EQ(says_no_native, !cpu_has_native_bf16()) << support.explanation;
}

TEST_F(CpuClass, Float32ProductsRunOnXaxsGemmWhereHalfOnesDo) {
  SCOPED_TRACE("XAX_MAX_CPU_ISA=" + environment("XAX_MAX_CPU_ISA"));
  const Matrix<float> a = Matrix<float>::Random(96, 200);
  const Matrix<float> b = Matrix<float>::Random(200, 72);
  Matrix<float> c;
  xax::matmul(a, b, c);
  const std::string kernel = xax::last_matmul_implementation();
  if (products_run_on_xax_avx2_gemm()) {
    EXPECT_EQ(kernel, "xax:avx2_gemm (float32)");
  } else {
    EXPECT_THAT(kernel, ::testing::StartsWith(built_with_onednn ? "onednn:" : "eigen:"));
  }
  const Eigen::MatrixXd a64 = a.cast<double>(), b64 = b.cast<double>();
  const Eigen::MatrixXd reference = a64 * b64;
  const Eigen::MatrixXd magnitude = a64.cwiseAbs() * b64.cwiseAbs();
  EXPECT_TRUE(((c.cast<double>() - reference).cwiseAbs().array() <= 2e-6 * magnitude.array()).all())
      << kernel;
  // An explicit backend is what it says, whatever the class.
  xax::matmul(a, b, c, {.backend = xax::MatmulBackend::eigen});
  EXPECT_THAT(xax::last_matmul_implementation(), ::testing::StartsWith("eigen:"));
}

TEST_F(CpuClass, TheWideningPathsFp32KernelStaysWithinTheClass) {
  if (!built_with_onednn) GTEST_SKIP() << "no oneDNN in this build: the fp32 GEMM is Eigen's";
  const xax::HalfMatmulSupport support = xax::half_matmul_support(DType::float16);
  if (support.native) GTEST_SKIP() << "float16 products are native here: " << support.kernel;
  if (products_run_on_xax_avx2_gemm()) GTEST_SKIP() << "half products run on " << support.kernel;
  // oneDNN's fp32 kernel name carries the ISA it was generated for.
  const std::string fp32_kernel = support.kernel.substr(0, support.kernel.find(' '));
  const CpuIsa cap = std::min(cls_.xax_cap, cls_.onednn_cap);
  if (cap < CpuIsa::avx512_core) {
    EXPECT_THAT(fp32_kernel, ::testing::Not(::testing::HasSubstr("avx512"))) << "oneDNN is not capped";
  }
  EXPECT_FALSE(xax::detail::native_half_kernel(fp32_kernel.substr(7), DType::bfloat16)) << fp32_kernel;
}

TEST_F(CpuClass, Float16IsNativeOnlyWithAvx512Fp16) {
  const xax::HalfMatmulSupport support = xax::half_matmul_support(DType::float16);
  if (!(cls_.os_fp16 && cls_.xax_cap >= CpuIsa::avx512_core_fp16)) {
    EXPECT_FALSE(support.native) << support.kernel;
  }
  Matrix<xax::float16> a = Matrix<float>::Random(64, 128).cast<xax::float16>();
  Matrix<xax::float16> c;
  xax::matmul(a, a, c, {.transpose_b = true});
  if (!support.native) {
    EXPECT_THAT(
        xax::last_matmul_implementation(),
        ::testing::HasSubstr(products_run_on_xax_avx2_gemm() ? "float16 packed to float32"
                                                             : "float16 widened to float32 in panels"));
  }
  EXPECT_THROW(static_cast<void>(xax::half_matmul_support(DType::float32)), xax::ConfigError);
}

// --- The rule for kernel names ----------------------------------------------------------------------------

TEST(NativeHalfKernel, NamesOfNativeKernelsAndOfEmulations) {
  using xax::detail::native_half_kernel;
  EXPECT_TRUE(native_half_kernel("brg:avx512_core_bf16", DType::bfloat16));
  EXPECT_TRUE(native_half_kernel("brg:avx512_core_amx", DType::bfloat16));
  EXPECT_TRUE(native_half_kernel("brg:avx512_core_bf16_amx_bf16", DType::bfloat16));
  EXPECT_TRUE(native_half_kernel("brg:avx512_core_fp16", DType::bfloat16));
  EXPECT_TRUE(native_half_kernel("brg:avx512_core_fp16", DType::float16));
  EXPECT_TRUE(native_half_kernel("brg:avx512_core_amx_fp16", DType::float16));
  // Emulations and fp32 kernels.
  EXPECT_FALSE(native_half_kernel("gemm:jit", DType::bfloat16));
  EXPECT_FALSE(native_half_kernel("gemm:jit:avx512_core_bf16", DType::bfloat16)) << "gemm kinds may emulate";
  EXPECT_FALSE(native_half_kernel("brg:avx512_core", DType::bfloat16));
  EXPECT_FALSE(native_half_kernel("ref:any", DType::bfloat16));
  EXPECT_FALSE(native_half_kernel("ref_bf16:any", DType::bfloat16));
  EXPECT_FALSE(native_half_kernel("brg:avx512_core_bf16", DType::float16)) << "bf16 hardware is not fp16";
  EXPECT_FALSE(native_half_kernel("brg:avx512_core_amx", DType::float16)) << "AMX-BF16 is not AMX-FP16";
  EXPECT_FALSE(native_half_kernel("brg:avx512_core_bf16", DType::float32));
  EXPECT_FALSE(native_half_kernel("avx512_core_bf16", DType::bfloat16)) << "no kind: not a oneDNN name";
  EXPECT_FALSE(native_half_kernel("", DType::bfloat16));
}

// --- The widening path ------------------------------------------------------------------------------------

template <class T>
Matrix<T> normal_matrix(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Matrix<T> m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(normal(rng));
  return m;
}

template <class T>
Eigen::MatrixXd to_double(const Matrix<T>& m) {
  Eigen::MatrixXd out(m.rows(), m.cols());
  for (Eigen::Index i = 0; i < m.size(); ++i)
    out.data()[i] = static_cast<double>(static_cast<float>(m.data()[i]));
  return out;
}

template <class T>
double relative_error(const Matrix<T>& actual, const Eigen::MatrixXd& reference) {
  return (to_double(actual) - reference).norm() / reference.norm();
}

template <class T>
double unit_roundoff() {
  return std::is_same_v<T, xax::bfloat16>  ? std::ldexp(1.0, -8)
         : std::is_same_v<T, xax::float16> ? std::ldexp(1.0, -11)
                                           : std::ldexp(1.0, -24);
}

template <class T>
class Widening : public ::testing::Test {};
using HalfTypes = ::testing::Types<xax::bfloat16, xax::float16>;
TYPED_TEST_SUITE(Widening, HalfTypes);

// Small panel limits force many panels in every dimension (remainders included), with every transposition,
// accumulation into C, a bias and an activation, into float and into half outputs: each element must match a
// double reference to the fp32-accumulation bound plus one rounding of the output.
TYPED_TEST(Widening, ManyPanelsMatchADoubleReference) {
  using T = TypeParam;
  const xax::detail::widening::PanelLimits small{
      .depth = 64, .a_elements = 40 * 64, .b_elements = 64 * 24, .c_elements = 40 * 24};
  constexpr Eigen::Index m = 101, k = 300, n = 77;
  for (const bool transpose_a : {false, true}) {
    for (const bool transpose_b : {false, true}) {
      const Matrix<T> a = transpose_a ? normal_matrix<T>(k, m, 1) : normal_matrix<T>(m, k, 1);
      const Matrix<T> b = transpose_b ? normal_matrix<T>(n, k, 2) : normal_matrix<T>(k, n, 2);
      const Vector<T> bias = normal_matrix<T>(m, 1, 3);
      const Matrix<T> old_c = normal_matrix<T>(m, n, 4);
      const Eigen::MatrixXd op_a = transpose_a ? Eigen::MatrixXd(to_double(a).transpose()) : to_double(a);
      const Eigen::MatrixXd op_b = transpose_b ? Eigen::MatrixXd(to_double(b).transpose()) : to_double(b);
      const Eigen::MatrixXd magnitude =
          op_a.cwiseAbs() * op_b.cwiseAbs() + to_double(old_c).cwiseAbs() + Eigen::MatrixXd::Ones(m, n) * 3;
      Eigen::MatrixXd reference = op_a * op_b + to_double(old_c);
      reference.colwise() += to_double(Matrix<T>(bias)).col(0);
      reference = reference.cwiseMax(0.0);

      const auto run = [&](auto& c) {
        xax::detail::MatmulProblem p;
        p.input = xax::dtype_of<T>;
        p.output = xax::dtype_of<typename std::remove_reference_t<decltype(c)>::Scalar>;
        p.a = {a.data(), a.rows(), a.cols(), a.rows()};
        p.b = {b.data(), b.rows(), b.cols(), b.rows()};
        p.transpose_a = transpose_a;
        p.transpose_b = transpose_b;
        p.c = c.data();
        p.ldc = m;
        p.bias = bias.data();
        p.bias_type = xax::dtype_of<T>;
        p.m = m;
        p.n = n;
        p.k = k;
        p.accumulate = true;
        p.activation = xax::Activation::relu;
        xax::detail::widening::run(p, xax::detail::run_float_panel, small);
      };
      Matrix<float> c_float = old_c.template cast<float>();
      run(c_float);
      Matrix<T> c_half = old_c;
      run(c_half);
      EXPECT_THAT(xax::last_matmul_implementation(), ::testing::HasSubstr("widened to float32 in panels"));
      int failures = 0;
      for (Eigen::Index j = 0; j < n; ++j) {
        for (Eigen::Index i = 0; i < m; ++i) {
          const double fp32_bound = magnitude(i, j) * 1e-6;
          const double half_bound = fp32_bound + unit_roundoff<T>() * std::abs(reference(i, j));
          if (std::abs(c_float(i, j) - reference(i, j)) > fp32_bound && ++failures < 5) {
            ADD_FAILURE() << "float output (" << i << ", " << j << ") " << c_float(i, j) << " vs "
                          << reference(i, j) << " transposes " << transpose_a << transpose_b;
          }
          if (std::abs(static_cast<float>(c_half(i, j)) - reference(i, j)) > half_bound && ++failures < 5) {
            ADD_FAILURE() << "half output (" << i << ", " << j << ") " << static_cast<float>(c_half(i, j))
                          << " vs " << reference(i, j) << " transposes " << transpose_a << transpose_b;
          }
        }
      }
      EXPECT_EQ(failures, 0);
    }
  }
}

// The accuracy target through every path a half product can take here: fp32 accumulation keeps the
// relative error of a K = 1024 product of N(0,1) data far under 2e-3 (a bf16 accumulator gives 3.6e-2).
TYPED_TEST(Widening, RelativeErrorAtK1024IsWithinTwoPerMille) {
  using T = TypeParam;
  const Matrix<T> a = normal_matrix<T>(128, 1024, 5);
  const Matrix<T> b = normal_matrix<T>(1024, 96, 6);
  const Eigen::MatrixXd reference = to_double(a) * to_double(b);
  for (const auto backend : {xax::MatmulBackend::automatic, xax::MatmulBackend::eigen}) {
    Matrix<float> c;
    xax::matmul(a, b, c, {.backend = backend});
    EXPECT_LE(relative_error(c, reference), 2e-3) << xax::last_matmul_implementation();
    EXPECT_LE(relative_error(c, reference), 1e-5)
        << "fp32 accumulation: " << xax::last_matmul_implementation();
    Matrix<T> c_half;
    xax::matmul(a, b, c_half, {.backend = backend});
    EXPECT_LE(relative_error(c_half, reference), 2e-3) << xax::last_matmul_implementation();
  }
  // And with 16 panels of depth 64.
  Matrix<float> c(128, 96);
  xax::detail::MatmulProblem p;
  p.input = xax::dtype_of<T>;
  p.a = {a.data(), 128, 1024, 128};
  p.b = {b.data(), 1024, 96, 1024};
  p.c = c.data();
  p.ldc = 128;
  p.m = 128;
  p.n = 96;
  p.k = 1024;
  xax::detail::widening::run(p, xax::detail::run_float_panel, {.depth = 64});
  EXPECT_LE(relative_error(c, reference), 1e-5);
}

// The scratch of a product far larger than one panel stays within the panel limits (no fp32 copy of a whole
// operand), and release_matmul_scratch() gives it back, so one workload's peak does not depend on the last.
TEST(Widening, ScratchIsBoundedByThePanelsAndReleased) {
  xax::release_matmul_scratch();
  EXPECT_EQ(xax::detail::widening::workspace().bytes(), 0u);
  constexpr Eigen::Index m = 2000, k = 1500, n = 1200;
  const Matrix<xax::float16> a = normal_matrix<xax::float16>(m, k, 7);
  const Matrix<xax::float16> b = normal_matrix<xax::float16>(k, n, 8);
  Matrix<xax::float16> c;
  xax::matmul(a, b, c, {.backend = xax::MatmulBackend::eigen});
  const xax::detail::widening::PanelLimits limits;
  const std::size_t bound =
      static_cast<std::size_t>(limits.a_elements + limits.b_elements + limits.c_elements + m) * sizeof(float);
  const std::size_t used = xax::detail::widening::workspace().bytes();
  EXPECT_GT(used, 0u);
  EXPECT_LE(used, bound);
  EXPECT_LT(used, static_cast<std::size_t>(m * k) * sizeof(float)) << "no whole fp32 copy of A";
  // The values are still right where the panels meet.
  const Eigen::MatrixXd reference = to_double(a).topRows(3) * to_double(b);
  for (Eigen::Index j = 0; j < n; j += 97) {
    for (Eigen::Index i = 0; i < 3; ++i) {
      EXPECT_NEAR(static_cast<float>(c(i, j)), reference(i, j), 2e-3 * std::abs(reference(i, j)) + 1e-2);
    }
  }
  xax::release_matmul_scratch();
  EXPECT_EQ(xax::detail::matmul_scratch_bytes(), 0u);
}

// --- xax's AVX2 GEMM (packing_gemm.hpp)
// ----------------------------------------------------------------------

template <class T>
class PackingGemm : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!xax::detail::packing_gemm::supported(xax::cpu_features())) {
      GTEST_SKIP() << "this CPU (class) has no AVX2 with FMA and F16C";
    }
  }
};
// fp32 products run on it too (packed by a plain copy); their "half output" below is a second float one.
using PackedTypes = ::testing::Types<float, xax::bfloat16, xax::float16>;
TYPED_TEST_SUITE(PackingGemm, PackedTypes);

struct GemmShape {
  Eigen::Index m, n, k;
};

// Every shape the kernel cuts differently: tiles and panels with remainders in each dimension (m not a
// multiple of 16, n not of 6), one depth below the 8 the packing transposes at once, one depth slice and
// several (with a half output, the fp32 panel buffer), more rows than one A block (144), more columns than
// one column panel (3072), and too few rows to give each of two threads its own (the threads split the
// columns). Each with every transposition, padded leading dimensions,
// accumulation, a bias of either type and each activation, into float and half outputs, on one thread and on
// two: every element must match a double reference to the fp32-accumulation bound plus one output rounding.
TYPED_TEST(PackingGemm, EveryShapeAndEpilogueMatchesADoubleReference) {
  using T = TypeParam;
  const int threads_before = xax::num_threads();
  const GemmShape shapes[] = {{16, 6, 8},     {1, 1, 1},     {37, 29, 7},   {101, 77, 300},
                              {160, 13, 600}, {300, 31, 65}, {17, 4100, 9}, {20, 900, 300}};
  int failures = 0;
  for (const int threads : {1, 2}) {
    xax::set_num_threads(threads);
    for (const GemmShape shape : shapes) {
      const Eigen::Index m = shape.m, n = shape.n, k = shape.k;
      for (int variant = 0; variant < 8; ++variant) {
        const bool transpose_a = (variant & 1) != 0, transpose_b = (variant & 2) != 0;
        const bool accumulate = (variant & 4) != 0;
        const xax::Activation activation = variant % 3 == 0   ? xax::Activation::relu
                                           : variant % 3 == 1 ? xax::Activation::none
                                                              : xax::Activation::gelu;
        const bool half_bias = variant % 2 == 0;
        // Most variants give every operand a leading dimension beyond its rows; two allocate exactly what
        // the operands hold, so that the sanitizers see any read past the last column.
        const Eigen::Index pad = variant % 3 == 2 ? 0 : 3;
        const Eigen::Index a_rows = transpose_a ? k : m, a_cols = transpose_a ? m : k;
        const Eigen::Index b_rows = transpose_b ? n : k, b_cols = transpose_b ? k : n;
        const Matrix<T> a = normal_matrix<T>(a_rows + pad, a_cols, 1);
        const Matrix<T> b = normal_matrix<T>(b_rows + pad, b_cols, 2);
        const Matrix<T> bias_half = normal_matrix<T>(m, 1, 3);
        const Vector<float> bias_float = bias_half.template cast<float>();
        const Matrix<T> old_c = normal_matrix<T>(m + pad, n, 4);
        const Eigen::MatrixXd stored_a = to_double(a).topRows(a_rows);
        const Eigen::MatrixXd stored_b = to_double(b).topRows(b_rows);
        const Eigen::MatrixXd op_a = transpose_a ? Eigen::MatrixXd(stored_a.transpose()) : stored_a;
        const Eigen::MatrixXd op_b = transpose_b ? Eigen::MatrixXd(stored_b.transpose()) : stored_b;
        const Eigen::MatrixXd old = to_double(old_c).topRows(m);
        Eigen::MatrixXd reference = op_a * op_b;
        Eigen::MatrixXd magnitude = op_a.cwiseAbs() * op_b.cwiseAbs() + Eigen::MatrixXd::Ones(m, n) * 3;
        if (accumulate) {
          reference += old;
          magnitude += old.cwiseAbs();
        }
        reference.colwise() += to_double(bias_half).col(0);
        if (activation == xax::Activation::relu) reference = reference.cwiseMax(0.0);
        if (activation == xax::Activation::gelu) {
          reference =
              reference.unaryExpr([](double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); });
        }

        const auto run = [&](auto& c) {
          xax::detail::MatmulProblem p;
          p.input = xax::dtype_of<T>;
          p.output = xax::dtype_of<typename std::remove_reference_t<decltype(c)>::Scalar>;
          p.a = {a.data(), a_rows, a_cols, a.rows()};
          p.b = {b.data(), b_rows, b_cols, b.rows()};
          p.transpose_a = transpose_a;
          p.transpose_b = transpose_b;
          p.c = c.data();
          p.ldc = c.rows();
          p.bias = half_bias ? static_cast<const void*>(bias_half.data()) : bias_float.data();
          p.bias_type = half_bias ? xax::dtype_of<T> : DType::float32;
          p.m = m;
          p.n = n;
          p.k = k;
          p.accumulate = accumulate;
          p.activation = activation;
          xax::detail::packing_gemm::run(p);
        };
        Matrix<float> c_float = old_c.template cast<float>();
        run(c_float);
        Matrix<T> c_half = old_c;
        run(c_half);
        const std::string expected_name =
            std::is_same_v<T, float>
                ? std::string("xax:avx2_gemm (float32)")
                : "xax:avx2_gemm (" + std::string(xax::dtype_name(xax::dtype_of<T>)) + " packed to float32)";
        EXPECT_EQ(xax::last_matmul_implementation(), expected_name);
        for (Eigen::Index j = 0; j < n; ++j) {
          for (Eigen::Index i = 0; i < m + pad; ++i) {
            if (i >= m) {  // the padding rows are not C's: untouched
              if (c_half(i, j) != old_c(i, j) && ++failures < 5) ADD_FAILURE() << "padding row written";
              continue;
            }
            const double fp32_bound = magnitude(i, j) * 2e-6;
            const double half_bound = fp32_bound + unit_roundoff<T>() * std::abs(reference(i, j));
            if (!(std::abs(c_float(i, j) - reference(i, j)) <= fp32_bound) && ++failures < 5) {
              ADD_FAILURE() << "float output (" << i << ", " << j << ") " << c_float(i, j) << " vs "
                            << reference(i, j) << "; m n k " << m << " " << n << " " << k << ", variant "
                            << variant << ", threads " << threads;
            }
            if (!(std::abs(static_cast<float>(c_half(i, j)) - reference(i, j)) <= half_bound) &&
                ++failures < 5) {
              ADD_FAILURE() << "half output (" << i << ", " << j << ") " << static_cast<float>(c_half(i, j))
                            << " vs " << reference(i, j) << "; m n k " << m << " " << n << " " << k
                            << ", variant " << variant << ", threads " << threads;
            }
          }
        }
      }
    }
  }
  xax::set_num_threads(threads_before);
  EXPECT_EQ(failures, 0);
}

// The fused ReLU keeps a NaN (a finite loss over non-finite gradients would hide an overflow from the loss
// scale) and applies to the sum with the bias, as activation_block does.
TYPED_TEST(PackingGemm, ReluAfterTheBiasKeepsNan) {
  using T = TypeParam;
  Matrix<T> a = Matrix<T>::Zero(32, 4);
  a(3, 0) = T(std::numeric_limits<float>::quiet_NaN());
  a(5, 0) = T(-1.0f);
  a(6, 0) = T(-1.0f);
  const Matrix<T> b = Matrix<T>::Ones(4, 12);
  Vector<float> bias = Vector<float>::Zero(32);
  bias(6) = 3.0f;
  for (const bool half_output : {false, true}) {
    Matrix<float> c_float(32, 12);
    Matrix<T> c_half(32, 12);
    xax::detail::MatmulProblem p;
    p.input = xax::dtype_of<T>;
    p.output = half_output ? xax::dtype_of<T> : DType::float32;
    p.a = {a.data(), 32, 4, 32};
    p.b = {b.data(), 4, 12, 4};
    p.c = half_output ? static_cast<void*>(c_half.data()) : c_float.data();
    p.ldc = 32;
    p.bias = bias.data();
    p.m = 32;
    p.n = 12;
    p.k = 4;
    p.activation = xax::Activation::relu;
    xax::detail::packing_gemm::run(p);
    const Matrix<float> c = half_output ? Matrix<float>(c_half.template cast<float>()) : c_float;
    for (Eigen::Index j = 0; j < 12; ++j) {
      EXPECT_TRUE(std::isnan(c(3, j))) << "column " << j;
      EXPECT_EQ(c(5, j), 0.0f);
      EXPECT_EQ(c(6, j), 2.0f);
      EXPECT_EQ(c(0, j), 0.0f);
    }
  }
}

// The scratch of a product far larger than its blocks stays within them (packed B slice, one A block per
// thread, the fp32 panel buffer of a half output, the bias) and is released.
TEST(PackingGemmScratch, IsBoundedByTheBlocksAndReleased) {
  if (!xax::detail::packing_gemm::supported(xax::cpu_features())) GTEST_SKIP() << "no AVX2 with FMA and F16C";
  namespace pg = xax::detail::packing_gemm;
  xax::release_matmul_scratch();
  constexpr Eigen::Index m = 2000, k = 1500, n = 3500;
  const Matrix<xax::float16> a = normal_matrix<xax::float16>(m, k, 7);
  const Matrix<xax::float16> b = normal_matrix<xax::float16>(k, n, 8);
  Matrix<xax::float16> c(m, n);
  xax::detail::MatmulProblem p;
  p.input = p.output = DType::float16;
  p.a = {a.data(), m, k, m};
  p.b = {b.data(), k, n, k};
  p.c = c.data();
  p.ldc = m;
  p.m = m;
  p.n = n;
  p.k = k;
  pg::run(p);
  const std::size_t bound =
      static_cast<std::size_t>(pg::nc_max * pg::kc_max + xax::num_threads() * pg::mc_max * pg::kc_max +
                               pg::fp32_panel_max) *
      sizeof(float);
  const std::size_t used = pg::workspace().bytes();
  EXPECT_GT(used, 0u);
  EXPECT_LE(used, bound);
  const Eigen::MatrixXd reference = to_double(a).bottomRows(2) * to_double(b);
  for (Eigen::Index j = 0; j < n; j += 97) {
    for (Eigen::Index i = 0; i < 2; ++i) {
      EXPECT_NEAR(static_cast<float>(c(m - 2 + i, j)), reference(i, j),
                  2e-3 * std::abs(reference(i, j)) + 1e-2);
    }
  }
  xax::release_matmul_scratch();
  EXPECT_EQ(xax::detail::matmul_scratch_bytes(), 0u);
}

// --- A bad XAX_MAX_CPU_ISA (ctest runs this alone with XAX_MAX_CPU_ISA=AVX9) -----------------------------

TEST(BadCapEnvironment, EveryEntryPointSaysWhatIsAccepted) {
  if (!bad_cap_in_environment()) GTEST_SKIP() << "XAX_MAX_CPU_ISA is valid or unset in this run";
  EXPECT_THROW(static_cast<void>(xax::cpu_features()), xax::ConfigError);
  EXPECT_THROW(static_cast<void>(xax::max_cpu_isa()), xax::ConfigError);
  EXPECT_THROW(static_cast<void>(xax::half_dtype()), xax::ConfigError);
  EXPECT_THROW(static_cast<void>(xax::get_policy("mixed")), xax::ConfigError);
  EXPECT_THROW(static_cast<void>(xax::half_matmul_support(DType::bfloat16)), xax::ConfigError);
  try {
    static_cast<void>(xax::cpu_features());
  } catch (const xax::ConfigError& error) {
    EXPECT_THAT(error.what(), ::testing::HasSubstr("XAX_MAX_CPU_ISA"));
    EXPECT_THAT(error.what(), ::testing::HasSubstr(environment("XAX_MAX_CPU_ISA")));
    EXPECT_THAT(error.what(), ::testing::HasSubstr("AVX512_CORE"));
  }
  // Kernel selection inside passes that cannot throw falls back to the uncapped CPU instead of terminating.
  EXPECT_EQ(xax::detail::cpu_features_or_detected(), xax::detail::detected_cpu_features());
}

}  // namespace
