#pragma once
// A small user task for the train-step and mixin tests: a 2-layer MLP classifier on a deterministic synthetic
// data set, written the way a user would, as a template over the compute scalar. Arithmetic runs in float on
// float copies of the compute-precision params; parameters and gradients are stored (and rounded) in T, which
// is where half-precision underflow happens and what loss scaling is for.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <vector>
#include <xax/task/mixins/mixed_precision.hpp>
#include <xax/task/mixins/train.hpp>

namespace xax_test {

template <class T>
using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
template <class T>
using Vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;

template <class T>
struct Net {
  Mat<T> w1;
  Vec<T> b1;
  Mat<T> w2;
  Vec<T> b2;
  XAX_FIELDS(w1, b1, w2, b2);
};

struct Batch {
  Eigen::MatrixXf x;  // features x examples
  Eigen::VectorXi y;
};

struct Data {
  Eigen::MatrixXf x;
  Eigen::VectorXi y;
};

// Four Gaussian blobs in 8 dimensions: learnable to near-zero loss by a small MLP.
inline Data make_data(std::int64_t examples, std::uint64_t seed = 7) {
  constexpr int features = 8, classes = 4;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> noise(0.0f, 0.6f);
  Eigen::MatrixXf centers(features, classes);
  for (Eigen::Index i = 0; i < centers.size(); ++i) centers.data()[i] = noise(rng) * 3.0f;
  Data data{Eigen::MatrixXf(features, examples), Eigen::VectorXi(examples)};
  for (Eigen::Index e = 0; e < examples; ++e) {
    const int label = static_cast<int>(e % classes);
    data.y(e) = label;
    for (int f = 0; f < features; ++f) data.x(f, e) = centers(f, label) + noise(rng);
  }
  return data;
}

/// The policies "mixed" runs, for a task's compiled_policies: half_dtype() picks its compute type per CPU.
using MixedOnAnyCpu =
    xax::PolicyList<xax::Policy<float, xax::bfloat16, float>, xax::Policy<float, xax::float16, float>>;

struct TaskConfig : xax::TrainConfig, xax::MixedPrecisionConfig {
  std::int64_t hidden = 16;
  double loss_weight = 1.0;  // multiplies the loss; a tiny weight makes tiny gradients, as small losses do

  template <class Self, class Visit>
  static void visit_fields(Self& self, Visit&& visit) {
    visit("hidden", self.hidden, "an integer >= 1");
    visit("loss_weight", self.loss_weight, "a finite number > 0");
  }
  void validate() const {
    if (hidden < 1) throw xax::ConfigError("config field 'hidden': must be >= 1");
  }
};

class ClassifierTask : public xax::TrainMixin<ClassifierTask, TaskConfig>,
                       public xax::MixedPrecisionMixin<ClassifierTask, TaskConfig> {
 public:
  template <class T>
  using params_type = Net<T>;
  using batch_type = Batch;

  ClassifierTask(TaskConfig config, Data data) : TrainMixin(std::move(config)), data_(std::move(data)) {}

  Net<float> init_params() const {
    std::mt19937_64 rng(static_cast<std::uint64_t>(config().seed) + 1234);
    const auto features = data_.x.rows();
    const auto hidden = static_cast<Eigen::Index>(config().hidden);
    const auto uniform = [&](Eigen::Index rows, Eigen::Index cols, float bound) {
      std::uniform_real_distribution<float> u(-bound, bound);
      Eigen::MatrixXf m(rows, cols);
      for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = u(rng);
      return m;
    };
    return {uniform(hidden, features, 1.0f / std::sqrt(static_cast<float>(features))),
            Eigen::VectorXf::Zero(hidden), uniform(4, hidden, 1.0f / std::sqrt(static_cast<float>(hidden))),
            Eigen::VectorXf::Zero(4)};
  }

  std::int64_t num_examples() const { return data_.x.cols(); }

  Batch make_batch(std::span<const std::int64_t> indices) const {
    Batch batch{Eigen::MatrixXf(data_.x.rows(), static_cast<Eigen::Index>(indices.size())),
                Eigen::VectorXi(static_cast<Eigen::Index>(indices.size()))};
    for (std::size_t i = 0; i < indices.size(); ++i) {
      batch.x.col(static_cast<Eigen::Index>(i)) = data_.x.col(indices[i]);
      batch.y(static_cast<Eigen::Index>(i)) = data_.y(indices[i]);
    }
    return batch;
  }

  // Mean softmax cross-entropy; writes d(loss * loss_scale)/d(params) in T.
  template <class T>
  double loss_and_grads(const Net<T>& p, const Batch& batch, float loss_scale, Net<T>& g) {
    const Eigen::MatrixXf w1 = p.w1.template cast<float>(), w2 = p.w2.template cast<float>();
    const Eigen::VectorXf b1 = p.b1.template cast<float>(), b2 = p.b2.template cast<float>();
    const auto n = static_cast<float>(batch.x.cols());
    const Eigen::MatrixXf pre = (w1 * batch.x).colwise() + b1;
    const Eigen::MatrixXf h = pre.cwiseMax(0.0f);
    Eigen::MatrixXf logits = (w2 * h).colwise() + b2;
    double loss = 0;
    for (Eigen::Index c = 0; c < logits.cols(); ++c) {
      const float max = logits.col(c).maxCoeff();
      const Eigen::VectorXf e = (logits.col(c).array() - max).exp().matrix();
      const float sum = e.sum();
      loss += static_cast<double>(std::log(sum) + max - logits(batch.y(c), c));
      logits.col(c) = e / sum;  // softmax, reused as dlogits below
      logits(batch.y(c), c) -= 1.0f;
    }
    const double weight = config().loss_weight;
    loss *= weight / static_cast<double>(n);
    const Eigen::MatrixXf dlogits = logits * static_cast<float>(static_cast<double>(loss_scale) * weight / n);
    const Eigen::MatrixXf dh =
        (w2.transpose() * dlogits).cwiseProduct((pre.array() > 0.0f).cast<float>().matrix());
    g.w2 = (dlogits * h.transpose()).template cast<T>();
    g.b2 = dlogits.rowwise().sum().template cast<T>();
    g.w1 = (dh * batch.x.transpose()).template cast<T>();
    g.b1 = dh.rowwise().sum().template cast<T>();
    if (calls_++ == inject_at_call) g.w2(0, 0) = T(inject_value);
    return loss;
  }

  template <class T>
  double evaluate(const Net<T>& p, const Batch& batch) {
    const Eigen::MatrixXf h =
        ((p.w1.template cast<float>() * batch.x).colwise() + p.b1.template cast<float>()).cwiseMax(0.0f);
    const Eigen::MatrixXf logits = (p.w2.template cast<float>() * h).colwise() + p.b2.template cast<float>();
    Eigen::Index correct = 0;
    for (Eigen::Index c = 0; c < logits.cols(); ++c) {
      Eigen::Index best = 0;
      logits.col(c).maxCoeff(&best);
      correct += best == batch.y(c) ? 1 : 0;
    }
    return static_cast<double>(correct) / static_cast<double>(logits.cols());
  }

  void on_step(std::int64_t, const xax::StepResult& result) { results.push_back(result); }
  // Records the epochs finished and, when a path is set, saves a checkpoint there at the end of each.
  void on_epoch_end(std::int64_t epoch) {
    epochs_finished.push_back(epoch);
    if (!checkpoint_at_epoch_end.empty()) save_checkpoint(checkpoint_at_epoch_end);
  }

  // Fault injection: on this call of loss_and_grads (counted from 0), grads.w2(0, 0) becomes inject_value.
  std::int64_t inject_at_call = -1;
  float inject_value = std::numeric_limits<float>::infinity();
  std::vector<xax::StepResult> results;
  std::vector<std::int64_t> epochs_finished;
  std::string checkpoint_at_epoch_end;

  const Data& data() const { return data_; }

 private:
  Data data_;
  std::int64_t calls_ = 0;
};

/// The parameters' bits in one vector (weights, then biases), for bit-for-bit comparisons of runs.
inline std::vector<float> flat(const Net<float>& net) {
  std::vector<float> out;
  for (const auto* m : {&net.w1, &net.w2}) out.insert(out.end(), m->data(), m->data() + m->size());
  for (const auto* v : {&net.b1, &net.b2}) out.insert(out.end(), v->data(), v->data() + v->size());
  return out;
}

inline bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

inline TaskConfig default_config() {
  TaskConfig config;
  config.learning_rate = 1e-2;
  config.batch_size = 32;
  config.epochs = 3;
  config.log_interval = 0;
  config.progress = false;
  config.weight_decay = 0;
  return config;
}

}  // namespace xax_test
