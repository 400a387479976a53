// all_finite, the fused unscale_and_check (and unscale_check_and_norm_into, which casts too), select_tree and
// the non-finite diagnostics, over every tree kind and every floating leaf type, plus each fused SIMD kernel
// against the portable one.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <map>
#include <random>
#include <span>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>
#include <xax/utils/finite.hpp>
#include <xax/utils/threads.hpp>

namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using xax::bfloat16;
using xax::float16;

template <class T>
using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
template <class T>
using Vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;

template <class T>
struct Layer {
  Mat<T> w;
  Vec<T> b;
  XAX_FIELDS(w, b);
};

template <class T>
struct Net {
  std::vector<Layer<T>> layers;
  std::int64_t step = 0;  // an integer leaf: never scaled, always finite
  XAX_FIELDS(layers, step);
};

template <class T>
T value_of(double x) {
  return static_cast<T>(static_cast<float>(x));
}

template <class T>
auto raw_bits(T value) {
  if constexpr (sizeof(T) == 2) {
    return std::bit_cast<std::uint16_t>(value);
  } else if constexpr (sizeof(T) == 4) {
    return std::bit_cast<std::uint32_t>(value);
  } else {
    return std::bit_cast<std::uint64_t>(value);
  }
}

// Small exactly representable values in every precision: multiples of 1/4 up to a few hundred.
template <class Tree>
void fill_exact(Tree& tree) {
  int counter = 1;
  xax::for_each_leaf(
      [&counter]<class L>(L& leaf) {
        if constexpr (xax::floating_leaf<L>) {
          for (auto& x : xax::leaf_span(leaf)) {
            x = value_of<xax::leaf_scalar_t<L>>(0.25 * (counter % 997) * ((counter % 3 == 0) ? -1 : 1));
            ++counter;
          }
        }
      },
      tree);
}

template <class T>
Net<T> make_net(int layers = 3) {
  Net<T> net;
  for (int i = 0; i < layers; ++i) net.layers.push_back({Mat<T>(4, 3 + i), Vec<T>(4)});
  fill_exact(net);
  return net;
}

template <class T>
class FiniteTyped : public ::testing::Test {};
using LeafTypes = ::testing::Types<float, bfloat16, float16, double>;
TYPED_TEST_SUITE(FiniteTyped, LeafTypes);

template <class T>
std::vector<T> poisons() {
  return {static_cast<T>(std::numeric_limits<float>::infinity()),
          static_cast<T>(-std::numeric_limits<float>::infinity()),
          static_cast<T>(std::numeric_limits<float>::quiet_NaN())};
}

// Puts inf, -inf and NaN, one at a time, at the first, middle and last element of every floating leaf, and
// expects all_finite, unscale_and_check and non_finite_leaf_paths to find exactly that leaf.
template <class T, class Tree>
void expect_every_poison_is_found(Tree tree) {
  fill_exact(tree);
  std::vector<std::pair<std::string, std::span<T>>> leaves;
  xax::for_each_leaf_with_path(
      [&leaves]<class L>(const xax::TreePath& path, L& leaf) {
        if constexpr (xax::floating_leaf<L>) leaves.emplace_back(path.display(), xax::leaf_span(leaf));
      },
      tree);
  ASSERT_FALSE(leaves.empty());
  ASSERT_TRUE(xax::all_finite(tree));
  for (const auto& [path, elements] : leaves) {
    for (const std::size_t index : {std::size_t{0}, elements.size() / 2, elements.size() - 1}) {
      for (const T poison : poisons<T>()) {
        const T saved = elements[index];
        elements[index] = poison;
        EXPECT_FALSE(xax::all_finite(tree)) << path << "[" << index << "]";
        EXPECT_THAT(xax::non_finite_leaf_paths(tree), ElementsAre(path));
        Tree grads = tree;
        EXPECT_FALSE(xax::unscale_and_check(grads, 0.5f)) << path << "[" << index << "]";
        elements[index] = saved;
      }
    }
  }
  EXPECT_TRUE(xax::all_finite(tree));
  EXPECT_TRUE(xax::non_finite_leaf_paths(tree).empty());
}

TYPED_TEST(FiniteTyped, FindsInfMinusInfAndNanInAnyLeafOfAnyTreeKind) {
  using T = TypeParam;
  expect_every_poison_is_found<T>(Mat<T>(5, 7));
  expect_every_poison_is_found<T>(Eigen::Array<T, 3, 2>());
  Eigen::Tensor<T, 3> tensor(2, 3, 4);
  expect_every_poison_is_found<T>(tensor);
  expect_every_poison_is_found<T>(std::map<std::string, Vec<T>>{{"bias", Vec<T>(3)}, {"scale", Vec<T>(40)}});
  expect_every_poison_is_found<T>(std::vector<Mat<T>>{Mat<T>(2, 2), Mat<T>(33, 1), Mat<T>(1, 1)});
  expect_every_poison_is_found<T>(std::array<Vec<T>, 2>{Vec<T>(17), Vec<T>(2)});
  expect_every_poison_is_found<T>(std::tuple<T, Vec<T>, int>{T{}, Vec<T>(5), 3});
  expect_every_poison_is_found<T>(std::pair<Vec<T>, T>{Vec<T>(9), T{}});
  expect_every_poison_is_found<T>(make_net<T>());
  expect_every_poison_is_found<T>(T{});
}

TYPED_TEST(FiniteTyped, UnscaleMultipliesEveryElementInPlace) {
  using T = TypeParam;
  Net<T> grads = make_net<T>();
  grads.step = 41;
  const Net<T> before = grads;
  EXPECT_TRUE(xax::unscale_and_check(grads, 0.25f));
  for (std::size_t l = 0; l < grads.layers.size(); ++l) {
    for (Eigen::Index i = 0; i < grads.layers[l].w.size(); ++i) {
      EXPECT_EQ(static_cast<double>(grads.layers[l].w(i)), static_cast<double>(before.layers[l].w(i)) * 0.25);
    }
    for (Eigen::Index i = 0; i < grads.layers[l].b.size(); ++i) {
      EXPECT_EQ(static_cast<double>(grads.layers[l].b(i)), static_cast<double>(before.layers[l].b(i)) * 0.25);
    }
  }
  EXPECT_EQ(grads.step, 41);
}

TYPED_TEST(FiniteTyped, ProcessesEveryLeafEvenAfterAnOverflow) {
  using T = TypeParam;
  std::vector<Vec<T>> grads{Vec<T>::Constant(3, value_of<T>(8.0)), Vec<T>::Constant(3, value_of<T>(8.0))};
  grads[0](1) = static_cast<T>(std::numeric_limits<float>::infinity());
  EXPECT_FALSE(xax::unscale_and_check(grads, 0.5f));
  EXPECT_EQ(static_cast<double>(grads[0](0)), 4.0);
  EXPECT_EQ(static_cast<double>(grads[1](2)), 4.0);
}

// Scale < 1 means unscaling multiplies by more than 1: values finite before the unscale overflow during it.
// Checking the inputs (PyTorch #99640) would wrongly call these gradients finite.
TYPED_TEST(FiniteTyped, CatchesAnOverflowCausedByTheUnscaleItself) {
  using T = TypeParam;
  Vec<T> grads = Vec<T>::Constant(50, value_of<T>(1.0));
  grads(37) = Eigen::NumTraits<T>::highest();
  ASSERT_TRUE(xax::all_finite(grads));
  EXPECT_FALSE(xax::unscale_and_check(grads, 4.0f));  // loss scale 0.25
  EXPECT_EQ(raw_bits(grads(37)), raw_bits(static_cast<T>(std::numeric_limits<float>::infinity())));
  EXPECT_EQ(static_cast<double>(grads(0)), 4.0);
}

TYPED_TEST(FiniteTyped, MultiplyingByOneLeavesEveryBitUnchanged) {
  using T = TypeParam;
  Vec<T> grads(8);
  grads << value_of<T>(1.5), value_of<T>(-0.0), std::numeric_limits<T>::denorm_min(),
      -Eigen::NumTraits<T>::highest(), value_of<T>(3.0), value_of<T>(-2.25), value_of<T>(0.0),
      value_of<T>(7.0);
  const Vec<T> before = grads;
  EXPECT_TRUE(xax::unscale_and_check(grads, 1.0f));
  for (Eigen::Index i = 0; i < grads.size(); ++i) EXPECT_EQ(raw_bits(grads(i)), raw_bits(before(i))) << i;
  // A signalling NaN's payload survives too: the pass only reads.
  if constexpr (std::is_same_v<T, float>) {
    grads(2) = std::bit_cast<float>(0x7fa0'1234u);
    EXPECT_FALSE(xax::unscale_and_check(grads, 1.0f));
    EXPECT_EQ(std::bit_cast<std::uint32_t>(grads(2)), 0x7fa0'1234u);
  }
}

// Calls f(threads) with xax set to 1, 2 and 3 threads (those the build supports), then restores the count.
template <class F>
void on_every_thread_count(F&& f) {
  const int previous = xax::num_threads();
  for (const int threads : {1, 2, 3}) {
    try {
      xax::set_num_threads(threads);
    } catch (const xax::ConfigError&) {
      continue;  // a build without OpenMP runs on one thread only
    }
    f(threads);
  }
  xax::set_num_threads(previous);
}

// Leaves of the given sizes with values uniform in [-4, 4), rounded to T.
template <class T>
std::vector<Vec<T>> random_leaves(std::initializer_list<int> sizes, unsigned seed) {
  std::vector<Vec<T>> leaves;
  std::mt19937 rng(seed);
  for (const int size : sizes) {
    Vec<T> leaf(size);
    for (auto& x : xax::leaf_span(leaf)) x = value_of<T>(std::uniform_real_distribution<float>(-4, 4)(rng));
    leaves.push_back(leaf);
  }
  return leaves;
}

TYPED_TEST(FiniteTyped, LargeMixedTreesGiveTheSameAnswerOnEveryThreadCount) {
  using T = TypeParam;
  const std::vector<Vec<T>> base = random_leaves<T>({1, 300'000, 17, 250'001, 64, 120'000}, 5);
  std::vector<std::vector<Vec<T>>> results;
  on_every_thread_count([&](int threads) {
    std::vector<Vec<T>> grads = base;
    EXPECT_TRUE(xax::unscale_and_check(grads, 0.125f));
    results.push_back(grads);
    // An overflow anywhere, including right at a thread's boundary, is reported.
    for (const std::size_t leaf : {std::size_t{0}, std::size_t{1}, std::size_t{3}, std::size_t{5}}) {
      for (const Eigen::Index at : {Eigen::Index{0}, base[leaf].size() / 2, base[leaf].size() - 1}) {
        std::vector<Vec<T>> poisoned = base;
        poisoned[leaf](at) = static_cast<T>(std::numeric_limits<float>::quiet_NaN());
        EXPECT_FALSE(xax::all_finite(poisoned)) << threads << " threads, leaf " << leaf << " at " << at;
        EXPECT_FALSE(xax::unscale_and_check(poisoned, 0.125f))
            << threads << " threads, leaf " << leaf << " at " << at;
      }
    }
  });
  for (std::size_t r = 1; r < results.size(); ++r) {
    for (std::size_t leaf = 0; leaf < base.size(); ++leaf) {
      for (Eigen::Index i = 0; i < base[leaf].size(); ++i) {
        ASSERT_EQ(raw_bits(results[r][leaf](i)), raw_bits(results[0][leaf](i)));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// unscale_check_and_norm: the unscale and check of unscale_and_check, plus the global L2 norm of the results.

TYPED_TEST(FiniteTyped, NormIsTheL2NormOfTheUnscaledGradientsOnEveryThreadCount) {
  using T = TypeParam;
  const std::vector<Vec<T>> base = random_leaves<T>({3, 200'001, 1024, 150'000}, 11);
  // The reference: the same unscale, then the norm in double.
  std::vector<Vec<T>> expected_grads = base;
  ASSERT_TRUE(xax::unscale_and_check(expected_grads, 0.25f));
  double sum = 0;
  for (const auto& leaf : expected_grads) {
    for (const T x : xax::leaf_span(leaf)) sum += static_cast<double>(x) * static_cast<double>(x);
  }
  const double expected_norm = std::sqrt(sum);

  std::vector<double> norms;
  on_every_thread_count([&](int threads) {
    std::vector<Vec<T>> grads = base;
    const xax::UnscaledGradients result = xax::unscale_check_and_norm(grads, 0.25f);
    EXPECT_TRUE(result.finite);
    for (std::size_t leaf = 0; leaf < base.size(); ++leaf) {
      EXPECT_TRUE(grads[leaf] == expected_grads[leaf]) << "the unscale is unscale_and_check's, leaf " << leaf;
    }
    // Block sums in float: within a few float roundings of the exact norm.
    EXPECT_NEAR(result.norm, expected_norm, 1e-6 * expected_norm) << threads << " threads";
    norms.push_back(result.norm);
  });
  for (const double norm : norms) EXPECT_EQ(norm, norms.front()) << "the norm does not depend on threads";
}

TYPED_TEST(FiniteTyped, NormOfNonFiniteGradientsIsInfinite) {
  using T = TypeParam;
  for (const T poison : poisons<T>()) {
    Net<T> grads = make_net<T>();
    grads.layers[1].w(2, 1) = poison;
    const xax::UnscaledGradients result = xax::unscale_check_and_norm(grads, 0.5f);
    EXPECT_FALSE(result.finite);
    EXPECT_EQ(result.norm, std::numeric_limits<double>::infinity());
  }
}

TEST(UnscaleCheckAndNorm, HugeFiniteValuesGiveAFiniteNorm) {
  // Every square (1e30^2) overflows float; the norm, 1e30 sqrt(3000), does not.
  Vec<float> grads = Vec<float>::Constant(3000, 1e30f);
  const xax::UnscaledGradients result = xax::unscale_check_and_norm(grads, 1.0f);
  EXPECT_TRUE(result.finite);
  EXPECT_NEAR(result.norm, 1e30 * std::sqrt(3000.0), 1e-6 * 1e30 * std::sqrt(3000.0));
}

TEST(UnscaleCheckAndNorm, TinyFiniteValuesGiveTheirNormNotZero) {
  // Every square (1e-25^2) underflows to 0 in float; in double it does not.
  Vec<float> grads = Vec<float>::Constant(3000, 1e-25f);
  const xax::UnscaledGradients result = xax::unscale_check_and_norm(grads, 1.0f);
  EXPECT_TRUE(result.finite);
  const double expected = static_cast<double>(1e-25f) * std::sqrt(3000.0);
  EXPECT_NEAR(result.norm, expected, 1e-9 * expected);
}

TEST(UnscaleCheckAndNorm, ExactValuesGiveTheExactNormAndIntegerLeavesAreIgnored) {
  Net<float> grads;
  grads.layers.push_back({Mat<float>::Constant(3, 4, 2.0f), Vec<float>::Constant(4, 4.0f)});
  grads.step = 1'000'000;
  // Unscaled by 1/2: twelve 1s and four 2s, a sum of squares of 28.
  const xax::UnscaledGradients result = xax::unscale_check_and_norm(grads, 0.5f);
  EXPECT_TRUE(result.finite);
  EXPECT_EQ(result.norm, std::sqrt(28.0));
  EXPECT_THROW(static_cast<void>(xax::unscale_check_and_norm(grads, 0.0f)), xax::ConfigError);
}

// ---------------------------------------------------------------------------------------------------------------
// unscale_check_and_norm_into: tree_cast_into and then unscale_check_and_norm, the same bits in one pass.

// The two passes the fused one stands for.
template <class Src, class Dst>
xax::UnscaledGradients cast_then_unscale(const Src& src, Dst& dst, float inverse_scale) {
  xax::tree_cast_into(src, dst);
  return xax::unscale_check_and_norm(dst, inverse_scale);
}

template <class Src, class Dst>
void expect_same_bits(const Src& expected, const Dst& got) {
  xax::for_each_leaf_with_path(
      []<class L>(const xax::TreePath& path, const L& want, const L& have) {
        if constexpr (xax::floating_leaf<L>) {
          const auto w = xax::leaf_span(want);
          const auto h = xax::leaf_span(have);
          ASSERT_EQ(w.size(), h.size()) << path.display();
          for (std::size_t i = 0; i < w.size(); ++i) {
            ASSERT_EQ(raw_bits(w[i]), raw_bits(h[i])) << path.display() << "[" << i << "]";
          }
        } else {
          EXPECT_EQ(want, have) << path.display();
        }
      },
      expected, got);
}

TYPED_TEST(FiniteTyped, UnscaleIntoGivesTheBitsOfTheCastThenTheUnscaleOnEveryThreadCount) {
  using T = TypeParam;
  // Leaves shorter than a block, of whole blocks, and long enough to be shared by threads.
  const std::vector<Vec<T>> compute_grads = random_leaves<T>({3, 200'001, 1024, 150'000, 1}, 23);
  for (const float inverse_scale : {1.0f, 0.25f, 0x1p-15f, 3.0f}) {
    std::vector<Vec<float>> expected;
    const xax::UnscaledGradients want = cast_then_unscale(compute_grads, expected, inverse_scale);
    ASSERT_TRUE(want.finite);
    on_every_thread_count([&](int threads) {
      // Already shaped, as a train step's gradients are, and not: then it is resized as tree_cast_into does.
      for (const bool shaped : {true, false}) {
        std::vector<Vec<float>> grads;
        if (shaped) {
          grads = xax::tree_cast<float>(compute_grads);
          xax::fill_floating(grads, 7.0);  // what the last step left: must all be overwritten
        }
        const xax::UnscaledGradients got =
            xax::unscale_check_and_norm_into(compute_grads, grads, inverse_scale);
        EXPECT_TRUE(got.finite);
        EXPECT_EQ(got.norm, want.norm) << threads << " threads, 1/scale " << inverse_scale;
        expect_same_bits(expected, grads);
      }
    });
  }
}

TYPED_TEST(FiniteTyped, UnscaleIntoFindsEveryPoisonAndAnOverflowOfTheUnscale) {
  using T = TypeParam;
  for (const T poison : poisons<T>()) {
    Net<T> compute_grads = make_net<T>();
    compute_grads.layers[1].w(2, 1) = poison;
    Net<float> grads;
    const xax::UnscaledGradients got = xax::unscale_check_and_norm_into(compute_grads, grads, 0.5f);
    EXPECT_FALSE(got.finite);
    EXPECT_EQ(got.norm, std::numeric_limits<double>::infinity());
    Net<float> expected;
    static_cast<void>(cast_then_unscale(compute_grads, expected, 0.5f));
    expect_same_bits(expected, grads);
    EXPECT_EQ(xax::describe_non_finite(grads), "1 of 6 tensors non-finite: layers[1].w");
  }
  // Finite in every T, but not once multiplied by 2^114 in float.
  Vec<T> compute_grads = Vec<T>::Constant(5000, value_of<T>(0x1p15));
  Vec<float> grads;
  EXPECT_FALSE(xax::unscale_check_and_norm_into(compute_grads, grads, 0x1p114f).finite);
  EXPECT_TRUE(xax::unscale_check_and_norm_into(compute_grads, grads, 0x1p100f).finite);
}

TEST(UnscaleCheckAndNormInto, LeavesCastBetweenLayoutsAndScalarLeavesGiveTheSameBits) {
  // A row-major leaf is reordered into a column-major one, and a scalar leaf is cast alone: neither can be
  // cut into blocks of a flat cast, and both must still be unscaled, checked and counted in the norm.
  using RowMajor = Eigen::Matrix<bfloat16, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  std::tuple<RowMajor, bfloat16, Vec<bfloat16>> compute_grads{RowMajor(3, 5), bfloat16(6.0f),
                                                              Vec<bfloat16>(70)};
  fill_exact(compute_grads);
  std::tuple<Mat<float>, float, Vec<float>> grads, expected;
  const xax::UnscaledGradients want = cast_then_unscale(compute_grads, expected, 0.5f);
  const xax::UnscaledGradients got = xax::unscale_check_and_norm_into(compute_grads, grads, 0.5f);
  EXPECT_EQ(got.norm, want.norm);
  expect_same_bits(expected, grads);
  EXPECT_EQ(std::get<0>(grads)(2, 1), 0.5f * static_cast<float>(std::get<0>(compute_grads)(2, 1)));
  EXPECT_EQ(std::get<1>(grads), 0.5f * static_cast<float>(std::get<1>(compute_grads)));
}

TEST(UnscaleCheckAndNormInto, RefusesWhatTheCastOrTheUnscaleRefuses) {
  const Vec<bfloat16> compute_grads = Vec<bfloat16>::Constant(8, bfloat16(1.0f));
  Vec<float> grads;
  for (const float bad : {0.0f, -1.0f, std::numeric_limits<float>::infinity()}) {
    try {
      static_cast<void>(xax::unscale_check_and_norm_into(compute_grads, grads, bad));
      ADD_FAILURE() << "1/scale " << bad << " was taken";
    } catch (const xax::ConfigError& e) {
      EXPECT_THAT(e.what(), HasSubstr("unscale_check_and_norm_into"));
    }
  }
  // A fixed-size leaf cannot take eight elements.
  Eigen::Matrix<float, 4, 1> fixed;
  EXPECT_THROW(static_cast<void>(xax::unscale_check_and_norm_into(compute_grads, fixed, 1.0f)),
               xax::ShapeError);
}

// ---------------------------------------------------------------------------------------------------------------
// Rounding of 16-bit leaves: computed in float, rounded once, and the rounded value is what is checked.

TEST(UnscaleAndCheck, HalfLeavesAreComputedInFloatAndRoundedOnce) {
  std::mt19937 rng(9);
  Vec<bfloat16> bf(1000);
  Vec<float16> f16(1000);
  for (Eigen::Index i = 0; i < 1000; ++i) {
    const float x = std::normal_distribution<float>(0, 10)(rng);
    bf(i) = bfloat16(x);
    f16(i) = float16(x);
  }
  const float factor = 1.0f / 3.0f;
  const Vec<bfloat16> bf_before = bf;
  const Vec<float16> f16_before = f16;
  ASSERT_TRUE(xax::unscale_and_check(bf, factor));
  ASSERT_TRUE(xax::unscale_and_check(f16, factor));
  for (Eigen::Index i = 0; i < 1000; ++i) {
    EXPECT_EQ(raw_bits(bf(i)), raw_bits(bfloat16(static_cast<float>(bf_before(i)) * factor)));
    EXPECT_EQ(raw_bits(f16(i)), raw_bits(float16(static_cast<float>(f16_before(i)) * factor)));
  }
}

TEST(UnscaleAndCheck, AFloat16ProductThatRoundsToInfinityIsNotFinite) {
  // 65504 * (1 + 2^-11) = 65535.98 is a finite float, but rounds to inf in f16 (everything from 65520 does).
  Vec<float16> grads = Vec<float16>::Constant(3, float16(65504.0f));
  EXPECT_FALSE(xax::unscale_and_check(grads, 1.0f + 0x1p-11f));
  EXPECT_EQ(raw_bits(grads(0)), 0x7c00);
  // Just below the rounding point it stays finite: 65504 * (1 + 2^-13) = 65512 rounds back to 65504.
  Vec<float16> below = Vec<float16>::Constant(3, float16(65504.0f));
  EXPECT_TRUE(xax::unscale_and_check(below, 1.0f + 0x1p-13f));
  EXPECT_EQ(static_cast<float>(below(1)), 65504.0f);
}

TEST(UnscaleAndCheck, RejectsAnInverseScaleThatIsNotFiniteAndPositive) {
  for (const float bad :
       {0.0f, -0.5f, std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()}) {
    Vec<float> grads = Vec<float>::Ones(3);
    try {
      static_cast<void>(xax::unscale_and_check(grads, bad));
      FAIL() << "expected ConfigError for " << bad;
    } catch (const xax::ConfigError& error) {
      EXPECT_THAT(error.what(), HasSubstr("inverse loss scale must be finite and > 0"));
    }
    EXPECT_EQ(grads(0), 1.0f) << "nothing is written before the check";
  }
}

TEST(UnscaleAndCheck, IntegerOnlyAndEmptyTreesAreFinite) {
  std::tuple<int, Eigen::VectorXi> integers{3, Eigen::VectorXi::Ones(4)};
  EXPECT_TRUE(xax::unscale_and_check(integers, 0.5f));
  EXPECT_EQ(std::get<1>(integers)(0), 1);
  std::vector<Eigen::MatrixXf> empty;
  EXPECT_TRUE(xax::unscale_and_check(empty, 0.5f));
  std::vector<Eigen::MatrixXf> zero_sized{Eigen::MatrixXf(0, 3)};
  EXPECT_TRUE(xax::all_finite(zero_sized));
}

// ---------------------------------------------------------------------------------------------------------------
// The fused kernels

constexpr std::uint32_t float_non_finite = 0x7f80'0000u;

// Each kernel is its own test, named after it, so that a kernel this CPU cannot run is reported as skipped,
// with the reason, instead of being left out of a test that passes. The fused (scale and check) and the
// read-only kernel lists have the same names and CPU requirements.
std::vector<std::string> magnitude_kernel_names() {
  std::vector<std::string> names;
  for (const auto& kernel : xax::detail::scale_magnitude_kernels()) names.emplace_back(kernel.name);
  return names;
}

template <class Function>
const xax::detail::Kernel<Function>& kernel_named(std::span<const xax::detail::Kernel<Function>> kernels,
                                                  const std::string& name) {
  for (const auto& kernel : kernels) {
    if (kernel.name == name) return kernel;
  }
  throw std::logic_error("no kernel named " + name);
}

class MagnitudeKernel : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (!fused().supported(xax::cpu_features()) || !check().supported(xax::cpu_features())) {
      GTEST_SKIP() << "kernel " << GetParam() << " is not supported by this CPU ("
                   << xax::cpu_features().str() << ")";
    }
  }
  const xax::detail::Kernel<xax::detail::ScaleMagnitudeFunction>& fused() const {
    return kernel_named(xax::detail::scale_magnitude_kernels(), GetParam());
  }
  const xax::detail::Kernel<xax::detail::MagnitudeFunction>& check() const {
    return kernel_named(xax::detail::magnitude_kernels(), GetParam());
  }
};

INSTANTIATE_TEST_SUITE_P(Kernels, MagnitudeKernel, ::testing::ValuesIn(magnitude_kernel_names()),
                         [](const ::testing::TestParamInfo<std::string>& kernel) { return kernel.param; });

TEST_P(MagnitudeKernel, ScalingMatchesThePortableKernelOnEveryTailAndAlignment) {
  std::mt19937 rng(13);
  std::vector<float> input(200);
  for (std::size_t i = 0; i < input.size(); ++i) {
    // Mostly ordinary values, every seventh near the top of float so that x3 overflows some of them.
    const float unit = std::uniform_real_distribution<float>(-1, 1)(rng);
    input[i] = i % 7 == 0 ? unit * 2e38f : unit * 100.0f;
  }
  const float factor = 3.0f;
  const auto& kernel = fused();
  for (std::size_t offset = 0; offset < 17; ++offset) {
    for (std::size_t n = 0; n <= 70; ++n) {
      std::vector<float> actual(input.begin(), input.begin() + static_cast<std::ptrdiff_t>(offset + n + 20));
      std::vector<float> expected = actual;
      const std::uint32_t got = kernel.run(actual.data() + offset, n, factor);
      const std::uint32_t want = xax::detail::scale_magnitude_portable(expected.data() + offset, n, factor);
      ASSERT_EQ(got, want) << kernel.name << " n " << n << " offset " << offset;
      for (std::size_t i = 0; i < actual.size(); ++i) {
        ASSERT_EQ(std::bit_cast<std::uint32_t>(actual[i]), std::bit_cast<std::uint32_t>(expected[i]))
            << kernel.name << " n " << n << " offset " << offset << " index " << i;
      }
    }
  }
}

TEST_P(MagnitudeKernel, ScalingFindsANonFiniteValueAtEveryPosition) {
  const auto& fused = this->fused();
  const float poisons[] = {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                           std::numeric_limits<float>::quiet_NaN(), std::bit_cast<float>(0xffa0'0001u)};
  for (std::size_t n = 1; n <= 70; ++n) {
    for (std::size_t at = 0; at < n; ++at) {
      for (const float poison : poisons) {
        std::vector<float> values(n + 3, 1.0f);
        values[1 + at] = poison;
        ASSERT_GE(fused.run(values.data() + 1, n, 0.5f), float_non_finite)
            << fused.name << " n " << n << " at " << at;
        ASSERT_EQ(values[0], 1.0f);
        ASSERT_EQ(values[n + 1], 1.0f) << "wrote past the end";
      }
      // The largest finite float passes; times 2 it does not.
      std::vector<float> edge(n, 1.0f);
      edge[at] = std::numeric_limits<float>::max();
      ASSERT_EQ(fused.run(edge.data(), n, 1.0f), 0x7f7f'ffffu) << fused.name;
      ASSERT_GE(fused.run(edge.data(), n, 2.0f), float_non_finite) << fused.name;
    }
  }
}

TEST_P(MagnitudeKernel, ReadOnlyCheckFindsANonFiniteValueAtEveryPosition) {
  const auto& check = this->check();
  for (std::size_t n = 1; n <= 70; ++n) {
    for (std::size_t at = 0; at < n; ++at) {
      std::vector<float> values(n, -2.0f);
      ASSERT_EQ(check.run(values.data(), n), 0x4000'0000u) << check.name;
      values[at] = std::numeric_limits<float>::infinity();
      ASSERT_EQ(check.run(values.data(), n), float_non_finite) << check.name << " n " << n << " at " << at;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// select_tree and the diagnostics

TEST(SelectTree, ReturnsTheChosenTreeAndRejectsMismatchedStructures) {
  Net<float> a = make_net<float>();
  Net<float> b = a;
  b.layers[1].w.setConstant(9.0f);
  EXPECT_EQ(xax::select_tree(true, a, b).layers[1].w, a.layers[1].w);
  EXPECT_EQ(xax::select_tree(false, a, b).layers[1].w, b.layers[1].w);
  b.layers[2].b.resize(7);
  try {
    static_cast<void>(xax::select_tree(true, a, b));
    FAIL() << "expected ShapeError";
  } catch (const xax::ShapeError& error) {
    EXPECT_THAT(error.what(), HasSubstr("layers[2].b"));
  }
  b.layers.pop_back();
  EXPECT_THROW(static_cast<void>(xax::select_tree(false, a, b)), xax::ShapeError);
}

TEST(DescribeNonFinite, NamesTheNonFiniteLeavesByPath) {
  Net<float> grads = make_net<float>();
  EXPECT_EQ(xax::describe_non_finite(grads), "all 6 tensors finite");
  grads.layers[1].w(2, 1) = std::numeric_limits<float>::infinity();
  grads.layers[1].b(0) = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THAT(xax::non_finite_leaf_paths(grads), ElementsAre("layers[1].w", "layers[1].b"));
  EXPECT_EQ(xax::describe_non_finite(grads), "2 of 6 tensors non-finite: layers[1].w, layers[1].b");
  grads.layers[2].b(3) = -std::numeric_limits<float>::infinity();
  EXPECT_EQ(xax::describe_non_finite(grads, 2),
            "3 of 6 tensors non-finite: layers[1].w, layers[1].b, and 1 more");
}

TEST(DescribeNonFinite, MapKeysAndTensorsAppearInPaths) {
  std::map<std::string, std::tuple<Eigen::Tensor<bfloat16, 2>, float>> grads;
  grads["decoder"] = {Eigen::Tensor<bfloat16, 2>(2, 2), 1.0f};
  grads["encoder"] = {Eigen::Tensor<bfloat16, 2>(3, 1), 1.0f};
  fill_exact(grads);
  std::get<0>(grads["encoder"])(2, 0) = bfloat16(std::numeric_limits<float>::infinity());
  std::get<1>(grads["decoder"]) = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(xax::describe_non_finite(grads), "2 of 4 tensors non-finite: [\"decoder\"][1], [\"encoder\"][0]");
}

}  // namespace
