// Compile-time tests of the loss-scale and conversion concepts, positive and negative (mp-units'
// test/static). Building this file is the test.
#include <array>
#include <span>
#include <string>
#include <vector>
#include <xax/ops/convert.hpp>
#include <xax/utils/loss_scale.hpp>

namespace {

// Every kind of loss scale satisfies the requirements a train step relies on.
static_assert(xax::loss_scale<xax::NoOpLossScale>);
static_assert(xax::loss_scale<xax::StaticLossScale>);
static_assert(xax::loss_scale<xax::DynamicLossScale>);
static_assert(!xax::loss_scale<int>);
static_assert(!xax::loss_scale<xax::LossScale>, "the variant is visited, not used as a loss scale directly");
static_assert(!xax::loss_scale<xax::DynamicLossScaleOptions>);

// A type with everything except adjust() is not a loss scale.
struct NoAdjust {
  static constexpr std::string_view kind = "custom";
  float loss_scale() const { return 1; }
  float inverse_scale() const { return 1; }
  template <class T>
  T scale(const T& x) const {
    return x;
  }
  template <class T>
  T unscale(const T& x) const {
    return x;
  }
};
static_assert(!xax::loss_scale<NoAdjust>);

// Every built-in kind saves and restores its whole state as a tree; a loss scale without one is still a loss
// scale (TrainStep trains with it) but not a checkpointable one.
static_assert(xax::checkpointable_loss_scale<xax::NoOpLossScale>);
static_assert(xax::checkpointable_loss_scale<xax::StaticLossScale>);
static_assert(xax::checkpointable_loss_scale<xax::DynamicLossScale>);
static_assert(xax::tree<xax::NoOpLossScaleState> && xax::tree<xax::StaticLossScaleState> &&
              xax::tree<xax::DynamicLossScaleState> && xax::tree<xax::DynamicLossScaleOptions>);

struct StatelessScale {
  static constexpr std::string_view kind = "stateless";
  float loss_scale() const { return 1; }
  float inverse_scale() const { return 1; }
  template <class T>
  T scale(const T& x) const {
    return x;
  }
  template <class T>
  T unscale(const T& x) const {
    return x;
  }
  void adjust(bool) {}
};
static_assert(xax::loss_scale<StatelessScale> && !xax::checkpointable_loss_scale<StatelessScale>);

static_assert(xax::NoOpLossScale::kind == "none" && xax::StaticLossScale::kind == "static" &&
              xax::DynamicLossScale::kind == "dynamic");
static_assert(std::is_default_constructible_v<xax::DynamicLossScale>);
static_assert(!std::is_convertible_v<float, xax::StaticLossScale>,
              "a bare float is not silently a loss scale");
static_assert(std::is_same_v<std::variant_alternative_t<0, xax::LossScale>, xax::NoOpLossScale>,
              "a default LossScale scales nothing");

// Conversions take contiguous sized ranges of floating scalars; the destination must be writable.
static_assert(xax::floating_array<std::vector<float>> && xax::floating_array<std::span<const xax::bfloat16>>);
static_assert(xax::floating_array<std::array<xax::float16, 4>> && xax::floating_array<double[3]>);
static_assert(!xax::floating_array<std::vector<int>> && !xax::floating_array<std::string>);
static_assert(xax::writable_floating_array<std::span<float>> &&
              !xax::writable_floating_array<std::span<const float>>);

}  // namespace
