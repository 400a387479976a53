#pragma once
/// \file
/// A multilayer perceptron classifier (Linear, activation, ..., Linear) with softmax cross-entropy: the model
/// of xax's benchmarks and examples, written once and run under any precision policy.
///
///     auto master = xax::nn::mlp_init({784, 512, 512, 10}, /*seed=*/1);    // MlpParams<float>
///     auto params = xax::tree_cast<xax::bfloat16>(master);                 // compute copy
///     xax::nn::MlpParams<xax::bfloat16> grads;                              // caller-owned, reused
///     xax::nn::MlpWorkspace<xax::bfloat16> workspace;                       // activations, reused
///     float loss = xax::nn::mlp_loss_and_gradients(params, x, labels, grads, workspace,
///                                                  {.loss_scale = 1024.0f});
///
/// `x` is features x batch (one sample per column); labels are one std::int32_t per column. After the first
/// call with a given batch size, a call allocates nothing: the workspace and the gradients keep their
/// buffers, and the matmul backends keep theirs.

#include <xax/detail/eigen.hpp>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>
#include <xax/detail/concurrent.hpp>
#include <xax/detail/convert.hpp>
#include <xax/detail/format.hpp>
#include <xax/nn/activation.hpp>
#include <xax/nn/linear.hpp>
#include <xax/nn/loss.hpp>
#include <xax/ops/activation.hpp>
#include <xax/ops/matmul.hpp>
#include <xax/ops/reduce.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/tree.hpp>
#include <xax/utils/tree_cast.hpp>

namespace xax::nn {

/// The parameters of an MLP, first layer first. A tree: `tree_cast<bfloat16>(MlpParams<float>)` is an
/// `MlpParams<bfloat16>`, and diagnostics name leaves `layers[1].w`.
template <floating_scalar T>
struct MlpParams {
  std::vector<LinearParams<T>> layers;
  XAX_FIELDS(layers);
};

/// An MLP with layer sizes `sizes` = {inputs, hidden..., outputs}, each Linear layer initialised as
/// PyTorch's nn.Linear, deterministically from `seed`. Throws ConfigError for fewer than 2 sizes or a size
/// below 1.
template <floating_scalar T = float>
MlpParams<T> mlp_init(std::span<const Eigen::Index> sizes, std::uint64_t seed) {
  if (sizes.size() < 2) {
    throw ConfigError("xax::nn::mlp_init: an MLP needs at least 2 sizes (inputs and outputs), got " +
                      std::to_string(sizes.size()));
  }
  detail::SplitMix64 rng(seed);
  MlpParams<T> params;
  params.layers.reserve(sizes.size() - 1);
  for (std::size_t i = 0; i + 1 < sizes.size(); ++i) {
    params.layers.push_back(detail::linear_init_from<T>(sizes[i], sizes[i + 1], rng));
  }
  return params;
}

/// mlp_init from a brace list: `mlp_init({784, 512, 512, 10}, seed)`.
template <floating_scalar T = float>
MlpParams<T> mlp_init(std::initializer_list<Eigen::Index> sizes, std::uint64_t seed) {
  return mlp_init<T>(std::span<const Eigen::Index>(sizes.begin(), sizes.size()), seed);
}

/// The buffers of a forward and backward pass, kept between calls so that a train step allocates nothing.
/// Read `logits()` after a forward; the members are the library's scratch space.
template <floating_scalar T>
struct MlpWorkspace {
  Matrix<T> input;                         ///< the inputs in T, when the caller's scalar is another
  std::vector<Matrix<T>> outputs;          ///< each layer's activated output; the last holds the logits
  std::vector<Matrix<T>> pre_activations;  ///< hidden layers' w x + b, kept for GELU's backward only
  Matrix<T> grad;                          ///< dL/d(pre-activation) of the layer being differentiated
  Matrix<T> grad_below;                    ///< dL/d(output) of the layer below

  /// The logits (outputs x batch) of the last forward pass.
  [[nodiscard]] const Matrix<T>& logits() const { return outputs.back(); }
};

/// How mlp_loss_and_gradients differentiates.
struct MlpBackwardOptions {
  /// The loss is multiplied by this before the backward pass (loss scaling): every gradient comes out
  /// multiplied by it. A finite value > 0.
  float loss_scale = 1.0f;
  /// Add to `grads` instead of overwriting them (gradient accumulation over micro-batches).
  bool accumulate = false;
  /// The activation between layers; it must match the forward's.
  Activation hidden_activation = Activation::relu;
};

namespace detail {

template <class T, class Input>
decltype(auto) inputs_in(const Input& inputs, MlpWorkspace<T>& workspace) {
  if constexpr (std::is_same_v<typename Input::Scalar, T>) {
    return (inputs);
  } else {
    workspace.input.resize(inputs.rows(), inputs.cols());
    const Eigen::Index ld = xax::detail::leading_dimension(inputs);
    if (ld == inputs.rows()) {
      // One conversion over the whole batch, split across xax's threads.
      xax::detail::convert_n(inputs.data(), workspace.input.data(), static_cast<std::size_t>(inputs.size()));
    } else {
      for (Eigen::Index j = 0; j < inputs.cols(); ++j) {
        xax::detail::convert_n(inputs.data() + j * ld, workspace.input.data() + j * inputs.rows(),
                               static_cast<std::size_t>(inputs.rows()));
      }
    }
    return static_cast<const Matrix<T>&>(workspace.input);
  }
}

template <class T, class Input>
void check_mlp_inputs(const MlpParams<T>& params, const Input& inputs) {
  if (params.layers.empty()) {
    throw ShapeError("xax::nn::mlp: the MLP has no layers; create its parameters with xax::nn::mlp_init");
  }
  if (inputs.rows() != params.layers.front().w.cols()) {
    throw ShapeError("xax::nn::mlp: the first layer takes " + std::to_string(params.layers.front().w.cols()) +
                     " features but the inputs are " +
                     xax::detail::shape_string(inputs.rows(), inputs.cols()) +
                     "; pass features x batch, one sample per column");
  }
}

// The workspace is overwritten (and its matrices resized) by the call, so inputs stored in it, such as the
// logits an earlier mlp_forward returned from it, would be read after they were freed or overwritten.
template <class T, class Input>
void check_inputs_outside_workspace(const Input& inputs, const MlpWorkspace<T>& workspace,
                                    const char* function) {
  const auto stored_inputs = xax::detail::matrix_storage(inputs, function);
  const auto check = [&](const Matrix<T>& buffer) {
    if (xax::detail::ranges_overlap(stored_inputs, xax::detail::matrix_storage(buffer, function))) {
      throw ShapeError(
          std::string("xax::nn::") + function +
          ": the inputs share memory with the workspace (e.g. the logits an earlier mlp_forward "
          "returned from it), which this call overwrites; copy them first or use another workspace");
    }
  };
  check(workspace.input);
  for (const Matrix<T>& buffer : workspace.outputs) check(buffer);
  for (const Matrix<T>& buffer : workspace.pre_activations) check(buffer);
  check(workspace.grad);
  check(workspace.grad_below);
}

template <class T, class X>
void forward_pass(const MlpParams<T>& params, const X& x, MlpWorkspace<T>& workspace, Activation hidden) {
  const std::size_t layers = params.layers.size();
  workspace.outputs.resize(layers);
  if (hidden == Activation::gelu) workspace.pre_activations.resize(layers);
  const auto forward_layer = [&](std::size_t i, const auto& in) {
    const bool last = i + 1 == layers;
    if (!last && hidden == Activation::gelu) {
      // GELU's backward needs its input, so the epilogue is not fused here.
      linear_forward(params.layers[i], in, workspace.pre_activations[i]);
      gelu(workspace.pre_activations[i], workspace.outputs[i]);
    } else {
      linear_forward(params.layers[i], in, workspace.outputs[i], last ? Activation::none : hidden);
    }
  };
  forward_layer(0, x);
  for (std::size_t i = 1; i < layers; ++i) forward_layer(i, workspace.outputs[i - 1]);
}

}  // namespace detail

/// The logits of `inputs` (features x batch, any matmul scalar), computed in T with fp32 accumulation. The
/// returned matrix lives in `workspace` until the next call.
template <floating_scalar T, matmul_operand Input>
const Matrix<T>& mlp_forward(const MlpParams<T>& params, const Input& inputs, MlpWorkspace<T>& workspace,
                             Activation hidden_activation = Activation::relu) {
  static_assert(!Input::IsRowMajor,
                "xax::nn::mlp_forward: the inputs must be column-major (features x batch)");
  detail::check_mlp_inputs(params, inputs);
  detail::check_inputs_outside_workspace(inputs, workspace, "mlp_forward");
  detail::forward_pass(params, detail::inputs_in(inputs, workspace), workspace, hidden_activation);
  return workspace.logits();
}

/// One forward and backward pass: returns the mean softmax cross-entropy over the batch (fp32, unscaled)
/// and writes the gradients of `loss * options.loss_scale` into `grads` (resized unless accumulating).
/// `grads` holds T or float. Float gradients of half parameters are written by the matmuls straight from
/// their fp32 accumulators: the gradient cast of a mixed-precision step is then fused into the backward, and
/// the gradients are never rounded to the half type.
/// Throws ShapeError for inputs or labels that do not fit the model, ConfigError for a bad loss scale.
template <floating_scalar T, floating_scalar G, matmul_operand Input, label_vector Labels>
float mlp_loss_and_gradients(const MlpParams<T>& params, const Input& inputs, const Labels& labels,
                             MlpParams<G>& grads, MlpWorkspace<T>& workspace,
                             const MlpBackwardOptions& options = {}) {
  static_assert(std::is_same_v<G, T> || std::is_same_v<G, float>,
                "xax::nn::mlp_loss_and_gradients: the gradients must hold the parameters' scalar or float");
  static_assert(!Input::IsRowMajor,
                "xax::nn::mlp_loss_and_gradients: the inputs must be column-major (features x batch)");
  if (!(options.loss_scale > 0.0f) || !std::isfinite(options.loss_scale)) {
    throw ConfigError("xax::nn::mlp_loss_and_gradients: loss_scale " +
                      xax::detail::shortest_text(options.loss_scale) +
                      " is not accepted; give a finite value > 0 (1 for no scaling)");
  }
  detail::check_mlp_inputs(params, inputs);
  detail::check_inputs_outside_workspace(inputs, workspace, "mlp_loss_and_gradients");
  if constexpr (std::is_same_v<G, T>) {
    // The backward reads each layer's weights while it writes that layer's gradients.
    if (static_cast<const void*>(&grads) == static_cast<const void*>(&params)) {
      throw ShapeError(
          "xax::nn::mlp_loss_and_gradients: grads is the params themselves; the backward reads the weights "
          "while it writes the gradients, so pass a separate MlpParams for the gradients");
    }
  }
  const std::size_t layers = params.layers.size();
  if (options.accumulate) {
    if (grads.layers.size() != layers) {
      throw ShapeError("xax::nn::mlp_loss_and_gradients: accumulating into gradients of " +
                       std::to_string(grads.layers.size()) + " layers for an MLP of " +
                       std::to_string(layers));
    }
    // Every layer before any is added to: the backward runs from the last layer, and a refusal at a lower
    // one must leave the sums of earlier micro-batches as they were.
    for (std::size_t i = 0; i < layers; ++i) {
      const auto& p = params.layers[i];
      const auto& g = grads.layers[i];
      if (g.w.rows() != p.w.rows() || g.w.cols() != p.w.cols() || g.b.size() != p.b.size()) {
        throw ShapeError("xax::nn::mlp_loss_and_gradients: accumulating into layer " + std::to_string(i) +
                         "'s gradients of w " + xax::detail::shape_string(g.w.rows(), g.w.cols()) +
                         " and b of " + std::to_string(g.b.size()) + " elements, but its params are w " +
                         xax::detail::shape_string(p.w.rows(), p.w.cols()) + " and b of " +
                         std::to_string(p.b.size()));
      }
    }
  } else {
    grads.layers.resize(layers);
  }
  const Activation hidden = options.hidden_activation;
  const auto& x = detail::inputs_in(inputs, workspace);
  detail::forward_pass(params, x, workspace, hidden);

  const float loss = softmax_cross_entropy(workspace.logits(), labels, workspace.grad, options.loss_scale);
  // Products this CPU widens to fp32 (float16 without AVX512-FP16, bf16 without AVX512_BF16) run one after
  // the other, each on every thread: side by side, each thread would hold its own widening panels (up to
  // 10 MiB; packed blocks on xax's AVX2 GEMM), which cost the float16 policy its memory target on two threads
  // (1.49x against 1.58x on one, activation-heavy probe), and running them side by side was no faster
  // (TrainStep/float16/threads:2 and TrainStep/mixed at the AVX512_CORE and AVX2 caps, within the noise; Zen
  // 4, 2026-12-01).
  const bool one_after_the_other = xax::detail::widens_products<T>();
  for (std::size_t i = layers; i-- > 0;) {
    // workspace.grad holds dL/dz of layer i (z = w x + b, before the activation).
    if (i == 0) {
      linear_backward_params(x, workspace.grad, grads.layers[i], options.accumulate);
      break;
    }
    // The parameter gradients and the gradient passed down are independent (see run_side_by_side).
    const auto params_gradient = [&] {
      linear_backward_params(workspace.outputs[i - 1], workspace.grad, grads.layers[i], options.accumulate);
    };
    const auto input_gradient = [&] {
      linear_backward_input(params.layers[i], workspace.grad, workspace.grad_below);
      if (hidden == Activation::relu) {
        relu_backward(workspace.outputs[i - 1], workspace.grad_below, workspace.grad_below);
      } else if (hidden == Activation::gelu) {
        gelu_backward(workspace.pre_activations[i - 1], workspace.grad_below, workspace.grad_below);
      }
    };
    if (one_after_the_other) {
      params_gradient();
      input_gradient();
    } else {
      xax::detail::run_side_by_side(params_gradient, input_gradient);
    }
    std::swap(workspace.grad, workspace.grad_below);
  }
  return loss;
}

}  // namespace xax::nn
