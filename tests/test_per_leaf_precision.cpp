// Per-leaf precision (DESIGN §11): a leaf declared with xax::full_precision_t<T> stays float under a 16-bit
// policy, in the masters, the compute copy, the gradients, the update and the checkpoint, while its siblings
// follow the policy. Every expected value is exact: the gain's update, 3 * 2^-13, is far below a 16-bit ulp
// at 1, so any rounding of that leaf to 16 bits anywhere on the way shows up as gain == 1.

#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <type_traits>
#include <xax/task/checkpoint.hpp>
#include <xax/task/mixins/mixed_precision.hpp>
#include <xax/task/train_step.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/tree.hpp>
#include <xax/utils/tree_cast.hpp>

#include "scratch_directory.hpp"

namespace {

template <class T>
using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

template <class T>
struct GatedModel {
  Vector<T> w;
  Vector<xax::full_precision_t<T>> gain;
  XAX_FIELDS(w, gain);
};

static_assert(std::is_same_v<xax::full_precision_t<xax::bfloat16>, float>);
static_assert(std::is_same_v<xax::full_precision_t<xax::float16>, float>);
static_assert(std::is_same_v<xax::full_precision_t<float>, float>);
static_assert(std::is_same_v<xax::full_precision_t<double>, double>);
static_assert(
    std::is_same_v<xax::rebind_scalar_t<GatedModel<float>, xax::bfloat16>, GatedModel<xax::bfloat16>>);
static_assert(std::is_same_v<decltype(GatedModel<xax::bfloat16>::gain), Vector<float>>);
static_assert(std::is_same_v<decltype(GatedModel<double>::gain), Vector<double>>);

struct Targets {
  Eigen::VectorXf w;
  Eigen::VectorXf gain;
};

// gain starts at 1 and is pulled towards 1 + 3 * 2^-12; w starts at 1 and is pulled towards 0.
GatedModel<float> initial_model() {
  return {Vector<float>::Ones(2), Vector<float>::Ones(2)};
}
Targets targets() {
  return {Eigen::VectorXf::Zero(2), Eigen::VectorXf::Constant(2, 1.0f + 3.0f / 4096.0f)};
}
constexpr float gain_after_one_step = 1.0f + 3.0f / 8192.0f;  // SGD, lr 1/2

// loss = 0.5 |p - target|^2 per leaf, gradients of (loss * scale) in each leaf's own type.
template <class T, class G>
double gated_loss_and_grads(const GatedModel<T>& params, const Targets& target, float scale,
                            GatedModel<G>& grads) {
  const Eigen::VectorXf dw = params.w.template cast<float>() - target.w;
  const Eigen::VectorXf dgain = params.gain.template cast<float>() - target.gain;
  grads.w = (dw * scale).template cast<G>();
  grads.gain = (dgain * scale).template cast<xax::full_precision_t<G>>();
  return 0.5 * static_cast<double>(dw.squaredNorm() + dgain.squaredNorm());
}

template <class Policy>
class GatedTrainer : public xax::TrainStep<GatedTrainer<Policy>, Policy> {
 public:
  template <class T>
  using params_type = GatedModel<T>;
  using batch_type = Targets;

  GatedTrainer() {
    this->reset_train_state(initial_model(), xax::optim::SgdOptions{.learning_rate = 0.5},
                            xax::DynamicLossScale{});
  }

  template <class T>
  double loss_and_grads(const GatedModel<T>& params, const Targets& target, float scale,
                        GatedModel<T>& grads) {
    return gated_loss_and_grads(params, target, scale, grads);
  }
};

// The same trainer writing fp32 gradients straight from its compute-type params.
template <class Policy>
class GatedFp32GradTrainer : public xax::TrainStep<GatedFp32GradTrainer<Policy>, Policy> {
 public:
  static constexpr bool writes_fp32_gradients = true;
  template <class T>
  using params_type = GatedModel<T>;
  using batch_type = Targets;

  GatedFp32GradTrainer() {
    this->reset_train_state(initial_model(), xax::optim::SgdOptions{.learning_rate = 0.5},
                            xax::DynamicLossScale{});
  }

  template <class T, class G>
  double loss_and_grads(const GatedModel<T>& params, const Targets& target, float scale,
                        GatedModel<G>& grads) {
    return gated_loss_and_grads(params, target, scale, grads);
  }
};

template <class Policy>
class PerLeafPrecision : public ::testing::Test {};
using Policies =
    ::testing::Types<xax::Policy<float, xax::bfloat16, float>, xax::Policy<float, xax::float16, float>,
                     xax::Policy<xax::bfloat16, xax::bfloat16, float>,
                     xax::Policy<xax::float16, xax::float16, xax::float16>, xax::Policy<float, float, float>>;
TYPED_TEST_SUITE(PerLeafPrecision, Policies);

template <class Trainer>
void expect_gain_kept_in_float(Trainer& trainer) {
  using Policy = typename Trainer::policy_type;
  using Compute = typename Policy::compute_type;
  using Param = typename Policy::param_type;
  static_assert(std::is_same_v<decltype(trainer.params().gain), Vector<xax::full_precision_t<Param>>>);

  const xax::StepResult result = trainer.train_step(targets());
  ASSERT_TRUE(result.finite);
  // The gain moved by 3 * 2^-13 in the masters and in the compute copy: no 16-bit rounding on its way.
  EXPECT_EQ(trainer.params().gain, Vector<float>::Constant(2, gain_after_one_step));
  trainer.with_compute_params([](const GatedModel<Compute>& compute) {
    static_assert(std::is_same_v<decltype(compute.gain), Vector<float>>);
    EXPECT_EQ(compute.gain, Vector<float>::Constant(2, gain_after_one_step));
    // Its sibling follows the policy: w = 1/2 in the compute type.
    EXPECT_EQ(compute.w, Vector<Compute>::Constant(2, Compute(0.5f)));
  });
  EXPECT_EQ(trainer.params().w, Vector<Param>::Constant(2, Param(0.5f)));
}

TYPED_TEST(PerLeafPrecision, AFullPrecisionLeafTakesUpdatesBelowAHalfUlp) {
  GatedTrainer<TypeParam> trainer;
  expect_gain_kept_in_float(trainer);
}

TYPED_TEST(PerLeafPrecision, TheFp32GradientPathKeepsTheLeafInFloatToo) {
  GatedFp32GradTrainer<TypeParam> trainer;
  expect_gain_kept_in_float(trainer);
}

TYPED_TEST(PerLeafPrecision, TheCheckpointStoresTheLeafAsFloat32AndRestoresItBitIdentically) {
  GatedTrainer<TypeParam> trainer;
  ASSERT_TRUE(trainer.train_step(targets()).finite);
  xax::CheckpointWriter writer;
  trainer.save_train_state(writer);
  // A directory of this test instance's own: the typed instances run at the same time under ctest -j.
  const xax_test::ScratchDirectory scratch("xax_per_leaf_precision");
  const auto path = scratch / "state.xaxckpt";
  writer.write(path);

  const xax::CheckpointReader reader(path);
  // The entry's dtype must match the leaf it is read into: float32 for the gain whatever the policy.
  Eigen::VectorXf gain(2);
  reader.read_tree("train.params.gain", gain);
  EXPECT_EQ(gain, Eigen::VectorXf::Constant(2, gain_after_one_step));

  GatedTrainer<TypeParam> restored;
  restored.load_train_state(reader);
  EXPECT_EQ(restored.params().gain, trainer.params().gain);
  EXPECT_EQ(restored.params().w, trainer.params().w);
  using Compute = typename TypeParam::compute_type;
  restored.with_compute_params([](const GatedModel<Compute>& compute) {
    EXPECT_EQ(compute.gain, Vector<float>::Constant(2, gain_after_one_step));
  });
}

// Half-precision masters round their fp32 update back with the chosen rounding; the full-precision leaf
// takes its update as it is under every one of them.
class RoundedMasters
    : public xax::TrainStep<RoundedMasters, xax::Policy<xax::bfloat16, xax::bfloat16, float>> {
 public:
  template <class T>
  using params_type = GatedModel<T>;
  using batch_type = Targets;

  explicit RoundedMasters(xax::optim::MasterRounding rounding) {
    xax::TrainStepOptions options;
    options.master_rounding = rounding;
    this->reset_train_state(initial_model(), xax::optim::SgdOptions{.learning_rate = 0.5},
                            xax::DynamicLossScale{}, options);
  }

  template <class T>
  double loss_and_grads(const GatedModel<T>& params, const Targets& target, float scale,
                        GatedModel<T>& grads) {
    return gated_loss_and_grads(params, target, scale, grads);
  }
};

TEST(PerLeafPrecisionMasters, EveryMasterRoundingLeavesTheFullPrecisionLeafExact) {
  for (const auto rounding :
       {xax::optim::MasterRounding::round_to_nearest, xax::optim::MasterRounding::stochastic_rounding,
        xax::optim::MasterRounding::kahan}) {
    RoundedMasters trainer(rounding);
    ASSERT_TRUE(trainer.train_step(targets()).finite);
    EXPECT_EQ(trainer.params().gain, Vector<float>::Constant(2, gain_after_one_step))
        << "rounding " << static_cast<int>(rounding);
    // w = 1/2 is exact in bf16, so every rounding lands on it.
    EXPECT_EQ(trainer.params().w, Vector<xax::bfloat16>::Constant(2, xax::bfloat16(0.5f)));
  }
}

// MixedPrecisionMixin compiles every policy the config can name; the leaf stays float in each.
struct GatedConfig : xax::MixedPrecisionConfig {
  [[nodiscard]] xax::OptimizerOptions optimizer_options() const {
    return xax::optim::SgdOptions{.learning_rate = 0.5};
  }
};

struct GatedTask : xax::MixedPrecisionMixin<GatedTask, GatedConfig> {
  template <class T>
  using params_type = GatedModel<T>;
  using batch_type = Targets;

  explicit GatedTask(GatedConfig config) : config_(std::move(config)) {}
  const GatedConfig& config() const { return config_; }
  GatedModel<float> init_params() const { return initial_model(); }

  template <class T>
  double loss_and_grads(const GatedModel<T>& params, const Targets& target, float scale,
                        GatedModel<T>& grads) {
    return gated_loss_and_grads(params, target, scale, grads);
  }

 private:
  GatedConfig config_;
};

TEST(PerLeafPrecisionMixin, EveryConfiguredPolicyKeepsTheLeafInFloat) {
  for (const char* policy : {"float32", "mixed", "float16", "bfloat16"}) {
    GatedConfig config;
    config.enable_mixed_precision = true;
    config.precision_policy = policy;
    GatedTask task(config);
    ASSERT_TRUE(task.train_step(targets()).finite) << policy;
    EXPECT_EQ(task.params_float32().gain, Vector<float>::Constant(2, gain_after_one_step)) << policy;
    EXPECT_EQ(task.params_float32().w, Vector<float>::Constant(2, 0.5f)) << policy;
  }
}

TEST(PerLeafPrecisionCast, TreeCastKeepsTheLeafAndRoundsItsSibling) {
  GatedModel<float> model{Vector<float>::Constant(1, 1.0f + 1.0f / 4096.0f),
                          Vector<float>::Constant(1, 1.0f + 1.0f / 4096.0f)};
  const auto half = xax::tree_cast<xax::bfloat16>(model);
  EXPECT_EQ(half.w(0), xax::bfloat16(1.0f));
  EXPECT_EQ(half.gain(0), 1.0f + 1.0f / 4096.0f);
  const auto back = xax::tree_cast<float>(half);
  EXPECT_EQ(back.gain(0), 1.0f + 1.0f / 4096.0f);
}

}  // namespace
