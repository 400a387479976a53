#pragma once
// The type-erased matmul every backend receives: xax::matmul checks shapes and scalar types, reduces
// row-major operands and transposed views to column-major storage plus a transposition flag, and hands this
// over. Keeping the backends free of Eigen expression types means each is compiled once per scalar
// combination, not once per caller's operand types.

#include <xax/detail/eigen.hpp>

#include <string>
#include <xax/ops/activation.hpp>
#include <xax/utils/dtype.hpp>

namespace xax::detail {

/// A matrix as stored: column-major, unit inner stride, element (i, j) at `data[i + j * ld]`, ld >= rows.
struct MatmulOperand {
  const void* data = nullptr;
  Eigen::Index rows = 0;
  Eigen::Index cols = 0;
  Eigen::Index ld = 0;
};

/// C = act(op(A) op(B) + bias [+ C]) with op(X) = X or its transpose; op(A) is m x k, op(B) k x n, C m x n.
/// A and B share the scalar `input`; C holds `output` (float or `input`), the bias (length m, broadcast
/// along each column) `bias_type`. Accumulation is in fp32 and C is rounded once.
struct MatmulProblem {
  DType input = DType::float32;
  DType output = DType::float32;
  MatmulOperand a;
  MatmulOperand b;
  bool transpose_a = false;
  bool transpose_b = false;
  void* c = nullptr;
  Eigen::Index ldc = 0;
  const void* bias = nullptr;  ///< nullptr: no bias
  DType bias_type = DType::float32;
  Eigen::Index m = 0;
  Eigen::Index n = 0;
  Eigen::Index k = 0;
  bool accumulate = false;  ///< beta = 1: the old C is added before the activation
  Activation activation = Activation::none;
  /// A batch of `batch` such products (xax::batched_matmul): product i reads A at `a.data + i *
  /// a_batch_stride` elements, B likewise, and writes C at `c + i * c_batch_stride`. Only the oneDNN
  /// backend's try_run takes batch > 1 (as one 3-D primitive); every other backend sees batch == 1.
  Eigen::Index batch = 1;
  Eigen::Index a_batch_stride = 0;
  Eigen::Index b_batch_stride = 0;
  Eigen::Index c_batch_stride = 0;
};

/// The calling thread's record of which backend and kernel ran its last matmul.
inline std::string& last_matmul_implementation_record() {
  thread_local std::string record;
  return record;
}

}  // namespace xax::detail
