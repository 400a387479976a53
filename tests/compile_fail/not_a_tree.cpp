// expected-error: XAX_FIELDS
// A struct that did not opt in cannot be walked; the error tells the user the line to add.
#include <xax/utils/tree.hpp>

struct NotOptedIn {
  Eigen::MatrixXf w;
};

int main() {
  return static_cast<int>(xax::leaf_count(NotOptedIn{}));
}
