// One attention layer's forward and backward at the character-level GPT's shapes (n_embd 128, 4 heads, block
// 64, batch 12), through xax::causal_self_attention next to the unfused ops the GPT used before it (heads
// copied out of the fused projection into 3-D tensors, batched_matmul, causal_softmax, heads copied back,
// the copies shared among the threads):
//
//     xax_micro_benchmarks --benchmark_filter='^CausalAttention/' --benchmark_repetitions=7
//         --benchmark_enable_random_interleaving=true --benchmark_report_aggregates_only=true
//
// Names: CausalAttention/<dtype>/<fused|unfused>/threads:<t>, <t> = xax::set_num_threads(). The label is the
// kernel of the last product.
#include <benchmark/benchmark.h>

#include "micro/common.hpp"

#include <string>
#include <xax/ops/batched_matmul.hpp>
#include <xax/ops/causal_attention.hpp>
#include <xax/ops/causal_softmax.hpp>
#include <xax/ops/matmul.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/threads.hpp>

namespace {

constexpr Eigen::Index embedding = 128, heads = 4, head_size = embedding / heads, block = 64, batch = 12;
constexpr Eigen::Index tokens = block * batch, slices = heads * batch;
constexpr xax::AttentionLayout layout{.heads = heads, .sequence_length = block};
const float scale = 1.0f / 5.656854f;  // 1 / sqrt(head_size)

template <class T>
using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
template <class T>
using Tensor3 = Eigen::Tensor<T, 3>;

// Slice s (head s % heads of sequence s / heads) of a features x tokens matrix.
template <class M>
auto head_block(M&& m, Eigen::Index s) {
  return m.block((s % heads) * head_size, (s / heads) * block, head_size, block);
}

// The head copies shared among xax's threads, as the GPT shared them.
template <class Copy>
void for_each_slice(Copy&& copy) {
  [[maybe_unused]] const int threads = xax::num_threads();
#if defined(_OPENMP)
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
#endif
  for (Eigen::Index s = 0; s < slices; ++s) copy(s);
}

template <class T>
struct UnfusedAttention {
  Tensor3<T> q, k, v, y, dy, dq, dk, dv, dscores;
  Tensor3<float> scores, dprobs;

  template <class M>
  static void split(const M& m, Tensor3<T>& t) {
    t.resize(head_size, block, slices);
    for_each_slice([&](Eigen::Index s) {
      Eigen::Map<Matrix<T>>(t.data() + s * head_size * block, head_size, block) = head_block(m, s);
    });
  }
  template <class M>
  static void merge(const Tensor3<T>& t, M&& m) {
    for_each_slice([&](Eigen::Index s) {
      head_block(m, s) = Eigen::Map<const Matrix<T>>(t.data() + s * head_size * block, head_size, block);
    });
  }

  void forward(const Matrix<T>& qkv, Matrix<T>& merged, Tensor3<T>& probs) {
    split(qkv.topRows(embedding), q);
    split(qkv.middleRows(embedding, embedding), k);
    split(qkv.bottomRows(embedding), v);
    xax::batched_matmul(k, q, scores, {.transpose_a = true});
    xax::causal_softmax(scores, probs, scale);
    xax::batched_matmul(v, probs, y);
    merge(y, merged);
  }
  void backward(const Tensor3<T>& probs, const Matrix<T>& d_merged, Matrix<T>& dqkv) {
    split(d_merged, dy);
    xax::batched_matmul(dy, probs, dv, {.transpose_b = true});
    xax::batched_matmul(v, dy, dprobs, {.transpose_a = true});
    xax::causal_softmax_backward(probs, dprobs, dscores, scale);
    xax::batched_matmul(q, dscores, dk, {.transpose_b = true});
    xax::batched_matmul(k, dscores, dq);
    merge(dq, dqkv.topRows(embedding));
    merge(dk, dqkv.middleRows(embedding, embedding));
    merge(dv, dqkv.bottomRows(embedding));
  }
};

template <class T>
void run_attention(benchmark::State& state, bool fused, int threads) {
  const xax_bench::ThreadScope scope(threads);
  const Matrix<T> qkv = xax_bench::normal_matrix<T>(3 * embedding, tokens, 1);
  const Matrix<T> d_merged = xax_bench::normal_matrix<T>(embedding, tokens, 2);
  Matrix<T> merged(embedding, tokens), dqkv(3 * embedding, tokens);
  Tensor3<T> probs;
  UnfusedAttention<T> unfused;
  const auto run = [&] {
    if (fused) {
      xax::causal_self_attention(qkv.topRows(embedding), qkv.middleRows(embedding, embedding),
                                 qkv.bottomRows(embedding), layout, scale, merged, probs);
      xax::causal_self_attention_backward(qkv.topRows(embedding), qkv.middleRows(embedding, embedding),
                                          qkv.bottomRows(embedding), probs, d_merged, layout, scale,
                                          dqkv.topRows(embedding), dqkv.middleRows(embedding, embedding),
                                          dqkv.bottomRows(embedding));
    } else {
      unfused.forward(qkv, merged, probs);
      unfused.backward(probs, d_merged, dqkv);
    }
  };
  run();  // creates the primitives and the scratch
  state.SetLabel(xax::last_matmul_implementation());
  for (auto _ : state) {
    run();
    benchmark::DoNotOptimize(dqkv.data());
    benchmark::ClobberMemory();
  }
}

template <class T>
void register_dtype() {
  for (const bool fused : {true, false}) {
    for (const int threads : {1, 2}) {
      const std::string name = std::string("CausalAttention/") +
                               std::string(xax::dtype_name(xax::dtype_of<T>)) + "/" +
                               (fused ? "fused" : "unfused") + "/threads:" + std::to_string(threads);
      benchmark::RegisterBenchmark(
          name.c_str(),
          [fused, threads](benchmark::State& state) { run_attention<T>(state, fused, threads); })
          ->Unit(benchmark::kMicrosecond)
          ->UseRealTime();
    }
  }
}

[[maybe_unused]] const bool causal_attention_registered = [] {
  register_dtype<float>();
  register_dtype<xax::bfloat16>();
  return true;
}();

}  // namespace
