#pragma once
/// \file
/// Reductions that must run in fp32 whatever the storage precision: softmax, log-softmax, log-sum-exp,
/// softmax cross-entropy (with its gradient) and row sums. These are on PyTorch autocast's fp32 list:
/// exp() of a bf16 logit and a bf16 running sum lose the loss's small differences.
///
/// Layout: one sample per column (features x batch, as for xax::matmul), so every function reduces over
/// the rows of each column. Inputs are float, bfloat16 or float16 matrices; they are widened block by block
/// into fp32, and outputs are rounded once.
///
///     Eigen::Matrix<xax::bfloat16, Eigen::Dynamic, Eigen::Dynamic> logits = ...;  // classes x batch
///     std::vector<std::int32_t> labels = ...;                                    // one per column
///     Eigen::Matrix<xax::bfloat16, Eigen::Dynamic, Eigen::Dynamic> dlogits;
///     float loss = xax::softmax_cross_entropy(logits, labels, dlogits, loss_scale);
///     // loss: mean over the batch, in fp32; dlogits = loss_scale * d(loss)/d(logits)

#include <xax/detail/eigen.hpp>

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <ranges>
#include <span>
#include <string>
#include <type_traits>
#include <xax/detail/convert.hpp>
#include <xax/detail/elementwise.hpp>
#include <xax/detail/format.hpp>
#include <xax/detail/parallel.hpp>
#include <xax/detail/scratch.hpp>
#include <xax/ops/matmul_concepts.hpp>
#include <xax/utils/error.hpp>

namespace xax {

/// Class labels, one per column: a contiguous range of std::int32_t (std::vector, std::span, std::array) or
/// an Eigen integer vector with direct access (Eigen::VectorXi).
template <class L>
concept label_vector = (std::ranges::contiguous_range<const L> && std::ranges::sized_range<const L> &&
                        std::same_as<std::ranges::range_value_t<const L>, std::int32_t>) ||
                       (requires {
                         typename L::PlainObject;
                         typename L::Scalar;
                       } &&
                        std::derived_from<L, Eigen::DenseBase<L>> &&
                        std::same_as<typename L::Scalar, std::int32_t> && L::IsVectorAtCompileTime == 1 &&
                        (static_cast<unsigned>(L::Flags) & Eigen::DirectAccessBit) != 0 &&
                        L::InnerStrideAtCompileTime == 1);

namespace detail {

template <label_vector L>
std::span<const std::int32_t> label_span(const L& labels) {
  if constexpr (requires { typename L::PlainObject; }) {
    return {labels.data(), static_cast<std::size_t>(labels.size())};
  } else {
    return {std::ranges::data(labels), std::ranges::size(labels)};
  }
}

/// Calls `f(const float* chunk, std::size_t count)` on consecutive float blocks of `x[0, n)`.
template <class T, class F>
void for_each_float_chunk(const T* x, std::size_t n, F&& f) noexcept {
  alignas(64) float buffer[elementwise_block];
  for (std::size_t i = 0; i < n; i += elementwise_block) {
    const std::size_t count = std::min(elementwise_block, n - i);
    if constexpr (std::is_same_v<T, float>) {
      f(x + i, count);
    } else {
      convert_serial(x + i, buffer, count);
      f(static_cast<const float*>(buffer), count);
    }
  }
}

/// max and log(sum(exp(x - max))) of one column, in fp32 (the sum of each block in float, of the blocks in
/// double). A column of -inf gives shift 0 and a log-sum of -inf rather than an inf - inf shift: log-sum-exp
/// is then -inf, softmax 0/0 = NaN and log-softmax -inf - (-inf) = NaN, as in PyTorch (a fully masked
/// column has no distribution).
struct LogSumExp {
  float shift = 0;    ///< the finite maximum subtracted before exp (0 when the maximum is not finite)
  float log_sum = 0;  ///< log(sum(exp(x - shift)))
  [[nodiscard]] float value() const { return shift + log_sum; }
};

template <class T>
LogSumExp column_log_sum_exp(const T* x, std::size_t n) noexcept {
  float max = -std::numeric_limits<float>::infinity();
  for_each_float_chunk(x, n, [&max](const float* chunk, std::size_t count) {
    for (std::size_t i = 0; i < count; ++i) max = chunk[i] > max ? chunk[i] : max;
  });
  LogSumExp result;
  result.shift = std::isfinite(max) ? max : 0.0f;
  double sum = 0;
  const float shift = result.shift;
  for_each_float_chunk(x, n, [&sum, shift](const float* chunk, std::size_t count) {
    const Eigen::Map<const Eigen::ArrayXf> values(chunk, static_cast<Eigen::Index>(count));
    sum += static_cast<double>((values - shift).exp().sum());
  });
  result.log_sum = static_cast<float>(std::log(sum));
  return result;
}

/// out = f(x) for one column, in fp32 blocks: `block(const float* x, float* y, count)`.
template <class T, class Out, class Block>
void map_column(const T* x, Out* out, std::size_t n, const Block& block) noexcept {
  alignas(64) float x_buffer[elementwise_block];
  alignas(64) float y_buffer[elementwise_block];
  for (std::size_t i = 0; i < n; i += elementwise_block) {
    const std::size_t count = std::min(elementwise_block, n - i);
    const float* in = x_buffer;
    if constexpr (std::is_same_v<T, float>) {
      in = x + i;
    } else {
      convert_serial(x + i, x_buffer, count);
    }
    if constexpr (std::is_same_v<Out, float>) {
      block(in, out + i, count);
    } else {
      block(in, y_buffer, count);
      convert_serial(static_cast<const float*>(y_buffer), out + i, count);
    }
  }
}

/// Resizes a plain output to rows x cols, or checks the shape of any other output, and returns the leading
/// dimension at which the kernels write the columns of the rows x cols result. A vector type (VectorXf) of
/// rows * cols elements also takes a 1 x n or n x 1 result; its elements are contiguous (unit inner
/// stride), so column j of the result starts at element j * rows whatever the vector's own shape. Check the
/// output against the inputs (check_no_overlap) before: a resize frees the storage an input may point into.
template <class Out>
Eigen::Index prepare_output(Out& out, Eigen::Index rows, Eigen::Index cols, const char* function,
                            const char* what) {
  if constexpr (Out::IsVectorAtCompileTime) {
    constexpr bool row_vector = Out::RowsAtCompileTime == 1;
    if (rows == 1 || cols == 1)
      resize_plain_if_possible(out, row_vector ? 1 : rows * cols, row_vector ? rows * cols : 1);
  } else {
    resize_plain_if_possible(out, rows, cols);
  }
  if (out.rows() == rows && out.cols() == cols) return leading_dimension(out, function);
  const bool vector_ok =
      (rows == 1 || cols == 1) && (out.rows() == 1 || out.cols() == 1) && out.size() == rows * cols;
  if (Out::IsVectorAtCompileTime && vector_ok) return std::max<Eigen::Index>(rows, 1);
  throw ShapeError(std::string("xax::") + function + ": " + what + " is " +
                   shape_string(out.rows(), out.cols()) + " but must be " + shape_string(rows, cols));
}

/// Throws ShapeError when a vector that an op writes element by element has elements that overlap (a Map
/// with outer stride 0 or less used as a 1 x n row).
template <class V>
void check_vector_output(const V& v, const char* function, const char* what) {
  if (v.size() > 1 && vector_increment(v) < 1) {
    throw ShapeError(std::string("xax::") + function + ": " + what + " is " +
                     shape_string(v.rows(), v.cols()) + " with its elements " +
                     std::to_string(vector_increment(v)) +
                     " apart, so they overlap; pass a vector whose elements are distinct");
  }
}

/// Widens the elements of a vector operand into `out` (n floats). The vector may be a column or a row, its
/// elements at any spacing: a 1 x n block of a column-major matrix (`m.topRows(1)`) holds them a column
/// apart, and is read through its strides, not as n adjacent elements.
template <class V>
void gather_vector(const V& v, float* out) {
  if (vector_increment(v) == 1) {
    convert_serial(v.data(), out, static_cast<std::size_t>(v.size()));
    return;
  }
  const bool one_row = v.rows() == 1;
  for (Eigen::Index k = 0; k < v.size(); ++k)
    out[k] = static_cast<float>(one_row ? v.coeff(0, k) : v.coeff(k, 0));
}

/// Rounds n floats once into the elements of a vector operand (any spacing; see gather_vector).
template <class V>
void scatter_vector(const float* in, V& v) {
  using O = typename V::Scalar;
  if (vector_increment(v) == 1) {
    convert_serial(in, v.data(), static_cast<std::size_t>(v.size()));
    return;
  }
  const bool one_row = v.rows() == 1;
  for (Eigen::Index k = 0; k < v.size(); ++k)
    (one_row ? v.coeffRef(0, k) : v.coeffRef(k, 0)) = convert_scalar<O>(in[k]);
}

/// The storage of a label or token vector, to check outputs against it.
inline StoredOperand label_storage(std::span<const std::int32_t> labels) {
  return contiguous_storage(labels.data(), static_cast<Eigen::Index>(labels.size()), sizeof(std::int32_t));
}

inline void check_labels(std::span<const std::int32_t> labels, Eigen::Index classes, Eigen::Index samples,
                         const char* function) {
  if (static_cast<Eigen::Index>(labels.size()) != samples) {
    throw ShapeError(std::string("xax::") + function + ": " + std::to_string(labels.size()) +
                     " labels for logits with " + std::to_string(samples) +
                     " columns (samples); give one label per column");
  }
  for (std::size_t j = 0; j < labels.size(); ++j) {
    if (labels[j] < 0 || labels[j] >= classes) {
      throw ShapeError(std::string("xax::") + function + ": label " + std::to_string(labels[j]) +
                       " of sample " + std::to_string(j) + " is outside [0, " + std::to_string(classes) +
                       "), the rows (classes) of the logits");
    }
  }
}

/// Logits with at most this many rows (classes) are processed whole columns at a time, so that exp() is
/// vectorised across columns; a 10-class column alone is shorter than one AVX-512 register.
inline constexpr std::size_t few_classes = 128;

/// Loss and gradient of `count` consecutive columns with `rows <= few_classes` (rows * count <=
/// elementwise_block): widen them into one block, exponentiate the block at once, write dlogits.
template <class T, class O>
void cross_entropy_columns(const T* x, Eigen::Index ldx, O* dx, Eigen::Index ldd, const std::int32_t* labels,
                           std::size_t rows, std::size_t count, float scale, double* losses) noexcept {
  alignas(64) float block[elementwise_block];
  alignas(64) float shifts[elementwise_block];
  alignas(64) float sums[elementwise_block];
  for (std::size_t j = 0; j < count; ++j) {
    const T* column = x + static_cast<Eigen::Index>(j) * ldx;
    float* widened = block + j * rows;
    if constexpr (std::is_same_v<T, float>) {
      std::copy(column, column + rows, widened);
    } else {
      convert_serial(column, widened, rows);
    }
    float max = -std::numeric_limits<float>::infinity();
    for (std::size_t i = 0; i < rows; ++i) max = widened[i] > max ? widened[i] : max;
    shifts[j] = std::isfinite(max) ? max : 0.0f;
  }
  const auto r = static_cast<Eigen::Index>(rows), c = static_cast<Eigen::Index>(count);
  Eigen::Map<Eigen::ArrayXXf> values(block, r, c);
  const Eigen::Map<const Eigen::Array<float, 1, Eigen::Dynamic>> shift(shifts, c);
  Eigen::Map<Eigen::Array<float, 1, Eigen::Dynamic>> sum(sums, c);
  for (Eigen::Index j = 0; j < c; ++j) {
    const auto target = static_cast<Eigen::Index>(labels[j]);
    losses[j] = -static_cast<double>(values(target, j) - shift(j));
  }
  values = (values.rowwise() - shift).exp();
  sum = values.colwise().sum();
  for (Eigen::Index j = 0; j < c; ++j) {
    losses[j] += std::log(static_cast<double>(sum(j)));
    values.col(j) *= scale / sum(j);
    values(static_cast<Eigen::Index>(labels[j]), j) -= scale;
    if constexpr (std::is_same_v<O, float>) {
      std::copy(values.col(j).data(), values.col(j).data() + rows, dx + j * ldd);
    } else {
      convert_serial(static_cast<const float*>(values.col(j).data()), dx + j * ldd, rows);
    }
  }
}

/// Per-thread room for one value per column (the per-sample losses), reused from call to call.
inline double* per_column_scratch(std::size_t columns) {
  thread_local ScratchBuffer<double> scratch;
  return scratch.get(columns);
}

/// The pass softmax and log_softmax share: for every column of `logits` (columns split across threads), its
/// log-sum-exp in fp32, then the column of `out` (prepared as `function`'s output) from map_column with the
/// block `make_block(log_sum_exp)` returns.
template <class Logits, class Out, class MakeBlock>
void map_columns_after_log_sum_exp(const Logits& logits, Out& out, const char* function,
                                   const MakeBlock& make_block) {
  // Each column is read into fp32 blocks before its own elements are written, so `out` may be `logits`.
  check_no_overlap(matrix_storage(out, function), {matrix_storage(logits, function)}, function, "the output",
                   true);
  const Eigen::Index ldx = leading_dimension(logits, function);
  const Eigen::Index ldy = prepare_output(out, logits.rows(), logits.cols(), function, "the output");
  using T = typename Logits::Scalar;
  using O = typename Out::Scalar;
  const auto rows = static_cast<std::size_t>(logits.rows());
  const T* x = logits.data();
  O* y = out.data();
  parallel_blocks(static_cast<std::size_t>(logits.cols()), rows * (sizeof(T) + sizeof(O)), 1,
                  [=, &make_block](std::size_t begin, std::size_t end) noexcept {
                    for (auto j = static_cast<Eigen::Index>(begin); j < static_cast<Eigen::Index>(end); ++j) {
                      const T* column = x + j * ldx;
                      map_column(column, y + j * ldy, rows, make_block(column_log_sum_exp(column, rows)));
                    }
                  });
}

}  // namespace detail

/// softmax of every column, in fp32, rounded once into `out` (resized when it is a plain matrix). `out` may
/// be `logits` (in place).
template <matmul_operand Logits, class Out>
requires matmul_output<std::remove_reference_t<Out>>
void softmax(const Logits& logits, Out&& out) {
  static_assert(!Logits::IsRowMajor, "xax::softmax: the logits must be column-major (one sample per column)");
  detail::map_columns_after_log_sum_exp(logits, out, "softmax", [](const detail::LogSumExp& lse) {
    return [shift = lse.shift, log_sum = lse.log_sum](const float* in, float* result, std::size_t n) {
      const Eigen::Map<const Eigen::ArrayXf> v(in, static_cast<Eigen::Index>(n));
      Eigen::Map<Eigen::ArrayXf>(result, static_cast<Eigen::Index>(n)) = (v - shift - log_sum).exp();
    };
  });
}

/// log-softmax of every column (x - logsumexp(x)), in fp32, rounded once into `out`, which may be `logits`.
template <matmul_operand Logits, class Out>
requires matmul_output<std::remove_reference_t<Out>>
void log_softmax(const Logits& logits, Out&& out) {
  static_assert(!Logits::IsRowMajor,
                "xax::log_softmax: the logits must be column-major (one sample per column)");
  detail::map_columns_after_log_sum_exp(logits, out, "log_softmax", [](const detail::LogSumExp& lse) {
    return [offset = lse.value()](const float* in, float* result, std::size_t n) {
      for (std::size_t i = 0; i < n; ++i) result[i] = in[i] - offset;
    };
  });
}

/// log(sum(exp(column))) of every column, in fp32, into a vector with one element per column.
template <matmul_operand Logits, class Out>
requires matmul_output<std::remove_reference_t<Out>>
void logsumexp(const Logits& logits, Out&& out) {
  static_assert(!Logits::IsRowMajor,
                "xax::logsumexp: the logits must be column-major (one sample per column)");
  detail::check_no_overlap(detail::matrix_storage(out, "logsumexp"),
                           {detail::matrix_storage(logits, "logsumexp")}, "logsumexp", "the output");
  const Eigen::Index ldx = detail::leading_dimension(logits, "logsumexp");
  detail::prepare_output(out, logits.cols(), 1, "logsumexp", "the output (one element per column)");
  using O = typename std::remove_reference_t<Out>::Scalar;
  const auto rows = static_cast<std::size_t>(logits.rows());
  for (Eigen::Index j = 0; j < logits.cols(); ++j) {
    out.data()[j] =
        detail::convert_scalar<O>(detail::column_log_sum_exp(logits.data() + j * ldx, rows).value());
  }
}

/// Mean softmax cross-entropy over the columns, in fp32: mean_j (logsumexp(x_j) - x_j[label_j]). Throws
/// ShapeError when there is not one label per column or a label is not a row index.
template <matmul_operand Logits, label_vector Labels>
float softmax_cross_entropy(const Logits& logits, const Labels& labels) {
  static_assert(!Logits::IsRowMajor, "xax::softmax_cross_entropy: the logits must be column-major");
  const std::span<const std::int32_t> label = detail::label_span(labels);
  detail::check_labels(label, logits.rows(), logits.cols(), "softmax_cross_entropy");
  const auto rows = static_cast<std::size_t>(logits.rows());
  const Eigen::Index ldx = detail::leading_dimension(logits, "softmax_cross_entropy");
  double total = 0;
  for (Eigen::Index j = 0; j < logits.cols(); ++j) {
    const auto* column = logits.data() + j * ldx;
    const float target = static_cast<float>(column[label[static_cast<std::size_t>(j)]]);
    total += static_cast<double>(detail::column_log_sum_exp(column, rows).value() - target);
  }
  return logits.cols() == 0 ? 0.0f : static_cast<float>(total / static_cast<double>(logits.cols()));
}

/// The mean softmax cross-entropy (returned, fp32, unscaled) and its gradient times `gradient_scale`:
/// `dlogits = gradient_scale * (softmax(x) - onehot(label)) / columns`, computed in fp32 and rounded once.
/// Pass the loss scale as gradient_scale to start a scaled backward pass; dlogits is resized when plain.
template <matmul_operand Logits, label_vector Labels, class DLogits>
requires matmul_output<std::remove_reference_t<DLogits>>
float softmax_cross_entropy(const Logits& logits, const Labels& labels, DLogits&& dlogits,
                            float gradient_scale = 1.0f) {
  static_assert(!Logits::IsRowMajor, "xax::softmax_cross_entropy: the logits must be column-major");
  const std::span<const std::int32_t> label = detail::label_span(labels);
  detail::check_labels(label, logits.rows(), logits.cols(), "softmax_cross_entropy");
  detail::check_no_overlap(
      detail::matrix_storage(dlogits, "softmax_cross_entropy"),
      {detail::matrix_storage(logits, "softmax_cross_entropy"), detail::label_storage(label)},
      "softmax_cross_entropy", "dlogits");
  const Eigen::Index ldx = detail::leading_dimension(logits, "softmax_cross_entropy");
  const Eigen::Index ldd =
      detail::prepare_output(dlogits, logits.rows(), logits.cols(), "softmax_cross_entropy", "dlogits");
  if (logits.cols() == 0) return 0.0f;
  using T = typename Logits::Scalar;
  using O = typename std::remove_reference_t<DLogits>::Scalar;
  const auto rows = static_cast<std::size_t>(logits.rows());
  const auto columns = static_cast<std::size_t>(logits.cols());
  const T* x = logits.data();
  O* dx = dlogits.data();
  const float scale = gradient_scale / static_cast<float>(columns);
  double* losses = detail::per_column_scratch(columns);
  const std::int32_t* label_data = label.data();
  detail::parallel_blocks(
      columns, rows * (sizeof(T) + sizeof(O)), 1, [=](std::size_t begin, std::size_t end) noexcept {
        if (rows <= detail::few_classes) {
          for (std::size_t j = begin; j < end;) {
            const std::size_t count = std::min(end - j, detail::elementwise_block / rows);
            detail::cross_entropy_columns(x + static_cast<Eigen::Index>(j) * ldx, ldx,
                                          dx + static_cast<Eigen::Index>(j) * ldd, ldd, label_data + j, rows,
                                          count, scale, losses + j);
            j += count;
          }
          return;
        }
        for (std::size_t j = begin; j < end; ++j) {
          const T* column = x + static_cast<Eigen::Index>(j) * ldx;
          const detail::LogSumExp lse = detail::column_log_sum_exp(column, rows);
          const auto target = static_cast<std::size_t>(label_data[j]);
          losses[j] = static_cast<double>(lse.value() - static_cast<float>(column[target]));
          const float shift = lse.shift, log_sum = lse.log_sum;
          std::size_t offset = 0;
          detail::map_column(
              column, dx + static_cast<Eigen::Index>(j) * ldd, rows,
              [&offset, target, shift, log_sum, scale](const float* in, float* result, std::size_t n) {
                const Eigen::Map<const Eigen::ArrayXf> v(in, static_cast<Eigen::Index>(n));
                Eigen::Map<Eigen::ArrayXf> out(result, static_cast<Eigen::Index>(n));
                out = (v - shift - log_sum).exp();
                if (target >= offset && target < offset + n) {
                  out[static_cast<Eigen::Index>(target - offset)] -= 1.0f;
                }
                out *= scale;
                offset += n;
              });
        }
      });
  double total = 0;
  for (std::size_t j = 0; j < columns; ++j) total += losses[j];
  return static_cast<float>(total / static_cast<double>(columns));
}

/// `out[i] (+)= sum_j x(i, j)`: the sum of each row in fp32, rounded once (a Linear layer's bias gradient).
/// With `accumulate`, the old value of `out` joins the fp32 sum.
template <matmul_operand X, class Out>
requires matmul_output<std::remove_reference_t<Out>>
void row_sums(const X& x, Out&& out, bool accumulate = false) {
  static_assert(!X::IsRowMajor, "xax::row_sums: the input must be column-major");
  const Eigen::Index ldx = detail::leading_dimension(x, "row_sums");
  detail::check_no_overlap(detail::vector_storage(out), {detail::matrix_storage(x, "row_sums")}, "row_sums",
                           "the output");
  if (accumulate) {
    if (out.size() != x.rows() || (out.rows() != 1 && out.cols() != 1)) {
      throw ShapeError("xax::row_sums: the accumulated output has " + std::to_string(out.size()) +
                       " elements but the input has " + std::to_string(x.rows()) + " rows");
    }
    detail::check_vector_output(out, "row_sums", "the accumulated output");
  } else {
    detail::prepare_output(out, x.rows(), 1, "row_sums", "the output (one element per row)");
  }
  const auto rows = static_cast<std::size_t>(x.rows());
  thread_local detail::ScratchBuffer<float> scratch;
  float* sums = scratch.get(rows);
  if (accumulate) {
    detail::gather_vector(out, sums);  // a row of a matrix too, through its strides
  } else {
    std::fill(sums, sums + rows, 0.0f);
  }
  const Eigen::Index cols = x.cols();
  using T = typename X::Scalar;
  // The threads share the rows, each adding its rows' elements column after column: every sum takes the same
  // additions in the same order as on one thread, so the result does not depend on the thread count. The
  // bytes per row count the widened copy too, which is what a 16-bit input costs.
  const std::size_t bytes_per_row =
      static_cast<std::size_t>(cols) * (sizeof(T) + (std::is_same_v<T, float> ? 0 : sizeof(float)));
  detail::parallel_blocks(rows, bytes_per_row, 64, [&](std::size_t begin, std::size_t end) noexcept {
    for (Eigen::Index j = 0; j < cols; ++j) {
      std::size_t offset = begin;
      detail::for_each_float_chunk(x.data() + j * ldx + static_cast<Eigen::Index>(begin), end - begin,
                                   [&offset, sums](const float* chunk, std::size_t count) noexcept {
                                     for (std::size_t i = 0; i < count; ++i) sums[offset + i] += chunk[i];
                                     offset += count;
                                   });
    }
  });
  detail::scatter_vector(static_cast<const float*>(sums), out);
}

}  // namespace xax
