// expected-error: static.assert[a-z]* failed.*xax: zipped trees differ in structure: std::arrays of
// Two std::array nodes of different sizes cannot be zipped: the sizes are known at compile time, and a
// run-time walk would read past the shorter one.
#include <array>
#include <xax/utils/tree.hpp>

int main() {
  std::array<float, 3> three{};
  std::array<float, 2> two{};
  xax::for_each_leaf([](float&, float&) {}, three, two);
  return 0;
}
