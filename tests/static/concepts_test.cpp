// Compile-time tests of xax's concepts, positive and negative (mp-units' test/static). Building this file is
// the test.
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>
#include <xax/utils/policy.hpp>
#include <xax/utils/tree.hpp>

namespace {

template <class T>
struct Params {
  Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> w;
  XAX_FIELDS(w);
};
struct NotOptedIn {
  Eigen::MatrixXf w;
};

// Scalars
static_assert(xax::floating_scalar<float> && xax::floating_scalar<double>);
static_assert(xax::floating_scalar<xax::bfloat16> && xax::floating_scalar<xax::float16>);
static_assert(!xax::floating_scalar<int> && !xax::floating_scalar<long double> &&
              !xax::floating_scalar<float&>);
static_assert(xax::half_scalar<xax::bfloat16> && !xax::half_scalar<float>);

// Leaves
static_assert(xax::tree_leaf<Eigen::MatrixXf> && xax::tree_leaf<Eigen::Array33d>);
static_assert(xax::tree_leaf<Eigen::Matrix<xax::bfloat16, 4, 1>>);
static_assert(xax::tree_leaf<Eigen::Map<Eigen::MatrixXf>> &&
              xax::tree_leaf<Eigen::Map<const Eigen::VectorXd>>);
static_assert(!xax::tree_leaf<Eigen::Map<Eigen::MatrixXf, 0, Eigen::OuterStride<>>>,
              "strided maps are not leaves");
static_assert(!xax::tree_leaf<Eigen::Block<Eigen::MatrixXf>>, "blocks are views, not contiguous leaves");
static_assert(xax::tree_leaf<Eigen::Tensor<float, 4>> &&
              xax::tree_leaf<Eigen::TensorFixedSize<double, Eigen::Sizes<2>>>);
static_assert(xax::tree_leaf<Eigen::TensorMap<Eigen::Tensor<float, 2>>>);
static_assert(xax::tree_leaf<int> && xax::tree_leaf<float> && xax::tree_leaf<xax::float16>);
static_assert(xax::floating_leaf<Eigen::MatrixXf> && !xax::floating_leaf<Eigen::MatrixXi> &&
              !xax::floating_leaf<int>);
static_assert(std::is_same_v<xax::leaf_scalar_t<Eigen::Tensor<xax::bfloat16, 2>>, xax::bfloat16>);

// Trees
static_assert(xax::tree<std::vector<Eigen::MatrixXf>>);
static_assert(xax::tree<std::map<std::string, std::tuple<float, Eigen::VectorXf>>>);
static_assert(xax::tree<std::array<std::pair<int, Eigen::ArrayXd>, 3>>);
static_assert(xax::tree<Params<float>> && xax::tree<std::vector<Params<xax::bfloat16>>>);
static_assert(xax::reflected_struct<Params<float>> && !xax::reflected_struct<NotOptedIn>);
static_assert(!xax::tree<int*>);
static_assert(!xax::tree<NotOptedIn>);
static_assert(!xax::tree<std::vector<NotOptedIn>>);
static_assert(!xax::tree<std::map<int, Eigen::MatrixXf>>, "map keys must be strings: they become paths");
static_assert(!xax::tree<std::unique_ptr<Eigen::MatrixXf>>);
static_assert(!xax::tree<std::string>);

// Rebinding
static_assert(std::is_same_v<xax::rebind_scalar_t<Params<float>, xax::bfloat16>, Params<xax::bfloat16>>);
static_assert(
    std::is_same_v<xax::rebind_scalar_t<std::vector<Eigen::Matrix3f>, double>, std::vector<Eigen::Matrix3d>>);
static_assert(std::is_same_v<xax::rebind_scalar_t<Eigen::VectorXi, float>, Eigen::VectorXi>);
static_assert(std::is_same_v<xax::rebind_scalar_t<std::tuple<int, float>, double>, std::tuple<int, double>>);

// Policies
static_assert(xax::precision_policy<xax::Policy<float, xax::bfloat16, float>>);
static_assert(!xax::precision_policy<int>);
static_assert(xax::Policy<float, xax::float16>::spec() ==
              xax::PolicySpec{xax::DType::float32, xax::DType::float16, xax::DType::float16});

}  // namespace
