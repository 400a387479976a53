// Compile-time tests of the compute path's concepts (matmul operands, labels, dense tensors, optimizer
// parameter trees), positive and negative (mp-units' test/static). Building this file is the test.
#include <array>
#include <cstdint>
#include <span>
#include <vector>
#include <xax/nn/activation.hpp>
#include <xax/nn/mlp.hpp>
#include <xax/ops/matmul.hpp>
#include <xax/ops/reduce.hpp>
#include <xax/optim/adamw.hpp>
#include <xax/optim/sgd.hpp>

namespace {

template <class T>
using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
using RowMajorMatrixXf = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Scalars matmul multiplies: float and the two 16-bit types, not double or integers.
static_assert(xax::matmul_scalar<float> && xax::matmul_scalar<xax::bfloat16> &&
              xax::matmul_scalar<xax::float16>);
static_assert(!xax::matmul_scalar<double> && !xax::matmul_scalar<int>);

// Operands: anything with direct access and unit inner stride, read in place.
static_assert(xax::matmul_operand<Eigen::MatrixXf>);
static_assert(xax::matmul_operand<Matrix<xax::bfloat16>>);
static_assert(xax::matmul_operand<RowMajorMatrixXf>);
static_assert(xax::matmul_operand<Eigen::VectorXf>);
static_assert(xax::matmul_operand<Eigen::Map<const Eigen::MatrixXf>>);
static_assert(xax::matmul_operand<Eigen::Block<Eigen::MatrixXf>>);
static_assert(xax::matmul_operand<Eigen::Transpose<Eigen::MatrixXf>>);
static_assert(!xax::matmul_operand<Eigen::MatrixXd>, "double is not a matmul scalar");
static_assert(!xax::matmul_operand<Eigen::Map<Eigen::MatrixXf, 0, Eigen::Stride<Eigen::Dynamic, 2>>>,
              "a non-unit inner stride would need a copy");
static_assert(!xax::matmul_operand<decltype(Eigen::MatrixXf() + Eigen::MatrixXf())>,
              "an expression has no storage to read; evaluate it first");
static_assert(!xax::matmul_operand<std::vector<float>> && !xax::matmul_operand<int*>);

// Outputs: writable and column-major.
static_assert(xax::matmul_output<Eigen::MatrixXf> && xax::matmul_output<Eigen::Map<Eigen::MatrixXf>>);
static_assert(xax::matmul_output<Eigen::Block<Eigen::MatrixXf>>);
static_assert(!xax::matmul_output<Eigen::Map<const Eigen::MatrixXf>>, "read-only");
static_assert(!xax::matmul_output<RowMajorMatrixXf>, "row-major outputs are not supported");

// Labels: contiguous std::int32_t ranges and Eigen integer vectors.
static_assert(xax::label_vector<std::vector<std::int32_t>> && xax::label_vector<std::array<std::int32_t, 4>>);
static_assert(xax::label_vector<std::span<const std::int32_t>> && xax::label_vector<Eigen::VectorXi>);
static_assert(!xax::label_vector<std::vector<std::int64_t>> && !xax::label_vector<std::vector<float>>);
static_assert(!xax::label_vector<Eigen::MatrixXi>, "one label per sample: a vector");

// Dense tensors of xax::nn's element-wise layers: contiguous only.
static_assert(xax::nn::dense_tensor<Eigen::MatrixXf> &&
              xax::nn::dense_tensor<Eigen::Map<Matrix<xax::float16>>>);
static_assert(!xax::nn::dense_tensor<Eigen::Block<Eigen::MatrixXf>>, "a block is strided");
static_assert(xax::nn::writable_dense_tensor<Eigen::MatrixXf&>);
static_assert(!xax::nn::writable_dense_tensor<const Eigen::MatrixXf&>);

// Model parameters are trees that cast between scalars.
static_assert(xax::tree<xax::nn::MlpParams<float>> && xax::tree<xax::nn::LinearParams<xax::bfloat16>>);
static_assert(std::is_same_v<xax::rebind_scalar_t<xax::nn::MlpParams<float>, xax::bfloat16>,
                             xax::nn::MlpParams<xax::bfloat16>>);

// Optimizer parameter trees: all-master or all-bf16.
template <class T>
struct Mixed {
  Eigen::MatrixXf w;
  Matrix<xax::bfloat16> b;
  XAX_FIELDS(w, b);
};
static_assert(xax::optim::master_params<xax::nn::MlpParams<float>>);
static_assert(xax::optim::master_params<std::vector<Eigen::VectorXd>>);
static_assert(xax::optim::bf16_params<xax::nn::MlpParams<xax::bfloat16>>);
static_assert(!xax::optim::optimizer_params<xax::nn::MlpParams<xax::float16>>,
              "f16 params need fp32 masters");
static_assert(!xax::optim::optimizer_params<Mixed<float>>, "a tree mixing fp32 and bf16 leaves");
static_assert(
    std::is_same_v<xax::optim::moments_t<xax::nn::MlpParams<xax::bfloat16>>, xax::nn::MlpParams<float>>);
static_assert(
    xax::optim::optimizer_for<xax::optim::AdamW<xax::nn::MlpParams<float>>, xax::nn::MlpParams<float>>);
static_assert(
    xax::optim::optimizer_for<xax::optim::Sgd<xax::nn::MlpParams<float>>, xax::nn::MlpParams<float>>);
static_assert(
    !xax::optim::optimizer_for<xax::optim::Sgd<xax::nn::MlpParams<float>>, xax::nn::MlpParams<double>>);

}  // namespace
