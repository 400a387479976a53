// expected-error: static.assert[a-z]* failed.*xax::optim: .*keep float16 or mixed parameters as fp32 masters
// An optimizer over float16 parameters is refused with a message that says what to do instead.
#include <xax/optim/adamw.hpp>

struct Params {
  Eigen::Matrix<xax::float16, Eigen::Dynamic, 1> w;
  XAX_FIELDS(w);
};

int main() {
  const Params params{};
  xax::optim::AdamW<Params> adamw(params);
}
