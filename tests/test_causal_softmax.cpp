// xax::causal_softmax and its backward against double references: the causal mask (exact zeros), the folded
// scale, fp32 arithmetic from 16-bit scores (including scores whose exp overflows 16 bits), the keys >
// queries offset, and errors.

#include <gtest/gtest.h>

#include <xax/ops/causal_softmax.hpp>
#include <xax/utils/error.hpp>

#include "op_testing.hpp"

namespace {

using xax_test::Matrix;

template <class T>
using Tensor3 = Eigen::Tensor<T, 3>;

// keys x queries; query i sees keys j <= i + keys - queries.
Eigen::MatrixXd causal_softmax_reference(const Eigen::MatrixXd& s, double scale) {
  const Eigen::Index offset = s.rows() - s.cols();
  Eigen::MatrixXd p = Eigen::MatrixXd::Zero(s.rows(), s.cols());
  for (Eigen::Index i = 0; i < s.cols(); ++i) {
    const Eigen::Index visible = i + offset + 1;
    const Eigen::ArrayXd v = scale * s.col(i).head(visible).array();
    const Eigen::ArrayXd e = (v - v.maxCoeff()).exp();
    p.col(i).head(visible) = e / e.sum();
  }
  return p;
}

Eigen::MatrixXd causal_softmax_backward_reference(const Eigen::MatrixXd& p, const Eigen::MatrixXd& dp,
                                                  double scale) {
  Eigen::MatrixXd ds(p.rows(), p.cols());
  for (Eigen::Index i = 0; i < p.cols(); ++i) {
    const double dot = p.col(i).dot(dp.col(i));
    ds.col(i) = scale * p.col(i).array() * (dp.col(i).array() - dot);
  }
  return ds;
}

template <class T>
class CausalSoftmaxTyped : public ::testing::Test {};
TYPED_TEST_SUITE(CausalSoftmaxTyped, xax_test::Scalars);

TYPED_TEST(CausalSoftmaxTyped, TensorForwardAndBackwardMatchReference) {
  using T = TypeParam;
  constexpr Eigen::Index tokens = 17, batch = 3;
  const float scale = 0.25f;
  const Matrix<T> values = xax_test::random_matrix<T>(tokens, tokens * batch, 1, -12.0f, 12.0f);
  const Matrix<T> grads = xax_test::random_matrix<T>(tokens, tokens * batch, 2);
  Tensor3<T> scores(tokens, tokens, batch), dprobs(tokens, tokens, batch);
  std::copy(values.data(), values.data() + values.size(), scores.data());
  std::copy(grads.data(), grads.data() + grads.size(), dprobs.data());

  Tensor3<T> probs;
  xax::causal_softmax(scores, probs, scale);
  Tensor3<float> dscores;
  xax::causal_softmax_backward(probs, dprobs, dscores, scale);
  for (Eigen::Index b = 0; b < batch; ++b) {
    const Eigen::MatrixXd s = xax_test::to_double(values.middleCols(b * tokens, tokens));
    const Eigen::MatrixXd expected = causal_softmax_reference(s, scale);
    const Eigen::Map<const Matrix<T>> p(probs.data() + b * tokens * tokens, tokens, tokens);
    EXPECT_TRUE(xax_test::near_reference(p, expected, 1.01 * xax_test::half_ulp<T>(), 1e-7)) << "slice " << b;
    for (Eigen::Index i = 0; i < tokens; ++i) {
      for (Eigen::Index j = i + 1; j < tokens; ++j) EXPECT_EQ(static_cast<float>(p(j, i)), 0.0f);
    }
    // The backward's reference starts from the probabilities the forward stored (rounded to T).
    const Eigen::MatrixXd expected_ds = causal_softmax_backward_reference(
        xax_test::to_double(p), xax_test::to_double(grads.middleCols(b * tokens, tokens)), scale);
    const Eigen::Map<const Eigen::MatrixXf> ds(dscores.data() + b * tokens * tokens, tokens, tokens);
    EXPECT_TRUE(xax_test::near_reference(ds, expected_ds, 1e-5, 1e-6)) << "slice " << b;
    for (Eigen::Index i = 0; i < tokens; ++i) {
      for (Eigen::Index j = i + 1; j < tokens; ++j) EXPECT_EQ(ds(j, i), 0.0f);
    }
  }
}

TYPED_TEST(CausalSoftmaxTyped, ScoresWhoseExponentialOverflowsSixteenBitsStayFinite) {
  using T = TypeParam;
  // exp(60) overflows float16 and exp(100) is far beyond it; fp32 with the max shifted out is exact.
  Matrix<T> scores(3, 3);
  scores << T(100.0f), T(60.0f), T(-60.0f), T(0.0f), T(59.0f), T(-61.0f), T(0.0f), T(0.0f), T(-62.0f);
  Matrix<T> probs;
  xax::causal_softmax(scores, probs, 1.0f);
  const Eigen::MatrixXd expected = causal_softmax_reference(xax_test::to_double(scores), 1.0);
  EXPECT_TRUE(xax_test::near_reference(probs, expected, 1.01 * xax_test::half_ulp<T>(), 1e-7));
  EXPECT_EQ(static_cast<float>(probs(0, 0)), 1.0f);
}

TYPED_TEST(CausalSoftmaxTyped, MoreKeysThanQueriesShiftsTheMask) {
  using T = TypeParam;
  const Matrix<T> scores = xax_test::random_matrix<T>(9, 4, 5);
  Matrix<float> probs;
  xax::causal_softmax(scores, probs, 0.5f);
  EXPECT_TRUE(xax_test::near_reference(probs, causal_softmax_reference(xax_test::to_double(scores), 0.5),
                                       1e-5, 1e-7));
  EXPECT_EQ(probs(6, 0), 0.0f);
  EXPECT_GT(probs(5, 0), 0.0f);
  Matrix<float> ds;
  xax::causal_softmax_backward(probs, Matrix<float>::Ones(9, 4).eval(), ds, 0.5f);
  // A constant upstream gradient does not change the softmax: its gradient is zero up to rounding.
  EXPECT_LT(ds.cwiseAbs().maxCoeff(), 1e-6f);
}

TEST(CausalSoftmax, RejectsFewerKeysThanQueriesAndBadScales) {
  Eigen::MatrixXf probs;
  EXPECT_THROW(xax::causal_softmax(Eigen::MatrixXf::Zero(3, 4).eval(), probs, 1.0f), xax::ShapeError);
  EXPECT_THROW(xax::causal_softmax(Eigen::MatrixXf::Zero(4, 4).eval(), probs, 0.0f), xax::ConfigError);
  EXPECT_THROW(
      xax::causal_softmax(Eigen::MatrixXf::Zero(4, 4).eval(), probs, std::numeric_limits<float>::infinity()),
      xax::ConfigError);
  Tensor3<float> p(4, 4, 2), dp(4, 4, 3), ds;
  p.setZero();
  dp.setZero();
  EXPECT_THROW(xax::causal_softmax_backward(p, dp, ds, 1.0f), xax::ShapeError);
}

}  // namespace

namespace {

// Columns are widened into fp32 buffers padded to whole SIMD packets: visible lengths on both sides of a
// packet boundary (1 to 70 keys here) must match the reference, and the padding must not leak into the sum
// or into the masked keys.
TYPED_TEST(CausalSoftmaxTyped, ColumnsOfEveryLengthAroundThePaddingMatchReference) {
  using T = TypeParam;
  constexpr Eigen::Index tokens = 70;
  const float scale = 0.3f;
  const Matrix<T> scores = xax_test::random_matrix<T>(tokens, tokens, 41, -8.0f, 8.0f);
  const Matrix<T> dprobs = xax_test::random_matrix<T>(tokens, tokens, 42);
  Matrix<T> probs;
  xax::causal_softmax(scores, probs, scale);
  const Eigen::MatrixXd expected = causal_softmax_reference(xax_test::to_double(scores), scale);
  EXPECT_TRUE(xax_test::near_reference(probs, expected, 1.01 * xax_test::half_ulp<T>(), 1e-7));
  Eigen::MatrixXf dscores;
  xax::causal_softmax_backward(probs, dprobs, dscores, scale);
  const Eigen::MatrixXd expected_ds =
      causal_softmax_backward_reference(xax_test::to_double(probs), xax_test::to_double(dprobs), scale);
  EXPECT_TRUE(xax_test::near_reference(dscores, expected_ds, 1e-5, 1e-6));
  for (Eigen::Index i = 0; i < tokens; ++i) {
    for (Eigen::Index j = i + 1; j < tokens; ++j) {
      ASSERT_EQ(static_cast<float>(probs(j, i)), 0.0f);
      ASSERT_EQ(dscores(j, i), 0.0f);
    }
  }
}

// The output must not share memory with the scores (nor dscores with probs or dprobs): a partial overlap
// reads probabilities as scores, and a plain output that a scores Map points into would be freed by its
// resize.
TEST(CausalSoftmax, OutputsSharingMemoryWithInputsAreRejected) {
  Eigen::MatrixXf m = Eigen::MatrixXf::Random(4, 6);
  const Eigen::MatrixXf original = m;
  EXPECT_THROW(xax::causal_softmax(m.leftCols(4), m.rightCols(4), 1.0f), xax::ShapeError);
  EXPECT_THROW(xax::causal_softmax_backward(m.leftCols(2), m.middleCols(2, 2), m.middleCols(3, 2), 1.0f),
               xax::ShapeError);
  EXPECT_EQ(m, original);

  Eigen::MatrixXf buffer = Eigen::MatrixXf::Random(4, 16);
  const Eigen::Map<const Eigen::MatrixXf> scores(buffer.data(), 4, 4);
  EXPECT_THROW(xax::causal_softmax(scores, buffer, 1.0f), xax::ShapeError);
  EXPECT_EQ(buffer.cols(), 16);

  Tensor3<float> storage(4, 4, 3);
  storage.setRandom();
  const Eigen::TensorMap<const Tensor3<float>> first(storage.data(), 4, 4, 2);
  Eigen::TensorMap<Tensor3<float>> second(storage.data() + 16, 4, 4, 2);
  EXPECT_THROW(xax::causal_softmax(first, second, 1.0f), xax::ShapeError);
  EXPECT_THROW(xax::causal_softmax_backward(first, first, second, 1.0f), xax::ShapeError);
}

// Exactly in place is the one overlap allowed: each column is read into fp32 before it is written.
TEST(CausalSoftmax, RunsInPlaceForwardAndBackward) {
  const Eigen::MatrixXf scores = Eigen::MatrixXf::Random(6, 6), dprobs = Eigen::MatrixXf::Random(6, 6);
  Eigen::MatrixXf probs, in_place = scores;
  xax::causal_softmax(scores, probs, 0.5f);
  xax::causal_softmax(in_place, in_place, 0.5f);
  EXPECT_EQ(in_place, probs);
  Eigen::MatrixXf dscores, dscores_in_place = dprobs;
  xax::causal_softmax_backward(probs, dprobs, dscores, 0.5f);
  xax::causal_softmax_backward(probs, dscores_in_place, dscores_in_place, 0.5f);
  EXPECT_EQ(dscores_in_place, dscores);
}

}  // namespace
