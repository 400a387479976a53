#pragma once
// The fast matmul backend: oneDNN's matmul primitive, whose bf16 kernels run on the CPU's native bf16 dot
// products (vdpbf16ps, AMX) with an fp32 accumulator and round once into the destination. Compiled only when
// xax was configured with oneDNN (XAX_HAS_ONEDNN); without it this header declares nothing.
//
// Layout. xax matrices are column-major; oneDNN describes plain memory by strides. A column-major m x n C is
// the row-major n x m matrix C^T, so xax computes C^T = op(B)^T op(A)^T: oneDNN's "src" is op(B)^T (n x k),
// its "weights" op(A)^T (k x m), its "dst" C^T (n x m), and the bias (length m) is the broadcast row oneDNN
// expects. A transposition is only a choice of strides; nothing is copied by xax.
//
// Cost. Creating a matmul primitive takes far longer than a small GEMM (it selects and JIT-compiles a
// kernel), so each thread keeps the primitives it created, keyed by everything that shapes one: types,
// sizes, strides, transpositions, epilogue and thread count. Memory objects are kept with the primitive and
// only re-pointed at each call's data, and the scratchpad oneDNN asks for lives in one grow-only buffer per
// thread, so a repeated call allocates nothing.
//
// Dispatch by capability. A bf16 or f16 product runs here only where oneDNN's kernel for it multiplies half
// pairs natively (native_kernel.hpp reads that off the kernel's name) *and* xax's own CPU detection, capped
// by XAX_MAX_CPU_ISA, agrees. Elsewhere -- AVX2, AVX-512 without BF16, f16 without AVX512-FP16 -- try_run
// declines and xax::matmul widens panels to fp32 for oneDNN's fp32 kernel (widening.hpp). The decision is
// made once per primitive key (types, shape, strides, epilogue, threads) and cached with the primitive.
//
// Batches. xax::batched_matmul hands over a whole batch of equal products (attention's 48 slices of 64x32 *
// 32x64 per call) as one problem with batch > 1, which becomes one 3-D oneDNN primitive (batch, rows, cols)
// whose batch stride is each operand's slice stride: one call, one kernel selection and one dispatch
// instead of one per slice, whose fixed cost (2.5-6 us) exceeded the product itself. The batch count and
// strides are part of the key; the native-half rule is the same.
//
// Standing in for another CPU. When XAX_MAX_CPU_ISA is set and ONEDNN_MAX_CPU_ISA is not, the first use caps
// oneDNN at the same class (dnnl::set_max_cpu_isa), so that one variable makes the whole process behave as
// that class. oneDNN 2.x has no AVX512_CORE_FP16 cap; for the FP16 classes set ONEDNN_MAX_CPU_ISA as well.

#include <xax/detail/eigen.hpp>

#if defined(XAX_HAS_ONEDNN) && XAX_HAS_ONEDNN

#include <dnnl.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <xax/detail/convert.hpp>
#include <xax/detail/parallel.hpp>
#include <xax/detail/scratch.hpp>
#include <xax/ops/activation.hpp>
#include <xax/ops/backend/native_kernel.hpp>
#include <xax/ops/backend/problem.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/platform.hpp>
#include <xax/utils/threads.hpp>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace xax::detail::onednn_backend {

/// Products below this many flops run on one thread: waking a second costs more than it saves (the 10-class
/// output layer of an MLP takes ~20 us alone and ~30 us on two threads).
inline constexpr double small_product_flops = 16.0 * 1024 * 1024;

/// Sets the OpenMP threads oneDNN sees while a primitive is created and run, and restores the calling
/// thread's own default afterwards. oneDNN sizes its parallel decomposition from the calling thread's
/// omp_get_max_threads() when the primitive is created (a per-thread setting, which xax's process-wide count
/// does not change on other threads), and a primitive decomposed for one thread runs inline, without a fork.
class ThreadCap {
 public:
  explicit ThreadCap([[maybe_unused]] int threads) {
#if defined(_OPENMP)
    previous_ = omp_get_max_threads();
    if (threads != previous_) omp_set_num_threads(threads);
#endif
  }
  ~ThreadCap() {
#if defined(_OPENMP)
    if (omp_get_max_threads() != previous_) omp_set_num_threads(previous_);
#endif
  }
  ThreadCap(const ThreadCap&) = delete;
  ThreadCap& operator=(const ThreadCap&) = delete;

 private:
  int previous_ = 1;
};

inline dnnl::memory::data_type data_type_of(DType dtype) {
  switch (dtype) {
    case DType::float32:
      return dnnl::memory::data_type::f32;
    case DType::bfloat16:
      return dnnl::memory::data_type::bf16;
    case DType::float16:
      return dnnl::memory::data_type::f16;
    case DType::float64:
      break;
  }
  return dnnl::memory::data_type::undef;
}

/// Everything a matmul primitive depends on.
struct PrimitiveKey {
  DType input = DType::float32;
  DType output = DType::float32;
  DType bias_type = DType::float32;
  bool has_bias = false;
  bool transpose_a = false;
  bool transpose_b = false;
  bool accumulate = false;
  Activation activation = Activation::none;
  Eigen::Index m = 0, n = 0, k = 0, lda = 0, ldb = 0, ldc = 0;
  /// batch == 1: a 2-D primitive (the strides are unused); batch > 1: a 3-D one.
  Eigen::Index batch = 1, a_batch_stride = 0, b_batch_stride = 0, c_batch_stride = 0;
  int threads = 1;

  friend bool operator==(const PrimitiveKey&, const PrimitiveKey&) = default;
};

struct PrimitiveKeyHash {
  std::size_t operator()(const PrimitiveKey& key) const noexcept {
    std::size_t hash = 0;
    const auto mix = [&hash](auto value) {
      hash ^= std::hash<decltype(value)>{}(value) + 0x9e3779b97f4a7c15ull + (hash << 6) + (hash >> 2);
    };
    mix(static_cast<int>(key.input));
    mix(static_cast<int>(key.output));
    mix(static_cast<int>(key.bias_type));
    mix((key.has_bias ? 1 : 0) | (key.transpose_a ? 2 : 0) | (key.transpose_b ? 4 : 0) |
        (key.accumulate ? 8 : 0));
    mix(static_cast<int>(key.activation));
    mix(key.m);
    mix(key.n);
    mix(key.k);
    mix(key.lda);
    mix(key.ldb);
    mix(key.ldc);
    mix(key.batch);
    mix(key.a_batch_stride);
    mix(key.b_batch_stride);
    mix(key.c_batch_stride);
    mix(key.threads);
    return hash;
  }
};

/// A primitive with its memory objects, or the fact that oneDNN has no implementation for the key.
struct CachedPrimitive {
  bool supported = false;
  dnnl::matmul primitive;
  dnnl::memory src;
  dnnl::memory weights;
  dnnl::memory dst;
  dnnl::memory bias;
  dnnl::memory scratchpad;
  std::size_t scratchpad_bytes = 0;
  std::unordered_map<int, dnnl::memory> arguments;
  std::string implementation;  ///< "onednn:" + oneDNN's kernel name, e.g. "onednn:brg:avx512_core_bf16"
  int threads = 1;             ///< the threads the primitive was created for
  /// For half inputs: the kernel multiplies half pairs natively and the (capped) CPU detection agrees.
  bool native_half = false;
};

/// Whether xax's CPU detection (capped by XAX_MAX_CPU_ISA) grants native products of `input`.
inline bool cpu_grants_native(DType input) {
  const CpuFeatures& cpu = cpu_features();
  if (input == DType::bfloat16) return cpu.native_bf16_dot();
  if (input == DType::float16) return cpu.avx512_fp16 || cpu.amx_fp16;
  return false;
}

/// Caps oneDNN at XAX_MAX_CPU_ISA's class, once per process, unless ONEDNN_MAX_CPU_ISA (or its old name)
/// already says what oneDNN may use. Classes oneDNN 2.x cannot express (the FP16 ones) leave it alone.
inline void cap_onednn_isa_once() {
  static const bool applied = [] {
    // NOLINTNEXTLINE(concurrency-mt-unsafe): read once, before oneDNN's first primitive
    if (std::getenv("ONEDNN_MAX_CPU_ISA") != nullptr || std::getenv("DNNL_MAX_CPU_ISA") != nullptr)
      return false;
    dnnl::cpu_isa isa = dnnl::cpu_isa::all;
    switch (max_cpu_isa()) {
      case CpuIsa::sse41:
        isa = dnnl::cpu_isa::sse41;
        break;
      case CpuIsa::avx:
        isa = dnnl::cpu_isa::avx;
        break;
      case CpuIsa::avx2:
        isa = dnnl::cpu_isa::avx2;
        break;
      case CpuIsa::avx2_vnni:
        isa = dnnl::cpu_isa::avx2_vnni;
        break;
      case CpuIsa::avx512_core:
        isa = dnnl::cpu_isa::avx512_core;
        break;
      case CpuIsa::avx512_core_vnni:
        isa = dnnl::cpu_isa::avx512_core_vnni;
        break;
      case CpuIsa::avx512_core_bf16:
        isa = dnnl::cpu_isa::avx512_core_bf16;
        break;
      case CpuIsa::avx512_core_amx:
        isa = dnnl::cpu_isa::avx512_core_amx;
        break;
      case CpuIsa::avx512_core_fp16:
      case CpuIsa::avx512_core_amx_fp16:
      case CpuIsa::all:
        return false;
    }
    try {
      dnnl::set_max_cpu_isa(isa);
    } catch (const dnnl::error&) {
      return false;  // oneDNN already ran a kernel in this process; its ISA is fixed
    }
    return true;
  }();
  static_cast<void>(applied);
}

/// One thread's engine, stream, primitives and buffers.
class ThreadContext {
 public:
  /// A thread that keeps meeting new shapes would grow the cache without bound; past this many primitives
  /// it starts over (a training loop uses a handful).
  static constexpr std::size_t max_cached_primitives = 512;

  ThreadContext() : engine_(make_engine()), stream_(engine_) {}

  CachedPrimitive& primitive_for(const PrimitiveKey& key) {
    auto found = cache_.find(key);
    if (found != cache_.end()) return *found->second;
    if (cache_.size() >= max_cached_primitives) cache_.clear();
    return *cache_.emplace(key, create(key)).first->second;
  }

  void execute(CachedPrimitive& cached, const void* a, const void* b, void* c, const void* bias) {
    cached.weights.set_data_handle(const_cast<void*>(a));
    cached.src.set_data_handle(const_cast<void*>(b));
    cached.dst.set_data_handle(c);
    if (bias != nullptr) cached.bias.set_data_handle(const_cast<void*>(bias));
    if (cached.scratchpad_bytes != 0) {
      cached.scratchpad.set_data_handle(scratchpad_.get(cached.scratchpad_bytes));
    }
    const ThreadCap cap(cached.threads);
    try {
      cached.primitive.execute(stream_, cached.arguments);
      stream_.wait();
    } catch (const dnnl::error& error) {
      throw Error(std::string("xax::matmul: oneDNN failed to execute ") + cached.implementation + ": " +
                  error.what());
    }
  }

  /// The scratchpad's bytes, and freeing it (the next call allocates what it needs again).
  [[nodiscard]] std::size_t scratch_bytes() const { return scratchpad_.capacity(); }
  void release_scratch() { scratchpad_.release(); }

 private:
  static dnnl::engine make_engine() {
    cap_onednn_isa_once();  // before oneDNN creates anything
    return {dnnl::engine::kind::cpu, 0};
  }

  std::unique_ptr<CachedPrimitive> create(const PrimitiveKey& key) {
    using dims = dnnl::memory::dims;
    auto cached = std::make_unique<CachedPrimitive>();
    const auto in = data_type_of(key.input);
    // See the layout note at the top: src = op(B)^T (n x k), weights = op(A)^T (k x m), dst = C^T (n x m).
    // A batch prepends a dimension whose stride is each operand's slice stride.
    const bool batched = key.batch > 1;
    const auto shape = [&](Eigen::Index rows, Eigen::Index cols) {
      return batched ? dims{key.batch, rows, cols} : dims{rows, cols};
    };
    const auto strides = [&](Eigen::Index batch_stride, Eigen::Index row_stride, Eigen::Index col_stride) {
      return batched ? dims{batch_stride, row_stride, col_stride} : dims{row_stride, col_stride};
    };
    const dnnl::memory::desc src_desc(
        shape(key.n, key.k), in,
        key.transpose_b ? strides(key.b_batch_stride, 1, key.ldb) : strides(key.b_batch_stride, key.ldb, 1));
    const dnnl::memory::desc weights_desc(
        shape(key.k, key.m), in,
        key.transpose_a ? strides(key.a_batch_stride, 1, key.lda) : strides(key.a_batch_stride, key.lda, 1));
    const dnnl::memory::desc dst_desc(shape(key.n, key.m), data_type_of(key.output),
                                      strides(key.c_batch_stride, key.ldc, 1));
    const dnnl::memory::desc bias_desc(batched ? dims{1, 1, key.m} : dims{1, key.m},
                                       data_type_of(key.bias_type),
                                       batched ? dims{key.m, key.m, 1} : dims{key.m, 1});

    dnnl::primitive_attr attributes;
    attributes.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    dnnl::post_ops post_ops;
    if (key.accumulate) post_ops.append_sum(1.0f);
    // No ReLU post-op: oneDNN 2.6 computes it as max(x, 0), which turns NaN into 0, and so do clip, clip_v2
    // and bounded_relu (measured; tests/test_matmul.cpp checks the result). Activation::relu promises that
    // NaN propagates, for the loss scaler's overflow check, so try_run applies it afterwards (relu_output).
    if (key.activation == Activation::gelu) {
      post_ops.append_eltwise(1.0f, dnnl::algorithm::eltwise_gelu_erf, 0.0f, 0.0f);
    }
    attributes.set_post_ops(post_ops);

    const ThreadCap cap(key.threads);
    dnnl::matmul::primitive_desc descriptor;
    try {
      const auto operation = key.has_bias ? dnnl::matmul::desc(src_desc, weights_desc, bias_desc, dst_desc)
                                          : dnnl::matmul::desc(src_desc, weights_desc, dst_desc);
      descriptor = dnnl::matmul::primitive_desc(operation, attributes, engine_);
    } catch (const dnnl::error&) {
      // No implementation for this combination on this CPU (f16 without AVX512-FP16, say): the caller
      // falls back, and the negative answer is cached like a positive one.
      return cached;
    }
    cached->supported = true;
    cached->threads = key.threads;
    cached->implementation = std::string("onednn:") + descriptor.impl_info_str() +
                             (batched ? " (3-D, batch " + std::to_string(key.batch) + ")" : "");
    cached->native_half =
        native_half_kernel(descriptor.impl_info_str(), key.input) && cpu_grants_native(key.input);
    cached->primitive = dnnl::matmul(descriptor);
    // Memory objects are created on a placeholder and re-pointed at every call's data.
    cached->src = dnnl::memory(src_desc, engine_, DNNL_MEMORY_NONE);
    cached->weights = dnnl::memory(weights_desc, engine_, DNNL_MEMORY_NONE);
    cached->dst = dnnl::memory(dst_desc, engine_, DNNL_MEMORY_NONE);
    cached->arguments = {
        {DNNL_ARG_SRC, cached->src}, {DNNL_ARG_WEIGHTS, cached->weights}, {DNNL_ARG_DST, cached->dst}};
    if (key.has_bias) {
      cached->bias = dnnl::memory(bias_desc, engine_, DNNL_MEMORY_NONE);
      cached->arguments.emplace(DNNL_ARG_BIAS, cached->bias);
    }
    const dnnl::memory::desc scratchpad_desc = descriptor.scratchpad_desc();
    cached->scratchpad_bytes = scratchpad_desc.get_size();
    if (cached->scratchpad_bytes != 0) {
      cached->scratchpad = dnnl::memory(scratchpad_desc, engine_, DNNL_MEMORY_NONE);
      cached->arguments.emplace(DNNL_ARG_SCRATCHPAD, cached->scratchpad);
    }
    return cached;
  }

  dnnl::engine engine_;
  dnnl::stream stream_;
  std::unordered_map<PrimitiveKey, std::unique_ptr<CachedPrimitive>, PrimitiveKeyHash> cache_;
  ScratchBuffer<std::byte> scratchpad_;
};

inline ThreadContext& thread_context() {
  thread_local ThreadContext context;
  return context;
}

inline PrimitiveKey key_of(const MatmulProblem& p) {
  PrimitiveKey key;
  key.input = p.input;
  key.output = p.output;
  key.has_bias = p.bias != nullptr;
  key.bias_type = key.has_bias ? p.bias_type : DType::float32;
  key.transpose_a = p.transpose_a;
  key.transpose_b = p.transpose_b;
  key.accumulate = p.accumulate;
  key.activation = p.activation;
  key.m = p.m;
  key.n = p.n;
  key.k = p.k;
  key.lda = p.a.ld;
  key.ldb = p.b.ld;
  key.ldc = p.ldc;
  if (p.batch > 1) {
    key.batch = p.batch;
    key.a_batch_stride = p.a_batch_stride;
    key.b_batch_stride = p.b_batch_stride;
    key.c_batch_stride = p.c_batch_stride;
  }
  const double flops = 2.0 * static_cast<double>(p.m) * static_cast<double>(p.n) * static_cast<double>(p.k) *
                       static_cast<double>(p.batch);
  // Inside an enclosing parallel region oneDNN runs on the calling thread alone, so the primitive must be
  // decomposed for one thread.
  bool nested = false;
#if defined(_OPENMP)
  nested = omp_in_parallel() != 0;
#endif
  key.threads = flops < small_product_flops || nested ? 1 : num_threads();
  return key;
}

/// ReLU over C, in place, after a primitive that ran without it: `x < 0 ? 0 : x` on a float C, as the Eigen
/// backend computes it, so that NaN propagates. A 16-bit C holds the rounded sum: rounding keeps the sign,
/// so zeroing what is <= 0 (NaN compares false) gives the bits of relu-then-round, +0 included.
template <class O>
void relu_output(O* c, Eigen::Index m, Eigen::Index n, Eigen::Index ldc, Eigen::Index batch,
                 Eigen::Index c_batch_stride) {
  const auto columns = static_cast<std::size_t>(n * batch);
  parallel_blocks(columns, static_cast<std::size_t>(m) * 2 * sizeof(O), 1,
                  [=](std::size_t begin, std::size_t end) noexcept {
                    const O zero = convert_scalar<O>(0.0f);
                    for (auto q = static_cast<Eigen::Index>(begin); q < static_cast<Eigen::Index>(end); ++q) {
                      O* column = c + (q / n) * c_batch_stride + (q % n) * ldc;
                      if constexpr (std::is_same_v<O, float>) {
                        activation_block(Activation::relu, column, column, static_cast<std::size_t>(m));
                      } else {
                        for (Eigen::Index i = 0; i < m; ++i) {
                          if (static_cast<float>(column[i]) <= 0.0f) column[i] = zero;
                        }
                      }
                    }
                  });
}

inline void relu_output(const MatmulProblem& p) {
  switch (p.output) {
    case DType::float32:
      relu_output(static_cast<float*>(p.c), p.m, p.n, p.ldc, p.batch, p.c_batch_stride);
      return;
    case DType::bfloat16:
      relu_output(static_cast<bfloat16*>(p.c), p.m, p.n, p.ldc, p.batch, p.c_batch_stride);
      return;
    case DType::float16:
      relu_output(static_cast<float16*>(p.c), p.m, p.n, p.ldc, p.batch, p.c_batch_stride);
      return;
    case DType::float64:
      return;
  }
}

/// Which half-precision kernels try_run accepts.
enum class HalfKernels {
  native_only,  ///< MatmulBackend::automatic: only kernels with native half dot products
  any,          ///< MatmulBackend::onednn: whatever oneDNN implements, emulations included
};

/// Runs `p` on oneDNN. Returns false, having done nothing, when oneDNN has no kernel for it or (for half
/// inputs under native_only) only an emulating one; the caller then widens, or uses the Eigen backend.
inline bool try_run(const MatmulProblem& p, HalfKernels accept = HalfKernels::native_only) {
  if (p.k == 0 || p.batch < 1 || data_type_of(p.input) == dnnl::memory::data_type::undef ||
      data_type_of(p.output) == dnnl::memory::data_type::undef) {
    return false;
  }
  ThreadContext& context = thread_context();
  CachedPrimitive& cached = context.primitive_for(key_of(p));
  if (!cached.supported) return false;
  if (p.input != DType::float32 && !cached.native_half && accept == HalfKernels::native_only) return false;
  context.execute(cached, p.a.data, p.b.data, p.c, p.bias);
  if (p.activation == Activation::relu) relu_output(p);
  last_matmul_implementation_record() = cached.implementation;
  return true;
}

/// The kernel oneDNN picks for a representative product of `input` pairs into float (256^3, one thread), and
/// whether it counts as native; supported is false where oneDNN has none.
struct KernelProbe {
  bool supported = false;
  bool native_half = false;
  std::string implementation;
};

inline KernelProbe probe_kernel(DType input) {
  PrimitiveKey key;
  key.input = input;
  key.output = DType::float32;
  key.m = key.n = key.k = key.lda = key.ldb = key.ldc = 256;
  const CachedPrimitive& cached = thread_context().primitive_for(key);
  return {cached.supported, cached.native_half, cached.implementation};
}

}  // namespace xax::detail::onednn_backend

#endif  // XAX_HAS_ONEDNN
