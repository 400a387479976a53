#pragma once
// The trees the checkpoint fuzzer restores and its seed generator writes: one of each leaf kind (dynamic and
// fixed matrices, a dynamic and a fixed-size tensor, a vector node, a map node, integer and bool scalars).
#include <xax/task/checkpoint.hpp>

#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

namespace xax_fuzz {

template <class T = float>
struct FuzzModel {
  std::vector<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>> layers;
  Eigen::Matrix<T, Eigen::Dynamic, 1> bias;
  Eigen::Tensor<T, 3> conv;
  Eigen::TensorFixedSize<T, Eigen::Sizes<2, 2>> fixed_tensor;
  Eigen::Matrix<T, 2, 2> fixed;
  std::map<std::string, T> scalars;
  std::int64_t step = 0;
  bool flag = false;
  XAX_FIELDS(layers, bias, conv, fixed_tensor, fixed, scalars, step, flag);
};

template <class T = float>
FuzzModel<T> make_fuzz_model() {
  FuzzModel<T> m;
  m.layers = {Eigen::MatrixXf::Constant(2, 3, 0.5f).cast<T>(),
              Eigen::MatrixXf::Constant(1, 2, -1.0f).cast<T>()};
  m.bias = Eigen::VectorXf::LinSpaced(3, 0.0f, 1.0f).cast<T>();
  m.conv.resize(2, 1, 2);
  m.conv.setConstant(T(0.25f));
  m.fixed_tensor.setConstant(T(2.0f));
  m.fixed << T(1.0f), T(2.0f), T(3.0f), T(4.0f);
  m.scalars = {{"lr", T(0.5f)}, {"momentum", T(0.875f)}};
  m.step = 42;
  m.flag = true;
  return m;
}

// Leaves whose storage is not a plain column-major buffer: row-major ones, which the reader reorders from the
// file's column-major order, and a matrix with compile-time maximum sizes (inline storage), which may take a
// stored size up to its maximum only.
struct FuzzLayouts {
  Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> rows;
  Eigen::Tensor<float, 3, Eigen::RowMajor> row_tensor;
  Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, 0, 4, 3> bounded;
  Eigen::Array<bool, Eigen::Dynamic, 1> mask;
  XAX_FIELDS(rows, row_tensor, bounded, mask);
};

inline FuzzLayouts make_fuzz_layouts() {
  FuzzLayouts m;
  m.rows.resize(2, 3);
  m.rows << 1, 2, 3, 4, 5, 6;
  m.row_tensor.resize(2, 1, 3);
  m.row_tensor.setConstant(1.5f);
  m.row_tensor(1, 0, 2) = -2.0f;
  m.bounded = Eigen::MatrixXf::Constant(3, 2, 0.75f);
  m.mask.resize(3);
  m.mask << true, false, true;
  return m;
}

template <class Tree>
bool bitwise_equal(const Tree& a, const Tree& b) {
  bool equal = true;
  xax::for_each_leaf(
      [&](const auto& x, const auto& y) {
        const auto s = xax::leaf_span(x);
        const auto t = xax::leaf_span(y);
        equal = equal && s.size_bytes() == t.size_bytes() &&
                (s.size_bytes() == 0 || std::memcmp(s.data(), t.data(), s.size_bytes()) == 0);
      },
      a, b);
  return equal;
}

}  // namespace xax_fuzz
