// xax::TrainStep directly, on a trainer small enough that every expected value is exact: the compute copy
// the optimizer keeps current, the cast-free path for trainers that write fp32 gradients, and the global
// gradient norm. The end-to-end behaviour (convergence, skipping, loss scaling, resume) is in
// test_mixed_precision_train.cpp.

#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <concepts>
#include <cstring>
#include <filesystem>
#include <limits>
#include <span>
#include <string>
#include <vector>
#include <xax/task/train_step.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/policy.hpp>
#include <xax/utils/tree.hpp>

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
             xax::LossScale loss_scale = xax::NoOpLossScale{}) {
    this->reset_train_state(initial, optimizer, std::move(loss_scale));
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
    return 0.5 * difference.template cast<double>().squaredNorm();
  }

  xax::DType grads_dtype = xax::DType::float64;  // none seen yet
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

}  // namespace
