// Extending xax: the train step is open where jmp, Haiku and PyTorch AMP users expect it. This program trains
// an MLP under bf16 compute with
//   - a user-written optimizer (Lion, Chen et al. 2023) whose weight decay skips biases and norm gains
//   through
//     xax's parameter groups;
//   - a user-written loss scale (halves on overflow, doubles every `interval` finite steps up to a cap);
//   - a hook that sees the unscaled fp32 gradients before the update (here: a per-leaf clip and a log line);
//   - per-leaf precision: a learned input-normalisation gain kept in fp32 (xax::full_precision_t) while the
//     MLP's weights compute in bf16, as Haiku keeps norm layers in full precision.
//
//   ./extending            # exits 0 when the loss fell
#include <xax/nn/mlp.hpp>
#include <xax/optim/param_groups.hpp>
#include <xax/task/train_step.hpp>
#include <xax_datasets/synthetic.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string_view>
#include <vector>

// --- A user-written optimizer: any type with step(params, grads), a state() tree and a settable learning
// rate plugs into TrainStep (xax::train_optimizer).
struct LionOptions {
  double learning_rate = 3e-4;
  double beta1 = 0.9;
  double beta2 = 0.99;
  double weight_decay = 0.1;
  xax::optim::ParamGroups groups;  // per-leaf learning-rate scale and weight decay, by leaf path
};

template <class Params>
struct LionState {
  std::int64_t step = 0;
  Params momentum;
  XAX_FIELDS(step, momentum);
};

template <class Params>
class Lion {
 public:
  Lion(const Params& like, LionOptions options)
      : options_(std::move(options)), leaves_(options_.groups.resolve(like, options_.weight_decay)) {
    state_.momentum = xax::zeros_like(like);
  }

  void step(Params& params, const Params& grads) {
    std::size_t leaf = 0;
    xax::for_each_leaf(
        [&]<class L>(L& p, const L& g, L& m) {
          if constexpr (xax::floating_leaf<L>) {
            const xax::optim::LeafSettings& settings = leaves_[leaf++];
            const double lr = options_.learning_rate * settings.learning_rate_scale;
            const auto decay = static_cast<float>(1.0 - lr * settings.weight_decay);
            const auto b1 = static_cast<float>(options_.beta1), b2 = static_cast<float>(options_.beta2);
            auto ps = xax::leaf_span(p);
            const auto gs = xax::leaf_span(g);
            auto ms = xax::leaf_span(m);
            for (std::size_t i = 0; i < ps.size(); ++i) {
              const float c = b1 * ms[i] + (1 - b1) * gs[i];
              const float sign = c > 0 ? 1.0f : (c < 0 ? -1.0f : 0.0f);
              ps[i] = ps[i] * decay - static_cast<float>(lr) * sign;
              ms[i] = b2 * ms[i] + (1 - b2) * gs[i];
            }
          }
        },
        params, grads, state_.momentum);
    ++state_.step;
  }

  [[nodiscard]] const LionState<Params>& state() const { return state_; }
  [[nodiscard]] LionState<Params>& state() { return state_; }
  void set_learning_rate(double learning_rate) { options_.learning_rate = learning_rate; }
  [[nodiscard]] double learning_rate() const { return options_.learning_rate; }
  [[nodiscard]] static const char* name() { return "lion"; }

 private:
  LionOptions options_;
  std::vector<xax::optim::LeafSettings> leaves_;  // one per floating leaf, in tree order
  LionState<Params> state_;
};

// --- A user-written loss scale: meets xax::loss_scale, and xax::checkpointable_loss_scale through its state.
class CappedGrowthScale {
 public:
  static constexpr std::string_view kind = "capped_growth";
  struct State {
    float scale = 1024;
    std::int64_t finite_run = 0;
    std::int64_t interval = 200;
    float cap = 65536;
    XAX_FIELDS(scale, finite_run, interval, cap);
  };
  using state_type = State;

  CappedGrowthScale(float initial, std::int64_t interval, float cap) : state_{initial, 0, interval, cap} {}

  [[nodiscard]] float loss_scale() const { return state_.scale; }
  [[nodiscard]] float inverse_scale() const { return 1.0f / state_.scale; }
  [[nodiscard]] float scale(float value) const { return value * state_.scale; }
  [[nodiscard]] Eigen::MatrixXf scale(const Eigen::MatrixXf& tree) const { return tree * state_.scale; }
  [[nodiscard]] Eigen::MatrixXf unscale(const Eigen::MatrixXf& tree) const { return tree * inverse_scale(); }
  void adjust(bool grads_finite) {
    if (!grads_finite) {
      state_.scale = std::max(1.0f, state_.scale / 2);
      state_.finite_run = 0;
    } else if (++state_.finite_run == state_.interval) {
      state_.scale = std::min(state_.cap, state_.scale * 2);
      state_.finite_run = 0;
    }
  }
  [[nodiscard]] bool at_min_scale() const { return state_.scale <= 1.0f; }

  [[nodiscard]] State state() const { return state_; }
  static CappedGrowthScale from_state(const State& saved) {
    if (!(saved.scale >= 1 && saved.scale <= saved.cap && saved.interval >= 1 && saved.finite_run >= 0 &&
          saved.finite_run < saved.interval)) {
      throw xax::CheckpointError("capped_growth loss scale: the saved state is not one a run can reach");
    }
    CappedGrowthScale restored(saved.scale, saved.interval, saved.cap);
    restored.state_.finite_run = saved.finite_run;
    return restored;
  }

 private:
  State state_;
};
static_assert(xax::loss_scale<CappedGrowthScale> && xax::checkpointable_loss_scale<CappedGrowthScale>);

struct Batch {
  Eigen::MatrixXf x;  // features x samples
  Eigen::VectorX<std::int32_t> labels;
};

// --- The model: an MLP behind a per-feature input gain. The gain is declared full_precision_t<T>: it is
// float in the masters, the bf16 compute copy, the gradients and the checkpoint, while the MLP follows the
// policy.
template <class T>
struct GainedMlp {
  Eigen::VectorX<xax::full_precision_t<T>> input_norm_gain;  // a norm gain: no weight decay either
  xax::nn::MlpParams<T> mlp;
  XAX_FIELDS(input_norm_gain, mlp);
};

// --- The trainer: the model as a template over the compute scalar, and the hook.
class Trainer : public xax::TrainStep<Trainer, xax::Policy<float, xax::bfloat16, float>, CappedGrowthScale> {
 public:
  template <class T>
  using params_type = GainedMlp<T>;
  using batch_type = Batch;
  static constexpr bool writes_fp32_gradients = true;  // the backward's matmuls write fp32 gradients

  explicit Trainer(const GainedMlp<float>& initial) {
    LionOptions lion;
    lion.groups = xax::optim::ParamGroups{}.no_weight_decay_if(xax::optim::is_bias_or_norm);
    reset_train_state(
        initial, [&](const params_type<float>& like) { return Lion<params_type<float>>(like, lion); },
        CappedGrowthScale(1024, 200, 65536));
  }

  template <class T, class G>
  requires(std::same_as<G, T> ||
           std::same_as<G, float>) double loss_and_grads(const params_type<T>& params, const Batch& batch,
                                                         float loss_scale, params_type<G>& grads) {
    // The MLP sees x' = gain ⊙ x, formed in fp32 from the fp32 gain and rounded once by the first matmul.
    scaled_inputs_ = params.input_norm_gain.asDiagonal() * batch.x;
    const float loss = xax::nn::mlp_loss_and_gradients(params.mlp, scaled_inputs_, batch.labels, grads.mlp,
                                                       workspace_, {.loss_scale = loss_scale});
    // With z1 = W1 diag(gain) x, the chain rule gives dL/dgain_i = sum_j W1[j,i] dL/dW1[j,i] / gain_i, so the
    // gain's gradient comes from the first layer's without another pass over the batch (the gain stays
    // near 1; it is initialised to 1 and never reaches 0 in this run).
    const auto& w1 = params.mlp.layers.front().w;
    const auto& dw1 = grads.mlp.layers.front().w;
    grads.input_norm_gain = (w1.template cast<float>().cwiseProduct(dw1.template cast<float>()))
                                .colwise()
                                .sum()
                                .transpose()
                                .cwiseQuotient(params.input_norm_gain);
    return loss;
  }

  // Between unscale-and-check and the update, on finite steps: clip each leaf to unit L2 norm and log.
  void on_unscaled_gradients(params_type<float>& grads, const xax::UnscaledGradients& info) {
    xax::for_each_leaf(
        []<class L>(L& leaf) {
          if constexpr (xax::floating_leaf<L>) {
            const float norm = leaf.norm();
            if (norm > 1.0f) leaf /= norm;
          }
        },
        grads);
    if (train_step_calls() % 100 == 0)
      std::printf("after %lld steps: gradient norm %.4f\n", static_cast<long long>(train_step_calls()),
                  info.norm);
  }

 private:
  xax::nn::MlpWorkspace<xax::bfloat16> workspace_;
  Eigen::MatrixXf scaled_inputs_;
};

int main() {
  try {
    xax::SyntheticClassificationOptions data_options;
    data_options.train_samples = 4096;
    data_options.test_samples = 512;
    const xax::ClassificationSplits data = xax::make_synthetic_classification(data_options);
    const Eigen::Index features = data.train.feature_count();
    const std::vector<Eigen::Index> sizes{features, 64, data.train.num_classes};
    const GainedMlp<float> initial{Eigen::VectorXf::Ones(features), xax::nn::mlp_init(sizes, 7)};
    Trainer trainer(initial);

    const Eigen::Index batch_size = 128;
    double first_loss = 0, last_loss = 0;
    for (std::int64_t step = 0; step < 300; ++step) {
      const Eigen::Index start = (step * batch_size) % (data.train.size() - batch_size);
      const Batch batch{data.train.features.middleCols(start, batch_size),
                        data.train.labels.segment(start, batch_size)};
      const xax::StepResult result = trainer.train_step(batch);
      if (step == 0) first_loss = result.loss;
      last_loss = result.loss;
    }
    std::printf("loss %.4f -> %.4f after %lld steps (%lld skipped), loss scale %g\n", first_loss, last_loss,
                static_cast<long long>(trainer.train_step_calls()),
                static_cast<long long>(trainer.skipped_steps()),
                static_cast<double>(trainer.current_loss_scale()));
    // The gain learned in fp32: Lion moves it by lr = 3e-4 per step, far below bf16's ulp at 1 (2^-7). The
    // forward saw each of those steps; a bf16 compute copy would have seen the gain move in jumps of 2^-7.
    const Eigen::VectorXf& gain = trainer.params().input_norm_gain;
    const float gain_moved = (gain.array() - 1.0f).abs().maxCoeff();
    std::printf("input_norm_gain moved by up to %.5f (bf16's ulp at 1 is %.5f)\n", gain_moved, 1.0 / 128);
    return last_loss < first_loss && gain_moved > 0 ? 0 : 1;
  } catch (const xax::Error& error) {
    std::fprintf(stderr, "extending: %s\n", error.what());
    return 2;
  }
}
