// The parts of one TrainStep (MLP 784-512-512-10, batch 256, AdamW; benchmarks/micro/train_step.cpp), each
// timed alone, so that the step's time can be split into GEMMs and the rest (issue 12, point 4):
//
//   StepGemms/<default|mixed>/threads:<t>    the step's eight products exactly as
//   xax::nn::mlp_loss_and_gradients
//                                            runs them (forward with the fused bias + ReLU epilogue, dW = dz
//                                            x^T into fp32 gradients, dx = w^T dz side by side with it on two
//                                            threads), in float (default) or the half type (mixed; widened in
//                                            panels where the CPU has no native half dot product)
//   StepUnscaleCheckNorm/threads:<t>         unscale_check_and_norm over the step's fp32 gradients (0.67 M)
//   StepStreamingRmw/threads:<t>             its floor: one in-place multiply over the same bytes
//   StepSoftmaxLoss/<type>/threads:<t>       softmax_cross_entropy of the 10 x 256 logits with its gradient
//   StepStreamingLogits/<type>/threads:<t>   its floor: read the logits, write a gradient of the same type
// The AdamW update and its floor are AdamWUpdate / StreamingUpdate at size 0
// (benchmarks/micro/optimizer_pass.cpp).
//
//     xax_micro_benchmarks
//     --benchmark_filter='^(TrainStep/(default|mixed)|StepGemms|StepUnscale|StepStreaming|StepSoftmax|AdamWUpdate/size:0|StreamingUpdate/size:0)'
//         --benchmark_repetitions=7 --benchmark_enable_random_interleaving=true
//         --benchmark_report_aggregates_only=true
//
// TrainStep - StepGemms is the step's time outside its products; the three passes and their floors say how
// much of that is the memory-bound passes and how far each is from the speed of streaming its bytes.
#include <benchmark/benchmark.h>

#include "micro/common.hpp"

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>
#include <xax/detail/concurrent.hpp>
#include <xax/nn/mlp.hpp>
#include <xax/ops/matmul.hpp>
#include <xax/ops/reduce.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/finite.hpp>
#include <xax/utils/tree_cast.hpp>

namespace {

using xax_bench::ThreadScope;

constexpr Eigen::Index batch_size = 256;
const std::vector<Eigen::Index> layer_sizes = {784, 512, 512, 10};

template <class T>
xax::nn::Matrix<T> random_matrix(Eigen::Index rows, Eigen::Index cols, float spread, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, spread);
  xax::nn::Matrix<T> m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(normal(rng));
  return m;
}

// The operands of one step's products, in T: the parameters, the input batch, each layer's output and each
// layer's dL/dz. Values are those of a trained-from-init step in scale (the products' speed does not depend
// on them, but denormals or zeros would).
template <class T>
struct StepOperands {
  xax::nn::MlpParams<T> params = xax::tree_cast<T>(xax::nn::mlp_init(layer_sizes, 1));
  xax::nn::Matrix<T> input = random_matrix<T>(layer_sizes[0], batch_size, 1.0f, 2);
  std::vector<xax::nn::Matrix<T>> outputs;
  std::vector<xax::nn::Matrix<T>> dz;  // dz[i]: dL/dz of layer i
  xax::nn::Matrix<T> dx;
  xax::nn::MlpParams<float> grads;

  StepOperands() {
    const std::size_t layers = params.layers.size();
    grads.layers.resize(layers);
    for (std::size_t i = 0; i < layers; ++i) {
      dz.push_back(random_matrix<T>(layer_sizes[i + 1], batch_size, 1e-3f, 10 + i));
    }
  }

  // Forward and backward products of mlp_loss_and_gradients, without its elementwise passes (ReLU backward,
  // bias gradients) and without the loss.
  void run() {
    const std::size_t layers = params.layers.size();
    outputs.resize(layers);
    for (std::size_t i = 0; i < layers; ++i) {
      const bool last = i + 1 == layers;
      xax::nn::linear_forward(params.layers[i], i == 0 ? input : outputs[i - 1], outputs[i],
                              last ? xax::Activation::none : xax::Activation::relu);
    }
    for (std::size_t i = layers; i-- > 0;) {
      const xax::nn::Matrix<T>& below = i == 0 ? input : outputs[i - 1];
      const auto weight_gradient = [&] {
        xax::matmul(dz[i], below, grads.layers[i].w, {.transpose_b = true});
      };
      if (i == 0) {
        weight_gradient();
        break;
      }
      xax::detail::run_side_by_side(weight_gradient,
                                    [&] { xax::nn::linear_backward_input(params.layers[i], dz[i], dx); });
    }
  }
};

template <class T>
void StepGemms(benchmark::State& state, int threads) {
  const ThreadScope scope(threads);
  StepOperands<T> operands;
  operands.run();  // sizes every output and creates every primitive
  const std::string implementation = xax::last_matmul_implementation();
  for (auto _ : state) {
    operands.run();
    benchmark::DoNotOptimize(operands.grads.layers.front().w.data());
    benchmark::ClobberMemory();
  }
  state.SetLabel(std::string(xax::dtype_name(xax::dtype_of<T>)) + ", " + implementation);
}

// The step's fp32 gradients: one leaf per weight and bias of the MLP.
xax::nn::MlpParams<float> step_gradients() {
  xax::nn::MlpParams<float> grads = xax::nn::mlp_init(layer_sizes, 3);
  return grads;
}

std::int64_t leaf_elements(const xax::nn::MlpParams<float>& tree) {
  std::int64_t count = 0;
  for (const auto& layer : tree.layers) count += layer.w.size() + layer.b.size();
  return count;
}

void StepUnscaleCheckNorm(benchmark::State& state) {
  const ThreadScope threads(static_cast<int>(state.range(0)));
  xax::nn::MlpParams<float> grads = step_gradients();
  float factor = 0.5f;  // x0.5 and x2 in turn keep the values exact and every pass really multiplies
  for (auto _ : state) {
    const xax::UnscaledGradients result = xax::unscale_check_and_norm(grads, factor);
    benchmark::DoNotOptimize(result);
    factor = factor == 0.5f ? 2.0f : 0.5f;
  }
  state.SetBytesProcessed(state.iterations() * leaf_elements(grads) * 2 *
                          static_cast<std::int64_t>(sizeof(float)));
}

void StepStreamingRmw(benchmark::State& state) {
  const int thread_count = static_cast<int>(state.range(0));
  xax::nn::MlpParams<float> grads = step_gradients();
  float factor = 0.5f;
  for (auto _ : state) {
#if defined(_OPENMP)
#pragma omp parallel num_threads(thread_count)
#endif
    for (auto& layer : grads.layers) {
      for (float* x : {layer.w.data(), layer.b.data()}) {
        const Eigen::Index n = x == layer.w.data() ? layer.w.size() : layer.b.size();
#if defined(_OPENMP)
#pragma omp for schedule(static) nowait
#endif
        for (Eigen::Index i = 0; i < n; ++i) x[i] *= factor;
      }
    }
    benchmark::DoNotOptimize(grads.layers.front().w.data());
    benchmark::ClobberMemory();
    factor = factor == 0.5f ? 2.0f : 0.5f;
  }
  static_cast<void>(thread_count);
  state.SetBytesProcessed(state.iterations() * leaf_elements(grads) * 2 *
                          static_cast<std::int64_t>(sizeof(float)));
}

template <class T>
void StepSoftmaxLoss(benchmark::State& state, int threads) {
  const ThreadScope scope(threads);
  const xax::nn::Matrix<T> logits = random_matrix<T>(layer_sizes.back(), batch_size, 3.0f, 4);
  std::vector<std::int32_t> labels(static_cast<std::size_t>(batch_size));
  for (std::size_t j = 0; j < labels.size(); ++j) labels[j] = static_cast<std::int32_t>(j % 10);
  xax::nn::Matrix<T> grad;
  for (auto _ : state) {
    const float loss = xax::softmax_cross_entropy(logits, labels, grad, 1.0f);
    benchmark::DoNotOptimize(loss);
    benchmark::DoNotOptimize(grad.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * logits.size() * 2 * static_cast<std::int64_t>(sizeof(T)));
}

// Reads every logit and writes a value of the same size per logit: the bytes of the loss and its gradient,
// with integer arithmetic only (a bf16 or f16 scalar conversion per element would measure the conversion).
template <class T>
void StepStreamingLogits(benchmark::State& state, int) {
  using Bits = std::conditional_t<sizeof(T) == 2, std::uint16_t, std::uint32_t>;
  const xax::nn::Matrix<T> logits = random_matrix<T>(layer_sizes.back(), batch_size, 3.0f, 4);
  std::vector<Bits> in(static_cast<std::size_t>(logits.size()));
  std::memcpy(in.data(), logits.data(), in.size() * sizeof(Bits));
  std::vector<Bits> out(in.size());
  for (auto _ : state) {
    benchmark::DoNotOptimize(in.data());
    for (std::size_t i = 0; i < in.size(); ++i) out[i] = static_cast<Bits>(in[i] ^ Bits{1});
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * logits.size() * 2 * static_cast<std::int64_t>(sizeof(T)));
}

template <class T>
void register_typed(const std::string& policy) {
  const std::string type(xax::dtype_name(xax::dtype_of<T>));
  for (const int threads : {1, 2}) {
    const std::string suffix = "/threads:" + std::to_string(threads);
    benchmark::RegisterBenchmark(("StepGemms/" + policy + suffix).c_str(),
                                 [threads](benchmark::State& s) { StepGemms<T>(s, threads); })
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("StepSoftmaxLoss/" + type + suffix).c_str(),
                                 [threads](benchmark::State& s) { StepSoftmaxLoss<T>(s, threads); })
        ->UseRealTime()
        ->Unit(benchmark::kMicrosecond);
    if (threads == 1) {  // a pass over 5 KB does not split across threads
      benchmark::RegisterBenchmark(("StepStreamingLogits/" + type + suffix).c_str(),
                                   [threads](benchmark::State& s) { StepStreamingLogits<T>(s, threads); })
          ->UseRealTime()
          ->Unit(benchmark::kMicrosecond);
    }
  }
}

[[maybe_unused]] const bool registered = [] {
  register_typed<float>("default");
  if (xax_bench::registration_half_dtype() == xax::DType::bfloat16) {
    register_typed<xax::bfloat16>("mixed");
  } else {
    register_typed<xax::float16>("mixed");
  }
  return true;
}();

BENCHMARK(StepUnscaleCheckNorm)
    ->ArgName("threads")
    ->Arg(1)
    ->Arg(2)
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(StepStreamingRmw)->ArgName("threads")->Arg(1)->Arg(2)->Unit(benchmark::kMicrosecond)->UseRealTime();

}  // namespace
