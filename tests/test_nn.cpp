// xax::nn: finite-difference gradient checks in float for Linear, ReLU, GELU, softmax cross-entropy and the
// MLP; the same model under bfloat16 and float16; initialisation; buffer reuse; errors.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif
#include <xax/nn/activation.hpp>
#include <xax/nn/linear.hpp>
#include <xax/nn/loss.hpp>
#include <xax/nn/mlp.hpp>
#include <xax/ops/matmul.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/threads.hpp>
#include <xax/utils/tree.hpp>
#include <xax/utils/tree_cast.hpp>

namespace {

using xax::nn::Matrix;
using xax::nn::Vector;

Eigen::MatrixXf random_matrix(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed, float low = -1.0f,
                              float high = 1.0f) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> uniform(low, high);
  Eigen::MatrixXf m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = uniform(rng);
  return m;
}

/// Central difference of `loss` with respect to every element of `x`, compared with `analytic`.
void expect_gradient(Eigen::Ref<Eigen::MatrixXf> x, const Eigen::MatrixXf& analytic,
                     const std::function<double()>& loss, const char* what, float h = 1e-2f,
                     double tolerance = 2e-3) {
  ASSERT_EQ(x.rows(), analytic.rows()) << what;
  ASSERT_EQ(x.cols(), analytic.cols()) << what;
  for (Eigen::Index j = 0; j < x.cols(); ++j) {
    for (Eigen::Index i = 0; i < x.rows(); ++i) {
      const float saved = x(i, j);
      x(i, j) = saved + h;
      const double up = loss();
      x(i, j) = saved - h;
      const double down = loss();
      x(i, j) = saved;
      const double numeric = (up - down) / (2.0 * h);
      EXPECT_NEAR(analytic(i, j), numeric, tolerance * (1.0 + std::abs(numeric)))
          << what << " element (" << i << ", " << j << ")";
    }
  }
}

/// sum(weights .* y): a loss whose gradient with respect to y is `weights`.
double weighted_sum(const Eigen::MatrixXf& y, const Eigen::MatrixXf& weights) {
  return (y.cast<double>().array() * weights.cast<double>().array()).sum();
}

TEST(Linear, GradientsMatchFiniteDifferences) {
  xax::nn::LinearParams<float> params = xax::nn::linear_init(7, 5, 1);
  Eigen::MatrixXf x = random_matrix(7, 4, 2);
  const Eigen::MatrixXf upstream = random_matrix(5, 4, 3);  // dL/dz
  const auto loss = [&] {
    Eigen::MatrixXf z;
    xax::nn::linear_forward(params, x, z);
    return weighted_sum(z, upstream);
  };
  xax::nn::LinearParams<float> grads;
  xax::nn::linear_backward_params(x, upstream, grads);
  Eigen::MatrixXf dx;
  xax::nn::linear_backward_input(params, upstream, dx);
  expect_gradient(params.w, grads.w, loss, "w");
  expect_gradient(params.b, grads.b, loss, "b");
  expect_gradient(x, dx, loss, "x");

  // Accumulation adds a second batch's gradients.
  xax::nn::LinearParams<float> twice = grads;
  xax::nn::linear_backward_params(x, upstream, twice, /*accumulate=*/true);
  EXPECT_TRUE(twice.w.isApprox(2 * grads.w));
  EXPECT_TRUE(twice.b.isApprox(2 * grads.b));
}

TEST(Linear, FusedActivationEqualsSeparateLayers) {
  const xax::nn::LinearParams<float> params = xax::nn::linear_init(9, 6, 4);
  const Eigen::MatrixXf x = random_matrix(9, 5, 5);
  Eigen::MatrixXf z, relu_fused, relu_separate, gelu_fused, gelu_separate;
  xax::nn::linear_forward(params, x, z);
  xax::nn::linear_forward(params, x, relu_fused, xax::Activation::relu);
  xax::nn::relu(z, relu_separate);
  xax::nn::linear_forward(params, x, gelu_fused, xax::Activation::gelu);
  xax::nn::gelu(z, gelu_separate);
  EXPECT_TRUE(relu_fused.isApprox(relu_separate, 1e-6f));
  EXPECT_LT((gelu_fused - gelu_separate).cwiseAbs().maxCoeff(), 1e-5f);
}

TEST(Activations, ReluGradientMatchesFiniteDifferences) {
  // Keep inputs away from the kink, where the central difference is not the derivative.
  Eigen::MatrixXf x = random_matrix(6, 4, 6).unaryExpr([](float v) { return v < 0 ? v - 0.1f : v + 0.1f; });
  const Eigen::MatrixXf upstream = random_matrix(6, 4, 7);
  const auto loss = [&] {
    Eigen::MatrixXf y;
    xax::nn::relu(x, y);
    return weighted_sum(y, upstream);
  };
  Eigen::MatrixXf y, dx;
  xax::nn::relu(x, y);
  xax::nn::relu_backward(y, upstream, dx);
  expect_gradient(x, dx, loss, "relu");
  EXPECT_EQ((y.array() == 0).count(), (x.array() < 0).count());
}

TEST(Activations, GeluGradientMatchesFiniteDifferences) {
  Eigen::MatrixXf x = random_matrix(6, 4, 8, -3.0f, 3.0f);
  const Eigen::MatrixXf upstream = random_matrix(6, 4, 9);
  const auto loss = [&] {
    Eigen::MatrixXf y;
    xax::nn::gelu(x, y);
    return weighted_sum(y, upstream);
  };
  Eigen::MatrixXf dx;
  xax::nn::gelu_backward(x, upstream, dx);
  expect_gradient(x, dx, loss, "gelu", 1e-2f, 3e-3);
  Eigen::MatrixXf y;
  xax::nn::gelu(x, y);
  for (Eigen::Index i = 0; i < x.size(); ++i) {
    const double v = x.data()[i];
    EXPECT_NEAR(y.data()[i], 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0))), 2e-6);
  }
}

TEST(Activations, ShapeMismatchThrows) {
  Eigen::MatrixXf dx;
  EXPECT_THROW(xax::nn::relu_backward(Eigen::MatrixXf(2, 3), Eigen::MatrixXf(3, 2), dx), xax::ShapeError);
  Eigen::MatrixXf storage(2, 2);
  Eigen::Map<Eigen::MatrixXf> fixed(storage.data(), 2, 2);
  EXPECT_THROW(xax::nn::gelu(Eigen::MatrixXf(3, 3), fixed), xax::ShapeError);
  // A fixed-size output of another shape is a ShapeError, not a resize (an Eigen assertion in debug builds).
  Eigen::Matrix<float, 2, 2> fixed_size;
  EXPECT_THROW(xax::nn::gelu(Eigen::MatrixXf(3, 3), fixed_size), xax::ShapeError);
  Eigen::Matrix<float, 2, 2> fitting;
  xax::nn::relu(Eigen::MatrixXf::Constant(2, 2, -1.0f).eval(), fitting);
  EXPECT_EQ(fitting, (Eigen::Matrix<float, 2, 2>::Zero()));
}

// The layers combine their operands' storage element by element: a row-major operand beside a column-major
// one was silently transposed (relu of a column-major x into a row-major y gave x's elements in the wrong
// places). Vectors and single rows or columns have one order either way and stay accepted.
TEST(Activations, OperandsOfDifferentStorageOrdersAreRefused) {
  using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Eigen::MatrixXf x = random_matrix(2, 3, 21, -1.0f, 1.0f);
  RowMajor y;
  EXPECT_THAT([&] { xax::nn::relu(x, y); },
              ::testing::ThrowsMessage<xax::ShapeError>(::testing::StartsWith(
                  "xax::nn::relu: the output is row-major but the input is column-major")));
  EXPECT_THROW(xax::nn::gelu(x, y), xax::ShapeError);
  const RowMajor dy = RowMajor::Ones(2, 3);
  Eigen::MatrixXf dx;
  EXPECT_THROW(xax::nn::relu_backward(x, dy, dx), xax::ShapeError);
  EXPECT_THROW(xax::nn::gelu_backward(x, dy, dx), xax::ShapeError);
  RowMajor both_row_major;
  xax::nn::relu(RowMajor(x), both_row_major);
  EXPECT_EQ(Eigen::MatrixXf(both_row_major), x.cwiseMax(0.0f));
  Eigen::RowVectorXf row_out;
  xax::nn::relu(Eigen::MatrixXf(x.topRows(1)), row_out);
  EXPECT_EQ(Eigen::MatrixXf(row_out), x.topRows(1).cwiseMax(0.0f));
}

TEST(Loss, CrossEntropyGradientMatchesFiniteDifferences) {
  Eigen::MatrixXf logits = random_matrix(4, 6, 10, -2.0f, 2.0f);
  const std::vector<std::int32_t> labels{0, 3, 2, 1, 1, 3};
  Eigen::MatrixXf dlogits;
  xax::nn::softmax_cross_entropy(logits, labels, dlogits);
  expect_gradient(
      logits, dlogits, [&] { return static_cast<double>(xax::nn::softmax_cross_entropy(logits, labels)); },
      "logits");
}

TEST(Loss, CountCorrect) {
  Eigen::MatrixXf logits(3, 4);
  logits << 1, 0, 0, 5,  //
      2, 0, 3, 5,        //
      0, 1, 0, 1;
  EXPECT_EQ(xax::nn::count_correct(logits, std::vector<std::int32_t>{1, 2, 1, 0}), 4);
  EXPECT_EQ(xax::nn::count_correct(logits, std::vector<std::int32_t>{0, 0, 0, 1}), 0);
}

// A NaN compares false with everything: a NaN first logit stayed "the largest", so a diverged model scored
// the label-0 columns as correct.
TEST(Loss, CountCorrectCountsAColumnWithANanLogitAsWrong) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  Eigen::MatrixXf logits(3, 3);
  logits << nan, 1, 5,  //
      0, nan, 0,        //
      0, 2, 0;
  EXPECT_EQ(xax::nn::count_correct(logits, std::vector<std::int32_t>{0, 2, 0}), 1);
}

// --------------------------------------------------------------------------------------------------------------
// MLP

struct SmallProblem {
  Eigen::MatrixXf x = random_matrix(6, 7, 11);
  std::vector<std::int32_t> labels{0, 1, 2, 0, 1, 2, 2};
};

double mlp_loss(const xax::nn::MlpParams<float>& params, const SmallProblem& problem,
                xax::Activation hidden) {
  xax::nn::MlpWorkspace<float> workspace;
  return xax::nn::softmax_cross_entropy(xax::nn::mlp_forward(params, problem.x, workspace, hidden),
                                        problem.labels);
}

TEST(Mlp, GradientsMatchFiniteDifferences) {
  const SmallProblem problem;
  for (const auto hidden : {xax::Activation::relu, xax::Activation::gelu}) {
    xax::nn::MlpParams<float> params = xax::nn::mlp_init({6, 5, 4, 3}, 12);
    xax::nn::MlpParams<float> grads;
    xax::nn::MlpWorkspace<float> workspace;
    const float loss = xax::nn::mlp_loss_and_gradients(params, problem.x, problem.labels, grads, workspace,
                                                       {.hidden_activation = hidden});
    EXPECT_NEAR(loss, mlp_loss(params, problem, hidden), 1e-6);
    ASSERT_EQ(grads.layers.size(), 3u);
    const auto objective = [&] { return mlp_loss(params, problem, hidden); };
    for (std::size_t i = 0; i < 3; ++i) {
      // ReLU's kinks make a few central differences straddle a corner; 1e-3 keeps the steps small.
      expect_gradient(params.layers[i].w, grads.layers[i].w, objective, "w", 1e-3f, 5e-3);
      expect_gradient(params.layers[i].b, grads.layers[i].b, objective, "b", 1e-3f, 5e-3);
    }
  }
}

TEST(Mlp, LossScaleMultipliesEveryGradientAndAccumulationAdds) {
  const SmallProblem problem;
  const xax::nn::MlpParams<float> params = xax::nn::mlp_init({6, 5, 3}, 13);
  xax::nn::MlpParams<float> plain, scaled;
  xax::nn::MlpWorkspace<float> workspace;
  const float loss = xax::nn::mlp_loss_and_gradients(params, problem.x, problem.labels, plain, workspace);
  const float same_loss = xax::nn::mlp_loss_and_gradients(params, problem.x, problem.labels, scaled,
                                                          workspace, {.loss_scale = 1024.0f});
  EXPECT_EQ(loss, same_loss);  // the returned loss is unscaled
  for (std::size_t i = 0; i < 2; ++i) {
    EXPECT_TRUE(scaled.layers[i].w.isApprox(1024.0f * plain.layers[i].w, 1e-5f));
    EXPECT_TRUE(scaled.layers[i].b.isApprox(1024.0f * plain.layers[i].b, 1e-5f));
  }
  xax::nn::mlp_loss_and_gradients(params, problem.x, problem.labels, plain, workspace, {.accumulate = true});
  EXPECT_TRUE(scaled.layers[0].w.isApprox(512.0f * plain.layers[0].w, 1e-5f));
}

TEST(Mlp, InitIsDeterministicAndBoundedLikePyTorch) {
  const auto a = xax::nn::mlp_init({784, 512, 10}, 5);
  const auto b = xax::nn::mlp_init({784, 512, 10}, 5);
  const auto c = xax::nn::mlp_init({784, 512, 10}, 6);
  EXPECT_EQ(a.layers[0].w, b.layers[0].w);
  EXPECT_EQ(a.layers[1].b, b.layers[1].b);
  EXPECT_NE(a.layers[0].w, c.layers[0].w);
  ASSERT_EQ(a.layers[0].w.rows(), 512);
  ASSERT_EQ(a.layers[0].w.cols(), 784);
  const float bound = 1.0f / std::sqrt(784.0f);
  EXPECT_LE(a.layers[0].w.cwiseAbs().maxCoeff(), bound);
  EXPECT_GT(a.layers[0].w.cwiseAbs().maxCoeff(), 0.99f * bound);
  EXPECT_NEAR(a.layers[0].w.mean(), 0.0f, 1e-3f);
  // U(-k, k) has variance k^2 / 3.
  EXPECT_NEAR(a.layers[0].w.array().square().mean(), bound * bound / 3.0f, 0.02f * bound * bound);
  EXPECT_EQ(xax::leaf_paths(a),
            (std::vector<std::string>{"layers[0].w", "layers[0].b", "layers[1].w", "layers[1].b"}));
}

/// The MLP's loss and parameter gradients computed in double, written independently of xax::nn from the
/// definitions: z = w h + b, h = act(z) between layers, loss = mean over samples of logsumexp(z) - z[label].
struct DoubleReference {
  double loss = 0;
  std::vector<Eigen::MatrixXd> w_grads, b_grads;
  Eigen::MatrixXd logits;
};

DoubleReference double_reference(const xax::nn::MlpParams<float>& params, const Eigen::MatrixXd& x,
                                 const std::vector<std::int32_t>& labels, xax::Activation hidden) {
  const std::size_t layers = params.layers.size();
  const auto act = [hidden](double z) {
    return hidden == xax::Activation::relu ? std::max(z, 0.0)
                                           : 0.5 * z * (1.0 + std::erf(z / std::sqrt(2.0)));
  };
  const auto act_derivative = [hidden](double z) {
    if (hidden == xax::Activation::relu) return z > 0 ? 1.0 : 0.0;
    const double pi = 3.14159265358979323846;
    return 0.5 * (1.0 + std::erf(z / std::sqrt(2.0))) + z * std::exp(-0.5 * z * z) / std::sqrt(2.0 * pi);
  };
  std::vector<Eigen::MatrixXd> inputs{x}, pre_activations;
  for (std::size_t i = 0; i < layers; ++i) {
    const Eigen::MatrixXd w = params.layers[i].w.template cast<double>();
    const Eigen::VectorXd b = params.layers[i].b.template cast<double>();
    Eigen::MatrixXd z = w * inputs.back();
    z.colwise() += b;
    pre_activations.push_back(z);
    if (i + 1 < layers) inputs.push_back(z.unaryExpr(act));
  }
  DoubleReference out;
  out.logits = pre_activations.back();
  const auto batch = static_cast<double>(x.cols());
  Eigen::MatrixXd dz(out.logits.rows(), out.logits.cols());
  for (Eigen::Index j = 0; j < out.logits.cols(); ++j) {
    const double max = out.logits.col(j).maxCoeff();
    const Eigen::ArrayXd e = (out.logits.col(j).array() - max).exp();
    const auto label = static_cast<Eigen::Index>(labels[static_cast<std::size_t>(j)]);
    out.loss += (max + std::log(e.sum()) - out.logits(label, j)) / batch;
    dz.col(j) = e / e.sum() / batch;
    dz(label, j) -= 1.0 / batch;
  }
  out.w_grads.resize(layers);
  out.b_grads.resize(layers);
  for (std::size_t i = layers; i-- > 0;) {
    out.w_grads[i] = dz * inputs[i].transpose();
    out.b_grads[i] = dz.rowwise().sum();
    if (i > 0) {
      const Eigen::MatrixXd dh = params.layers[i].w.template cast<double>().transpose() * dz;
      dz = dh.cwiseProduct(pre_activations[i - 1].unaryExpr(act_derivative));
    }
  }
  return out;
}

/// How far a compute type may move the loss and the gradients from the exact (double) values, relative. For
/// float, fp32 rounding over sums of a few dozen terms (measured <= 4e-7): 1e-5 fails if anything on the path
/// is rounded to a 16-bit type (bfloat16 has a relative precision of 2^-9, float16 of 2^-12). For the 16-bit
/// types, their roundings of the activations and of the gradient passed down (measured <= 1.0e-2 for
/// bfloat16, <= 1.0e-3 for float16).
template <class T>
constexpr double relative_tolerance = std::is_same_v<T, float>           ? 1e-5
                                      : std::is_same_v<T, xax::bfloat16> ? 2.5e-2
                                                                         : 3e-3;

template <class T>
class MlpTyped : public ::testing::Test {};
using Scalars = ::testing::Types<float, xax::bfloat16, xax::float16>;
TYPED_TEST_SUITE(MlpTyped, Scalars);

TYPED_TEST(MlpTyped, OneModelDefinitionMatchesTheDoubleReferenceToThePrecisionOfItsComputeType) {
  using T = TypeParam;
  const double tolerance = relative_tolerance<T>;
  // The parameters and inputs as T holds them, so that the reference sees the same model: the error measured
  // is the computation's, not the initial rounding's.
  const auto params = xax::tree_cast<T>(xax::nn::mlp_init({64, 32, 32, 10}, 14));
  const auto params_as_float = xax::tree_cast<float>(params);
  const Eigen::MatrixXf x =
      random_matrix(64, 48, 15).unaryExpr([](float v) { return static_cast<float>(T(v)); });
  std::vector<std::int32_t> labels(48);
  for (std::size_t j = 0; j < labels.size(); ++j) labels[j] = static_cast<std::int32_t>(j % 10);

  for (const auto hidden : {xax::Activation::relu, xax::Activation::gelu}) {
    SCOPED_TRACE(hidden == xax::Activation::relu ? "relu" : "gelu");
    const DoubleReference reference = double_reference(params_as_float, x.cast<double>(), labels, hidden);
    xax::nn::MlpParams<T> grads;
    xax::nn::MlpWorkspace<T> workspace;
    const float loss = xax::nn::mlp_loss_and_gradients(params, x, labels, grads, workspace,
                                                       {.loss_scale = 256.0f, .hidden_activation = hidden});
    EXPECT_NEAR(loss, reference.loss, tolerance * reference.loss);
    const auto grads32 = xax::tree_cast<float>(grads);
    for (std::size_t i = 0; i < 3; ++i) {
      // A 16-bit pre-activation within its rounding of zero can land on the other side of ReLU's kink: the
      // forward pass is continuous there, but the derivative jumps from 0 to 1, and the handful of such
      // entries moves the gradients below the last layer by 3-6 % under bfloat16. GELU covers those layers.
      if (hidden == xax::Activation::relu && !std::is_same_v<T, float> && i + 1 < 3) continue;
      const Eigen::MatrixXd w_expected = 256.0 * reference.w_grads[i];
      const Eigen::MatrixXd b_expected = 256.0 * reference.b_grads[i];
      EXPECT_LT((grads32.layers[i].w.template cast<double>() - w_expected).norm(),
                tolerance * w_expected.norm())
          << "layer " << i;
      EXPECT_LT((grads32.layers[i].b.template cast<double>() - b_expected).norm(),
                tolerance * b_expected.norm())
          << "layer " << i;
    }
    const Eigen::MatrixXd logits = workspace.logits().template cast<float>().template cast<double>();
    EXPECT_LT((logits - reference.logits).norm(), tolerance * reference.logits.norm());
  }
}

TYPED_TEST(MlpTyped, Fp32GradientsOfHalfParamsAreTheUnroundedAccumulators) {
  using T = TypeParam;
  const auto params = xax::tree_cast<T>(xax::nn::mlp_init({32, 16, 10}, 19));
  const Eigen::MatrixXf x = random_matrix(32, 20, 20);
  std::vector<std::int32_t> labels(20);
  for (std::size_t j = 0; j < labels.size(); ++j) labels[j] = static_cast<std::int32_t>(j % 10);
  xax::nn::MlpParams<T> half_grads;
  xax::nn::MlpParams<float> float_grads;
  xax::nn::MlpWorkspace<T> workspace;
  const float loss =
      xax::nn::mlp_loss_and_gradients(params, x, labels, half_grads, workspace, {.loss_scale = 64.0f});
  EXPECT_EQ(xax::nn::mlp_loss_and_gradients(params, x, labels, float_grads, workspace, {.loss_scale = 64.0f}),
            loss);
  // The same fp32 sums, once rounded to T and once not: they differ by at most half an ulp of T.
  const double half_ulp =
      std::is_same_v<T, float> ? 0.0 : (std::is_same_v<T, xax::bfloat16> ? 0x1p-8 : 0x1p-11);
  for (std::size_t i = 0; i < 2; ++i) {
    const Eigen::MatrixXf rounded = xax::tree_cast<float>(half_grads).layers[i].w;
    const Eigen::MatrixXf exact = float_grads.layers[i].w;
    for (Eigen::Index k = 0; k < exact.size(); ++k) {
      EXPECT_NEAR(rounded.data()[k], exact.data()[k], half_ulp * std::abs(exact.data()[k]) + 1e-30)
          << "layer " << i << " element " << k;
    }
  }
}

TYPED_TEST(MlpTyped, RepeatedStepsReuseEveryBuffer) {
  using T = TypeParam;
  const auto params = xax::tree_cast<T>(xax::nn::mlp_init({16, 8, 4}, 16));
  const Eigen::MatrixXf x = random_matrix(16, 12, 17);
  const std::vector<std::int32_t> labels(12, 1);
  xax::nn::MlpParams<T> grads;
  xax::nn::MlpWorkspace<T> workspace;
  xax::nn::mlp_loss_and_gradients(params, x, labels, grads, workspace);
  const auto* w_grad = grads.layers[0].w.data();
  const auto* hidden = workspace.outputs[0].data();
  const auto* logits = workspace.logits().data();
  for (int i = 0; i < 3; ++i) xax::nn::mlp_loss_and_gradients(params, x, labels, grads, workspace);
  EXPECT_EQ(grads.layers[0].w.data(), w_grad);
  EXPECT_EQ(workspace.outputs[0].data(), hidden);
  EXPECT_EQ(workspace.logits().data(), logits);
}

// Where this CPU widens T's products to fp32 panels, the backward runs a layer's two products one after the
// other: run side by side, the second thread held its own panels too (the float16 policy's peak memory on two
// threads, issue 12). Read per thread from OpenMP's pool, whose threads persist between parallel regions.
template <class T>
class MlpWidened : public ::testing::Test {};
using HalfScalars = ::testing::Types<xax::bfloat16, xax::float16>;
TYPED_TEST_SUITE(MlpWidened, HalfScalars);

TYPED_TEST(MlpWidened, OnTwoThreadsOnlyOneThreadHoldsWideningPanels) {
#if !defined(_OPENMP)
  GTEST_SKIP() << "built without OpenMP: one thread";
#else
  using T = TypeParam;
  if (!xax::detail::widens_products<T>()) GTEST_SKIP() << "this CPU multiplies these natively: no panels";
  const int threads_before = xax::num_threads();
  xax::set_num_threads(2);
  std::size_t panel_bytes[2] = {0, 0};
  int team = 0;
  const auto read_panels = [&] {
#pragma omp parallel num_threads(2)
    {
      team = omp_get_num_threads();
      panel_bytes[omp_get_thread_num()] =
          xax::detail::widening::workspace().bytes() + xax::detail::packing_gemm::workspace().bytes();
    }
  };
#pragma omp parallel num_threads(2)
  xax::release_matmul_scratch();
  const auto params = xax::tree_cast<T>(xax::nn::mlp_init({64, 48, 32, 10}, 21));
  const Eigen::MatrixXf x = random_matrix(64, 40, 22);
  std::vector<std::int32_t> labels(40);
  for (std::size_t j = 0; j < labels.size(); ++j) labels[j] = static_cast<std::int32_t>(j % 10);
  xax::nn::MlpParams<float> grads;
  xax::nn::MlpWorkspace<T> workspace;
  xax::nn::mlp_loss_and_gradients(params, x, labels, grads, workspace);
  read_panels();
  xax::set_num_threads(threads_before);
  if (team != 2) GTEST_SKIP() << "the OpenMP runtime granted one thread";
  EXPECT_GT(panel_bytes[0], 0u) << "the products were widened on the calling thread";
  EXPECT_EQ(panel_bytes[1], 0u) << "the other thread widened a product beside it";
#pragma omp parallel num_threads(2)
  xax::release_matmul_scratch();
#endif
}

TEST(Mlp, BadInputsThrow) {
  const auto params = xax::nn::mlp_init({6, 5, 3}, 18);
  xax::nn::MlpParams<float> grads;
  xax::nn::MlpWorkspace<float> workspace;
  const std::vector<std::int32_t> labels{0, 1};
  try {
    xax::nn::mlp_loss_and_gradients(params, Eigen::MatrixXf(5, 2), labels, grads, workspace);
    FAIL() << "no exception";
  } catch (const xax::ShapeError& error) {
    EXPECT_THAT(error.what(), ::testing::HasSubstr("takes 6 features"));
    EXPECT_THAT(error.what(), ::testing::HasSubstr("5x2"));
  }
  EXPECT_THROW(
      xax::nn::mlp_loss_and_gradients(params, Eigen::MatrixXf::Zero(6, 3).eval(), labels, grads, workspace),
      xax::ShapeError);
  EXPECT_THROW(xax::nn::mlp_loss_and_gradients(params, Eigen::MatrixXf::Zero(6, 2).eval(), labels, grads,
                                               workspace, {.loss_scale = 0.0f}),
               xax::ConfigError);
  EXPECT_THROW(xax::nn::mlp_init({6}, 1), xax::ConfigError);
  EXPECT_THROW(xax::nn::mlp_init({6, 0, 3}, 1), xax::ConfigError);
  xax::nn::MlpParams<float> wrong_grads;
  EXPECT_THROW(xax::nn::mlp_loss_and_gradients(params, Eigen::MatrixXf::Zero(6, 2).eval(), labels,
                                               wrong_grads, workspace, {.accumulate = true}),
               xax::ShapeError);
}

// Inputs stored in the workspace (the logits of an earlier forward) were freed by the workspace's resize or
// overwritten by the forward (ASan: heap-use-after-free), and gradients written into the params themselves
// were computed from weights already overwritten.
// Accumulating into gradients of another model is refused before anything is added: the backward runs from
// the last layer, which was accumulated before a lower layer's mismatch was found, leaving the sums of
// earlier micro-batches half-updated.
TEST(Mlp, RefusedAccumulationLeavesTheGradientsAsTheyWere) {
  const auto params = xax::nn::mlp_init({6, 5, 3}, 1);
  auto grads = xax::nn::mlp_init({7, 5, 3}, 2);  // the first layer 5x7, not 5x6
  const auto before = grads;
  xax::nn::MlpWorkspace<float> workspace;
  const std::vector<std::int32_t> labels{0, 1};
  EXPECT_THAT(
      [&] {
        xax::nn::mlp_loss_and_gradients(params, Eigen::MatrixXf::Ones(6, 2).eval(), labels, grads, workspace,
                                        {.accumulate = true});
      },
      ::testing::ThrowsMessage<xax::ShapeError>(::testing::HasSubstr(
          "accumulating into layer 0's gradients of w 5x7 and b of 5 elements, but its params are w 5x6")));
  for (std::size_t i = 0; i < grads.layers.size(); ++i) {
    EXPECT_EQ(grads.layers[i].w, before.layers[i].w) << "layer " << i;
    EXPECT_EQ(grads.layers[i].b, before.layers[i].b) << "layer " << i;
  }
  xax::nn::LinearParams<float> layer{Eigen::MatrixXf::Zero(3, 4), Eigen::VectorXf::Zero(2)};
  EXPECT_THROW(
      xax::nn::linear_backward_params(Eigen::MatrixXf::Ones(4, 2).eval(), Eigen::MatrixXf::Ones(3, 2).eval(),
                                      layer, /*accumulate=*/true),
      xax::ShapeError);
  EXPECT_TRUE(layer.w.isZero()) << "w was accumulated before b's mismatch was found";
}

TEST(Mlp, InputsInTheWorkspaceAndGradsThatAreTheParamsAreRefused) {
  const auto wide = xax::nn::mlp_init({4, 3}, 18);
  const auto deep = xax::nn::mlp_init({3, 5, 5, 2}, 19);
  xax::nn::MlpWorkspace<float> workspace;
  xax::nn::MlpParams<float> grads;
  const std::vector<std::int32_t> labels{0, 1};
  const Eigen::MatrixXf& logits = xax::nn::mlp_forward(wide, Eigen::MatrixXf::Ones(4, 2).eval(), workspace);
  EXPECT_THAT(
      [&] { xax::nn::mlp_loss_and_gradients(deep, logits, labels, grads, workspace); },
      ::testing::ThrowsMessage<xax::ShapeError>(::testing::HasSubstr("share memory with the workspace")));
  EXPECT_THROW(xax::nn::mlp_forward(deep, logits, workspace), xax::ShapeError);
  xax::nn::MlpWorkspace<float> other;
  const Eigen::MatrixXf copied = logits;
  EXPECT_NO_THROW(xax::nn::mlp_loss_and_gradients(deep, logits, labels, grads, other));
  EXPECT_NO_THROW(xax::nn::mlp_loss_and_gradients(deep, copied, labels, grads, workspace));

  auto params = xax::nn::mlp_init({6, 5, 3}, 20);
  EXPECT_THAT(
      [&] {
        xax::nn::mlp_loss_and_gradients(params, Eigen::MatrixXf::Ones(6, 2).eval(), labels, params,
                                        workspace);
      },
      ::testing::ThrowsMessage<xax::ShapeError>(::testing::HasSubstr("grads is the params themselves")));
}

}  // namespace
