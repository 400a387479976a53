#pragma once
// A character-level GPT in nanoGPT's layout, written as user code on xax's ops: token and position
// embeddings, n_layer pre-LayerNorm blocks of causal self-attention and an MLP with GELU (tanh form), a final
// LayerNorm and a head tied to the token embedding. Forward and backward are written once over the compute
// scalar T; the gradients may be written in another scalar G (float, when TrainStep asks for fp32 gradients
// of 16-bit parameters, which the matmuls then write straight from their fp32 accumulators).
//
// Layout: one token per column. Activations are n_embd x (batch * block) with column b * block + t; the
// residual stream is kept in fp32 under every policy (as PyTorch autocast's residual adds promote to fp32),
// the matmul inputs are T. Attention works on 3-D tensors head_size x block x (batch * heads).
//
// Precision: LayerNorm gains and biases are fp32 leaves inside the T-templated params (xax's tree casts
// copy a float leaf of a struct templated on T float to float), so they stay fp32 under a 16-bit policy;
// every matmul accumulates in fp32; LayerNorm statistics, softmax, cross-entropy and the embedding
// scatter-add run in fp32.
//
// Not done here: dropout (the configuration trains without it), fused attention (the T x T probabilities of
// each layer are kept for the backward pass).

#include <cmath>
#include <concepts>
#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <vector>
#include <xax/ops/batched_matmul.hpp>
#include <xax/ops/causal_softmax.hpp>
#include <xax/ops/convert.hpp>
#include <xax/ops/embedding.hpp>
#include <xax/ops/gelu_tanh.hpp>
#include <xax/ops/layer_norm.hpp>
#include <xax/ops/matmul.hpp>
#include <xax/ops/reduce.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/threads.hpp>
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
    GptTensor3<T> q, k, v;     // head_size x block x (batch * heads)
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
  GptTensor3<float> scores;
  GptMatrix<T> dlogits, d_t, d_hidden, d_small, dqkv, qkv;
  GptTensor3<T> dy_heads, dq, dk, dv, dscores;
  GptTensor3<float> dprobs;
  Eigen::MatrixXf d_residual;

  /// Bytes of the activations kept between forward and backward (the part that grows with batch * block).
  [[nodiscard]] std::size_t activation_bytes() const {
    const auto bytes = [](const auto& m) {
      return static_cast<std::size_t>(m.size()) * sizeof(typename std::remove_cvref_t<decltype(m)>::Scalar);
    };
    std::size_t total = bytes(residual_out) + bytes(ln_f_out) + bytes(logits) + bytes(dlogits);
    for (const Layer& layer : layers) {
      total += bytes(layer.residual_in) + bytes(layer.residual_mid) + bytes(layer.ln_1_out) +
               bytes(layer.ln_2_out) + bytes(layer.q) + bytes(layer.k) + bytes(layer.v) + bytes(layer.probs) +
               bytes(layer.attn_merged) + bytes(layer.fc_out) + bytes(layer.gelu_out);
    }
    return total;
  }
};

namespace detail {

/// Calls `copy(sequence, head, slice)` for every (sequence, head) slice of attention, shared among xax's
/// threads. The head copies are many rows of head_size elements; run on one thread, they left the other
/// one waiting for about 4 % of a 2-thread step (perf, CharGptStep/mixed/threads:2).
template <class Copy>
void for_each_head_slice(const GptShape& shape, std::int64_t batch, Copy&& copy) {
  const auto heads = static_cast<Eigen::Index>(shape.heads);
  const auto slices = static_cast<Eigen::Index>(batch) * heads;
  [[maybe_unused]] const int threads = xax::num_threads();
#if defined(_OPENMP)
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
#endif
  for (Eigen::Index slice = 0; slice < slices; ++slice) copy(slice / heads, slice % heads, slice);
}

/// Sequence b's tokens, rows [row0, row0 + rows) of a features x tokens matrix, as a rows x block matrix.
template <class T>
auto token_rows(T* tokens, Eigen::Index features, Eigen::Index block, Eigen::Index b, Eigen::Index row0,
                Eigen::Index rows) {
  using Matrix = GptMatrix<std::remove_const_t<T>>;
  using Mapped = std::conditional_t<std::is_const_v<T>, const Matrix, Matrix>;
  return Eigen::Map<Mapped, 0, Eigen::OuterStride<>>(tokens + b * block * features + row0, rows, block,
                                                     Eigen::OuterStride<>(features));
}

/// Slice `slice` (head_size x block) of a head-major tensor.
template <class T>
auto head_slice(GptTensor3<T>& heads_tensor, Eigen::Index slice) {
  const Eigen::Index rows = heads_tensor.dimension(0), block = heads_tensor.dimension(1);
  return Eigen::Map<GptMatrix<T>>(heads_tensor.data() + slice * rows * block, rows, block);
}
template <class T>
auto head_slice(const GptTensor3<T>& heads_tensor, Eigen::Index slice) {
  const Eigen::Index rows = heads_tensor.dimension(0), block = heads_tensor.dimension(1);
  return Eigen::Map<const GptMatrix<T>>(heads_tensor.data() + slice * rows * block, rows, block);
}

/// Rows [row0, row0 + n_embd) of a features x tokens matrix as head-major slices (head_size x block x
/// (batch * heads)): q, k and v from the fused projection, or the gradient of the merged heads.
template <class T>
void split_heads(const GptMatrix<T>& tokens, Eigen::Index row0, const GptShape& shape, std::int64_t batch,
                 std::int64_t block, GptTensor3<T>& heads_tensor) {
  const auto hs = static_cast<Eigen::Index>(shape.head_size()), t_count = static_cast<Eigen::Index>(block);
  heads_tensor.resize(hs, t_count, static_cast<Eigen::Index>(batch * shape.heads));
  for_each_head_slice(shape, batch, [&](Eigen::Index b, Eigen::Index h, Eigen::Index slice) {
    head_slice(heads_tensor, slice) = token_rows(tokens.data(), tokens.rows(), t_count, b, row0 + h * hs, hs);
  });
}

/// The inverse of split_heads: head-major slices back into rows [row0, row0 + n_embd) of `out` (features x
/// tokens).
template <class T>
void merge_heads(const GptTensor3<T>& heads_tensor, const GptShape& shape, std::int64_t batch,
                 std::int64_t block, GptMatrix<T>& out, Eigen::Index row0) {
  const auto hs = static_cast<Eigen::Index>(shape.head_size()), t_count = static_cast<Eigen::Index>(block);
  for_each_head_slice(shape, batch, [&](Eigen::Index b, Eigen::Index h, Eigen::Index slice) {
    token_rows(out.data(), out.rows(), t_count, b, row0 + h * hs, hs) = head_slice(heads_tensor, slice);
  });
}

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
    xax::matmul(p.attn_w, layer.ln_1_out, p.attn_b, ws.qkv);
    detail::split_heads(ws.qkv, 0, shape, batch.batch, block, layer.q);
    detail::split_heads(ws.qkv, c, shape, batch.batch, block, layer.k);
    detail::split_heads(ws.qkv, 2 * c, shape, batch.batch, block, layer.v);
    xax::batched_matmul(layer.k, layer.q, ws.scores, {.transpose_a = true});  // keys x queries, fp32
    xax::causal_softmax(ws.scores, layer.probs, scale);
    xax::batched_matmul(layer.v, layer.probs, ws.dy_heads);  // head_size x queries
    layer.attn_merged.resize(c, tokens);
    detail::merge_heads(ws.dy_heads, shape, batch.batch, block, layer.attn_merged, 0);
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
    // d_small holds one head after another in each column, as qkv holds q.
    detail::split_heads(ws.d_small, 0, shape, batch.batch, block, ws.dy_heads);
    xax::batched_matmul(ws.dy_heads, layer.probs, ws.dv, {.transpose_b = true});  // dV = dY P^T
    xax::batched_matmul(layer.v, ws.dy_heads, ws.dprobs, {.transpose_a = true});  // dP = V^T dY (fp32)
    xax::causal_softmax_backward(layer.probs, ws.dprobs, ws.dscores, scale);
    xax::batched_matmul(layer.q, ws.dscores, ws.dk, {.transpose_b = true});  // dK = Q dS^T
    xax::batched_matmul(layer.k, ws.dscores, ws.dq);                         // dQ = K dS
    ws.dqkv.resize(3 * c, static_cast<Eigen::Index>(batch.batch * block));
    detail::merge_heads(ws.dq, shape, batch.batch, block, ws.dqkv, 0);
    detail::merge_heads(ws.dk, shape, batch.batch, block, ws.dqkv, c);
    detail::merge_heads(ws.dv, shape, batch.batch, block, ws.dqkv, 2 * c);
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
