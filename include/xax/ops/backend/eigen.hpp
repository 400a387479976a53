#pragma once
// The portable matmul backend, always built: Eigen's float GEMM (which accumulates in fp32 and follows xax's
// thread count through Eigen::setNbThreads), then the bias and activation in one pass. Half-precision inputs
// are widened to float panel by panel (ops/backend/widening.hpp) and multiplied by the same float GEMM, so
// the scratch stays bounded whatever the operands' size, and the result is rounded once.
//
// Eigen's own GEMM on Matrix<bfloat16> is the trap this avoids: 13 GFLOP/s instead of 83, and a bf16
// accumulator that is 3.6e-2 off at K=1024 (PERFORMANCE.md). Widening costs one memory-speed pass over each
// operand (3.4 % of a 1024^3 product), so this path stays within a few percent of Eigen's float GEMM.

#include <xax/detail/eigen.hpp>

#include <cstddef>
#include <string>
#include <xax/detail/parallel.hpp>
#include <xax/ops/activation.hpp>
#include <xax/ops/backend/problem.hpp>
#include <xax/ops/backend/widening.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>

namespace xax::detail::eigen_backend {

using FloatMatrixMap = Eigen::Map<Eigen::MatrixXf, Eigen::Unaligned, Eigen::OuterStride<>>;
using ConstFloatMatrixMap = Eigen::Map<const Eigen::MatrixXf, Eigen::Unaligned, Eigen::OuterStride<>>;

/// c = op(a) op(b), or c += op(a) op(b), in float.
inline void float_gemm(const ConstFloatMatrixMap& a, bool transpose_a, const ConstFloatMatrixMap& b,
                       bool transpose_b, FloatMatrixMap& c, bool accumulate) {
  const auto product = [&](const auto& lhs, const auto& rhs) {
    if (accumulate) {
      c.noalias() += lhs * rhs;
    } else {
      c.noalias() = lhs * rhs;
    }
  };
  if (!transpose_a && !transpose_b) {
    product(a, b);
  } else if (transpose_a && !transpose_b) {
    product(a.transpose(), b);
  } else if (!transpose_a && transpose_b) {
    product(a, b.transpose());
  } else {
    product(a.transpose(), b.transpose());
  }
}

/// A float32 problem (float output, float32 bias) on Eigen's GEMM, then bias and activation in one pass.
inline void run_float(const MatmulProblem& p) {
  if (p.output != DType::float32 || (p.bias != nullptr && p.bias_type != DType::float32)) {
    throw Error("xax::matmul: float32 inputs take a float32 output and bias, not " +
                std::string(dtype_name(p.output)) + " and " + std::string(dtype_name(p.bias_type)));
  }
  const ConstFloatMatrixMap a(static_cast<const float*>(p.a.data), p.a.rows, p.a.cols,
                              Eigen::OuterStride<>(p.a.ld));
  const ConstFloatMatrixMap b(static_cast<const float*>(p.b.data), p.b.rows, p.b.cols,
                              Eigen::OuterStride<>(p.b.ld));
  float* const c_data = static_cast<float*>(p.c);
  FloatMatrixMap c(c_data, p.m, p.n, Eigen::OuterStride<>(p.ldc));
  float_gemm(a, p.transpose_a, b, p.transpose_b, c, p.accumulate);
  last_matmul_implementation_record() = "eigen:sgemm";

  const auto* bias = static_cast<const float*>(p.bias);
  if (bias == nullptr && p.activation == Activation::none) return;
  const Eigen::Index m = p.m;
  const Eigen::Index ldc = p.ldc;
  const Activation activation = p.activation;
  const auto columns = static_cast<std::size_t>(p.n);
  const std::size_t bytes_per_column = static_cast<std::size_t>(m) * 2 * sizeof(float);
  parallel_blocks(columns, bytes_per_column, 1, [=](std::size_t begin, std::size_t end) noexcept {
    for (auto j = static_cast<Eigen::Index>(begin); j < static_cast<Eigen::Index>(end); ++j) {
      float* column = c_data + j * ldc;
      if (bias != nullptr) {
        for (Eigen::Index i = 0; i < m; ++i) column[i] += bias[i];
      }
      activation_block(activation, column, column, static_cast<std::size_t>(m));
    }
  });
}

/// Runs `p` on the calling thread's Eigen GEMM (multi-threaded per Eigen::nbThreads()); half inputs are
/// widened in panels.
inline void run(const MatmulProblem& p) {
  if (p.input == DType::float32) {
    run_float(p);
    return;
  }
  widening::run(p, [](const MatmulProblem& panel) { run_float(panel); });
}

}  // namespace xax::detail::eigen_backend
