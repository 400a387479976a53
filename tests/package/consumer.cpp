// A consumer of xax: checks that the headers, the policy parser and a tree cast work from an outside project.
#include <xax/xax.hpp>

#include <cstdio>

template <class T>
struct Params {
  Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> w;
  XAX_FIELDS(w);
};

int main() {
  const xax::PolicySpec spec = xax::get_policy("params=float32,compute=bfloat16,output=float32");
  Params<float> params{Eigen::MatrixXf::Constant(2, 3, 1.5f)};
  const auto half = xax::tree_cast<xax::bfloat16>(params);
  const bool ok = spec.compute == xax::DType::bfloat16 && static_cast<float>(half.w(1, 2)) == 1.5f;
  std::puts(ok ? "xax consumer: ok" : "xax consumer: FAILED");
  return ok ? 0 : 1;
}
