// expected-error: static.assert[a-z]* failed.*casting this struct .* must be a class template whose first
// Casting a struct whose floating fields would change type needs the struct to be a template over its scalar.
#include <xax/utils/tree.hpp>
#include <xax/utils/tree_cast.hpp>

struct Fixed {
  Eigen::MatrixXf w;
  XAX_FIELDS(w);
};

int main() {
  return static_cast<int>(xax::tree_cast<xax::bfloat16>(Fixed{}).w.size());
}
