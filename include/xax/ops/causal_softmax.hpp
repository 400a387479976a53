#pragma once
/// \file
/// The softmax of causal self-attention, in fp32 with the 1/sqrt(head_size) scale folded in: for attention
/// scores laid out keys x queries (one query per column, as `K^T Q` gives them), column i keeps the keys
/// j <= i + (keys - queries) and gives the others probability 0. Exponentials and sums run in fp32 whatever
/// the storage type (softmax is on PyTorch autocast's fp32 list), and each probability is rounded once.
///
///     xax::batched_matmul(k, q, scores, {.transpose_a = true});          // keys x queries x (batch*heads)
///     xax::causal_softmax(scores, probs, 1.0f / std::sqrt(head_size));  // probs: scores' shape
///     xax::causal_softmax_backward(probs, dprobs, dscores, scale);      // d(loss)/d(scores)
///
/// Both take 3-D tensors (xax::batched_operand, one attention matrix per slice) or matrices (one matrix).

#include <xax/detail/eigen.hpp>
#include <xax/detail/eigen_tensor.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <string>
#include <type_traits>
#include <xax/detail/convert.hpp>
#include <xax/detail/elementwise.hpp>
#include <xax/detail/parallel.hpp>
#include <xax/detail/scratch.hpp>
#include <xax/ops/batched_matmul.hpp>
#include <xax/ops/matmul_concepts.hpp>
#include <xax/ops/reduce.hpp>
#include <xax/utils/error.hpp>

namespace xax {

namespace detail {

/// The geometry of a stack of keys x queries attention matrices seen as one keys x (queries * batch)
/// matrix with leading dimensions: column c is query c % queries.
struct AttentionColumns {
  std::size_t keys = 0;
  std::size_t queries = 0;
  std::size_t columns = 0;
};

inline void check_causal_shape(Eigen::Index keys, Eigen::Index queries, float scale, const char* function) {
  if (keys < queries) {
    throw ShapeError(std::string("xax::") + function + ": the scores are " + std::to_string(keys) +
                     " keys (rows) x " + std::to_string(queries) +
                     " queries (columns); a causal mask needs at least as many keys as queries, or the first "
                     "queries would see no key");
  }
  if (!std::isfinite(scale) || !(scale > 0.0f)) {
    throw ConfigError(std::string("xax::") + function + ": scale " + std::to_string(scale) +
                      " is not accepted; give a finite value > 0 (usually 1/sqrt(head_size))");
  }
}

/// How many keys query `column` may attend to.
inline std::size_t visible_keys(const AttentionColumns& shape, std::size_t column) {
  return column % shape.queries + (shape.keys - shape.queries) + 1;
}

/// Floats per SIMD packet that the column buffers are padded to: a column's tail then runs through the same
/// vectorised exp as its body, instead of a scalar std::exp per left-over element.
inline constexpr std::size_t softmax_padding = 16;

inline std::size_t padded_keys(std::size_t visible) {
  return (visible + softmax_padding - 1) / softmax_padding * softmax_padding;
}

/// Each column: widen its visible scores once into an fp32 buffer padded with -inf (whose exponentials are
/// exactly 0, so the padding changes neither the max nor the sum), then max, exp, sum and normalise as whole
/// Eigen array expressions over the buffer, and round once into the output.
template <class T, class O>
void causal_softmax_columns(const T* x, Eigen::Index ldx, O* y, Eigen::Index ldy, AttentionColumns shape,
                            float scale) {
  parallel_blocks(shape.columns, shape.keys * (sizeof(T) + sizeof(O)), 1,
                  [=](std::size_t begin, std::size_t end) noexcept {
                    thread_local ScratchBuffer<float> scratch;
                    float* buffer = scratch.get(padded_keys(shape.keys));
                    const O zero = convert_scalar<O>(0.0f);
                    for (std::size_t c = begin; c < end; ++c) {
                      const T* in = x + static_cast<Eigen::Index>(c) * ldx;
                      O* out = y + static_cast<Eigen::Index>(c) * ldy;
                      const std::size_t visible = visible_keys(shape, c);
                      const std::size_t padded = padded_keys(visible);
                      convert_serial(in, buffer, visible);
                      std::fill(buffer + visible, buffer + padded, -std::numeric_limits<float>::infinity());
                      Eigen::Map<Eigen::ArrayXf> v(buffer, static_cast<Eigen::Index>(padded));
                      v *= scale;
                      const float max = v.maxCoeff();
                      // A column of -inf scores keeps shift 0, as xax::softmax does; +inf or NaN propagate.
                      const float shift = std::isinf(max) && max < 0 ? 0.0f : max;
                      v = (v - shift).exp();
                      v *= 1.0f / v.sum();
                      convert_serial(static_cast<const float*>(buffer), out, visible);
                      std::fill(out + visible, out + shape.keys, zero);
                    }
                  });
}

/// Each column: widen the visible probabilities and their gradients once into fp32 buffers padded with
/// zeros, then the dot product and the result as whole Eigen array expressions.
template <class P, class D, class O>
void causal_softmax_backward_columns(const P* p, Eigen::Index ldp, const D* dp, Eigen::Index ldd, O* ds,
                                     Eigen::Index lds, AttentionColumns shape, float scale) {
  parallel_blocks(shape.columns, shape.keys * (sizeof(P) + sizeof(D) + sizeof(O)), 1,
                  [=](std::size_t begin, std::size_t end) noexcept {
                    thread_local ScratchBuffer<float> scratch;
                    const std::size_t capacity = padded_keys(shape.keys);
                    float* p_buffer = scratch.get(2 * capacity);
                    float* d_buffer = p_buffer + capacity;
                    const O zero = convert_scalar<O>(0.0f);
                    for (std::size_t c = begin; c < end; ++c) {
                      const P* probs = p + static_cast<Eigen::Index>(c) * ldp;
                      const D* grads = dp + static_cast<Eigen::Index>(c) * ldd;
                      O* out = ds + static_cast<Eigen::Index>(c) * lds;
                      const std::size_t visible = visible_keys(shape, c);
                      const std::size_t padded = padded_keys(visible);
                      convert_serial(probs, p_buffer, visible);
                      convert_serial(grads, d_buffer, visible);
                      std::fill(p_buffer + visible, p_buffer + padded, 0.0f);
                      std::fill(d_buffer + visible, d_buffer + padded, 0.0f);
                      const auto n = static_cast<Eigen::Index>(padded);
                      const Eigen::Map<const Eigen::ArrayXf> pv(p_buffer, n);
                      Eigen::Map<Eigen::ArrayXf> g(d_buffer, n);
                      const float mean = (pv * g).sum();
                      g = scale * pv * (g - mean);
                      convert_serial(static_cast<const float*>(d_buffer), out, visible);
                      // Masked scores never reached the loss: their gradient is exactly zero.
                      std::fill(out + visible, out + shape.keys, zero);
                    }
                  });
}

template <class Out>
void prepare_output3(Out& out, Eigen::Index rows, Eigen::Index cols, Eigen::Index batch, const char* function,
                     const char* what) {
  if constexpr (requires { out.resize(rows, cols, batch); }) {
    if (out.dimension(0) != rows || out.dimension(1) != cols || out.dimension(2) != batch)
      out.resize(rows, cols, batch);
  }
  if (out.dimension(0) != rows || out.dimension(1) != cols || out.dimension(2) != batch) {
    throw ShapeError(std::string("xax::") + function + ": " + what + " is " +
                     shape3_string(out.dimension(0), out.dimension(1), out.dimension(2)) + " but must be " +
                     shape3_string(rows, cols, batch));
  }
}

/// The storage of a 3-D operand, all its slices as one column.
template <class M>
StoredOperand tensor_storage(const M& m) {
  return contiguous_storage(m.data(), m.size(), sizeof(typename M::Scalar));
}

template <class A, class B>
void require_same_shape3(const A& a, const B& b, const char* function) {
  if (a.dimension(0) != b.dimension(0) || a.dimension(1) != b.dimension(1) ||
      a.dimension(2) != b.dimension(2)) {
    throw ShapeError(
        std::string("xax::") + function + ": the probabilities are " +
        shape3_string(a.dimension(0), a.dimension(1), a.dimension(2)) + " but their gradient is " +
        shape3_string(b.dimension(0), b.dimension(1), b.dimension(2)) + "; they must have the same shape");
  }
}

}  // namespace detail

/// Causal softmax of every slice of `scores` (keys x queries x batch): probs(j, i) = softmax over the
/// visible keys j <= i + keys - queries of scale * scores(j, i), and 0 for the keys it may not see. Computed
/// in fp32, rounded once into `probs` (a plain Eigen::Tensor is resized), which may be `scores` (in place).
/// Throws ShapeError when there are fewer keys than queries and ConfigError for a scale that is not finite
/// and > 0.
template <batched_operand Scores, class Probs>
requires batched_output<std::remove_reference_t<Probs>>
void causal_softmax(const Scores& scores, Probs&& probs, float scale) {
  const Eigen::Index keys = scores.dimension(0), queries = scores.dimension(1), batch = scores.dimension(2);
  detail::check_causal_shape(keys, queries, scale, "causal_softmax");
  detail::check_no_overlap(detail::tensor_storage(probs), {detail::tensor_storage(scores)}, "causal_softmax",
                           "the output", true);
  detail::prepare_output3(probs, keys, queries, batch, "causal_softmax", "the output");
  if (keys == 0) return;
  const detail::AttentionColumns shape{static_cast<std::size_t>(keys), static_cast<std::size_t>(queries),
                                       static_cast<std::size_t>(queries * batch)};
  detail::causal_softmax_columns(scores.data(), keys, probs.data(), keys, shape, scale);
}

/// Causal softmax of one keys x queries matrix (see the 3-D form); `probs` is resized when plain.
template <matmul_operand Scores, class Probs>
requires matmul_output<std::remove_reference_t<Probs>>
void causal_softmax(const Scores& scores, Probs&& probs, float scale) {
  static_assert(!Scores::IsRowMajor, "xax::causal_softmax: the scores must be column-major (keys x queries)");
  detail::check_causal_shape(scores.rows(), scores.cols(), scale, "causal_softmax");
  detail::check_no_overlap(detail::matrix_storage(probs, "causal_softmax"),
                           {detail::matrix_storage(scores, "causal_softmax")}, "causal_softmax", "the output",
                           true);
  const Eigen::Index ldx = detail::leading_dimension(scores, "causal_softmax");
  const Eigen::Index ldy =
      detail::prepare_output(probs, scores.rows(), scores.cols(), "causal_softmax", "the output");
  if (scores.rows() == 0) return;
  const detail::AttentionColumns shape{static_cast<std::size_t>(scores.rows()),
                                       static_cast<std::size_t>(scores.cols()),
                                       static_cast<std::size_t>(scores.cols())};
  detail::causal_softmax_columns(scores.data(), ldx, probs.data(), ldy, shape, scale);
}

/// The gradient of causal_softmax with respect to its scores, from its output `probs` and the output's
/// gradient `dprobs`: dscores(j, i) = scale * p(j, i) * (dp(j, i) - sum_k p(k, i) dp(k, i)) over the visible
/// keys and exactly 0 for masked ones, in fp32, rounded once. `dscores` may be `dprobs` (in place). `scale`
/// is the forward's.
template <batched_operand Probs, batched_operand DProbs, class DScores>
requires batched_output<std::remove_reference_t<DScores>>
void causal_softmax_backward(const Probs& probs, const DProbs& dprobs, DScores&& dscores, float scale) {
  const Eigen::Index keys = probs.dimension(0), queries = probs.dimension(1), batch = probs.dimension(2);
  detail::check_causal_shape(keys, queries, scale, "causal_softmax_backward");
  detail::require_same_shape3(probs, dprobs, "causal_softmax_backward");
  detail::check_no_overlap(detail::tensor_storage(dscores),
                           {detail::tensor_storage(probs), detail::tensor_storage(dprobs)},
                           "causal_softmax_backward", "the output", true);
  detail::prepare_output3(dscores, keys, queries, batch, "causal_softmax_backward", "the output");
  if (keys == 0) return;
  const detail::AttentionColumns shape{static_cast<std::size_t>(keys), static_cast<std::size_t>(queries),
                                       static_cast<std::size_t>(queries * batch)};
  detail::causal_softmax_backward_columns(probs.data(), keys, dprobs.data(), keys, dscores.data(), keys,
                                          shape, scale);
}

/// causal_softmax_backward for one keys x queries matrix.
template <matmul_operand Probs, matmul_operand DProbs, class DScores>
requires matmul_output<std::remove_reference_t<DScores>>
void causal_softmax_backward(const Probs& probs, const DProbs& dprobs, DScores&& dscores, float scale) {
  static_assert(!Probs::IsRowMajor && !DProbs::IsRowMajor,
                "xax::causal_softmax_backward: the inputs must be column-major (keys x queries)");
  detail::check_causal_shape(probs.rows(), probs.cols(), scale, "causal_softmax_backward");
  if (probs.rows() != dprobs.rows() || probs.cols() != dprobs.cols()) {
    throw ShapeError("xax::causal_softmax_backward: the probabilities are " +
                     detail::shape_string(probs.rows(), probs.cols()) + " but their gradient is " +
                     detail::shape_string(dprobs.rows(), dprobs.cols()) + "; they must have the same shape");
  }
  constexpr const char* function = "causal_softmax_backward";
  detail::check_no_overlap(
      detail::matrix_storage(dscores, function),
      {detail::matrix_storage(probs, function), detail::matrix_storage(dprobs, function)}, function,
      "the output", true);
  const Eigen::Index ldp = detail::leading_dimension(probs, function),
                     ldd = detail::leading_dimension(dprobs, function);
  const Eigen::Index lds =
      detail::prepare_output(dscores, probs.rows(), probs.cols(), function, "the output");
  if (probs.rows() == 0) return;
  const detail::AttentionColumns shape{static_cast<std::size_t>(probs.rows()),
                                       static_cast<std::size_t>(probs.cols()),
                                       static_cast<std::size_t>(probs.cols())};
  detail::causal_softmax_backward_columns(probs.data(), ldp, dprobs.data(), ldd, dscores.data(), lds, shape,
                                          scale);
}

}  // namespace xax
