// xax::layer_norm and its backward against double references (the backward reference itself checked by
// finite differences), with 16-bit inputs and fp32 or 16-bit gains, fp32 statistics, accumulation and
// errors.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <xax/ops/layer_norm.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/threads.hpp>

#include "op_testing.hpp"

namespace {

using xax_test::Matrix;
using xax_test::Vector;

constexpr double epsilon = 1e-5;

Eigen::MatrixXd layer_norm_reference(const Eigen::MatrixXd& x, const Eigen::VectorXd& g,
                                     const Eigen::VectorXd& b) {
  Eigen::MatrixXd y(x.rows(), x.cols());
  for (Eigen::Index j = 0; j < x.cols(); ++j) {
    const double mean = x.col(j).mean();
    const double variance = (x.col(j).array() - mean).square().mean();
    y.col(j) = ((x.col(j).array() - mean) / std::sqrt(variance + epsilon)) * g.array() + b.array();
  }
  return y;
}

struct Gradients {
  Eigen::MatrixXd dx;
  Eigen::VectorXd dg, db;
};

Gradients layer_norm_backward_reference(const Eigen::MatrixXd& x, const Eigen::VectorXd& g,
                                        const Eigen::MatrixXd& dy) {
  Gradients out{Eigen::MatrixXd(x.rows(), x.cols()), Eigen::VectorXd::Zero(x.rows()),
                Eigen::VectorXd::Zero(x.rows())};
  const auto n = static_cast<double>(x.rows());
  for (Eigen::Index j = 0; j < x.cols(); ++j) {
    const double mean = x.col(j).mean();
    const double r = 1.0 / std::sqrt((x.col(j).array() - mean).square().mean() + epsilon);
    const Eigen::ArrayXd xhat = (x.col(j).array() - mean) * r;
    out.dg.array() += dy.col(j).array() * xhat;
    out.db += dy.col(j);
    const Eigen::ArrayXd gd = dy.col(j).array() * g.array();
    out.dx.col(j) = r * (gd - gd.sum() / n - xhat * (gd * xhat).sum() / n);
  }
  return out;
}

TEST(LayerNormReference, BackwardMatchesFiniteDifferences) {
  const Eigen::MatrixXd x = xax_test::to_double(xax_test::random_matrix<float>(6, 3, 11));
  const Eigen::VectorXd g = xax_test::to_double(xax_test::random_matrix<float>(6, 1, 12));
  const Eigen::VectorXd b = xax_test::to_double(xax_test::random_matrix<float>(6, 1, 13));
  const Eigen::MatrixXd dy = xax_test::to_double(xax_test::random_matrix<float>(6, 3, 14));
  const Gradients analytic = layer_norm_backward_reference(x, g, dy);
  const auto loss = [&](const Eigen::MatrixXd& xx, const Eigen::VectorXd& gg, const Eigen::VectorXd& bb) {
    return (layer_norm_reference(xx, gg, bb).array() * dy.array()).sum();
  };
  constexpr double h = 1e-6;
  for (Eigen::Index i = 0; i < x.size(); ++i) {
    Eigen::MatrixXd plus = x, minus = x;
    plus.data()[i] += h;
    minus.data()[i] -= h;
    EXPECT_NEAR((loss(plus, g, b) - loss(minus, g, b)) / (2 * h), analytic.dx.data()[i], 1e-6);
  }
  for (Eigen::Index i = 0; i < g.size(); ++i) {
    Eigen::VectorXd plus = g, minus = g;
    plus[i] += h;
    minus[i] -= h;
    EXPECT_NEAR((loss(x, plus, b) - loss(x, minus, b)) / (2 * h), analytic.dg[i], 1e-6);
  }
}

template <class T>
class LayerNormTyped : public ::testing::Test {};
TYPED_TEST_SUITE(LayerNormTyped, xax_test::Scalars);

template <class T, class G>
void check_forward_and_backward() {
  constexpr Eigen::Index features = 48, columns = 9;
  // A large mean: a 16-bit variance of these columns would cancel to nothing; fp32 statistics do not.
  const Matrix<T> x = xax_test::random_matrix<T>(features, columns, 1, 60.0f, 68.0f);
  const Vector<G> gain = xax_test::random_matrix<G>(features, 1, 2, 0.5f, 1.5f);
  const Vector<G> bias = xax_test::random_matrix<G>(features, 1, 3, -0.5f, 0.5f);
  const Matrix<T> dy = xax_test::random_matrix<T>(features, columns, 4);
  const Eigen::MatrixXd xd = xax_test::to_double(x), dyd = xax_test::to_double(dy);
  const Eigen::VectorXd gd = xax_test::to_double(gain), bd = xax_test::to_double(bias);

  xax::LayerNormStatistics stats;
  Matrix<T> y;
  xax::layer_norm(x, gain, bias, y, stats);
  const Eigen::MatrixXd expected = layer_norm_reference(xd, gd, bd);
  // fp32 statistics: the error is the output's one rounding (plus float's own, scaled by |y| <= ~3).
  EXPECT_TRUE(xax_test::near_reference(y, expected, 1.01 * xax_test::half_ulp<T>(), 2e-5));
  for (Eigen::Index j = 0; j < columns; ++j) EXPECT_NEAR(stats.mean[j], xd.col(j).mean(), 1e-4);

  Matrix<float> y32;
  xax::layer_norm(x, gain, bias, y32, stats);
  EXPECT_TRUE(xax_test::near_reference(y32, expected, 1e-5, 2e-5));

  const Gradients reference = layer_norm_backward_reference(xd, gd, dyd);
  Eigen::MatrixXf dx;
  Vector<float> dgain, dbias;
  xax::layer_norm_backward(x, gain, stats, dy, dx, dgain, dbias);
  // dx scales with 1/std (~0.4 here): float-level errors on top of exact inputs.
  EXPECT_TRUE(xax_test::near_reference(dx, reference.dx, 1e-4, 1e-4));
  EXPECT_TRUE(xax_test::near_reference(dgain, reference.dg, 1e-5, 1e-4));
  EXPECT_TRUE(xax_test::near_reference(dbias, reference.db, 1e-5, 1e-4));

  Matrix<T> dx_t;
  Vector<G> dgain_g, dbias_g;
  xax::layer_norm_backward(x, gain, stats, dy, dx_t, dgain_g, dbias_g);
  EXPECT_TRUE(xax_test::near_reference(dx_t, reference.dx, 1.01 * xax_test::half_ulp<T>(), 1e-4));
  EXPECT_TRUE(xax_test::near_reference(dgain_g, reference.dg, 1.01 * xax_test::half_ulp<G>(), 1e-4));

  // Accumulation adds in fp32 to what is there.
  Eigen::MatrixXf dx_acc = Eigen::MatrixXf::Constant(features, columns, 2.0f);
  Vector<float> dg_acc = Vector<float>::Constant(features, -1.0f),
                db_acc = Vector<float>::Constant(features, 3.0f);
  xax::layer_norm_backward(x, gain, stats, dy, dx_acc, dg_acc, db_acc,
                           {.accumulate_input_gradient = true, .accumulate_parameter_gradients = true});
  EXPECT_TRUE(xax_test::near_reference(dx_acc, reference.dx.array() + 2.0, 1e-4, 1e-4));
  EXPECT_TRUE(xax_test::near_reference(dg_acc, reference.dg.array() - 1.0, 1e-5, 1e-4));
  EXPECT_TRUE(xax_test::near_reference(db_acc, reference.db.array() + 3.0, 1e-5, 1e-4));
}

TYPED_TEST(LayerNormTyped, Fp32GainOnTypedInputMatchesReference) {
  check_forward_and_backward<TypeParam, float>();
}

TYPED_TEST(LayerNormTyped, TypedGainMatchesReference) {
  check_forward_and_backward<TypeParam, TypeParam>();
}

TYPED_TEST(LayerNormTyped, ColumnBlocksAreNormalisedInPlaceOfTheirMatrix) {
  using T = TypeParam;
  const Matrix<T> x = xax_test::random_matrix<T>(16, 6, 21);
  const Vector<float> gain = Vector<float>::Ones(8), bias = Vector<float>::Zero(8);
  Matrix<T> y = Matrix<T>::Zero(16, 6);
  xax::LayerNormStatistics stats;
  xax::layer_norm(x.topRows(8), gain, bias, y.topRows(8), stats);
  EXPECT_TRUE(
      xax_test::near_reference(y.topRows(8),
                               layer_norm_reference(xax_test::to_double(x.topRows(8)),
                                                    Eigen::VectorXd::Ones(8), Eigen::VectorXd::Zero(8)),
                               1.01 * xax_test::half_ulp<T>(), 2e-5));
  EXPECT_EQ(static_cast<float>(y(12, 3)), 0.0f);
}

TEST(LayerNorm, RejectsBadShapesAndEpsilon) {
  const Eigen::MatrixXf x = Eigen::MatrixXf::Random(5, 3);
  const Eigen::VectorXf g = Eigen::VectorXf::Ones(5), b = Eigen::VectorXf::Zero(5);
  Eigen::MatrixXf y;
  xax::LayerNormStatistics stats;
  EXPECT_THROW(xax::layer_norm(x, Eigen::VectorXf::Ones(4).eval(), b, y, stats), xax::ShapeError);
  EXPECT_THROW(xax::layer_norm(x, g, b, y, stats, -1.0f), xax::ConfigError);
  EXPECT_THROW(xax::layer_norm(Eigen::MatrixXf(0, 3), Eigen::VectorXf(0), Eigen::VectorXf(0), y, stats),
               xax::ShapeError);
  xax::layer_norm(x, g, b, y, stats);
  Eigen::MatrixXf dx;
  Eigen::VectorXf dg, db;
  EXPECT_THROW(xax::layer_norm_backward(x, g, stats, Eigen::MatrixXf::Ones(5, 2).eval(), dx, dg, db),
               xax::ShapeError);
  xax::LayerNormStatistics other;
  xax::layer_norm(x.leftCols(2), g, b, y, other);
  EXPECT_THROW(xax::layer_norm_backward(x, g, other, x, dx, dg, db), xax::ShapeError);
}

// One feature (1 x n input) into a vector type: written as the n adjacent elements of the 1 x n result.
TYPED_TEST(LayerNormTyped, OneFeatureIntoAVectorOutput) {
  using T = TypeParam;
  Matrix<T> x(1, 4);
  x << static_cast<T>(0.5f), static_cast<T>(-1.0f), static_cast<T>(2.0f), static_cast<T>(3.0f);
  const Vector<T> gain = Vector<T>::Ones(1), bias = Vector<T>::Constant(1, static_cast<T>(7.0f));
  xax_test::GuardedVector<T> y(4);
  xax::LayerNormStatistics stats;
  xax::layer_norm(x, gain, bias, y.vector, stats);
  EXPECT_TRUE(y.only_vector_written());
  for (Eigen::Index j = 0; j < 4; ++j) EXPECT_EQ(static_cast<float>(y.vector(j)), 7.0f) << j;
}

// The gain and bias, and accumulated dgain and dbias, may be 1 x n rows of a column-major parameter matrix:
// their elements are a column apart, and are read and written there.
TYPED_TEST(LayerNormTyped, ParametersMayBeRowsOfAMatrix) {
  using T = TypeParam;
  constexpr Eigen::Index features = 6, columns = 5;
  const Matrix<T> x = xax_test::random_matrix<T>(features, columns, 41);
  const Matrix<T> dy = xax_test::random_matrix<T>(features, columns, 42);
  Matrix<T> parameters = xax_test::random_matrix<T>(3, features, 43, 0.5f, 1.5f);  // gain, bias, spare
  const Vector<T> gain = parameters.row(0).transpose(), bias = parameters.row(1).transpose();

  xax::LayerNormStatistics stats, stats_rows;
  Eigen::MatrixXf y, y_rows;
  xax::layer_norm(x, gain, bias, y, stats);
  xax::layer_norm(x, parameters.topRows(1), parameters.middleRows(1, 1), y_rows, stats_rows);
  EXPECT_EQ(y_rows, y);

  Eigen::MatrixXf dx, dx_rows;
  Eigen::VectorXf dgain = Eigen::VectorXf::Constant(features, 1.0f),
                  dbias = Eigen::VectorXf::Constant(features, 2.0f);
  Eigen::MatrixXf gradients(3, features);  // dgain, dbias, and a row that must stay as it is
  gradients.row(0).setConstant(1.0f);
  gradients.row(1).setConstant(2.0f);
  gradients.row(2).setConstant(-5.0f);
  const xax::LayerNormBackwardOptions accumulate{.accumulate_parameter_gradients = true};
  xax::layer_norm_backward(x, gain, stats, dy, dx, dgain, dbias, accumulate);
  xax::layer_norm_backward(x, parameters.topRows(1), stats, dy, dx_rows, gradients.topRows(1),
                           gradients.middleRows(1, 1), accumulate);
  EXPECT_EQ(dx_rows, dx);
  EXPECT_EQ(Eigen::VectorXf(gradients.row(0).transpose()), dgain);
  EXPECT_EQ(Eigen::VectorXf(gradients.row(1).transpose()), dbias);
  EXPECT_EQ(gradients.row(2), Eigen::RowVectorXf::Constant(features, -5.0f));
}

// layer_norm reads its input while writing its output: an output that shares memory with an input is a
// ShapeError, whether it overlaps in part or is a plain matrix an input Map points into (resizing it would
// free what the Map reads). The same for the backward's three outputs, against the inputs and each other.
TEST(LayerNorm, OutputsSharingMemoryWithOperandsAreRejected) {
  Eigen::MatrixXf m = Eigen::MatrixXf::Random(4, 5);
  const Eigen::MatrixXf original = m;
  const Eigen::VectorXf gain = Eigen::VectorXf::Ones(4), bias = Eigen::VectorXf::Zero(4);
  xax::LayerNormStatistics stats;
  EXPECT_THROW(xax::layer_norm(m.leftCols(3), gain, bias, m.rightCols(3), stats), xax::ShapeError);
  EXPECT_EQ(m, original);

  Eigen::MatrixXf buffer = Eigen::MatrixXf::Random(16, 8);
  const Eigen::Map<const Eigen::MatrixXf> x(buffer.data(), 16, 2);
  const Eigen::VectorXf gain16 = Eigen::VectorXf::Ones(16), bias16 = Eigen::VectorXf::Zero(16);
  EXPECT_THROW(xax::layer_norm(x, gain16, bias16, buffer, stats), xax::ShapeError);
  EXPECT_EQ(buffer.cols(), 8);

  Eigen::MatrixXf y;
  xax::layer_norm(m, gain, bias, y, stats);
  Eigen::MatrixXf dy = Eigen::MatrixXf::Random(4, 5), dx;
  Eigen::VectorXf dgain, dbias;
  EXPECT_THROW(xax::layer_norm_backward(m, gain, stats, dy, dy, dgain, dbias), xax::ShapeError);
  EXPECT_THROW(xax::layer_norm_backward(m, gain, stats, dy, m, dgain, dbias), xax::ShapeError);
  Eigen::MatrixXf storage = Eigen::MatrixXf::Zero(4, 7);
  EXPECT_THROW(
      xax::layer_norm_backward(m, gain, stats, dy, storage.leftCols(5), storage.col(4), storage.col(6)),
      xax::ShapeError);
  EXPECT_THROW(xax::layer_norm_backward(m, gain, stats, dy, dx, storage.col(0), storage.col(0)),
               xax::ShapeError);
}

// One empty plain object passed as two of the backward's outputs has no storage to overlap until it is
// resized: it was resized twice, dgain lost to dbias, or dx's writes landing past dgain's smaller buffer.
// So is the forward's statistics, which are outputs too: an input or y inside them was freed by their
// resize.
TEST(LayerNorm, OneObjectAsTwoOutputsOrAnOperandInsideTheStatisticsIsRejected) {
  const Eigen::MatrixXf x = xax_test::random_matrix<float>(4, 8, 41),
                        dy = xax_test::random_matrix<float>(4, 8, 42);
  const Eigen::VectorXf gain = Eigen::VectorXf::Ones(4), bias = Eigen::VectorXf::Zero(4);
  xax::LayerNormStatistics stats;
  Eigen::MatrixXf y;
  xax::layer_norm(x, gain, bias, y, stats);
  Eigen::MatrixXf dx;
  Eigen::VectorXf same_vector, dbias;
  EXPECT_THAT(
      [&] { xax::layer_norm_backward(x, gain, stats, dy, dx, same_vector, same_vector); },
      ::testing::ThrowsMessage<xax::ShapeError>(::testing::HasSubstr("dgain shares memory with dbias")));
  Eigen::MatrixXf same_matrix;
  EXPECT_THAT([&] { xax::layer_norm_backward(x, gain, stats, dy, same_matrix, same_matrix, dbias); },
              ::testing::ThrowsMessage<xax::ShapeError>(::testing::HasSubstr("dx shares memory with dgain")));

  xax::LayerNormStatistics holder;
  holder.mean = Eigen::VectorXf::Random(64);
  const Eigen::Map<const Eigen::MatrixXf> x_in_stats(holder.mean.data(), 4, 16);
  EXPECT_THAT(
      [&] { xax::layer_norm(x_in_stats, gain, bias, y, holder); },
      ::testing::ThrowsMessage<xax::ShapeError>(::testing::HasSubstr("the statistics' mean shares memory")));
  EXPECT_EQ(holder.mean.size(), 64) << "nothing resized";
  holder.inverse_std = Eigen::VectorXf::Zero(64);
  Eigen::Map<Eigen::MatrixXf> y_in_stats(holder.inverse_std.data(), 4, 8);
  EXPECT_THROW(xax::layer_norm(x, gain, bias, y_in_stats, holder), xax::ShapeError);
}

}  // namespace

namespace {

// The backward sums dgain and dbias over fixed chunks of columns, which may run on several threads: with
// many columns (several chunks, the last one partial) the result matches the reference and is bit for bit
// the same on one and two threads.
TEST(LayerNorm, BackwardOverManyColumnsDoesNotDependOnTheThreadCount) {
  constexpr Eigen::Index features = 40, columns = 1000;
  const Eigen::MatrixXf x = xax_test::random_matrix<float>(features, columns, 31, -2.0f, 3.0f);
  const Eigen::VectorXf gain = xax_test::random_matrix<float>(features, 1, 32, 0.5f, 1.5f);
  const Eigen::VectorXf bias = xax_test::random_matrix<float>(features, 1, 33);
  const Eigen::MatrixXf dy = xax_test::random_matrix<float>(features, columns, 34);
  xax::LayerNormStatistics stats;
  Eigen::MatrixXf y;
  xax::layer_norm(x, gain, bias, y, stats);
  Eigen::MatrixXf dx_one, dx_two;
  Eigen::VectorXf dg_one, db_one, dg_two, db_two;
  xax::set_num_threads(1);
  xax::layer_norm_backward(x, gain, stats, dy, dx_one, dg_one, db_one);
  xax::set_num_threads(2);
  xax::layer_norm_backward(x, gain, stats, dy, dx_two, dg_two, db_two);
  xax::set_num_threads(1);
  EXPECT_TRUE(dx_one == dx_two);
  EXPECT_TRUE(dg_one == dg_two);
  EXPECT_TRUE(db_one == db_two);
  const Gradients reference = layer_norm_backward_reference(xax_test::to_double(x), xax_test::to_double(gain),
                                                            xax_test::to_double(dy));
  EXPECT_TRUE(xax_test::near_reference(dx_two, reference.dx, 1e-4, 1e-4));
  EXPECT_TRUE(xax_test::near_reference(dg_two, reference.dg, 1e-5, 1e-3));
  EXPECT_TRUE(xax_test::near_reference(db_two, reference.db, 1e-5, 1e-3));
}

// x, dx and dy as row blocks of one matrix, the one overlap the backward allows: float columns are read and
// written where they are, here at every alignment (37 features) and over several chunks, with and without
// accumulating into dx, and give what contiguous operands give.
TEST(LayerNorm, BackwardOnRowBlocksOfOneMatrixMatchesContiguousOperands) {
  constexpr Eigen::Index features = 37, columns = 130;
  const Eigen::MatrixXf original = xax_test::random_matrix<float>(3 * features + 1, columns, 51);
  const Eigen::VectorXf gain = xax_test::random_matrix<float>(features, 1, 52, 0.5f, 1.5f);
  const Eigen::VectorXf bias = xax_test::random_matrix<float>(features, 1, 53);
  const Eigen::MatrixXf x = original.middleRows(1, features);
  const Eigen::MatrixXf dx_start = original.middleRows(1 + features, features);
  const Eigen::MatrixXf dy = original.middleRows(1 + 2 * features, features);
  xax::LayerNormStatistics stats;
  Eigen::MatrixXf y;
  xax::layer_norm(x, gain, bias, y, stats);
  const Gradients reference = layer_norm_backward_reference(xax_test::to_double(x), xax_test::to_double(gain),
                                                            xax_test::to_double(dy));
  for (const bool accumulate : {false, true}) {
    const xax::LayerNormBackwardOptions options{.accumulate_input_gradient = accumulate};
    Eigen::MatrixXf dx = dx_start, m = original;
    Eigen::VectorXf dgain, dbias, dgain_m, dbias_m;
    xax::layer_norm_backward(x, gain, stats, dy, dx, dgain, dbias, options);
    xax::layer_norm_backward(m.middleRows(1, features), gain, stats, m.middleRows(1 + 2 * features, features),
                             m.middleRows(1 + features, features), dgain_m, dbias_m, options);
    EXPECT_EQ(dgain_m, dgain) << accumulate;
    EXPECT_EQ(dbias_m, dbias) << accumulate;
    EXPECT_EQ(Eigen::MatrixXf(m.middleRows(1 + features, features)), dx) << accumulate;
    Eigen::MatrixXd expected = reference.dx;
    if (accumulate) expected += xax_test::to_double(dx_start);
    EXPECT_TRUE(xax_test::near_reference(dx, expected, 1e-4, 1e-4)) << accumulate;
    EXPECT_EQ(Eigen::MatrixXf(m.topRows(1 + features)), Eigen::MatrixXf(original.topRows(1 + features)))
        << "x and the row above it are untouched";
    EXPECT_EQ(Eigen::MatrixXf(m.bottomRows(features)), dy) << "dy is untouched";
  }
  Eigen::MatrixXf dy_copy = dy;
  Eigen::VectorXf dgain, dbias;
  EXPECT_THROW(xax::layer_norm_backward(x, gain, stats, dy_copy, dy_copy, dgain, dbias,
                                        {.accumulate_input_gradient = true}),
               xax::ShapeError);
}

// Exactly in place is the one overlap allowed: a column's statistics are taken before it is written.
TEST(LayerNorm, RunsInPlace) {
  const Eigen::MatrixXf x = Eigen::MatrixXf::Random(37, 5);
  const Eigen::VectorXf gain = Eigen::VectorXf::Random(37), bias = Eigen::VectorXf::Random(37);
  xax::LayerNormStatistics stats, in_place_stats;
  Eigen::MatrixXf expected, in_place = x;
  xax::layer_norm(x, gain, bias, expected, stats);
  xax::layer_norm(in_place, gain, bias, in_place, in_place_stats);
  EXPECT_EQ(in_place, expected);
  EXPECT_EQ(in_place_stats.mean, stats.mean);
}

}  // namespace
