// expected-error: static.assert[a-z]* failed.*xax::TrainStep: the derived trainer must define .*loss_scale
// A trainer whose loss_and_grads has the wrong signature (no loss scale) is refused with a message naming
// what TrainStep needs, not with an error from deep inside the step.
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

  template <class T>
  double loss_and_grads(const Weights<T>&, const Batch&, Weights<T>&) {
    return 0;
  }
};

}  // namespace

int main() {
  Trainer trainer;
  trainer.train_step(Batch{});
}
