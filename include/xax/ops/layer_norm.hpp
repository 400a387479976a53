#pragma once
/// \file
/// Layer normalisation over the features of every column (one sample or token per column, as everywhere in
/// xax), with the mean and variance in fp32 whatever the storage type: a bf16 variance of activations whose
/// mean is large loses every significant bit (PyTorch autocast runs layer_norm in fp32 for that reason).
///
/// The gain and bias may be float while the input is 16-bit, so that a model can keep its norm parameters in
/// fp32 under a 16-bit compute policy; gradients of the gain and bias are summed in fp32 and rounded once.
///
///     xax::LayerNormStatistics stats;                      // per column mean and 1/std, fp32
///     xax::layer_norm(x, gain, bias, y, stats);            // y = (x - mean) / sqrt(var + eps) * gain + bias
///     xax::layer_norm_backward(x, gain, stats, dy, dx, dgain, dbias);

#include <xax/detail/eigen.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string>
#include <type_traits>
#include <xax/detail/convert.hpp>
#include <xax/detail/parallel.hpp>
#include <xax/detail/scratch.hpp>
#include <xax/ops/matmul_concepts.hpp>
#include <xax/ops/reduce.hpp>
#include <xax/utils/error.hpp>

namespace xax {

/// What a layer_norm forward keeps for its backward: the fp32 mean and reciprocal standard deviation of
/// every column.
struct LayerNormStatistics {
  Eigen::VectorXf mean;
  Eigen::VectorXf inverse_std;
};

/// How layer_norm_backward writes its results.
struct LayerNormBackwardOptions {
  /// Add dx to the output's current value (in fp32, rounded once), e.g. a residual stream's gradient.
  bool accumulate_input_gradient = false;
  /// Add dgain and dbias to the outputs' current values (gradient accumulation).
  bool accumulate_parameter_gradients = false;
};

namespace detail {

/// Widens `n` elements into `out` (a copy for float).
template <class T>
void widen(const T* x, float* out, std::size_t n) noexcept {
  convert_serial(x, out, n);
}

template <class V>
void check_feature_vector(const V& v, Eigen::Index features, const char* function, const char* what) {
  if ((v.rows() != 1 && v.cols() != 1) || v.size() != features) {
    throw ShapeError(std::string("xax::") + function + ": " + what + " is " + std::to_string(v.rows()) + "x" +
                     std::to_string(v.cols()) + " but must be a vector of " + std::to_string(features) +
                     " elements (the rows, features, of the input)");
  }
}

}  // namespace detail

/// `y = (x - mean) / sqrt(var + epsilon) * gain + bias` over the rows of every column, with the mean and the
/// (biased) variance computed in fp32 and the result rounded once into `y` (resized when plain). `stats`
/// receives what layer_norm_backward needs. `gain` and `bias` are vectors of x's rows, of x's scalar or
/// float. `y` may be `x` (in place: each column's statistics are taken before it is written). Throws
/// ShapeError for mismatched shapes and ConfigError for a negative or non-finite epsilon.
template <matmul_operand X, matmul_operand Gain, matmul_operand Bias, class Y>
requires matmul_output<std::remove_reference_t<Y>>
void layer_norm(const X& x, const Gain& gain, const Bias& bias, Y&& y, LayerNormStatistics& stats,
                float epsilon = 1e-5f) {
  static_assert(!X::IsRowMajor, "xax::layer_norm: the input must be column-major (one sample per column)");
  if (!(epsilon >= 0.0f) || !std::isfinite(epsilon)) {
    throw ConfigError("xax::layer_norm: epsilon " + std::to_string(epsilon) +
                      " is not accepted; give a finite value >= 0 (PyTorch's default is 1e-5)");
  }
  const Eigen::Index features = x.rows(), columns = x.cols();
  if (features == 0) throw ShapeError("xax::layer_norm: the input has no rows (features) to normalise");
  detail::check_feature_vector(gain, features, "layer_norm", "the gain");
  detail::check_feature_vector(bias, features, "layer_norm", "the bias");
  const Eigen::Index ldx = detail::leading_dimension(x, "layer_norm");
  detail::check_no_overlap(
      detail::matrix_storage(y, "layer_norm"),
      {detail::matrix_storage(x, "layer_norm"), detail::vector_storage(gain), detail::vector_storage(bias)},
      "layer_norm", "the output", true);
  // The statistics are outputs too: checked against the inputs before anything is resized (a resize frees
  // storage an input may point into).
  const auto inputs = {detail::matrix_storage(x, "layer_norm"), detail::vector_storage(gain),
                       detail::vector_storage(bias)};
  detail::check_no_overlap(detail::vector_storage(stats.mean), inputs, "layer_norm", "the statistics' mean");
  detail::check_no_overlap(detail::vector_storage(stats.inverse_std), inputs, "layer_norm",
                           "the statistics' inverse_std");
  const auto check_outputs_apart = [&] {
    detail::check_outputs_apart({{detail::vector_storage(stats.mean), "the statistics' mean"},
                                 {detail::vector_storage(stats.inverse_std), "the statistics' inverse_std"},
                                 {detail::matrix_storage(y, "layer_norm"), "the output"}},
                                "layer_norm");
  };
  check_outputs_apart();
  const Eigen::Index ldy = detail::prepare_output(y, features, columns, "layer_norm", "the output");
  stats.mean.resize(columns);
  stats.inverse_std.resize(columns);
  check_outputs_apart();

  using T = typename X::Scalar;
  using O = typename std::remove_reference_t<Y>::Scalar;
  const auto rows = static_cast<std::size_t>(features);
  // The gain and bias are widened once, not once per column (through their strides: either may be a row of
  // a parameter matrix).
  thread_local detail::ScratchBuffer<float> parameter_scratch;
  float* parameters = parameter_scratch.get(2 * rows);
  detail::gather_vector(gain, parameters);
  detail::gather_vector(bias, parameters + rows);
  const float* gain_f = parameters;
  const float* bias_f = parameters + rows;
  const T* x_data = x.data();
  O* y_data = y.data();
  float* mean = stats.mean.data();
  float* inverse_std = stats.inverse_std.data();
  const auto n = static_cast<Eigen::Index>(rows);
  detail::parallel_blocks(
      static_cast<std::size_t>(columns), rows * (sizeof(T) + sizeof(O)), 1,
      [=](std::size_t begin, std::size_t end) noexcept {
        thread_local detail::ScratchBuffer<float> column_scratch;
        float* column = column_scratch.get(rows);
        const Eigen::Map<const Eigen::ArrayXf> g(gain_f, n), b(bias_f, n);
        Eigen::Map<Eigen::ArrayXf> v(column, n);
        for (auto j = static_cast<Eigen::Index>(begin); j < static_cast<Eigen::Index>(end); ++j) {
          detail::widen(x_data + j * ldx, column, rows);
          // Two passes in fp32: the mean first, then the squared deviations from it, which stays accurate
          // where a one-pass E[x^2] - E[x]^2 cancels catastrophically.
          const float m = v.sum() / static_cast<float>(n);
          const float variance = (v - m).square().sum() / static_cast<float>(n);
          const float r = 1.0f / std::sqrt(variance + epsilon);
          mean[j] = m;
          inverse_std[j] = r;
          v = (v - m) * r * g + b;
          detail::convert_serial(static_cast<const float*>(column), y_data + j * ldy, rows);
        }
      });
}

/// The gradients of layer_norm: `dx` (x's shape), `dgain` and `dbias` (vectors of x's rows), from the
/// forward's input `x`, its `gain` and `stats`, and the output's gradient `dy`. Everything is computed in
/// fp32 and rounded once; dgain and dbias are summed over the columns in fp32. Plain outputs are resized
/// unless accumulating (see LayerNormBackwardOptions).
template <matmul_operand X, matmul_operand Gain, matmul_operand DY, class DX, class DGain, class DBias>
requires matmul_output<std::remove_reference_t<DX>> && matmul_output<std::remove_reference_t<DGain>> &&
    matmul_output<std::remove_reference_t<DBias>>
void layer_norm_backward(const X& x, const Gain& gain, const LayerNormStatistics& stats, const DY& dy,
                         DX&& dx, DGain&& dgain, DBias&& dbias,
                         const LayerNormBackwardOptions& options = {}) {
  static_assert(!X::IsRowMajor && !DY::IsRowMajor, "xax::layer_norm_backward: inputs must be column-major");
  const Eigen::Index features = x.rows(), columns = x.cols();
  detail::check_feature_vector(gain, features, "layer_norm_backward", "the gain");
  if (dy.rows() != features || dy.cols() != columns) {
    throw ShapeError("xax::layer_norm_backward: dy is " + std::to_string(dy.rows()) + "x" +
                     std::to_string(dy.cols()) + " but the input is " + std::to_string(features) + "x" +
                     std::to_string(columns) + "; they must have the same shape");
  }
  if (stats.mean.size() != columns || stats.inverse_std.size() != columns) {
    throw ShapeError("xax::layer_norm_backward: the statistics hold " + std::to_string(stats.mean.size()) +
                     " columns but the input has " + std::to_string(columns) +
                     "; pass the statistics of the forward of this input");
  }
  // Every output is checked against the inputs and the other outputs before any is resized: a resize frees
  // the storage another operand may point into.
  constexpr const char* function = "layer_norm_backward";
  const Eigen::Index ldx = detail::leading_dimension(x, function),
                     ldd = detail::leading_dimension(dy, function);
  const auto inputs = {detail::matrix_storage(x, function), detail::vector_storage(gain),
                       detail::matrix_storage(dy, function), detail::vector_storage(stats.mean),
                       detail::vector_storage(stats.inverse_std)};
  detail::check_no_overlap(detail::matrix_storage(dx, function), inputs, function, "dx");
  detail::check_no_overlap(detail::vector_storage(dgain), inputs, function, "dgain");
  detail::check_no_overlap(detail::vector_storage(dbias), inputs, function, "dbias");
  const auto check_outputs_apart = [&] {
    detail::check_outputs_apart({{detail::matrix_storage(dx, function), "dx"},
                                 {detail::vector_storage(dgain), "dgain"},
                                 {detail::vector_storage(dbias), "dbias"}},
                                function);
  };
  check_outputs_apart();
  Eigen::Index ldo = 0;
  if (options.accumulate_input_gradient) {
    ldo = detail::leading_dimension(dx, function);
    if (dx.rows() != features || dx.cols() != columns) {
      throw ShapeError("xax::layer_norm_backward: the accumulated dx is " + std::to_string(dx.rows()) + "x" +
                       std::to_string(dx.cols()) + " but must be " + std::to_string(features) + "x" +
                       std::to_string(columns));
    }
  } else {
    ldo = detail::prepare_output(dx, features, columns, "layer_norm_backward", "dx");
  }
  if (options.accumulate_parameter_gradients) {
    detail::check_feature_vector(dgain, features, "layer_norm_backward", "the accumulated dgain");
    detail::check_feature_vector(dbias, features, "layer_norm_backward", "the accumulated dbias");
    detail::check_vector_output(dgain, function, "the accumulated dgain");
    detail::check_vector_output(dbias, function, "the accumulated dbias");
  } else {
    detail::prepare_output(dgain, features, 1, "layer_norm_backward", "dgain");
    detail::prepare_output(dbias, features, 1, "layer_norm_backward", "dbias");
  }
  check_outputs_apart();
  if (features == 0) return;

  using O = typename std::remove_reference_t<DX>::Scalar;
  const auto rows = static_cast<std::size_t>(features);
  const auto n = static_cast<Eigen::Index>(rows);
  // The columns are cut into chunks of a fixed size, each summing its own partial dgain and dbias; the
  // partial sums are then added in chunk order. The chunks, not the threads, fix the order of every sum, so
  // the result does not depend on the thread count, and the chunks can run on several threads.
  constexpr Eigen::Index chunk_columns = 64;
  const Eigen::Index chunks = (columns + chunk_columns - 1) / chunk_columns;
  thread_local detail::ScratchBuffer<float> scratch;
  float* buffer = scratch.get((3 + 2 * static_cast<std::size_t>(chunks)) * rows);
  float* gain_f = buffer;
  float* dgain_sum = buffer + rows;
  float* dbias_sum = buffer + 2 * rows;
  float* partial = buffer + 3 * rows;  // chunk i: dgain at 2 i rows, dbias at (2 i + 1) rows
  // The gain, and accumulated dgain and dbias, may be rows of parameter matrices: read through strides.
  detail::gather_vector(gain, gain_f);
  Eigen::Map<Eigen::ArrayXf> sum_g(dgain_sum, n), sum_b(dbias_sum, n);
  if (options.accumulate_parameter_gradients) {
    detail::gather_vector(dgain, dgain_sum);
    detail::gather_vector(dbias, dbias_sum);
  } else {
    sum_g.setZero();
    sum_b.setZero();
  }
  const float inverse_n = 1.0f / static_cast<float>(n);
  const auto* x_data = x.data();
  const auto* dy_data = dy.data();
  O* dx_data = dx.data();
  const float* mean = stats.mean.data();
  const float* inverse_std = stats.inverse_std.data();
  const bool accumulate_dx = options.accumulate_input_gradient;
  using T = typename X::Scalar;
  using TD = typename DY::Scalar;
  detail::parallel_blocks(
      static_cast<std::size_t>(chunks),
      static_cast<std::size_t>(chunk_columns) * rows * (sizeof(T) + sizeof(TD) + 2 * sizeof(O)), 1,
      [=](std::size_t chunk_begin, std::size_t chunk_end) noexcept {
        thread_local detail::ScratchBuffer<float> column_scratch;
        float* columns_buffer = column_scratch.get(3 * rows);
        Eigen::Map<Eigen::ArrayXf> xhat(columns_buffer, n), grad(columns_buffer + rows, n),
            result(columns_buffer + 2 * rows, n);
        const Eigen::Map<const Eigen::ArrayXf> g(gain_f, n);
        for (auto chunk = static_cast<Eigen::Index>(chunk_begin);
             chunk < static_cast<Eigen::Index>(chunk_end); ++chunk) {
          Eigen::Map<Eigen::ArrayXf> chunk_g(partial + 2 * chunk * n, n),
              chunk_b(partial + (2 * chunk + 1) * n, n);
          chunk_g.setZero();
          chunk_b.setZero();
          const Eigen::Index last = std::min(columns, (chunk + 1) * chunk_columns);
          for (Eigen::Index j = chunk * chunk_columns; j < last; ++j) {
            // Float columns are read and written where they are: a copy into the scratch columns would be
            // one more pass over each. The sums still run over the scratch columns, whose alignment (and so
            // Eigen's summation order) does not depend on where a column starts.
            const float r = inverse_std[j];
            if constexpr (std::is_same_v<T, float>) {
              xhat = (Eigen::Map<const Eigen::ArrayXf>(x_data + j * ldx, n) - mean[j]) * r;
            } else {
              detail::widen(x_data + j * ldx, xhat.data(), rows);
              xhat = (xhat - mean[j]) * r;
            }
            const float* dy_column = grad.data();
            if constexpr (std::is_same_v<TD, float>) {
              dy_column = dy_data + j * ldd;
            } else {
              detail::widen(dy_data + j * ldd, grad.data(), rows);
            }
            const Eigen::Map<const Eigen::ArrayXf> dy_values(dy_column, n);
            chunk_g += dy_values * xhat;
            chunk_b += dy_values;
            grad = dy_values * g;  // d(loss)/d(xhat)
            const float mean_grad = grad.sum() * inverse_n;
            const float mean_grad_xhat = (grad * xhat).sum() * inverse_n;
            O* out = dx_data + j * ldo;
            if constexpr (std::is_same_v<O, float>) {
              Eigen::Map<Eigen::ArrayXf> dx_values(out, n);
              if (accumulate_dx) {
                dx_values += r * (grad - mean_grad - xhat * mean_grad_xhat);
              } else {
                dx_values = r * (grad - mean_grad - xhat * mean_grad_xhat);
              }
            } else {
              result = r * (grad - mean_grad - xhat * mean_grad_xhat);
              if (accumulate_dx) {
                detail::widen(static_cast<const O*>(out), xhat.data(), rows);
                result += xhat;  // xhat's buffer now holds the old dx
              }
              detail::convert_serial(static_cast<const float*>(result.data()), out, rows);
            }
          }
        }
      });
  for (Eigen::Index chunk = 0; chunk < chunks; ++chunk) {
    sum_g += Eigen::Map<const Eigen::ArrayXf>(partial + 2 * chunk * n, n);
    sum_b += Eigen::Map<const Eigen::ArrayXf>(partial + (2 * chunk + 1) * n, n);
  }
  detail::scatter_vector(static_cast<const float*>(dgain_sum), dgain);
  detail::scatter_vector(static_cast<const float*>(dbias_sum), dbias);
}

}  // namespace xax
