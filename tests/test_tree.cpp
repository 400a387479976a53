#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <array>
#include <bit>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>
#include <xax/utils/tree.hpp>
#include <xax/utils/tree_cast.hpp>

namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

template <class T>
using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
template <class T>
using Vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;

template <class T>
struct Linear {
  Mat<T> w;
  Vec<T> b;
  XAX_FIELDS(w, b);
};

template <class T>
struct Encoder {
  std::vector<Linear<T>> layers;
  Eigen::Tensor<T, 3> conv;
  XAX_FIELDS(layers, conv);
};

template <class T>
struct Model {
  Encoder<T> encoder;
  std::map<std::string, Vec<T>> heads;
  std::tuple<T, Eigen::Array<T, 2, 2>> extras;
  std::int32_t version = 3;
  XAX_FIELDS(encoder, heads, extras, version);
};

// A type the user cannot edit, opted in from outside.
struct ThirdParty {
  Eigen::VectorXf weights;
  float bias = 0;
};

}  // namespace

template <>
struct xax::fields_of<ThirdParty> {
  static auto tie(ThirdParty& t) { return std::tie(t.weights, t.bias); }
  static auto tie(const ThirdParty& t) { return std::tie(t.weights, t.bias); }
  static constexpr std::array<std::string_view, 2> names{"weights", "bias"};
};

namespace {

Model<float> make_model() {
  Model<float> m;
  m.encoder.layers.resize(2);
  m.encoder.layers[0] = {Mat<float>::Random(3, 4), Vec<float>::Random(3)};
  m.encoder.layers[1] = {Mat<float>::Random(2, 3), Vec<float>::Random(2)};
  m.encoder.conv.resize(2, 3, 4);
  m.encoder.conv.setRandom();
  m.heads["classify"] = Vec<float>::Random(5);
  m.heads["regress"] = Vec<float>::Random(1);
  std::get<0>(m.extras) = 0.1f;
  std::get<1>(m.extras) << 1, 2, 3, 4;
  return m;
}

TEST(Tree, LeafPathsNameEveryLeafInWalkOrder) {
  EXPECT_THAT(xax::leaf_paths(make_model()),
              ElementsAre("encoder.layers[0].w", "encoder.layers[0].b", "encoder.layers[1].w",
                          "encoder.layers[1].b", "encoder.conv", "heads[\"classify\"]", "heads[\"regress\"]",
                          "extras[0]", "extras[1]", "version"));
}

TEST(Tree, CountsLeavesElementsAndBytes) {
  const Model<float> m = make_model();
  EXPECT_EQ(xax::leaf_count(m), 10u);
  const std::size_t floats = 12 + 3 + 6 + 2 + 24 + 5 + 1 + 1 + 4;
  EXPECT_EQ(xax::floating_element_count(m), floats);
  EXPECT_EQ(xax::payload_bytes(m), floats * sizeof(float) + sizeof(std::int32_t));
}

// A parameter after the scalar that defaults to a type over it: the cast takes the new scalar's default. It
// kept Linear<float> (Net<bfloat16, Linear<float>>), whose leaves the cast then silently left float.
template <class T>
struct DefaultedLinear {
  Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> w;
  XAX_FIELDS(w);
};
template <class T, class Layer = DefaultedLinear<T>>
struct NetWithADefaultedLayer {
  Eigen::Matrix<T, Eigen::Dynamic, 1> bias;
  Layer layer;
  XAX_FIELDS(bias, layer);
};
static_assert(std::is_same_v<xax::rebind_scalar_t<NetWithADefaultedLayer<float>, xax::bfloat16>,
                             NetWithADefaultedLayer<xax::bfloat16>>);
// Given explicitly, another type is kept, as a full-precision field is.
static_assert(std::is_same_v<
              xax::rebind_scalar_t<NetWithADefaultedLayer<float, DefaultedLinear<double>>, xax::bfloat16>,
              NetWithADefaultedLayer<xax::bfloat16, DefaultedLinear<double>>>);

TEST(Tree, CastOfAStructSpelledWithItsDefaultsCastsTheDefaultedFields) {
  const NetWithADefaultedLayer<float> net{Eigen::VectorXf::Constant(2, 1.0f / 3),
                                          {Eigen::MatrixXf::Constant(2, 2, 1.0f / 3)}};
  const auto cast = xax::tree_cast<xax::bfloat16>(net);
  EXPECT_EQ(cast.layer.w(1, 1), xax::bfloat16(1.0f / 3));
  EXPECT_EQ(cast.bias(0), xax::bfloat16(1.0f / 3));
}

// std::vector<bool> has no addressable elements: it passed the concept, then failed deep inside every walk.
static_assert(!xax::tree<std::vector<bool>>);
static_assert(xax::tree<std::vector<Eigen::Array<bool, Eigen::Dynamic, 1>>>);

TEST(Tree, RootLeafAndStdNodes) {
  EXPECT_THAT(xax::leaf_paths(Eigen::MatrixXf(2, 2)), ElementsAre("<root>"));
  const std::pair<float, std::array<Eigen::VectorXd, 2>> tree{1.0f, {Eigen::VectorXd(1), Eigen::VectorXd(2)}};
  EXPECT_THAT(xax::leaf_paths(tree), ElementsAre("[0]", "[1][0]", "[1][1]"));
  EXPECT_EQ(xax::floating_element_count(tree), 4u);
}

TEST(Tree, NonIntrusiveOptIn) {
  ThirdParty t{Eigen::VectorXf::Ones(3), 2.0f};
  EXPECT_THAT(xax::leaf_paths(t), ElementsAre("weights", "bias"));
  const auto copy = xax::tree_cast<float>(t);
  static_assert(std::is_same_v<std::remove_cvref_t<decltype(copy)>, ThirdParty>,
                "a non-template struct whose leaves keep their type casts to itself");
  EXPECT_EQ(copy.weights, t.weights);
  EXPECT_EQ(copy.bias, 2.0f);
}

TEST(Tree, MapsAndWritableMapsAreLeaves) {
  float storage[6] = {1, 2, 3, 4, 5, 6};
  Eigen::Map<Eigen::MatrixXf> map(storage, 2, 3);
  std::vector<Eigen::Map<Eigen::MatrixXf>> maps{map};
  xax::fill_floating(maps, 0.5);
  for (const float x : storage) EXPECT_EQ(x, 0.5f);
  const auto owned = xax::tree_cast<xax::bfloat16>(maps);
  static_assert(std::is_same_v<std::remove_cvref_t<decltype(owned)>, std::vector<Mat<xax::bfloat16>>>);
  EXPECT_EQ(owned[0].rows(), 2);
  EXPECT_EQ(static_cast<float>(owned[0](1, 2)), 0.5f);
}

TEST(Tree, MapsOfConstDataAreLeavesToReadAndCastFrom) {
  const float storage[6] = {1, 2, 3, 4, 5, 6};
  const std::vector<Eigen::Map<const Eigen::MatrixXf>> maps{Eigen::Map<const Eigen::MatrixXf>(storage, 2, 3)};
  EXPECT_EQ(xax::leaf_count(maps), 1u);
  EXPECT_EQ(xax::leaf_span(maps[0]).data(), storage);
  const auto owned = xax::tree_cast<xax::bfloat16>(maps);
  static_assert(std::is_same_v<std::remove_cvref_t<decltype(owned)>, std::vector<Mat<xax::bfloat16>>>);
  EXPECT_EQ(static_cast<float>(owned[0](1, 2)), 6.0f);
  std::vector<Eigen::MatrixXf> into(1);
  xax::tree_cast_into(maps, into);
  EXPECT_EQ(into[0], maps[0]);
  // Writing one is a compile error with its own message: tests/compile_fail/write_into_map_of_const_data.cpp.
}

TEST(Tree, ZipVisitsCorrespondingLeavesAcrossScalarTypes) {
  const Model<float> a = make_model();
  const Model<double> b = xax::tree_cast<double>(a);
  std::vector<std::string> paths;
  xax::for_each_leaf_with_path(
      [&]<class L, class R>(const xax::TreePath& path, const L& left, const R& right) {
        paths.emplace_back(path.str());
        const auto l = xax::leaf_span(left);
        const auto r = xax::leaf_span(right);
        ASSERT_EQ(l.size(), r.size());
        for (std::size_t i = 0; i < l.size(); ++i)
          EXPECT_EQ(static_cast<double>(l[i]), static_cast<double>(r[i]));
      },
      a, b);
  EXPECT_EQ(paths, xax::leaf_paths(a));
}

TEST(Tree, ZipMutatesThroughNonConstTrees) {
  Model<float> a = make_model();
  const Model<float> b = a;
  xax::for_each_leaf(
      []<class L, class R>(L& left, const R& right) {
        if constexpr (xax::floating_leaf<L>) {
          auto l = xax::leaf_span(left);
          auto r = xax::leaf_span(right);
          for (std::size_t i = 0; i < l.size(); ++i) l[i] = l[i] + r[i];
        }
      },
      a, b);
  EXPECT_EQ(a.encoder.layers[1].w, (2.0f * b.encoder.layers[1].w).eval());
  EXPECT_EQ(a.version, 3) << "integer leaves untouched by the callback";
}

TEST(Tree, ZipMismatchedLeafShapeNamesThePath) {
  Model<float> a = make_model();
  Model<float> b = make_model();
  b.encoder.layers[1].w.resize(3, 3);
  try {
    xax::for_each_leaf([](auto&, auto&) {}, a, b);
    FAIL();
  } catch (const xax::ShapeError& error) {
    EXPECT_THAT(error.what(), HasSubstr("'encoder.layers[1].w'"));
    EXPECT_THAT(error.what(), HasSubstr("2x3 vs 3x3"));
  }
}

TEST(Tree, ZipMismatchedStructureThrows) {
  Model<float> a = make_model();
  Model<float> b = make_model();
  b.encoder.layers.pop_back();
  EXPECT_THROW(xax::for_each_leaf([](auto&, auto&) {}, a, b), xax::ShapeError);
  b = make_model();
  b.heads.erase("regress");
  b.heads["zzz"] = Vec<float>::Random(1);
  try {
    xax::for_each_leaf([](auto&, auto&) {}, a, b);
    FAIL();
  } catch (const xax::ShapeError& error) {
    EXPECT_THAT(error.what(), HasSubstr("key 'regress' zipped with key 'zzz'"));
  }
  Eigen::Tensor<float, 3> t1(2, 3, 4), t2(2, 4, 3);
  EXPECT_THROW(xax::for_each_leaf([](auto&, auto&) {}, t1, t2), xax::ShapeError);
}

// An array's size was never compared with the node it is zipped with: a shorter node was read past its end
// (ASan: stack-buffer-overflow) and a longer one's extra leaves were ignored. Two arrays of different sizes,
// tuples and structs are compile errors (static_assert); an array zipped with a vector is checked at run
// time.
TEST(Tree, ZipChecksAnArraysSizeAgainstAVector) {
  std::array<Eigen::VectorXf, 3> three{Eigen::VectorXf::Ones(2), Eigen::VectorXf::Ones(2),
                                       Eigen::VectorXf::Ones(2)};
  std::vector<Eigen::VectorXf> two(2, Eigen::VectorXf::Ones(2));
  EXPECT_THAT(
      [&] { xax::for_each_leaf([](auto&, auto&) {}, three, two); },
      ::testing::ThrowsMessage<xax::ShapeError>(HasSubstr("an array of 3 elements zipped with a node of 2")));
  std::vector<Eigen::VectorXf> four(4, Eigen::VectorXf::Ones(2));
  EXPECT_THROW(xax::for_each_leaf([](auto&, auto&) {}, three, four), xax::ShapeError);
  // A cast resizes the destination's vectors, an array's as any other.
  const std::array<float, 2> source{1, 2};
  std::vector<double> shorter(1);
  xax::tree_cast_into(source, shorter);
  EXPECT_EQ(shorter, (std::vector<double>{1, 2}));
}

// A map with its own order keeps it when rebound, so the tree still zips with its own cast.
TEST(Tree, ACastMapKeepsItsComparator) {
  using Ordered = std::map<std::string, Eigen::VectorXf, std::greater<>>;
  static_assert(std::is_same_v<xax::rebind_scalar_t<Ordered, float>, Ordered>);
  Ordered params{{"a", Eigen::VectorXf::Ones(2)}, {"b", Eigen::VectorXf::Zero(3)}};
  const auto half = xax::tree_cast<xax::bfloat16>(params);
  std::vector<std::string> paths;
  xax::for_each_leaf_with_path(
      [&](const xax::TreePath& path, auto&, auto&) { paths.push_back(path.display()); }, params, half);
  EXPECT_EQ(paths, (std::vector<std::string>{"[\"b\"]", "[\"a\"]"}));
}

TEST(Tree, CastIntoReusesStorageAndAdaptsStructure) {
  const Model<float> src = make_model();
  Model<xax::bfloat16> dst;
  xax::tree_cast_into(src, dst);
  ASSERT_EQ(dst.encoder.layers.size(), 2u);
  const auto* storage = dst.encoder.layers[0].w.data();
  xax::tree_cast_into(src, dst);
  EXPECT_EQ(dst.encoder.layers[0].w.data(), storage) << "same shapes: no reallocation";
  EXPECT_EQ(dst.heads.size(), 2u);
  Model<float> smaller = src;
  smaller.heads.erase("regress");
  xax::tree_cast_into(smaller, dst);
  EXPECT_EQ(dst.heads.size(), 1u);
}

TEST(Tree, CastIntoAFixedMapOfAnotherShapeThrows) {
  float storage[4];
  Eigen::Map<Eigen::MatrixXf> dst(storage, 2, 2);
  const Eigen::MatrixXd src = Eigen::MatrixXd::Ones(3, 1);
  EXPECT_THROW(xax::tree_cast_into(src, dst), xax::ShapeError);
}

// A fixed-size plain leaf cannot be resized: a source of another shape is the ShapeError, never Eigen's
// resize assertion (which aborted the assert-enabled build before a7d5fc1). A fixed dimension that matches
// still lets the dynamic one follow the source.
TEST(Tree, CastIntoAFixedSizeMatrixOfAnotherShapeThrows) {
  Eigen::Matrix<float, 4, 1> fixed = Eigen::Matrix<float, 4, 1>::Zero();
  EXPECT_THROW(xax::tree_cast_into(Eigen::VectorXd::Ones(8).eval(), fixed), xax::ShapeError);
  EXPECT_TRUE(fixed.isZero()) << "nothing written";
  Eigen::Matrix<float, 2, Eigen::Dynamic> two_rows;
  EXPECT_THROW(xax::tree_cast_into(Eigen::MatrixXd::Ones(3, 2).eval(), two_rows), xax::ShapeError);
  xax::tree_cast_into(Eigen::MatrixXd::Constant(2, 5, 1.5).eval(), two_rows);
  EXPECT_EQ(two_rows.cols(), 5);
  EXPECT_TRUE(two_rows.isConstant(1.5f));
}

// A dynamic leaf with a compile-time maximum (inline storage) cannot grow past it: a larger source is the
// ShapeError, not Eigen's assertion, nor, without assertions, a write past the inline buffer. Up to the
// maximum it is resized as any dynamic leaf.
template <class Scalar>
void expect_cast_respects_compile_time_maximum() {
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, 0, 4, 4> bounded;
  EXPECT_THROW(xax::tree_cast_into(Eigen::MatrixXf::Ones(8, 8).eval(), bounded), xax::ShapeError);
  EXPECT_THROW(xax::tree_cast_into(Eigen::MatrixXf::Ones(2, 5).eval(), bounded), xax::ShapeError);
  EXPECT_EQ(bounded.size(), 0) << "nothing resized";
  xax::tree_cast_into(Eigen::MatrixXf::Constant(4, 3, 1.5f).eval(), bounded);
  EXPECT_EQ(bounded.rows(), 4);
  EXPECT_EQ(bounded.cols(), 3);
  EXPECT_TRUE(bounded.template cast<float>().isConstant(1.5f));
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1, 0, 3, 1> short_vector;
  EXPECT_THROW(xax::tree_cast_into(Eigen::VectorXf::Ones(4).eval(), short_vector), xax::ShapeError);
}

TEST(Tree, CastIntoALeafWithACompileTimeMaximumNeverGrowsPastIt) {
  expect_cast_respects_compile_time_maximum<float>();
  expect_cast_respects_compile_time_maximum<xax::bfloat16>();
  expect_cast_respects_compile_time_maximum<xax::float16>();
}

// A leaf of another layout holds the same elements in another order: element (i, j) must land on (i, j).
TEST(Tree, CastIntoAnotherLayoutKeepsEveryElementInPlace) {
  Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> row_major(2, 3);
  row_major << 1, 2, 3, 4, 5, 6;
  Eigen::Matrix<xax::bfloat16, Eigen::Dynamic, Eigen::Dynamic> col_major;
  xax::tree_cast_into(row_major, col_major);
  ASSERT_EQ(col_major.rows(), 2);
  ASSERT_EQ(col_major.cols(), 3);
  for (Eigen::Index i = 0; i < 2; ++i) {
    for (Eigen::Index j = 0; j < 3; ++j) EXPECT_EQ(static_cast<float>(col_major(i, j)), row_major(i, j));
  }

  Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> back;
  xax::tree_cast_into(col_major, back);
  EXPECT_EQ(back.cast<float>(), row_major);

  // Into a Map of the right shape, and inside a tree next to leaves of the same layout.
  float storage[6];
  Eigen::Map<Eigen::MatrixXf> map(storage, 2, 3);
  xax::tree_cast_into(row_major, map);
  EXPECT_THAT(storage, ElementsAre(1, 4, 2, 5, 3, 6));

  std::pair<Eigen::Matrix<float, 2, 2, Eigen::RowMajor>, Eigen::Matrix2f> mixed;
  mixed.first << 1, 2, 3, 4;
  mixed.second << 5, 6, 7, 8;
  std::pair<Eigen::Matrix<double, 2, 2>, Eigen::Matrix<double, 2, 2, Eigen::RowMajor>> converted;
  xax::tree_cast_into(mixed, converted);
  EXPECT_EQ(converted.first.cast<float>(), mixed.first);
  EXPECT_EQ(converted.second.cast<float>(), mixed.second);

  // Tensors: element (i, j, k) of a row-major tensor lands on (i, j, k) of a column-major one.
  Eigen::Tensor<float, 3, Eigen::RowMajor> row_tensor(2, 3, 4);
  for (Eigen::Index i = 0; i < row_tensor.size(); ++i) row_tensor.data()[i] = static_cast<float>(i);
  Eigen::Tensor<xax::float16, 3> col_tensor;
  xax::tree_cast_into(row_tensor, col_tensor);
  ASSERT_EQ(col_tensor.dimension(0), 2);
  ASSERT_EQ(col_tensor.dimension(2), 4);
  for (Eigen::Index i = 0; i < 2; ++i) {
    for (Eigen::Index j = 0; j < 3; ++j) {
      for (Eigen::Index k = 0; k < 4; ++k) {
        EXPECT_EQ(static_cast<float>(col_tensor(i, j, k)), row_tensor(i, j, k)) << i << "," << j << "," << k;
      }
    }
  }
}

// Zipped leaves are combined element by element in storage order (optimizers, copies): leaves of the same
// shape in another layout would be combined transposed, so the zip refuses them.
TEST(Tree, ZipRefusesLeavesOfAnotherLayout) {
  Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> row_major(2, 3);
  Eigen::MatrixXf col_major(2, 3);
  try {
    xax::for_each_leaf([](auto&, auto&) {}, row_major, col_major);
    FAIL() << "no exception";
  } catch (const xax::ShapeError& error) {
    EXPECT_THAT(error.what(), HasSubstr("2x3 row-major vs column-major"));
  }
  // Where at most one dimension exceeds 1 both layouts store the same order.
  Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> row_vector(1, 3);
  Eigen::MatrixXf col_vector(1, 3);
  EXPECT_NO_THROW(xax::for_each_leaf([](auto&, auto&) {}, row_vector, col_vector));
  EXPECT_NO_THROW(xax::for_each_leaf([](auto&, auto&) {}, col_major, col_major));
}

TEST(Tree, ZerosLikeKeepsShapesAndIntegers) {
  const Model<float> src = make_model();
  const Model<float> zeros = xax::zeros_like(src);
  EXPECT_EQ(zeros.version, 3);
  EXPECT_TRUE(zeros.encoder.layers[0].w.isZero(0));
  EXPECT_EQ(zeros.encoder.conv.dimension(2), 4);
  EXPECT_EQ(std::get<1>(zeros.extras).sum(), 0.0f);
}

// ------------------------------------------------------------------------------------------------------------
// Typed over precisions: casting round-trips and equals Eigen's round-to-nearest-even.

template <class T>
class TreeCast : public ::testing::Test {};
using HalfTypes = ::testing::Types<float, xax::bfloat16, xax::float16>;
TYPED_TEST_SUITE(TreeCast, HalfTypes);

TYPED_TEST(TreeCast, ClassTemplateStructRebindsItsScalar) {
  using Cast = decltype(xax::tree_cast<TypeParam>(make_model()));
  static_assert(std::is_same_v<Cast, Model<TypeParam>>);
  static_assert(std::is_same_v<decltype(std::declval<Cast>().extras),
                               std::tuple<TypeParam, Eigen::Array<TypeParam, 2, 2>>>);
  static_assert(std::is_same_v<decltype(std::declval<Cast>().version), std::int32_t>);
}

TYPED_TEST(TreeCast, EqualsEigenRoundToNearestEvenAndRoundTrips) {
  const Model<float> src = make_model();
  const Model<TypeParam> cast = xax::tree_cast<TypeParam>(src);
  const Model<float> back = xax::tree_cast<float>(cast);
  xax::for_each_leaf(
      []<class S, class C, class B>(const S& s, const C& c, const B& b) {
        if constexpr (xax::floating_leaf<S>) {
          const auto sv = xax::leaf_span(s);
          const auto cv = xax::leaf_span(c);
          const auto bv = xax::leaf_span(b);
          for (std::size_t i = 0; i < sv.size(); ++i) {
            const TypeParam eigen_rounded = static_cast<TypeParam>(sv[i]);
            using Bits = std::array<char, sizeof(TypeParam)>;
            EXPECT_EQ(std::bit_cast<Bits>(cv[i]), std::bit_cast<Bits>(eigen_rounded));
            EXPECT_EQ(bv[i], static_cast<float>(eigen_rounded));
          }
        }
      },
      src, cast, back);
  // A second trip through the half type changes nothing: the first rounding was final.
  const Model<float> again = xax::tree_cast<float>(xax::tree_cast<TypeParam>(back));
  EXPECT_EQ(again.encoder.layers[0].w, back.encoder.layers[0].w);
}

TYPED_TEST(TreeCast, TensorLeaves) {
  Eigen::TensorFixedSize<float, Eigen::Sizes<2, 3>> fixed;
  fixed.setConstant(1.0f / 3.0f);
  const auto cast = xax::tree_cast<TypeParam>(fixed);
  static_assert(std::is_same_v<std::remove_cvref_t<decltype(cast)>,
                               Eigen::TensorFixedSize<TypeParam, Eigen::Sizes<2, 3>>>);
  EXPECT_EQ(static_cast<float>(cast(1, 2)), static_cast<float>(TypeParam(1.0f / 3.0f)));
}

TEST(TreeCast, BfloatRoundingTiesToEven) {
  // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to the even mantissa (1).
  const std::vector<float> src{1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, std::numeric_limits<float>::infinity(),
                               -std::numeric_limits<float>::infinity()};
  std::vector<Eigen::Matrix<float, 1, 1>> tree;
  for (const float x : src) tree.push_back(Eigen::Matrix<float, 1, 1>::Constant(x));
  const auto cast = xax::tree_cast<xax::bfloat16>(tree);
  EXPECT_EQ(static_cast<float>(cast[0](0)), 1.0f);
  EXPECT_EQ(static_cast<float>(cast[1](0)), 1.0f + 0x1p-6f);
  EXPECT_EQ(static_cast<float>(cast[2](0)), std::numeric_limits<float>::infinity());
  EXPECT_EQ(static_cast<float>(cast[3](0)), -std::numeric_limits<float>::infinity());
}

}  // namespace
