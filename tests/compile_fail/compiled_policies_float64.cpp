// expected-error: static.assert[a-z]* failed.*compiled_policies. may list float16, bfloat16 or float32 params
// A MixedPrecisionMixin task cannot list a float64 policy: the mixin compiles half and float32 steps only.
#include <xax/task/mixins/mixed_precision.hpp>

template <class T>
struct Params {
  Eigen::Matrix<T, Eigen::Dynamic, 1> w;
  XAX_FIELDS(w);
};

struct Config : xax::MixedPrecisionConfig {
  xax::OptimizerOptions optimizer_options() const { return xax::optim::AdamWOptions{}; }
};

class Task : public xax::MixedPrecisionMixin<Task, Config> {
 public:
  using compiled_policies = xax::PolicyList<xax::Policy<double, float, double>>;
  template <class T>
  using params_type = Params<T>;
  using batch_type = int;

  const Config& config() const { return config_; }
  Params<float> init_params() const { return {}; }
  template <class T>
  double loss_and_grads(const Params<T>&, const int&, float, Params<T>&) {
    return 0;
  }

 private:
  Config config_;
};

int main() {
  Task task;
  task.train_step(0);
}
