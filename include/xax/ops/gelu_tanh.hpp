#pragma once
/// \file
/// GELU in the tanh form GPT-2 uses (PyTorch's `gelu(x, approximate='tanh')`), forward and backward, on
/// float, bfloat16 or float16 storage with the arithmetic in fp32 and one rounding per result:
///
///     gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
///
///     xax::gelu_tanh(u, h);                  // h = gelu_tanh(u)
///     xax::gelu_tanh_backward(u, dh, du);    // du = dh * gelu_tanh'(u), from the input u
///
/// The exact, erf-based GELU is xax::Activation::gelu (xax/ops/activation.hpp, xax::nn::gelu).

#include <xax/detail/eigen.hpp>

#include <algorithm>
#include <cstddef>
#include <string>
#include <type_traits>
#include <xax/detail/elementwise.hpp>
#include <xax/ops/matmul_concepts.hpp>
#include <xax/ops/reduce.hpp>
#include <xax/utils/error.hpp>

namespace xax {

namespace detail {

inline constexpr float sqrt_2_over_pi = 0.79788456080286535588f;
inline constexpr float gelu_tanh_cubic = 0.044715f;

inline void gelu_tanh_block(const float* x, float* y, std::size_t n) noexcept {
  const auto size = static_cast<Eigen::Index>(n);
  const Eigen::Map<const Eigen::ArrayXf> in(x, size);
  Eigen::Map<Eigen::ArrayXf> out(y, size);
  out = 0.5f * in * (1.0f + (sqrt_2_over_pi * (in + gelu_tanh_cubic * in.cube())).tanh());
}

/// d/dx gelu_tanh(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2), t = tanh(...).
inline void gelu_tanh_backward_block(const float* x, const float* dy, float* dx, std::size_t n) noexcept {
  const auto size = static_cast<Eigen::Index>(n);
  const Eigen::Map<const Eigen::ArrayXf> in(x, size);
  const Eigen::Map<const Eigen::ArrayXf> grad(dy, size);
  Eigen::Map<Eigen::ArrayXf> out(dx, size);
  // tanh is stored once in `out` rather than kept as an expression used twice, which Eigen would evaluate
  // (the costliest part) twice per element. `out` may alias `grad` (dx written over dy): the tanh therefore
  // goes into a local block first.
  alignas(64) float t_block[elementwise_block];
  for (Eigen::Index i = 0; i < size; i += static_cast<Eigen::Index>(elementwise_block)) {
    const Eigen::Index count = std::min(static_cast<Eigen::Index>(elementwise_block), size - i);
    const auto x_part = in.segment(i, count);
    Eigen::Map<Eigen::ArrayXf> t(t_block, count);
    t = (sqrt_2_over_pi * (x_part + gelu_tanh_cubic * x_part.cube())).tanh();
    out.segment(i, count) =
        grad.segment(i, count) * (0.5f * (1.0f + t) + 0.5f * x_part * (1.0f - t.square()) * sqrt_2_over_pi *
                                                          (1.0f + 3.0f * gelu_tanh_cubic * x_part.square()));
  }
}

/// Calls `pass(first elements of a, out, count)` on the whole storage when both operands are contiguous,
/// else column by column through the leading dimensions (`ldo`: the output's, from prepare_output).
template <class A, class Pass>
void for_each_column_run(const A& a, Eigen::Index ldo, const char* function, const Pass& pass) {
  const Eigen::Index rows = a.rows(), cols = a.cols();
  const Eigen::Index lda = leading_dimension(a, function);
  if (lda == rows && ldo == rows) {
    pass(Eigen::Index{0}, Eigen::Index{0}, static_cast<std::size_t>(rows * cols));
    return;
  }
  for (Eigen::Index j = 0; j < cols; ++j) pass(j * lda, j * ldo, static_cast<std::size_t>(rows));
}

}  // namespace detail

/// y = gelu_tanh(x) element-wise, in fp32, rounded once into `y` (resized when plain). `y` may be `x`.
template <matmul_operand X, class Y>
requires matmul_output<std::remove_reference_t<Y>>
void gelu_tanh(const X& x, Y&& y) {
  static_assert(!X::IsRowMajor, "xax::gelu_tanh: the input must be column-major");
  // Element by element, so y may be exactly x; any other overlap would read results as inputs.
  detail::check_no_overlap(detail::matrix_storage(y, "gelu_tanh"), {detail::matrix_storage(x, "gelu_tanh")},
                           "gelu_tanh", "the output", /*in_place=*/true);
  const Eigen::Index ldy = detail::prepare_output(y, x.rows(), x.cols(), "gelu_tanh", "the output");
  detail::for_each_column_run(
      x, ldy, "gelu_tanh", [&](Eigen::Index x_offset, Eigen::Index y_offset, std::size_t n) {
        detail::map_as_float(x.data() + x_offset, y.data() + y_offset, n,
                             [](const float* in, float* out, std::size_t count) noexcept {
                               detail::gelu_tanh_block(in, out, count);
                             });
      });
}

/// dx = dy * gelu_tanh'(x), from the forward's input `x`, in fp32, rounded once into `dx` (resized when
/// plain). `dx` may be `dy`. Throws ShapeError when x and dy differ in shape.
template <matmul_operand X, matmul_operand DY, class DX>
requires matmul_output<std::remove_reference_t<DX>>
void gelu_tanh_backward(const X& x, const DY& dy, DX&& dx) {
  static_assert(!X::IsRowMajor && !DY::IsRowMajor, "xax::gelu_tanh_backward: inputs must be column-major");
  if (x.rows() != dy.rows() || x.cols() != dy.cols()) {
    throw ShapeError("xax::gelu_tanh_backward: the input is " + std::to_string(x.rows()) + "x" +
                     std::to_string(x.cols()) + " but the output's gradient is " + std::to_string(dy.rows()) +
                     "x" + std::to_string(dy.cols()) + "; they must have the same shape");
  }
  constexpr const char* function = "gelu_tanh_backward";
  // dx may be exactly dy (gelu_tanh_backward_block reads each element of dy before writing it), not x.
  const detail::StoredOperand dx_storage = detail::matrix_storage(dx, function);
  detail::check_no_overlap(dx_storage, {detail::matrix_storage(x, function)}, function, "dx");
  detail::check_no_overlap(dx_storage, {detail::matrix_storage(dy, function)}, function, "dx",
                           /*in_place=*/true);
  const Eigen::Index ldx = detail::leading_dimension(x, function),
                     ldd = detail::leading_dimension(dy, function);
  const Eigen::Index ldo = detail::prepare_output(dx, x.rows(), x.cols(), function, "dx");
  const auto run = [&](Eigen::Index x_offset, Eigen::Index d_offset, Eigen::Index o_offset, std::size_t n) {
    detail::map2_as_float(x.data() + x_offset, dy.data() + d_offset, dx.data() + o_offset, n,
                          [](const float* in, const float* grad, float* out, std::size_t count) noexcept {
                            detail::gelu_tanh_backward_block(in, grad, out, count);
                          });
  };
  const Eigen::Index rows = x.rows();
  if (ldx == rows && ldd == rows && ldo == rows) {
    run(0, 0, 0, static_cast<std::size_t>(x.size()));
    return;
  }
  for (Eigen::Index j = 0; j < x.cols(); ++j) run(j * ldx, j * ldd, j * ldo, static_cast<std::size_t>(rows));
}

}  // namespace xax
