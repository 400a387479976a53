// TrainStep's gradient_reducer customization point (xax/task/train_step.hpp), without MPI: a trainer that
// collects each micro-batch's gradients and returns their reduction is stepped exactly like one that lets
// TrainStep sum them, and a reducer that reports more micro-batches (other processes' share) is averaged over
// them. The same through MixedPrecisionMixin. The MPI reducer itself is tested under mpiexec (tests/mpi/).
#include <gtest/gtest.h>

#include <cstring>
#include <span>
#include <vector>
#include <xax/task/train_step.hpp>

#include "train_test_task.hpp"

namespace {

using xax_test::Batch;
using xax_test::flat;
using xax_test::Net;

template <class Policy>
struct Model {
  template <class T>
  using params_type = Net<T>;
  using batch_type = Batch;
  xax_test::ClassifierTask task{xax_test::default_config(), xax_test::make_data(256)};
  template <class T>
  double loss_and_grads(const Net<T>& p, const Batch& b, float scale, Net<T>& g) {
    return task.loss_and_grads(p, b, scale, g);
  }
};

template <class Policy>
class Plain : public Model<Policy>, public xax::TrainStep<Plain<Policy>, Policy> {
 public:
  Plain() {
    this->reset_train_state(this->task.init_params(), xax::optim::AdamWOptions{}, xax::DynamicLossScale{});
  }
};

// Collects every micro-batch and sums them itself; `copies` pretends that many processes contributed the same
// gradients (as identical ranks would), which the average must cancel exactly.
template <class Policy>
class Reducing : public Model<Policy>, public xax::TrainStep<Reducing<Policy>, Policy> {
 public:
  explicit Reducing(int copies = 1) : copies_(copies) {
    this->reset_train_state(this->task.init_params(), xax::optim::AdamWOptions{}, xax::DynamicLossScale{});
  }
  void collect_micro_gradients(std::size_t index, double loss, const Net<float>& grads) {
    if (index == 0) collected.clear(), losses.clear();
    EXPECT_EQ(index, collected.size());
    collected.push_back(grads);
    losses.push_back(loss);
  }
  xax::ReducedGradients reduce_gradients(Net<float>& grads) {
    grads = collected[0];
    for (std::size_t i = 1; i < collected.size(); ++i) {
      grads.w1 += collected[i].w1, grads.b1 += collected[i].b1, grads.w2 += collected[i].w2,
          grads.b2 += collected[i].b2;
    }
    double loss = 0;
    for (const double l : losses) loss += l;
    if (copies_ == 2) {
      grads.w1 *= 2.0f, grads.b1 *= 2.0f, grads.w2 *= 2.0f, grads.b2 *= 2.0f;  // exact: a power of two
      loss *= 2;
    }
    ++reductions;
    return {loss, static_cast<std::int64_t>(collected.size()) * copies_ * (report_none ? 0 : 1)};
  }
  std::vector<Net<float>> collected;
  std::vector<double> losses;
  int reductions = 0;
  bool report_none = false;

 private:
  int copies_;
};

static_assert(xax::gradient_reducer<Reducing<xax::Policy<float>>, Net<float>>);
static_assert(!xax::gradient_reducer<Plain<xax::Policy<float>>, Net<float>>);

template <class Trainer>
std::vector<xax::StepResult> run(Trainer& trainer) {
  std::vector<xax::StepResult> results;
  std::vector<std::int64_t> order(256);
  for (std::int64_t i = 0; i < 256; ++i) order[static_cast<std::size_t>(i)] = (i * 37) % 256;
  for (int step = 0; step < 6; ++step) {
    std::vector<Batch> micro;
    for (int m = 0; m < 4; ++m) {
      micro.push_back(trainer.task.make_batch(std::span<const std::int64_t>(order).subspan(
          static_cast<std::size_t>((step * 4 + m) * 8 % 224), 8)));
    }
    results.push_back(trainer.train_step(std::span<const Batch>(micro)));
  }
  return results;
}

template <class Policy>
class GradientReducerHook : public ::testing::Test {};
using Policies = ::testing::Types<xax::Policy<float>, xax::Policy<float, xax::bfloat16, float>,
                                  xax::Policy<float, xax::float16, float>>;
TYPED_TEST_SUITE(GradientReducerHook, Policies);

TYPED_TEST(GradientReducerHook, ReducerThatSumsInOrderStepsLikeTrainStepsOwnAccumulation) {
  Plain<TypeParam> plain;
  Reducing<TypeParam> reducing;
  const auto expected = run(plain);
  const auto got = run(reducing);
  EXPECT_EQ(flat(reducing.params()), flat(plain.params()));
  for (std::size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(got[i].loss, expected[i].loss);
    EXPECT_EQ(got[i].grad_norm, expected[i].grad_norm);
  }
  EXPECT_EQ(reducing.reductions, 6);
  EXPECT_EQ(reducing.collected.size(), 4u);  // each micro-batch handed over on its own
}

TYPED_TEST(GradientReducerHook, StepAveragesOverTheMicroBatchesTheReducerReports) {
  Plain<TypeParam> plain;
  Reducing<TypeParam> two_identical_ranks(2);
  const auto expected = run(plain);
  const auto got = run(two_identical_ranks);
  EXPECT_EQ(flat(two_identical_ranks.params()), flat(plain.params()));
  EXPECT_EQ(got.back().loss, expected.back().loss);
}

TEST(GradientReducerHookErrors, ReducerReportingNoMicroBatchesIsAnError) {
  Reducing<xax::Policy<float>> reducing;
  reducing.report_none = true;
  const Batch batch = reducing.task.make_batch(std::vector<std::int64_t>{0, 1, 2, 3});
  const auto before = flat(reducing.params());
  EXPECT_THROW(reducing.train_step(batch), xax::Error);
  EXPECT_EQ(flat(reducing.params()), before);
  EXPECT_EQ(reducing.train_step_calls(), 0);
}

// The mixins' hooks a data-parallel task uses: the engine forwards the reducer, MixedPrecisionMixin lets the
// task synchronize its initial params, TrainMixin asks which micro-batches are the task's and whether it
// writes checkpoints.
struct HookConfig : xax_test::TaskConfig {};

class HookTask : public xax::TrainMixin<HookTask, HookConfig>,
                 public xax::MixedPrecisionMixin<HookTask, HookConfig> {
 public:
  using compiled_policies = xax_test::MixedOnAnyCpu;  // its config runs "mixed" alone
  template <class T>
  using params_type = Net<T>;
  using batch_type = Batch;
  explicit HookTask(const HookConfig& config)
      : TrainMixin(config), inner_(config, xax_test::make_data(256)) {}
  Net<float> init_params() const {
    Net<float> p = inner_.init_params();
    p.w1 *= 2.0f;  // undone (exactly) by synchronize_initial_params
    return p;
  }
  void synchronize_initial_params(Net<float>& p) { p.w1 *= 0.5f, ++synchronized; }
  std::int64_t num_examples() const { return inner_.num_examples(); }
  Batch make_batch(std::span<const std::int64_t> indices) const { return inner_.make_batch(indices); }
  template <class T>
  double loss_and_grads(const Net<T>& p, const Batch& b, float scale, Net<T>& g) {
    return inner_.loss_and_grads(p, b, scale, g);
  }
  bool owns_micro_batch(std::int64_t, std::int64_t per_step) {
    EXPECT_EQ(per_step, 4);
    ++ownership_asked;
    return true;
  }
  bool writes_checkpoints() const { return false; }
  void collect_micro_gradients(std::size_t index, double loss, const Net<float>& grads) {
    if (index == 0) sum = grads, loss_sum = 0, count = 0;
    if (index > 0) sum.w1 += grads.w1, sum.b1 += grads.b1, sum.w2 += grads.w2, sum.b2 += grads.b2;
    loss_sum += loss;
    ++count;
  }
  xax::ReducedGradients reduce_gradients(Net<float>& grads) {
    grads = sum;
    ++reductions;
    return {loss_sum, count};
  }
  int synchronized = 0, reductions = 0;
  std::int64_t ownership_asked = 0;

 private:
  xax_test::ClassifierTask inner_;
  Net<float> sum;
  double loss_sum = 0;
  std::int64_t count = 0;
};

TEST(GradientReducerHookMixins, DataParallelHooksAreCalledAndChangeNothingForOneProcess) {
  HookConfig config;
  static_cast<xax_test::TaskConfig&>(config) = xax_test::default_config();
  config.enable_mixed_precision = true;
  config.accumulation_steps = 4;
  config.batch_size = 8;
  config.epochs = 1;
  config.checkpoint_interval = 1;
  config.checkpoint_path = "/nonexistent-dir/never-written.xax";  // writing it would throw
  xax_test::TaskConfig plain_config = config;
  plain_config.checkpoint_interval = 0;
  xax_test::ClassifierTask plain(plain_config, xax_test::make_data(256));
  plain.fit();
  HookTask task(config);
  task.fit();
  EXPECT_EQ(flat(task.params_float32()), flat(plain.params_float32()));
  EXPECT_EQ(task.synchronized, 1);
  EXPECT_EQ(task.reductions, 8);  // 256 / 8 = 32 micro-batches, 4 per step
  EXPECT_EQ(task.ownership_asked, 32);
}

}  // namespace
