#pragma once
/// \file
/// ReLU and GELU layers with their backward passes, generic over the compute scalar (float, bfloat16,
/// float16): the arithmetic runs in fp32 and each result is rounded once.
///
///     xax::nn::relu(z, h);                 // h = max(z, 0)
///     xax::nn::relu_backward(h, dh, dz);   // dz = dh where h > 0, else 0 (from the output: no copy of z)
///     xax::nn::gelu(z, h);                 // h = z * Phi(z)
///     xax::nn::gelu_backward(z, dh, dz);   // dz = dh * gelu'(z) (from the input)

#include <xax/detail/eigen.hpp>

#include <cstddef>
#include <string>
#include <type_traits>
#include <xax/detail/elementwise.hpp>
#include <xax/detail/format.hpp>
#include <xax/ops/activation.hpp>
#include <xax/ops/matmul_concepts.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/tree.hpp>

namespace xax::nn {

/// A contiguous Eigen matrix or array (plain, or a default-stride Map) of float, bfloat16 or float16.
template <class M>
concept dense_tensor =
    eigen_dense_leaf<std::remove_cvref_t<M>> && matmul_scalar<typename std::remove_cvref_t<M>::Scalar>;

/// A dense_tensor that can be written.
template <class M>
concept writable_dense_tensor =
    dense_tensor<M> && !std::is_const_v<std::remove_reference_t<M>> &&
    (static_cast<unsigned>(std::remove_cvref_t<M>::Flags) & Eigen::LvalueBit) != 0;

namespace detail {

/// Throws ShapeError when `a` and `b` store their elements in different orders (one row-major, the other
/// column-major, with more than one row and column): the layers combine their storage element by element,
/// which would transpose one of them.
template <class A, class B>
void require_same_layout([[maybe_unused]] const A& a, [[maybe_unused]] const B& b,
                         [[maybe_unused]] const char* function, [[maybe_unused]] const char* a_name,
                         [[maybe_unused]] const char* b_name) {
  if constexpr (static_cast<bool>(std::remove_cvref_t<A>::IsRowMajor) !=
                static_cast<bool>(std::remove_cvref_t<B>::IsRowMajor)) {
    if (a.rows() > 1 && a.cols() > 1) {
      const auto order = [](bool row_major) { return row_major ? "row-major" : "column-major"; };
      throw ShapeError(std::string("xax::nn::") + function + ": " + a_name + " is " +
                       order(std::remove_cvref_t<A>::IsRowMajor) + " but " + b_name + " is " +
                       order(std::remove_cvref_t<B>::IsRowMajor) +
                       "; give them the same storage order (the layer combines them element by element in "
                       "storage order)");
    }
  }
}

/// Gives `out` the shape of `like`: resizes a plain object that can take it, checks anything else.
template <class Out, class Like>
void shape_like(Out& out, const Like& like, const char* function) {
  xax::detail::resize_plain_if_possible(out, like.rows(), like.cols());
  if (out.rows() != like.rows() || out.cols() != like.cols()) {
    throw ShapeError(std::string("xax::nn::") + function + ": the output is " +
                     xax::detail::shape_string(out.rows(), out.cols()) + " but the input is " +
                     xax::detail::shape_string(like.rows(), like.cols()));
  }
  require_same_layout(out, like, function, "the output", "the input");
}

template <class A, class B>
void require_same_shape(const A& a, const B& b, const char* function, const char* a_name,
                        const char* b_name) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) {
    throw ShapeError(std::string("xax::nn::") + function + ": " + a_name + " is " +
                     xax::detail::shape_string(a.rows(), a.cols()) + " but " + b_name + " is " +
                     xax::detail::shape_string(b.rows(), b.cols()) + "; they must have the same shape");
  }
}

inline std::size_t size_of(Eigen::Index size) {
  return static_cast<std::size_t>(size);
}

}  // namespace detail

/// y = relu(x). `y` may be `x` (in place) and is resized when it is a plain matrix.
template <dense_tensor X, writable_dense_tensor Y>
void relu(const X& x, Y&& y) {
  detail::shape_like(y, x, "relu");
  xax::detail::map_as_float(x.data(), y.data(), detail::size_of(x.size()),
                            [](const float* in, float* out, std::size_t n) noexcept {
                              xax::detail::activation_block(Activation::relu, in, out, n);
                            });
}

/// dx = dy * relu'(x), from the ReLU's output `y` (y > 0 exactly where x > 0). `dx` may be `dy`.
template <dense_tensor Y, dense_tensor DY, writable_dense_tensor DX>
void relu_backward(const Y& y, const DY& dy, DX&& dx) {
  detail::require_same_shape(y, dy, "relu_backward", "the output", "its gradient");
  detail::require_same_layout(y, dy, "relu_backward", "the output", "its gradient");
  detail::shape_like(dx, y, "relu_backward");
  xax::detail::map2_as_float(y.data(), dy.data(), dx.data(), detail::size_of(y.size()),
                             [](const float* out, const float* grad, float* result, std::size_t n) noexcept {
                               xax::detail::relu_backward_block(out, grad, result, n);
                             });
}

/// y = gelu(x) = x Phi(x), the exact (erf) GELU. `y` may be `x`.
template <dense_tensor X, writable_dense_tensor Y>
void gelu(const X& x, Y&& y) {
  detail::shape_like(y, x, "gelu");
  xax::detail::map_as_float(x.data(), y.data(), detail::size_of(x.size()),
                            [](const float* in, float* out, std::size_t n) noexcept {
                              xax::detail::activation_block(Activation::gelu, in, out, n);
                            });
}

/// dx = dy * gelu'(x), from the GELU's input `x`. `dx` may be `dy`.
template <dense_tensor X, dense_tensor DY, writable_dense_tensor DX>
void gelu_backward(const X& x, const DY& dy, DX&& dx) {
  detail::require_same_shape(x, dy, "gelu_backward", "the input", "the output's gradient");
  detail::require_same_layout(x, dy, "gelu_backward", "the input", "the output's gradient");
  detail::shape_like(dx, x, "gelu_backward");
  xax::detail::map2_as_float(x.data(), dy.data(), dx.data(), detail::size_of(x.size()),
                             [](const float* in, const float* grad, float* result, std::size_t n) noexcept {
                               xax::detail::gelu_backward_block(in, grad, result, n);
                             });
}

}  // namespace xax::nn
