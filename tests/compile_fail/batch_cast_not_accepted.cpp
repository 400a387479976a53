// expected-error: static.assert[a-z]* failed.*declares `casts_batch_to_compute = true`, but its
// loss_and_grads A trainer that declares cast batches but whose loss_and_grads only takes the caller's fp32
// batch is refused at compile time, naming what to write.
#include <xax/task/train_step.hpp>

namespace {

template <class T>
struct Weights {
  Eigen::Matrix<T, Eigen::Dynamic, 1> w;
  XAX_FIELDS(w);
};

template <class T>
struct Batch {
  Eigen::Matrix<T, Eigen::Dynamic, 1> x;
  XAX_FIELDS(x);
};

class Trainer : public xax::TrainStep<Trainer, xax::Policy<float, xax::bfloat16, float>, xax::NoOpLossScale> {
 public:
  template <class T>
  using params_type = Weights<T>;
  using batch_type = Batch<float>;
  static constexpr bool casts_batch_to_compute = true;

  Trainer() { reset_train_state(Weights<float>{Eigen::VectorXf::Zero(2)}, xax::optim::SgdOptions{}, {}); }

  template <class T>
  double loss_and_grads(const Weights<T>&, const Batch<float>&, float, Weights<T>&) {
    return 0;
  }
};

}  // namespace

int main() {
  Trainer trainer;
  trainer.train_step(Batch<float>{});
}
