#pragma once
/// \file
/// Batched matrix products over 3-D tensors, for attention: slice `i` of the output is
/// `op(A_i) op(B_i)` with fp32 accumulation and one rounding to the output type, so a 16-bit batch never
/// accumulates in 16 bits.
///
/// Dispatch. Where oneDNN is built in and has a native kernel for the slices' product (float always;
/// bf16 / f16 only where its kernel multiplies them natively and XAX_MAX_CPU_ISA agrees;
/// MatmulBackend::onednn takes any oneDNN kernel), the whole batch -- or each thread's share of it -- runs as
/// ONE 3-D oneDNN matmul primitive: attention's slices are so small (64x32 * 32x64) that one primitive call
/// per slice cost more than the product. `last_matmul_implementation()` then names the kernel with
/// "(3-D, batch N)". This holds for float where a single fp32 product would run on xax's AVX2 GEMM: one
/// primitive over the batch costs less than a call per tiny slice. Everywhere else (no oneDNN,
/// MatmulBackend::eigen, half types without a native kernel, an empty inner dimension) each slice goes
/// through xax::matmul: xax's AVX2 GEMM, Eigen, or panels widened to fp32.
///
/// Threads. On several threads, slices too small to use every thread alone (attention's are) are shared
/// out: each thread takes a contiguous range of slices and runs it as one single-threaded primitive (or one
/// product at a time). Every slice is then computed by the same single-threaded kernel as on one thread,
/// and the result is the same bit for bit (oneDNN's batched kernel treats slices independently;
/// tests/test_batched_matmul.cpp checks it for every scalar type and transpose, 37 slices shared 18 + 19).
/// A batch of larger products runs as one primitive on every thread instead; oneDNN does not document its
/// results as independent of the thread count, so there bit-identity is measured, not promised (equal on
/// Zen 4 for float and bf16, 2-3 slices of 64x4096x64 up to 512^3, and 600 slices of 64x64x32).
///
/// A 3-D operand is an `Eigen::Tensor<S, 3>` (column-major) or a `TensorMap` of one, with dimensions
/// (rows, cols, batch): every slice is a contiguous column-major rows x cols matrix. Attention with one
/// query, key or value vector per column (head_size x tokens slices) needs:
///
///     xax::batched_matmul(k, q, scores, {.transpose_a = true});   // scores_i = K_i^T Q_i  (keys x queries)
///     xax::batched_matmul(v, probs, y);                            // y_i = V_i P_i        (head x queries)
///     xax::batched_matmul(dy, probs, dv, {.transpose_b = true});   // dV_i = dY_i P_i^T
///     xax::batched_matmul(v, dy, dprobs, {.transpose_a = true});   // dP_i = V_i^T dY_i

#include <xax/detail/eigen.hpp>
#include <xax/detail/eigen_tensor.hpp>

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <xax/detail/parallel.hpp>
#include <xax/ops/matmul.hpp>
#include <xax/ops/matmul_concepts.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/threads.hpp>

namespace xax {

/// A 3-D column-major tensor of a matmul_scalar with direct access (Eigen::Tensor<S, 3> or a TensorMap of
/// one): (rows, cols, batch), one contiguous column-major matrix per batch index.
template <class T>
concept batched_operand = requires(const T& t) {
  typename T::Scalar;
  { t.data() } -> std::convertible_to<const typename T::Scalar*>;
  { t.dimension(0) } -> std::convertible_to<Eigen::Index>;
}
&&matmul_scalar<std::remove_const_t<typename T::Scalar>> && (T::NumDimensions == 3) &&
    (static_cast<int>(T::Layout) == static_cast<int>(Eigen::ColMajor));

/// A batched_operand that can be written.
template <class T>
concept batched_output = batched_operand<T> && !std::is_const_v<typename T::Scalar> && requires(T & t) {
  { t.data() } -> std::convertible_to<typename T::Scalar*>;
};

namespace detail {

/// Slices of at least this many flops run one after another, each product on every thread (as
/// xax::matmul decides); smaller ones are shared out between the threads, one whole product per thread.
inline constexpr double batched_slice_parallel_flops = 16.0 * 1024 * 1024;

/// Runs `count` consecutive slices as one 3-D oneDNN primitive where oneDNN has a native kernel for them
/// (see the file comment); returns false, having done nothing, where it has not (the caller then runs each
/// slice through xax::matmul) and in builds without oneDNN.
template <class In, class Out>
bool run_batch_on_onednn([[maybe_unused]] const In* a, [[maybe_unused]] Eigen::Index a_rows,
                         [[maybe_unused]] Eigen::Index a_cols, [[maybe_unused]] const In* b,
                         [[maybe_unused]] Eigen::Index b_rows, [[maybe_unused]] Eigen::Index b_cols,
                         [[maybe_unused]] Out* c, [[maybe_unused]] Eigen::Index m,
                         [[maybe_unused]] Eigen::Index n, [[maybe_unused]] Eigen::Index k,
                         [[maybe_unused]] Eigen::Index count, [[maybe_unused]] const MatmulOptions& options) {
#if defined(XAX_HAS_ONEDNN) && XAX_HAS_ONEDNN
  // One slice is xax::matmul's own business; an empty product only touches C (or nothing).
  if (options.backend == MatmulBackend::eigen || count < 2 || m == 0 || n == 0 || k == 0) return false;
  MatmulProblem problem;
  problem.input = dtype_of<In>;
  problem.output = dtype_of<Out>;
  problem.a = {a, a_rows, a_cols, std::max<Eigen::Index>(a_rows, 1)};
  problem.b = {b, b_rows, b_cols, std::max<Eigen::Index>(b_rows, 1)};
  problem.transpose_a = options.transpose_a;
  problem.transpose_b = options.transpose_b;
  problem.c = c;
  problem.ldc = std::max<Eigen::Index>(m, 1);
  problem.m = m;
  problem.n = n;
  problem.k = k;
  problem.accumulate = options.accumulate;
  problem.activation = options.activation;
  problem.batch = count;
  problem.a_batch_stride = a_rows * a_cols;
  problem.b_batch_stride = b_rows * b_cols;
  problem.c_batch_stride = m * n;
  return onednn_backend::try_run(problem, options.backend == MatmulBackend::onednn
                                              ? onednn_backend::HalfKernels::any
                                              : onednn_backend::HalfKernels::native_only);
#else
  return false;
#endif
}

inline std::string shape3_string(Eigen::Index rows, Eigen::Index cols, Eigen::Index batch) {
  return std::to_string(rows) + "x" + std::to_string(cols) + "x" + std::to_string(batch);
}

/// `count` products c_i = act(op(a_i) op(b_i) [+ c_i]) of consecutive contiguous column-major slices (a_i is
/// a_rows x a_cols, b_i b_rows x b_cols, c_i m x n), on the calling thread's share of xax's threads: one 3-D
/// oneDNN primitive where oneDNN runs the slices natively, else one xax::matmul per slice.
/// Shapes and aliasing are the caller's to check.
template <class In, class Out>
void batched_products(const In* a, Eigen::Index a_rows, Eigen::Index a_cols, const In* b, Eigen::Index b_rows,
                      Eigen::Index b_cols, Out* c, Eigen::Index m, Eigen::Index n, Eigen::Index k,
                      Eigen::Index count, const MatmulOptions& options) {
  if (run_batch_on_onednn(a, a_rows, a_cols, b, b_rows, b_cols, c, m, n, k, count, options)) return;
  using InMatrix = Eigen::Matrix<In, Eigen::Dynamic, Eigen::Dynamic>;
  using OutMatrix = Eigen::Matrix<Out, Eigen::Dynamic, Eigen::Dynamic>;
  for (Eigen::Index i = 0; i < count; ++i) {
    const Eigen::Map<const InMatrix> a_slice(a + i * a_rows * a_cols, a_rows, a_cols);
    const Eigen::Map<const InMatrix> b_slice(b + i * b_rows * b_cols, b_rows, b_cols);
    Eigen::Map<OutMatrix> c_slice(c + i * m * n, m, n);
    matmul(a_slice, b_slice, c_slice, options);
  }
}

}  // namespace detail

/// `c_i = act(op(a_i) op(b_i) [+ c_i])` for every slice i, as xax::matmul with `options` (no bias) would
/// compute it. `a` and `b` share a scalar; `c` holds it or float. A plain `Eigen::Tensor` output is resized
/// to (m, n, batch) unless accumulating; a TensorMap must already have that shape. Throws ShapeError when the
/// batch sizes or the inner dimensions differ, or the output has the wrong shape, and Error when the output
/// shares memory with an input.
template <batched_operand A, batched_operand B, class C>
requires batched_output<std::remove_reference_t<C>>
void batched_matmul(const A& a, const B& b, C&& c, const MatmulOptions& options = {}) {
  using In = std::remove_const_t<typename A::Scalar>;
  using Out = typename std::remove_reference_t<C>::Scalar;
  using CT = std::remove_reference_t<C>;
  static_assert(std::is_same_v<In, std::remove_const_t<typename B::Scalar>>,
                "xax::batched_matmul: A and B must have the same scalar; convert one first");
  static_assert(std::is_same_v<Out, In> || std::is_same_v<Out, float>,
                "xax::batched_matmul: the output must hold the inputs' scalar or float");
  detail::check_matmul_options(options, "xax::batched_matmul");
  const Eigen::Index batch = a.dimension(2);
  if (b.dimension(2) != batch) {
    throw ShapeError("xax::batched_matmul: A is " +
                     detail::shape3_string(a.dimension(0), a.dimension(1), a.dimension(2)) + " but B is " +
                     detail::shape3_string(b.dimension(0), b.dimension(1), b.dimension(2)) +
                     "; both need the same batch size (the last dimension)");
  }
  const Eigen::Index m = options.transpose_a ? a.dimension(1) : a.dimension(0);
  const Eigen::Index k = options.transpose_a ? a.dimension(0) : a.dimension(1);
  const Eigen::Index k_b = options.transpose_b ? b.dimension(1) : b.dimension(0);
  const Eigen::Index n = options.transpose_b ? b.dimension(0) : b.dimension(1);
  if (k != k_b) {
    throw ShapeError("xax::batched_matmul: op(A) slices are " + detail::shape_string(m, k) + " (A is " +
                     detail::shape3_string(a.dimension(0), a.dimension(1), batch) +
                     (options.transpose_a ? ", transposed" : "") + ") but op(B) slices are " +
                     detail::shape_string(k_b, n) + " (B is " +
                     detail::shape3_string(b.dimension(0), b.dimension(1), batch) +
                     (options.transpose_b ? ", transposed" : "") +
                     "); the columns of op(A) must equal the rows of op(B)");
  }
  // The products read the inputs while writing C; decided on C's storage before any resize (which would
  // free storage an aliased input still points to).
  const auto a_range = detail::address_range(a.data(), a.size(), 1, a.size(), sizeof(In));
  const auto b_range = detail::address_range(b.data(), b.size(), 1, b.size(), sizeof(In));
  const auto c_range = detail::address_range(c.data(), c.size(), 1, c.size(), sizeof(Out));
  const auto overlaps_c = [&c_range](std::pair<std::uintptr_t, std::uintptr_t> range) {
    return range.first < c_range.second && c_range.first < range.second;
  };
  if (overlaps_c(a_range) || overlaps_c(b_range)) {
    throw ShapeError(
        "xax::batched_matmul: the output shares memory with an input; write the products into a "
        "separate tensor");
  }
  constexpr bool resizable = requires(CT & t) {
    t.resize(m, n, batch);
  };
  if constexpr (resizable) {
    if (!options.accumulate && (c.dimension(0) != m || c.dimension(1) != n || c.dimension(2) != batch)) {
      c.resize(m, n, batch);
    }
  }
  if (c.dimension(0) != m || c.dimension(1) != n || c.dimension(2) != batch) {
    throw ShapeError("xax::batched_matmul: the output is " +
                     detail::shape3_string(c.dimension(0), c.dimension(1), c.dimension(2)) + " but must be " +
                     detail::shape3_string(m, n, batch) +
                     (options.accumulate ? " (an accumulating output must already have that shape)" : ""));
  }
  const Eigen::Index a_rows = a.dimension(0), a_cols = a.dimension(1);
  const Eigen::Index b_rows = b.dimension(0), b_cols = b.dimension(1);
  const auto* a_data = a.data();
  const auto* b_data = b.data();
  Out* c_data = c.data();
  const auto run_slices = [&](Eigen::Index first, Eigen::Index last) {
    detail::batched_products(a_data + first * a_rows * a_cols, a_rows, a_cols,
                             b_data + first * b_rows * b_cols, b_rows, b_cols, c_data + first * m * n, m, n,
                             k, last - first, options);
  };
  // Attention's slices (head_size x block, e.g. 32 x 64) are far too small for one product to use two
  // threads, so on several threads the slices are shared out instead: each thread runs whole products on
  // its own contiguous range of slices, and a product inside the parallel region runs on its thread alone
  // (the oneDNN backend sees the enclosing region and creates a single-threaded primitive). One fork/join per
  // call instead of none but a serial loop. Slices big enough to use every thread by themselves keep the
  // plain loop.
  const double slice_flops = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  const std::size_t slice_bytes = static_cast<std::size_t>(a_rows * a_cols + b_rows * b_cols) * sizeof(In) +
                                  static_cast<std::size_t>(m * n) * sizeof(Out);
  if (batch < 2 * num_threads() || slice_flops >= detail::batched_slice_parallel_flops) {
    run_slices(0, batch);
    return;
  }
  detail::parallel_blocks_rethrowing(
      static_cast<std::size_t>(batch), slice_bytes, 1, [&](std::size_t begin, std::size_t end) {
        run_slices(static_cast<Eigen::Index>(begin), static_cast<Eigen::Index>(end));
      });
}

}  // namespace xax
