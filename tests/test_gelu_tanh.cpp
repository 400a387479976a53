// xax::gelu_tanh and its backward against double references (the derivative checked by finite differences
// too), on contiguous matrices and column blocks, and shape errors.

#include <gtest/gtest.h>

#include <xax/ops/gelu_tanh.hpp>
#include <xax/utils/error.hpp>

#include "op_testing.hpp"

namespace {

using xax_test::Matrix;

double gelu_tanh_reference(double x) {
  const double c = std::sqrt(2.0 / 3.14159265358979323846);
  return 0.5 * x * (1.0 + std::tanh(c * (x + 0.044715 * x * x * x)));
}

double gelu_tanh_derivative_reference(double x) {
  const double c = std::sqrt(2.0 / 3.14159265358979323846);
  const double t = std::tanh(c * (x + 0.044715 * x * x * x));
  return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x);
}

TEST(GeluTanhReference, DerivativeMatchesFiniteDifferencesAndKnownValues) {
  for (double x = -6.0; x <= 6.0; x += 0.37) {
    const double h = 1e-6;
    EXPECT_NEAR((gelu_tanh_reference(x + h) - gelu_tanh_reference(x - h)) / (2 * h),
                gelu_tanh_derivative_reference(x), 1e-8);
  }
  // torch.nn.functional.gelu(torch.tensor([1.0, -1.0], dtype=torch.float64), approximate='tanh')
  EXPECT_NEAR(gelu_tanh_reference(1.0), 0.8411919906082768, 1e-15);
  EXPECT_NEAR(gelu_tanh_reference(-1.0), -0.15880800939172324, 1e-15);
}

template <class T>
class GeluTanhTyped : public ::testing::Test {};
TYPED_TEST_SUITE(GeluTanhTyped, xax_test::Scalars);

TYPED_TEST(GeluTanhTyped, ForwardAndBackwardMatchReference) {
  using T = TypeParam;
  const Matrix<T> x = xax_test::random_matrix<T>(37, 29, 1, -7.0f, 7.0f);
  const Matrix<T> dy = xax_test::random_matrix<T>(37, 29, 2);
  const Eigen::MatrixXd xd = xax_test::to_double(x), dyd = xax_test::to_double(dy);
  const Eigen::MatrixXd expected = xd.unaryExpr(&gelu_tanh_reference);
  const Eigen::MatrixXd expected_dx = dyd.cwiseProduct(xd.unaryExpr(&gelu_tanh_derivative_reference));

  Matrix<T> y;
  xax::gelu_tanh(x, y);
  EXPECT_TRUE(xax_test::near_reference(y, expected, 1.01 * xax_test::half_ulp<T>(), 1e-6));
  Eigen::MatrixXf y32;
  xax::gelu_tanh(x, y32);
  EXPECT_TRUE(xax_test::near_reference(y32, expected, 1e-5, 1e-6));

  Matrix<T> dx;
  xax::gelu_tanh_backward(x, dy, dx);
  EXPECT_TRUE(xax_test::near_reference(dx, expected_dx, 1.01 * xax_test::half_ulp<T>(), 1e-5));
  Eigen::MatrixXf dx32;
  xax::gelu_tanh_backward(x, dy, dx32);
  EXPECT_TRUE(xax_test::near_reference(dx32, expected_dx, 1e-5, 1e-5));

  // In place: y may be x, dx may be dy.
  Matrix<T> in_place = x;
  xax::gelu_tanh(in_place, in_place);
  EXPECT_TRUE(in_place == y);
  Matrix<T> grad_in_place = dy;
  xax::gelu_tanh_backward(x, grad_in_place, grad_in_place);
  EXPECT_TRUE(grad_in_place == dx);
}

TYPED_TEST(GeluTanhTyped, ColumnBlocksLeaveTheRestUntouched) {
  using T = TypeParam;
  const Matrix<T> x = xax_test::random_matrix<T>(20, 5, 3);
  Matrix<T> y = Matrix<T>::Constant(20, 5, T(9.0f));
  xax::gelu_tanh(x.topRows(10), y.topRows(10));
  EXPECT_TRUE(xax_test::near_reference(y.topRows(10),
                                       xax_test::to_double(x.topRows(10)).unaryExpr(&gelu_tanh_reference),
                                       1.01 * xax_test::half_ulp<T>(), 1e-6));
  EXPECT_EQ(static_cast<float>(y(15, 2)), 9.0f);
  Matrix<T> dx = Matrix<T>::Constant(20, 5, T(9.0f));
  xax::gelu_tanh_backward(x.bottomRows(10), x.bottomRows(10), dx.bottomRows(10));
  EXPECT_EQ(static_cast<float>(dx(3, 2)), 9.0f);
  EXPECT_NEAR(static_cast<float>(dx(15, 2)),
              static_cast<double>(static_cast<float>(x(15, 2))) *
                  gelu_tanh_derivative_reference(static_cast<float>(x(15, 2))),
              1e-2);
}

TEST(GeluTanh, RejectsMismatchedShapes) {
  Eigen::MatrixXf dx;
  EXPECT_THROW(
      xax::gelu_tanh_backward(Eigen::MatrixXf::Zero(3, 4).eval(), Eigen::MatrixXf::Zero(4, 3).eval(), dx),
      xax::ShapeError);
  Eigen::Matrix<float, 2, 2> fixed;
  EXPECT_THROW(xax::gelu_tanh(Eigen::MatrixXf::Zero(3, 3).eval(), fixed), xax::ShapeError);
}

// A 1 x n input into a vector type: written as the n adjacent elements of the 1 x n result.
TYPED_TEST(GeluTanhTyped, OneRowIntoAVectorOutput) {
  using T = TypeParam;
  Matrix<T> x(1, 4);
  x << static_cast<T>(0.5f), static_cast<T>(-1.0f), static_cast<T>(2.0f), static_cast<T>(3.0f);
  Matrix<T> expected;
  xax::gelu_tanh(x, expected);
  xax_test::GuardedVector<T> y(4);
  xax::gelu_tanh(x, y.vector);
  EXPECT_TRUE(y.only_vector_written());
  for (Eigen::Index j = 0; j < 4; ++j)
    EXPECT_EQ(static_cast<float>(y.vector(j)), static_cast<float>(expected(0, j)));
  const Matrix<T> dy = Matrix<T>::Ones(1, 4);
  Matrix<T> expected_dx;
  xax::gelu_tanh_backward(x, dy, expected_dx);
  xax_test::GuardedVector<T> dx(4);
  xax::gelu_tanh_backward(x, dy, dx.vector);
  EXPECT_TRUE(dx.only_vector_written());
  for (Eigen::Index j = 0; j < 4; ++j)
    EXPECT_EQ(static_cast<float>(dx.vector(j)), static_cast<float>(expected_dx(0, j)));
}

// Exactly in place is documented and works (ForwardAndBackwardMatchReference); any other sharing of memory
// between the output and an input is a ShapeError: a partial overlap reads results as inputs, and a plain
// output that an input Map points into would be freed by its resize.
TEST(GeluTanh, OutputsPartlySharingMemoryWithInputsAreRejected) {
  Eigen::MatrixXf m(2, 4);
  m << 1, 2, 3, 4, 1, 2, 3, 4;
  const Eigen::MatrixXf original = m;
  EXPECT_THROW(xax::gelu_tanh(m.leftCols(3), m.rightCols(3)), xax::ShapeError);
  EXPECT_THROW(xax::gelu_tanh_backward(m.leftCols(3), m.leftCols(3), m.rightCols(3)), xax::ShapeError);
  EXPECT_THROW(xax::gelu_tanh_backward(m.leftCols(3), m.rightCols(3), m.leftCols(3)), xax::ShapeError);
  EXPECT_EQ(m, original);

  Eigen::MatrixXf buffer = Eigen::MatrixXf::Random(16, 8);
  const Eigen::Map<const Eigen::MatrixXf> x(buffer.data(), 16, 2);
  EXPECT_THROW(xax::gelu_tanh(x, buffer), xax::ShapeError);
  EXPECT_EQ(buffer.cols(), 8);

  // Column blocks of one matrix that share no element are separate operands.
  Eigen::MatrixXf wide = original;
  xax::gelu_tanh(wide.leftCols(2), wide.rightCols(2));
  Eigen::MatrixXf expected;
  xax::gelu_tanh(original.leftCols(2).eval(), expected);
  EXPECT_EQ(Eigen::MatrixXf(wide.rightCols(2)), expected);
}

}  // namespace
