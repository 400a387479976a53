// expected-error: static.assert[a-z]* failed.*declares `writes_fp32_gradients = true`, but its loss_and_grads
// A trainer that declares the fp32-gradient path but whose loss_and_grads only takes compute-type gradients
// is refused at compile time, instead of silently falling back to the cast.
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
  static constexpr bool writes_fp32_gradients = true;

  Trainer() { reset_train_state(Weights<float>{Eigen::VectorXf::Zero(2)}, xax::optim::SgdOptions{}, {}); }

  template <class T>
  double loss_and_grads(const Weights<T>&, const Batch&, float, Weights<T>&) {
    return 0;
  }
};

}  // namespace

int main() {
  Trainer trainer;
  trainer.train_step(Batch{});
}
