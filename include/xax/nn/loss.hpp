#pragma once
/// \file
/// Losses and metrics for classifiers whose logits are classes x batch. The loss itself is
/// xax::softmax_cross_entropy (fp32 from any compute scalar, with its gradient scaled by the loss scale);
/// this header names it in xax::nn and adds accuracy.

#include <xax/detail/eigen.hpp>

#include <cmath>
#include <cstdint>
#include <span>
#include <type_traits>
#include <xax/ops/matmul_concepts.hpp>
#include <xax/ops/reduce.hpp>

namespace xax::nn {

using xax::softmax_cross_entropy;

/// The number of columns whose largest logit (the first, on ties) is at the label's row. A column with a NaN
/// logit has no largest one and counts as wrong, whatever its label. Throws ShapeError when there is not one
/// label per column or a label is not a row index.
template <matmul_operand Logits, label_vector Labels>
std::int64_t count_correct(const Logits& logits, const Labels& labels) {
  static_assert(!Logits::IsRowMajor, "xax::nn::count_correct: the logits must be column-major");
  const std::span<const std::int32_t> label = xax::detail::label_span(labels);
  xax::detail::check_labels(label, logits.rows(), logits.cols(), "nn::count_correct");
  std::int64_t correct = 0;
  for (Eigen::Index j = 0; j < logits.cols(); ++j) {
    Eigen::Index best = 0;
    float best_value = static_cast<float>(logits(0, j));
    bool has_nan = std::isnan(best_value);
    for (Eigen::Index i = 1; i < logits.rows(); ++i) {
      const auto value = static_cast<float>(logits(i, j));
      has_nan = has_nan || std::isnan(value);
      if (value > best_value) {
        best = i;
        best_value = value;
      }
    }
    if (!has_nan && best == label[static_cast<std::size_t>(j)]) ++correct;
  }
  return correct;
}

}  // namespace xax::nn
