// expected-error: static.assert[a-z]* failed.*xax: this type is not a tree\. .*opts in .* XAX_FIELDS\(w, b\);
// A struct that did not opt in cannot be walked; the error tells the user the line to add.
#include <xax/utils/tree.hpp>

struct NotOptedIn {
  Eigen::MatrixXf w;
};

int main() {
  return static_cast<int>(xax::leaf_count(NotOptedIn{}));
}
