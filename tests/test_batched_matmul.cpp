// xax::batched_matmul: every slice against a double reference for the transpose combinations attention
// uses, fp32 accumulation, accumulate, shape and aliasing errors, the batched oneDNN primitive taken exactly
// where xax::matmul's dispatch would use oneDNN, and the same bits on one and two threads.

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>
#include <xax/ops/backend/native_kernel.hpp>
#include <xax/ops/batched_matmul.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/platform.hpp>
#include <xax/utils/threads.hpp>

#include "cpu_flags.hpp"
#include "op_testing.hpp"

namespace {

using xax_test::Matrix;

template <class T>
using Tensor3 = Eigen::Tensor<T, 3>;

template <class T>
Tensor3<T> random_tensor(Eigen::Index rows, Eigen::Index cols, Eigen::Index batch, std::uint64_t seed) {
  const Matrix<T> values = xax_test::random_matrix<T>(rows, cols * batch, seed);
  Tensor3<T> t(rows, cols, batch);
  std::copy(values.data(), values.data() + values.size(), t.data());
  return t;
}

template <class T>
Eigen::MatrixXd slice(const Tensor3<T>& t, Eigen::Index i) {
  const Eigen::Map<const Matrix<T>> m(t.data() + i * t.dimension(0) * t.dimension(1), t.dimension(0),
                                      t.dimension(1));
  return xax_test::to_double(m);
}

template <class T>
class BatchedMatmulTyped : public ::testing::Test {};
TYPED_TEST_SUITE(BatchedMatmulTyped, xax_test::Scalars);

TYPED_TEST(BatchedMatmulTyped, EveryTransposeMatchesDoubleReference) {
  using T = TypeParam;
  constexpr Eigen::Index m = 7, k = 13, n = 5, batch = 4;
  for (const bool ta : {false, true}) {
    for (const bool tb : {false, true}) {
      const Tensor3<T> a = ta ? random_tensor<T>(k, m, batch, 1) : random_tensor<T>(m, k, batch, 1);
      const Tensor3<T> b = tb ? random_tensor<T>(n, k, batch, 2) : random_tensor<T>(k, n, batch, 2);
      Tensor3<float> c32;
      Tensor3<T> c;
      xax::batched_matmul(a, b, c32, {.transpose_a = ta, .transpose_b = tb});
      xax::batched_matmul(a, b, c, {.transpose_a = ta, .transpose_b = tb});
      ASSERT_EQ(c.dimension(0), m);
      ASSERT_EQ(c.dimension(1), n);
      ASSERT_EQ(c.dimension(2), batch);
      for (Eigen::Index i = 0; i < batch; ++i) {
        const Eigen::MatrixXd sa = slice(a, i), sb = slice(b, i);
        const Eigen::MatrixXd expected =
            (ta ? Eigen::MatrixXd(sa.transpose()) : sa) * (tb ? Eigen::MatrixXd(sb.transpose()) : sb);
        // fp32 accumulation of products of exactly representable inputs: float-level error for a float
        // output, one rounding to T otherwise.
        EXPECT_TRUE(xax_test::near_reference(Eigen::Map<const Eigen::MatrixXf>(c32.data() + i * m * n, m, n),
                                             expected, 1e-5, 1e-5))
            << "ta " << ta << " tb " << tb << " slice " << i;
        EXPECT_TRUE(xax_test::near_reference(Eigen::Map<const Matrix<T>>(c.data() + i * m * n, m, n),
                                             expected, xax_test::half_ulp<T>() * 1.01, 1e-5))
            << "ta " << ta << " tb " << tb << " slice " << i;
      }
    }
  }
}

TYPED_TEST(BatchedMatmulTyped, LongReductionsAccumulateInFp32) {
  using T = TypeParam;
  // 4096 ones: a 16-bit running sum stalls at 256 (bf16) or 2048 (f16); an fp32 one reaches 4096 and 4095.
  constexpr Eigen::Index k = 4096;
  Tensor3<T> a(1, k, 2), b(k, 1, 2);
  a.setConstant(T(1.0f));
  b.setConstant(T(1.0f));
  b.data()[k + 7] = T(0.0f);  // the second slice sums 4095 ones
  Tensor3<float> c;
  xax::batched_matmul(a, b, c);
  EXPECT_EQ(c(0, 0, 0), 4096.0f);
  EXPECT_EQ(c(0, 0, 1), 4095.0f);
}

TYPED_TEST(BatchedMatmulTyped, AccumulateAddsToTheOutput) {
  using T = TypeParam;
  const Tensor3<T> a = random_tensor<T>(4, 6, 3, 5), b = random_tensor<T>(6, 2, 3, 6);
  Tensor3<float> c(4, 2, 3);
  c.setConstant(1.5f);
  xax::batched_matmul(a, b, c, {.accumulate = true});
  for (Eigen::Index i = 0; i < 3; ++i) {
    const Eigen::MatrixXd expected = (slice(a, i) * slice(b, i)).array() + 1.5;
    EXPECT_TRUE(xax_test::near_reference(Eigen::Map<const Eigen::MatrixXf>(c.data() + i * 8, 4, 2), expected,
                                         1e-5, 1e-5));
  }
}

TEST(BatchedMatmul, WritesIntoATensorMapOfTheRightShape) {
  const Tensor3<float> a = random_tensor<float>(3, 4, 2, 9), b = random_tensor<float>(4, 5, 2, 10);
  std::vector<float> storage(3 * 5 * 2);
  Eigen::TensorMap<Tensor3<float>> c(storage.data(), 3, 5, 2);
  xax::batched_matmul(a, b, c);
  const Eigen::MatrixXd expected = slice(a, 1) * slice(b, 1);
  EXPECT_NEAR(storage[15 + 14], expected(2, 4), 1e-5);

  Eigen::TensorMap<Tensor3<float>> wrong(storage.data(), 5, 3, 2);
  EXPECT_THROW(xax::batched_matmul(a, b, wrong), xax::ShapeError);
}

TEST(BatchedMatmul, RejectsMismatchedShapes) {
  const Tensor3<float> a = random_tensor<float>(3, 4, 2, 1);
  Tensor3<float> c;
  EXPECT_THROW(xax::batched_matmul(a, random_tensor<float>(4, 5, 3, 2), c), xax::ShapeError);  // batch
  EXPECT_THROW(xax::batched_matmul(a, random_tensor<float>(5, 5, 2, 2), c), xax::ShapeError);  // inner
  try {
    xax::batched_matmul(a, random_tensor<float>(5, 5, 2, 2), c);
  } catch (const xax::ShapeError& error) {
    EXPECT_NE(std::string(error.what()).find("columns of op(A) must equal the rows of op(B)"),
              std::string::npos);
  }
  Tensor3<float> accumulating(2, 2, 2);
  EXPECT_THROW(xax::batched_matmul(a, random_tensor<float>(4, 5, 2, 2), accumulating, {.accumulate = true}),
               xax::ShapeError);
}

// An integer cast to Activation or MatmulBackend that names none of their values is refused before the
// output is resized, not skipped by a switch.
TEST(BatchedMatmul, RejectsOptionsOutsideTheirEnumsBeforeResizing) {
  const Tensor3<float> a = random_tensor<float>(3, 4, 2, 1);
  const Tensor3<float> b = random_tensor<float>(4, 5, 2, 2);
  Tensor3<float> c(1, 1, 1);
  EXPECT_THROW(xax::batched_matmul(a, b, c, {.activation = static_cast<xax::Activation>(7)}),
               xax::ConfigError);
  EXPECT_THROW(xax::batched_matmul(a, b, c, {.backend = static_cast<xax::MatmulBackend>(9)}),
               xax::ConfigError);
  EXPECT_EQ(c.size(), 1);
}

}  // namespace

namespace {

// On two threads, attention-sized slices are shared out between the threads (each product on one thread);
// every slice must still be the product a single thread computes, bit for bit, and the slices at both ends
// of each thread's range must be written.
TYPED_TEST(BatchedMatmulTyped, SharingSlicesBetweenThreadsGivesTheSingleThreadResult) {
  using T = TypeParam;
  // Big enough (about 1 MiB in all) for the slices to be shared out, as an attention layer's are.
  constexpr Eigen::Index head = 32, tokens = 64, batch = 37;
  const Tensor3<T> k = random_tensor<T>(head, tokens, batch, 21);
  const Tensor3<T> q = random_tensor<T>(head, tokens, batch, 22);
  Tensor3<float> one, two;
  xax::set_num_threads(1);
  xax::batched_matmul(k, q, one, {.transpose_a = true});
  xax::set_num_threads(2);
  xax::batched_matmul(k, q, two, {.transpose_a = true});
  xax::set_num_threads(1);
  ASSERT_EQ(two.dimension(2), batch);
  for (Eigen::Index i = 0; i < one.size(); ++i) ASSERT_EQ(one.data()[i], two.data()[i]) << "element " << i;
  for (const Eigen::Index b : {Eigen::Index{0}, batch / 2, batch - 1}) {
    const Eigen::MatrixXd expected = slice(k, b).transpose() * slice(q, b);
    const Eigen::Map<const Eigen::MatrixXf> got(two.data() + b * tokens * tokens, tokens, tokens);
    EXPECT_TRUE(xax_test::near_reference(got, expected, 1e-5, 1e-5)) << "slice " << b;
  }
}

}  // namespace

// --- The batched oneDNN primitive (issue 14) --------------------------------------------------------------
//
// ctest also runs this file under the CPU classes this machine can stand in for (tests/CMakeLists.txt sets
// XAX_MAX_CPU_ISA and ONEDNN_MAX_CPU_ISA), so the bf16 batch is seen both on its native 3-D primitive and
// declined to the per-slice widening path.

namespace {

constexpr bool built_with_onednn = xax::matmul_backend_available(xax::MatmulBackend::onednn);

// Attention's shapes (head 32, block 64), in every combination of transposes it uses, against a double
// reference whose tolerance is the fp32 accumulation bound (k + 1) u sum |a||b| plus one rounding to the
// output type.
TYPED_TEST(BatchedMatmulTyped, AttentionShapesMatchDoubleReferenceOnEveryPath) {
  using T = TypeParam;
  constexpr Eigen::Index head = 32, tokens = 64, batch = 12;
  struct Product {
    const char* name;
    Eigen::Index a_rows, a_cols, b_rows, b_cols;
    bool ta, tb;
  };
  // scores = K^T Q, y = V P, dV = dY P^T, dP = V^T dY (the dK = Q dS^T, dQ = K dS products repeat them).
  for (const Product& p : {Product{"K^T Q", head, tokens, head, tokens, true, false},
                           Product{"V P", head, tokens, tokens, tokens, false, false},
                           Product{"dY P^T", head, tokens, tokens, tokens, false, true},
                           Product{"V^T dY", head, tokens, head, tokens, true, false}}) {
    const Tensor3<T> a = random_tensor<T>(p.a_rows, p.a_cols, batch, 31);
    const Tensor3<T> b = random_tensor<T>(p.b_rows, p.b_cols, batch, 32);
    for (const xax::MatmulBackend backend : {xax::MatmulBackend::automatic, xax::MatmulBackend::eigen}) {
      Tensor3<float> c32;
      Tensor3<T> c;
      const xax::MatmulOptions options{.transpose_a = p.ta, .transpose_b = p.tb, .backend = backend};
      xax::batched_matmul(a, b, c32, options);
      xax::batched_matmul(a, b, c, options);
      const Eigen::Index m = c.dimension(0), n = c.dimension(1), k = p.ta ? p.a_rows : p.a_cols;
      for (Eigen::Index i = 0; i < batch; ++i) {
        const Eigen::MatrixXd sa = p.ta ? Eigen::MatrixXd(slice(a, i).transpose()) : slice(a, i);
        const Eigen::MatrixXd sb = p.tb ? Eigen::MatrixXd(slice(b, i).transpose()) : slice(b, i);
        const Eigen::MatrixXd expected = sa * sb;
        const double accumulation =
            static_cast<double>(k + 1) * std::ldexp(1.0, -24) * (sa.cwiseAbs() * sb.cwiseAbs()).maxCoeff();
        EXPECT_TRUE(xax_test::near_reference(Eigen::Map<const Eigen::MatrixXf>(c32.data() + i * m * n, m, n),
                                             expected, 0.0, accumulation))
            << p.name << " slice " << i << " backend " << xax::matmul_backend_name(backend);
        EXPECT_TRUE(xax_test::near_reference(Eigen::Map<const Matrix<T>>(c.data() + i * m * n, m, n),
                                             expected, xax_test::half_ulp<T>() * 1.01, accumulation))
            << p.name << " slice " << i << " backend " << xax::matmul_backend_name(backend);
      }
    }
  }
}

// The batch takes the 3-D primitive exactly where oneDNN runs the slices natively (float in every oneDNN
// build, even where one fp32 product runs on xax's AVX2 GEMM; half types where xax::matmul gives one slice
// to oneDNN), and runs on the same kernel; elsewhere each slice takes xax::matmul's own path.
TYPED_TEST(BatchedMatmulTyped, TakesTheBatchedPrimitiveExactlyWhereMatmulWouldUseOneDnn) {
  using T = TypeParam;
  constexpr Eigen::Index head = 32, tokens = 64, batch = 6;
  const Tensor3<T> k = random_tensor<T>(head, tokens, batch, 41);
  const Tensor3<T> q = random_tensor<T>(head, tokens, batch, 42);
  const Eigen::Map<const Matrix<T>> k0(k.data(), head, tokens), q0(q.data(), head, tokens);
  Matrix<float> one_slice;
  xax::matmul(k0, q0, one_slice, {.transpose_a = true});
  std::string slice_kernel = xax::last_matmul_implementation();
  // The 2-D path may use oneDNN's fp32 kernel on widened panels: that is not a oneDNN product of T.
  bool onednn_runs_slice =
      slice_kernel.starts_with("onednn:") && slice_kernel.find("widened") == std::string::npos;
  if (std::is_same_v<T, float> && built_with_onednn) {
    xax::matmul(k0, q0, one_slice, {.transpose_a = true, .backend = xax::MatmulBackend::onednn});
    slice_kernel = xax::last_matmul_implementation();
    onednn_runs_slice = true;
  }

  Tensor3<float> scores;
  xax::batched_matmul(k, q, scores, {.transpose_a = true});
  const std::string batch_kernel = xax::last_matmul_implementation();
  SCOPED_TRACE("one slice: " + slice_kernel + "; the batch: " + batch_kernel);
  if (onednn_runs_slice) {
    EXPECT_EQ(batch_kernel, slice_kernel + " (3-D, batch " + std::to_string(batch) + ")");
  } else {
    EXPECT_EQ(batch_kernel, slice_kernel);
    EXPECT_EQ(batch_kernel.find("3-D"), std::string::npos);
  }
  Tensor3<float> by_eigen;
  xax::batched_matmul(k, q, by_eigen, {.transpose_a = true, .backend = xax::MatmulBackend::eigen});
  EXPECT_TRUE(xax::last_matmul_implementation().starts_with("eigen:")) << xax::last_matmul_implementation();
}

// Independently of xax's dispatch code: a build with oneDNN on a CPU whose flags (from /proc/cpuinfo) include
// AVX512_BF16, not capped below that class, must run a bf16 batch natively as one 3-D primitive; float
// batches always go to oneDNN's fp32 kernel in such a build.
TEST(BatchedMatmulPrimitive, Bfloat16BatchRunsNativelyAsOnePrimitiveWhereTheCpuHasAvx512Bf16) {
  if (!built_with_onednn) GTEST_SKIP() << "built without oneDNN";
  const auto flags = xax_test::os_cpu_flags();
  if (!flags || !flags->contains("avx512_bf16")) GTEST_SKIP() << "this CPU has no AVX512_BF16";
  for (const char* variable : {"XAX_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA"}) {
    const char* value = std::getenv(variable);  // NOLINT(concurrency-mt-unsafe): tests do not change it
    if (value != nullptr && xax::parse_cpu_isa(value) < xax::CpuIsa::avx512_core_bf16) {
      GTEST_SKIP() << variable << "=" << value << " caps the CPU below AVX512_CORE_BF16";
    }
  }
  constexpr Eigen::Index head = 32, tokens = 64, batch = 48;
  const Tensor3<xax::bfloat16> v = random_tensor<xax::bfloat16>(head, tokens, batch, 51);
  const Tensor3<xax::bfloat16> probs = random_tensor<xax::bfloat16>(tokens, tokens, batch, 52);
  const Tensor3<float> v32 = random_tensor<float>(head, tokens, batch, 53);
  const Tensor3<float> probs32 = random_tensor<float>(tokens, tokens, batch, 54);
  // One thread runs the whole batch as one primitive; two share it out, one primitive of 24 slices each.
  for (const int threads : {1, 2}) {
    xax::set_num_threads(threads);
    const std::string batched = " (3-D, batch " + std::to_string(batch / threads) + ")";
    Tensor3<xax::bfloat16> y;
    xax::batched_matmul(v, probs, y);
    const std::string kernel = xax::last_matmul_implementation();
    EXPECT_TRUE(kernel.starts_with("onednn:")) << kernel;
    EXPECT_NE(kernel.find(batched), std::string::npos) << threads << " threads: " << kernel;
    const std::string name = kernel.substr(7, kernel.find(" (3-D") - 7);
    EXPECT_TRUE(xax::detail::native_half_kernel(name, xax::DType::bfloat16)) << kernel;

    Tensor3<float> y32;
    xax::batched_matmul(v32, probs32, y32);
    EXPECT_NE(xax::last_matmul_implementation().find(batched), std::string::npos)
        << threads << " threads: " << xax::last_matmul_implementation();
  }
  xax::set_num_threads(1);
}

// Every transpose attention uses, shared unevenly between two threads (37 slices: 18 + 19), gives the one-
// thread result bit for bit, with a 16-bit output too.
TYPED_TEST(BatchedMatmulTyped, EveryTransposeIsBitIdenticalOnOneAndTwoThreads) {
  using T = TypeParam;
  constexpr Eigen::Index head = 32, tokens = 64, batch = 37;
  for (const bool ta : {false, true}) {
    for (const bool tb : {false, true}) {
      const Tensor3<T> a =
          ta ? random_tensor<T>(tokens, head, batch, 61) : random_tensor<T>(head, tokens, batch, 61);
      const Tensor3<T> b =
          tb ? random_tensor<T>(tokens, tokens, batch, 62) : random_tensor<T>(tokens, tokens, batch, 62);
      Tensor3<T> one, two;
      xax::set_num_threads(1);
      xax::batched_matmul(a, b, one, {.transpose_a = ta, .transpose_b = tb});
      const std::string kernel = xax::last_matmul_implementation();
      xax::set_num_threads(2);
      xax::batched_matmul(a, b, two, {.transpose_a = ta, .transpose_b = tb});
      xax::set_num_threads(1);
      ASSERT_EQ(one.size(), two.size());
      for (Eigen::Index i = 0; i < one.size(); ++i) {
        ASSERT_EQ(static_cast<float>(one.data()[i]), static_cast<float>(two.data()[i]))
            << "element " << i << " ta " << ta << " tb " << tb << " (" << kernel << ")";
      }
    }
  }
}

TEST(BatchedMatmul, AnOutputSharingMemoryWithAnInputIsAnError) {
  Tensor3<float> a = random_tensor<float>(4, 4, 3, 71);
  const Tensor3<float> b = random_tensor<float>(4, 4, 3, 72);
  try {
    xax::batched_matmul(a, b, a);
    ADD_FAILURE() << "an output aliasing A was accepted";
  } catch (const xax::Error& error) {
    EXPECT_NE(std::string(error.what()).find("shares memory with an input"), std::string::npos)
        << error.what();
  }
  // One slice of the output overlapping another slice of B: aliasing across slices is caught too.
  std::vector<float> storage(4 * 4 * 4);
  const Eigen::TensorMap<const Tensor3<float>> b_view(storage.data(), 4, 4, 3);
  Eigen::TensorMap<Tensor3<float>> c_view(storage.data() + 16, 4, 4, 3);
  EXPECT_THROW(xax::batched_matmul(a, b_view, c_view), xax::Error);
}

}  // namespace
