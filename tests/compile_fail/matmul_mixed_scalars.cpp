// expected-error: static.assert[a-z]* failed.*xax::matmul: A and B must have the same scalar; convert one
// xax::matmul multiplies operands of one scalar type; mixing float and bfloat16 must not compile silently
// into a conversion of one operand.
#include <xax/ops/matmul.hpp>

int main() {
  const Eigen::MatrixXf a = Eigen::MatrixXf::Ones(2, 2);
  const Eigen::Matrix<xax::bfloat16, Eigen::Dynamic, Eigen::Dynamic> b(2, 2);
  Eigen::MatrixXf c;
  xax::matmul(a, b, c);
}
