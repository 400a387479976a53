// xax::TrainStep directly, on a trainer small enough that every expected value is exact: the compute copy
// the optimizer keeps current, the cast-free path for trainers that write fp32 gradients, and the global
// gradient norm. The end-to-end behaviour (convergence, skipping, loss scaling, resume) is in
// test_mixed_precision_train.cpp.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>
#include <xax/task/train_step.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/policy.hpp>
#include <xax/utils/tree.hpp>
#include <xax/utils/tree_cast.hpp>

#include "checkpoint_bytes.hpp"

namespace {

template <class T>
struct Weights {
  Eigen::Matrix<T, Eigen::Dynamic, 1> w;
  XAX_FIELDS(w);
};

struct Target {
  Eigen::VectorXf value;
};

// loss = 0.5 |w - target|^2, so d(loss * scale)/dw = (w - target) * scale, computed in float from the
// compute-precision weights. With `WritesFloatGrads` the trainer also accepts fp32 gradients of half
// weights, which TrainStep then asks for.
template <class Policy, bool WritesFloatGrads>
class Regression : public xax::TrainStep<Regression<Policy, WritesFloatGrads>, Policy, xax::LossScale> {
 public:
  template <class T>
  using params_type = Weights<T>;
  using batch_type = Target;

  Regression(const Weights<float>& initial, const xax::OptimizerOptions& optimizer,
             xax::LossScale loss_scale = xax::NoOpLossScale{}, xax::TrainStepOptions options = {}) {
    this->reset_train_state(initial, optimizer, std::move(loss_scale), options);
  }

  // Writes through the gradients' existing storage, as a trainer with preallocated buffers does: TrainStep
  // must hand over gradients already shaped like the params.
  template <class T, class G>
  requires(WritesFloatGrads || std::same_as<T, G>) double loss_and_grads(const Weights<T>& params,
                                                                         const Target& target, float scale,
                                                                         Weights<G>& grads) {
    grads_dtype = xax::dtype_of<G>;
    if (grads.w.size() != params.w.size())
      throw xax::ShapeError("gradient buffer not shaped like the params");
    const Eigen::VectorXf difference = params.w.template cast<float>() - target.value;
    Eigen::Map<Eigen::Matrix<G, Eigen::Dynamic, 1>>(grads.w.data(), grads.w.size()) =
        (difference * scale).template cast<G>();
    return reported_loss ? *reported_loss : 0.5 * difference.template cast<double>().squaredNorm();
  }

  xax::DType grads_dtype = xax::DType::float64;  // none seen yet
  // Replaces the loss the trainer reports (not its gradients): a non-finite loss with finite gradients.
  std::optional<double> reported_loss;
};

template <class Compute>
class TrainStepCompute : public ::testing::Test {};
using HalfScalars = ::testing::Types<xax::bfloat16, xax::float16>;
TYPED_TEST_SUITE(TrainStepCompute, HalfScalars);

template <class Compute, bool WritesFloatGrads>
using HalfRegression = Regression<xax::Policy<float, Compute, float>, WritesFloatGrads>;

const xax::optim::SgdOptions plain_sgd{.learning_rate = 1.0, .momentum = 0.0, .weight_decay = 0.0};

Weights<float> ones(Eigen::Index n) {
  return {Eigen::VectorXf::Ones(n)};
}

// A temporary file name of this test's own: ctest runs the tests of several builds at once.
std::filesystem::path unique_temp_path(const std::string& stem) {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name = "xax_" + stem + "_" + info->test_suite_name() + "_" + info->name() + "_" +
                     std::to_string(static_cast<long long>(::getpid()));
  for (char& c : name) {
    if (c == '/') c = '_';
  }
  return std::filesystem::temp_directory_path() / (name + ".ckpt");
}

template <class A, class B>
bool bitwise_equal(const A& a, const B& b) {
  return a.size() == b.size() &&
         std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(*a.data())) == 0;
}

template <class Trainer>
void expect_compute_copy_is_cast_of_masters(Trainer& trainer, const char* when) {
  using Compute = typename Trainer::compute_type;
  const auto expected = xax::tree_cast<Compute>(trainer.params());
  trainer.with_compute_params([&](const auto& compute) { EXPECT_TRUE(compute.w == expected.w) << when; });
}

TYPED_TEST(TrainStepCompute, TrainerWritingFloatGradientsGetsThemUnrounded) {
  // w = 1 (exact in every type), target = 2/3: the gradient 1/3 is not representable in 16 bits.
  const Target target{Eigen::VectorXf::Constant(4, 2.0f / 3.0f)};
  const float gradient = 1.0f - 2.0f / 3.0f;

  HalfRegression<TypeParam, true> direct(ones(4), plain_sgd);
  direct.train_step(target);
  EXPECT_EQ(direct.grads_dtype, xax::DType::float32);
  EXPECT_EQ(direct.params().w(0), 1.0f - gradient) << "SGD at lr 1 subtracts the fp32 gradient";

  HalfRegression<TypeParam, false> cast(ones(4), plain_sgd);
  cast.train_step(target);
  EXPECT_EQ(cast.grads_dtype, xax::dtype_of<TypeParam>);
  EXPECT_EQ(cast.params().w(0), 1.0f - static_cast<float>(static_cast<TypeParam>(gradient)))
      << "a trainer writing compute-type gradients has them rounded, then cast";
}

TYPED_TEST(TrainStepCompute, NoComputeGradientBufferWhenTheTrainerWritesFloatGradients) {
  const HalfRegression<TypeParam, true> direct(ones(1000), plain_sgd);
  const HalfRegression<TypeParam, false> cast(ones(1000), plain_sgd);
  EXPECT_EQ(direct.state_bytes().grads, 1000 * sizeof(float));
  EXPECT_EQ(cast.state_bytes().grads, 1000 * (sizeof(float) + sizeof(TypeParam)));
  EXPECT_EQ(direct.state_bytes().compute_params, 1000 * sizeof(TypeParam));
}

TYPED_TEST(TrainStepCompute, ComputeCopyFollowsTheMastersThroughStepsSkipsAndLoads) {
  HalfRegression<TypeParam, true> trainer(ones(300), xax::optim::AdamWOptions{.learning_rate = 0.01},
                                          xax::DynamicLossScale{});
  Target target{Eigen::VectorXf::LinSpaced(300, -1.0f, 1.0f)};
  expect_compute_copy_is_cast_of_masters(trainer, "after reset");
  for (int i = 0; i < 3; ++i) trainer.train_step(target);
  expect_compute_copy_is_cast_of_masters(trainer, "after updates");

  const std::filesystem::path path = unique_temp_path("compute_copy");
  xax::CheckpointWriter writer;
  trainer.save_train_state(writer);
  writer.write(path);
  const auto saved = trainer.params();

  target.value(7) = std::numeric_limits<float>::infinity();
  const auto masters_before = trainer.params();
  Weights<TypeParam> compute_before;
  trainer.with_compute_params([&](const auto& compute) { compute_before = compute; });
  const auto adamw_state = [&] {
    return trainer.visit_optimizer([](const auto& optimizer) {
      if constexpr (requires { optimizer.state().m; }) {
        return optimizer.state();
      } else {
        ADD_FAILURE() << "expected AdamW";
        return typename xax::optim::AdamW<Weights<float>>::State{};
      }
    });
  };
  const auto moments_before = adamw_state();
  EXPECT_FALSE(trainer.train_step(target).finite);
  EXPECT_TRUE(bitwise_equal(trainer.params().w, masters_before.w)) << "a skipped step changes no master";
  trainer.with_compute_params([&](const auto& compute) {
    EXPECT_TRUE(bitwise_equal(compute.w, compute_before.w)) << "nor the copy";
  });
  const auto moments_after = adamw_state();
  EXPECT_EQ(moments_after.step, moments_before.step);
  EXPECT_TRUE(bitwise_equal(moments_after.m.w, moments_before.m.w));
  EXPECT_TRUE(bitwise_equal(moments_after.v.w, moments_before.v.w));
  target.value(7) = 0.5f;
  trainer.train_step(target);

  trainer.load_train_state(xax::CheckpointReader(path));
  std::filesystem::remove(path);
  EXPECT_TRUE(trainer.params().w == saved.w);
  expect_compute_copy_is_cast_of_masters(trainer, "after load_train_state");
}

TYPED_TEST(TrainStepCompute, AllHalfPoliciesHandOverShapedGradientsOnBothPaths) {
  // Params, compute and output all in the half type: the compute copy is the masters themselves, and a
  // trainer writing half gradients still gets a buffer shaped like them (it throws otherwise).
  using AllHalf = xax::Policy<TypeParam, TypeParam, TypeParam>;
  Regression<AllHalf, false> cast(ones(5), plain_sgd);
  Regression<AllHalf, true> direct(ones(5), plain_sgd);
  const Target target{Eigen::VectorXf::Constant(5, 0.5f)};
  EXPECT_TRUE(cast.train_step(target).finite);
  EXPECT_TRUE(direct.train_step(target).finite);
  EXPECT_EQ(cast.grads_dtype, xax::dtype_of<TypeParam>);
  EXPECT_EQ(direct.grads_dtype, xax::DType::float32);
  // SGD at lr 1 with gradient 1 - 0.5: both land on 0.5, exact in every type.
  EXPECT_EQ(cast.params().w(4), TypeParam(0.5f));
  EXPECT_EQ(direct.params().w(4), TypeParam(0.5f));
}

TYPED_TEST(TrainStepCompute, AccumulationAveragesMicroBatchesOnBothPaths) {
  // Gradients 1 - 0.5 and 1 - 0.25 average to 0.625 (exact in every type): SGD at lr 1 gives 0.375. Two
  // steps, so the accumulation buffer is also reused.
  const std::vector<Target> micro_batches{Target{Eigen::VectorXf::Constant(3, 0.5f)},
                                          Target{Eigen::VectorXf::Constant(3, 0.25f)}};
  HalfRegression<TypeParam, true> direct(ones(3), plain_sgd);
  HalfRegression<TypeParam, false> cast(ones(3), plain_sgd);
  direct.train_step(std::span<const Target>(micro_batches));
  cast.train_step(std::span<const Target>(micro_batches));
  EXPECT_EQ(direct.params().w(2), 0.375f);
  EXPECT_EQ(cast.params().w(2), 0.375f);
  // From 0.375 (0.375 in the compute type too): gradients -0.125 and 0.125 average to 0, so w stays.
  direct.train_step(std::span<const Target>(micro_batches));
  EXPECT_EQ(direct.params().w(2), 0.375f);
}

TEST(TrainStep, HalfParametersAreUpdatedInFloatAndRoundedOnce) {
  // float16 params with SGD at lr 1: the update runs on an fp32 working copy, w - g in float, then rounds.
  using AllHalf = Regression<xax::Policy<xax::float16, xax::float16, xax::float16>, true>;
  AllHalf trainer(ones(2), plain_sgd);
  trainer.train_step(Target{Eigen::VectorXf::Constant(2, 2.0f / 3.0f)});
  EXPECT_EQ(trainer.grads_dtype, xax::DType::float32);
  const float gradient = 1.0f - static_cast<float>(xax::float16(2.0f / 3.0f));
  EXPECT_EQ(trainer.params().w(0), xax::float16(1.0f - gradient));
}

TEST(TrainStep, GradNormOfHugeFiniteGradientsIsFinite) {
  // Each squared gradient (1e30^2) overflows float; the norm 1e30 * sqrt(8) does not.
  using Float = Regression<xax::Policy<float, float, float>, false>;
  Float trainer(Weights<float>{Eigen::VectorXf::Constant(8, 1e30f)},
                xax::optim::SgdOptions{.learning_rate = 0.0, .momentum = 0.0, .weight_decay = 0.0});
  const xax::StepResult result = trainer.train_step(Target{Eigen::VectorXf::Zero(8)});
  ASSERT_TRUE(result.finite);
  EXPECT_NEAR(result.grad_norm, 1e30 * std::sqrt(8.0), 1e-6 * 1e30 * std::sqrt(8.0));
}

TEST(TrainStep, GradNormIsTheGlobalL2NormOverLongLeaves) {
  using Float = Regression<xax::Policy<float, float, float>, false>;
  const Eigen::Index n = 100'003;
  Float trainer(ones(n), xax::optim::SgdOptions{.learning_rate = 0.0, .momentum = 0.0, .weight_decay = 0.0});
  // Gradients 1 - 0.25 = 0.75 (exact): the norm is 0.75 sqrt(n).
  const xax::StepResult result = trainer.train_step(Target{Eigen::VectorXf::Constant(n, 0.25f)});
  EXPECT_NEAR(result.grad_norm, 0.75 * std::sqrt(static_cast<double>(n)),
              1e-9 * std::sqrt(static_cast<double>(n)));
}

using FloatRegression = Regression<xax::Policy<float, float, float>, false>;

template <class Trainer>
auto adamw_state(const Trainer& trainer) {
  return trainer.visit_optimizer([](const auto& optimizer) {
    if constexpr (requires { optimizer.state().m; }) {
      return optimizer.state();
    } else {
      ADD_FAILURE() << "expected AdamW";
      return typename xax::optim::AdamW<Weights<float>>::State{};
    }
  });
}

TEST(TrainStep, NonFiniteLossWithFiniteGradientsSkipsButLeavesTheScaleAlone) {
  // DESIGN §4: the scale follows the gradients alone. A NaN loss with finite gradients skips the step and
  // reports it, but neither backs the scale off nor counts towards LossScaleError.
  const xax::DynamicLossScaleOptions options{.initial_scale = 1024, .growth_interval = 2};
  FloatRegression trainer(ones(6), xax::optim::AdamWOptions{.learning_rate = 0.01},
                          xax::DynamicLossScale(options), {.max_overflows_at_min_scale = 1});
  const Target target{Eigen::VectorXf::Constant(6, 0.5f)};
  ASSERT_TRUE(trainer.train_step(target).finite);
  const auto masters_before = trainer.params();
  const auto moments_before = adamw_state(trainer);

  trainer.reported_loss = std::numeric_limits<double>::quiet_NaN();
  const xax::StepResult skipped = trainer.train_step(target);
  EXPECT_FALSE(skipped.finite);
  EXPECT_EQ(skipped.skipped_steps, 1);
  EXPECT_EQ(trainer.skipped_steps(), 1);
  EXPECT_EQ(trainer.train_step_calls(), 2);
  EXPECT_THAT(skipped.non_finite, ::testing::HasSubstr("loss is nan"));
  EXPECT_EQ(skipped.grad_norm, std::numeric_limits<double>::infinity());
  EXPECT_EQ(trainer.current_loss_scale(), 2048.0f)
      << "finite gradients count as a finite step for the scale: the 2nd of growth_interval 2 grows it";
  EXPECT_TRUE(bitwise_equal(trainer.params().w, masters_before.w)) << "the step is skipped";
  const auto moments_after = adamw_state(trainer);
  EXPECT_EQ(moments_after.step, moments_before.step);
  EXPECT_TRUE(bitwise_equal(moments_after.m.w, moments_before.m.w));
  EXPECT_TRUE(bitwise_equal(moments_after.v.w, moments_before.v.w));

  // At a static scale (always at its floor) with max_overflows_at_min_scale = 1, one overflow would throw:
  // non-finite losses alone never do.
  FloatRegression fixed(ones(2), plain_sgd, xax::StaticLossScale(1), {.max_overflows_at_min_scale = 1});
  fixed.reported_loss = std::numeric_limits<double>::infinity();
  for (int i = 0; i < 3; ++i) EXPECT_FALSE(fixed.train_step(Target{Eigen::VectorXf::Zero(2)}).finite);
  EXPECT_EQ(fixed.skipped_steps(), 3);
  EXPECT_TRUE(fixed.params().w == ones(2).w);
}

TEST(TrainStep, NonFiniteGradientsStillBackTheScaleOff) {
  const xax::DynamicLossScaleOptions options{.initial_scale = 1024, .growth_interval = 2};
  FloatRegression trainer(ones(2), plain_sgd, xax::DynamicLossScale(options));
  const xax::StepResult result =
      trainer.train_step(Target{Eigen::VectorXf::Constant(2, std::numeric_limits<float>::infinity())});
  EXPECT_FALSE(result.finite);
  EXPECT_EQ(result.loss_scale, 1024.0f);
  EXPECT_EQ(trainer.current_loss_scale(), 512.0f);
}

TEST(TrainStep, LossScaleErrorLeavesTheStepUntakenAndTheCountsConsistent) {
  // The step that reaches max_overflows_at_min_scale throws before it changes anything, so a caller that
  // counts only returned steps agrees with steps() afterwards.
  const xax::DynamicLossScaleOptions options{.initial_scale = 2, .min_scale = 1, .hysteresis = 2};
  FloatRegression trainer(ones(2), plain_sgd, xax::DynamicLossScale(options),
                          {.max_overflows_at_min_scale = 2});
  const Target overflowing{Eigen::VectorXf::Constant(2, std::numeric_limits<float>::infinity())};
  std::int64_t returned = 0;
  // Scale 2, hysteresis 2: the first overflow is absorbed, the second backs off to the floor of 1; the
  // overflows at 1 count, and the second of them throws.
  for (int i = 0; i < 3; ++i) {
    EXPECT_FALSE(trainer.train_step(overflowing).finite);
    ++returned;
  }
  EXPECT_EQ(trainer.current_loss_scale(), 1.0f);
  const xax::DynamicLossScaleState state_before =
      std::get<xax::DynamicLossScale>(trainer.loss_scaler()).state();
  EXPECT_THAT([&] { (void)trainer.train_step(overflowing); },
              ::testing::ThrowsMessage<xax::LossScaleError>(
                  ::testing::HasSubstr("2 consecutive steps overflowed with the loss scale at 1,")));
  EXPECT_EQ(trainer.train_step_calls(), returned);
  EXPECT_EQ(trainer.skipped_steps(), 3);
  const xax::DynamicLossScaleState state_after =
      std::get<xax::DynamicLossScale>(trainer.loss_scaler()).state();
  EXPECT_EQ(state_after.counter, state_before.counter);
  EXPECT_EQ(state_after.hysteresis_left, state_before.hysteresis_left);
  EXPECT_TRUE(trainer.params().w == ones(2).w);
  // Retrying throws again (nothing moved); a finite step then trains and resets the overflow count.
  EXPECT_THROW((void)trainer.train_step(overflowing), xax::LossScaleError);
  EXPECT_EQ(trainer.train_step_calls(), 3);
  EXPECT_TRUE(trainer.train_step(Target{Eigen::VectorXf::Zero(2)}).finite);
  EXPECT_EQ(trainer.train_step_calls(), 4);
  EXPECT_FALSE(trainer.train_step(overflowing).finite) << "the overflow count started again from 0";
}

// A trainer whose hook or gradients go wrong on demand. A step that throws after the finiteness check must
// change nothing: not the params, not the optimizer, not the counts, and not the number the next update's
// stochastic rounding is keyed by.
template <class Policy>
class FaultyRegression : public xax::TrainStep<FaultyRegression<Policy>, Policy, xax::LossScale> {
 public:
  template <class T>
  using params_type = Weights<T>;
  using batch_type = Target;
  enum class Fault { none, hook_throws, gradient_too_short };

  FaultyRegression(const Weights<float>& initial, xax::TrainStepOptions options) {
    this->reset_train_state(initial, xax::optim::AdamWOptions{.learning_rate = 0.01}, xax::NoOpLossScale{},
                            options);
  }

  template <class T>
  double loss_and_grads(const Weights<T>& params, const Target& target, float scale, Weights<T>& grads) {
    gradient_size_given = grads.w.size();
    const Eigen::VectorXf difference = params.w.template cast<float>() - target.value;
    grads.w = (difference * scale).template cast<T>();
    if (fault == Fault::gradient_too_short) grads.w.conservativeResize(grads.w.size() - 1);
    return 0.5 * difference.template cast<double>().squaredNorm();
  }
  void on_unscaled_gradients(Weights<float>& /*grads*/, const xax::UnscaledGradients& /*info*/) {
    if (fault == Fault::hook_throws) throw std::runtime_error("the hook failed");
  }

  [[nodiscard]] std::int64_t optimizer_steps() const {
    return this->template optimizer<xax::optim::AdamW<Weights<float>>>().state().step;
  }

  Fault fault = Fault::none;
  Eigen::Index gradient_size_given = -1;
};

template <class Policy>
class TrainStepThrowing : public ::testing::Test {
 protected:
  using Trainer = FaultyRegression<Policy>;
  // Stochastic rounding of half masters is keyed by the update's number: a count moved by a step that threw
  // would round every later update differently from a run that never saw it.
  static constexpr xax::TrainStepOptions options{
      .master_rounding = xax::optim::MasterRounding::stochastic_rounding, .rounding_seed = 7};
  Trainer faulty{ones(5), options};
  Trainer reference{ones(5), options};
  const Target first{Eigen::VectorXf::LinSpaced(5, -1.0f, 1.0f)};
  const Target second{Eigen::VectorXf::LinSpaced(5, 2.0f, 0.5f)};

  void expect_same_state(const char* when) {
    EXPECT_TRUE(bitwise_equal(faulty.params().w, reference.params().w)) << when;
    EXPECT_EQ(faulty.train_step_calls(), reference.train_step_calls()) << when;
    EXPECT_EQ(faulty.applied_steps(), reference.applied_steps()) << when;
    EXPECT_EQ(faulty.skipped_steps(), reference.skipped_steps()) << when;
    EXPECT_EQ(faulty.optimizer_steps(), faulty.applied_steps())
        << when << ": applied_steps() is the optimizer's";
  }
  // The reference takes `second` once; the faulty trainer, after its throw, takes it too.
  void expect_the_next_step_as_without_the_throw() {
    expect_same_state("after the throw");
    faulty.fault = Trainer::Fault::none;
    EXPECT_TRUE(faulty.train_step(second).finite);
    EXPECT_EQ(faulty.gradient_size_given, 5) << "the next call got the params' shapes";
    EXPECT_TRUE(reference.train_step(second).finite);
    expect_same_state("after the next step");
  }
};
using ThrowingPolicies = ::testing::Types<xax::Policy<float>, xax::Policy<float, xax::bfloat16, float>,
                                          xax::Policy<xax::bfloat16>, xax::Policy<xax::float16>>;
TYPED_TEST_SUITE(TrainStepThrowing, ThrowingPolicies);

TYPED_TEST(TrainStepThrowing, AHookThatThrowsLeavesTheStepUntaken) {
  ASSERT_TRUE(this->faulty.train_step(this->first).finite);
  ASSERT_TRUE(this->reference.train_step(this->first).finite);
  this->faulty.fault = TestFixture::Trainer::Fault::hook_throws;
  EXPECT_THAT([&] { (void)this->faulty.train_step(this->second); },
              ::testing::ThrowsMessage<std::runtime_error>(::testing::StrEq("the hook failed")));
  this->expect_the_next_step_as_without_the_throw();
}

TYPED_TEST(TrainStepThrowing, GradientsNotShapedLikeTheParamsAreNamedAndTheNextStepRecovers) {
  ASSERT_TRUE(this->faulty.train_step(this->first).finite);
  ASSERT_TRUE(this->reference.train_step(this->first).finite);
  this->faulty.fault = TestFixture::Trainer::Fault::gradient_too_short;
  EXPECT_THAT([&] { (void)this->faulty.train_step(this->second); },
              ::testing::ThrowsMessage<xax::ShapeError>(::testing::StartsWith(
                  "xax::TrainStep: loss_and_grads wrote gradients that are not shaped like the params (tree "
                  "leaves do not match at 'w': shape 5x1 vs 4x1")));
  this->expect_the_next_step_as_without_the_throw();
}

TEST(TrainStep, AccumulatedGradientsAreUnscaledByOneOverScaleTimesKRoundedOnce) {
  // scale 1000.37 (as a float) and k = 3: 1 / (scale * 3) computed in double and rounded once is
  // 0x1.5d6564p-12; every way of computing it in float is one ulp above.
  const float scale = 1000.37f;
  const float expected = 0x1.5d6564p-12f;
  ASSERT_EQ(xax::detail::reciprocal(scale, 3), expected);
  volatile float k = 3.0f;  // keeps the compiler from folding the float alternatives in higher precision
  EXPECT_NE(expected, (1.0f / scale) / k);
  EXPECT_NE(expected, xax::detail::reciprocal(scale) / k);
  EXPECT_NE(expected, (1.0f / scale) * (1.0f / k));
  EXPECT_NE(expected, 1.0f / (scale * k));

  // w = 0 and SGD at lr 1, so w becomes minus the unscaled gradient, exactly. The first micro-batch's target
  // 1/scale makes its scaled gradient -(1/scale) * scale = -1 in float; the other two contribute 0. The
  // summed gradient -1 times the unscale factor is minus the factor itself.
  const float first_target = 1.0f / scale;
  ASSERT_EQ(first_target * scale, 1.0f);
  const std::vector<Target> micro_batches{Target{Eigen::VectorXf::Constant(1, first_target)},
                                          Target{Eigen::VectorXf::Zero(1)}, Target{Eigen::VectorXf::Zero(1)}};
  FloatRegression trainer(Weights<float>{Eigen::VectorXf::Zero(1)}, plain_sgd, xax::StaticLossScale(scale));
  ASSERT_TRUE(trainer.train_step(std::span<const Target>(micro_batches)).finite);
  EXPECT_EQ(trainer.params().w(0), expected);
}

// fp32 gradients of 3e38 have a global norm (1.2e39, taken in double) beyond FLT_MAX, so the clip factor
// max_norm / norm is below the smallest normal float: rounded to float before the multiply, it lost its
// digits (1e-6) or became 0 (1e-7, so the masters did not move at all).
TEST(TrainStep, ClippingHugeFiniteGradientsKeepsTheClipFactorsDigits) {
  for (const double max_norm : {1.0, 1e-6, 1e-7}) {
    FloatRegression trainer(Weights<float>{Eigen::VectorXf::Zero(16)}, plain_sgd, xax::NoOpLossScale{},
                            {.max_grad_norm = max_norm});
    const xax::StepResult result = trainer.train_step(Target{Eigen::VectorXf::Constant(16, -3e38f)});
    ASSERT_TRUE(result.finite);
    ASSERT_GT(result.grad_norm, static_cast<double>(FLT_MAX));
    // SGD at lr 1 from w = 0: w is minus the clipped gradient, whose norm is max_norm.
    EXPECT_NEAR(trainer.params().w.cast<double>().norm(), max_norm, max_norm * 1e-6) << max_norm;
  }
}

TEST(TrainStep, InvalidOptionsAreReportedWithTheirExactValue) {
  EXPECT_THAT(
      [] { FloatRegression trainer(ones(1), plain_sgd, xax::NoOpLossScale{}, {.max_grad_norm = -1e-9}); },
      ::testing::ThrowsMessage<xax::ConfigError>(
          ::testing::HasSubstr("max_grad_norm -1e-09 is not accepted")));
}

// ---------------------------------------------------------------------------------------------------------------
// Any loss scale plugs in

// A user's loss scale: halves on overflow down to 1, doubles after `every` consecutive finite steps up to
// `cap`. It has no default constructor and no at_min_scale() (TrainStep asks a copy), and checkpoints through
// its own state tree.
class CappedGrowthScale {
 public:
  static constexpr std::string_view kind = "capped";
  struct State {
    float scale = 1;
    std::int64_t finite_run = 0;
    std::int64_t every = 1;
    float cap = 1;
    XAX_FIELDS(scale, finite_run, every, cap);
    friend bool operator==(const State&, const State&) = default;
  };
  using state_type = State;

  CappedGrowthScale(float scale, std::int64_t every, float cap) : state_{scale, 0, every, cap} {}
  static CappedGrowthScale from_state(const State& state) {
    if (!(state.every >= 1 && state.cap >= 1 && state.scale >= 1 && state.scale <= state.cap &&
          state.finite_run >= 0 && state.finite_run < state.every)) {
      throw xax::ConfigError("CappedGrowthScale: impossible state, scale " +
                             xax::detail::shortest_text(state.scale));
    }
    CappedGrowthScale restored(state.scale, state.every, state.cap);
    restored.state_ = state;
    return restored;
  }
  [[nodiscard]] State state() const { return state_; }

  [[nodiscard]] float loss_scale() const { return state_.scale; }
  [[nodiscard]] float inverse_scale() const { return xax::detail::reciprocal(state_.scale); }
  template <class T>
  [[nodiscard]] T scale(const T& x) const {
    return xax::detail::scaled_copy(x, state_.scale);
  }
  template <class T>
  [[nodiscard]] T unscale(const T& x) const {
    return xax::detail::scaled_copy(x, inverse_scale());
  }
  void adjust(bool finite) {
    if (!finite) {
      state_.finite_run = 0;
      state_.scale = std::max(1.0f, state_.scale / 2);
    } else if (++state_.finite_run == state_.every) {
      state_.finite_run = 0;
      state_.scale = std::min(state_.cap, state_.scale * 2);
    }
  }

 private:
  State state_;
};
static_assert(xax::checkpointable_loss_scale<CappedGrowthScale>);
static_assert(!std::default_initializable<CappedGrowthScale>);

template <class L>
class ScaledRegression : public xax::TrainStep<ScaledRegression<L>, xax::Policy<float>, L> {
 public:
  template <class T>
  using params_type = Weights<T>;
  using batch_type = Target;

  ScaledRegression(const Weights<float>& initial, L loss_scale, xax::TrainStepOptions options = {}) {
    this->reset_train_state(initial, xax::optim::SgdOptions{.learning_rate = 0.25, .momentum = 0.5},
                            std::move(loss_scale), options);
  }

  template <class T>
  double loss_and_grads(const Weights<T>& params, const Target& target, float scale, Weights<T>& grads) {
    const Eigen::VectorXf difference = params.w.template cast<float>() - target.value;
    grads.w = (difference * scale).template cast<T>();
    return 0.5 * difference.template cast<double>().squaredNorm();
  }
};

const Target finite_target{Eigen::VectorXf::Constant(3, 0.5f)};
const Target overflowing_target{Eigen::VectorXf::Constant(3, std::numeric_limits<float>::infinity())};

// Runs `steps` ("F" finite, "x" overflow) and returns the scale after each.
template <class Trainer>
std::vector<float> run(Trainer& trainer, std::string_view steps) {
  std::vector<float> scales;
  for (const char step : steps) {
    const xax::StepResult result = trainer.train_step(step == 'F' ? finite_target : overflowing_target);
    EXPECT_EQ(result.finite, step == 'F');
    scales.push_back(trainer.current_loss_scale());
  }
  return scales;
}

TEST(TrainStepUserLossScale, TrainsThroughTrainStep) {
  ScaledRegression<CappedGrowthScale> trainer(ones(3), CappedGrowthScale(8, 2, 32));
  EXPECT_EQ(run(trainer, "FFFFFFxxF"), (std::vector<float>{8, 16, 16, 32, 32, 32, 16, 8, 8}));
  EXPECT_EQ(trainer.train_step_calls(), 9);
  EXPECT_EQ(trainer.skipped_steps(), 2);
  EXPECT_EQ(trainer.applied_steps(), 7);
  EXPECT_EQ(trainer.visit_optimizer([](const auto& optimizer) { return optimizer.state().step; }), 7)
      << "applied_steps() is the optimizer's step count";
  EXPECT_EQ(trainer.loss_scaler().state().finite_run, 1);
}

TEST(TrainStepUserLossScale, WithoutAtMinScaleAnOverflowThatCannotLowerTheScaleCounts) {
  ScaledRegression<CappedGrowthScale> trainer(ones(3), CappedGrowthScale(2, 100, 32),
                                              {.max_overflows_at_min_scale = 2});
  // At 2 an overflow still halves the scale, so it does not count; at 1 the next two do, and the second
  // throws.
  EXPECT_EQ(run(trainer, "xx"), (std::vector<float>{1, 1}));
  EXPECT_THAT([&] { (void)trainer.train_step(overflowing_target); },
              ::testing::ThrowsMessage<xax::LossScaleError>(
                  ::testing::HasSubstr("2 consecutive steps overflowed with the loss scale at 1,")));
  EXPECT_EQ(trainer.train_step_calls(), 2);
}

class TrainStepLossScaleCheckpoint : public ::testing::Test {
 protected:
  void TearDown() override { std::filesystem::remove(path_); }
  std::filesystem::path path_ = unique_temp_path("loss_scale");
};

TEST_F(TrainStepLossScaleCheckpoint, AUserLossScaleResumesBitIdentically) {
  ScaledRegression<CappedGrowthScale> uninterrupted(ones(3), CappedGrowthScale(8, 3, 64));
  run(uninterrupted, "FFxFF");
  xax::CheckpointWriter writer;
  uninterrupted.save_train_state(writer);
  writer.write(path_);
  const std::string rest = "FxFFFFFFFxF";
  const std::vector<float> expected = run(uninterrupted, rest);

  const xax::CheckpointReader reader(path_);
  EXPECT_EQ(reader.read_string("train.loss_scale_kind"), "capped");
  EXPECT_TRUE(reader.contains("train.loss_scale.finite_run"));
  ScaledRegression<CappedGrowthScale> resumed(ones(3), CappedGrowthScale(1, 1, 1));
  resumed.load_train_state(reader);
  EXPECT_EQ(resumed.loss_scaler().state(), (CappedGrowthScale::State{4, 2, 3, 64}));
  EXPECT_EQ(run(resumed, rest), expected);
  EXPECT_TRUE(bitwise_equal(resumed.params().w, uninterrupted.params().w));
  EXPECT_EQ(resumed.loss_scaler().state(), uninterrupted.loss_scaler().state());
  EXPECT_EQ(resumed.train_step_calls(), uninterrupted.train_step_calls());
  EXPECT_EQ(resumed.skipped_steps(), uninterrupted.skipped_steps());
}

TEST_F(TrainStepLossScaleCheckpoint, AnotherKindOrAnImpossibleStateIsACheckpointError) {
  ScaledRegression<CappedGrowthScale> written(ones(3), CappedGrowthScale(8, 3, 64));
  run(written, "FF");
  xax::CheckpointWriter writer;
  written.save_train_state(writer);
  writer.write(path_);

  ScaledRegression<xax::DynamicLossScale> dynamic(ones(3), xax::DynamicLossScale());
  EXPECT_THAT([&] { dynamic.load_train_state(xax::CheckpointReader(path_)); },
              ::testing::ThrowsMessage<xax::CheckpointError>(
                  ::testing::HasSubstr("a loss scale of kind 'capped', but this train step uses 'dynamic'")));
  ScaledRegression<xax::LossScale> variant(ones(3), xax::LossScale(xax::StaticLossScale(4)));
  EXPECT_THAT([&] { variant.load_train_state(xax::CheckpointReader(path_)); },
              ::testing::ThrowsMessage<xax::CheckpointError>(
                  ::testing::HasSubstr("kind 'capped', which the LossScale variant does not hold")));
  EXPECT_EQ(variant.current_loss_scale(), 4.0f);

  xax_test::edit_checkpoint(path_, [](std::vector<xax_test::RawEntry>& entries) {
    xax_test::entry_named(entries, "train.loss_scale.scale").payload = xax_test::pod_bytes(128.0f);
  });
  ScaledRegression<CappedGrowthScale> live(ones(3), CappedGrowthScale(2, 5, 16));
  EXPECT_THAT(
      [&] { live.load_train_state(xax::CheckpointReader(path_)); },
      ::testing::ThrowsMessage<xax::CheckpointError>(::testing::HasSubstr(
          "entry 'train.loss_scale' holds a loss scale no run can reach: CappedGrowthScale: impossible "
          "state, scale 128")));
  EXPECT_EQ(live.loss_scaler().state(), (CappedGrowthScale::State{2, 0, 5, 16}));
}

// The commit hook runs once, after every check and before anything changes: a throw from it (as when
// another process of a data-parallel run could not load) leaves the whole state as it was, and a checkpoint
// that fails a check never reaches it.
TEST_F(TrainStepLossScaleCheckpoint, TheCommitHookRunsAfterTheChecksAndAThrowFromItChangesNothing) {
  ScaledRegression<CappedGrowthScale> written(ones(3), CappedGrowthScale(8, 3, 64));
  run(written, "FFxF");
  xax::CheckpointWriter writer;
  written.save_train_state(writer);
  writer.write(path_);

  ScaledRegression<CappedGrowthScale> live(ones(3), CappedGrowthScale(2, 5, 16));
  run(live, "F");
  const auto masters = live.params();
  const auto state = live.loss_scaler().state();
  // SGD's step count and momentum: the optimizer state a load replaces.
  const auto sgd_state = [&live] {
    std::pair<std::int64_t, Eigen::VectorXf> step_and_momentum;
    live.visit_optimizer([&](const auto& optimizer) {
      if constexpr (requires { optimizer.state().momentum_buffer.w; }) {
        step_and_momentum = {optimizer.state().step, optimizer.state().momentum_buffer.w};
      } else {
        ADD_FAILURE() << "expected SGD";
      }
    });
    return step_and_momentum;
  };
  const auto optimizer_state = sgd_state();
  int calls = 0;
  const xax::LoadCommitHook refuse{[&calls] {
    ++calls;
    throw xax::CheckpointError("another process could not load");
  }};
  EXPECT_THAT(
      [&] { live.load_train_state(xax::CheckpointReader(path_), refuse); },
      ::testing::ThrowsMessage<xax::CheckpointError>(::testing::HasSubstr("another process could not load")));
  EXPECT_EQ(calls, 1);
  EXPECT_TRUE(bitwise_equal(live.params().w, masters.w));
  EXPECT_EQ(live.loss_scaler().state(), state);
  EXPECT_EQ(live.train_step_calls(), 1);
  EXPECT_EQ(live.skipped_steps(), 0);
  EXPECT_EQ(sgd_state().first, optimizer_state.first);
  EXPECT_TRUE(bitwise_equal(sgd_state().second, optimizer_state.second));

  ScaledRegression<xax::DynamicLossScale> other_kind(ones(3), xax::DynamicLossScale());
  EXPECT_THROW(other_kind.load_train_state(xax::CheckpointReader(path_), refuse), xax::CheckpointError);
  EXPECT_EQ(calls, 1) << "a checkpoint that fails a check never reaches the hook";

  const xax::LoadCommitHook count{[&calls] { ++calls; }};
  live.load_train_state(xax::CheckpointReader(path_), count);
  EXPECT_EQ(calls, 2);
  EXPECT_TRUE(bitwise_equal(live.params().w, written.params().w));
  EXPECT_EQ(live.loss_scaler().state(), written.loss_scaler().state());
  EXPECT_EQ(live.train_step_calls(), 4);
}

// Checkpoints written before the per-kind state trees stored one record for every kind
// (train.loss_scale.kind, .scale, .counter, ... .hysteresis); they still load, into the variant and into the
// kind's own TrainStep.
TEST_F(TrainStepLossScaleCheckpoint, TheOldRecordFormStillLoads) {
  xax::DynamicLossScaleOptions options{
      .initial_scale = 64, .growth_interval = 3, .min_scale = 2, .hysteresis = 2};
  ScaledRegression<xax::LossScale> uninterrupted(ones(3), xax::LossScale(xax::DynamicLossScale(options)));
  run(uninterrupted, "FFFFxF");
  const xax::DynamicLossScaleState saved =
      std::get<xax::DynamicLossScale>(uninterrupted.loss_scaler()).state();
  ASSERT_EQ(saved.hysteresis_left, 1);
  xax::CheckpointWriter writer;
  uninterrupted.save_train_state(writer);
  writer.write(path_);
  xax_test::edit_checkpoint(path_, [&](std::vector<xax_test::RawEntry>& entries) {
    std::erase_if(entries,
                  [](const xax_test::RawEntry& e) { return e.name.starts_with("train.loss_scale"); });
    const xax::detail::LossScaleRecord record{.kind = 2,
                                              .scale = saved.scale,
                                              .counter = saved.counter,
                                              .hysteresis_left = saved.hysteresis_left,
                                              .initial_scale = options.initial_scale,
                                              .growth_interval = options.growth_interval,
                                              .growth_factor = options.growth_factor,
                                              .backoff_factor = options.backoff_factor,
                                              .min_scale = options.min_scale,
                                              .max_scale = options.max_scale,
                                              .hysteresis = options.hysteresis};
    xax::CheckpointWriter legacy;
    legacy.add_tree("train.loss_scale", record);
    for (const xax_test::RawEntry& e : xax_test::entries_of(legacy.bytes())) entries.push_back(e);
  });
  const xax::CheckpointReader reader(path_);
  ASSERT_FALSE(reader.contains("train.loss_scale_kind"));
  ASSERT_TRUE(reader.contains("train.loss_scale.kind"));

  const std::string rest = "xFFFxxF";
  const std::vector<float> expected = run(uninterrupted, rest);
  ScaledRegression<xax::LossScale> resumed(ones(3), xax::LossScale());
  resumed.load_train_state(reader);
  EXPECT_EQ(std::get<xax::DynamicLossScale>(resumed.loss_scaler()).state(), saved);
  EXPECT_EQ(run(resumed, rest), expected);
  EXPECT_TRUE(bitwise_equal(resumed.params().w, uninterrupted.params().w));

  ScaledRegression<xax::DynamicLossScale> own_kind(ones(3), xax::DynamicLossScale());
  own_kind.load_train_state(reader);
  EXPECT_EQ(own_kind.loss_scaler().state(), saved);
  ScaledRegression<xax::StaticLossScale> other_kind(ones(3), xax::StaticLossScale(4));
  EXPECT_THAT([&] { other_kind.load_train_state(reader); },
              ::testing::ThrowsMessage<xax::CheckpointError>(
                  ::testing::HasSubstr("a loss scale of kind 'dynamic', but this train step uses 'static'")));
  ScaledRegression<CappedGrowthScale> user(ones(3), CappedGrowthScale(2, 5, 16));
  EXPECT_THAT([&] { user.load_train_state(reader); },
              ::testing::ThrowsMessage<xax::CheckpointError>(::testing::HasSubstr(
                  "has no entry 'train.loss_scale_kind': it was written before loss scales of other kinds")));
}

TEST(TrainStepSetLossScale, SetsTheScaleTheNextStepUses) {
  const xax::DynamicLossScaleOptions options{
      .initial_scale = 1024, .growth_interval = 2, .min_scale = 4, .max_scale = 4096};
  ScaledRegression<xax::LossScale> trainer(ones(3), xax::LossScale(xax::DynamicLossScale(options)));
  run(trainer, "F");
  trainer.set_loss_scale(100);
  EXPECT_EQ(trainer.current_loss_scale(), 100.0f);
  EXPECT_EQ(std::get<xax::DynamicLossScale>(trainer.loss_scaler()).counter(), 0) << "the counter restarts";
  EXPECT_EQ(trainer.train_step(finite_target).loss_scale, 100.0f);
  EXPECT_EQ(run(trainer, "FFF"), (std::vector<float>{200, 200, 400}));

  const xax::DynamicLossScaleState before = std::get<xax::DynamicLossScale>(trainer.loss_scaler()).state();
  for (const float bad : {2.0f, 8192.0f, std::numeric_limits<float>::infinity()}) {
    EXPECT_THAT([&] { trainer.set_loss_scale(bad); },
                ::testing::ThrowsMessage<xax::ConfigError>(::testing::HasSubstr("[4, 4096]")));
    EXPECT_EQ(std::get<xax::DynamicLossScale>(trainer.loss_scaler()).state(), before);
  }

  ScaledRegression<xax::StaticLossScale> fixed(ones(3), xax::StaticLossScale(8));
  fixed.set_loss_scale(0.125f);
  EXPECT_EQ(fixed.train_step(finite_target).loss_scale, 0.125f);

  ScaledRegression<xax::NoOpLossScale> none(ones(3), xax::NoOpLossScale());
  EXPECT_THAT([&] { none.set_loss_scale(2); },
              ::testing::ThrowsMessage<xax::ConfigError>(::testing::HasSubstr(
                  "set_loss_scale(2): a loss scale of kind 'none' cannot be set by hand")));
  ScaledRegression<CappedGrowthScale> user(ones(3), CappedGrowthScale(2, 5, 16));
  EXPECT_THAT([&] { user.set_loss_scale(4); }, ::testing::ThrowsMessage<xax::ConfigError>(
                                                   ::testing::HasSubstr("kind 'capped' cannot be set")));
  EXPECT_EQ(user.current_loss_scale(), 2.0f);
}

// Overflows at one scale do not count toward LossScaleError at a scale set by hand: the error would name the
// new scale as having overflowed more often than it did.
TEST(TrainStepSetLossScale, RestartsTheCountOfOverflowsAtTheMinimumScale) {
  ScaledRegression<xax::StaticLossScale> fixed(ones(3), xax::StaticLossScale(8),
                                               {.max_overflows_at_min_scale = 2});
  EXPECT_EQ(run(fixed, "x"), (std::vector<float>{8}));
  fixed.set_loss_scale(4);
  EXPECT_EQ(run(fixed, "x"), (std::vector<float>{4})) << "the first overflow at 4, not the second";
  EXPECT_THAT([&] { (void)fixed.train_step(overflowing_target); },
              ::testing::ThrowsMessage<xax::LossScaleError>(
                  ::testing::HasSubstr("2 consecutive steps overflowed with the loss scale at 4,")));
}

// The state lives behind a plain pointer (Derived is incomplete where TrainStep is defined), so copies and
// moves must carry it whole: a copy trains on independently of its original, and a trainer moved after its
// first step (the moved-from one destroyed, which ASan reports if anything still pointed into it) trains on
// as if it had never moved.
TEST(TrainStep, CopiesAndMovesCarryTheWholeState) {
  ScaledRegression<xax::LossScale> original(
      ones(3), xax::LossScale(xax::DynamicLossScale({.initial_scale = 8, .growth_interval = 2})));
  run(original, "FxF");
  ScaledRegression<xax::LossScale> copied(original);
  ScaledRegression<xax::LossScale> assigned(ones(2), xax::LossScale(xax::NoOpLossScale()));
  assigned = original;
  auto moved_from = std::make_unique<ScaledRegression<xax::LossScale>>(original);
  ScaledRegression<xax::LossScale> moved(std::move(*moved_from));
  moved_from.reset();

  const std::vector<float> expected = run(original, "FFxFF");
  for (auto* trainer : {&copied, &assigned, &moved}) {
    EXPECT_EQ(run(*trainer, "FFxFF"), expected);
    EXPECT_TRUE(bitwise_equal(trainer->params().w, original.params().w));
    EXPECT_EQ(trainer->train_step_calls(), original.train_step_calls());
    EXPECT_EQ(trainer->skipped_steps(), original.skipped_steps());
  }
  EXPECT_EQ(original.train_step_calls(), 8) << "the copies' steps did not reach the original";
}

// The step counts: train_step_calls() = applied_steps() + skipped_steps(), and the spellings they replace
// (steps(), and loss_scale() for the loss-scale object, now loss_scaler()) still compile, with a
// deprecation warning that this test silences, and return the same.
TEST(TrainStepNames, TheDeprecatedSpellingsReturnWhatTheNewNamesDo) {
  ScaledRegression<CappedGrowthScale> trainer(ones(3), CappedGrowthScale(8, 2, 32));
  run(trainer, "FxFFx");
  EXPECT_EQ(trainer.train_step_calls(), 5);
  EXPECT_EQ(trainer.applied_steps() + trainer.skipped_steps(), trainer.train_step_calls());
  EXPECT_EQ(trainer.skipped_steps(), 2);
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  EXPECT_EQ(trainer.steps(), trainer.train_step_calls());
  EXPECT_EQ(&trainer.loss_scale(), &trainer.loss_scaler()) << "the same object";
#pragma GCC diagnostic pop
  EXPECT_EQ(trainer.loss_scaler().loss_scale(), trainer.current_loss_scale());
}

}  // namespace
