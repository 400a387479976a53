#pragma once
/// \file
/// Embedding lookup (a gather of table columns) and its backward, a scatter-add that sums in fp32. The table
/// is features x vocabulary (one embedding per column) and the output features x tokens, as everywhere in
/// xax one token per column.
///
///     xax::embedding(wte, tokens, x);                               // x.col(n) = wte.col(tokens[n])
///     xax::embedding(wpe, positions, x, {.accumulate = true});      // x.col(n) += wpe.col(positions[n])
///     xax::embedding_backward(dx, tokens, dwte);                    // dwte.col(tokens[n]) += dx.col(n)
///
/// A token that occurs many times in a batch adds every one of its gradients: the sums run in fp32 (a
/// 16-bit table gradient is summed in an fp32 scratch and rounded once), and each thread owns a range of
/// feature rows, so no update races with another and the result does not depend on the thread count.

#include <xax/detail/eigen.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <xax/detail/convert.hpp>
#include <xax/detail/elementwise.hpp>
#include <xax/detail/parallel.hpp>
#include <xax/detail/scratch.hpp>
#include <xax/ops/matmul_concepts.hpp>
#include <xax/ops/reduce.hpp>
#include <xax/utils/error.hpp>

namespace xax {

/// How an embedding op writes its output.
struct EmbeddingOptions {
  /// Add to the output's current value (summed in fp32, rounded once) instead of overwriting it.
  bool accumulate = false;
};

namespace detail {

inline std::string embedding_shape(Eigen::Index rows, Eigen::Index cols) {
  return std::to_string(rows) + "x" + std::to_string(cols);
}

inline void check_token_ids(std::span<const std::int32_t> tokens, Eigen::Index vocabulary,
                            const char* function) {
  for (std::size_t n = 0; n < tokens.size(); ++n) {
    if (tokens[n] < 0 || tokens[n] >= vocabulary) {
      throw ShapeError(std::string("xax::") + function + ": token " + std::to_string(tokens[n]) +
                       " at position " + std::to_string(n) + " is outside [0, " + std::to_string(vocabulary) +
                       "), the columns (vocabulary) of the table");
    }
  }
}

}  // namespace detail

/// out.col(n) (+)= table.col(tokens[n]) for every token, in fp32 and rounded once into `out` (features x
/// tokens, resized when plain and not accumulating). Throws ShapeError for a token id outside the table or
/// an output of the wrong shape.
template <matmul_operand Table, label_vector Tokens, class Out>
requires matmul_output<std::remove_reference_t<Out>>
void embedding(const Table& table, const Tokens& tokens, Out&& out, const EmbeddingOptions& options = {}) {
  static_assert(!Table::IsRowMajor,
                "xax::embedding: the table must be column-major (one embedding per column)");
  const std::span<const std::int32_t> ids = detail::label_span(tokens);
  detail::check_token_ids(ids, table.cols(), "embedding");
  const Eigen::Index features = table.rows();
  const auto count = static_cast<Eigen::Index>(ids.size());
  // Checked before the output is resized, which would free the storage of a table or tokens inside it.
  detail::check_no_overlap(detail::matrix_storage(out, "embedding"),
                           {detail::matrix_storage(table, "embedding"), detail::label_storage(ids)},
                           "embedding", "the output");
  const Eigen::Index ldt = detail::leading_dimension(table, "embedding");
  Eigen::Index ldo = 0;
  if (options.accumulate) {
    ldo = detail::leading_dimension(out, "embedding");
    if (out.rows() != features || out.cols() != count) {
      throw ShapeError("xax::embedding: the accumulated output is " +
                       detail::embedding_shape(out.rows(), out.cols()) + " but must be " +
                       detail::embedding_shape(features, count) + " (features x tokens)");
    }
  } else {
    ldo = detail::prepare_output(out, features, count, "embedding", "the output");
  }
  using S = typename Table::Scalar;
  using O = typename std::remove_reference_t<Out>::Scalar;
  const auto rows = static_cast<std::size_t>(features);
  const S* source = table.data();
  O* destination = out.data();
  const bool accumulate = options.accumulate;
  const std::int32_t* id = ids.data();
  detail::parallel_blocks(ids.size(), rows * (sizeof(S) + sizeof(O)), 1,
                          [=](std::size_t begin, std::size_t end) noexcept {
                            alignas(64) float row[detail::elementwise_block];
                            alignas(64) float old[detail::elementwise_block];
                            for (std::size_t n = begin; n < end; ++n) {
                              const S* in = source + static_cast<Eigen::Index>(id[n]) * ldt;
                              O* o = destination + static_cast<Eigen::Index>(n) * ldo;
                              for (std::size_t i = 0; i < rows; i += detail::elementwise_block) {
                                const std::size_t c = std::min(detail::elementwise_block, rows - i);
                                detail::convert_serial(in + i, row, c);
                                if (accumulate) {
                                  detail::convert_serial(static_cast<const O*>(o + i), old, c);
                                  for (std::size_t k = 0; k < c; ++k) row[k] += old[k];
                                }
                                detail::convert_serial(static_cast<const float*>(row), o + i, c);
                              }
                            }
                          });
}

/// dtable.col(tokens[n]) += dout.col(n) for every token: the embedding's gradient, a scatter-add summed in
/// fp32 (repeated tokens add up; nothing is lost to a race or to 16-bit rounding between additions) and
/// rounded once into `dtable` (features x vocabulary). Without `accumulate`, dtable starts from zero and must
/// already have (or, when plain, is given) `vocabulary` columns.
template <matmul_operand DOut, label_vector Tokens, class DTable>
requires matmul_output<std::remove_reference_t<DTable>>
void embedding_backward(const DOut& dout, const Tokens& tokens, DTable&& dtable, Eigen::Index vocabulary,
                        const EmbeddingOptions& options = {}) {
  static_assert(!DOut::IsRowMajor, "xax::embedding_backward: the gradient must be column-major");
  const std::span<const std::int32_t> ids = detail::label_span(tokens);
  if (dout.cols() != static_cast<Eigen::Index>(ids.size())) {
    throw ShapeError("xax::embedding_backward: the gradient has " + std::to_string(dout.cols()) +
                     " columns but there are " + std::to_string(ids.size()) +
                     " tokens; give one token per column");
  }
  if (vocabulary < 0) {
    throw ShapeError("xax::embedding_backward: the vocabulary is " + std::to_string(vocabulary) +
                     "; give the number of columns of the table (>= 0)");
  }
  detail::check_token_ids(ids, vocabulary, "embedding_backward");
  const Eigen::Index features = dout.rows();
  // dtable is zeroed (or read) before dout is, and a resize would free storage dout points into.
  detail::check_no_overlap(detail::matrix_storage(dtable, "embedding_backward"),
                           {detail::matrix_storage(dout, "embedding_backward"), detail::label_storage(ids)},
                           "embedding_backward", "the table gradient");
  const Eigen::Index ldd = detail::leading_dimension(dout, "embedding_backward");
  Eigen::Index ldt = 0;
  if (options.accumulate) {
    ldt = detail::leading_dimension(dtable, "embedding_backward");
    if (dtable.rows() != features || dtable.cols() != vocabulary) {
      throw ShapeError("xax::embedding_backward: the accumulated table gradient is " +
                       detail::embedding_shape(dtable.rows(), dtable.cols()) + " but must be " +
                       detail::embedding_shape(features, vocabulary) + " (features x vocabulary)");
    }
  } else {
    ldt = detail::prepare_output(dtable, features, vocabulary, "embedding_backward", "the table gradient");
  }
  using D = typename DOut::Scalar;
  using O = typename std::remove_reference_t<DTable>::Scalar;
  const auto rows = static_cast<std::size_t>(features);
  const auto columns = static_cast<std::size_t>(vocabulary);
  // A float table gradient is summed in place; a 16-bit one in an fp32 copy, rounded once at the end.
  float* sums = nullptr;
  Eigen::Index lds = ldt;
  thread_local detail::ScratchBuffer<float> scratch;
  if constexpr (std::is_same_v<O, float>) {
    sums = dtable.data();
  } else {
    sums = scratch.get(rows * columns);
    lds = features;
  }
  if (options.accumulate) {
    if constexpr (!std::is_same_v<O, float>) {
      for (std::size_t v = 0; v < columns; ++v)
        detail::convert_serial(static_cast<const O*>(dtable.data() + static_cast<Eigen::Index>(v) * ldt),
                               sums + static_cast<Eigen::Index>(v) * lds, rows);
    }
  } else {
    for (std::size_t v = 0; v < columns; ++v) {
      float* column = sums + static_cast<Eigen::Index>(v) * lds;
      std::fill(column, column + rows, 0.0f);
    }
  }
  const D* grad = dout.data();
  const std::int32_t* id = ids.data();
  const std::size_t tokens_count = ids.size();
  // Threads split the feature rows, so every thread walks all tokens in order over its own rows.
  detail::parallel_blocks(rows, tokens_count * (sizeof(D) + 2 * sizeof(float)), 16,
                          [=](std::size_t begin, std::size_t end) noexcept {
                            alignas(64) float row[detail::elementwise_block];
                            for (std::size_t i = begin; i < end; i += detail::elementwise_block) {
                              const std::size_t c = std::min(detail::elementwise_block, end - i);
                              for (std::size_t n = 0; n < tokens_count; ++n) {
                                detail::convert_serial(grad + static_cast<Eigen::Index>(n) * ldd + i, row, c);
                                float* target = sums + static_cast<Eigen::Index>(id[n]) * lds + i;
                                for (std::size_t k = 0; k < c; ++k) target[k] += row[k];
                              }
                            }
                          });
  if constexpr (!std::is_same_v<O, float>) {
    for (std::size_t v = 0; v < columns; ++v)
      detail::convert_serial(static_cast<const float*>(sums + static_cast<Eigen::Index>(v) * lds),
                             dtable.data() + static_cast<Eigen::Index>(v) * ldt, rows);
  }
}

}  // namespace xax
