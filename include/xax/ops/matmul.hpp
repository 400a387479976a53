#pragma once
/// \file
/// Matrix products for mixed precision: float, bfloat16 or float16 inputs, **fp32 accumulation**, and one
/// rounding to the output type, with the transpositions a Linear layer's forward and backward need, optional
/// accumulation into the output (gradient accumulation) and a fused bias + activation epilogue.
///
///     Eigen::Matrix<xax::bfloat16, Eigen::Dynamic, Eigen::Dynamic> w(out, in), x(in, batch), y;
///     Eigen::Matrix<xax::bfloat16, Eigen::Dynamic, 1> b(out);
///     xax::matmul(w, x, b, y, {.activation = xax::Activation::relu});   // y = relu(w x + b)
///     xax::matmul(dy, x, dw, {.transpose_b = true});                     // dw = dy x^T
///     xax::matmul(w, dy, dx, {.transpose_a = true});                     // dx = w^T dy
///
/// Layout: operands are Eigen dense objects with direct access and unit inner stride: plain matrices and
/// vectors, contiguous `Map`s, column blocks, and their `.transpose()` (a row-major operand is read as the
/// transpose of a column-major one, without a copy). The output is column-major. A Linear layer stores one
/// sample per column (features x batch), so `w x` is the forward product.
///
/// Backends: oneDNN when xax is configured with it (XAX_HAS_ONEDNN), and a portable Eigen path. Dispatch is
/// by capability, per product: a bf16 or f16 product goes to a oneDNN kernel only where that kernel runs
/// native half dot products (AVX512_BF16, AMX, AVX512-FP16) and xax's CPU detection (capped by
/// XAX_MAX_CPU_ISA) agrees; everywhere else the operands are widened to fp32 and multiplied with fp32
/// accumulation, never as fp32 copies of whole operands: on AVX2 CPUs without AVX-512 (and on any AVX2 CPU
/// in a build without oneDNN) by xax's own GEMM, which widens as it packs and rounds as it stores
/// (ops/backend/packing_gemm.hpp), elsewhere in bounded panels for the fp32 GEMM. On those AVX2 CPUs, fp32
/// products run on xax's GEMM too (it is faster there than oneDNN's gemm:jit), so fp32 and 16-bit compute
/// share one kernel and their ratio measures the precision alone. `half_matmul_support()`
/// says what this CPU does for each half type, `last_matmul_implementation()` which kernel ran. Both backends
/// honour xax::set_num_threads().
///
/// Eigen's own `Matrix<bfloat16>` product is what this replaces: it accumulates in bf16 (3.6e-2 relative
/// error at K=1024, a -21 % bias on positive data) and runs at a sixth of the float speed.

#include <xax/detail/eigen.hpp>

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <type_traits>
#include <xax/detail/format.hpp>
#include <xax/ops/activation.hpp>
#include <xax/ops/backend/eigen.hpp>
#include <xax/ops/backend/native_kernel.hpp>
#include <xax/ops/backend/onednn.hpp>
#include <xax/ops/backend/packing_gemm.hpp>
#include <xax/ops/backend/problem.hpp>
#include <xax/ops/backend/widening.hpp>
#include <xax/ops/matmul_concepts.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/platform.hpp>

namespace xax {

/// Which implementation runs a matmul.
enum class MatmulBackend {
  /// float: xax's AVX2 GEMM on AVX2 CPUs without AVX-512 (or any AVX2 CPU without oneDNN), else oneDNN where
  /// built, else Eigen. bf16/f16: a oneDNN kernel where it multiplies them natively, else
  /// xax's AVX2 GEMM (AVX2 without AVX-512, or any AVX2 CPU without oneDNN), else panels widened to float for
  /// the fp32 GEMM (oneDNN's where built, else Eigen's).
  automatic,
  eigen,   ///< always available: half panels widened to float, Eigen's float GEMM, round once
  onednn,  ///< only in builds configured with oneDNN (ConfigError otherwise); any oneDNN kernel, emulated
           ///< half ones included, and widened panels on its fp32 kernel where it has no half kernel
};

/// "automatic", "eigen" or "onednn".
constexpr std::string_view matmul_backend_name(MatmulBackend backend) {
  switch (backend) {
    case MatmulBackend::automatic:
      return "automatic";
    case MatmulBackend::eigen:
      return "eigen";
    case MatmulBackend::onednn:
      return "onednn";
  }
  return "invalid MatmulBackend";
}

/// Whether this build of xax can run `backend` (oneDNN is chosen when xax is configured).
constexpr bool matmul_backend_available(MatmulBackend backend) {
#if defined(XAX_HAS_ONEDNN) && XAX_HAS_ONEDNN
  static_cast<void>(backend);
  return true;
#else
  return backend != MatmulBackend::onednn;
#endif
}

/// The backend `MatmulBackend::automatic` prefers in this build: onednn or eigen. (Where xax's own AVX2 GEMM
/// applies, automatic runs it before either; it has no MatmulBackend value of its own.)
constexpr MatmulBackend default_matmul_backend() {
  return matmul_backend_available(MatmulBackend::onednn) ? MatmulBackend::onednn : MatmulBackend::eigen;
}

/// What ran this thread's last matmul, for reports: backend and kernel, such as
/// "onednn:brg:avx512_core_bf16" or "eigen:sgemm (bfloat16 widened to float32)". Empty before the first.
inline std::string last_matmul_implementation() {
  return detail::last_matmul_implementation_record();
}

/// How a matmul combines its operands: `C = act(op(A) op(B) + bias [+ C])`.
struct MatmulOptions {
  bool transpose_a = false;  ///< op(A) = A^T
  bool transpose_b = false;  ///< op(B) = B^T
  /// Add the product to C's current value (beta = 1), e.g. to accumulate gradients over micro-batches. The
  /// old C joins the fp32 sum before the bias and activation.
  bool accumulate = false;
  Activation activation = Activation::none;  ///< applied after the bias, before the one rounding
  MatmulBackend backend = MatmulBackend::automatic;
};

/// What this CPU (and this build) does with products of one half type.
struct HalfMatmulSupport {
  DType dtype = DType::bfloat16;
  /// Products run on native half dot products with fp32 accumulation; when false they are widened to fp32 in
  /// panels and run at the fp32 GEMM's speed: 16-bit compute then saves memory, not time.
  bool native = false;
  std::string kernel;  ///< the kernel a representative product runs on, e.g. "onednn:brg:avx512_core_bf16"
  std::string explanation;  ///< one sentence for reports
};

namespace detail {
/// The widening path's fp32 GEMM: oneDNN's fp32 kernel where built, else Eigen's.
inline void run_float_panel(const MatmulProblem& panel) {
#if defined(XAX_HAS_ONEDNN) && XAX_HAS_ONEDNN
  if (onednn_backend::try_run(panel)) return;
#endif
  eigen_backend::run_float(panel);
}

/// Whether xax::matmul's automatic backend widens products of T to fp32 on this CPU: a half type without a
/// native kernel here (always, without oneDNN). Each such product holds up to a thread's packed blocks or
/// widened panels of scratch (packing_gemm.hpp, widening.hpp), so a caller may prefer not to run two of them
/// side by side.
template <class T>
bool widens_products() {
  if constexpr (std::is_same_v<T, bfloat16> || std::is_same_v<T, float16>) {
#if defined(XAX_HAS_ONEDNN) && XAX_HAS_ONEDNN
    return !onednn_backend::probe_kernel(dtype_of<T>).native_half;
#else
    return true;
#endif
  } else {
    return false;
  }
}

inline std::string short_dtype_name(DType dtype) {
  return dtype == DType::bfloat16  ? "bf16"
         : dtype == DType::float16 ? "fp16"
                                   : std::string(dtype_name(dtype));
}
}  // namespace detail

/// Whether bf16 or f16 products run natively here, with the kernel and a sentence for reports. Creates (and
/// caches) one representative oneDNN primitive on the calling thread. Throws ConfigError for a dtype that is
/// not a half type, or when XAX_MAX_CPU_ISA holds an unknown value.
inline HalfMatmulSupport half_matmul_support(DType dtype) {
  if (dtype != DType::bfloat16 && dtype != DType::float16) {
    throw ConfigError("xax::half_matmul_support: " + std::string(dtype_name(dtype)) +
                      " is not a half type; pass DType::bfloat16 or DType::float16");
  }
  HalfMatmulSupport support;
  support.dtype = dtype;
  const CpuFeatures& cpu = cpu_features();
  const bool cpu_native = dtype == DType::bfloat16 ? cpu.native_bf16_dot() : cpu.avx512_fp16 || cpu.amx_fp16;
  std::string fp32_kernel = "eigen:sgemm";
#if defined(XAX_HAS_ONEDNN) && XAX_HAS_ONEDNN
  const detail::onednn_backend::KernelProbe probe = detail::onednn_backend::probe_kernel(dtype);
  support.native = probe.native_half;
  if (support.native) support.kernel = probe.implementation;
  fp32_kernel = detail::onednn_backend::probe_kernel(DType::float32).implementation;
#endif
  const std::string name = detail::short_dtype_name(dtype);
  if (support.native) {
    support.explanation = name + " products run natively (" + support.kernel + ", fp32 accumulation)";
    return support;
  }
  std::string widened;
  if (detail::packing_gemm::runs_products_of(dtype, cpu)) {
    support.kernel = detail::packing_gemm::implementation_name(dtype);
    widened = name + " products run on xax's AVX2 GEMM, packed to fp32, as fp32 products do";
  } else {
    support.kernel = fp32_kernel + " (" + std::string(dtype_name(dtype)) + " widened to float32 in panels)";
    widened = name + " products are widened to fp32 in panels for " + fp32_kernel;
  }
  if (!cpu_native) {
    support.explanation =
        "this CPU has no native " + name + " dot product: mixed saves memory, not time (" + widened +
        (cpu_features() == detail::detected_cpu_features()
             ? ")"
             : "; XAX_MAX_CPU_ISA caps it at " + std::string(cpu_isa_name(max_cpu_isa())) + ")");
  } else {
    support.explanation =
        "this CPU has native " + name +
        " dot products, but no kernel in this build uses them: mixed saves memory, not time (" + widened +
        ")";
  }
  return support;
}

/// Frees the calling thread's matmul scratch (widened panels, oneDNN's scratchpad), which otherwise stays
/// allocated at its largest size so that repeated steps allocate nothing. Call it between workloads of very
/// different sizes, or before measuring the next one's peak memory.
inline void release_matmul_scratch() {
  detail::widening::workspace().release();
  detail::packing_gemm::workspace().release();
#if defined(XAX_HAS_ONEDNN) && XAX_HAS_ONEDNN
  detail::onednn_backend::thread_context().release_scratch();
#endif
}

namespace detail {

/// The calling thread's matmul scratch in bytes (for tests of the bound and of release_matmul_scratch()).
inline std::size_t matmul_scratch_bytes() {
  std::size_t bytes = widening::workspace().bytes() + packing_gemm::workspace().bytes();
#if defined(XAX_HAS_ONEDNN) && XAX_HAS_ONEDNN
  bytes += onednn_backend::thread_context().scratch_bytes();
#endif
  return bytes;
}

/// The stored column-major matrix behind `x`, and whether `x` is its transpose (x row-major). Its columns
/// must not overlap (matmul_impl copies such operands first).
template <class M>
std::pair<MatmulOperand, bool> stored_operand(const M& x) {
  const Eigen::Index ld = leading_dimension(x, "matmul");
  if constexpr (M::IsRowMajor) {
    return {{x.data(), x.cols(), x.rows(), ld}, true};
  } else {
    return {{x.data(), x.rows(), x.cols(), ld}, false};
  }
}

/// Runs a checked problem on the requested backend.
inline void run_matmul(const MatmulProblem& problem, MatmulBackend backend) {
  if (problem.m == 0 || problem.n == 0) {
    last_matmul_implementation_record() = "none (empty output)";
    return;
  }
  const bool half = problem.input != DType::float32;
  switch (backend) {
    case MatmulBackend::onednn:
#if defined(XAX_HAS_ONEDNN) && XAX_HAS_ONEDNN
      if (onednn_backend::try_run(problem, onednn_backend::HalfKernels::any)) return;
      if (half) {
        widening::run(problem, run_float_panel);
        return;
      }
      if (problem.k == 0) {  // only the epilogue on zeros or on C: not oneDNN's business
        eigen_backend::run(problem);
        return;
      }
      throw Error("xax::matmul: oneDNN has no implementation for a " + std::to_string(problem.m) + "x" +
                  std::to_string(problem.k) + " by " + std::to_string(problem.k) + "x" +
                  std::to_string(problem.n) + " float32 product on this CPU; use MatmulBackend::automatic");
#else
      throw ConfigError(
          "xax::matmul: MatmulBackend::onednn was requested, but this build of xax has no oneDNN; install "
          "oneDNN (Debian: libdnnl-dev) and configure with -DXAX_WITH_ONEDNN=ON, or use "
          "MatmulBackend::automatic");
#endif
    case MatmulBackend::automatic: {
      // xax's AVX2 GEMM takes what it applies to, except half products that oneDNN runs natively (which
      // needs AVX-512, where it applies to none today; the order keeps a native kernel first regardless).
      const bool xax_gemm = packing_gemm::applies(problem, cpu_features());
      if (xax_gemm && !half) {
        packing_gemm::run(problem);
        return;
      }
#if defined(XAX_HAS_ONEDNN) && XAX_HAS_ONEDNN
      if (onednn_backend::try_run(problem, onednn_backend::HalfKernels::native_only)) return;
#endif
      if (xax_gemm) {
        packing_gemm::run(problem);
      } else if (half) {
        widening::run(problem, run_float_panel);
      } else {
        eigen_backend::run(problem);
      }
      return;
    }
    case MatmulBackend::eigen:
      eigen_backend::run(problem);
      return;
  }
  throw ConfigError("xax::matmul: invalid MatmulBackend value " + std::to_string(static_cast<int>(backend)));
}

template <class In, class Out, class Bias>
void check_matmul_scalars() {
  static_assert(std::is_same_v<Out, In> || std::is_same_v<Out, float>,
                "xax::matmul: the output must hold the inputs' scalar or float (fp32 accumulation is rounded "
                "once into it); cast the result afterwards for another type");
  static_assert(std::is_same_v<Bias, In> || std::is_same_v<Bias, float>,
                "xax::matmul: the bias must hold the inputs' scalar or float");
}

/// Throws ConfigError for an activation or backend that is none of its enumerators (an integer cast to the
/// enum), before anything is resized or computed: a switch over them would otherwise skip the epilogue.
inline void check_matmul_options(const MatmulOptions& options, std::string_view function) {
  const Activation activation = options.activation;
  if (activation != Activation::none && activation != Activation::relu && activation != Activation::gelu) {
    throw ConfigError(std::string(function) + ": Activation value " +
                      std::to_string(static_cast<int>(activation)) +
                      " is not accepted; expected Activation::none, Activation::relu or Activation::gelu");
  }
  const MatmulBackend backend = options.backend;
  if (backend != MatmulBackend::automatic && backend != MatmulBackend::eigen &&
      backend != MatmulBackend::onednn) {
    throw ConfigError(std::string(function) + ": MatmulBackend value " +
                      std::to_string(static_cast<int>(backend)) +
                      " is not accepted; expected MatmulBackend::automatic, ::eigen or ::onednn");
  }
}

template <class A, class B, class C, class Bias>
void matmul_impl(const A& a, const B& b, const Bias* bias, C& c, const MatmulOptions& options) {
  using In = typename A::Scalar;
  using Out = typename C::Scalar;
  static_assert(
      std::is_same_v<In, typename B::Scalar>,
      "xax::matmul: A and B must have the same scalar; convert one (xax::convert, .cast<T>()) first");
  check_matmul_options(options, "xax::matmul");
  // The bias's shape first: the copy below of a bias whose elements are not adjacent reads size() elements
  // down its first column, which is past a matrix's (or its parent's) columns when it is not a vector.
  if (const Eigen::Index m = options.transpose_a ? a.cols() : a.rows();
      bias != nullptr && ((bias->rows() != 1 && bias->cols() != 1) || bias->size() != m)) {
    throw ShapeError("xax::matmul: the bias is " + shape_string(bias->rows(), bias->cols()) +
                     " but must be a vector of length " + std::to_string(m) + " (the rows of the output)");
  }

  // What a GEMM cannot describe by a leading dimension is multiplied from a contiguous copy, read as Eigen
  // reads it: an operand whose columns overlap (a sliding-window Map, outer stride < rows, or 0 to repeat a
  // column), and a bias whose elements are not adjacent (a 1 x n block of a column-major matrix, such as
  // `params.topRows(1)`, holds them a column apart). The copies are taken before C is resized, so they are
  // also safe from an output that owns their storage.
  if (has_overlapping_columns(a)) {
    const typename A::PlainObject copy = a;
    matmul_impl(copy, b, bias, c, options);
    return;
  }
  if (has_overlapping_columns(b)) {
    const typename B::PlainObject copy = b;
    matmul_impl(a, copy, bias, c, options);
    return;
  }
  if constexpr (!std::is_same_v<Bias, Eigen::Matrix<typename Bias::Scalar, Eigen::Dynamic, 1>>) {
    if (bias != nullptr && vector_increment(*bias) != 1) {
      Eigen::Matrix<typename Bias::Scalar, Eigen::Dynamic, 1> copy(bias->size());
      for (Eigen::Index i = 0; i < bias->size(); ++i)
        copy(i) = bias->rows() == 1 ? bias->coeff(0, i) : bias->coeff(i, 0);
      matmul_impl(a, b, &copy, c, options);
      return;
    }
  }

  const auto [a_stored, a_flipped] = stored_operand(a);
  const auto [b_stored, b_flipped] = stored_operand(b);
  const bool transpose_a = options.transpose_a != a_flipped;
  const bool transpose_b = options.transpose_b != b_flipped;
  const Eigen::Index m = options.transpose_a ? a.cols() : a.rows();
  const Eigen::Index k = options.transpose_a ? a.rows() : a.cols();
  const Eigen::Index k_b = options.transpose_b ? b.cols() : b.rows();
  const Eigen::Index n = options.transpose_b ? b.rows() : b.cols();
  if (k != k_b) {
    throw ShapeError("xax::matmul: op(A) is " + shape_string(m, k) + " (A is " +
                     shape_string(a.rows(), a.cols()) + (options.transpose_a ? ", transposed" : "") +
                     ") but op(B) is " + shape_string(k_b, n) + " (B is " + shape_string(b.rows(), b.cols()) +
                     (options.transpose_b ? ", transposed" : "") +
                     "); the columns of op(A) must equal the rows of op(B)");
  }
  constexpr bool resizable = std::is_same_v<typename C::PlainObject, C>;
  const auto require_output_shape = [&] {
    if (c.rows() != m || c.cols() != n) {
      throw ShapeError("xax::matmul: the output is " + shape_string(c.rows(), c.cols()) +
                       " but op(A) op(B) is " + shape_string(m, n) + " (op(A) " + shape_string(m, k) +
                       ", op(B) " + shape_string(k, n) + ")" +
                       (options.accumulate ? "; an accumulating output must already have that shape"
                                           : "; pass a resizable matrix or one of that shape"));
    }
  };
  // Resizes a plain output that can take an m x n shape; a fixed-size or vector one keeps its shape and is
  // checked instead.
  const auto resize_to_product = [m, n](auto& plain) {
    using P = std::remove_reference_t<decltype(plain)>;
    if ((P::RowsAtCompileTime == Eigen::Dynamic || P::RowsAtCompileTime == m) &&
        (P::ColsAtCompileTime == Eigen::Dynamic || P::ColsAtCompileTime == n) &&
        (plain.rows() != m || plain.cols() != n)) {
      plain.resize(m, n);
    }
  };
  if (!resizable || options.accumulate) require_output_shape();

  // The backends read the inputs while writing C, as Eigen's noalias() products do, so C must not share
  // memory with an input (any overlap of the address ranges counts). This is decided on C's storage before
  // any resize: resizing first would free the storage an aliased input still points to. C's columns must not
  // overlap either (matrix_storage throws ShapeError).
  const StoredOperand c_storage = matrix_storage(c, "matmul");
  const auto overlaps = [&c_storage](const StoredOperand& operand) {
    return ranges_overlap(c_storage, operand);
  };
  if (overlaps(matrix_storage(a, "matmul")) || overlaps(matrix_storage(b, "matmul")) ||
      (bias != nullptr && overlaps(vector_storage(*bias)))) {
    if constexpr (resizable) {
      // A matrix that owns its storage can take the product like Eigen's `c = a * c`: computed into a
      // temporary, then moved in.
      C product;
      if (options.accumulate) {
        product = c;
      } else {
        resize_to_product(product);
      }
      matmul_impl(a, b, bias, product, options);
      c = std::move(product);
      return;
    } else {
      throw ShapeError(
          "xax::matmul: the output overlaps an input; write the product into a separate matrix (or pass a "
          "plain Matrix as the output, which then takes the product through a temporary)");
    }
  }
  if constexpr (resizable) {
    if (!options.accumulate) resize_to_product(c);
  }
  require_output_shape();

  MatmulProblem problem;
  problem.input = dtype_of<In>;
  problem.output = dtype_of<Out>;
  problem.a = a_stored;
  problem.b = b_stored;
  problem.transpose_a = transpose_a;
  problem.transpose_b = transpose_b;
  problem.c = c.data();
  problem.ldc = leading_dimension(c, "matmul");
  if (bias != nullptr) {
    problem.bias = bias->data();
    problem.bias_type = dtype_of<typename Bias::Scalar>;
  }
  problem.m = m;
  problem.n = n;
  problem.k = k;
  problem.accumulate = options.accumulate;
  problem.activation = options.activation;
  run_matmul(problem, options.backend);
}

}  // namespace detail

/// `c = act(op(a) op(b) [+ c])` with fp32 accumulation and one rounding to c's scalar (see MatmulOptions).
/// `a` and `b` share a scalar (float, bfloat16 or float16); `c` holds that scalar or float. A plain
/// (resizable) `c` is resized unless accumulating; any other `c` must already be m x n. Throws ShapeError
/// naming both shapes when the operands do not fit.
template <matmul_operand A, matmul_operand B, class C>
requires matmul_output<std::remove_reference_t<C>>
void matmul(const A& a, const B& b, C&& c, const MatmulOptions& options = {}) {
  using Out = typename std::remove_reference_t<C>::Scalar;
  detail::check_matmul_scalars<typename A::Scalar, Out, Out>();
  using NoBias = Eigen::Matrix<Out, Eigen::Dynamic, 1>;
  detail::matmul_impl(a, b, static_cast<const NoBias*>(nullptr), c, options);
}

/// `c = act(op(a) op(b) + bias [+ c])`: as above, with `bias` (a vector of c's rows) added to every column
/// in fp32 before the activation. This is the fused epilogue of a Linear layer's forward.
template <matmul_operand A, matmul_operand B, matmul_operand Bias, class C>
requires matmul_output<std::remove_reference_t<C>>
void matmul(const A& a, const B& b, const Bias& bias, C&& c, const MatmulOptions& options = {}) {
  detail::check_matmul_scalars<typename A::Scalar, typename std::remove_reference_t<C>::Scalar,
                               typename Bias::Scalar>();
  detail::matmul_impl(a, b, &bias, c, options);
}

}  // namespace xax
