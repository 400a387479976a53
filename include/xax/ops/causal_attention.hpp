#pragma once
/// \file
/// Multi-head causal self-attention as one op: for every sequence and head, Y = V P with
/// P = causal_softmax(scale K^T Q), the scores and the softmax in fp32 and every product accumulated in
/// fp32, rounded once into the output.
///
/// The operands are in the layout xax's matmuls write: features x tokens matrices, one token per column,
/// in which head h is rows [h * head_size, (h + 1) * head_size) and sequence b is columns
/// [b * length, (b + 1) * length). q, k and v may be row blocks of one fused projection, and the outputs may
/// be row blocks of one gradient matrix:
///
///     const xax::AttentionLayout layout{.heads = 4, .sequence_length = 64};
///     // probs: length x length x (batch * heads), kept for the backward
///     xax::causal_self_attention(qkv.topRows(c), qkv.middleRows(c, c), qkv.bottomRows(c), layout, scale,
///                                y, probs);
///     xax::causal_self_attention_backward(qkv.topRows(c), qkv.middleRows(c, c), qkv.bottomRows(c), probs,
///                                         dy, layout, scale, dqkv.topRows(c), dqkv.middleRows(c, c),
///                                         dqkv.bottomRows(c));
///
/// What one op buys over batched_matmul + causal_softmax + batched_matmul on split-out heads: each thread
/// takes whole (sequence, head) slices and runs them start to finish, a few at a time so that they stay in
/// its cache. It gathers the heads from the token layout itself, its fp32 scores never leave its scratch,
/// and it writes the output back in token layout. The forward and the backward are one fork/join each,
/// instead of one per product, softmax and head copy.
///
/// The probabilities are kept for the backward (length x length per slice, in the compute type), as the
/// unfused ops keep them. This is not FlashAttention's tiling with a running max and sum: at GPT block sizes
/// a slice's scores fit in cache, and recomputing them in the backward would add a product.
///
/// The products follow xax::matmul's dispatch. Where it would multiply T natively, each group of slices runs
/// as one 3-D oneDNN primitive (batched_matmul's), or one product per slice without oneDNN. Where it would
/// widen T's products to fp32 (no native 16-bit dot product), the heads are widened as they are gathered
/// and the products run in fp32 on the group, not as one widened product per slice. The softmax is
/// causal_softmax's. On one thread the results are bit for bit those of the unfused ops, and two threads
/// give the bits of one; tests/test_causal_attention.cpp checks both on the machine it runs on.

#include <xax/detail/eigen.hpp>
#include <xax/detail/eigen_tensor.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <utility>
#include <xax/detail/convert.hpp>
#include <xax/detail/parallel.hpp>
#include <xax/detail/scratch.hpp>
#include <xax/ops/batched_matmul.hpp>
#include <xax/ops/causal_softmax.hpp>
#include <xax/ops/matmul.hpp>
#include <xax/ops/matmul_concepts.hpp>
#include <xax/ops/reduce.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/threads.hpp>

namespace xax {

/// How attention's features x tokens operands divide into heads (equal row blocks) and sequences (equal
/// column blocks, each attended causally on its own).
struct AttentionLayout {
  Eigen::Index heads = 1;
  Eigen::Index sequence_length = 0;
};

namespace detail {

/// The slices of one attention call: slice s is head s % heads of sequence s / heads, as a head_size x
/// length block of every features x tokens operand.
struct AttentionSlices {
  Eigen::Index heads = 0;
  Eigen::Index head_size = 0;
  Eigen::Index length = 0;
  Eigen::Index count = 0;

  /// Where slice `s` starts in a features x tokens operand with leading dimension `ld`.
  [[nodiscard]] Eigen::Index offset(Eigen::Index s, Eigen::Index ld) const {
    return (s / heads) * length * ld + (s % heads) * head_size;
  }
  [[nodiscard]] Eigen::Index head_elements() const { return head_size * length; }
  [[nodiscard]] Eigen::Index score_elements() const { return length * length; }
  /// Slices a thread runs together: enough to amortise a oneDNN call, few enough that their fp32 scores
  /// (32 KiB per 64-token slice) stay in a core's L2.
  [[nodiscard]] Eigen::Index group() const { return std::max<Eigen::Index>(1, 32768 / score_elements()); }
};

/// A features x tokens operand: its data and leading dimension.
template <class S>
struct TokenOperand {
  S* data;
  Eigen::Index ld;
};

template <class M>
auto token_operand(M&& m) {
  return TokenOperand<std::remove_pointer_t<decltype(m.data())>>{m.data(), leading_dimension(m, "attention")};
}

/// `cols` columns of `rows` elements from `from` (leading dimension `ld_from`) to `to` (`ld_to`), converted
/// when the scalars differ. A head's column is short (head_size elements): a plain copy is an inlined Eigen
/// assignment, and only conversions go through xax's vector kernels, one call per column.
template <class From, class To>
void copy_columns(const From* from, Eigen::Index ld_from, To* to, Eigen::Index ld_to, Eigen::Index rows,
                  Eigen::Index cols) {
  if constexpr (std::is_same_v<From, To>) {
    using Matrix = Eigen::Matrix<From, Eigen::Dynamic, Eigen::Dynamic>;
    Eigen::Map<Matrix, 0, Eigen::OuterStride<>>(to, rows, cols, Eigen::OuterStride<>(ld_to)) =
        Eigen::Map<const Matrix, 0, Eigen::OuterStride<>>(from, rows, cols, Eigen::OuterStride<>(ld_from));
  } else {
    for (Eigen::Index c = 0; c < cols; ++c)
      convert_serial(from + c * ld_from, to + c * ld_to, static_cast<std::size_t>(rows));
  }
}

/// Copies slices [first, first + count) of a token operand into consecutive head_size x length matrices,
/// converted to C (widened, where the products run in fp32).
template <class S, class C>
void gather_heads(const AttentionSlices& slices, TokenOperand<const S> from, Eigen::Index first,
                  Eigen::Index count, C* to) {
  for (Eigen::Index i = 0; i < count; ++i) {
    const S* column = from.data + slices.offset(first + i, from.ld);
    C* out = to + i * slices.head_elements();
    copy_columns(column, from.ld, out, slices.head_size, slices.head_size, slices.length);
  }
}

/// The inverse of gather_heads: consecutive head_size x length matrices into slices of a token operand,
/// rounded once to its scalar.
template <class C, class S>
void scatter_heads(const AttentionSlices& slices, const C* from, Eigen::Index first, Eigen::Index count,
                   TokenOperand<S> to) {
  for (Eigen::Index i = 0; i < count; ++i) {
    const C* in = from + i * slices.head_elements();
    S* column = to.data + slices.offset(first + i, to.ld);
    copy_columns(in, slices.head_size, column, to.ld, slices.head_size, slices.length);
  }
}

/// Runs `work(first, count)` over every group of slices [begin, end).
template <class Work>
void for_each_group_in(const AttentionSlices& slices, Eigen::Index begin, Eigen::Index end, Work& work) {
  for (Eigen::Index first = begin; first < end; first += slices.group())
    work(first, std::min(slices.group(), end - first));
}

/// Runs `work(first, count)` over every group of slices. On several threads each takes a contiguous range of
/// slices, and the products and softmax inside run on it alone; with fewer than two slices per thread (a few
/// long sequences) the groups run one after another instead, each product and softmax on every thread.
template <class Work>
void for_each_slice_group(const AttentionSlices& slices, std::size_t bytes_per_slice, Work&& work) {
  if (slices.count < 2 * num_threads()) {
    for_each_group_in(slices, 0, slices.count, work);
    return;
  }
  parallel_blocks_rethrowing(
      static_cast<std::size_t>(slices.count), bytes_per_slice, 1, [&](std::size_t begin, std::size_t end) {
        for_each_group_in(slices, static_cast<Eigen::Index>(begin), static_cast<Eigen::Index>(end), work);
      });
}

template <class Q, class K, class V>
AttentionSlices check_attention(const Q& q, const K& k, const V& v, const AttentionLayout& layout,
                                float scale, const char* function) {
  const std::string name = std::string("xax::") + function;
  if (layout.heads < 1 || layout.sequence_length < 1) {
    throw ConfigError(name + ": the layout has " + std::to_string(layout.heads) +
                      " heads and sequence length " + std::to_string(layout.sequence_length) +
                      "; both must be >= 1");
  }
  if (k.rows() != q.rows() || k.cols() != q.cols() || v.rows() != q.rows() || v.cols() != q.cols()) {
    throw ShapeError(name + ": q is " + shape_string(q.rows(), q.cols()) + ", k " +
                     shape_string(k.rows(), k.cols()) + " and v " + shape_string(v.rows(), v.cols()) +
                     "; self-attention needs all three features x tokens with the same shape");
  }
  if (q.rows() % layout.heads != 0) {
    throw ShapeError(name + ": " + std::to_string(q.rows()) + " features do not split into " +
                     std::to_string(layout.heads) + " heads; the features must be a multiple of the heads");
  }
  if (q.cols() % layout.sequence_length != 0) {
    throw ShapeError(name + ": " + std::to_string(q.cols()) + " tokens do not split into sequences of " +
                     std::to_string(layout.sequence_length) +
                     "; the tokens (columns) must be a multiple of the sequence length");
  }
  check_causal_shape(layout.sequence_length, layout.sequence_length, scale, function);
  return {layout.heads, q.rows() / layout.heads, layout.sequence_length,
          q.cols() / layout.sequence_length * layout.heads};
}

/// `from` converted into `scratch` when C is not T, else `from` itself.
template <class C, class T>
const C* as_product_operand(const T* from, std::size_t count, C* scratch) {
  if constexpr (std::is_same_v<C, T>) {
    static_cast<void>(count);
    static_cast<void>(scratch);
    return from;
  } else {
    convert_serial(from, scratch, count);
    return scratch;
  }
}

/// The forward of every slice, its products' operands in C: T itself, or fp32 where xax::matmul would
/// widen T's products (no native 16-bit dot product; widens_products). Widened, the heads are converted as
/// they are gathered, at no pass of their own, and the products run as fp32 primitives on whole groups
/// instead of one widened product per slice. The values multiplied are the same either way: widening is
/// exact, and P and dS are rounded to T first.
template <class C, class T, class Out>
void attention_forward(const AttentionSlices& slices, TokenOperand<const T> q, TokenOperand<const T> k,
                       TokenOperand<const T> v, TokenOperand<Out> y, T* probs, float scale) {
  using Product = std::conditional_t<std::is_same_v<C, T>, Out, float>;  // what the products write
  constexpr bool widened = !std::is_same_v<C, T>;
  const Eigen::Index hs = slices.head_size, length = slices.length, heads = slices.head_elements();
  const Eigen::Index scores = slices.score_elements();
  const std::size_t bytes_per_slice =
      static_cast<std::size_t>(4 * heads) * sizeof(T) + static_cast<std::size_t>(scores) * sizeof(T);
  for_each_slice_group(slices, bytes_per_slice, [&](Eigen::Index first, Eigen::Index count) {
    const Eigen::Index group = slices.group();
    thread_local ScratchBuffer<C> operand_scratch;
    thread_local ScratchBuffer<float> score_scratch;
    thread_local ScratchBuffer<Product> product_scratch;
    C* const q_heads =
        operand_scratch.get(static_cast<std::size_t>(3 * group * heads + (widened ? group * scores : 0)));
    C* const k_heads = q_heads + group * heads;
    C* const v_heads = k_heads + group * heads;
    C* const widened_probs = v_heads + group * heads;  // only when widened
    float* const s = score_scratch.get(static_cast<std::size_t>(group * scores));
    Product* const y_heads = product_scratch.get(static_cast<std::size_t>(group * heads));
    T* const p = probs + first * scores;
    gather_heads(slices, q, first, count, q_heads);
    gather_heads(slices, k, first, count, k_heads);
    gather_heads(slices, v, first, count, v_heads);
    batched_products(static_cast<const C*>(k_heads), hs, length, static_cast<const C*>(q_heads), hs, length,
                     s, length, length, hs, count, {.transpose_a = true});  // K^T Q: keys x queries
    causal_softmax_columns(static_cast<const float*>(s), length, p, length,
                           {static_cast<std::size_t>(length), static_cast<std::size_t>(length),
                            static_cast<std::size_t>(length * count)},
                           scale);
    const C* const p_operand =
        as_product_operand(static_cast<const T*>(p), static_cast<std::size_t>(count * scores), widened_probs);
    batched_products(static_cast<const C*>(v_heads), hs, length, p_operand, length, length, y_heads, hs,
                     length, length, count, {});  // V P: head_size x queries
    scatter_heads(slices, static_cast<const Product*>(y_heads), first, count, y);
  });
}

/// The backward of every slice, its products' operands in C (see attention_forward).
template <class C, class T, class D>
void attention_backward(const AttentionSlices& slices, TokenOperand<const T> q, TokenOperand<const T> k,
                        TokenOperand<const T> v, TokenOperand<const T> dy, const T* probs, TokenOperand<D> dq,
                        TokenOperand<D> dk, TokenOperand<D> dv, float scale) {
  using Product = std::conditional_t<std::is_same_v<C, T>, D, float>;
  constexpr bool widened = !std::is_same_v<C, T>;
  const Eigen::Index hs = slices.head_size, length = slices.length, heads = slices.head_elements();
  const Eigen::Index scores = slices.score_elements();
  const std::size_t bytes_per_slice = static_cast<std::size_t>(4 * heads) * sizeof(T) +
                                      static_cast<std::size_t>(3 * heads) * sizeof(D) +
                                      static_cast<std::size_t>(scores) * sizeof(T);
  for_each_slice_group(slices, bytes_per_slice, [&](Eigen::Index first, Eigen::Index count) {
    const Eigen::Index group = slices.group();
    thread_local ScratchBuffer<C> operand_scratch;
    thread_local ScratchBuffer<T> ds_scratch;
    thread_local ScratchBuffer<float> dp_scratch;
    thread_local ScratchBuffer<Product> product_scratch;
    C* const q_heads =
        operand_scratch.get(static_cast<std::size_t>(4 * group * heads + (widened ? 2 * group * scores : 0)));
    C* const k_heads = q_heads + group * heads;
    C* const v_heads = k_heads + group * heads;
    C* const dy_heads = v_heads + group * heads;
    C* const widened_probs = dy_heads + group * heads;     // only when widened
    C* const widened_ds = widened_probs + group * scores;  // only when widened
    T* const ds = ds_scratch.get(static_cast<std::size_t>(group * scores));
    float* const dp = dp_scratch.get(static_cast<std::size_t>(group * scores));
    Product* const dq_heads = product_scratch.get(static_cast<std::size_t>(3 * group * heads));
    Product* const dk_heads = dq_heads + group * heads;
    Product* const dv_heads = dk_heads + group * heads;
    const T* const p = probs + first * scores;
    const auto elements = static_cast<std::size_t>(count * scores);
    gather_heads(slices, q, first, count, q_heads);
    gather_heads(slices, k, first, count, k_heads);
    gather_heads(slices, v, first, count, v_heads);
    gather_heads(slices, dy, first, count, dy_heads);
    const C* const p_operand = as_product_operand(p, elements, widened_probs);
    batched_products(static_cast<const C*>(dy_heads), hs, length, p_operand, length, length, dv_heads, hs,
                     length, length, count, {.transpose_b = true});  // dV = dY P^T
    batched_products(static_cast<const C*>(v_heads), hs, length, static_cast<const C*>(dy_heads), hs, length,
                     dp, length, length, hs, count, {.transpose_a = true});  // dP = V^T dY
    causal_softmax_backward_columns(p, length, static_cast<const float*>(dp), length, ds, length,
                                    {static_cast<std::size_t>(length), static_cast<std::size_t>(length),
                                     static_cast<std::size_t>(length * count)},
                                    scale);
    const C* const ds_operand = as_product_operand(static_cast<const T*>(ds), elements, widened_ds);
    batched_products(static_cast<const C*>(q_heads), hs, length, ds_operand, length, length, dk_heads, hs,
                     length, length, count, {.transpose_b = true});  // dK = Q dS^T
    batched_products(static_cast<const C*>(k_heads), hs, length, ds_operand, length, length, dq_heads, hs,
                     length, length, count, {});  // dQ = K dS
    scatter_heads(slices, static_cast<const Product*>(dq_heads), first, count, dq);
    scatter_heads(slices, static_cast<const Product*>(dk_heads), first, count, dk);
    scatter_heads(slices, static_cast<const Product*>(dv_heads), first, count, dv);
  });
}

}  // namespace detail

/// Causal self-attention of every head of every sequence: y = V P per slice, P = causal_softmax(scale K^T Q)
/// (see causal_softmax), in the layout described above. `probs` (length x length x (sequences * heads),
/// slice sequence * heads + head; a plain Eigen::Tensor is resized) keeps P for the backward; `y` (features
/// x tokens, T or float; a plain matrix is resized) must not share storage with any input. Throws
/// ConfigError for a layout without heads or length and a scale that is not finite and > 0, ShapeError for
/// operands that do not split into the layout, and Error for overlapping storage.
template <matmul_operand Q, matmul_operand K, matmul_operand V, class Y, class Probs>
requires matmul_output<std::remove_reference_t<Y>> && batched_output<std::remove_reference_t<Probs>>
void causal_self_attention(const Q& q, const K& k, const V& v, const AttentionLayout& layout, float scale,
                           Y&& y, Probs&& probs) {
  using T = typename Q::Scalar;
  using Out = typename std::remove_reference_t<Y>::Scalar;
  static_assert(std::is_same_v<typename K::Scalar, T> && std::is_same_v<typename V::Scalar, T>,
                "xax::causal_self_attention: q, k and v must have the same scalar");
  static_assert(std::is_same_v<typename std::remove_reference_t<Probs>::Scalar, T>,
                "xax::causal_self_attention: the probabilities are kept in the inputs' scalar");
  static_assert(std::is_same_v<Out, T> || std::is_same_v<Out, float>,
                "xax::causal_self_attention: the output must hold the inputs' scalar or float");
  static_assert(!Q::IsRowMajor && !K::IsRowMajor && !V::IsRowMajor,
                "xax::causal_self_attention: the operands must be column-major (features x tokens)");
  constexpr const char* function = "causal_self_attention";
  const detail::AttentionSlices slices = detail::check_attention(q, k, v, layout, scale, function);
  const auto inputs = {detail::matrix_storage(q, function), detail::matrix_storage(k, function),
                       detail::matrix_storage(v, function)};
  detail::check_no_overlap(detail::matrix_storage(y, function), inputs, "causal_self_attention",
                           "the output");
  detail::check_no_overlap(detail::tensor_storage(probs), inputs, "causal_self_attention",
                           "the probabilities");
  const auto check_outputs_apart = [&] {
    detail::check_outputs_apart({{detail::matrix_storage(y, function), "the output"},
                                 {detail::tensor_storage(probs), "the probabilities"}},
                                function);
  };
  check_outputs_apart();
  // A vector output of a 1-feature input keeps its own shape: write it at the leading dimension returned.
  const Eigen::Index ldy =
      detail::prepare_output(y, q.rows(), q.cols(), "causal_self_attention", "the output");
  detail::prepare_output3(probs, layout.sequence_length, layout.sequence_length, slices.count,
                          "causal_self_attention", "the probabilities");
  check_outputs_apart();
  if (slices.count == 0) return;

  const auto q_in = detail::token_operand(q), k_in = detail::token_operand(k),
             v_in = detail::token_operand(v);
  if (detail::widens_products<T>()) {
    detail::attention_forward<float>(slices, q_in, k_in, v_in, detail::TokenOperand<Out>{y.data(), ldy},
                                     probs.data(), scale);
  } else {
    detail::attention_forward<T>(slices, q_in, k_in, v_in, detail::TokenOperand<Out>{y.data(), ldy},
                                 probs.data(), scale);
  }
}

/// The gradients of causal_self_attention with respect to q, k and v, from its inputs, its kept `probs` and
/// the output's gradient `dy` (features x tokens, the inputs' scalar): per slice dV = dY P^T, dS =
/// causal_softmax_backward(P, V^T dY) (dP in fp32), dK = Q dS^T and dQ = K dS, each accumulated in fp32.
/// `dq`, `dk`, `dv` (features x tokens, one scalar, T or float; plain matrices are resized) must not share
/// storage with each other or with any input. Throws as the forward does, and ShapeError when `probs` or
/// `dy` do not have the forward's shapes.
template <matmul_operand Q, matmul_operand K, matmul_operand V, batched_operand Probs, matmul_operand DY,
          class DQ, class DK, class DV>
requires matmul_output<std::remove_reference_t<DQ>> && matmul_output<std::remove_reference_t<DK>> &&
    matmul_output<std::remove_reference_t<DV>>
void causal_self_attention_backward(const Q& q, const K& k, const V& v, const Probs& probs, const DY& dy,
                                    const AttentionLayout& layout, float scale, DQ&& dq, DK&& dk, DV&& dv) {
  using T = typename Q::Scalar;
  using D = typename std::remove_reference_t<DQ>::Scalar;
  static_assert(
      std::is_same_v<typename K::Scalar, T> && std::is_same_v<typename V::Scalar, T> &&
          std::is_same_v<std::remove_const_t<typename Probs::Scalar>, T> &&
          std::is_same_v<typename DY::Scalar, T>,
      "xax::causal_self_attention_backward: q, k, v, the probabilities and dy must have the same scalar");
  static_assert(std::is_same_v<typename std::remove_reference_t<DK>::Scalar, D> &&
                    std::is_same_v<typename std::remove_reference_t<DV>::Scalar, D>,
                "xax::causal_self_attention_backward: dq, dk and dv must have the same scalar");
  static_assert(std::is_same_v<D, T> || std::is_same_v<D, float>,
                "xax::causal_self_attention_backward: the gradients must hold the inputs' scalar or float");
  static_assert(!Q::IsRowMajor && !K::IsRowMajor && !V::IsRowMajor && !DY::IsRowMajor,
                "xax::causal_self_attention_backward: the operands must be column-major (features x tokens)");
  constexpr const char* function = "causal_self_attention_backward";
  const detail::AttentionSlices slices = detail::check_attention(q, k, v, layout, scale, function);
  if (dy.rows() != q.rows() || dy.cols() != q.cols()) {
    throw ShapeError(std::string("xax::") + function + ": dy is " +
                     detail::shape_string(dy.rows(), dy.cols()) + " but the output was " +
                     detail::shape_string(q.rows(), q.cols()));
  }
  if (probs.dimension(0) != slices.length || probs.dimension(1) != slices.length ||
      probs.dimension(2) != slices.count) {
    throw ShapeError(std::string("xax::") + function + ": the probabilities are " +
                     detail::shape3_string(probs.dimension(0), probs.dimension(1), probs.dimension(2)) +
                     " but the forward gave " +
                     detail::shape3_string(slices.length, slices.length, slices.count) +
                     "; pass the ones causal_self_attention wrote");
  }
  const auto inputs = {detail::matrix_storage(q, function), detail::matrix_storage(k, function),
                       detail::matrix_storage(v, function), detail::matrix_storage(dy, function),
                       detail::tensor_storage(probs)};
  detail::check_no_overlap(detail::matrix_storage(dq, function), inputs, function, "dq");
  detail::check_no_overlap(detail::matrix_storage(dk, function), inputs, function, "dk");
  detail::check_no_overlap(detail::matrix_storage(dv, function), inputs, function, "dv");
  const auto check_outputs_apart = [&] {
    detail::check_outputs_apart({{detail::matrix_storage(dq, function), "dq"},
                                 {detail::matrix_storage(dk, function), "dk"},
                                 {detail::matrix_storage(dv, function), "dv"}},
                                function);
  };
  check_outputs_apart();
  const Eigen::Index ldq = detail::prepare_output(dq, q.rows(), q.cols(), function, "dq");
  const Eigen::Index ldk = detail::prepare_output(dk, q.rows(), q.cols(), function, "dk");
  const Eigen::Index ldv = detail::prepare_output(dv, q.rows(), q.cols(), function, "dv");
  check_outputs_apart();
  if (slices.count == 0) return;

  const auto q_in = detail::token_operand(q), k_in = detail::token_operand(k),
             v_in = detail::token_operand(v);
  const auto dy_in = detail::token_operand(dy);
  const detail::TokenOperand<D> dq_out{dq.data(), ldq}, dk_out{dk.data(), ldk}, dv_out{dv.data(), ldv};
  if (detail::widens_products<T>()) {
    detail::attention_backward<float>(slices, q_in, k_in, v_in, dy_in, probs.data(), dq_out, dk_out, dv_out,
                                      scale);
  } else {
    detail::attention_backward<T>(slices, q_in, k_in, v_in, dy_in, probs.data(), dq_out, dk_out, dv_out,
                                  scale);
  }
}

}  // namespace xax
