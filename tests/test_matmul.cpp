// xax::matmul: every transposition variant and scalar against a double reference, with bounds that a bf16
// accumulator fails; the epilogue (bias, ReLU, GELU, accumulation); operand layouts; backend agreement; and
// the errors.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>
#include <xax/ops/matmul.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/platform.hpp>

#include "op_testing.hpp"

namespace {

using xax_test::Matrix;
using xax_test::random_matrix;
using xax_test::to_double;
using xax_test::Vector;
using MatrixXd = Eigen::MatrixXd;

/// Unit roundoff of the output type: half an ulp, relative.
template <class T>
double unit_roundoff() {
  if constexpr (std::is_same_v<T, xax::bfloat16>) {
    return std::ldexp(1.0, -8);
  } else if constexpr (std::is_same_v<T, xax::float16>) {
    return std::ldexp(1.0, -11);
  } else {
    return std::ldexp(1.0, -24);
  }
}

/// The error bound for one element of a K-term fp32 sum of positive products rounded once to Out: one
/// rounding of the output plus a generous fp32 accumulation term. A bf16 accumulator (one rounding per
/// multiply-add) is two orders of magnitude outside it for K = 1024 (see BFloat16AccumulatorFailsTheBound).
template <class Out>
double element_bound(double magnitude, Eigen::Index k) {
  return magnitude * (unit_roundoff<Out>() + 4e-7 * std::sqrt(static_cast<double>(k)) + 1e-7);
}

template <class Out>
void expect_near_reference(const Matrix<Out>& actual, const MatrixXd& reference, Eigen::Index k,
                           const std::string& what) {
  ASSERT_EQ(actual.rows(), reference.rows()) << what;
  ASSERT_EQ(actual.cols(), reference.cols()) << what;
  int failures = 0;
  for (Eigen::Index j = 0; j < reference.cols(); ++j) {
    for (Eigen::Index i = 0; i < reference.rows(); ++i) {
      const double expected = reference(i, j);
      const double got = static_cast<double>(static_cast<float>(actual(i, j)));
      const double bound = element_bound<Out>(std::max(std::abs(expected), 1e-3), k);
      if (std::abs(got - expected) > bound && ++failures <= 5) {
        ADD_FAILURE() << what << ": element (" << i << ", " << j << ") is " << got << ", reference "
                      << expected << ", bound " << bound;
      }
    }
  }
  EXPECT_EQ(failures, 0) << what;
}

double gelu(double x) {
  return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
}

template <class T>
class MatmulTyped : public ::testing::Test {};
using Scalars = ::testing::Types<float, xax::bfloat16, xax::float16>;
TYPED_TEST_SUITE(MatmulTyped, Scalars);

// K = 1024 positive data: the products of U[0,1) pairs sum to ~256, where a bf16 accumulator loses
// everything below 1 and ends up ~20 % low.
constexpr Eigen::Index kM = 37, kN = 29, kK = 1024;

TYPED_TEST(MatmulTyped, EveryTranspositionAccumulatesInFloatAndRoundsOnce) {
  using T = TypeParam;
  const Matrix<T> a = random_matrix<T>(kM, kK, 1, 0.0f, 1.0f);
  const Matrix<T> b = random_matrix<T>(kK, kN, 2, 0.0f, 1.0f);
  const MatrixXd reference = to_double(a) * to_double(b);
  const Matrix<T> a_t = a.transpose();
  const Matrix<T> b_t = b.transpose();

  Matrix<T> c;
  xax::matmul(a, b, c);
  expect_near_reference(c, reference, kK, "A*B");
  xax::matmul(a_t, b, c, {.transpose_a = true});
  expect_near_reference(c, reference, kK, "A^T*B");
  xax::matmul(a, b_t, c, {.transpose_b = true});
  expect_near_reference(c, reference, kK, "A*B^T");
  xax::matmul(a_t, b_t, c, {.transpose_a = true, .transpose_b = true});
  expect_near_reference(c, reference, kK, "A^T*B^T");
}

TYPED_TEST(MatmulTyped, FloatOutputFromHalfInputsKeepsFullAccumulatorPrecision) {
  using T = TypeParam;
  const Matrix<T> a = random_matrix<T>(kM, kK, 3, 0.0f, 1.0f);
  const Matrix<T> b = random_matrix<T>(kK, kN, 4, 0.0f, 1.0f);
  Eigen::MatrixXf c;
  xax::matmul(a, b, c);
  expect_near_reference(Matrix<float>(c), to_double(a) * to_double(b), kK, "A*B into float");
}

TYPED_TEST(MatmulTyped, SignedDataMatchesReference) {
  using T = TypeParam;
  const Matrix<T> a = random_matrix<T>(64, 300, 5, -1.0f, 1.0f);
  const Matrix<T> b = random_matrix<T>(300, 48, 6, -1.0f, 1.0f);
  const MatrixXd reference = to_double(a) * to_double(b);
  Eigen::MatrixXf c;
  xax::matmul(a, b, c);
  // Cancellation makes elementwise relative bounds meaningless; bound the error by the sum of |products|.
  const MatrixXd magnitude = to_double(a).cwiseAbs() * to_double(b).cwiseAbs();
  for (Eigen::Index i = 0; i < reference.size(); ++i) {
    EXPECT_LE(std::abs(static_cast<double>(c.data()[i]) - reference.data()[i]),
              1e-6 * magnitude.data()[i] + 1e-9)
        << "element " << i;
  }
}

TYPED_TEST(MatmulTyped, BiasAndActivationEpilogue) {
  using T = TypeParam;
  const Matrix<T> w = random_matrix<T>(40, 200, 7, -1.0f, 1.0f);
  const Matrix<T> x = random_matrix<T>(200, 33, 8, -1.0f, 1.0f);
  const Vector<T> bias = random_matrix<T>(40, 1, 9, -2.0f, 2.0f);
  MatrixXd z = to_double(w) * to_double(x);
  z.colwise() += to_double(Matrix<T>(bias)).col(0);
  for (const auto activation : {xax::Activation::none, xax::Activation::relu, xax::Activation::gelu}) {
    Matrix<T> y;
    xax::matmul(w, x, bias, y, {.activation = activation});
    MatrixXd expected = z;
    if (activation == xax::Activation::relu) expected = z.cwiseMax(0.0);
    if (activation == xax::Activation::gelu) expected = z.unaryExpr([](double v) { return gelu(v); });
    const MatrixXd magnitude = (to_double(w).cwiseAbs() * to_double(x).cwiseAbs()).colwise() +
                               to_double(Matrix<T>(bias)).col(0).cwiseAbs();
    for (Eigen::Index i = 0; i < expected.size(); ++i) {
      const double got = static_cast<double>(static_cast<float>(y.data()[i]));
      EXPECT_LE(std::abs(got - expected.data()[i]),
                unit_roundoff<T>() * std::abs(expected.data()[i]) + 2e-6 * magnitude.data()[i] + 1e-6)
          << xax::activation_name(activation) << " element " << i;
    }
  }
}

TYPED_TEST(MatmulTyped, AccumulateAddsToTheOutputBeforeOneRounding) {
  using T = TypeParam;
  const Matrix<T> a = random_matrix<T>(kM, 256, 10, 0.0f, 1.0f);
  const Matrix<T> b = random_matrix<T>(kN, 256, 11, 0.0f, 1.0f);
  Eigen::MatrixXf c = random_matrix<float>(kM, kN, 12, 0.0f, 100.0f);
  const MatrixXd reference = c.cast<double>() + to_double(a) * to_double(b).transpose();
  xax::matmul(a, b, c, {.transpose_b = true, .accumulate = true});
  expect_near_reference(Matrix<float>(c), reference, 256, "C += A*B^T into float");

  Matrix<T> c_half = random_matrix<T>(kM, kN, 13, 0.0f, 100.0f);
  const MatrixXd reference_half = to_double(c_half) + to_double(a) * to_double(b).transpose();
  xax::matmul(a, b, c_half, {.transpose_b = true, .accumulate = true});
  expect_near_reference(c_half, reference_half, 256, "C += A*B^T");
}

TYPED_TEST(MatmulTyped, RowMajorOperandsTransposedViewsMapsAndBlocks) {
  using T = TypeParam;
  const Matrix<T> a = random_matrix<T>(kM, 200, 14, 0.0f, 1.0f);
  const Matrix<T> b = random_matrix<T>(200, kN, 15, 0.0f, 1.0f);
  const MatrixXd reference = to_double(a) * to_double(b);

  const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> a_row = a;
  Matrix<T> c;
  xax::matmul(a_row, b, c);
  expect_near_reference(c, reference, 200, "row-major A");

  const Matrix<T> b_t = b.transpose();
  xax::matmul(a, b_t.transpose(), c);
  expect_near_reference(c, reference, 200, "B given as a transposed view");

  // A strided output: a block of a larger matrix, written in place; the rest is untouched.
  Matrix<T> big = Matrix<T>::Constant(kM + 5, kN + 3, static_cast<T>(-7.0f));
  xax::matmul(a, b, big.block(2, 1, kM, kN));
  expect_near_reference(Matrix<T>(big.block(2, 1, kM, kN)), reference, 200, "block output");
  EXPECT_EQ(static_cast<float>(big(0, 0)), -7.0f);
  EXPECT_EQ(static_cast<float>(big(kM + 4, kN + 2)), -7.0f);

  // Contiguous maps of caller-owned storage.
  std::vector<T> storage(static_cast<std::size_t>(kM * kN));
  Eigen::Map<Matrix<T>> c_map(storage.data(), kM, kN);
  const Eigen::Map<const Matrix<T>> a_map(a.data(), a.rows(), a.cols());
  xax::matmul(a_map, b, c_map);
  expect_near_reference(Matrix<T>(c_map), reference, 200, "maps");

  // An operand that is a block (strided columns) of a larger matrix.
  const Matrix<T> a_wide = random_matrix<T>(kM + 10, 260, 16, 0.0f, 1.0f);
  xax::matmul(a_wide.block(3, 40, kM, 200), b, c);
  expect_near_reference(c, to_double(Matrix<T>(a_wide.block(3, 40, kM, 200))) * to_double(b), 200,
                        "block input");
}

TYPED_TEST(MatmulTyped, EmptyReductionGivesTheEpilogueOfZero) {
  using T = TypeParam;
  const Matrix<T> a(3, 0);
  const Matrix<T> b(0, 4);
  Vector<T> bias(3);
  bias << static_cast<T>(1.0f), static_cast<T>(-2.0f), static_cast<T>(3.0f);
  Matrix<T> c;
  xax::matmul(a, b, bias, c, {.activation = xax::Activation::relu});
  ASSERT_EQ(c.rows(), 3);
  ASSERT_EQ(c.cols(), 4);
  for (Eigen::Index j = 0; j < 4; ++j) {
    EXPECT_EQ(static_cast<float>(c(0, j)), 1.0f);
    EXPECT_EQ(static_cast<float>(c(1, j)), 0.0f);
    EXPECT_EQ(static_cast<float>(c(2, j)), 3.0f);
  }
  Matrix<T> empty_out;
  xax::matmul(Matrix<T>(0, 5), Matrix<T>(5, 2), empty_out);
  EXPECT_EQ(empty_out.rows(), 0);
  EXPECT_EQ(empty_out.cols(), 2);
}

TYPED_TEST(MatmulTyped, BackendsAgree) {
  using T = TypeParam;
  if (!xax::matmul_backend_available(xax::MatmulBackend::onednn)) {
    GTEST_SKIP() << "this build has no oneDNN backend";
  }
  const Matrix<T> a = random_matrix<T>(96, 512, 17, -1.0f, 1.0f);
  const Matrix<T> b = random_matrix<T>(80, 512, 18, -1.0f, 1.0f);
  const Vector<T> bias = random_matrix<T>(96, 1, 19, -1.0f, 1.0f);
  for (const auto activation : {xax::Activation::none, xax::Activation::relu, xax::Activation::gelu}) {
    Eigen::MatrixXf eigen_result, onednn_result;
    xax::matmul(a, b, bias, eigen_result,
                {.transpose_b = true, .activation = activation, .backend = xax::MatmulBackend::eigen});
    EXPECT_THAT(xax::last_matmul_implementation(), ::testing::StartsWith("eigen:"));
    xax::matmul(a, b, bias, onednn_result,
                {.transpose_b = true, .activation = activation, .backend = xax::MatmulBackend::onednn});
    EXPECT_THAT(xax::last_matmul_implementation(), ::testing::StartsWith("onednn:"));
    // Both accumulate in fp32; only the order of the additions differs.
    const MatrixXd magnitude = to_double(a).cwiseAbs() * to_double(b).cwiseAbs().transpose();
    for (Eigen::Index i = 0; i < eigen_result.size(); ++i) {
      EXPECT_LE(std::abs(eigen_result.data()[i] - onednn_result.data()[i]), 2e-6 * magnitude.data()[i] + 1e-6)
          << xax::activation_name(activation) << " element " << i;
    }
    // Rounded to a half type, they agree to one unit in the last place.
    if constexpr (std::is_same_v<T, float>) continue;
    Matrix<T> eigen_half, onednn_half;
    xax::matmul(a, b, bias, eigen_half,
                {.transpose_b = true, .activation = activation, .backend = xax::MatmulBackend::eigen});
    xax::matmul(a, b, bias, onednn_half,
                {.transpose_b = true, .activation = activation, .backend = xax::MatmulBackend::onednn});
    for (Eigen::Index i = 0; i < eigen_half.size(); ++i) {
      const double x = static_cast<float>(eigen_half.data()[i]);
      const double y = static_cast<float>(onednn_half.data()[i]);
      EXPECT_LE(std::abs(x - y), 2 * unit_roundoff<T>() * std::max(std::abs(x), std::abs(y)) + 1e-5)
          << xax::activation_name(activation) << " element " << i;
    }
  }
}

TEST(Matmul, BFloat16AccumulatorFailsTheBound) {
  // The bound used above is tight enough to catch what Eigen's Matrix<bfloat16> product does: round the
  // running sum to bf16 after every multiply-add.
  const Matrix<xax::bfloat16> a = random_matrix<xax::bfloat16>(1, kK, 1, 0.0f, 1.0f);
  const Matrix<xax::bfloat16> b = random_matrix<xax::bfloat16>(kK, 1, 2, 0.0f, 1.0f);
  xax::bfloat16 sum(0.0f);
  for (Eigen::Index i = 0; i < kK; ++i) {
    sum = static_cast<xax::bfloat16>(static_cast<float>(sum) +
                                     static_cast<float>(a(0, i)) * static_cast<float>(b(i, 0)));
  }
  const double reference = (to_double(a) * to_double(b))(0, 0);
  EXPECT_GT(std::abs(static_cast<float>(sum) - reference), 10 * element_bound<xax::bfloat16>(reference, kK));
  Matrix<xax::bfloat16> c;
  xax::matmul(a, b, c);
  EXPECT_LE(std::abs(static_cast<float>(c(0, 0)) - reference), element_bound<xax::bfloat16>(reference, kK));
}

TEST(Matmul, ShapeMismatchThrowsWithBothShapes) {
  const Eigen::MatrixXf a(3, 4), b(5, 6);
  Eigen::MatrixXf c;
  try {
    xax::matmul(a, b, c);
    FAIL() << "no exception";
  } catch (const xax::ShapeError& error) {
    EXPECT_THAT(error.what(), ::testing::HasSubstr("3x4"));
    EXPECT_THAT(error.what(), ::testing::HasSubstr("5x6"));
  }
  EXPECT_THROW(xax::matmul(a, b, c, {.transpose_a = true}), xax::ShapeError);
  EXPECT_NO_THROW(xax::matmul(a, Eigen::MatrixXf(6, 4), c, {.transpose_b = true}));

  Eigen::MatrixXf fixed_shape(2, 2);
  Eigen::Map<Eigen::MatrixXf> wrong_output(fixed_shape.data(), 2, 2);
  try {
    xax::matmul(a, Eigen::MatrixXf(4, 6), wrong_output);
    FAIL() << "no exception";
  } catch (const xax::ShapeError& error) {
    EXPECT_THAT(error.what(), ::testing::HasSubstr("2x2"));
    EXPECT_THAT(error.what(), ::testing::HasSubstr("3x6"));
  }
  Eigen::MatrixXf accumulated(3, 5);
  EXPECT_THROW(xax::matmul(a, Eigen::MatrixXf(4, 6), accumulated, {.accumulate = true}), xax::ShapeError);
  EXPECT_THROW(xax::matmul(a, Eigen::MatrixXf(4, 6), Eigen::VectorXf(4), c), xax::ShapeError);
  EXPECT_THROW(xax::matmul(a, Eigen::MatrixXf(4, 6), Eigen::MatrixXf(3, 2), c), xax::ShapeError);
}

// A bias must be a vector whatever its storage. A matrix with as many elements as the output has rows was
// accepted when its elements were not adjacent (a block, or any plain matrix): it was copied down its first
// column first, reading past that column, or past the storage with a small outer stride.
TYPED_TEST(MatmulTyped, ABiasThatIsNotAVectorIsRefusedWhateverItsStorage) {
  using T = TypeParam;
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  const Matrix a = Matrix::Zero(6, 2), b = Matrix::Zero(2, 1);
  Matrix params = Matrix::Ones(4, 3);
  Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic> c;
  EXPECT_THAT([&] { xax::matmul(a, b, params.topRows(2), c); },
              ::testing::ThrowsMessage<xax::ShapeError>(::testing::StrEq(
                  "xax::matmul: the bias is 2x3 but must be a vector of length 6 (the rows of the output)")));
  EXPECT_THROW(xax::matmul(a, b, Matrix(params.topRows(2)), c), xax::ShapeError);
  std::vector<T> storage(3, T(1.0f));
  const Eigen::Map<const Matrix, 0, Eigen::OuterStride<>> repeated(storage.data(), 3, 4,
                                                                   Eigen::OuterStride<>(0));
  EXPECT_THROW(xax::matmul(Matrix::Zero(12, 2).eval(), b, repeated, c), xax::ShapeError);
  // A row of a matrix is a vector a column apart: still accepted, and read element by element.
  Matrix rows(2, 6);
  rows.row(0) = Eigen::RowVectorXf::LinSpaced(6, 1.0f, 6.0f).template cast<T>();
  rows.row(1).setZero();
  xax::matmul(a, b, rows.topRows(1), c);
  EXPECT_EQ(c, Eigen::VectorXf::LinSpaced(6, 1.0f, 6.0f));
}

TEST(Matmul, OutputViewOverlappingAnInputThrows) {
  Eigen::MatrixXf a = Eigen::MatrixXf::Ones(4, 4);
  Eigen::Map<Eigen::MatrixXf> view(a.data(), 4, 4);
  EXPECT_THROW(xax::matmul(a, Eigen::MatrixXf::Ones(4, 4).eval(), view), xax::Error);
  EXPECT_THROW(xax::matmul(a, Eigen::MatrixXf::Ones(4, 4).eval(), view, {.accumulate = true}), xax::Error);
  EXPECT_EQ(a, Eigen::MatrixXf::Ones(4, 4));
}

// A plain output that is also an input takes the product through a temporary, as Eigen's `a = a * b` does,
// whatever the product's shape: resizing it first would free the storage the input is read from.
TEST(Matmul, PlainOutputAliasingAnInputOfAnotherShape) {
  Eigen::MatrixXf a(2, 3);
  a << 1, 2, 3, 4, 5, 6;
  Eigen::MatrixXf b(3, 4);
  b << 1, 0, 2, -1, 0, 1, 1, 2, -1, 3, 0, 1;
  Eigen::MatrixXf expected_ab(2, 4);
  expected_ab << -2, 11, 4, 6, -2, 23, 13, 12;

  Eigen::MatrixXf expected_gram(2, 2);
  expected_gram << 14, 32, 32, 77;
  // The Eigen backend reads the operands in instrumented code, where ASan reports a read of freed storage.
  for (const auto backend : {xax::MatmulBackend::eigen, xax::MatmulBackend::automatic}) {
    SCOPED_TRACE(std::string(xax::matmul_backend_name(backend)));
    Eigen::MatrixXf out_a = a;
    xax::matmul(out_a, b, out_a, {.backend = backend});  // 2x3 becomes 2x4
    EXPECT_EQ(out_a, expected_ab);

    Eigen::MatrixXf out_b = b;
    xax::matmul(a, out_b, out_b, {.backend = backend});  // 3x4 becomes 2x4
    EXPECT_EQ(out_b, expected_ab);

    // a a^T through the transposition flag: 2x3 becomes 2x2.
    Eigen::MatrixXf gram = a;
    xax::matmul(gram, gram, gram, {.transpose_b = true, .backend = backend});
    EXPECT_EQ(gram, expected_gram);
  }

  // Accumulating into an output that is also an input adds the product of the old values.
  Eigen::MatrixXf square(2, 2);
  square << 1, 2, 3, 4;
  xax::matmul(square, square, square, {.accumulate = true});
  Eigen::MatrixXf expected_square(2, 2);
  expected_square << 8, 12, 18, 26;
  EXPECT_EQ(square, expected_square);

  // The bias may alias the output as well.
  Eigen::MatrixXf column(2, 1);
  column << 1, 2;
  Eigen::MatrixXf ones = Eigen::MatrixXf::Ones(1, 1);
  xax::matmul(column, ones, column.col(0), column);
  Eigen::MatrixXf expected_column(2, 1);
  expected_column << 2, 4;
  EXPECT_EQ(column, expected_column);
}

TEST(Matmul, HalfPlainOutputAliasingAnInputOfAnotherShape) {
  using xax::bfloat16;
  for (const auto backend : {xax::MatmulBackend::eigen, xax::MatmulBackend::automatic}) {
    Matrix<bfloat16> a = Matrix<float>::Constant(3, 5, 2.0f).cast<bfloat16>();
    Matrix<bfloat16> b = Matrix<float>::Constant(5, 7, 0.5f).cast<bfloat16>();
    xax::matmul(a, b, a, {.backend = backend});
    ASSERT_EQ(a.rows(), 3);
    ASSERT_EQ(a.cols(), 7);
    for (Eigen::Index i = 0; i < a.size(); ++i) EXPECT_EQ(static_cast<float>(a.data()[i]), 5.0f);
  }
}

// An integer cast to Activation or MatmulBackend that names none of their values is a ConfigError raised
// before C is resized: a switch over the activation skipped the epilogue (silently un-activated output), and
// the bad backend was found only after C had been resized.
TEST(Matmul, OptionsOutsideTheirEnumsAreRefusedBeforeCChanges) {
  const Eigen::MatrixXf a = Eigen::MatrixXf::Ones(4, 3), b = Eigen::MatrixXf::Ones(3, 5);
  Eigen::MatrixXf c = Eigen::MatrixXf::Constant(2, 2, 7.0f);
  try {
    xax::matmul(a, b, c, {.activation = static_cast<xax::Activation>(7)});
    ADD_FAILURE() << "no error";
  } catch (const xax::ConfigError& error) {
    EXPECT_THAT(error.what(), ::testing::HasSubstr("Activation value 7 is not accepted; expected"));
  }
  try {
    xax::matmul(a, b, c, {.backend = static_cast<xax::MatmulBackend>(9)});
    ADD_FAILURE() << "no error";
  } catch (const xax::ConfigError& error) {
    EXPECT_THAT(error.what(), ::testing::HasSubstr("MatmulBackend value 9 is not accepted; expected"));
  }
  EXPECT_EQ(c.rows(), 2);
  EXPECT_EQ(c.cols(), 2);
  EXPECT_EQ(c(1, 1), 7.0f);
}

TEST(Matmul, BackendQueries) {
  EXPECT_TRUE(xax::matmul_backend_available(xax::MatmulBackend::eigen));
  EXPECT_TRUE(xax::matmul_backend_available(xax::MatmulBackend::automatic));
  Eigen::MatrixXf c;
  xax::matmul(Eigen::MatrixXf::Ones(8, 8).eval(), Eigen::MatrixXf::Ones(8, 8).eval(), c);
  // fp32 products run on xax's own AVX2 GEMM where it applies (AVX2 CPUs without AVX-512, or any AVX2 CPU
  // in a build without oneDNN), else on the build's default backend.
  if (xax::detail::packing_gemm::runs_products_of(xax::DType::float32, xax::cpu_features())) {
    EXPECT_EQ(xax::last_matmul_implementation(), "xax:avx2_gemm (float32)");
  } else {
    EXPECT_THAT(
        xax::last_matmul_implementation(),
        ::testing::StartsWith(std::string(xax::matmul_backend_name(xax::default_matmul_backend())) + ":"));
  }
  if (!xax::matmul_backend_available(xax::MatmulBackend::onednn)) {
    EXPECT_THROW(xax::matmul(Eigen::MatrixXf::Ones(2, 2).eval(), Eigen::MatrixXf::Ones(2, 2).eval(), c,
                             {.backend = xax::MatmulBackend::onednn}),
                 xax::ConfigError);
  }
}

/// The backends this build can run.
std::vector<xax::MatmulBackend> available_backends() {
  std::vector<xax::MatmulBackend> backends;
  for (const auto backend :
       {xax::MatmulBackend::automatic, xax::MatmulBackend::eigen, xax::MatmulBackend::onednn})
    if (xax::matmul_backend_available(backend)) backends.push_back(backend);
  return backends;
}

// Activation::relu documents that NaN propagates (the loss scaler must see it) on every backend, with or
// without a bias, accumulating or not, into float or the inputs' type. oneDNN's relu post-op computes
// max(x, 0), which turned NaN into 0.
TYPED_TEST(MatmulTyped, ReluPropagatesNanOnEveryBackend) {
  using T = TypeParam;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  Matrix<T> w(3, 2);
  w << static_cast<T>(1.0f), static_cast<T>(1.0f), static_cast<T>(-1.0f), static_cast<T>(-1.0f),
      static_cast<T>(2.0f), static_cast<T>(0.0f);
  Matrix<T> x = Matrix<T>::Ones(2, 3);
  x(1, 0) = static_cast<T>(nan);  // column 0 of w x is NaN
  const Vector<T> bias = Vector<T>::Zero(3);
  const auto check = [](const auto& y, const std::string& what) {
    for (Eigen::Index i = 0; i < 3; ++i) {
      EXPECT_TRUE(std::isnan(static_cast<float>(y(i, 0)))) << what << " row " << i;
    }
    // The other columns: 2 -> 2, -2 -> 0, 2 -> 2.
    for (Eigen::Index j = 1; j < 3; ++j) {
      EXPECT_EQ(static_cast<float>(y(0, j)), 2.0f) << what;
      EXPECT_EQ(static_cast<float>(y(1, j)), 0.0f) << what;
      EXPECT_FALSE(std::signbit(static_cast<float>(y(1, j)))) << what;
      EXPECT_EQ(static_cast<float>(y(2, j)), 2.0f) << what;
    }
  };
  for (const auto backend : available_backends()) {
    const std::string name(xax::matmul_backend_name(backend));
    const xax::MatmulOptions options{.activation = xax::Activation::relu, .backend = backend};
    Matrix<T> y;
    xax::matmul(w, x, y, options);
    check(y, name + " " + xax::last_matmul_implementation());
    xax::matmul(w, x, bias, y, options);
    check(y, name + " with bias " + xax::last_matmul_implementation());
    Eigen::MatrixXf y_float;
    xax::matmul(w, x, bias, y_float, options);
    check(y_float, name + " float output " + xax::last_matmul_implementation());
    Eigen::MatrixXf accumulated = Eigen::MatrixXf::Zero(3, 3);
    xax::MatmulOptions accumulate = options;
    accumulate.accumulate = true;
    xax::matmul(w, x, accumulated, accumulate);
    check(accumulated, name + " accumulating " + xax::last_matmul_implementation());
  }
}

// An operand whose outer stride is smaller than its rows (a sliding window over a signal, 1-D convolution
// as a product; stride 0 repeats one column) is read as Eigen reads it: element (i, j) at data[i + j * s].
TYPED_TEST(MatmulTyped, OperandsWithOverlappingColumnsAreReadAsEigenReadsThem) {
  using T = TypeParam;
  std::vector<T> signal(64, static_cast<T>(100.0f));  // padding: the unfixed code read into it
  for (std::size_t i = 0; i < 6; ++i) signal[i] = static_cast<T>(static_cast<float>(i + 1));
  const Matrix<T> kernel = random_matrix<T>(2, 3, 21, 0.0f, 1.0f);  // positive: no cancellation
  for (const Eigen::Index stride : {Eigen::Index{0}, Eigen::Index{1}, Eigen::Index{2}}) {
    const Eigen::Map<const Matrix<T>, 0, Eigen::OuterStride<>> windows(signal.data(), 3, 4,
                                                                       Eigen::OuterStride<>(stride));
    MatrixXd windows_d(3, 4);
    for (Eigen::Index j = 0; j < 4; ++j)
      for (Eigen::Index i = 0; i < 3; ++i)
        windows_d(i, j) = static_cast<double>(static_cast<float>(windows(i, j)));
    for (const auto backend : available_backends()) {
      Eigen::MatrixXf y;
      xax::matmul(kernel, windows, y, {.backend = backend});  // as B
      expect_near_reference(Matrix<float>(y), to_double(kernel) * windows_d, 3, "kernel * windows");
      Eigen::MatrixXf yt;
      xax::matmul(windows, kernel, yt,
                  {.transpose_a = true, .transpose_b = true, .backend = backend});  // as A
      expect_near_reference(Matrix<float>(yt), windows_d.transpose() * to_double(kernel).transpose(), 3,
                            "windows^T kernel^T");
    }
  }
  // An output whose columns overlap cannot take separate columns of a product.
  std::vector<float> storage(64, 0.0f);
  Eigen::Map<Eigen::MatrixXf, 0, Eigen::OuterStride<>> overlapping(storage.data(), 2, 4,
                                                                   Eigen::OuterStride<>(1));
  const Eigen::Map<const Matrix<T>, 0, Eigen::OuterStride<>> windows(signal.data(), 3, 4,
                                                                     Eigen::OuterStride<>(3));
  EXPECT_THROW(xax::matmul(kernel, windows, overlapping), xax::ShapeError);
}

// A 1 x n block of a column-major matrix (a bias kept as a row of a parameter matrix) passes as a vector of
// n, but its elements are a column apart: they are read there, not as n adjacent elements.
TYPED_TEST(MatmulTyped, BiasFromARowOfAMatrixIsReadThroughItsStride) {
  using T = TypeParam;
  Matrix<T> parameters(3, 4);
  for (Eigen::Index j = 0; j < 4; ++j)
    for (Eigen::Index i = 0; i < 3; ++i)
      parameters(i, j) = static_cast<T>(static_cast<float>((j + 1) * (i == 0 ? 1 : 10 * i)));
  const Matrix<T> w = Matrix<T>::Zero(4, 2), x = Matrix<T>::Zero(2, 3);
  for (const auto backend : available_backends()) {
    Matrix<T> y;
    xax::matmul(w, x, parameters.topRows(1), y, {.backend = backend});
    for (Eigen::Index j = 0; j < 3; ++j)
      for (Eigen::Index i = 0; i < 4; ++i)
        EXPECT_EQ(static_cast<float>(y(i, j)), static_cast<float>(i + 1))
            << xax::matmul_backend_name(backend);
  }
}

}  // namespace
