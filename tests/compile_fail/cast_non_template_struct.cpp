// expected-error: casting this struct changes the scalar .* parameters are types, the first one its
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
