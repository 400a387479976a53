// Loss scales: the exact trajectories of DynamicLossScale (DESIGN §4), validation, save/restore, and scaling
// of scalars and trees.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cfloat>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <variant>
#include <vector>
#include <xax/task/checkpoint.hpp>
#include <xax/utils/loss_scale.hpp>

namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using xax::bfloat16;
using xax::DynamicLossScale;
using xax::DynamicLossScaleOptions;
using xax::DynamicLossScaleState;
using xax::float16;
using xax::NoOpLossScale;
using xax::StaticLossScale;

constexpr float inf = std::numeric_limits<float>::infinity();
constexpr float nan = std::numeric_limits<float>::quiet_NaN();

DynamicLossScaleOptions options_with(float initial_scale, std::int64_t growth_interval, int hysteresis = 1) {
  DynamicLossScaleOptions options;
  options.initial_scale = initial_scale;
  options.growth_interval = growth_interval;
  options.hysteresis = hysteresis;
  return options;
}

// Applies `steps` ("F" finite, "x" overflow) and returns the scale after each.
std::vector<float> trajectory(DynamicLossScale& scale, std::string_view steps) {
  std::vector<float> scales;
  for (const char step : steps) {
    scale.adjust(step == 'F');
    scales.push_back(scale.loss_scale());
  }
  return scales;
}

// ---------------------------------------------------------------------------------------------------------------
// Defaults and the dynamic rule

TEST(DynamicLossScaleOptions, DefaultsAreTheContract) {
  const DynamicLossScaleOptions options;
  EXPECT_EQ(options.initial_scale, 32768.0f);
  EXPECT_EQ(options.growth_interval, 2000);
  EXPECT_EQ(options.growth_factor, 2.0f);
  EXPECT_EQ(options.backoff_factor, 0.5f);
  EXPECT_EQ(options.min_scale, 1.0f);
  EXPECT_EQ(options.max_scale, FLT_MAX);
  EXPECT_EQ(options.hysteresis, 1);
  const DynamicLossScale scale;
  EXPECT_EQ(scale.loss_scale(), 32768.0f);
  EXPECT_EQ(scale.counter(), 0);
  EXPECT_EQ(scale.hysteresis_left(), 1);
  EXPECT_EQ(scale.options(), options);
}

TEST(DynamicLossScale, GrowsOnTheGrowthIntervalThConsecutiveFiniteStep) {
  DynamicLossScale scale(options_with(8, 3));
  scale.adjust(true);
  scale.adjust(true);
  EXPECT_EQ(scale.loss_scale(), 8.0f);
  EXPECT_EQ(scale.counter(), 2);
  scale.adjust(true);
  EXPECT_EQ(scale.loss_scale(), 16.0f);
  EXPECT_EQ(scale.counter(), 0);
  EXPECT_THAT(trajectory(scale, "FFFFFF"), ::testing::ElementsAre(16, 16, 32, 32, 32, 64));
}

TEST(DynamicLossScale, DefaultOptionsGrowOnStep2000) {
  DynamicLossScale scale;
  for (int step = 1; step < 2000; ++step) scale.adjust(true);
  EXPECT_EQ(scale.loss_scale(), 32768.0f);
  EXPECT_EQ(scale.counter(), 1999);
  scale.adjust(true);
  EXPECT_EQ(scale.loss_scale(), 65536.0f);
  EXPECT_EQ(scale.counter(), 0);
}

TEST(DynamicLossScale, AnOverflowBacksOffAndRestartsTheCounter) {
  DynamicLossScale scale(options_with(64, 3));
  EXPECT_THAT(trajectory(scale, "FFx"), ::testing::ElementsAre(64, 64, 32));
  EXPECT_EQ(scale.counter(), 0);
  // The two finite steps before the overflow do not count towards the next growth.
  EXPECT_THAT(trajectory(scale, "FFFxFFFF"), ::testing::ElementsAre(32, 32, 64, 32, 32, 32, 64, 64));
  EXPECT_EQ(scale.counter(), 1);
}

TEST(DynamicLossScale, BackoffStopsAtTheMinimum) {
  DynamicLossScaleOptions options = options_with(8, 100);
  options.min_scale = 2;
  DynamicLossScale scale(options);
  EXPECT_THAT(trajectory(scale, "xxxx"), ::testing::ElementsAre(4, 2, 2, 2));
  // A backoff that lands between two values is clamped to the minimum, not rounded past it.
  options.min_scale = 3;
  options.initial_scale = 5;
  DynamicLossScale uneven(options);
  EXPECT_THAT(trajectory(uneven, "x"), ::testing::ElementsAre(3));
}

TEST(DynamicLossScale, NonPowerOfTwoFactorsMultiplyInFloat) {
  DynamicLossScaleOptions options = options_with(10, 1);
  options.growth_factor = 1.5f;
  options.backoff_factor = 0.3f;
  DynamicLossScale scale(options);
  scale.adjust(false);
  EXPECT_EQ(scale.loss_scale(), 10.0f * 0.3f);
  scale.adjust(true);
  EXPECT_EQ(scale.loss_scale(), 10.0f * 0.3f * 1.5f);
}

TEST(DynamicLossScale, GrowthThatWouldPassTheMaximumIsSkipped) {
  DynamicLossScaleOptions options = options_with(64, 2);
  options.max_scale = 100;
  DynamicLossScale scale(options);
  EXPECT_THAT(trajectory(scale, "FFFF"), ::testing::ElementsAre(64, 64, 64, 64));
  EXPECT_EQ(scale.counter(), 0) << "the counter restarts even when the cap holds the scale";
  // Exactly reaching the maximum is allowed.
  options.max_scale = 128;
  DynamicLossScale capped(options);
  EXPECT_THAT(trajectory(capped, "FFFF"), ::testing::ElementsAre(64, 128, 128, 128));
}

TEST(DynamicLossScale, GrowthThatOverflowsFloatIsSkipped) {
  DynamicLossScale top(options_with(0x1p127f, 1));
  EXPECT_THAT(trajectory(top, "FF"), ::testing::ElementsAre(0x1p127f, 0x1p127f));
  EXPECT_EQ(top.counter(), 0);
  DynamicLossScaleOptions options = options_with(0x1p126f, 1);
  options.growth_factor = 3;
  DynamicLossScale triple(options);
  EXPECT_THAT(trajectory(triple, "FF"),
              ::testing::ElementsAre(0x1.8p127f, 0x1.8p127f));  // 3 * 2^126, then inf
}

TEST(DynamicLossScale, HysteresisAbsorbsTheFirstOverflowsSinceGrowthThenBacksOffOnEach) {
  DynamicLossScale scale(options_with(64, 3, /*hysteresis=*/3));
  EXPECT_EQ(scale.hysteresis_left(), 3);
  EXPECT_THAT(trajectory(scale, "xx"), ::testing::ElementsAre(64, 64));
  EXPECT_EQ(scale.hysteresis_left(), 1);
  EXPECT_EQ(scale.counter(), 0);
  EXPECT_THAT(trajectory(scale, "xx"), ::testing::ElementsAre(32, 16));
  EXPECT_EQ(scale.hysteresis_left(), 1);
}

TEST(DynamicLossScale, HysteresisRefillsOnGrowthOnlyNotOnFiniteSteps) {
  DynamicLossScale scale(options_with(64, 3, /*hysteresis=*/2));
  // Megatron's rule: finite steps between overflows do not refill (Apex's rule would absorb the second x).
  EXPECT_THAT(trajectory(scale, "xFFx"), ::testing::ElementsAre(64, 64, 64, 32));
  EXPECT_EQ(scale.hysteresis_left(), 1);
  // Completing a growth interval refills: the next overflow is absorbed again.
  EXPECT_THAT(trajectory(scale, "FFF"), ::testing::ElementsAre(32, 32, 64));
  EXPECT_EQ(scale.hysteresis_left(), 2);
  EXPECT_THAT(trajectory(scale, "xx"), ::testing::ElementsAre(64, 32));
}

TEST(DynamicLossScale, HysteresisRefillsWhenTheIntervalCompletesEvenAtTheCap) {
  DynamicLossScaleOptions options = options_with(64, 2, /*hysteresis=*/2);
  options.max_scale = 64;
  DynamicLossScale scale(options);
  EXPECT_THAT(trajectory(scale, "xxFFx"), ::testing::ElementsAre(64, 32, 32, 64, 64));
  EXPECT_EQ(scale.hysteresis_left(), 1);
  // The interval completes with the scale held at max_scale: no growth, but the tracker refills.
  EXPECT_THAT(trajectory(scale, "FF"), ::testing::ElementsAre(64, 64));
  EXPECT_EQ(scale.hysteresis_left(), 2);
  EXPECT_THAT(trajectory(scale, "xx"), ::testing::ElementsAre(64, 32));
}

TEST(DynamicLossScale, ALongTrajectory) {
  DynamicLossScaleOptions options = options_with(1024, 2, /*hysteresis=*/2);
  options.min_scale = 256;
  options.max_scale = 4096;
  DynamicLossScale scale(options);
  //                                 x  x    F    F    F    F     F     F     F     F     x     x     x    x x
  EXPECT_THAT(trajectory(scale, "xxFFFFFFFFxxxxx"),
              ::testing::ElementsAre(1024, 512, 512, 1024, 1024, 2048, 2048, 4096, 4096, 4096, 4096, 2048,
                                     1024, 512, 256));
  EXPECT_THAT(trajectory(scale, "xFx"), ::testing::ElementsAre(256, 256, 256));
}

TEST(StaticAndNoOpLossScale, IgnoreAdjust) {
  StaticLossScale fixed(128);
  NoOpLossScale none;
  for (const bool finite : {false, true, false, false, true}) {
    fixed.adjust(finite);
    none.adjust(finite);
  }
  EXPECT_EQ(fixed.loss_scale(), 128.0f);
  EXPECT_EQ(fixed.inverse_scale(), 1.0f / 128);
  EXPECT_EQ(none.loss_scale(), 1.0f);
  EXPECT_EQ(none.inverse_scale(), 1.0f);
}

// ---------------------------------------------------------------------------------------------------------------
// Validation

struct BadOptions {
  std::string label;
  std::function<void(DynamicLossScaleOptions&)> change;
  std::vector<std::string> message_parts;  // the option, the value, the accepted range
};

void PrintTo(const BadOptions& bad, std::ostream* out) {
  *out << bad.label;
}

class DynamicLossScaleValidation : public ::testing::TestWithParam<BadOptions> {};

TEST_P(DynamicLossScaleValidation, ThrowsConfigErrorNamingTheOptionTheValueAndTheRange) {
  DynamicLossScaleOptions options;
  GetParam().change(options);
  try {
    DynamicLossScale scale(options);
    FAIL() << "expected ConfigError";
  } catch (const xax::ConfigError& error) {
    for (const std::string& part : GetParam().message_parts) EXPECT_THAT(error.what(), HasSubstr(part));
  }
}

INSTANTIATE_TEST_SUITE_P(
    EveryInvalidOption, DynamicLossScaleValidation,
    ::testing::Values(
        BadOptions{"GrowthIntervalZero",
                   [](auto& o) { o.growth_interval = 0; },
                   {"growth_interval = 0", "at least 1"}},
        BadOptions{
            "GrowthIntervalNegative", [](auto& o) { o.growth_interval = -5; }, {"growth_interval = -5"}},
        BadOptions{
            "GrowthFactorOne", [](auto& o) { o.growth_factor = 1; }, {"growth_factor = 1", "greater than 1"}},
        BadOptions{"GrowthFactorBelowOne", [](auto& o) { o.growth_factor = 0.5f; }, {"growth_factor = 0.5"}},
        BadOptions{
            "GrowthFactorInf", [](auto& o) { o.growth_factor = inf; }, {"growth_factor = inf", "finite"}},
        BadOptions{"GrowthFactorNan", [](auto& o) { o.growth_factor = nan; }, {"growth_factor = nan"}},
        BadOptions{
            "BackoffZero", [](auto& o) { o.backoff_factor = 0; }, {"backoff_factor = 0", "between 0 and 1"}},
        BadOptions{
            "BackoffOne", [](auto& o) { o.backoff_factor = 1; }, {"backoff_factor = 1", "both excluded"}},
        BadOptions{"BackoffAboveOne", [](auto& o) { o.backoff_factor = 1.5f; }, {"backoff_factor = 1.5"}},
        BadOptions{"BackoffNegative", [](auto& o) { o.backoff_factor = -0.5f; }, {"backoff_factor = -0.5"}},
        BadOptions{"BackoffNan", [](auto& o) { o.backoff_factor = nan; }, {"backoff_factor = nan"}},
        BadOptions{"MinScaleZero", [](auto& o) { o.min_scale = 0; }, {"min_scale = 0", "1.1754944e-38"}},
        BadOptions{"MinScaleNegative", [](auto& o) { o.min_scale = -1; }, {"min_scale = -1"}},
        BadOptions{"MinScaleSubnormal",
                   [](auto& o) { o.min_scale = 1e-40f; },
                   {"min_scale = 1e-40", "finite reciprocal"}},
        BadOptions{"MinScaleInf", [](auto& o) { o.min_scale = inf; }, {"min_scale = inf"}},
        BadOptions{"MaxScaleInf", [](auto& o) { o.max_scale = inf; }, {"max_scale = inf", "finite"}},
        BadOptions{"MaxScaleNan", [](auto& o) { o.max_scale = nan; }, {"max_scale = nan"}},
        BadOptions{"MinAboveMax",
                   [](auto& o) {
                     o.min_scale = 10;
                     o.max_scale = 5;
                     o.initial_scale = 7;
                   },
                   {"min_scale = 10", "at most max_scale = 5"}},
        BadOptions{"InitialBelowMin",
                   [](auto& o) {
                     o.min_scale = 4;
                     o.initial_scale = 2;
                   },
                   {"initial_scale = 2", "[min_scale, max_scale] = [4, 3.4028235e+38]"}},
        BadOptions{
            "InitialAboveMax", [](auto& o) { o.max_scale = 1024; }, {"initial_scale = 32768", "[1, 1024]"}},
        BadOptions{"InitialInf", [](auto& o) { o.initial_scale = inf; }, {"initial_scale = inf"}},
        BadOptions{"InitialNan", [](auto& o) { o.initial_scale = nan; }, {"initial_scale = nan"}},
        BadOptions{"HysteresisZero", [](auto& o) { o.hysteresis = 0; }, {"hysteresis = 0", "at least 1"}},
        BadOptions{"HysteresisNegative", [](auto& o) { o.hysteresis = -2; }, {"hysteresis = -2"}}),
    [](const auto& test_param) { return test_param.param.label; });

TEST(StaticLossScale, RejectsScalesThatAreNotFiniteAndPositive) {
  for (const float bad : {0.0f, -1.0f, inf, -inf, nan, 1e-39f}) {
    try {
      StaticLossScale scale(bad);
      FAIL() << "expected ConfigError for " << bad;
    } catch (const xax::ConfigError& error) {
      EXPECT_THAT(error.what(), AllOf(HasSubstr("StaticLossScale: scale = "),
                                      HasSubstr("a number from 1.1754944e-38 to 3.4028235e+38")));
    }
  }
  EXPECT_EQ(StaticLossScale(FLT_MIN).loss_scale(), FLT_MIN);
  EXPECT_EQ(StaticLossScale(FLT_MAX).loss_scale(), FLT_MAX);
}

// ---------------------------------------------------------------------------------------------------------------
// Save and restore

TEST(DynamicLossScaleState, RestoringMidTrajectoryContinuesIdentically) {
  DynamicLossScaleOptions options = options_with(512, 3, /*hysteresis=*/3);
  options.min_scale = 0.25f;
  options.max_scale = 8192;
  options.growth_factor = 4;
  options.backoff_factor = 0.25f;
  DynamicLossScale original(options);
  trajectory(original, "FFxFFFFx");
  const DynamicLossScaleState saved = original.state();
  EXPECT_EQ(saved.scale, original.loss_scale());
  EXPECT_EQ(saved.counter, 0);
  EXPECT_EQ(saved.hysteresis_left, 2);
  EXPECT_EQ(saved.options, options);
  EXPECT_EQ(saved.options.min_scale, 0.25f) << "the minimum is part of the state (jmp #44 lost it)";

  DynamicLossScale restored = DynamicLossScale::from_state(saved);
  EXPECT_EQ(restored, original);
  const std::string_view rest = "FFxxxxxxxxxxxFFFFFFFFFFxFF";
  const std::vector<float> expected = trajectory(original, rest);
  EXPECT_EQ(trajectory(restored, rest), expected);
  EXPECT_EQ(restored.state(), original.state());
}

TEST(DynamicLossScaleState, RestoringAnImpossibleStateThrowsConfigError) {
  DynamicLossScaleState state = DynamicLossScale(options_with(64, 10, 2)).state();
  const auto expect_rejected = [](const DynamicLossScaleState& bad, const std::string& part) {
    try {
      static_cast<void>(DynamicLossScale::from_state(bad));
      FAIL() << "expected ConfigError containing " << part;
    } catch (const xax::ConfigError& error) {
      EXPECT_THAT(error.what(), HasSubstr(part));
    }
  };
  DynamicLossScaleState bad = state;
  bad.counter = 10;
  expect_rejected(bad, "counter = 10 is not accepted: it must be within [0, growth_interval - 1] = [0, 9]");
  bad = state;
  bad.counter = -1;
  expect_rejected(bad, "counter = -1");
  bad = state;
  bad.hysteresis_left = 3;
  expect_rejected(bad, "hysteresis_left = 3 is not accepted: it must be within [1, hysteresis] = [1, 2]");
  bad = state;
  bad.hysteresis_left = 0;
  expect_rejected(bad, "hysteresis_left = 0");
  bad = state;
  bad.scale = 0.5f;
  expect_rejected(bad, "scale = 0.5 is not accepted: it must be finite and within [min_scale, max_scale]");
  bad = state;
  bad.scale = nan;
  expect_rejected(bad, "scale = nan");
  bad = state;
  bad.options.backoff_factor = 2;
  expect_rejected(bad, "backoff_factor = 2");
}

// ---------------------------------------------------------------------------------------------------------------
// Scaling values

template <class T>
class LossScaleTyped : public ::testing::Test {};
using ScaledTypes = ::testing::Types<float, bfloat16, float16>;
TYPED_TEST_SUITE(LossScaleTyped, ScaledTypes);

template <class T>
struct Grads {
  Eigen::Matrix<T, 2, 2> w;
  std::vector<Eigen::Matrix<T, Eigen::Dynamic, 1>> biases;
  int steps = 0;
  XAX_FIELDS(w, biases, steps);
};

TYPED_TEST(LossScaleTyped, ScaleAndUnscaleScalarsAndTrees) {
  using T = TypeParam;
  const StaticLossScale fixed(8);
  const T loss = T(1.5f);
  EXPECT_EQ(static_cast<float>(fixed.scale(loss)), 12.0f);
  static_assert(std::is_same_v<decltype(fixed.scale(loss)), T>);

  Grads<T> grads;
  grads.w << T(1), T(-2), T(0.5f), T(0);
  grads.biases = {Eigen::Matrix<T, Eigen::Dynamic, 1>::Constant(3, T(4))};
  grads.steps = 7;
  const Grads<T> scaled = fixed.scale(grads);
  EXPECT_EQ(static_cast<float>(scaled.w(0, 1)), -16.0f);
  EXPECT_EQ(static_cast<float>(scaled.biases[0](2)), 32.0f);
  EXPECT_EQ(scaled.steps, 7);
  const Grads<T> unscaled = fixed.unscale(scaled);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(static_cast<float>(unscaled.w(i)), static_cast<float>(grads.w(i)));
  EXPECT_EQ(static_cast<float>(grads.w(0, 1)), -2.0f) << "scale() returns a new tree";

  const NoOpLossScale none;
  EXPECT_EQ(static_cast<float>(none.unscale(scaled).w(0, 1)), -16.0f);
  EXPECT_EQ(static_cast<float>(none.scale(loss)), 1.5f);
}

TEST(LossScale, HalfScalarsRoundOnceFromFloat) {
  const StaticLossScale fixed(3);
  const bfloat16 x(1.0078125f);  // 1 + 2^-7, exact in bf16
  // 3.0234375 needs 9 significant bits: rounded once, to nearest even.
  EXPECT_EQ(std::bit_cast<std::uint16_t>(fixed.scale(x)), std::bit_cast<std::uint16_t>(bfloat16(3.0234375f)));
  EXPECT_EQ(fixed.scale(2.0), 6.0) << "double scalars are scaled in double";
}

TEST(LossScale, InverseScaleIsTheReciprocalOfTheScale) {
  // For a single float the double-then-round reciprocal equals float division (both are correctly
  // rounded), so these pin the value, not how it is computed; that matters under accumulation, below.
  EXPECT_EQ(StaticLossScale(32768).inverse_scale(), 0x1p-15f);
  EXPECT_EQ(StaticLossScale(3).inverse_scale(), 0x1.555556p-2f);
  DynamicLossScaleOptions options;
  options.min_scale = 3;
  options.initial_scale = 3;
  EXPECT_EQ(DynamicLossScale(options).inverse_scale(), 0x1.555556p-2f);
  EXPECT_EQ(NoOpLossScale{}.inverse_scale(), 1.0f);
}

TEST(LossScale, AccumulatedInverseIsOneOverScaleTimesKRoundedOnce) {
  // Gradients summed over k micro-batches are unscaled and averaged by one factor 1 / (scale * k), computed
  // in double and rounded once. These scales and counts are ones where every float route, (1/s)/k,
  // (1/s)*(1/k) and 1/(s*k), rounds twice and lands one ulp off.
  struct Case {
    float scale;
    std::int64_t k;
    float expected;
  };
  for (const Case c : {Case{1000.37f, 3, 0x1.5d6564p-12f}, Case{1014.8f, 3, 0x1.586d84p-12f},
                       Case{1025.16f, 3, 0x1.54f274p-12f}}) {
    EXPECT_EQ(xax::detail::reciprocal(c.scale, c.k), c.expected) << c.scale;
    volatile float k = static_cast<float>(c.k);  // no folding of the float routes in higher precision
    EXPECT_NE((1.0f / c.scale) / k, c.expected) << c.scale;
    EXPECT_NE((1.0f / c.scale) * (1.0f / k), c.expected) << c.scale;
    EXPECT_NE(1.0f / (c.scale * k), c.expected) << c.scale;
    EXPECT_NE(StaticLossScale(c.scale).inverse_scale() / k, c.expected) << c.scale;
  }
  EXPECT_EQ(xax::detail::reciprocal(1000.37f, 1), StaticLossScale(1000.37f).inverse_scale())
      << "one micro-batch is exactly the plain reciprocal";
  EXPECT_EQ(xax::detail::reciprocal(32768, 4), 0x1p-17f);
  // TrainStep uses this factor: test_train_step.cpp's AccumulatedGradientsAreUnscaledByOneOverScaleTimesK
  // trains with scale 1000.37 and k = 3 and checks the update is exactly 0x1.5d6564p-12.
}

TEST(LossScale, UnscaleByADynamicScaleAfterGrowth) {
  DynamicLossScale scale(options_with(4, 1));
  scale.adjust(true);
  const Eigen::VectorXf grads = Eigen::VectorXf::Constant(5, 24.0f);
  EXPECT_EQ(scale.unscale(grads), Eigen::VectorXf::Constant(5, 3.0f));
  EXPECT_EQ(scale.scale(0.25f), 2.0f);
}

TEST(LossScale, VariantHoldsAnyKind) {
  xax::LossScale scale;
  EXPECT_EQ(xax::loss_scale_name(scale), "none");
  scale = StaticLossScale(4);
  EXPECT_EQ(xax::loss_scale_name(scale), "static");
  scale = DynamicLossScale(options_with(16, 1));
  EXPECT_EQ(xax::loss_scale_name(scale), "dynamic");
  std::visit([](auto& held) { held.adjust(true); }, scale);
  EXPECT_EQ(std::visit([](const auto& held) { return held.loss_scale(); }, scale), 32.0f);
}

// ---------------------------------------------------------------------------------------------------------------
// State trees through a checkpoint, without TrainStep

// `state` written under "ls" and read back into a default state of its type, through checkpoint bytes.
template <class State>
State through_checkpoint(const State& state) {
  xax::CheckpointWriter writer;
  writer.add_tree("ls", state);
  const xax::CheckpointReader reader = xax::CheckpointReader::from_bytes(writer.bytes());
  State read{};
  reader.read_tree("ls", read);
  return read;
}

TEST(LossScaleState, EveryKindRoundTripsThroughACheckpoint) {
  const NoOpLossScale none;
  EXPECT_EQ(NoOpLossScale::from_state(through_checkpoint(none.state())), none);

  const StaticLossScale fixed(1000.37f);
  const xax::StaticLossScaleState fixed_state = through_checkpoint(fixed.state());
  EXPECT_EQ(std::bit_cast<std::uint32_t>(fixed_state.scale), std::bit_cast<std::uint32_t>(1000.37f));
  EXPECT_EQ(StaticLossScale::from_state(fixed_state), fixed);

  DynamicLossScaleOptions options = options_with(512, 3, /*hysteresis=*/3);
  options.min_scale = 0.25f;
  options.max_scale = 8192;
  options.growth_factor = 4;
  options.backoff_factor = 0.25f;
  DynamicLossScale dynamic(options);
  trajectory(dynamic, "FFxFFFFxF");
  const DynamicLossScaleState read = through_checkpoint(dynamic.state());
  EXPECT_EQ(read, dynamic.state());
  EXPECT_EQ(read.options.min_scale, 0.25f);
  DynamicLossScale restored = DynamicLossScale::from_state(read);
  EXPECT_EQ(restored, dynamic);
  const std::string_view rest = "FFxxxxFFFFFFFFFFxFF";
  EXPECT_EQ(trajectory(restored, rest), trajectory(dynamic, rest));
}

TEST(LossScaleState, TheTreesNameTheirEntries) {
  xax::CheckpointWriter writer;
  writer.add_tree("none", NoOpLossScale().state());
  writer.add_tree("static", StaticLossScale(8).state());
  writer.add_tree("dynamic", DynamicLossScale().state());
  const xax::CheckpointReader reader = xax::CheckpointReader::from_bytes(writer.bytes());
  EXPECT_FALSE(reader.contains("none"));
  EXPECT_TRUE(reader.contains("static.scale"));
  for (const char* name :
       {"dynamic.scale", "dynamic.counter", "dynamic.hysteresis_left", "dynamic.options.initial_scale",
        "dynamic.options.growth_interval", "dynamic.options.growth_factor", "dynamic.options.backoff_factor",
        "dynamic.options.min_scale", "dynamic.options.max_scale", "dynamic.options.hysteresis"}) {
    EXPECT_TRUE(reader.contains(name)) << name;
  }
}

TEST(LossScaleState, CorruptValuesAreRejected) {
  // Values that no scale could hold pass through the checkpoint (it stores what it is given) and are refused
  // by from_state with ConfigError.
  EXPECT_THAT([] { (void)StaticLossScale::from_state(through_checkpoint(xax::StaticLossScaleState{-2.0f})); },
              ::testing::ThrowsMessage<xax::ConfigError>(HasSubstr("StaticLossScale: scale = -2")));
  EXPECT_THROW((void)StaticLossScale::from_state(through_checkpoint(xax::StaticLossScaleState{nan})),
               xax::ConfigError);

  const DynamicLossScaleState good = DynamicLossScale(options_with(64, 10, 2)).state();
  const auto expect_rejected = [](const DynamicLossScaleState& bad, const std::string& part) {
    EXPECT_THAT([&] { (void)DynamicLossScale::from_state(through_checkpoint(bad)); },
                ::testing::ThrowsMessage<xax::ConfigError>(HasSubstr(part)));
  };
  DynamicLossScaleState bad = good;
  bad.counter = 10;
  expect_rejected(bad, "DynamicLossScaleState: counter = 10");
  bad = good;
  bad.scale = inf;
  expect_rejected(bad, "DynamicLossScaleState: scale = inf");
  bad = good;
  bad.hysteresis_left = 3;
  expect_rejected(bad, "DynamicLossScaleState: hysteresis_left = 3");
  bad = good;
  bad.options.growth_factor = 0.5f;
  expect_rejected(bad, "DynamicLossScaleOptions: growth_factor = 0.5");
  bad = good;
  bad.options.min_scale = 0;
  expect_rejected(bad, "DynamicLossScaleOptions: min_scale = 0");
}

TEST(LossScaleState, ATreeOfAnotherKindIsACheckpointError) {
  // The entries of one kind do not fit the tree of another: the reader refuses, naming what is missing.
  xax::CheckpointWriter writer;
  writer.add_tree("ls", StaticLossScale(8).state());
  const xax::CheckpointReader reader = xax::CheckpointReader::from_bytes(writer.bytes());
  DynamicLossScaleState state;
  const DynamicLossScaleState before = state;
  EXPECT_THROW(reader.read_tree("ls", state), xax::CheckpointError);
  EXPECT_EQ(state, before) << "a failed read leaves the tree unchanged";
  NoOpLossScale::state_type empty;
  EXPECT_THAT([&] { reader.read_tree("ls", empty); },
              ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr("1 tensors are stored under 'ls'")));
}

// ---------------------------------------------------------------------------------------------------------------
// Setting the scale by hand

TEST(LossScaleSet, StaticTakesAnyValidScale) {
  StaticLossScale scale(8);
  scale.set_loss_scale(1000.37f);
  EXPECT_EQ(scale.loss_scale(), 1000.37f);
  EXPECT_EQ(scale.inverse_scale(), static_cast<float>(1.0 / 1000.37f));
  scale.set_loss_scale(FLT_MIN);
  EXPECT_EQ(scale.loss_scale(), FLT_MIN);
  for (const float bad : {0.0f, -1.0f, inf, nan, 1e-39f}) {
    EXPECT_THAT(
        [&] { scale.set_loss_scale(bad); },
        ::testing::ThrowsMessage<xax::ConfigError>(HasSubstr("StaticLossScale::set_loss_scale: scale = ")))
        << bad;
    EXPECT_EQ(scale.loss_scale(), FLT_MIN) << "a refused value changes nothing";
  }
}

TEST(LossScaleSet, DynamicRestartsItsCounterAndHysteresis) {
  DynamicLossScaleOptions options = options_with(64, 3, /*hysteresis=*/2);
  options.min_scale = 2;
  options.max_scale = 1024;
  DynamicLossScale scale(options);
  trajectory(scale, "FFxF");  // counter 1, one overflow absorbed
  ASSERT_EQ(scale.counter(), 1);
  ASSERT_EQ(scale.hysteresis_left(), 1);
  ASSERT_EQ(scale.loss_scale(), 64.0f);

  scale.set_loss_scale(100.5f);
  EXPECT_EQ(scale.loss_scale(), 100.5f);
  EXPECT_EQ(scale.counter(), 0);
  EXPECT_EQ(scale.hysteresis_left(), 2);
  EXPECT_EQ(scale.options(), options) << "initial_scale and the bounds stay";
  // A full growth interval from the new scale, and a full hysteresis.
  EXPECT_EQ(trajectory(scale, "FFFxx"), (std::vector<float>{100.5f, 100.5f, 201.0f, 201.0f, 100.5f}));

  scale.set_loss_scale(2);  // the bounds themselves are accepted
  scale.set_loss_scale(1024);
  const DynamicLossScaleState before = scale.state();
  for (const float bad : {1.5f, 1025.0f, 0.0f, -4.0f, inf, nan}) {
    EXPECT_THAT([&] { scale.set_loss_scale(bad); },
                ::testing::ThrowsMessage<xax::ConfigError>(
                    AllOf(HasSubstr("DynamicLossScale::set_loss_scale: scale = "), HasSubstr("[2, 1024]"))))
        << bad;
    EXPECT_EQ(scale.state(), before) << "a refused value changes nothing";
  }
}

// ---------------------------------------------------------------------------------------------------------------
// What TrainStep asks of a scale it does not know

// Halves on overflow down to 1; no at_min_scale(), so loss_scale_at_min asks a copy.
struct HalvingScale {
  static constexpr std::string_view kind = "halving";
  float value = 8;
  [[nodiscard]] float loss_scale() const { return value; }
  [[nodiscard]] float inverse_scale() const { return 1.0f / value; }
  template <class T>
  [[nodiscard]] T scale(const T& x) const {
    return xax::detail::scaled_copy(x, value);
  }
  template <class T>
  [[nodiscard]] T unscale(const T& x) const {
    return xax::detail::scaled_copy(x, inverse_scale());
  }
  void adjust(bool finite) {
    if (!finite) value = std::max(1.0f, value / 2);
  }
};
static_assert(xax::loss_scale<HalvingScale> && !xax::checkpointable_loss_scale<HalvingScale>);

// A kind held per object passed the concept, then failed to compile inside TrainStep::set_loss_scale.
struct HalvingScaleWithAMemberKind : HalvingScale {
  std::string_view kind = "halving";
};
static_assert(!xax::loss_scale<HalvingScaleWithAMemberKind>, "the kind must be static");

TEST(LossScaleAtMin, UsesTheScalesOwnAnswerOrAsksACopy) {
  EXPECT_TRUE(xax::loss_scale_at_min(NoOpLossScale()));
  EXPECT_TRUE(xax::loss_scale_at_min(StaticLossScale(4)));
  DynamicLossScaleOptions options = options_with(4, 100, /*hysteresis=*/2);
  options.min_scale = 2;
  DynamicLossScale dynamic(options);
  EXPECT_FALSE(xax::loss_scale_at_min(dynamic));
  dynamic.adjust(false);  // absorbed by the hysteresis: the scale can still go lower
  EXPECT_FALSE(xax::loss_scale_at_min(dynamic));
  dynamic.adjust(false);
  EXPECT_EQ(dynamic.loss_scale(), 2.0f);
  EXPECT_TRUE(xax::loss_scale_at_min(dynamic));

  HalvingScale halving;
  EXPECT_FALSE(xax::loss_scale_at_min(halving));
  EXPECT_EQ(halving.loss_scale(), 8.0f) << "the probe adjusts a copy";
  halving.value = 1;
  EXPECT_TRUE(xax::loss_scale_at_min(halving));
}

}  // namespace
