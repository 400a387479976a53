// expected-error: static.assert[a-z]* failed.*writes the tree's leaves, and one is an Eigen::Map of const
// A Map of const data is a leaf that can be read (checked, cast from, saved), not written: a walk that writes
// it stops at one message naming the leaf kind and what to pass instead.
#include <xax/utils/finite.hpp>
#include <xax/utils/tree.hpp>

struct Params {
  Eigen::Map<const Eigen::MatrixXf> w;
  XAX_FIELDS(w);
};

int main() {
  const Eigen::MatrixXf storage = Eigen::MatrixXf::Ones(2, 2);
  Params params{Eigen::Map<const Eigen::MatrixXf>(storage.data(), 2, 2)};
  return xax::unscale_and_check(params, 2.0f) ? 0 : 1;
}
