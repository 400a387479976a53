#pragma once
// A character-level GPT in nanoGPT's layout, written as user code on xax's ops: token and position
// embeddings, n_layer pre-LayerNorm blocks of causal self-attention and an MLP with GELU (tanh form), a final
// LayerNorm and a head tied to the token embedding. Forward and backward are written once over the compute
// scalar T; the gradients may be written in another scalar G (float, when TrainStep asks for fp32 gradients
// of 16-bit parameters, which the matmuls then write straight from their fp32 accumulators).
//
// Layout: one token per column. Activations are n_embd x (batch * block) with column b * block + t; the
// residual stream is kept in fp32 under every policy (as PyTorch autocast's residual adds promote to fp32),
// the matmul inputs are T. Attention (xax::causal_self_attention) reads q, k and v as row blocks of the fused
// projection's output and writes the merged heads; only its probabilities are 3-D, block x block x (batch *
// heads).
//
// Precision: LayerNorm gains and biases are fp32 leaves inside the T-templated params (xax's tree casts
// copy a float leaf of a struct templated on T float to float), so they stay fp32 under a 16-bit policy;
// every matmul accumulates in fp32; LayerNorm statistics, softmax, cross-entropy and the embedding
// scatter-add run in fp32.
//
// Not done here: dropout (the configuration trains without it), and attention without the T x T probabilities
// of each layer, which are kept for the backward pass (FlashAttention's recomputation).

#include <cmath>
#include <concepts>
#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <vector>
#include <xax/ops/causal_attention.hpp>
#include <xax/ops/convert.hpp>
#include <xax/ops/embedding.hpp>
#include <xax/ops/gelu_tanh.hpp>
#include <xax/ops/layer_norm.hpp>
#include <xax/ops/matmul.hpp>
#include <xax/ops/reduce.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/tree.hpp>

namespace xax_bench {

/// The model's shape (nanoGPT's GPTConfig without dropout and with bias).
struct GptShape {
  std::int64_t vocabulary = 65;
  std::int64_t block_size = 64;
  std::int64_t layers = 4;
  std::int64_t heads = 4;
  std::int64_t embedding = 128;

  [[nodiscard]] std::int64_t head_size() const { return embedding / heads; }

  /// How attention splits a features x tokens operand of batches of `block`-token windows.
  [[nodiscard]] xax::AttentionLayout attention_layout(std::int64_t block) const {
    return {.heads = static_cast<Eigen::Index>(heads), .sequence_length = static_cast<Eigen::Index>(block)};
  }

  void validate() const {
    if (vocabulary < 1 || block_size < 1 || layers < 1 || heads < 1 || embedding < 1) {
      throw xax::ConfigError("char GPT: vocabulary, block size, layers, heads and n_embd must all be >= 1");
    }
    if (embedding % heads != 0) {
      throw xax::ConfigError("char GPT: n_embd " + std::to_string(embedding) + " is not divisible by " +
                             std::to_string(heads) + " heads; choose n_embd a multiple of n_head");
    }
  }
};

template <class T>
using GptMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
template <class T>
using GptVector = Eigen::Matrix<T, Eigen::Dynamic, 1>;
template <class T>
using GptTensor3 = Eigen::Tensor<T, 3>;

/// A LayerNorm's gain and bias stay fp32 under a 16-bit policy (xax::full_precision_t), as Haiku's
/// `set_policy(hk.LayerNorm, full)` keeps them: their updates are small relative to their value of about 1.
template <class T>
struct LayerNormParams {
  Eigen::VectorX<xax::full_precision_t<T>> gain;
  Eigen::VectorX<xax::full_precision_t<T>> bias;
  XAX_FIELDS(gain, bias);
};

/// One transformer block: attention (fused q, k, v projection and the output projection) and the MLP.
template <class T>
struct GptBlockParams {
  LayerNormParams<T> ln_1;
  GptMatrix<T> attn_w;  // 3 n_embd x n_embd: rows [q; k; v]
  GptVector<T> attn_b;
  GptMatrix<T> attn_proj_w;  // n_embd x n_embd
  GptVector<T> attn_proj_b;
  LayerNormParams<T> ln_2;
  GptMatrix<T> fc_w;  // 4 n_embd x n_embd
  GptVector<T> fc_b;
  GptMatrix<T> mlp_proj_w;  // n_embd x 4 n_embd
  GptVector<T> mlp_proj_b;
  XAX_FIELDS(ln_1, attn_w, attn_b, attn_proj_w, attn_proj_b, ln_2, fc_w, fc_b, mlp_proj_w, mlp_proj_b);
};

/// The whole model. `wte` (n_embd x vocabulary) is both the token embedding and the output head.
template <class T>
struct GptParams {
  GptMatrix<T> wte;
  GptMatrix<T> wpe;  // n_embd x block_size
  std::vector<GptBlockParams<T>> blocks;
  LayerNormParams<T> ln_f;
  XAX_FIELDS(wte, wpe, blocks, ln_f);
};

/// nanoGPT's initialisation: weights and embeddings N(0, 0.02), the residual projections N(0, 0.02 /
/// sqrt(2 n_layer)), biases 0, LayerNorm gains 1 and biases 0. Deterministic in `seed`.
inline GptParams<float> gpt_init(const GptShape& shape, std::uint64_t seed) {
  shape.validate();
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const auto c = static_cast<Eigen::Index>(shape.embedding);
  const auto gaussian = [&](Eigen::Index rows, Eigen::Index cols, float std) {
    GptMatrix<float> m(rows, cols);
    for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = std * normal(rng);
    return m;
  };
  const auto layer_norm = [c] {
    return LayerNormParams<float>{Eigen::VectorXf::Ones(c), Eigen::VectorXf::Zero(c)};
  };
  const float residual_std = 0.02f / std::sqrt(2.0f * static_cast<float>(shape.layers));
  GptParams<float> params;
  params.wte = gaussian(c, static_cast<Eigen::Index>(shape.vocabulary), 0.02f);
  params.wpe = gaussian(c, static_cast<Eigen::Index>(shape.block_size), 0.02f);
  for (std::int64_t l = 0; l < shape.layers; ++l) {
    GptBlockParams<float> block;
    block.ln_1 = layer_norm();
    block.attn_w = gaussian(3 * c, c, 0.02f);
    block.attn_b = Eigen::VectorXf::Zero(3 * c);
    block.attn_proj_w = gaussian(c, c, residual_std);
    block.attn_proj_b = Eigen::VectorXf::Zero(c);
    block.ln_2 = layer_norm();
    block.fc_w = gaussian(4 * c, c, 0.02f);
    block.fc_b = Eigen::VectorXf::Zero(4 * c);
    block.mlp_proj_w = gaussian(c, 4 * c, residual_std);
    block.mlp_proj_b = Eigen::VectorXf::Zero(c);
    params.blocks.push_back(std::move(block));
  }
  params.ln_f = layer_norm();
  return params;
}

/// A batch of token windows: `tokens` and `targets` hold batch * block ids, window b at [b * block, (b + 1)
/// * block), the targets shifted by one character.
struct TokenBatch {
  std::int64_t batch = 0;
  std::int64_t block = 0;
  std::vector<std::int32_t> tokens;
  std::vector<std::int32_t> targets;
};

/// The activations one forward keeps for its backward, and the backward's buffers: allocated on the first
/// step and reused, so a step allocates nothing afterwards.
template <class T>
struct GptWorkspace {
  struct Layer {
    Eigen::MatrixXf residual_in;   // x_l (fp32 residual stream)
    Eigen::MatrixXf residual_mid;  // x_l + attention
    xax::LayerNormStatistics ln_1, ln_2;
    GptMatrix<T> ln_1_out, ln_2_out;
    GptMatrix<T> qkv;          // 3 n_embd x tokens: rows [q; k; v], head h at rows h * head_size of each
    GptTensor3<T> probs;       // block x block x (batch * heads)
    GptMatrix<T> attn_merged;  // n_embd x tokens
    GptMatrix<T> fc_out, gelu_out;
  };
  std::vector<Layer> layers;
  Eigen::MatrixXf residual_out;  // x_L
  xax::LayerNormStatistics ln_f;
  GptMatrix<T> ln_f_out;
  Eigen::MatrixXf logits;  // vocabulary x tokens, fp32 (the loss reads them in fp32 anyway)
  std::vector<std::int32_t> positions;
  // Backward scratch.
  GptMatrix<T> dlogits, d_t, d_hidden, d_small, dqkv;
  Eigen::MatrixXf d_residual;

  /// Bytes of the activations kept between forward and backward (the part that grows with batch * block).
  [[nodiscard]] std::size_t activation_bytes() const {
    const auto bytes = [](const auto& m) {
      return static_cast<std::size_t>(m.size()) * sizeof(typename std::remove_cvref_t<decltype(m)>::Scalar);
    };
    std::size_t total = bytes(residual_out) + bytes(ln_f_out) + bytes(logits) + bytes(dlogits);
    for (const Layer& layer : layers) {
      total += bytes(layer.residual_in) + bytes(layer.residual_mid) + bytes(layer.ln_1_out) +
               bytes(layer.ln_2_out) + bytes(layer.qkv) + bytes(layer.probs) + bytes(layer.attn_merged) +
               bytes(layer.fc_out) + bytes(layer.gelu_out);
    }
    return total;
  }
};

/// The bytes of the attention probabilities a step keeps at `batch` windows of `block` tokens, in a compute
/// type of `compute_bytes`: batch * heads * block^2 per layer, the part of the activations that grows
/// fastest. In double, as gpt_activation_bytes.
inline double gpt_probability_bytes(const GptShape& shape, std::int64_t batch, std::int64_t block,
                                    std::size_t compute_bytes) {
  const auto length = static_cast<double>(block);
  return static_cast<double>(shape.layers) * static_cast<double>(batch) * static_cast<double>(shape.heads) *
         length * length * static_cast<double>(compute_bytes);
}

/// What GptWorkspace<T>::activation_bytes() comes to after a step at `batch` windows of `block` tokens, with
/// `compute_bytes` = sizeof(T), computed from the shape alone: to refuse a configuration before allocating
/// it. In double, which cannot wrap round whatever the shape.
inline double gpt_activation_bytes(const GptShape& shape, std::int64_t batch, std::int64_t block,
                                   std::size_t compute_bytes) {
  const double tokens = static_cast<double>(batch) * static_cast<double>(block);
  const double features = static_cast<double>(shape.embedding) * tokens;  // one n_embd x tokens matrix
  const auto c = static_cast<double>(compute_bytes);
  // Per layer: residuals in and mid in fp32; ln_1, ln_2, qkv (3), attn_merged, fc_out and gelu_out (4 each)
  // in T; the probabilities.
  const double layers =
      static_cast<double>(shape.layers) * (2 * features * 4 + (2 + 3 + 1 + 4 + 4) * features * c);
  const double logits = static_cast<double>(shape.vocabulary) * tokens;
  // residual_out (fp32), ln_f_out (T), logits (fp32) and their gradient (T).
  return layers + gpt_probability_bytes(shape, batch, block, compute_bytes) + features * (4 + c) +
         logits * (4 + c);
}

namespace detail {

/// `to` = `from` converted (or copied, between the same types) by xax's kernels, which share large arrays
/// among the threads; an Eigen assignment runs on one.
template <class From, class To>
void cast_matrix(const GptMatrix<From>& from, GptMatrix<To>& to) {
  to.resize(from.rows(), from.cols());
  xax::convert(std::span<const From>(from.data(), static_cast<std::size_t>(from.size())),
               std::span<To>(to.data(), static_cast<std::size_t>(to.size())));
}

}  // namespace detail

/// The forward pass up to the logits (kept in `workspace.logits`, vocabulary x tokens, fp32).
template <class T>
void gpt_forward(const GptParams<T>& params, const GptShape& shape, const TokenBatch& batch,
                 GptWorkspace<T>& ws) {
  const std::int64_t block = batch.block;
  if (block < 1 || block > shape.block_size) {
    throw xax::ShapeError("char GPT: a window of " + std::to_string(block) +
                          " tokens does not fit the model's block size " + std::to_string(shape.block_size));
  }
  const auto tokens = static_cast<Eigen::Index>(batch.batch * block);
  if (static_cast<Eigen::Index>(batch.tokens.size()) != tokens) {
    throw xax::ShapeError("char GPT: the batch holds " + std::to_string(batch.tokens.size()) +
                          " tokens, not batch * block = " + std::to_string(tokens));
  }
  const auto c = static_cast<Eigen::Index>(shape.embedding);
  const float scale = 1.0f / std::sqrt(static_cast<float>(shape.head_size()));
  ws.positions.resize(static_cast<std::size_t>(tokens));
  for (Eigen::Index n = 0; n < tokens; ++n)
    ws.positions[static_cast<std::size_t>(n)] = static_cast<std::int32_t>(n % block);
  ws.layers.resize(params.blocks.size());

  // x_0 = wte[tokens] + wpe[positions], summed in fp32.
  Eigen::MatrixXf* x = ws.layers.empty() ? &ws.residual_out : &ws.layers[0].residual_in;
  xax::embedding(params.wte, batch.tokens, *x);
  xax::embedding(params.wpe, ws.positions, *x, {.accumulate = true});

  for (std::size_t l = 0; l < params.blocks.size(); ++l) {
    const GptBlockParams<T>& p = params.blocks[l];
    auto& layer = ws.layers[l];
    // Attention: x_mid = x + proj(attention(ln_1(x))).
    xax::layer_norm(layer.residual_in, p.ln_1.gain, p.ln_1.bias, layer.ln_1_out, layer.ln_1);
    xax::matmul(p.attn_w, layer.ln_1_out, p.attn_b, layer.qkv);
    xax::causal_self_attention(layer.qkv.topRows(c), layer.qkv.middleRows(c, c), layer.qkv.bottomRows(c),
                               shape.attention_layout(block), scale, layer.attn_merged, layer.probs);
    detail::cast_matrix(layer.residual_in, layer.residual_mid);  // a copy, shared among the threads
    xax::matmul(p.attn_proj_w, layer.attn_merged, p.attn_proj_b, layer.residual_mid, {.accumulate = true});
    // MLP: x_next = x_mid + proj(gelu(fc(ln_2(x_mid)))).
    xax::layer_norm(layer.residual_mid, p.ln_2.gain, p.ln_2.bias, layer.ln_2_out, layer.ln_2);
    xax::matmul(p.fc_w, layer.ln_2_out, p.fc_b, layer.fc_out);
    xax::gelu_tanh(layer.fc_out, layer.gelu_out);
    Eigen::MatrixXf& next = l + 1 < params.blocks.size() ? ws.layers[l + 1].residual_in : ws.residual_out;
    detail::cast_matrix(layer.residual_mid, next);
    xax::matmul(p.mlp_proj_w, layer.gelu_out, p.mlp_proj_b, next, {.accumulate = true});
  }
  xax::layer_norm(ws.residual_out, params.ln_f.gain, params.ln_f.bias, ws.ln_f_out, ws.ln_f);
  xax::matmul(params.wte, ws.ln_f_out, ws.logits, {.transpose_a = true});  // tied head: wte^T h
}

/// The mean cross-entropy of the batch's targets, without gradients.
template <class T>
double gpt_loss(const GptParams<T>& params, const GptShape& shape, const TokenBatch& batch,
                GptWorkspace<T>& ws) {
  gpt_forward(params, shape, batch, ws);
  return static_cast<double>(xax::softmax_cross_entropy(ws.logits, batch.targets));
}

/// The mean cross-entropy (unscaled, fp32) and the gradients of loss * loss_scale, written into `grads`
/// (resized on first use).
template <class T, class G>
double gpt_loss_and_gradients(const GptParams<T>& params, const GptShape& shape, const TokenBatch& batch,
                              float loss_scale, GptParams<G>& grads, GptWorkspace<T>& ws) {
  gpt_forward(params, shape, batch, ws);
  const float loss = xax::softmax_cross_entropy(ws.logits, batch.targets, ws.dlogits, loss_scale);
  const auto c = static_cast<Eigen::Index>(shape.embedding);
  const std::int64_t block = batch.block;
  const float scale = 1.0f / std::sqrt(static_cast<float>(shape.head_size()));
  grads.blocks.resize(params.blocks.size());

  // Tied head: d wte = h_f dlogits^T now, the embedding's scatter-add joins it at the end.
  xax::matmul(ws.ln_f_out, ws.dlogits, grads.wte, {.transpose_b = true});
  xax::matmul(params.wte, ws.dlogits, ws.d_t);  // d h_f
  xax::layer_norm_backward(ws.residual_out, params.ln_f.gain, ws.ln_f, ws.d_t, ws.d_residual, grads.ln_f.gain,
                           grads.ln_f.bias);

  for (std::size_t l = params.blocks.size(); l-- > 0;) {
    const GptBlockParams<T>& p = params.blocks[l];
    GptBlockParams<G>& g = grads.blocks[l];
    auto& layer = ws.layers[l];
    // MLP.
    detail::cast_matrix(ws.d_residual, ws.d_t);
    xax::matmul(ws.d_t, layer.gelu_out, g.mlp_proj_w, {.transpose_b = true});
    // A residual projection's bias gradient is the residual stream's gradient, summed from its fp32 values
    // (d_t is only their rounding for the matmuls): more exact, and no widening pass under a 16-bit policy.
    xax::row_sums(ws.d_residual, g.mlp_proj_b);
    xax::matmul(p.mlp_proj_w, ws.d_t, ws.d_hidden, {.transpose_a = true});
    xax::gelu_tanh_backward(layer.fc_out, ws.d_hidden, ws.d_hidden);
    xax::matmul(ws.d_hidden, layer.ln_2_out, g.fc_w, {.transpose_b = true});
    xax::row_sums(ws.d_hidden, g.fc_b);
    xax::matmul(p.fc_w, ws.d_hidden, ws.d_small, {.transpose_a = true});
    xax::layer_norm_backward(layer.residual_mid, p.ln_2.gain, layer.ln_2, ws.d_small, ws.d_residual,
                             g.ln_2.gain, g.ln_2.bias, {.accumulate_input_gradient = true});
    // Attention.
    detail::cast_matrix(ws.d_residual, ws.d_t);
    xax::matmul(ws.d_t, layer.attn_merged, g.attn_proj_w, {.transpose_b = true});
    xax::row_sums(ws.d_residual, g.attn_proj_b);
    xax::matmul(p.attn_proj_w, ws.d_t, ws.d_small, {.transpose_a = true});  // d merged heads
    ws.dqkv.resize(3 * c, static_cast<Eigen::Index>(batch.batch * block));
    xax::causal_self_attention_backward(layer.qkv.topRows(c), layer.qkv.middleRows(c, c),
                                        layer.qkv.bottomRows(c), layer.probs, ws.d_small,
                                        shape.attention_layout(block), scale, ws.dqkv.topRows(c),
                                        ws.dqkv.middleRows(c, c), ws.dqkv.bottomRows(c));
    xax::matmul(ws.dqkv, layer.ln_1_out, g.attn_w, {.transpose_b = true});
    xax::row_sums(ws.dqkv, g.attn_b);
    xax::matmul(p.attn_w, ws.dqkv, ws.d_small, {.transpose_a = true});
    xax::layer_norm_backward(layer.residual_in, p.ln_1.gain, layer.ln_1, ws.d_small, ws.d_residual,
                             g.ln_1.gain, g.ln_1.bias, {.accumulate_input_gradient = true});
  }
  // Embeddings: the token table's gradient adds to the head's, summed in fp32.
  xax::embedding_backward(ws.d_residual, batch.tokens, grads.wte, static_cast<Eigen::Index>(shape.vocabulary),
                          {.accumulate = true});
  xax::embedding_backward(ws.d_residual, ws.positions, grads.wpe,
                          static_cast<Eigen::Index>(shape.block_size));
  return static_cast<double>(loss);
}

}  // namespace xax_bench
