// The fp32 reductions: softmax, log-softmax, log-sum-exp, softmax cross-entropy and its gradient, row sums,
// from float, bfloat16 and float16 inputs, against double references of the same (rounded) inputs.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>
#include <xax/ops/reduce.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/threads.hpp>

#include "op_testing.hpp"

namespace {

using xax_test::GuardedVector;
using xax_test::half_ulp;
using xax_test::Matrix;
using xax_test::random_matrix;
using xax_test::to_double;
using xax_test::Vector;

Eigen::VectorXd logsumexp_reference(const Eigen::MatrixXd& x) {
  Eigen::VectorXd out(x.cols());
  for (Eigen::Index j = 0; j < x.cols(); ++j) {
    const double max = x.col(j).maxCoeff();
    out(j) = max + std::log((x.col(j).array() - max).exp().sum());
  }
  return out;
}

template <class T>
class ReduceTyped : public ::testing::Test {};
using Scalars = ::testing::Types<float, xax::bfloat16, xax::float16>;
TYPED_TEST_SUITE(ReduceTyped, Scalars);

TYPED_TEST(ReduceTyped, SoftmaxAndLogSoftmaxMatchReference) {
  using T = TypeParam;
  const Matrix<T> logits = random_matrix<T>(37, 19, 1, -8.0f, 8.0f);
  const Eigen::MatrixXd x = to_double(logits);
  const Eigen::VectorXd lse = logsumexp_reference(x);
  const Eigen::MatrixXd log_probabilities = x.rowwise() - lse.transpose();

  Eigen::MatrixXf probabilities;
  xax::softmax(logits, probabilities);
  EXPECT_LT((probabilities.cast<double>() - log_probabilities.array().exp().matrix()).cwiseAbs().maxCoeff(),
            1e-6);
  for (Eigen::Index j = 0; j < probabilities.cols(); ++j) EXPECT_NEAR(probabilities.col(j).sum(), 1.0, 1e-5);

  Matrix<T> probabilities_t;
  xax::softmax(logits, probabilities_t);
  const Eigen::MatrixXd expected = log_probabilities.array().exp();
  for (Eigen::Index i = 0; i < expected.size(); ++i) {
    EXPECT_NEAR(static_cast<float>(probabilities_t.data()[i]), expected.data()[i],
                half_ulp<T>() * expected.data()[i] + 1e-7);
  }

  Eigen::MatrixXf log_softmax;
  xax::log_softmax(logits, log_softmax);
  EXPECT_LT((log_softmax.cast<double>() - log_probabilities).cwiseAbs().maxCoeff(), 1e-5);

  Eigen::VectorXf lse_out;
  xax::logsumexp(logits, lse_out);
  ASSERT_EQ(lse_out.size(), 19);
  EXPECT_LT((lse_out.cast<double>() - lse).cwiseAbs().maxCoeff(), 1e-5);
}

TYPED_TEST(ReduceTyped, LogSumExpAccumulatesInFloat) {
  using T = TypeParam;
  // 4096 equal logits: a 16-bit running sum of exp(0) = 1 would stall at 256 (bf16) or 2048 (f16).
  const Matrix<T> logits = Matrix<T>::Constant(4096, 2, static_cast<T>(3.0f));
  Eigen::VectorXf lse;
  xax::logsumexp(logits, lse);
  EXPECT_NEAR(lse(0), 3.0 + std::log(4096.0), 1e-5);
  EXPECT_NEAR(lse(1), 3.0 + std::log(4096.0), 1e-5);
}

TYPED_TEST(ReduceTyped, LargeAndMaskedLogitsStayFinite) {
  using T = TypeParam;
  Matrix<T> logits(3, 2);
  logits << static_cast<T>(60000.0f), static_cast<T>(-std::numeric_limits<float>::infinity()),
      static_cast<T>(59000.0f), static_cast<T>(1.0f), static_cast<T>(-60000.0f), static_cast<T>(2.0f);
  Eigen::MatrixXf probabilities;
  xax::softmax(logits, probabilities);
  EXPECT_TRUE(probabilities.allFinite());
  EXPECT_FLOAT_EQ(probabilities(0, 0), 1.0f);
  EXPECT_EQ(probabilities(0, 1), 0.0f);  // exp(-inf) = 0: a masked logit
  EXPECT_NEAR(probabilities(2, 1), std::exp(1.0) / (1.0 + std::exp(1.0)), 1e-6);
}

TYPED_TEST(ReduceTyped, SoftmaxCrossEntropyLossAndGradient) {
  using T = TypeParam;
  const Matrix<T> logits = random_matrix<T>(10, 64, 2, -4.0f, 4.0f);
  std::vector<std::int32_t> labels(64);
  for (std::size_t j = 0; j < labels.size(); ++j) labels[j] = static_cast<std::int32_t>((j * 7) % 10);
  const Eigen::MatrixXd x = to_double(logits);
  const Eigen::VectorXd lse = logsumexp_reference(x);
  double expected_loss = 0;
  Eigen::MatrixXd expected_gradient = (x.rowwise() - lse.transpose()).array().exp();
  for (Eigen::Index j = 0; j < 64; ++j) {
    const auto label = labels[static_cast<std::size_t>(j)];
    expected_loss += lse(j) - x(label, j);
    expected_gradient(label, j) -= 1.0;
  }
  expected_loss /= 64;
  const float scale = 1024.0f;
  expected_gradient *= scale / 64.0;

  EXPECT_NEAR(xax::softmax_cross_entropy(logits, labels), expected_loss, 1e-6);
  Eigen::MatrixXf gradient;
  EXPECT_NEAR(xax::softmax_cross_entropy(logits, labels, gradient, scale), expected_loss, 1e-6);
  EXPECT_LT((gradient.cast<double>() - expected_gradient).cwiseAbs().maxCoeff(), 1e-5);

  Matrix<T> gradient_t;
  xax::softmax_cross_entropy(logits, labels, gradient_t, scale);
  for (Eigen::Index i = 0; i < expected_gradient.size(); ++i) {
    EXPECT_NEAR(static_cast<float>(gradient_t.data()[i]), expected_gradient.data()[i],
                half_ulp<T>() * std::abs(expected_gradient.data()[i]) + 1e-6);
  }
}

TYPED_TEST(ReduceTyped, RowSums) {
  using T = TypeParam;
  const Matrix<T> x = random_matrix<T>(33, 300, 3, 0.0f, 1.0f);
  const Eigen::VectorXd expected = to_double(x).rowwise().sum();
  Eigen::VectorXf sums;
  xax::row_sums(x, sums);
  // 300 float additions of values in [0, 1): a few ulps of the ~150 total.
  EXPECT_LT((sums.cast<double>() - expected).cwiseAbs().maxCoeff(), 2e-6 * expected.maxCoeff());
  Vector<T> accumulated = Vector<T>::Constant(33, static_cast<T>(2.0f));
  xax::row_sums(x, accumulated, /*accumulate=*/true);
  for (Eigen::Index i = 0; i < 33; ++i) {
    EXPECT_NEAR(static_cast<float>(accumulated(i)), expected(i) + 2.0,
                half_ulp<T>() * (expected(i) + 2.0) + 1e-4);
  }
}

// An output that is not a vector was read as size() elements an outer stride apart: a 3 x 3 matrix spanned 25
// elements, so an input stored just after its 9 was reported as sharing its memory, hiding the real error.
TEST(RowSums, AMatrixOutputIsRefusedForItsShapeNotForAnOverlapThatIsNotThere) {
  std::vector<float> storage(40, 1.0f);
  const Eigen::Map<const Eigen::MatrixXf> x(storage.data() + 16, 3, 4);  // after out's 9 elements
  Eigen::Map<Eigen::MatrixXf> out(storage.data(), 3, 3);
  for (const bool accumulate : {false, true}) {
    EXPECT_THAT(
        [&] { xax::row_sums(x, out, accumulate); },
        ::testing::ThrowsMessage<xax::ShapeError>(::testing::Not(::testing::HasSubstr("shares memory"))))
        << accumulate;
  }
  Eigen::Map<Eigen::MatrixXf> overlapping(storage.data() + 12, 3, 3);  // elements 12..20: into x's
  EXPECT_THAT([&] { xax::row_sums(x, overlapping); },
              ::testing::ThrowsMessage<xax::ShapeError>(::testing::HasSubstr("shares memory")));
}

TYPED_TEST(ReduceTyped, RowSumsAreTheSameBitsOnOneAndTwoThreads) {
  using T = TypeParam;
  // Large enough to be shared among threads (384 rows x 768 columns, the GPT's qkv bias gradient), with a
  // leading dimension larger than the rows.
  const Matrix<T> storage = random_matrix<T>(400, 768, 5, -1.0f, 1.0f);
  const auto x = storage.topRows(384);
  const Eigen::VectorXd expected = to_double(Matrix<T>(x)).rowwise().sum();
  const int previous = xax::num_threads();
  std::vector<Eigen::VectorXf> results;
  for (const int threads : {1, 2}) {
    try {
      xax::set_num_threads(threads);
    } catch (const xax::ConfigError&) {
      continue;  // a build without OpenMP runs on one thread only
    }
    Eigen::VectorXf sums;
    xax::row_sums(x, sums);
    EXPECT_LT((sums.cast<double>() - expected).cwiseAbs().maxCoeff(), 1e-4) << threads << " threads";
    results.push_back(sums);
  }
  xax::set_num_threads(previous);
  for (const Eigen::VectorXf& sums : results) {
    for (Eigen::Index i = 0; i < sums.size(); ++i) {
      ASSERT_EQ(std::bit_cast<std::uint32_t>(sums(i)), std::bit_cast<std::uint32_t>(results.front()(i))) << i;
    }
  }
}

TEST(Reduce, CrossEntropyGradientMatchesFiniteDifferences) {
  Eigen::MatrixXf logits = random_matrix<float>(5, 3, 4, -2.0f, 2.0f);
  const std::array<std::int32_t, 3> labels{4, 0, 2};
  Eigen::MatrixXf gradient;
  xax::softmax_cross_entropy(logits, labels, gradient);
  const float h = 1e-2f;
  for (Eigen::Index i = 0; i < logits.size(); ++i) {
    const float saved = logits.data()[i];
    logits.data()[i] = saved + h;
    const double up = xax::softmax_cross_entropy(logits, labels);
    logits.data()[i] = saved - h;
    const double down = xax::softmax_cross_entropy(logits, labels);
    logits.data()[i] = saved;
    EXPECT_NEAR(gradient.data()[i], (up - down) / (2 * h), 2e-4) << "element " << i;
  }
}

TEST(Reduce, LabelsFromEigenVectorsAndSpans) {
  const Eigen::MatrixXf logits = random_matrix<float>(4, 3, 5, -1.0f, 1.0f);
  Eigen::VectorXi eigen_labels(3);
  eigen_labels << 1, 3, 0;
  const std::vector<std::int32_t> vector_labels{1, 3, 0};
  EXPECT_EQ(xax::softmax_cross_entropy(logits, eigen_labels),
            xax::softmax_cross_entropy(logits, vector_labels));
  EXPECT_EQ(xax::softmax_cross_entropy(logits, std::span<const std::int32_t>(vector_labels)),
            xax::softmax_cross_entropy(logits, vector_labels));
}

TEST(Reduce, BadLabelsThrow) {
  const Eigen::MatrixXf logits = Eigen::MatrixXf::Zero(4, 3);
  EXPECT_THROW(xax::softmax_cross_entropy(logits, std::vector<std::int32_t>{0, 1}), xax::ShapeError);
  try {
    xax::softmax_cross_entropy(logits, std::vector<std::int32_t>{0, 4, 1});
    FAIL() << "no exception";
  } catch (const xax::ShapeError& error) {
    EXPECT_THAT(error.what(), ::testing::HasSubstr("label 4 of sample 1"));
    EXPECT_THAT(error.what(), ::testing::HasSubstr("[0, 4)"));
  }
  EXPECT_THROW(xax::softmax_cross_entropy(logits, std::vector<std::int32_t>{0, -1, 1}), xax::ShapeError);
  Eigen::MatrixXf wrong(2, 2);
  Eigen::Map<Eigen::MatrixXf> fixed(wrong.data(), 2, 2);
  EXPECT_THROW(xax::softmax(logits, fixed), xax::ShapeError);
}

// A fixed-size output of another shape is a ShapeError, not a resize (an Eigen assertion in debug builds),
// and one of the right shape is written.
TEST(Softmax, FixedSizeOutputsAreCheckedNotResized) {
  Eigen::Matrix<float, 2, 2> fixed;
  EXPECT_THROW(xax::softmax(Eigen::MatrixXf::Zero(3, 3).eval(), fixed), xax::ShapeError);
  xax::softmax(Eigen::MatrixXf::Zero(2, 2).eval(), fixed);
  EXPECT_EQ(fixed, (Eigen::Matrix<float, 2, 2>::Constant(0.5f)));
}

// One row of logits (1 x n) into a vector type: the vector keeps its n x 1 shape and must be written as the n
// adjacent elements of the 1 x n result, not a column of n elements apart.
TYPED_TEST(ReduceTyped, OneRowOfLogitsIntoAVectorOutput) {
  using T = TypeParam;
  Matrix<T> logits(1, 4);
  logits << static_cast<T>(0.5f), static_cast<T>(-1.0f), static_cast<T>(2.0f), static_cast<T>(3.0f);
  GuardedVector<T> log_probabilities(4);
  xax::log_softmax(logits, log_probabilities.vector);
  EXPECT_TRUE(log_probabilities.only_vector_written());
  for (Eigen::Index j = 0; j < 4; ++j) EXPECT_EQ(static_cast<float>(log_probabilities.vector(j)), 0.0f) << j;

  GuardedVector<T> probabilities(4);
  xax::softmax(logits, probabilities.vector);
  EXPECT_TRUE(probabilities.only_vector_written());
  for (Eigen::Index j = 0; j < 4; ++j) EXPECT_EQ(static_cast<float>(probabilities.vector(j)), 1.0f) << j;

  // One class: the gradient softmax - onehot is 0 everywhere.
  GuardedVector<T> dlogits(4);
  EXPECT_EQ(xax::softmax_cross_entropy(logits, std::vector<std::int32_t>(4, 0), dlogits.vector), 0.0f);
  EXPECT_TRUE(dlogits.only_vector_written());
  for (Eigen::Index j = 0; j < 4; ++j) EXPECT_EQ(static_cast<float>(dlogits.vector(j)), 0.0f) << j;
}

// A 1 x n row of a column-major matrix holds its elements a column apart: row_sums reads and writes them
// there, and leaves the other rows alone.
TYPED_TEST(ReduceTyped, RowSumsAccumulateIntoARowOfAMatrix) {
  using T = TypeParam;
  Matrix<T> accumulators = Matrix<T>::Zero(3, 4);
  accumulators(0, 2) = static_cast<T>(1.0f);
  const Matrix<T> x = Matrix<T>::Ones(4, 5);
  xax::row_sums(x, accumulators.topRows(1), /*accumulate=*/true);
  Matrix<T> expected = Matrix<T>::Zero(3, 4);
  expected.row(0).setConstant(static_cast<T>(5.0f));
  expected(0, 2) = static_cast<T>(6.0f);
  EXPECT_EQ(to_double(accumulators), to_double(expected));
}

// A Map whose outer stride is below its rows has overlapping columns: a ShapeError, not reads at other
// addresses. (The buffer is long enough that the unfixed code read no further than it.)
TEST(Reduce, OperandsWithOverlappingColumnsAreRejected) {
  std::vector<float> signal(64, 1.0f);
  for (std::size_t i = 0; i < 6; ++i) signal[i] = static_cast<float>(i + 1);
  for (const Eigen::Index stride : {Eigen::Index{0}, Eigen::Index{1}}) {
    const Eigen::Map<const Eigen::MatrixXf, 0, Eigen::OuterStride<>> windows(signal.data(), 3, 4,
                                                                             Eigen::OuterStride<>(stride));
    Eigen::MatrixXf out;
    Eigen::VectorXf sums;
    EXPECT_THROW(xax::softmax(windows, out), xax::ShapeError) << stride;
    EXPECT_THROW(xax::log_softmax(windows, out), xax::ShapeError) << stride;
    EXPECT_THROW(xax::logsumexp(windows, sums), xax::ShapeError) << stride;
    EXPECT_THROW(xax::softmax_cross_entropy(windows, std::vector<std::int32_t>{0, 1, 2, 0}), xax::ShapeError);
    EXPECT_THROW(xax::softmax_cross_entropy(windows, std::vector<std::int32_t>{0, 1, 2, 0}, out),
                 xax::ShapeError);
    EXPECT_THROW(xax::row_sums(windows, sums), xax::ShapeError) << stride;
  }
  // An output with overlapping columns cannot hold separate columns either.
  std::vector<float> storage(64, 0.0f);
  Eigen::Map<Eigen::MatrixXf, 0, Eigen::OuterStride<>> overlapping(storage.data(), 3, 4,
                                                                   Eigen::OuterStride<>(1));
  EXPECT_THROW(xax::softmax(Eigen::MatrixXf::Zero(3, 4).eval(), overlapping), xax::ShapeError);
}

// The reductions read their inputs while writing their outputs: an output that shares memory with the
// logits is a ShapeError, whether it overlaps them in part or is a plain matrix that a logits Map points into
// (resizing it would free what the Map reads).
TEST(Reduce, OutputsSharingMemoryWithTheLogitsAreRejected) {
  Eigen::MatrixXf s(3, 3);
  s << 0, 1, 2, 1, 2, 3, 2, 3, 4;
  const Eigen::MatrixXf original = s;
  EXPECT_THROW(xax::softmax(s.leftCols(2), s.rightCols(2)), xax::ShapeError);
  EXPECT_THROW(xax::log_softmax(s.leftCols(2), s.rightCols(2)), xax::ShapeError);
  EXPECT_THROW(xax::softmax_cross_entropy(s.leftCols(2), std::vector<std::int32_t>{0, 1}, s.rightCols(2)),
               xax::ShapeError);
  EXPECT_THROW(xax::logsumexp(s.leftCols(2), s.col(2)), xax::ShapeError);
  EXPECT_THROW(xax::row_sums(s.leftCols(2), s.col(1)), xax::ShapeError);
  EXPECT_EQ(s, original);

  Eigen::MatrixXf buffer = Eigen::MatrixXf::Random(16, 8);
  const Eigen::Map<const Eigen::MatrixXf> x(buffer.data(), 16, 2);
  EXPECT_THROW(xax::softmax(x, buffer), xax::ShapeError);
  EXPECT_THROW(xax::log_softmax(x, buffer), xax::ShapeError);
  EXPECT_EQ(buffer.rows(), 16);
  EXPECT_EQ(buffer.cols(), 8);

  // Separate storage, and columns of one matrix that do not overlap, are fine.
  Eigen::MatrixXf wide(3, 4);
  wide.leftCols(2) = original.leftCols(2);
  xax::softmax(wide.leftCols(2), wide.rightCols(2));
  Eigen::MatrixXf reference;
  xax::softmax(original.leftCols(2).eval(), reference);
  EXPECT_EQ(Eigen::MatrixXf(wide.rightCols(2)), reference);
}

// Exactly in place is the one overlap allowed: each column is read before its own elements are written.
TEST(Reduce, SoftmaxAndLogSoftmaxRunInPlace) {
  const Eigen::MatrixXf x = Eigen::MatrixXf::Random(37, 5);
  Eigen::MatrixXf expected, in_place = x;
  xax::softmax(x, expected);
  xax::softmax(in_place, in_place);
  EXPECT_EQ(in_place, expected);
  in_place = x;
  xax::log_softmax(x, expected);
  xax::log_softmax(in_place, in_place);
  EXPECT_EQ(in_place, expected);
}

}  // namespace
