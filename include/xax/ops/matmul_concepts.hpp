#pragma once
/// \file
/// The element types and Eigen objects xax::matmul accepts, apart from matmul itself: the reductions, losses
/// and activations take the same operands, and naming them must not pull in the GEMM backends (oneDNN).

#include <xax/detail/eigen.hpp>

#include <concepts>
#include <xax/utils/dtype.hpp>

namespace xax {

/// An element type matmul multiplies: float, xax::bfloat16 or xax::float16.
template <class T>
concept matmul_scalar = std::same_as<T, float> || half_scalar<T>;

/// An Eigen dense object matmul can read in place: a matmul_scalar, direct access, unit inner stride.
template <class M>
concept matmul_operand = requires {
  typename M::PlainObject;
  typename M::Scalar;
}
&&std::derived_from<M, Eigen::DenseBase<M>>&& matmul_scalar<typename M::Scalar> &&
    (static_cast<unsigned>(M::Flags) & Eigen::DirectAccessBit) != 0 && M::InnerStrideAtCompileTime == 1;

/// A matmul_operand matmul can write: an lvalue (not a const Map), column-major.
template <class M>
concept matmul_output = matmul_operand<M> &&(static_cast<unsigned>(M::Flags) & Eigen::LvalueBit) != 0 &&
                        !M::IsRowMajor;

}  // namespace xax
