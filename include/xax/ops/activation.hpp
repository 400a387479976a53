#pragma once
/// \file
/// The activations xax fuses into matmul epilogues and differentiates in xax::nn: ReLU and GELU (the exact,
/// erf-based form, PyTorch's `nn.GELU()` default).

#include <xax/detail/eigen.hpp>

#include <unsupported/Eigen/SpecialFunctions>

#include <algorithm>
#include <cstddef>
#include <string_view>

namespace xax {

/// An element-wise activation applied after a matmul's bias (see MatmulOptions) or by xax::nn.
enum class Activation {
  none,  ///< identity
  relu,  ///< max(x, 0); NaN propagates
  gelu,  ///< x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), the exact GELU
};

/// "none", "relu" or "gelu".
constexpr std::string_view activation_name(Activation activation) {
  switch (activation) {
    case Activation::none:
      return "none";
    case Activation::relu:
      return "relu";
    case Activation::gelu:
      return "gelu";
  }
  return "invalid Activation";
}

namespace detail {

inline constexpr float inv_sqrt2 = 0.70710678118654752440f;
inline constexpr float inv_sqrt_2pi = 0.39894228040143267794f;

/// y = act(x) on float blocks; `x` and `y` may be the same array.
inline void activation_block(Activation activation, const float* x, float* y, std::size_t n) noexcept {
  switch (activation) {
    case Activation::none:
      if (x != y) std::copy(x, x + n, y);
      return;
    case Activation::relu:
      // `x < 0 ? 0 : x` (not max) so that a NaN reaches the loss and the overflow check.
      for (std::size_t i = 0; i < n; ++i) y[i] = x[i] < 0.0f ? 0.0f : x[i];
      return;
    case Activation::gelu: {
      const auto size = static_cast<Eigen::Index>(n);
      const Eigen::Map<const Eigen::ArrayXf> in(x, size);
      Eigen::Map<Eigen::ArrayXf> out(y, size);
      out = 0.5f * in * (1.0f + (in * inv_sqrt2).erf());
      return;
    }
  }
}

/// dx = dy * relu'(.) from the ReLU's output y (y > 0 exactly where its input was): the backward needs no
/// copy of the pre-activation. A NaN output passes the gradient through, as PyTorch's threshold_backward.
inline void relu_backward_block(const float* y, const float* dy, float* dx, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) dx[i] = y[i] <= 0.0f ? 0.0f : dy[i];
}

/// dx = dy * gelu'(x), gelu'(x) = Phi(x) + x phi(x), from the GELU's input x.
inline void gelu_backward_block(const float* x, const float* dy, float* dx, std::size_t n) noexcept {
  const auto size = static_cast<Eigen::Index>(n);
  const Eigen::Map<const Eigen::ArrayXf> in(x, size);
  const Eigen::Map<const Eigen::ArrayXf> grad(dy, size);
  Eigen::Map<Eigen::ArrayXf> out(dx, size);
  out = grad * (0.5f * (1.0f + (in * inv_sqrt2).erf()) + in * inv_sqrt_2pi * (-0.5f * in.square()).exp());
}

}  // namespace detail
}  // namespace xax
