// The open core of the train step (DESIGN §11): a user-written optimizer plugs into TrainStep and
// MixedPrecisionMixin through the same door as AdamW and SGD, with its state checkpointed and left alone by
// skipped steps. Every expected value is exact (powers of two).

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <string_view>
#include <utility>
#include <vector>
#include <xax/task/mixins/mixed_precision.hpp>
#include <xax/task/mixins/train.hpp>
#include <xax/task/train_step.hpp>
#include <xax/utils/tree.hpp>
#include <xax/utils/tree_cast.hpp>

namespace {

template <class T>
struct Weights {
  Eigen::Matrix<T, Eigen::Dynamic, 1> w;
  Eigen::Matrix<T, Eigen::Dynamic, 1> b;
  XAX_FIELDS(w, b);
};

struct Target {
  Eigen::VectorXf w;
  Eigen::VectorXf b;
};

struct LionOptions {
  double learning_rate = 0.125;
  double beta1 = 0.5;
  double beta2 = 0.75;
  double weight_decay = 0.5;
};

template <class Params>
struct LionState {
  std::int64_t step = 0;
  Params m;
  XAX_FIELDS(step, m);
};

// Lion (Chen et al. 2023), as a user would write it against xax's tree API: c = b1 m + (1 - b1) g;
// p = p (1 - lr wd) - lr sign(c); m = b2 m + (1 - b2) g.
template <class Params>
class Lion {
 public:
  explicit Lion(const Params& like, LionOptions options = {}) : options_(options) {
    state_.m = xax::zeros_like(like);
  }

  void step(Params& params, const Params& grads) {
    xax::for_each_leaf(
        [&]<class L>(L& p, const L& g, L& m) {
          if constexpr (xax::floating_leaf<L>) {
            using S = xax::leaf_scalar_t<L>;
            const auto decay = static_cast<S>(1.0 - options_.learning_rate * options_.weight_decay);
            const auto lr = static_cast<S>(options_.learning_rate);
            const auto b1 = static_cast<S>(options_.beta1), b2 = static_cast<S>(options_.beta2);
            auto ps = xax::leaf_span(p);
            const auto gs = xax::leaf_span(g);
            auto ms = xax::leaf_span(m);
            for (std::size_t i = 0; i < ps.size(); ++i) {
              const S c = b1 * ms[i] + (S(1) - b1) * gs[i];
              const S sign = c > S(0) ? S(1) : (c < S(0) ? S(-1) : S(0));
              ps[i] = ps[i] * decay - lr * sign;
              ms[i] = b2 * ms[i] + (S(1) - b2) * gs[i];
            }
          }
        },
        params, grads, state_.m);
    ++state_.step;
  }

  [[nodiscard]] const LionState<Params>& state() const { return state_; }
  [[nodiscard]] LionState<Params>& state() { return state_; }
  void set_learning_rate(double learning_rate) { options_.learning_rate = learning_rate; }
  [[nodiscard]] double learning_rate() const { return options_.learning_rate; }
  [[nodiscard]] static const char* name() { return "lion"; }

 private:
  LionOptions options_;
  LionState<Params> state_;
};

// loss = 0.5 |p - target|^2 over both leaves, so d(loss * scale)/dp = (p - target) * scale.
template <class Policy>
class Regression : public xax::TrainStep<Regression<Policy>, Policy, xax::LossScale> {
 public:
  template <class T>
  using params_type = Weights<T>;
  using batch_type = Target;

  template <class OptimizerSource>
  Regression(const Weights<float>& initial, OptimizerSource&& optimizer) {
    this->reset_train_state(initial, std::forward<OptimizerSource>(optimizer), xax::NoOpLossScale{});
  }

  template <class T>
  double loss_and_grads(const Weights<T>& params, const Target& target, float scale, Weights<T>& grads) {
    const Eigen::VectorXf dw = params.w.template cast<float>() - target.w;
    const Eigen::VectorXf db = params.b.template cast<float>() - target.b;
    grads.w = (dw * scale).template cast<T>();
    grads.b = (db * scale).template cast<T>();
    return 0.5 * static_cast<double>(dw.squaredNorm() + db.squaredNorm());
  }
};

Weights<float> initial_weights() {
  return {Eigen::Vector2f(1.0f, -2.0f), Eigen::Vector2f(0.5f, 0.0f)};
}
Target zero_target() {
  return {Eigen::Vector2f::Zero(), Eigen::Vector2f::Zero()};
}

// The mixin tasks' loss_and_grads: (params - target) * scale, the scaled gradient of half the squared
// distance to the target; the loss itself is reported as 0.
template <class T>
double scaled_distance_grads(const Weights<T>& params, const Target& target, float scale, Weights<T>& grads) {
  grads.w = ((params.w.template cast<float>() - target.w) * scale).template cast<T>();
  grads.b = ((params.b.template cast<float>() - target.b) * scale).template cast<T>();
  return 0;
}

template <class A, class B>
bool bitwise_equal(const A& a, const B& b) {
  return a.size() == b.size() &&
         std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(*a.data())) == 0;
}

template <class Policy>
class UserOptimizer : public ::testing::Test {};
using Policies =
    ::testing::Types<xax::Policy<float, float, float>, xax::Policy<float, xax::bfloat16, float>,
                     xax::Policy<xax::bfloat16, xax::bfloat16, float>, xax::Policy<double, float, double>>;
TYPED_TEST_SUITE(UserOptimizer, Policies);

template <class Policy>
using UpdateParams = Weights<typename Regression<Policy>::update_type>;

// Lion with lr 1/8, wd 1/2 (decay 15/16), b1 1/2, b2 3/4, from w = (1, -2), b = (1/2, 0), target 0:
//   step 1: g = (1, -2 | 1/2, 0), c = g / 2 -> sign (1, -1 | 1, 0); p = (13/16, -7/4 | 11/32, 0);
//           m = g / 4 = (1/4, -1/2 | 1/8, 0)
//   step 2: g = p, c = (17/32, -9/8 | 15/64, 0) -> sign (1, -1 | 1, 0); p = (163/256, -97/64 | 101/512, 0)
TYPED_TEST(UserOptimizer, LionTrainsThroughTrainStepWithExactValues) {
  using Params = UpdateParams<TypeParam>;
  Regression<TypeParam> trainer(initial_weights(), [](const Params& like) { return Lion<Params>(like); });
  using Param = typename Regression<TypeParam>::param_type;
  using Compute = typename Regression<TypeParam>::compute_type;
  EXPECT_TRUE(trainer.train_step(zero_target()).finite);
  EXPECT_EQ(trainer.params().w, (Eigen::Matrix<Param, 2, 1>(Param(0.8125), Param(-1.75))));
  EXPECT_EQ(trainer.params().b, (Eigen::Matrix<Param, 2, 1>(Param(0.34375), Param(0))));
  const auto& lion = trainer.template optimizer<Lion<Params>>();
  EXPECT_EQ(lion.state().step, 1);
  EXPECT_EQ(lion.state().m.w, (Eigen::Matrix<typename Regression<TypeParam>::update_type, 2, 1>(0.25, -0.5)));

  trainer.train_step(zero_target());
  EXPECT_EQ(trainer.params().w, (Eigen::Matrix<Param, 2, 1>(Param(163.0 / 256), Param(-97.0 / 64))));
  EXPECT_EQ(trainer.params().b, (Eigen::Matrix<Param, 2, 1>(Param(101.0 / 512), Param(0))));
  // Lion writes no compute copy itself; TrainStep casts the masters after its step.
  trainer.with_compute_params([&](const auto& compute) {
    EXPECT_EQ(compute.w, trainer.params().w.template cast<Compute>());
    EXPECT_EQ(compute.b, trainer.params().b.template cast<Compute>());
  });
  EXPECT_EQ(trainer.learning_rate(), 0.125);
  trainer.set_learning_rate(0.25);
  EXPECT_EQ(trainer.learning_rate(), 0.25);
}

TYPED_TEST(UserOptimizer, AnOptimizerObjectPlugsInAsWellAsAFactory) {
  using Params = UpdateParams<TypeParam>;
  Params like = xax::tree_cast<typename Regression<TypeParam>::update_type>(initial_weights());
  Regression<TypeParam> trainer(initial_weights(), Lion<Params>(like));
  trainer.train_step(zero_target());
  EXPECT_EQ(trainer.params().w(0), typename Regression<TypeParam>::param_type(0.8125));
}

}  // namespace

namespace {
using Params = Weights<float>;
using FloatRegression = Regression<xax::Policy<float, float, float>>;
FloatRegression lion_trainer() {
  return FloatRegression(initial_weights(), [](const Params& like) { return Lion<Params>(like); });
}

TEST(UserOptimizer, LionStateIsCheckpointedAndRestoredBitIdentically) {
  FloatRegression trainer = lion_trainer();
  trainer.train_step(zero_target());
  xax::CheckpointWriter writer;
  trainer.save_train_state(writer);
  const auto reader = xax::CheckpointReader::from_bytes(writer.bytes());
  EXPECT_EQ(reader.read_string("train.optimizer"), "lion");

  FloatRegression restored = lion_trainer();
  restored.load_train_state(reader);
  const auto& saved_state = trainer.optimizer<Lion<Params>>().state();
  const auto& loaded_state = restored.optimizer<Lion<Params>>().state();
  EXPECT_EQ(loaded_state.step, 1);
  EXPECT_TRUE(bitwise_equal(loaded_state.m.w, saved_state.m.w));
  EXPECT_TRUE(bitwise_equal(loaded_state.m.b, saved_state.m.b));
  // Both continue identically.
  trainer.train_step(zero_target());
  restored.train_step(zero_target());
  EXPECT_TRUE(bitwise_equal(restored.params().w, trainer.params().w));
  EXPECT_TRUE(bitwise_equal(restored.optimizer<Lion<Params>>().state().m.w,
                            trainer.optimizer<Lion<Params>>().state().m.w));

  // A Lion checkpoint is refused by an AdamW run, which is left as it was.
  FloatRegression adamw(initial_weights(), xax::optim::AdamWOptions{});
  try {
    adamw.load_train_state(reader);
    FAIL() << "expected CheckpointError";
  } catch (const xax::CheckpointError& error) {
    EXPECT_STREQ(error.what(), "checkpoint was written with optimizer lion, not adamw");
  }
  EXPECT_EQ(adamw.params().w, initial_weights().w);
}

// float params with a double compute copy (get_policy accepts "params=float32,compute=float64"): the built-in
// optimizers' half-master update was instantiated for the double copy and failed to compile. The gradients
// here do not depend on the compute type, so the run is bit for bit the all-float one.
TEST(UserOptimizer, BuiltInOptimizersTrainFloatParamsWithADoubleComputeCopy) {
  using DoubleCompute = Regression<xax::Policy<float, double, float>>;
  for (const bool sgd : {false, true}) {
    const auto optimizer = [sgd]() -> xax::OptimizerOptions {
      if (sgd) return xax::optim::SgdOptions{.learning_rate = 0.25, .momentum = 0.5};
      return xax::optim::AdamWOptions{.learning_rate = 0.25};
    };
    DoubleCompute mixed(initial_weights(), optimizer());
    FloatRegression reference(initial_weights(), optimizer());
    for (int step = 0; step < 3; ++step) {
      mixed.train_step(zero_target());
      reference.train_step(zero_target());
    }
    EXPECT_TRUE(bitwise_equal(mixed.params().w, reference.params().w)) << (sgd ? "Sgd" : "AdamW");
    EXPECT_TRUE(bitwise_equal(mixed.params().b, reference.params().b)) << (sgd ? "Sgd" : "AdamW");
  }
}

// A name() returning std::string_view is a name: it was taken for none ("custom"), so a checkpoint of this
// optimizer loaded into a run of any other unnamed one without a word.
struct LionNamedByAView : Lion<Params> {
  using Lion<Params>::Lion;
  [[nodiscard]] static std::string_view name() { return "lion_by_view"; }
};

TEST(UserOptimizer, ANameReturnedAsAStringViewIsRecordedAndChecked) {
  FloatRegression trainer(initial_weights(), [](const Params& like) { return LionNamedByAView(like); });
  trainer.train_step(zero_target());
  xax::CheckpointWriter writer;
  trainer.save_train_state(writer);
  const auto reader = xax::CheckpointReader::from_bytes(writer.bytes());
  EXPECT_EQ(reader.read_string("train.optimizer"), "lion_by_view");
  FloatRegression lion = lion_trainer();
  EXPECT_THROW(lion.load_train_state(reader), xax::CheckpointError);
}

TEST(UserOptimizer, ANegativeStepCountInTheCheckpointIsRefused) {
  FloatRegression trainer = lion_trainer();
  trainer.train_step(zero_target());
  xax::CheckpointWriter writer;
  LionState<Params> corrupt = trainer.optimizer<Lion<Params>>().state();
  corrupt.step = -3;
  writer.add_string("train.policy", trainer.policy().str());
  writer.add_string("train.optimizer", "lion");
  writer.add_tree("train.params", trainer.params());
  writer.add_tree("train.optimizer_state", corrupt);
  FloatRegression other = lion_trainer();
  try {
    other.load_train_state(xax::CheckpointReader::from_bytes(writer.bytes()));
    FAIL() << "expected CheckpointError";
  } catch (const xax::CheckpointError& error) {
    EXPECT_STREQ(
        error.what(),
        "checkpoint entry 'train.optimizer_state.step' is -3; an optimizer's step count is >= 0 and < "
        "9223372036854775807 (the next step adds one)");
  }
  EXPECT_EQ(other.optimizer<Lion<Params>>().state().step, 0);
}

TEST(UserOptimizer, ASkippedStepLeavesLionStateBitIdentical) {
  FloatRegression trainer = lion_trainer();
  trainer.train_step(zero_target());
  const LionState<Params> before = trainer.optimizer<Lion<Params>>().state();
  const Weights<float> masters_before = trainer.params();
  Target poisoned = zero_target();
  poisoned.b(1) = std::numeric_limits<float>::quiet_NaN();
  EXPECT_FALSE(trainer.train_step(poisoned).finite);
  const LionState<Params>& after = trainer.optimizer<Lion<Params>>().state();
  EXPECT_EQ(after.step, before.step);
  EXPECT_TRUE(bitwise_equal(after.m.w, before.m.w));
  EXPECT_TRUE(bitwise_equal(after.m.b, before.m.b));
  EXPECT_TRUE(bitwise_equal(trainer.params().w, masters_before.w));
}

TEST(UserOptimizer, VisitOptimizerNamesTheUserOptimizerItCannotVisit) {
  FloatRegression trainer = lion_trainer();
  EXPECT_THROW(trainer.visit_optimizer([](const auto& optimizer) { return optimizer.state().step; }),
               xax::Error);
  EXPECT_THROW((void)trainer.optimizer<xax::optim::AdamW<Params>>(), xax::Error);
  FloatRegression adamw(initial_weights(), xax::optim::AdamWOptions{});
  EXPECT_EQ(adamw.visit_optimizer([](const auto& optimizer) { return optimizer.state().step; }), 0);
  EXPECT_EQ(adamw.learning_rate(), 1e-3);
}

// The built-in optimizers still record their names, so that existing checkpoints stay loadable.
TEST(UserOptimizer, BuiltInOptimizersKeepTheirCheckpointNames) {
  FloatRegression adamw(initial_weights(), xax::optim::AdamWOptions{});
  FloatRegression sgd(initial_weights(), xax::optim::SgdOptions{});
  xax::CheckpointWriter a, s;
  adamw.save_train_state(a);
  sgd.save_train_state(s);
  EXPECT_EQ(xax::CheckpointReader::from_bytes(a.bytes()).read_string("train.optimizer"), "adamw");
  EXPECT_EQ(xax::CheckpointReader::from_bytes(s.bytes()).read_string("train.optimizer"), "sgd");
}

// MixedPrecisionMixin: a task's make_optimizer replaces the config's optimizer, under every policy.
struct MixinConfig : xax::MixedPrecisionConfig {
  [[nodiscard]] xax::OptimizerOptions optimizer_options() const { return xax::optim::AdamWOptions{}; }
};

// The policies the mixin tasks below run: float32, both halves of "mixed" (whichever half_dtype() this CPU
// prefers) and float16. Listing them compiles four TrainSteps per task instead of nine.
using TestedPolicies = xax::PolicyList<xax::Policy<float>, xax::Policy<float, xax::bfloat16, float>,
                                       xax::Policy<float, xax::float16, float>, xax::Policy<xax::float16>>;

class LionTask : public xax::MixedPrecisionMixin<LionTask, MixinConfig> {
 public:
  using compiled_policies = TestedPolicies;
  template <class T>
  using params_type = Weights<T>;
  using batch_type = Target;

  explicit LionTask(MixinConfig config) : config_(std::move(config)) {}
  const MixinConfig& config() const { return config_; }
  Weights<float> init_params() const { return initial_weights(); }
  Lion<Weights<float>> make_optimizer(const Weights<float>& like) const { return Lion<Weights<float>>(like); }

  template <class T>
  double loss_and_grads(const Weights<T>& params, const Target& target, float scale, Weights<T>& grads) {
    return scaled_distance_grads(params, target, scale, grads);
  }

 private:
  MixinConfig config_;
};

TEST(UserOptimizer, MixedPrecisionTaskTrainsWithItsOwnOptimizer) {
  for (const char* policy : {"float32", "mixed", "float16"}) {
    MixinConfig config;
    config.enable_mixed_precision = true;
    config.precision_policy = policy;
    config.loss_scaling = "static";
    config.loss_scale_value = 1024;
    LionTask task(config);
    task.train_step(zero_target());
    task.train_step(zero_target());
    EXPECT_EQ(task.params_float32().w, Eigen::Vector2f(163.0f / 256, -97.0f / 64)) << policy;
    EXPECT_EQ(task.params_float32().b, Eigen::Vector2f(101.0f / 512, 0.0f)) << policy;
    xax::CheckpointWriter writer;
    task.save_train_state(writer);
    EXPECT_EQ(xax::CheckpointReader::from_bytes(writer.bytes()).read_string("train.optimizer"), "lion");
  }
}

// Parameter groups through TrainStep: with zero gradients (target = params) AdamW only decays, p * (1 - 1/8 *
// 1/2) = p * 15/16, and the bias is left alone; the fused bf16 compute copy follows.
TEST(ParamGroupsInTrainStep, TheBiasIsNotDecayedWhileTheWeightIs) {
  using MixedRegression = Regression<xax::Policy<float, xax::bfloat16, float>>;
  MixedRegression trainer(initial_weights(),
                          xax::optim::AdamWOptions{.learning_rate = 0.125,
                                                   .weight_decay = 0.5,
                                                   .groups = xax::optim::ParamGroups{}.no_weight_decay_if(
                                                       xax::optim::is_bias_or_norm)});
  const Weights<float> start = initial_weights();
  EXPECT_TRUE(trainer.train_step(Target{start.w, start.b}).finite);
  EXPECT_EQ(trainer.params().w, Eigen::Vector2f(0.9375f, -1.875f));
  EXPECT_EQ(trainer.params().b, Eigen::Vector2f(0.5f, 0.0f));
  trainer.with_compute_params([](const auto& compute) {
    EXPECT_EQ(compute.w(1), xax::bfloat16(-1.875f));
    EXPECT_EQ(compute.b(0), xax::bfloat16(0.5f));
  });
}

// on_unscaled_gradients: sees the unscaled fp32 gradients and their norm on finite steps, before the update.
class HookedRegression
    : public xax::TrainStep<HookedRegression, xax::Policy<float, xax::bfloat16, float>, xax::LossScale> {
 public:
  template <class T>
  using params_type = Weights<T>;
  using batch_type = Target;
  static constexpr bool writes_fp32_gradients = true;

  explicit HookedRegression(xax::OptimizerOptions optimizer) {
    reset_train_state(initial_weights(), optimizer, xax::StaticLossScale(1024.0f));
  }

  template <class T, class G>
  requires(std::same_as<G, T> ||
           std::same_as<G, float>) double loss_and_grads(const Weights<T>& params, const Target& target,
                                                         float scale, Weights<G>& grads) {
    grads_are_float = std::same_as<G, float>;
    grads.w = ((params.w.template cast<float>() - target.w) * scale).template cast<G>();
    grads.b = ((params.b.template cast<float>() - target.b) * scale).template cast<G>();
    return 0;
  }

  void on_unscaled_gradients(Weights<float>& grads, const xax::UnscaledGradients& info) {
    ++hook_calls;
    seen = grads;
    seen_norm = info.norm;
    if (double_the_bias) grads.b *= 2.0f;
  }

  bool grads_are_float = false;
  bool double_the_bias = false;
  int hook_calls = 0;
  Weights<float> seen;
  double seen_norm = 0;
};

// From w = (1, -2), b = (1/2, 0) towards 0 with the loss scaled by 1024: the hook sees (1, -2 | 1/2, 0)
// unscaled, norm sqrt(1 + 4 + 1/4) = sqrt(21) / 2.
TEST(UnscaledGradientsHook, SeesTheUnscaledGradientsAndTheirNormOnFiniteStepsOnly) {
  HookedRegression trainer(xax::optim::SgdOptions{.learning_rate = 0.5});
  const xax::StepResult result = trainer.train_step(zero_target());
  EXPECT_TRUE(trainer.grads_are_float) << "the declared fp32-gradient path";
  EXPECT_EQ(trainer.hook_calls, 1);
  EXPECT_EQ(trainer.seen.w, Eigen::Vector2f(1.0f, -2.0f));
  EXPECT_EQ(trainer.seen.b, Eigen::Vector2f(0.5f, 0.0f));
  EXPECT_NEAR(trainer.seen_norm, std::sqrt(21.0) / 2, 1e-12);
  EXPECT_EQ(result.grad_norm, trainer.seen_norm);

  Target poisoned = zero_target();
  poisoned.w(0) = std::numeric_limits<float>::infinity();
  EXPECT_FALSE(trainer.train_step(poisoned).finite);
  EXPECT_EQ(trainer.hook_calls, 1) << "a skipped step does not reach the hook";
}

// What the hook leaves is what the optimizer sees: SGD with lr 1/2 and the bias gradient doubled moves
// b = 1/2 by 1/2 * 2 * 1/2 = 1/2, to 0, and w by half its gradient, to (1/2, -1).
TEST(UnscaledGradientsHook, GradientsChangedInTheHookChangeTheUpdate) {
  HookedRegression trainer(xax::optim::SgdOptions{.learning_rate = 0.5});
  trainer.double_the_bias = true;
  trainer.train_step(zero_target());
  EXPECT_EQ(trainer.params().w, Eigen::Vector2f(0.5f, -1.0f));
  EXPECT_EQ(trainer.params().b, Eigen::Vector2f(0.0f, 0.0f));
}

// compiled_policies: a config that asks for an unlisted policy is refused before anything runs, naming what
// it asked for and what the task compiles.
template <class Listed>
class ListedPoliciesTask : public xax::MixedPrecisionMixin<ListedPoliciesTask<Listed>, MixinConfig> {
 public:
  using compiled_policies = Listed;
  template <class T>
  using params_type = Weights<T>;
  using batch_type = Target;

  explicit ListedPoliciesTask(MixinConfig config) : config_(std::move(config)) {}
  const MixinConfig& config() const { return config_; }
  Weights<float> init_params() const {
    ++init_params_calls;
    return initial_weights();
  }

  template <class T>
  double loss_and_grads(const Weights<T>& params, const Target& target, float scale, Weights<T>& grads) {
    return scaled_distance_grads(params, target, scale, grads);
  }

  mutable int init_params_calls = 0;

 private:
  MixinConfig config_;
};

TEST(CompiledPolicies, ATaskTrainsUnderEachListedPairWithAnyOutput) {
  using Task = ListedPoliciesTask<xax::PolicyList<xax::Policy<float>, xax::Policy<xax::bfloat16>>>;
  using xax::DType;
  // The output dtype is applied at run time: a listed params x compute pair runs with any output.
  for (const auto& [policy, expected] :
       {std::pair{"float32", xax::PolicySpec{DType::float32, DType::float32, DType::float32}},
        std::pair{"bfloat16", xax::PolicySpec{DType::bfloat16, DType::bfloat16, DType::bfloat16}},
        std::pair{"params=float32,output=float16",
                  xax::PolicySpec{DType::float32, DType::float32, DType::float16}},
        std::pair{"params=bfloat16,output=float32",
                  xax::PolicySpec{DType::bfloat16, DType::bfloat16, DType::float32}}}) {
    MixinConfig config;
    config.enable_mixed_precision = true;
    config.precision_policy = policy;
    config.loss_scaling = "none";
    Task task(config);
    EXPECT_TRUE(task.train_step(zero_target()).finite) << policy;
    EXPECT_EQ(task.policy(), expected) << policy;
    EXPECT_EQ(task.init_params_calls, 1) << policy;
  }
}

TEST(CompiledPolicies, AnUnlistedPairIsAConfigErrorBeforeInitParams) {
  using Task =
      ListedPoliciesTask<xax::PolicyList<xax::Policy<float>, xax::Policy<float, xax::bfloat16, float>>>;
  MixinConfig config;
  config.enable_mixed_precision = true;
  config.precision_policy = "float16";
  Task task(config);
  try {
    task.train_step(zero_target());
    FAIL() << "expected ConfigError";
  } catch (const xax::ConfigError& error) {
    EXPECT_STREQ(
        error.what(),
        "config field 'precision_policy': 'float16' (params=float16,compute=float16,output=float16) is "
        "not accepted by this task; expected a policy with the params and compute of one of its "
        "compiled_policies: params=float32,compute=float32 | params=float32,compute=bfloat16; to run it, "
        "list xax::Policy<xax::float16, xax::float16> in compiled_policies");
  }
  EXPECT_EQ(task.init_params_calls, 0);
}

TEST(CompiledPolicies, DisabledMixedPrecisionNeedsFloat32Listed) {
  using Task = ListedPoliciesTask<xax::PolicyList<xax::Policy<float, xax::bfloat16, float>>>;
  MixinConfig config;
  config.enable_mixed_precision = false;
  Task task(config);
  EXPECT_THAT(
      [&] { task.train_step(zero_target()); },
      ::testing::ThrowsMessage<xax::ConfigError>(::testing::HasSubstr(
          "config field 'enable_mixed_precision': false (params=float32,compute=float32,output=float32) "
          "is not accepted by this task; expected a policy with the params and compute of one of its "
          "compiled_policies: params=float32,compute=bfloat16; to run it, list xax::Policy<float, float>")));
  EXPECT_EQ(task.init_params_calls, 0);
}

// The mixin forwards the task's hook.
class HookedLionTask : public xax::MixedPrecisionMixin<HookedLionTask, MixinConfig> {
 public:
  using compiled_policies = TestedPolicies;
  template <class T>
  using params_type = Weights<T>;
  using batch_type = Target;

  const MixinConfig& config() const { return config_; }
  Weights<float> init_params() const { return initial_weights(); }

  template <class T>
  double loss_and_grads(const Weights<T>& params, const Target& target, float scale, Weights<T>& grads) {
    return scaled_distance_grads(params, target, scale, grads);
  }
  void on_unscaled_gradients(Weights<float>& grads, const xax::UnscaledGradients&) { seen = grads; }

  MixinConfig config_;
  Weights<float> seen;
};

TEST(UnscaledGradientsHook, MixedPrecisionMixinForwardsTheTaskHook) {
  HookedLionTask task;
  task.config_.enable_mixed_precision = true;
  task.config_.precision_policy = "mixed";
  task.config_.loss_scaling = "static";
  task.config_.loss_scale_value = 256;
  task.train_step(zero_target());
  EXPECT_EQ(task.seen.w, Eigen::Vector2f(1.0f, -2.0f));
  EXPECT_EQ(task.seen.b, Eigen::Vector2f(0.5f, 0.0f));
}

// Half-precision masters: a constant gradient of 2^-13 at lr 1 moves a master of 1 by an eighth of the ulp
// below 1 (2^-11), which round-to-nearest loses every time.
struct Vector {
  Eigen::VectorXf v;
};

template <class Half>
class ConstantGradient
    : public xax::TrainStep<ConstantGradient<Half>, xax::Policy<Half, Half, float>, xax::NoOpLossScale> {
 public:
  template <class T>
  using params_type = Weights<T>;
  using batch_type = Vector;

  ConstantGradient(xax::optim::MasterRounding rounding, Eigen::Index n, std::uint64_t seed = 0) {
    this->reset_train_state(Weights<float>{Eigen::VectorXf::Ones(n), Eigen::VectorXf::Ones(1)},
                            xax::optim::SgdOptions{.learning_rate = 1.0}, xax::NoOpLossScale{},
                            {.master_rounding = rounding, .rounding_seed = seed});
  }
  template <class T>
  double loss_and_grads(const Weights<T>&, const Vector& gradient, float, Weights<T>& grads) {
    grads.w = gradient.v.template cast<T>();
    grads.b = gradient.v.head(1).template cast<T>();
    return 0;
  }
};

template <class Half>
class MasterRounding : public ::testing::Test {};
using HalfScalars = ::testing::Types<xax::float16, xax::bfloat16>;
TYPED_TEST_SUITE(MasterRounding, HalfScalars);

// The ulp just below 1: 2^-11 for float16, 2^-8 for bfloat16; the gradient is an eighth of it.
template <class Half>
constexpr float ulp_below_one = std::is_same_v<Half, xax::float16> ? 0x1p-11f : 0x1p-8f;

TYPED_TEST(MasterRounding, NearestLosesTheSmallUpdates) {
  constexpr float step = ulp_below_one<TypeParam> / 8;
  ConstantGradient<TypeParam> trainer(xax::optim::MasterRounding::round_to_nearest, 4);
  for (int i = 0; i < 16; ++i) trainer.train_step(Vector{Eigen::VectorXf::Constant(4, step)});
  EXPECT_EQ(trainer.params().w(0), TypeParam(1.0f));
}

// Kahan: master + compensation holds the exact sum of the updates, and the master is its nearest half value
// (ties to even): after 16 steps of 1/8 ulp, 1 - 2 ulp exactly; 5 steps later 1 - 2 5/8 ulp, so 1 - 3 ulp.
TYPED_TEST(MasterRounding, KahanMovesTheMasterByTheSumOfTheUpdates) {
  constexpr float u = ulp_below_one<TypeParam>;
  ConstantGradient<TypeParam> trainer(xax::optim::MasterRounding::kahan, 4);
  for (int i = 0; i < 16; ++i) trainer.train_step(Vector{Eigen::VectorXf::Constant(4, u / 8)});
  EXPECT_EQ(trainer.params().w(0), TypeParam(1.0f - 2 * u));

  // The compensation is checkpointed: a restored run continues bit-identically.
  xax::CheckpointWriter writer;
  trainer.save_train_state(writer);
  ConstantGradient<TypeParam> restored(xax::optim::MasterRounding::kahan, 4);
  restored.load_train_state(xax::CheckpointReader::from_bytes(writer.bytes()));
  for (int i = 0; i < 5; ++i) {
    trainer.train_step(Vector{Eigen::VectorXf::Constant(4, u / 8)});
    restored.train_step(Vector{Eigen::VectorXf::Constant(4, u / 8)});
  }
  EXPECT_EQ(restored.params().w(0), trainer.params().w(0));
  EXPECT_EQ(trainer.params().w(0), TypeParam(1.0f - 3 * u));
}

// Stochastic rounding is unbiased: one step of 1/8 ulp moves each of 4096 masters by a whole ulp with
// probability 1/8, and is reproducible from the seed.
TYPED_TEST(MasterRounding, StochasticIsUnbiasedAndReproducible) {
  constexpr float u = ulp_below_one<TypeParam>;
  constexpr Eigen::Index n = 4096;
  ConstantGradient<TypeParam> trainer(xax::optim::MasterRounding::stochastic_rounding, n, 7);
  trainer.train_step(Vector{Eigen::VectorXf::Constant(n, u / 8)});
  Eigen::Index moved = 0;
  for (Eigen::Index i = 0; i < n; ++i) {
    const TypeParam w = trainer.params().w(i);
    EXPECT_TRUE(w == TypeParam(1.0f) || w == TypeParam(1.0f - u)) << i;
    moved += w == TypeParam(1.0f - u) ? 1 : 0;
  }
  // Binomial(4096, 1/8): mean 512, standard deviation 21.
  EXPECT_NEAR(static_cast<double>(moved), 512.0, 5 * 21.2);

  ConstantGradient<TypeParam> same_seed(xax::optim::MasterRounding::stochastic_rounding, n, 7);
  same_seed.train_step(Vector{Eigen::VectorXf::Constant(n, u / 8)});
  EXPECT_TRUE(bitwise_equal(same_seed.params().w, trainer.params().w));
}

// The built-in optimizers update half-precision masters chunk by chunk (step_half_masters), without the fp32
// copy an optimizer behind the door needs. Both ways must give the same bits, in every rounding, and the
// built-in way must not hold the copy.
template <class Half, class Optimizer>
class HalfMasters : public xax::TrainStep<HalfMasters<Half, Optimizer>, xax::Policy<Half, Half, float>,
                                          xax::NoOpLossScale> {
 public:
  template <class T>
  using params_type = Weights<T>;
  using batch_type = Vector;

  HalfMasters(xax::optim::MasterRounding rounding, Optimizer optimizer) {
    // 3000 + 700 elements: several chunks of the update, and leaves that are not whole chunks.
    Eigen::VectorXf w(3000);
    for (Eigen::Index i = 0; i < w.size(); ++i) w(i) = 0.5f + 0.001f * static_cast<float>(i % 997);
    this->reset_train_state(Weights<float>{w, Eigen::VectorXf::Constant(700, -0.25f)}, std::move(optimizer),
                            xax::NoOpLossScale{}, {.master_rounding = rounding, .rounding_seed = 11});
  }
  template <class T>
  double loss_and_grads(const Weights<T>& params, const Vector& noise, float, Weights<T>& grads) {
    grads.w = (params.w.template cast<float>() + noise.v).template cast<T>();
    grads.b = (params.b.template cast<float>() - noise.v.head(700)).template cast<T>();
    return 0;
  }
};

// AdamW behind the optimizer door with only what the door requires: no step_half_masters.
struct AdamWThroughTheDoor {
  xax::optim::AdamW<Weights<float>> adamw;
  void step(Weights<float>& params, const Weights<float>& grads) { adamw.step(params, grads); }
  [[nodiscard]] const auto& state() const { return adamw.state(); }
  [[nodiscard]] auto& state() { return adamw.state(); }
  void set_learning_rate(double learning_rate) { adamw.set_learning_rate(learning_rate); }
  [[nodiscard]] static const char* name() { return "adamw"; }
};

TYPED_TEST(MasterRounding, BuiltInOptimizersUpdateHalfMastersInPlaceWithTheCopysBits) {
  using Half = TypeParam;
  const xax::optim::AdamWOptions options{.learning_rate = 1e-2, .weight_decay = 0.1};
  const Weights<float> like{Eigen::VectorXf::Zero(3000), Eigen::VectorXf::Zero(700)};
  for (const auto rounding :
       {xax::optim::MasterRounding::round_to_nearest, xax::optim::MasterRounding::stochastic_rounding,
        xax::optim::MasterRounding::kahan}) {
    HalfMasters<Half, xax::optim::AdamWOptions> built_in(rounding, options);
    HalfMasters<Half, AdamWThroughTheDoor> through_copy(
        rounding, AdamWThroughTheDoor{xax::optim::AdamW<Weights<float>>(like, options)});
    const Eigen::VectorX<Half> initial_w = built_in.params().w;
    std::mt19937 rng(3);
    for (int step = 0; step < 12; ++step) {
      Vector noise{Eigen::VectorXf(3000)};
      for (auto& x : noise.v) x = std::normal_distribution<float>(0.0f, 0.01f)(rng);
      built_in.train_step(noise);
      through_copy.train_step(noise);
    }
    const auto rounding_name = static_cast<int>(rounding);
    EXPECT_TRUE(bitwise_equal(built_in.params().w, through_copy.params().w)) << "rounding " << rounding_name;
    EXPECT_TRUE(bitwise_equal(built_in.params().b, through_copy.params().b)) << "rounding " << rounding_name;
    EXPECT_FALSE(bitwise_equal(built_in.params().w, initial_w)) << "the masters trained";
    // The copy (4 bytes per parameter) is held only behind the door.
    EXPECT_EQ(through_copy.state_bytes().grads - built_in.state_bytes().grads, 3700 * sizeof(float));
  }
  // Sgd with momentum takes the same path.
  HalfMasters<Half, xax::optim::SgdOptions> sgd(xax::optim::MasterRounding::kahan,
                                                {.learning_rate = 0.1, .momentum = 0.9});
  const Weights<Half> before = sgd.params();
  sgd.train_step(Vector{Eigen::VectorXf::Zero(3000)});
  EXPECT_FALSE(bitwise_equal(sgd.params().w, before.w));
}

// A skipped step changes nothing, stochastic rounding's random stream included: the updates after it round
// as they would have without it, on the built-in half-master path and through the fp32 copy alike.
TYPED_TEST(MasterRounding, ASkippedStepLeavesLaterStochasticRoundingAsItWas) {
  using Half = TypeParam;
  const auto stochastic = xax::optim::MasterRounding::stochastic_rounding;
  const xax::optim::AdamWOptions options{.learning_rate = 1e-2, .weight_decay = 0.1};
  const Weights<float> like{Eigen::VectorXf::Zero(3000), Eigen::VectorXf::Zero(700)};
  const auto noise = [](int step) {
    std::mt19937 rng(static_cast<unsigned>(step));
    Vector v{Eigen::VectorXf(3000)};
    for (auto& x : v.v) x = std::normal_distribution<float>(0.0f, 0.01f)(rng);
    return v;
  };
  Vector poisoned = noise(0);
  poisoned.v(1234) = std::numeric_limits<float>::quiet_NaN();

  HalfMasters<Half, xax::optim::AdamWOptions> built_in(stochastic, options),
      built_in_skipping(stochastic, options);
  const auto door = [&] { return AdamWThroughTheDoor{xax::optim::AdamW<Weights<float>>(like, options)}; };
  HalfMasters<Half, AdamWThroughTheDoor> through_copy(stochastic, door()),
      through_copy_skipping(stochastic, door());
  for (int step = 0; step < 4; ++step) {
    if (step == 2) {
      ASSERT_FALSE(built_in_skipping.train_step(poisoned).finite);
      ASSERT_FALSE(through_copy_skipping.train_step(poisoned).finite);
    }
    for (auto* trainer : {&built_in, &built_in_skipping}) trainer->train_step(noise(step));
    for (auto* trainer : {&through_copy, &through_copy_skipping}) trainer->train_step(noise(step));
  }
  EXPECT_TRUE(bitwise_equal(built_in_skipping.params().w, built_in.params().w));
  EXPECT_TRUE(bitwise_equal(built_in_skipping.params().b, built_in.params().b));
  EXPECT_TRUE(bitwise_equal(through_copy_skipping.params().w, through_copy.params().w));
  EXPECT_TRUE(bitwise_equal(through_copy_skipping.params().b, through_copy.params().b));
}

TEST(MasterRounding, KahanWithoutACompensationTreeIsAClearError) {
  xax::optim::AdamW<Weights<float>> adamw(Weights<float>{Eigen::VectorXf::Zero(4), Eigen::VectorXf::Zero(1)});
  Weights<xax::float16> masters =
      xax::tree_cast<xax::float16>(Weights<float>{Eigen::VectorXf::Ones(4), Eigen::VectorXf::Ones(1)});
  const Weights<float> grads{Eigen::VectorXf::Ones(4), Eigen::VectorXf::Ones(1)};
  try {
    adamw.step_half_masters(masters, grads, {.rounding = xax::optim::MasterRounding::kahan}, nullptr);
    ADD_FAILURE() << "Kahan without a compensation tree was taken";
  } catch (const xax::ConfigError& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("compensation"));
  }
  EXPECT_EQ(adamw.state().step, 0);
}

// A rounding cast from an out-of-range integer matched no branch of the update: the step count moved and
// every parameter stayed as it was.
TEST(MasterRounding, AnUnknownRoundingIsAConfigErrorBeforeAnyUpdate) {
  const auto unknown = static_cast<xax::optim::MasterRounding>(3);
  xax::optim::AdamW<Weights<float>> adamw(Weights<float>{Eigen::VectorXf::Zero(4), Eigen::VectorXf::Zero(1)});
  Weights<xax::float16> masters =
      xax::tree_cast<xax::float16>(Weights<float>{Eigen::VectorXf::Ones(4), Eigen::VectorXf::Ones(1)});
  const Weights<float> grads{Eigen::VectorXf::Ones(4), Eigen::VectorXf::Ones(1)};
  EXPECT_THAT([&] { adamw.step_half_masters(masters, grads, {.rounding = unknown}, nullptr); },
              ::testing::ThrowsMessage<xax::ConfigError>(::testing::HasSubstr(
                  "AdamW::step_half_masters: the rounding 3 is not accepted; give round_to_nearest")));
  EXPECT_EQ(adamw.state().step, 0);

  using Bf16Weights = Weights<xax::bfloat16>;
  const Bf16Weights like = xax::tree_cast<xax::bfloat16>(grads);
  EXPECT_THAT([&] { xax::optim::AdamW<Bf16Weights>(like, {}, {.rounding = unknown}); },
              ::testing::ThrowsMessage<xax::ConfigError>(
                  ::testing::HasSubstr("AdamW: the bf16 update's rounding 3 is not accepted")));
  EXPECT_THAT([&] { xax::optim::Sgd<Bf16Weights>(like, {}, {.rounding = unknown}); },
              ::testing::ThrowsMessage<xax::ConfigError>(
                  ::testing::HasSubstr("Sgd: the bf16 update's rounding 3 is not accepted")));
}

TEST(MasterRounding, ConfigChoosesItAndRefusesOtherNames) {
  MixinConfig config;
  EXPECT_EQ(config.master_rounding, "stochastic");
  EXPECT_EQ(config.train_step_options().master_rounding, xax::optim::MasterRounding::stochastic_rounding);
  config.master_rounding = "kahan";
  EXPECT_EQ(config.train_step_options().master_rounding, xax::optim::MasterRounding::kahan);
  config.master_rounding = "nearest";
  EXPECT_EQ(config.train_step_options().master_rounding, xax::optim::MasterRounding::round_to_nearest);
  config.master_rounding = "up";
  try {
    config.validate_mixed_precision();
    FAIL() << "expected ConfigError";
  } catch (const xax::ConfigError& error) {
    EXPECT_STREQ(
        error.what(),
        "config field 'master_rounding': 'up' is not accepted; expected stochastic, nearest or kahan");
  }
}

}  // namespace

// Batches cast with the params (jmp's cast_to_compute((params, batch))): a trainer that declares
// casts_batch_to_compute receives Batch<T> with the floating leaves rounded to the compute type once and the
// labels copied, for every micro-batch.
template <class T>
struct FeatureBatch {
  Eigen::Matrix<T, Eigen::Dynamic, 1> x;
  Eigen::VectorX<std::int32_t> labels;
  XAX_FIELDS(x, labels);
};

// Whether each batch of `batches` still holds its features: a batch freed by the step is moved-from (empty).
inline std::vector<bool> still_held(const std::vector<FeatureBatch<float>>& batches) {
  std::vector<bool> held;
  for (const auto& batch : batches) held.push_back(batch.x.size() != 0);
  return held;
}

template <class Policy>
class CastBatchTrainer : public xax::TrainStep<CastBatchTrainer<Policy>, Policy, xax::NoOpLossScale> {
 public:
  using Compute = typename Policy::compute_type;
  template <class T>
  using params_type = Weights<T>;
  using batch_type = FeatureBatch<float>;
  static constexpr bool casts_batch_to_compute = true;
  static_assert(std::is_same_v<xax::step_batch_t<CastBatchTrainer, Compute>, FeatureBatch<Compute>>);

  CastBatchTrainer() {
    this->reset_train_state(initial_weights(), xax::optim::SgdOptions{.learning_rate = 0.5}, {});
  }

  // Pulls w towards the batch's features; records what it was given.
  template <class T>
  double loss_and_grads(const Weights<T>& params, const FeatureBatch<T>& batch, float scale,
                        Weights<T>& grads) {
    if (watched != nullptr) held_during_call.push_back(still_held(*watched));
    made_before_call.push_back(made_in.size());
    seen_x.push_back(batch.x.template cast<float>());
    seen_labels.push_back(batch.labels);
    grads.w = ((params.w.template cast<float>() - batch.x.template cast<float>()) * scale).template cast<T>();
    grads.b = Eigen::Matrix<T, Eigen::Dynamic, 1>::Zero(params.b.size());
    return 0;
  }

  // Makes a batch of the given examples in any scalar (xax::makes_batches_in), recording the scalar:
  // features 1 + (e + 1) * 2^-12 (rounded in bf16, kept in float16 and float) and -e, label e.
  template <class T = float>
  FeatureBatch<T> make_batch(std::span<const std::int64_t> examples) const {
    made_in.push_back(xax::dtype_of<T>);
    FeatureBatch<T> batch{Eigen::Matrix<T, Eigen::Dynamic, 1>(2), Eigen::VectorXi(2)};
    const auto e = static_cast<float>(examples.front());
    batch.x << static_cast<T>(1.0f + (e + 1.0f) / 4096.0f), static_cast<T>(-e);
    batch.labels << static_cast<std::int32_t>(examples.front()), 0;
    return batch;
  }

  std::vector<Eigen::VectorXf> seen_x;
  std::vector<Eigen::VectorX<std::int32_t>> seen_labels;
  mutable std::vector<xax::DType> made_in;
  std::vector<std::size_t> made_before_call;  // batches made when each loss_and_grads call began
  // Batches handed over to the step, whose state each loss_and_grads call records (still_held).
  const std::vector<FeatureBatch<float>>* watched = nullptr;
  std::vector<std::vector<bool>> held_during_call;
};

template <class Policy>
class BatchCast : public ::testing::Test {};
using BatchCastPolicies =
    ::testing::Types<xax::Policy<float, float, float>, xax::Policy<float, xax::bfloat16, float>,
                     xax::Policy<xax::float16, xax::float16, xax::float16>>;
TYPED_TEST_SUITE(BatchCast, BatchCastPolicies);

TYPED_TEST(BatchCast, EveryMicroBatchReachesTheTrainerInTheComputeType) {
  using Compute = typename TypeParam::compute_type;
  CastBatchTrainer<TypeParam> trainer;
  // 1 + 2^-12 rounds to 1 in bf16 and stays in float16 and float; -3 is exact in all of them.
  const float fine = 1.0f + 1.0f / 4096.0f;
  const std::vector<FeatureBatch<float>> micro{{Eigen::Vector2f(fine, -3.0f), Eigen::Vector2i(7, -1)},
                                               {Eigen::Vector2f(-3.0f, fine), Eigen::Vector2i(0, 1 << 30)}};
  trainer.train_step(std::span<const FeatureBatch<float>>(micro));
  ASSERT_EQ(trainer.seen_x.size(), 2u);
  const auto rounded = [](float v) { return static_cast<float>(static_cast<Compute>(v)); };
  EXPECT_EQ(trainer.seen_x[0], Eigen::Vector2f(rounded(fine), -3.0f));
  EXPECT_EQ(trainer.seen_x[1], Eigen::Vector2f(-3.0f, rounded(fine)));
  EXPECT_EQ(trainer.seen_labels[0], Eigen::Vector2i(7, -1));
  EXPECT_EQ(trainer.seen_labels[1], Eigen::Vector2i(0, 1 << 30));
  if constexpr (std::is_same_v<Compute, xax::bfloat16>) {
    EXPECT_EQ(trainer.seen_x[0](0), 1.0f);
  }
}

// Batches handed over (an rvalue) are freed one by one as soon as each is cast, so the step never holds a
// batch in both precisions while the trainer runs; with float compute nothing is cast and nothing freed. The
// step itself is the same: same batches seen, same masters.
TYPED_TEST(BatchCast, HandedOverBatchesAreFreedOnceCastAndTrainTheSame) {
  using Compute = typename TypeParam::compute_type;
  constexpr bool casts = !std::is_same_v<Compute, float>;
  const std::vector<FeatureBatch<float>> micro{{Eigen::Vector2f(0.25f, -3.0f), Eigen::Vector2i(1, 2)},
                                               {Eigen::Vector2f(-3.0f, 0.75f), Eigen::Vector2i(3, 4)},
                                               {Eigen::Vector2f(1.5f, 2.0f), Eigen::Vector2i(5, 6)}};
  CastBatchTrainer<TypeParam> viewed;
  viewed.train_step(std::span<const FeatureBatch<float>>(micro));
  CastBatchTrainer<TypeParam> handed;
  std::vector<FeatureBatch<float>> batches = micro;
  handed.watched = &batches;
  handed.train_step(std::move(batches));
  const std::vector<std::vector<bool>> freed_up_to_the_current_one{
      {false, true, true}, {false, false, true}, {false, false, false}};
  EXPECT_EQ(handed.held_during_call, casts ? freed_up_to_the_current_one
                                           : std::vector<std::vector<bool>>(3, std::vector<bool>(3, true)));
  EXPECT_EQ(handed.seen_x, viewed.seen_x);
  EXPECT_EQ(handed.seen_labels, viewed.seen_labels);
  EXPECT_TRUE(bitwise_equal(handed.params().w, viewed.params().w));
  EXPECT_TRUE(bitwise_equal(handed.params().b, viewed.params().b));
  EXPECT_EQ(still_held(batches), std::vector<bool>(3, !casts));
  EXPECT_EQ(still_held(micro), std::vector<bool>(3, true)) << "a viewed batch is never freed";
}

// A trainer that makes its batches in any scalar has train_step_on_examples make each one directly in the
// compute type, just before its forward: a 16-bit step never makes an fp32 batch. It trains exactly as on
// the same batches made in fp32 and cast.
TYPED_TEST(BatchCast, BatchesMadeInTheComputeTypeTrainAsCastOnes) {
  using Compute = typename TypeParam::compute_type;
  const std::vector<std::int64_t> order{4, 0, 7};
  std::vector<std::span<const std::int64_t>> examples;
  for (std::size_t i = 0; i < order.size(); ++i) examples.emplace_back(&order[i], 1);

  CastBatchTrainer<TypeParam> made;
  static_assert(xax::makes_batches_in<CastBatchTrainer<TypeParam>, Compute>);
  made.train_step_on_examples(std::span<const std::span<const std::int64_t>>(examples));
  CastBatchTrainer<TypeParam> cast;
  std::vector<FeatureBatch<float>> micro;
  for (const auto example : examples) micro.push_back(cast.make_batch(example));
  cast.made_before_call.clear();
  cast.train_step(std::span<const FeatureBatch<float>>(micro));

  EXPECT_EQ(made.made_in, std::vector<xax::DType>(3, xax::dtype_of<Compute>));
  EXPECT_EQ(made.made_before_call, (std::vector<std::size_t>{1, 2, 3}))
      << "each made just before its forward";
  EXPECT_EQ(made.seen_x, cast.seen_x);
  EXPECT_EQ(made.seen_labels, cast.seen_labels);
  EXPECT_TRUE(bitwise_equal(made.params().w, cast.params().w));
  EXPECT_TRUE(bitwise_equal(made.params().b, cast.params().b));
  if constexpr (std::is_same_v<Compute, xax::bfloat16>) {
    EXPECT_EQ(made.seen_x[0](0), 1.0f) << "rounded to bf16 when made";
  }
}

// The mixin forwards the declaration: loss_and_grads and evaluate both receive the cast batch.
class CastBatchTask : public xax::MixedPrecisionMixin<CastBatchTask, MixinConfig> {
 public:
  using compiled_policies = TestedPolicies;
  template <class T>
  using params_type = Weights<T>;
  using batch_type = FeatureBatch<float>;
  static constexpr bool casts_batch_to_compute = true;

  explicit CastBatchTask(MixinConfig config) : config_(std::move(config)) {}
  const MixinConfig& config() const { return config_; }
  Weights<float> init_params() const { return initial_weights(); }

  template <class T>
  double loss_and_grads(const Weights<T>& params, const FeatureBatch<T>& batch, float, Weights<T>& grads) {
    grads.w = Eigen::Matrix<T, Eigen::Dynamic, 1>::Zero(params.w.size());
    grads.b = Eigen::Matrix<T, Eigen::Dynamic, 1>::Zero(params.b.size());
    return static_cast<double>(batch.x.template cast<float>().sum());
  }
  template <class T>
  double evaluate(const Weights<T>&, const FeatureBatch<T>& batch) const {
    return static_cast<double>(batch.x.template cast<float>().sum());
  }

 private:
  MixinConfig config_;
};

TEST(BatchCast, TheMixinCastsTheBatchForTrainingAndEvaluation) {
  const float fine = 1.0f + 1.0f / 4096.0f;
  const FeatureBatch<float> batch{Eigen::Vector2f(fine, 0.0f), Eigen::Vector2i(1, 2)};
  for (const auto& [policy, expected] : {std::pair{"float32", fine}, std::pair{"mixed", 1.0f}}) {
    MixinConfig config;
    config.enable_mixed_precision = true;
    config.precision_policy = policy;
    CastBatchTask task(config);
    EXPECT_EQ(task.train_step(batch).loss, static_cast<double>(expected)) << policy;
    EXPECT_EQ(task.evaluate_batch(batch), static_cast<double>(expected)) << policy;
  }
}

// fit() hands the batches it makes over to the step, so a bf16 run trains with the bf16 copy of its batch
// alone in memory: by the time loss_and_grads runs, the fp32 batch fit() made is freed.
struct FitConfig : xax::TrainConfig, xax::MixedPrecisionConfig {};

class FitCastBatchTask : public xax::TrainMixin<FitCastBatchTask, FitConfig>,
                         public xax::MixedPrecisionMixin<FitCastBatchTask, FitConfig> {
 public:
  using compiled_policies = TestedPolicies;
  template <class T>
  using params_type = Weights<T>;
  using batch_type = FeatureBatch<float>;
  static constexpr bool casts_batch_to_compute = true;

  explicit FitCastBatchTask(FitConfig config) : TrainMixin(std::move(config)) {}
  Weights<float> init_params() const { return initial_weights(); }
  std::int64_t num_examples() const { return 4; }
  FeatureBatch<float> make_batch(std::span<const std::int64_t> indices) const {
    FeatureBatch<float> batch{Eigen::VectorXf::Zero(2), Eigen::VectorXi::Zero(2)};
    batch.x(0) = static_cast<float>(indices.front());
    batch.x(1) = 1.0f + 1.0f / 4096.0f;  // kept in float, rounded to 1 in float16 and bfloat16
    return batch;
  }

  // Sees the batches fit() hands over before the step does.
  xax::StepResult train_step(std::vector<batch_type>&& micro_batches) {
    handed_over_ = &micro_batches;
    const xax::StepResult result = MixedPrecisionMixin::train_step(std::move(micro_batches));
    handed_over_ = nullptr;
    return result;
  }
  using MixedPrecisionMixin::train_step;

  template <class T>
  double loss_and_grads(const Weights<T>& params, const FeatureBatch<T>& batch, float, Weights<T>& grads) {
    if (handed_over_ != nullptr) held_during_call.push_back(still_held(*handed_over_));
    grads.w = Eigen::Matrix<T, Eigen::Dynamic, 1>::Zero(params.w.size());
    grads.b = Eigen::Matrix<T, Eigen::Dynamic, 1>::Zero(params.b.size());
    return static_cast<double>(static_cast<float>(batch.x(1)));
  }

  std::vector<std::vector<bool>> held_during_call;

 private:
  const std::vector<batch_type>* handed_over_ = nullptr;
};

TEST(BatchCast, FitFreesEachBatchOnceTheStepHasCastIt) {
  for (const auto& [policy, held] : {std::pair{"float32", true}, std::pair{"mixed", false}}) {
    FitConfig config;
    config.batch_size = 2;
    config.epochs = 1;
    config.log_interval = 0;
    config.enable_mixed_precision = true;
    config.precision_policy = policy;
    FitCastBatchTask task(config);
    task.fit();
    EXPECT_EQ(task.held_during_call, std::vector<std::vector<bool>>(2, std::vector<bool>{held})) << policy;
  }
}

// A task that can make its batches in any scalar has fit() step through train_step_on_examples, which makes
// each batch in the policy's compute type: a bf16 run never makes an fp32 batch.
class FitMakesBatchesTask : public xax::TrainMixin<FitMakesBatchesTask, FitConfig>,
                            public xax::MixedPrecisionMixin<FitMakesBatchesTask, FitConfig> {
 public:
  using compiled_policies = TestedPolicies;
  template <class T>
  using params_type = Weights<T>;
  using batch_type = FeatureBatch<float>;
  static constexpr bool casts_batch_to_compute = true;

  explicit FitMakesBatchesTask(FitConfig config) : TrainMixin(std::move(config)) {}
  Weights<float> init_params() const { return initial_weights(); }
  std::int64_t num_examples() const { return 4; }
  template <class T = float>
  FeatureBatch<T> make_batch(std::span<const std::int64_t> indices) const {
    made_in.push_back(xax::dtype_of<T>);
    FeatureBatch<T> batch{Eigen::Matrix<T, Eigen::Dynamic, 1>::Zero(2), Eigen::VectorXi::Zero(2)};
    batch.x(0) = static_cast<T>(1.0f + static_cast<float>(indices.front() + 1) / 4096.0f);
    return batch;
  }

  template <class T>
  double loss_and_grads(const Weights<T>& params, const FeatureBatch<T>& batch, float, Weights<T>& grads) {
    grads.w = Eigen::Matrix<T, Eigen::Dynamic, 1>::Zero(params.w.size());
    grads.b = Eigen::Matrix<T, Eigen::Dynamic, 1>::Zero(params.b.size());
    return static_cast<double>(static_cast<float>(batch.x(0)));
  }

  mutable std::vector<xax::DType> made_in;
};

TEST(BatchCast, FitHasTheStepMakeEachBatchInTheComputeType) {
  static_assert(xax::makes_batches_in<FitMakesBatchesTask, xax::bfloat16>);
  for (const auto& [policy, made] :
       {std::pair{"float32", xax::DType::float32}, std::pair{"mixed", xax::half_dtype()}}) {
    FitConfig config;
    config.batch_size = 2;
    config.epochs = 1;
    config.log_interval = 0;
    config.enable_mixed_precision = true;
    config.precision_policy = policy;
    FitMakesBatchesTask task(config);
    const xax::TrainSummary summary = task.fit();
    EXPECT_EQ(summary.steps, 2) << policy;
    EXPECT_EQ(task.made_in, std::vector<xax::DType>(2, made)) << policy;
  }
}

// A task whose make_batch makes fp32 batches only can still step from example indices: each batch is made,
// then cast to the compute type before its forward.
TEST(BatchCast, StepsFromExamplesCastTheBatchesOfATaskThatMakesThemInFloat) {
  const std::vector<std::int64_t> order{3, 1};
  const std::vector<std::span<const std::int64_t>> examples{{&order[0], 1}, {&order[1], 1}};
  for (const auto& [policy, loss] : {std::pair{"float32", 1.0 + 1.0 / 4096.0}, std::pair{"float16", 1.0}}) {
    FitConfig config;
    config.enable_mixed_precision = true;
    config.precision_policy = policy;
    FitCastBatchTask task(config);
    EXPECT_EQ(task.train_step_on_examples(std::span<const std::span<const std::int64_t>>(examples)).loss,
              loss)
        << policy;
  }
}
