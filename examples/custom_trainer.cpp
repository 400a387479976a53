// The seed's quick example in C++: a user's own task inherits TrainMixin and MixedPrecisionMixin, supplies
// its model's loss and gradients as a template over the compute scalar, and gets casting, loss scaling, the
// fused unscale-and-check, skipping, checkpoints and logging from the mixins.
//
//   ./custom_trainer                                   # the seed's MyConfig: mixed policy, dynamic scaling
//   ./custom_trainer precision_policy=float16 epochs=3
//   ./custom_trainer precision_policy=params=float32,compute=bfloat16,output=float32 loss_scaling=static
//   ./custom_trainer --config my_config.json hidden=256
//
// Any field of the config can be given as key=value; a bad value is reported with what it accepts.
#include <xax/nn/mlp.hpp>
#include <xax/task/mixins/mixed_precision.hpp>
#include <xax/task/mixins/train.hpp>
#include <xax_datasets/synthetic.hpp>

#include <concepts>
#include <cstdio>
#include <exception>
#include <new>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

// The seed's MyConfig: the training and mixed-precision fields, with the seed's values, plus one of our own.
struct MyConfig : xax::TrainConfig, xax::MixedPrecisionConfig {
  std::int64_t hidden = 128;
  // An MLP 784-16384-16384-10 already holds 281 million parameters (about 4.5 GB with its masters, gradients
  // and AdamW moments), far beyond what this example is for; a larger width would only end in an allocation
  // failure, so validate() refuses it with the accepted range instead.
  static constexpr std::int64_t max_hidden = 16384;

  MyConfig() {
    enable_mixed_precision = true;
    precision_policy = "mixed";
    loss_scaling = "dynamic";
    loss_scale_value = 32768;
    learning_rate = 1e-3;
    batch_size = 128;
    epochs = 2;
  }

  template <class Self, class Visit>
  static void visit_fields(Self& self, Visit&& visit) {
    visit("hidden", self.hidden, "an integer from 1 to 16384");
  }
  void validate() const {
    if (hidden < 1 || hidden > max_hidden) {
      throw xax::ConfigError("config field 'hidden': " + std::to_string(hidden) +
                             " is out of range; accepted: an integer from 1 to " +
                             std::to_string(max_hidden));
    }
  }
};

struct Batch {
  Eigen::MatrixXf x;  // features x samples
  Eigen::VectorX<std::int32_t> labels;
};

class MyTask : public xax::TrainMixin<MyTask, MyConfig>, public xax::MixedPrecisionMixin<MyTask, MyConfig> {
 public:
  template <class T>
  using params_type = xax::nn::MlpParams<T>;
  using batch_type = Batch;

  MyTask(MyConfig config, xax::ClassificationSplits data)
      : TrainMixin(std::move(config)), data_(std::move(data)) {}

  params_type<float> init_params() const {
    const auto features = data_.train.feature_count();
    const auto hidden = static_cast<Eigen::Index>(config().hidden);
    return xax::nn::mlp_init({features, hidden, hidden, data_.train.num_classes},
                             static_cast<std::uint64_t>(config().seed));
  }

  std::int64_t num_examples() const { return data_.train.size(); }

  Batch make_batch(std::span<const std::int64_t> indices) const {
    Batch batch{Eigen::MatrixXf(data_.train.feature_count(), static_cast<Eigen::Index>(indices.size())),
                Eigen::VectorX<std::int32_t>(static_cast<Eigen::Index>(indices.size()))};
    for (std::size_t i = 0; i < indices.size(); ++i) {
      batch.x.col(static_cast<Eigen::Index>(i)) = data_.train.features.col(indices[i]);
      batch.labels(static_cast<Eigen::Index>(i)) = data_.train.labels(indices[i]);
    }
    return batch;
  }

  // Declares that loss_and_grads below accepts fp32 gradients of half-precision params (checked at compile
  // time).
  static constexpr bool writes_fp32_gradients = true;

  // The model, written once for every compute scalar: the unscaled loss, and the gradients of loss *
  // loss_scale. G is T, or float when the step asks for fp32 gradients of half-precision parameters, which
  // the backward's matmuls then write from their fp32 accumulators (no cast, nothing rounded to 16 bits).
  template <class T, class G>
  requires(std::same_as<G, T> ||
           std::same_as<G, float>) double loss_and_grads(const params_type<T>& params, const Batch& batch,
                                                         float loss_scale, params_type<G>& grads) {
    return xax::nn::mlp_loss_and_gradients(params, batch.x, batch.labels, grads, workspace<T>(),
                                           {.loss_scale = loss_scale});
  }

  // Test accuracy, run by evaluate_batch() in the policy's compute type.
  template <class T>
  double evaluate(const params_type<T>& params, const Batch& batch) {
    const auto& logits = xax::nn::mlp_forward(params, batch.x, workspace<T>());
    return static_cast<double>(xax::nn::count_correct(logits, batch.labels)) /
           static_cast<double>(batch.x.cols());
  }

  void on_epoch_end(std::int64_t epoch) {
    const Batch test{data_.test.features, data_.test.labels};
    std::printf("epoch %lld: test accuracy %.2f%% (policy %s, loss scale %g, %lld skipped steps)\n",
                static_cast<long long>(epoch + 1), 100.0 * evaluate_batch(test), policy().str().c_str(),
                static_cast<double>(current_loss_scale()), static_cast<long long>(skipped_steps()));
  }

 private:
  template <class T>
  xax::nn::MlpWorkspace<T>& workspace() {
    return std::get<xax::nn::MlpWorkspace<T>>(workspaces_);
  }

  xax::ClassificationSplits data_;
  std::tuple<xax::nn::MlpWorkspace<float>, xax::nn::MlpWorkspace<xax::bfloat16>,
             xax::nn::MlpWorkspace<xax::float16>>
      workspaces_;
};

int main(int argc, char** argv) {
  try {
    MyConfig config;
    std::vector<std::string_view> args(argv + 1, argv + argc);
    if (args.size() >= 2 && args[0] == "--config") {
      xax::load_config_json(config, std::string(args[1]));
      args.erase(args.begin(), args.begin() + 2);
    }
    xax::apply_config_args(config, args);

    xax::SyntheticClassificationOptions data_options;
    data_options.train_samples = 8192;
    data_options.test_samples = 2048;
    MyTask task(config, xax::make_synthetic_classification(data_options));
    std::printf("training an MLP on a synthetic 784-feature, 10-class task under %s, loss scaling %s\n",
                task.policy().str().c_str(), config.loss_scaling.c_str());
    const xax::TrainSummary summary = task.fit();
    std::printf("%lld steps in %.1f s, final loss %.4f\n", static_cast<long long>(summary.steps),
                summary.seconds, summary.last_loss);
    return 0;
  } catch (const xax::Error& error) {
    std::fprintf(stderr, "custom_trainer: %s\n", error.what());
    return 2;
  } catch (const std::bad_alloc&) {
    // Not a bad value but a configuration this machine cannot hold: say so rather than terminate.
    std::fprintf(stderr, "custom_trainer: out of memory; try a smaller hidden or batch_size\n");
    return 1;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "custom_trainer: unexpected error: %s\n", error.what());
    return 1;
  }
}
