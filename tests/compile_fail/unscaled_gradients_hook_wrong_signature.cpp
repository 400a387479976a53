// expected-error: static.assert[a-z]* failed.*on_unscaled_gradients must be callable as
// A trainer whose gradient hook has the wrong signature (compute-type gradients) is refused at compile time,
// instead of never being called.
#include <xax/task/train_step.hpp>

namespace {

template <class T>
struct Weights {
  Eigen::Matrix<T, Eigen::Dynamic, 1> w;
  XAX_FIELDS(w);
};

struct Batch {};

class Trainer : public xax::TrainStep<Trainer, xax::Policy<float, xax::bfloat16, float>, xax::NoOpLossScale> {
 public:
  template <class T>
  using params_type = Weights<T>;
  using batch_type = Batch;

  Trainer() { reset_train_state(Weights<float>{Eigen::VectorXf::Zero(2)}, xax::optim::SgdOptions{}, {}); }

  template <class T>
  double loss_and_grads(const Weights<T>&, const Batch&, float, Weights<T>&) {
    return 0;
  }
  void on_unscaled_gradients(Weights<xax::bfloat16>&, const xax::UnscaledGradients&) {}
};

}  // namespace

int main() {
  Trainer trainer;
  trainer.train_step(Batch{});
}
