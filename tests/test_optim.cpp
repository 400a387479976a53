// xax::optim::AdamW and Sgd: trajectories against torch.optim (values computed with PyTorch 1.13.1) and
// against a double-precision transcription of PyTorch's update rules; option validation; the pure-bf16 update
// with stochastic rounding (unbiased over many steps) and Kahan compensation.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <vector>
#include <xax/optim/adamw.hpp>
#include <xax/optim/sgd.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/threads.hpp>
#include <xax/utils/tree.hpp>
#include <xax/utils/tree_cast.hpp>

namespace {

template <class T>
struct Params {
  Eigen::Matrix<T, Eigen::Dynamic, 1> head;  // the first 2 elements
  Eigen::Matrix<T, Eigen::Dynamic, 1> tail;  // the last 3
  XAX_FIELDS(head, tail);
};

using Params32 = Params<float>;

static_assert(xax::optim::master_params<Params32>);
static_assert(xax::optim::master_params<Params<double>>);
static_assert(xax::optim::bf16_params<Params<xax::bfloat16>>);
static_assert(!xax::optim::optimizer_params<Params<xax::float16>>);
static_assert(!xax::optim::optimizer_params<int*>);
static_assert(xax::optim::optimizer_for<xax::optim::AdamW<Params32>, Params32>);
static_assert(xax::optim::optimizer_for<xax::optim::Sgd<Params32>, Params32>);
static_assert(xax::optim::optimizer_for<xax::optim::AdamW<Params<xax::bfloat16>>, Params<xax::bfloat16>>);
static_assert(!xax::optim::optimizer_for<xax::optim::AdamW<Params32>, Params<double>>);
static_assert(xax::tree<xax::optim::AdamW<Params32>::State>);
static_assert(xax::tree<xax::optim::Sgd<Params<xax::bfloat16>>::State>);
static_assert(std::is_same_v<decltype(xax::optim::AdamW<Params<xax::bfloat16>>::State::m), Params<float>>);

constexpr std::array<double, 5> initial{0.5, -1.0, 2.0, 0.25, -3.0};

Params32 initial_params() {
  Params32 p{Eigen::VectorXf(2), Eigen::VectorXf(3)};
  p.head << 0.5f, -1.0f;
  p.tail << 2.0f, 0.25f, -3.0f;
  return p;
}

// The gradients of the PyTorch reference: sin(0.7 t (i + 1)) (0.5 + i), computed in double, rounded to float.
double gradient(int step, std::size_t i) {
  return static_cast<double>(
      static_cast<float>(std::sin(0.7 * step * static_cast<double>(i + 1)) * (0.5 + static_cast<double>(i))));
}

Params32 gradients(int step) {
  Params32 g{Eigen::VectorXf(2), Eigen::VectorXf(3)};
  for (std::size_t i = 0; i < 5; ++i) {
    const auto value = static_cast<float>(gradient(step, i));
    if (i < 2) {
      g.head(static_cast<Eigen::Index>(i)) = value;
    } else {
      g.tail(static_cast<Eigen::Index>(i - 2)) = value;
    }
  }
  return g;
}

std::array<float, 5> flatten(const Params32& p) {
  return {p.head(0), p.head(1), p.tail(0), p.tail(1), p.tail(2)};
}

template <class Optimizer>
std::array<float, 5> run(Optimizer& optimizer, int steps) {
  Params32 p = initial_params();
  for (int t = 1; t <= steps; ++t) optimizer.step(p, gradients(t));
  return flatten(p);
}

void expect_close(const std::array<float, 5>& actual, const std::array<double, 5>& expected,
                  double relative) {
  for (std::size_t i = 0; i < 5; ++i) {
    EXPECT_NEAR(actual[i], expected[i], relative * std::abs(expected[i]) + 1e-7) << "element " << i;
  }
}

// --------------------------------------------------------------------------------------------------------------
// Double-precision transcriptions of torch.optim's single-tensor update rules.

std::array<double, 5> adamw_reference(const xax::optim::AdamWOptions& o, int steps) {
  std::array<double, 5> p = initial, m{}, v{};
  for (int t = 1; t <= steps; ++t) {
    const double bias1 = 1 - std::pow(o.beta1, t), bias2 = 1 - std::pow(o.beta2, t);
    for (std::size_t i = 0; i < 5; ++i) {
      const double g = gradient(t, i);
      p[i] *= 1 - o.learning_rate * o.weight_decay;
      m[i] = o.beta1 * m[i] + (1 - o.beta1) * g;
      v[i] = o.beta2 * v[i] + (1 - o.beta2) * g * g;
      p[i] -= o.learning_rate / bias1 * m[i] / (std::sqrt(v[i]) / std::sqrt(bias2) + o.eps);
    }
  }
  return p;
}

std::array<double, 5> sgd_reference(const xax::optim::SgdOptions& o, int steps) {
  std::array<double, 5> p = initial, b{};
  for (int t = 1; t <= steps; ++t) {
    for (std::size_t i = 0; i < 5; ++i) {
      double d = gradient(t, i) + o.weight_decay * p[i];
      if (o.momentum != 0) {
        b[i] = t == 1 ? d : o.momentum * b[i] + d;
        d = o.nesterov ? d + o.momentum * b[i] : b[i];
      }
      p[i] -= o.learning_rate * d;
    }
  }
  return p;
}

// --------------------------------------------------------------------------------------------------------------
// AdamW

TEST(AdamW, MatchesPyTorchTrajectory) {
  // torch.optim.AdamW([p], lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1), 10 steps.
  xax::optim::AdamW<Params32> adamw(initial_params(), {.learning_rate = 0.01, .weight_decay = 0.1});
  expect_close(run(adamw, 10), {0.452676684, -1.01339471, 1.9663192, 0.23785086, -2.96033001}, 2e-6);
  EXPECT_EQ(adamw.state().step, 10);

  // torch.optim.AdamW([p]) with its defaults, which are xax's.
  xax::optim::AdamW<Params32> defaults(initial_params());
  expect_close(run(defaults, 10), {0.495683193, -1.00225234, 1.99841249, 0.249001056, -2.99871111}, 2e-6);
}

TEST(AdamW, MatchesDoubleReferenceOverManySteps) {
  const xax::optim::AdamWOptions options{
      .learning_rate = 3e-3, .beta1 = 0.8, .beta2 = 0.99, .eps = 1e-6, .weight_decay = 0.05};
  xax::optim::AdamW<Params32> adamw(initial_params(), options);
  expect_close(run(adamw, 200), adamw_reference(options, 200), 1e-5);
}

TEST(AdamW, FirstStepIsSignOfGradientTimesLearningRate) {
  // m_hat = g and v_hat = g^2 after one step, so the step is lr * g / (|g| + eps) after the decay.
  xax::optim::AdamW<Params32> adamw(initial_params(), {.learning_rate = 0.1, .weight_decay = 0.5});
  Params32 p = initial_params();
  adamw.step(p, gradients(1));
  const auto after = flatten(p);
  for (std::size_t i = 0; i < 5; ++i) {
    const double g = gradient(1, i);
    EXPECT_NEAR(after[i], initial[i] * 0.95 - 0.1 * g / (std::abs(g) + 1e-8), 1e-6) << "element " << i;
  }
}

TEST(AdamW, DoubleMastersAndLearningRateChanges) {
  Params<double> p{Eigen::VectorXd::Constant(2, 1.0), Eigen::VectorXd::Constant(3, -1.0)};
  const Params<double> g{Eigen::VectorXd::Constant(2, 0.5), Eigen::VectorXd::Constant(3, -0.5)};
  xax::optim::AdamW<Params<double>> adamw(p, {.learning_rate = 0.1, .weight_decay = 0});
  adamw.step(p, g);
  const double first_step = 0.1 * 0.5 / (0.5 + 1e-8);
  EXPECT_NEAR(p.head(0), 1.0 - first_step, 1e-15);
  EXPECT_NEAR(p.tail(0), -1.0 + first_step, 1e-15);
  adamw.set_learning_rate(0.0);
  adamw.step(p, g);
  EXPECT_NEAR(p.head(0), 1.0 - first_step, 1e-15);
  EXPECT_EQ(adamw.options().learning_rate, 0.0);
}

TEST(AdamW, InvalidOptionsThrow) {
  const Params32 p = initial_params();
  using Options = xax::optim::AdamWOptions;
  EXPECT_THROW(xax::optim::AdamW<Params32>(p, Options{.learning_rate = -1}), xax::ConfigError);
  EXPECT_THROW(xax::optim::AdamW<Params32>(p, Options{.learning_rate = NAN}), xax::ConfigError);
  EXPECT_THROW(xax::optim::AdamW<Params32>(p, Options{.beta1 = 1.0}), xax::ConfigError);
  EXPECT_THROW(xax::optim::AdamW<Params32>(p, Options{.beta2 = -0.1}), xax::ConfigError);
  EXPECT_THROW(xax::optim::AdamW<Params32>(p, Options{.eps = -1e-8}), xax::ConfigError);
  // 0 (or a value float rounds to 0) makes 0 / 0 of any element whose gradients have all been 0.
  EXPECT_THAT(
      [&] { xax::optim::AdamW<Params32>(p, Options{.eps = 0}); },
      ::testing::ThrowsMessage<xax::ConfigError>(::testing::StrEq(
          "xax::optim::AdamW: eps = 0 is not accepted; give a finite value > 0 (1e-8 by default); 0 makes "
          "the update of an element whose gradients have all been 0 a NaN")));
  EXPECT_THROW(xax::optim::AdamW<Params32>(p, Options{.eps = 1e-50}), xax::ConfigError);
  EXPECT_NO_THROW(xax::optim::AdamW<Params32>(p, Options{.eps = 1e-30}));
  EXPECT_THROW(xax::optim::AdamW<Params32>(p, Options{.weight_decay = INFINITY}), xax::ConfigError);
  try {
    xax::optim::AdamW<Params32>(p, Options{.beta1 = 1.5});
    FAIL() << "no exception";
  } catch (const xax::ConfigError& error) {
    EXPECT_THAT(error.what(), ::testing::HasSubstr("beta1"));
    EXPECT_THAT(error.what(), ::testing::HasSubstr("1.5"));
    EXPECT_THAT(error.what(), ::testing::HasSubstr("[0, 1)"));
  }
  xax::optim::AdamW<Params32> adamw(p);
  EXPECT_THROW(adamw.set_learning_rate(-0.5), xax::ConfigError);
  EXPECT_EQ(adamw.options().learning_rate, 1e-3);
}

TEST(AdamW, MismatchedGradientsThrowShapeErrorNamingTheLeaf) {
  Params32 p = initial_params();
  xax::optim::AdamW<Params32> adamw(p);
  Params32 g = gradients(1);
  g.tail.resize(4);
  try {
    adamw.step(p, g);
    FAIL() << "no exception";
  } catch (const xax::ShapeError& error) {
    EXPECT_THAT(error.what(), ::testing::HasSubstr("tail"));
  }
}

TEST(AdamW, LargeLeavesGiveTheSameResultOnAnyThreadCount) {
  const Eigen::Index n = 1 << 18;
  Params32 p{Eigen::VectorXf::LinSpaced(n, -1.0f, 1.0f), Eigen::VectorXf::Constant(3, 0.5f)};
  Params32 g{Eigen::VectorXf::LinSpaced(n, 0.3f, -0.2f), Eigen::VectorXf::Constant(3, 0.1f)};
  const int threads = xax::num_threads();
  Params32 p1 = p, p2 = p;
  xax::optim::AdamW<Params32> one(p), two(p);
  xax::set_num_threads(1);
  for (int i = 0; i < 3; ++i) one.step(p1, g);
  if (xax::num_threads() == 1) {
    try {
      xax::set_num_threads(2);
    } catch (const xax::ConfigError&) {
      // No OpenMP: only one thread exists.
    }
  }
  for (int i = 0; i < 3; ++i) two.step(p2, g);
  xax::set_num_threads(threads);
  EXPECT_EQ(p1.head, p2.head);
  EXPECT_EQ(one.state().v.head, two.state().v.head);
}

// --------------------------------------------------------------------------------------------------------------
// step(params, grads, copy): the update also rounds the new parameters into a copy of another type

template <class Copy>
class StepWithCopy : public ::testing::Test {};
using CopyScalars = ::testing::Types<xax::bfloat16, xax::float16, double>;
TYPED_TEST_SUITE(StepWithCopy, CopyScalars);

// Runs `steps` updates twice, with and without a copy, over leaves long enough to be split across threads.
template <class Copy, class MakeOptimizer>
void expect_copy_is_the_rounded_update(MakeOptimizer make_optimizer) {
  const Eigen::Index n = (1 << 17) + 5;  // not a multiple of any chunk
  const Params32 start{Eigen::VectorXf::LinSpaced(n, -1.0f, 1.0f), Eigen::VectorXf::Constant(3, 0.5f)};
  const Params32 g{Eigen::VectorXf::LinSpaced(n, 0.3f, -0.2f), Eigen::VectorXf::Constant(3, 0.1f)};
  Params32 plain = start, fused = start;
  auto plain_optimizer = make_optimizer(start);
  auto fused_optimizer = make_optimizer(start);
  auto copy = xax::tree_cast<Copy>(start);
  for (int t = 0; t < 3; ++t) {
    plain_optimizer.step(plain, g);
    fused_optimizer.step(fused, g, copy);
  }
  EXPECT_EQ(plain.head, fused.head) << "writing the copy changes nothing else";
  EXPECT_EQ(plain.tail, fused.tail);
  EXPECT_EQ(plain_optimizer.state().step, fused_optimizer.state().step);
  const auto expected = xax::tree_cast<Copy>(fused);
  EXPECT_TRUE(expected.head == copy.head) << "the copy is the updated parameters rounded to nearest";
  EXPECT_TRUE(expected.tail == copy.tail);
}

TYPED_TEST(StepWithCopy, AdamWCopyIsTheRoundedUpdate) {
  expect_copy_is_the_rounded_update<TypeParam>(
      [](const Params32& like) { return xax::optim::AdamW<Params32>(like, {.weight_decay = 0.1}); });
}

TYPED_TEST(StepWithCopy, SgdWithAndWithoutMomentumCopiesTheRoundedUpdate) {
  expect_copy_is_the_rounded_update<TypeParam>([](const Params32& like) {
    return xax::optim::Sgd<Params32>(like, {.learning_rate = 0.1, .momentum = 0.9});
  });
  expect_copy_is_the_rounded_update<TypeParam>(
      [](const Params32& like) { return xax::optim::Sgd<Params32>(like, {.learning_rate = 0.1}); });
}

TEST(StepWithCopy, MismatchedCopyThrowsShapeErrorNamingTheLeaf) {
  Params32 p = initial_params();
  xax::optim::AdamW<Params32> adamw(p);
  auto copy = xax::tree_cast<xax::bfloat16>(p);
  copy.tail.resize(2);
  try {
    adamw.step(p, gradients(1), copy);
    FAIL() << "no exception";
  } catch (const xax::ShapeError& error) {
    EXPECT_THAT(error.what(), ::testing::HasSubstr("tail"));
  }
}

// --------------------------------------------------------------------------------------------------------------
// SGD

TEST(Sgd, MatchesPyTorchTrajectories) {
  xax::optim::Sgd<Params32> plain(initial_params(), {.learning_rate = 0.05});
  expect_close(run(plain, 10), {0.48336032, -1.07558143, 1.89222085, 0.196676672, -2.91303372}, 2e-6);
  xax::optim::Sgd<Params32> momentum(initial_params(),
                                     {.learning_rate = 0.05, .momentum = 0.9, .weight_decay = 0.01});
  expect_close(run(momentum, 10), {0.309954405, -1.27120197, 1.67518783, 0.11516688, -2.75610161}, 2e-6);
  xax::optim::Sgd<Params32> nesterov(
      initial_params(), {.learning_rate = 0.05, .momentum = 0.9, .weight_decay = 0.01, .nesterov = true});
  expect_close(run(nesterov, 10), {0.311064661, -1.31318772, 1.59125352, 0.0746146888, -2.67941451}, 2e-6);
}

TEST(Sgd, MatchesDoubleReferenceOverManySteps) {
  for (const bool nesterov : {false, true}) {
    const xax::optim::SgdOptions options{
        .learning_rate = 0.01, .momentum = 0.5, .weight_decay = 1e-3, .nesterov = nesterov};
    xax::optim::Sgd<Params32> sgd(initial_params(), options);
    expect_close(run(sgd, 200), sgd_reference(options, 200), 1e-5);
  }
}

TEST(Sgd, NoMomentumKeepsNoBuffer) {
  xax::optim::Sgd<Params32> sgd(initial_params());
  EXPECT_EQ(xax::floating_element_count(sgd.state().momentum_buffer), 0u);
  xax::optim::Sgd<Params32> with_momentum(initial_params(), {.momentum = 0.9});
  EXPECT_EQ(xax::floating_element_count(with_momentum.state().momentum_buffer), 5u);
}

TEST(Sgd, InvalidOptionsThrow) {
  const Params32 p = initial_params();
  using Options = xax::optim::SgdOptions;
  EXPECT_THROW(xax::optim::Sgd<Params32>(p, Options{.learning_rate = -0.1}), xax::ConfigError);
  EXPECT_THROW(xax::optim::Sgd<Params32>(p, Options{.momentum = -0.9}), xax::ConfigError);
  EXPECT_THROW(xax::optim::Sgd<Params32>(p, Options{.weight_decay = NAN}), xax::ConfigError);
  try {
    xax::optim::Sgd<Params32>(p, Options{.nesterov = true});
    FAIL() << "no exception";
  } catch (const xax::ConfigError& error) {
    EXPECT_THAT(error.what(), ::testing::HasSubstr("nesterov"));
  }
  xax::optim::Sgd<Params32> sgd(p);
  EXPECT_THROW(sgd.set_learning_rate(INFINITY), xax::ConfigError);
}

// --------------------------------------------------------------------------------------------------------------
// Pure-bf16 updates

using ParamsBF16 = Params<xax::bfloat16>;

ParamsBF16 constant_bf16(Eigen::Index n, float value) {
  return {Eigen::Matrix<xax::bfloat16, Eigen::Dynamic, 1>::Constant(n, xax::bfloat16(value)),
          Eigen::Matrix<xax::bfloat16, Eigen::Dynamic, 1>::Constant(3, xax::bfloat16(value))};
}

double mean(const Eigen::Matrix<xax::bfloat16, Eigen::Dynamic, 1>& v) {
  double sum = 0;
  for (Eigen::Index i = 0; i < v.size(); ++i) sum += static_cast<float>(v(i));
  return sum / static_cast<double>(v.size());
}

// A constant gradient of -1 makes every AdamW step +lr (m_hat = g, v_hat = g^2). With lr = 1e-3, a quarter
// of half a bf16 ulp at 1.0 (2^-8 = 3.9e-3), round-to-nearest never moves the parameter; the fp32 trajectory
// reaches 1 + steps * lr.
constexpr int bf16_steps = 500;
constexpr double bf16_lr = 1e-3;
constexpr double bf16_expected = 1.0 + bf16_steps * bf16_lr;

template <class Optimizer>
ParamsBF16 run_bf16(Optimizer& optimizer, ParamsBF16 p) {
  const ParamsBF16 g = constant_bf16(p.head.size(), -1.0f);
  for (int t = 0; t < bf16_steps; ++t) optimizer.step(p, g);
  return p;
}

TEST(BF16Update, RoundToNearestLosesSmallUpdates) {
  const ParamsBF16 p = constant_bf16(1024, 1.0f);
  xax::optim::AdamW<ParamsBF16> adamw(p, {.learning_rate = bf16_lr, .weight_decay = 0},
                                      {.rounding = xax::optim::BF16Update::round_to_nearest});
  EXPECT_EQ(mean(run_bf16(adamw, p).head), 1.0);
}

TEST(BF16Update, StochasticRoundingIsUnbiasedOverManySteps) {
  const Eigen::Index n = 4096;
  const ParamsBF16 p = constant_bf16(n, 1.0f);
  xax::optim::AdamW<ParamsBF16> adamw(p, {.learning_rate = bf16_lr, .weight_decay = 0},
                                      {.rounding = xax::optim::BF16Update::stochastic_rounding, .seed = 42});
  const ParamsBF16 result = run_bf16(adamw, p);
  // Each element's error is a sum of independent zero-mean roundings, each at most one ulp (2^-7 here): its
  // standard deviation is below sqrt(steps) * ulp / 2 = 0.09, so the mean of 4096 is within 0.007 at 5 sigma.
  EXPECT_NEAR(mean(result.head), bf16_expected, 0.007);
  // And the elements really spread: no systematic rounding in either direction.
  int below = 0, above = 0;
  for (Eigen::Index i = 0; i < n; ++i) {
    const double value = static_cast<float>(result.head(i));
    below += value < bf16_expected ? 1 : 0;
    above += value > bf16_expected ? 1 : 0;
  }
  EXPECT_GT(below, n / 4);
  EXPECT_GT(above, n / 4);
}

TEST(BF16Update, StochasticRoundingOfSgdIsUnbiasedAndReproducible) {
  const ParamsBF16 p = constant_bf16(4096, 1.0f);
  const auto train = [&p](std::uint64_t seed) {
    xax::optim::Sgd<ParamsBF16> sgd(p, {.learning_rate = bf16_lr}, {.seed = seed});
    return run_bf16(sgd, p);
  };
  const ParamsBF16 first = train(7), again = train(7), other = train(8);
  EXPECT_NEAR(mean(first.head), bf16_expected, 0.007);
  EXPECT_EQ(first.head, again.head);
  EXPECT_NE(first.head, other.head);
}

TEST(BF16Update, KahanCompensationTracksTheFp32Trajectory) {
  const ParamsBF16 p = constant_bf16(256, 1.0f);
  xax::optim::AdamW<ParamsBF16> adamw(p, {.learning_rate = bf16_lr, .weight_decay = 0},
                                      {.rounding = xax::optim::BF16Update::kahan});
  EXPECT_EQ(xax::floating_element_count(adamw.state().compensation), 256u + 3u);
  const ParamsBF16 result = run_bf16(adamw, p);
  // Deterministic: every element is within one bf16 ulp (2^-7 in [1, 2)) of the fp32 trajectory.
  for (Eigen::Index i = 0; i < result.head.size(); ++i) {
    EXPECT_NEAR(static_cast<float>(result.head(i)), bf16_expected, 0x1p-7) << "element " << i;
  }
}

// A compensation tree that does not match the params is found before the update writes anything: params,
// moments, compensation and step count stay bit-identical.
template <class Optimizer>
void expect_mismatched_compensation_changes_nothing(Optimizer& optimizer, const ParamsBF16& p) {
  optimizer.state().compensation.tail.resize(4);
  optimizer.state().compensation.tail.setZero();
  const auto state_before = optimizer.state();
  ParamsBF16 q = p;
  try {
    optimizer.step(q, constant_bf16(p.head.size(), -1.0f));
    FAIL() << "no exception";
  } catch (const xax::ShapeError& error) {
    EXPECT_THAT(error.what(), ::testing::HasSubstr("tail"));
  }
  const auto bits = [](const auto& tree) {
    std::vector<std::uint8_t> out;
    xax::for_each_leaf(
        [&out](const auto& leaf) {
          const auto span = xax::leaf_span(leaf);
          const auto* bytes = reinterpret_cast<const std::uint8_t*>(span.data());
          out.insert(out.end(), bytes, bytes + span.size_bytes());
        },
        tree);
    return out;
  };
  EXPECT_EQ(bits(q), bits(p));
  EXPECT_EQ(bits(optimizer.state()), bits(state_before));
}

TEST(BF16Update, MismatchedKahanCompensationThrowsBeforeAnyUpdate) {
  const ParamsBF16 p = constant_bf16(8, 1.0f);
  const xax::optim::BF16UpdateOptions kahan{.rounding = xax::optim::BF16Update::kahan};
  {
    xax::optim::AdamW<ParamsBF16> adamw(p, {}, kahan);
    expect_mismatched_compensation_changes_nothing(adamw, p);
  }
  {
    xax::optim::Sgd<ParamsBF16> sgd(p, {.momentum = 0.9}, kahan);
    expect_mismatched_compensation_changes_nothing(sgd, p);
  }
  {
    xax::optim::Sgd<ParamsBF16> sgd(p, {}, kahan);
    expect_mismatched_compensation_changes_nothing(sgd, p);
  }
}

// Rejected values are printed exactly: std::to_string would show -1e-9 as "-0.000000".
TEST(AdamW, InvalidOptionMessageShowsTheExactValue) {
  const Params32 p = initial_params();
  try {
    xax::optim::AdamW<Params32> adamw(p, {.learning_rate = -1e-9});
    FAIL() << "no exception";
  } catch (const xax::ConfigError& error) {
    EXPECT_THAT(error.what(), ::testing::HasSubstr("learning_rate = -1e-09 is not accepted"));
  }
}

TEST(BF16Update, MomentsAreFp32) {
  const ParamsBF16 p = constant_bf16(8, 1.0f);
  xax::optim::AdamW<ParamsBF16> adamw(p);
  ParamsBF16 q = p;
  adamw.step(q, constant_bf16(8, 1e-3f));
  // (1 - beta2) g^2 = 1e-9 is far below bf16's resolution near any v worth storing, but exact enough in fp32.
  EXPECT_NEAR(adamw.state().v.head(0), 1e-9, 1e-11);
}

// Parameter groups: a layer's weight and bias, and a norm gain, by leaf path.
template <class T>
struct Layer {
  Eigen::Matrix<T, Eigen::Dynamic, 1> w;
  Eigen::Matrix<T, Eigen::Dynamic, 1> b;
  Eigen::Matrix<T, Eigen::Dynamic, 1> norm_gain;
  XAX_FIELDS(w, b, norm_gain);
};

template <class T>
Layer<T> layer_of(T w, T b, T gain) {
  return {Eigen::Matrix<T, 2, 1>::Constant(w), Eigen::Matrix<T, 2, 1>::Constant(b),
          Eigen::Matrix<T, 2, 1>::Constant(gain)};
}

TEST(ParamGroups, BiasAndNormPredicatesMatchTheUsualNames) {
  using xax::optim::is_bias_or_norm;
  for (const char* path : {"b",
                           "layers[1].b",
                           "attn.bias",
                           "rnn.bias_hh",
                           "proj_bias",
                           "ln_f.ln_gain",
                           "gain",
                           "blocks[0].norm1.w",
                           "final_norm.scale",
                           "LayerNorm.weight",
                           "gamma",
                           "layers[\"out\"].b",
                           "biases[3]",
                           "[\"b\"]",
                           "[\"fc1.bias\"]",
                           "[\"bias\"][2]",
                           "blocks[0][\"attn.c_proj.bias\"]",
                           "[\"ln_f.weight\"]",
                           "h[0].ln_1.w",
                           "ln2.scale"}) {
    EXPECT_TRUE(is_bias_or_norm(path)) << path;
  }
  for (const char* path :
       {"w", "layers[1].w", "embed", "attn.qkv", "layers[\"b\"].w", "bw", "abnormal_w", "[\"fc1.weight\"]",
        "[\"bias.net\"].w", "[\"\"]", "[\"]", "\"]", "kiln.w", "lnx.w"}) {
    EXPECT_FALSE(is_bias_or_norm(path)) << path;
  }
}

// With zero gradients AdamW's update is weight decay alone: p (1 - lr wd) = p (1 - 1/8 * 1/2) = p * 15/16.
TEST(ParamGroups, AdamWDecaysTheWeightButNotTheBiasOrNormGain) {
  using Tree = Layer<float>;
  Tree params = layer_of(2.0f, 4.0f, 8.0f);
  const Tree grads = layer_of(0.0f, 0.0f, 0.0f);
  xax::optim::AdamW<Tree> adamw(
      params, {.learning_rate = 0.125,
               .weight_decay = 0.5,
               .groups = xax::optim::ParamGroups{}.no_weight_decay_if(xax::optim::is_bias_or_norm)});
  adamw.step(params, grads);
  EXPECT_EQ(params.w, Eigen::Vector2f::Constant(1.875f));
  EXPECT_EQ(params.b, Eigen::Vector2f::Constant(4.0f));
  EXPECT_EQ(params.norm_gain, Eigen::Vector2f::Constant(8.0f));
}

// A map keyed by PyTorch-style names: the key's last dotted part is the field. Without it, "fc1.bias" was
// decayed (the key was not read at all) while "ln.norm" was not.
TEST(ParamGroups, MapKeysAreMatchedByTheirLastDottedName) {
  using Tree = std::map<std::string, Eigen::Vector2f>;
  Tree params{{"fc1.bias", Eigen::Vector2f::Constant(4.0f)},
              {"fc1.weight", Eigen::Vector2f::Constant(2.0f)},
              {"ln.norm", Eigen::Vector2f::Constant(8.0f)}};
  const Tree grads = xax::zeros_like(params);
  xax::optim::AdamW<Tree> adamw(
      params, {.learning_rate = 0.125,
               .weight_decay = 0.5,
               .groups = xax::optim::ParamGroups{}.no_weight_decay_if(xax::optim::is_bias_or_norm)});
  adamw.step(params, grads);
  EXPECT_EQ(params.at("fc1.weight"), Eigen::Vector2f::Constant(1.875f));
  EXPECT_EQ(params.at("fc1.bias"), Eigen::Vector2f::Constant(4.0f));
  EXPECT_EQ(params.at("ln.norm"), Eigen::Vector2f::Constant(8.0f));
  EXPECT_TRUE(xax::optim::field_is("bias")("[\"fc1.bias\"]"));
}

// The fused step that writes a bf16 copy (TrainStep's compute copy) applies the groups too.
TEST(ParamGroups, AdamWStepWithACopyAppliesTheGroups) {
  Layer<float> params = layer_of(2.0f, 4.0f, 8.0f);
  Layer<xax::bfloat16> copy = xax::tree_cast<xax::bfloat16>(params);
  xax::optim::AdamW<Layer<float>> adamw(
      params, {.learning_rate = 0.125,
               .weight_decay = 0.5,
               .groups = xax::optim::ParamGroups{}.weight_decay_if(xax::optim::field_is("b"), 1.0)});
  adamw.step(params, layer_of(0.0f, 0.0f, 0.0f), copy);
  EXPECT_EQ(params.w, Eigen::Vector2f::Constant(1.875f));
  EXPECT_EQ(params.b, Eigen::Vector2f::Constant(3.5f)) << "1 - 1/8 * 1";
  EXPECT_EQ(params.norm_gain, Eigen::Vector2f::Constant(7.5f));
  EXPECT_EQ(copy.b(0), xax::bfloat16(3.5f));
}

// SGD: d = g + wd p, p -= lr d. With g = 1, lr 1/2, wd 1/4 and the bias at a quarter of the learning rate
// and no decay: w = 2 - 1/2 (1 + 1/2) = 5/4; b = 4 - 1/8 * 1 = 31/8; the gain is decayed (rules after the
// first do not touch it): 8 - 1/2 (1 + 2) = 13/2.
TEST(ParamGroups, SgdGivesEachLeafItsLearningRateAndDecay) {
  for (const double momentum : {0.0, 0.5}) {
    Layer<float> params = layer_of(2.0f, 4.0f, 8.0f);
    xax::optim::Sgd<Layer<float>> sgd(params,
                                      {.learning_rate = 0.5,
                                       .momentum = momentum,
                                       .weight_decay = 0.25,
                                       .groups = xax::optim::ParamGroups{}
                                                     .no_weight_decay_if(xax::optim::is_bias)
                                                     .learning_rate_scale_if(xax::optim::is_bias, 0.25)});
    sgd.step(params, layer_of(1.0f, 1.0f, 1.0f));
    EXPECT_EQ(params.w, Eigen::Vector2f::Constant(1.25f)) << momentum;
    EXPECT_EQ(params.b, Eigen::Vector2f::Constant(3.875f)) << momentum;
    EXPECT_EQ(params.norm_gain, Eigen::Vector2f::Constant(6.5f)) << momentum;
  }
}

TEST(ParamGroups, BF16ParamsUseTheGroupsToo) {
  using Tree = Layer<xax::bfloat16>;
  Tree params = layer_of(xax::bfloat16(2.0f), xax::bfloat16(4.0f), xax::bfloat16(8.0f));
  xax::optim::Sgd<Tree> sgd(params,
                            {.learning_rate = 0.5,
                             .weight_decay = 0.25,
                             .groups = xax::optim::ParamGroups{}.no_weight_decay_if(xax::optim::is_bias)},
                            {.rounding = xax::optim::BF16Update::round_to_nearest});
  sgd.step(params, layer_of(xax::bfloat16(1.0f), xax::bfloat16(1.0f), xax::bfloat16(1.0f)));
  EXPECT_EQ(params.w(0), xax::bfloat16(1.25f));
  EXPECT_EQ(params.b(0), xax::bfloat16(3.5f));
}

TEST(ParamGroups, LaterRulesOverrideEarlierOnesAndBadValuesAreRefused) {
  const auto groups = xax::optim::ParamGroups{}
                          .weight_decay_if([](std::string_view) { return true; }, 0.25)
                          .no_weight_decay_if(xax::optim::is_bias)
                          .learning_rate_scale_if(xax::optim::path_contains("layers[1]"), 2.0);
  EXPECT_EQ(groups.settings_for("layers[1].w", 0.5).weight_decay, 0.25);
  EXPECT_EQ(groups.settings_for("layers[1].w", 0.5).learning_rate_scale, 2.0);
  EXPECT_EQ(groups.settings_for("layers[0].b", 0.5).weight_decay, 0.0);
  EXPECT_EQ(groups.settings_for("layers[0].b", 0.5).learning_rate_scale, 1.0);
  try {
    (void)xax::optim::ParamGroups{}.weight_decay_if(xax::optim::is_bias, -1.0);
    FAIL() << "expected ConfigError";
  } catch (const xax::ConfigError& error) {
    EXPECT_STREQ(error.what(),
                 "xax::optim::ParamGroups: weight_decay -1 is not accepted; give a finite value >= 0");
  }
  EXPECT_THROW((void)xax::optim::ParamGroups{}.learning_rate_scale_if(nullptr, 1.0), xax::ConfigError);
}

TEST(ParamGroups, SgdWithoutMomentumRefusesParamsWithOtherLeaves) {
  using Tree = std::vector<Eigen::VectorXf>;
  Tree like{Eigen::VectorXf::Ones(2), Eigen::VectorXf::Ones(2)};
  xax::optim::Sgd<Tree> sgd(like, {.learning_rate = 0.5});
  Tree params{Eigen::VectorXf::Ones(2), Eigen::VectorXf::Ones(2), Eigen::VectorXf::Ones(2)};
  const Tree before = params;
  EXPECT_THROW(sgd.step(params, params), xax::ShapeError);
  EXPECT_EQ(params[0], before[0]);
  EXPECT_EQ(sgd.state().step, 0);
}

}  // namespace
