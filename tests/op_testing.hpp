#pragma once
// Helpers of the op tests (reductions, batched matmul, LayerNorm, causal softmax, GELU tanh, embedding):
// random inputs rounded to the tested scalar, double copies of them for the references, and per-type
// tolerances.

#include <gtest/gtest.h>
#include <xax/detail/eigen.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>
#include <xax/utils/dtype.hpp>

namespace xax_test {

template <class T>
using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
template <class T>
using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

template <class T>
Matrix<T> random_matrix(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed, float low = -2.0f,
                        float high = 2.0f) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> uniform(low, high);
  Matrix<T> m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(uniform(rng));
  return m;
}

template <class M>
Eigen::MatrixXd to_double(const M& m) {
  Eigen::MatrixXd out(m.rows(), m.cols());
  for (Eigen::Index j = 0; j < m.cols(); ++j)
    for (Eigen::Index i = 0; i < m.rows(); ++i) out(i, j) = static_cast<double>(static_cast<float>(m(i, j)));
  return out;
}

/// Half a unit in the last place of T relative to 1: the relative error of one rounding to T.
template <class T>
double half_ulp() {
  if constexpr (std::is_same_v<T, xax::bfloat16>) return std::ldexp(1.0, -8);
  if constexpr (std::is_same_v<T, xax::float16>) return std::ldexp(1.0, -11);
  return std::ldexp(1.0, -24);
}

/// Whether every element of `actual` is within `relative * |expected| + absolute` of `expected`; the
/// largest violation goes into `worst` for the failure message.
template <class M>
::testing::AssertionResult near_reference(const M& actual, const Eigen::MatrixXd& expected, double relative,
                                          double absolute) {
  if (actual.rows() != expected.rows() || actual.cols() != expected.cols()) {
    return ::testing::AssertionFailure() << "shape " << actual.rows() << "x" << actual.cols() << " vs "
                                         << expected.rows() << "x" << expected.cols();
  }
  for (Eigen::Index j = 0; j < expected.cols(); ++j) {
    for (Eigen::Index i = 0; i < expected.rows(); ++i) {
      const double a = static_cast<double>(static_cast<float>(actual(i, j)));
      const double e = expected(i, j);
      if (!(std::abs(a - e) <= relative * std::abs(e) + absolute)) {
        return ::testing::AssertionFailure()
               << "element (" << i << ", " << j << "): " << a << " vs reference " << e << " (tolerance "
               << relative << " relative + " << absolute << " absolute)";
      }
    }
  }
  return ::testing::AssertionSuccess();
}

using Scalars = ::testing::Types<float, xax::bfloat16, xax::float16>;

/// A vector output of `size` elements at the start of a buffer of NaNs four times as long: a kernel that
/// writes it as anything but `size` adjacent elements leaves a NaN in it or writes past it, which
/// `only_vector_written` reports, without corrupting the heap as an overflowing VectorXf would.
template <class T>
struct GuardedVector {
  explicit GuardedVector(Eigen::Index size)
      : buffer(static_cast<std::size_t>(4 * size + 4),
               static_cast<T>(std::numeric_limits<float>::quiet_NaN())),
        vector(buffer.data(), size) {}
  GuardedVector(const GuardedVector&) = delete;
  GuardedVector& operator=(const GuardedVector&) = delete;

  ::testing::AssertionResult only_vector_written() const {
    for (std::size_t i = 0; i < buffer.size(); ++i) {
      const bool inside = static_cast<Eigen::Index>(i) < vector.size();
      if (std::isnan(static_cast<float>(buffer[i])) == inside) {
        return ::testing::AssertionFailure()
               << "element " << i << " of the buffer is " << static_cast<float>(buffer[i])
               << " but the vector has " << vector.size() << " elements";
      }
    }
    return ::testing::AssertionSuccess();
  }

  std::vector<T> buffer;
  Eigen::Map<Vector<T>> vector;
};

}  // namespace xax_test
