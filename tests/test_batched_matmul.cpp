// xax::batched_matmul: every slice against a double reference for the transpose combinations attention
// uses, fp32 accumulation, accumulate, and shape errors.

#include <gtest/gtest.h>

#include <xax/ops/batched_matmul.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/threads.hpp>

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
