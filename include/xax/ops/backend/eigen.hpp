#pragma once
// The portable matmul backend, always built: widen half-precision operands to float, run Eigen's float GEMM
// (which accumulates in fp32 and follows xax's thread count through Eigen::setNbThreads), then apply the
// bias and activation and round to the output type in one pass.
//
// Eigen's own GEMM on Matrix<bfloat16> is the trap this avoids: 13 GFLOP/s instead of 83, and a bf16
// accumulator that is 3.6e-2 off at K=1024 (PERFORMANCE.md). Widening costs one pass over each operand
// (3.4 % of a 1024^3 product), so this path stays within a few percent of Eigen's float GEMM. The operands
// are widened whole rather than in K panels: Eigen packs its own panels anyway, and one GEMM call per
// product keeps its blocking and threading intact.

#include <xax/detail/eigen.hpp>

#include <cstddef>
#include <string>
#include <type_traits>
#include <xax/detail/convert.hpp>
#include <xax/detail/parallel.hpp>
#include <xax/detail/scratch.hpp>
#include <xax/ops/activation.hpp>
#include <xax/ops/backend/problem.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>

namespace xax::detail::eigen_backend {

using FloatMatrixMap = Eigen::Map<Eigen::MatrixXf, Eigen::Unaligned, Eigen::OuterStride<>>;
using ConstFloatMatrixMap = Eigen::Map<const Eigen::MatrixXf, Eigen::Unaligned, Eigen::OuterStride<>>;

/// Per-thread widened copies and the batch that fills them, reused from call to call.
struct Workspace {
  ScratchBuffer<float> a;
  ScratchBuffer<float> b;
  ScratchBuffer<float> c;
  ScratchBuffer<float> bias;
  ConversionBatch widening;
};

inline Workspace& workspace() {
  thread_local Workspace instance;
  return instance;
}

inline std::size_t element_count(Eigen::Index rows, Eigen::Index cols) {
  return static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols);
}

/// Records the copy of a stored matrix into a dense column-major float array (ld = rows) in `batch`. The
/// operands of one product are widened in one batch: one fork/join instead of one per operand. (This does
/// not close the gap at small n: at n = 256 on two threads the widening itself, about 30 us, is still
/// 15-20 % of Eigen's float GEMM; only packing bf16 straight into Eigen's GEMM panels would remove it.)
template <class In>
void widen_into(const In* in, Eigen::Index rows, Eigen::Index cols, Eigen::Index ld, float* out,
                ConversionBatch& batch) {
  if (ld == rows) {
    batch.add(in, out, element_count(rows, cols));
    return;
  }
  for (Eigen::Index j = 0; j < cols; ++j)
    batch.add(in + j * ld, out + j * rows, static_cast<std::size_t>(rows));
}

/// The operand as a float matrix: itself when it is float, else a copy in `scratch` that `batch` widens.
template <class In>
ConstFloatMatrixMap as_float(const MatmulOperand& x, ScratchBuffer<float>& scratch, ConversionBatch& batch) {
  if constexpr (std::is_same_v<In, float>) {
    return {static_cast<const float*>(x.data), x.rows, x.cols, Eigen::OuterStride<>(x.ld)};
  } else {
    float* out = scratch.get(element_count(x.rows, x.cols));
    widen_into(static_cast<const In*>(x.data), x.rows, x.cols, x.ld, out, batch);
    return {out, x.rows, x.cols, Eigen::OuterStride<>(x.rows)};
  }
}

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

inline const float* widened_bias(const MatmulProblem& p, ScratchBuffer<float>& scratch) {
  const auto m = static_cast<std::size_t>(p.m);
  switch (p.bias_type) {
    case DType::float32:
      return static_cast<const float*>(p.bias);
    case DType::bfloat16:
      convert_n(static_cast<const bfloat16*>(p.bias), scratch.get(m), m);
      return scratch.get(m);
    case DType::float16:
      convert_n(static_cast<const float16*>(p.bias), scratch.get(m), m);
      return scratch.get(m);
    case DType::float64:
      break;
  }
  throw Error("xax::matmul: a bias of type " + std::string(dtype_name(p.bias_type)) +
              " is not supported; use float or the inputs' type");
}

template <class In, class Out>
void run_typed(const MatmulProblem& p) {
  Workspace& ws = workspace();
  ws.widening.clear();
  const ConstFloatMatrixMap a = as_float<In>(p.a, ws.a, ws.widening);
  const ConstFloatMatrixMap b = as_float<In>(p.b, ws.b, ws.widening);
  Out* const c_out = static_cast<Out*>(p.c);

  // fp32 accumulation target: C itself when it is float, else a float copy rounded once at the end.
  float* c_data = nullptr;
  Eigen::Index c_ld = 0;
  if constexpr (std::is_same_v<Out, float>) {
    c_data = c_out;
    c_ld = p.ldc;
  } else {
    c_data = ws.c.get(element_count(p.m, p.n));
    c_ld = p.m;
    if (p.accumulate) widen_into(static_cast<const Out*>(c_out), p.m, p.n, p.ldc, c_data, ws.widening);
  }
  ws.widening.run();
  FloatMatrixMap c(c_data, p.m, p.n, Eigen::OuterStride<>(c_ld));
  float_gemm(a, p.transpose_a, b, p.transpose_b, c, p.accumulate);

  const float* bias = p.bias != nullptr ? widened_bias(p, ws.bias) : nullptr;
  if (bias == nullptr && p.activation == Activation::none && std::is_same_v<Out, float>) return;
  const Eigen::Index m = p.m;
  const Eigen::Index ldc = p.ldc;
  const Activation activation = p.activation;
  const auto columns = static_cast<std::size_t>(p.n);
  const std::size_t bytes_per_column = static_cast<std::size_t>(m) * (sizeof(float) + sizeof(Out));
  parallel_blocks(columns, bytes_per_column, 1, [=](std::size_t begin, std::size_t end) noexcept {
    for (auto j = static_cast<Eigen::Index>(begin); j < static_cast<Eigen::Index>(end); ++j) {
      float* column = c_data + j * c_ld;
      if (bias != nullptr) {
        for (Eigen::Index i = 0; i < m; ++i) column[i] += bias[i];
      }
      activation_block(activation, column, column, static_cast<std::size_t>(m));
      if constexpr (!std::is_same_v<Out, float>) {
        convert_serial(static_cast<const float*>(column), c_out + j * ldc, static_cast<std::size_t>(m));
      }
    }
  });
}

/// Runs `p` on the calling thread's Eigen GEMM (multi-threaded per Eigen::nbThreads()).
inline void run(const MatmulProblem& p) {
  std::string& record = last_matmul_implementation_record();
  switch (p.input) {
    case DType::float32:
      if (p.output == DType::float32) {
        run_typed<float, float>(p);
        record = "eigen:sgemm";
        return;
      }
      break;
    case DType::bfloat16:
      if (p.output == DType::bfloat16) {
        run_typed<bfloat16, bfloat16>(p);
      } else if (p.output == DType::float32) {
        run_typed<bfloat16, float>(p);
      } else {
        break;
      }
      record = "eigen:sgemm (bfloat16 widened to float32)";
      return;
    case DType::float16:
      if (p.output == DType::float16) {
        run_typed<float16, float16>(p);
      } else if (p.output == DType::float32) {
        run_typed<float16, float>(p);
      } else {
        break;
      }
      record = "eigen:sgemm (float16 widened to float32)";
      return;
    case DType::float64:
      break;
  }
  throw Error("xax::matmul: inputs of type " + std::string(dtype_name(p.input)) + " with an output of type " +
              std::string(dtype_name(p.output)) +
              " are not supported; the output must be float32 or the inputs' type");
}

}  // namespace xax::detail::eigen_backend
