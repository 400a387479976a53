#pragma once
/// \file
/// The Linear layer, y = act(w x + b), with its backward pass, generic over the compute scalar. Samples are
/// columns (x is features x batch), so the forward is one xax::matmul with a fused bias + activation epilogue
/// and fp32 accumulation. The parameters are a tree the caller owns:
///
///     xax::nn::LinearParams<float> master = xax::nn::linear_init(784, 512, seed);
///     auto params = xax::tree_cast<xax::bfloat16>(master);        // LinearParams<bfloat16>
///     xax::nn::linear_forward(params, x, z);                        // z = w x + b
///     xax::nn::linear_backward_params(x, dz, grads);                // grads.w = dz x^T, grads.b = sum_j dz
///     xax::nn::linear_backward_input(params, dz, dx);               // dx = w^T dz

#include <xax/detail/eigen.hpp>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <xax/detail/format.hpp>
#include <xax/detail/random.hpp>
#include <xax/ops/activation.hpp>
#include <xax/ops/matmul.hpp>
#include <xax/ops/reduce.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/tree.hpp>
#include <xax/utils/tree_cast.hpp>

namespace xax::nn {

/// A column-major dynamic matrix of T.
template <floating_scalar T>
using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
/// A dynamic column vector of T.
template <floating_scalar T>
using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

/// The parameters of one Linear layer: `w` is outputs x inputs, `b` has one element per output.
template <floating_scalar T>
struct LinearParams {
  Matrix<T> w;
  Vector<T> b;
  XAX_FIELDS(w, b);
};

namespace detail {

using xax::detail::SplitMix64;

template <floating_scalar T>
LinearParams<T> linear_init_from(Eigen::Index inputs, Eigen::Index outputs, SplitMix64& rng) {
  if (inputs < 1 || outputs < 1) {
    throw ConfigError("xax::nn::linear_init: a Linear layer needs at least 1 input and 1 output, got " +
                      std::to_string(inputs) + " inputs and " + std::to_string(outputs) + " outputs");
  }
  // PyTorch's nn.Linear default: kaiming_uniform_(a = sqrt(5)) for w, which is U(-1/sqrt(in), 1/sqrt(in)),
  // and the same bound for b.
  const float bound = 1.0f / std::sqrt(static_cast<float>(inputs));
  LinearParams<T> params{Matrix<T>(outputs, inputs), Vector<T>(outputs)};
  for (Eigen::Index i = 0; i < params.w.size(); ++i)
    params.w.data()[i] = static_cast<T>(rng.uniform_symmetric(bound));
  for (Eigen::Index i = 0; i < params.b.size(); ++i)
    params.b.data()[i] = static_cast<T>(rng.uniform_symmetric(bound));
  return params;
}

}  // namespace detail

/// A Linear layer initialised as PyTorch's nn.Linear (uniform with bound 1/sqrt(inputs) for w and b),
/// deterministically from `seed`. Throws ConfigError for a size below 1.
template <floating_scalar T = float>
LinearParams<T> linear_init(Eigen::Index inputs, Eigen::Index outputs, std::uint64_t seed) {
  detail::SplitMix64 rng(seed);
  return detail::linear_init_from<T>(inputs, outputs, rng);
}

/// y = act(w x + b) in one matmul with the bias and activation fused. `x` holds T (features x batch); `y`
/// holds T or float and is resized when it is a plain matrix.
template <floating_scalar T, matmul_operand X, class Y>
requires matmul_output<std::remove_reference_t<Y>>
void linear_forward(const LinearParams<T>& params, const X& x, Y&& y,
                    Activation activation = Activation::none) {
  static_assert(std::is_same_v<typename X::Scalar, T>,
                "xax::nn::linear_forward: the input must hold the parameters' scalar; cast it first");
  matmul(params.w, x, params.b, y, {.activation = activation});
}

/// The parameter gradients from dz = dL/d(w x + b): `grads.w = dz x^T` and `grads.b = sum over samples of
/// dz` (in fp32, rounded once), or added to the current gradients with `accumulate`. `grads` holds the
/// inputs' scalar or float: float gradients from half inputs come straight from the fp32 accumulator, never
/// rounded to the half type. `grads` is resized unless accumulating.
template <floating_scalar G, matmul_operand X, matmul_operand DZ>
void linear_backward_params(const X& x, const DZ& dz, LinearParams<G>& grads, bool accumulate = false) {
  static_assert(std::is_same_v<typename X::Scalar, typename DZ::Scalar>,
                "xax::nn::linear_backward_params: x and dz must hold the same scalar");
  static_assert(std::is_same_v<G, typename DZ::Scalar> || std::is_same_v<G, float>,
                "xax::nn::linear_backward_params: the gradients must hold the inputs' scalar or float");
  if (x.cols() != dz.cols()) {
    throw ShapeError("xax::nn::linear_backward_params: x has " + std::to_string(x.cols()) +
                     " samples (columns) but dz has " + std::to_string(dz.cols()));
  }
  // Accumulating, both gradients are checked before either is added to: a refusal must leave the sums of
  // earlier micro-batches as they were.
  if (accumulate &&
      (grads.w.rows() != dz.rows() || grads.w.cols() != x.rows() || grads.b.size() != dz.rows())) {
    throw ShapeError("xax::nn::linear_backward_params: accumulating into gradients of w " +
                     xax::detail::shape_string(grads.w.rows(), grads.w.cols()) + " and b of " +
                     std::to_string(grads.b.size()) + " elements, but this layer's are w " +
                     xax::detail::shape_string(dz.rows(), x.rows()) + " and b of " +
                     std::to_string(dz.rows()));
  }
  matmul(dz, x, grads.w, {.transpose_b = true, .accumulate = accumulate});
  row_sums(dz, grads.b, accumulate);
}

/// dx = w^T dz, the gradient passed to the layer below. `dx` is resized when it is a plain matrix.
template <floating_scalar T, matmul_operand DZ, class DX>
requires matmul_output<std::remove_reference_t<DX>>
void linear_backward_input(const LinearParams<T>& params, const DZ& dz, DX&& dx) {
  matmul(params.w, dz, dx, {.transpose_a = true});
}

}  // namespace xax::nn
