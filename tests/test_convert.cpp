// Conversions between float and the 16-bit types: the bit-level reference against Eigen, and every SIMD
// kernel this CPU can run against the reference, bit for bit.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
#include <xax/ops/convert.hpp>
#include <xax/utils/threads.hpp>
#include <xax/utils/tree.hpp>
#include <xax/utils/tree_cast.hpp>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

namespace {

using ::testing::HasSubstr;
using xax::bfloat16;
using xax::float16;

std::uint16_t bits_of(bfloat16 value) {
  return std::bit_cast<std::uint16_t>(value);
}
std::uint16_t bits_of(float16 value) {
  return std::bit_cast<std::uint16_t>(value);
}
std::uint32_t bits_of(float value) {
  return std::bit_cast<std::uint32_t>(value);
}
float float_from_bits(std::uint32_t bits) {
  return std::bit_cast<float>(bits);
}
template <class Half>
Half half_from_bits(std::uint16_t bits) {
  return std::bit_cast<Half>(bits);
}

bool is_nan_bits(std::uint32_t bits) {
  return (bits & 0x7fff'ffffu) > 0x7f80'0000u;
}

// Every bf16 or f16 bit pattern.
template <class Half>
std::vector<Half> every_half() {
  std::vector<Half> values(65536);
  for (std::uint32_t bits = 0; bits < 65536; ++bits)
    values[bits] = half_from_bits<Half>(static_cast<std::uint16_t>(bits));
  return values;
}

// Floats that exercise every rounding decision of both 16-bit formats: each of the 65536 upper halves (all
// signs, exponents and the bf16-kept mantissa bits) with lower halves on and around the rounding points of
// bf16 (bit 15) and of f16 normals (bit 12) and subnormals (bits 13-15 for the largest subnormals; bits 16-23
// are covered by the upper halves), plus random floats.
std::vector<float> rounding_floats() {
  static constexpr std::uint32_t lows[] = {0x0000, 0x0001, 0x0fff, 0x1000, 0x1001, 0x1fff, 0x2000,
                                           0x2001, 0x2fff, 0x3000, 0x3001, 0x3fff, 0x4000, 0x4001,
                                           0x6000, 0x7fff, 0x8000, 0x8001, 0xc000, 0xffff};
  std::vector<float> values;
  values.reserve(65536 * std::size(lows) + 200'000);
  for (std::uint32_t high = 0; high < 65536; ++high) {
    for (const std::uint32_t low : lows) values.push_back(float_from_bits((high << 16) | low));
  }
  std::mt19937 rng(20261128);
  for (int i = 0; i < 200'000; ++i) values.push_back(float_from_bits(static_cast<std::uint32_t>(rng())));
  return values;
}

// Values at the edges the kernels treat specially, for the tail-length tests.
std::vector<float> special_floats() {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> values = {0.0f,
                               -0.0f,
                               1.0f,
                               -1.5f,
                               inf,
                               -inf,
                               std::numeric_limits<float>::quiet_NaN(),
                               -std::numeric_limits<float>::quiet_NaN(),
                               std::numeric_limits<float>::signaling_NaN(),
                               float_from_bits(0x7f80'0001u),
                               float_from_bits(0xffff'ffffu),
                               float_from_bits(0x7fa0'1234u),
                               std::numeric_limits<float>::denorm_min(),
                               -std::numeric_limits<float>::denorm_min(),
                               float_from_bits(0x0001'8000u),
                               float_from_bits(0x007f'ffffu),
                               std::numeric_limits<float>::min(),
                               std::numeric_limits<float>::max(),
                               -std::numeric_limits<float>::max(),
                               65504.0f,
                               65519.996f,
                               65520.0f,
                               -65520.0f,
                               65536.0f,
                               0x1p-14f,
                               0x1p-24f,
                               0x1p-25f,
                               0x1.000002p-25f,
                               0x1.8p-24f,
                               1.0f + 0x1p-8f,
                               1.0f + 0x1p-11f,
                               1.0f + 3 * 0x1p-11f,
                               3.14159265f};
  return values;
}

// The bit patterns of `values`, widened so that every element type compares (and prints) the same way.
template <class T>
std::vector<std::uint64_t> raw_bits(std::span<const T> values) {
  std::vector<std::uint64_t> out;
  out.reserve(values.size());
  for (const T value : values) out.push_back(bits_of(value));
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// The reference against Eigen

TEST(ConvertReference, FloatToBfloat16MatchesEigenBitForBitIncludingNan) {
  for (const float value : rounding_floats()) {
    ASSERT_EQ(xax::detail::float_to_bfloat16_bits(value), bits_of(bfloat16(value)))
        << std::hex << bits_of(value);
  }
}

TEST(ConvertReference, Bfloat16ToFloatMatchesEigenOnEveryPattern) {
  for (const bfloat16 value : every_half<bfloat16>()) {
    ASSERT_EQ(bits_of(xax::detail::bfloat16_bits_to_float(bits_of(value))),
              bits_of(static_cast<float>(value)))
        << std::hex << bits_of(value);
  }
}

TEST(ConvertReference, FloatToHalfMatchesEigenRounding) {
  for (const float value : rounding_floats()) {
    const std::uint16_t expected =
        is_nan_bits(bits_of(value)) ? static_cast<std::uint16_t>(((bits_of(value) >> 16) & 0x8000u) | 0x7e00u)
                                    : bits_of(float16(value));
    ASSERT_EQ(xax::detail::float_to_half_bits(value), expected) << std::hex << bits_of(value);
  }
}

TEST(ConvertReference, HalfToFloatMatchesEigenOnEveryPattern) {
  for (const float16 value : every_half<float16>()) {
    const std::uint16_t bits = bits_of(value);
    const bool nan = (bits & 0x7fffu) > 0x7c00u;
    // NaN keeps its payload and its signalling bit, exactly shifted into place.
    const std::uint32_t expected =
        nan ? (std::uint32_t{bits & 0x8000u} << 16) | 0x7f80'0000u | (std::uint32_t{bits & 0x03ffu} << 13)
            : bits_of(static_cast<float>(value));
    ASSERT_EQ(bits_of(xax::detail::half_bits_to_float(bits)), expected) << std::hex << bits;
  }
}

#if !defined(EIGEN_HAS_FP16_C)
// Without F16C, Eigen's own f16 path is the portable one, and its NaN rule is the reference's.
TEST(ConvertReference, HalfNanRuleIsEigensPortableRule) {
  for (const std::uint32_t bits : {0x7f80'0001u, 0x7fc0'0000u, 0x7fff'ffffu, 0xff80'0001u, 0xffc0'0000u}) {
    EXPECT_EQ(xax::detail::float_to_half_bits(float_from_bits(bits)),
              bits_of(float16(float_from_bits(bits))));
  }
  for (const std::uint16_t bits :
       std::initializer_list<std::uint16_t>{0x7c01, 0x7d00, 0x7e00, 0x7fff, 0xfc01, 0xfe00}) {
    EXPECT_EQ(bits_of(xax::detail::half_bits_to_float(bits)),
              bits_of(static_cast<float>(half_from_bits<float16>(bits))));
  }
}
#endif

TEST(ConvertReference, ExactValuesAtTheEdges) {
  using xax::detail::float_to_bfloat16_bits;
  using xax::detail::float_to_half_bits;
  // bf16: ties to even, NaN canonical with sign, subnormals rounded (not flushed).
  EXPECT_EQ(float_to_bfloat16_bits(1.0f + 0x1p-8f), 0x3f80);                 // tie, even stays
  EXPECT_EQ(float_to_bfloat16_bits(1.0f + 3 * 0x1p-8f), 0x3f82);             // tie, odd rounds up
  EXPECT_EQ(float_to_bfloat16_bits(float_from_bits(0x7f7f'ffffu)), 0x7f80);  // FLT_MAX rounds to inf
  EXPECT_EQ(float_to_bfloat16_bits(float_from_bits(0x7fa0'1234u)), 0x7fc0);  // signalling NaN -> quiet
  EXPECT_EQ(float_to_bfloat16_bits(float_from_bits(0xffff'ffffu)), 0xffc0);
  EXPECT_EQ(float_to_bfloat16_bits(float_from_bits(0x0001'8000u)), 0x0002);  // subnormal tie, odd rounds up
  EXPECT_EQ(float_to_bfloat16_bits(float_from_bits(0x0000'8000u)), 0x0000);  // subnormal tie, even stays
  EXPECT_EQ(float_to_bfloat16_bits(float_from_bits(0x8000'8001u)), 0x8001);
  // f16: overflow at 65520, subnormals down to 2^-24, 2^-25 ties to zero.
  EXPECT_EQ(float_to_half_bits(65504.0f), 0x7bff);
  EXPECT_EQ(float_to_half_bits(65519.996f), 0x7bff);
  EXPECT_EQ(float_to_half_bits(65520.0f), 0x7c00);
  EXPECT_EQ(float_to_half_bits(-65520.0f), 0xfc00);
  EXPECT_EQ(float_to_half_bits(std::numeric_limits<float>::max()), 0x7c00);
  EXPECT_EQ(float_to_half_bits(0x1p-24f), 0x0001);
  EXPECT_EQ(float_to_half_bits(0x1p-25f), 0x0000);
  EXPECT_EQ(float_to_half_bits(0x1.000002p-25f), 0x0001);
  EXPECT_EQ(float_to_half_bits(0x1.8p-24f), 0x0002);  // 1.5 units: tie, odd rounds up
  EXPECT_EQ(float_to_half_bits(0x1.ffcp-15f),
            0x0400);  // the largest subnormal plus half rounds to the min normal
  EXPECT_EQ(float_to_half_bits(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(float_to_half_bits(-std::numeric_limits<float>::denorm_min()), 0x8000);
  EXPECT_EQ(float_to_half_bits(float_from_bits(0x7fa0'1234u)), 0x7e00);
  EXPECT_EQ(float_to_half_bits(float_from_bits(0xffff'ffffu)), 0xfe00);
  EXPECT_EQ(bits_of(xax::detail::half_bits_to_float(0x7c01)), 0x7f80'2000u);  // stays signalling
  EXPECT_EQ(xax::detail::half_bits_to_float(0x0001), 0x1p-24f);
  EXPECT_EQ(xax::detail::half_bits_to_float(0x03ff), 0x1.ff8p-15f);
}

static_assert(xax::detail::float_to_bfloat16_bits(1.0f) == 0x3f80, "the reference is usable at compile time");
static_assert(xax::detail::half_bits_to_float(0x3c00) == 1.0f);

// ---------------------------------------------------------------------------------------------------------------
// Every kernel against the reference

template <class From, class To>
struct Pair {
  using from = From;
  using to = To;
};

template <class P>
class ConvertKernels : public ::testing::Test {};

using DirectPairs = ::testing::Types<Pair<float, bfloat16>, Pair<bfloat16, float>, Pair<float, float16>,
                                     Pair<float16, float>>;
TYPED_TEST_SUITE(ConvertKernels, DirectPairs);

template <class From>
std::vector<From> kernel_inputs() {
  if constexpr (std::is_same_v<From, float>) {
    std::vector<float> values = rounding_floats();
    const std::vector<float> special = special_floats();
    values.insert(values.end(), special.begin(), special.end());
    return values;
  } else {
    return every_half<From>();
  }
}

template <class From>
std::vector<From> tail_inputs() {
  // Special values first, so that a masked head or tail sees inf, NaN and subnormals.
  std::vector<From> values;
  for (const float value : special_floats()) values.push_back(xax::detail::convert_scalar<From>(value));
  if constexpr (!std::is_same_v<From, float>) {
    for (const std::uint16_t bits :
         std::initializer_list<std::uint16_t>{0x7c01, 0xfd55, 0x7e01, 0x0001, 0x83ff, 0x7f81, 0xff81}) {
      values.push_back(half_from_bits<From>(bits));
    }
  }
  std::mt19937 rng(7);
  while (values.size() < 128)
    values.push_back(xax::detail::convert_scalar<From>(std::normal_distribution<float>(0, 1e4f)(rng)));
  return values;
}

// Each kernel is its own test, named after it, so that a kernel this CPU cannot run is reported as skipped,
// with the reason, instead of being left out of a test that passes. Whether a kernel runs depends on its name
// only ("avx512" needs the same features for every pair), so one test covers that kernel for every direct
// pair, in each of its store forms.
using DirectPairList =
    std::tuple<Pair<float, bfloat16>, Pair<bfloat16, float>, Pair<float, float16>, Pair<float16, float>>;

template <class Visit>
void for_each_direct_pair(Visit&& visit) {
  [&]<class... P>(std::tuple<P...>*) {
    (visit.template operator()<typename P::from, typename P::to>(), ...);
  }(static_cast<DirectPairList*>(nullptr));
}

std::vector<std::string> convert_kernel_names() {
  std::vector<std::string> names;
  for_each_direct_pair([&]<class From, class To>() {
    for (const auto& kernel : xax::detail::convert_kernels<From, To>()) {
      if (std::find(names.begin(), names.end(), kernel.name) == names.end()) names.emplace_back(kernel.name);
    }
  });
  return names;
}

class ConvertKernel : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    bool supported = true;
    for_each_direct_pair([&]<class From, class To>() {
      for (const auto& kernel : xax::detail::convert_kernels<From, To>()) {
        if (kernel.name == GetParam() && !kernel.supported(xax::cpu_features())) supported = false;
      }
    });
    if (!supported) {
      GTEST_SKIP() << "kernel " << GetParam() << " is not supported by this CPU ("
                   << xax::cpu_features().str() << ")";
    }
  }

  /// Calls check.template operator()<From, To>(description, function) for every store form of every direct
  /// pair's kernel of this test's name.
  template <class Check>
  void for_each_form(Check&& check) {
    for_each_direct_pair([&]<class From, class To>() {
      for (const auto& kernel : xax::detail::convert_kernels<From, To>()) {
        if (kernel.name != GetParam()) continue;
        const std::string name = std::string(xax::dtype_name(xax::dtype_of<From>)) + " -> " +
                                 std::string(xax::dtype_name(xax::dtype_of<To>)) + " kernel " + kernel.name;
        check.template operator()<From, To>(name, kernel.run);
        if (kernel.run_streaming != nullptr)
          check.template operator()<From, To>(name + " streaming", kernel.run_streaming);
      }
    });
  }
};

INSTANTIATE_TEST_SUITE_P(Kernels, ConvertKernel, ::testing::ValuesIn(convert_kernel_names()),
                         [](const ::testing::TestParamInfo<std::string>& kernel) { return kernel.param; });

TEST_P(ConvertKernel, IsBitIdenticalToTheReference) {
  for_each_form(
      []<class From, class To>(const std::string& name, xax::detail::ConvertFunction<From, To>* run) {
        const std::vector<From> input = kernel_inputs<From>();
        std::vector<To> expected(input.size());
        xax::detail::convert_portable(input.data(), expected.data(), input.size());
        std::vector<To> actual(input.size());
        run(input.data(), actual.data(), input.size());
        const auto want = raw_bits(std::span<const To>(expected));
        const auto got = raw_bits(std::span<const To>(actual));
        for (std::size_t i = 0; i < input.size(); ++i) {
          ASSERT_EQ(got[i], want[i]) << name << ", element " << i << ", input bits " << std::hex
                                     << raw_bits(std::span<const From>(&input[i], 1))[0];
        }
      });
}

TEST_P(ConvertKernel, EveryTailLengthAndAlignmentWritesExactlyTheRange) {
  for_each_form(
      []<class From, class To>(const std::string& name, xax::detail::ConvertFunction<From, To>* run) {
        const std::vector<From> input = tail_inputs<From>();
        constexpr std::size_t guard = 40;
        const To sentinel = xax::detail::convert_scalar<To>(-7.0f);
        for (std::size_t offset = 0; offset < 18; ++offset) {
          for (std::size_t n = 0; n <= 70; ++n) {
            std::vector<To> actual(offset + n + guard, sentinel);
            run(input.data() + (offset * 3) % 17, actual.data() + offset, n);
            std::vector<To> expected(offset + n + guard, sentinel);
            xax::detail::convert_portable(input.data() + (offset * 3) % 17, expected.data() + offset, n);
            ASSERT_EQ(raw_bits(std::span<const To>(actual)), raw_bits(std::span<const To>(expected)))
                << name << ", n " << n << ", offset " << offset;
          }
        }
      });
}

#if defined(__x86_64__) || defined(__i386__)
// Training code often sets flush-to-zero and denormals-are-zero for speed; conversions must not change.
TEST_P(ConvertKernel, IgnoresFlushToZeroAndDenormalsAreZero) {
  for_each_form(
      []<class From, class To>(const std::string& name, xax::detail::ConvertFunction<From, To>* run) {
        const std::vector<From> input = kernel_inputs<From>();
        std::vector<To> expected(input.size());
        xax::detail::convert_portable(input.data(), expected.data(), input.size());
        std::vector<To> actual(input.size());
        const unsigned saved = _mm_getcsr();
        _mm_setcsr(saved | 0x8040u);  // FTZ | DAZ
        run(input.data(), actual.data(), input.size());
        _mm_setcsr(saved);
        EXPECT_EQ(raw_bits(std::span<const To>(actual)), raw_bits(std::span<const To>(expected))) << name;
      });
}
#endif

TYPED_TEST(ConvertKernels, ConvertNSplitAcrossThreadsEqualsTheReference) {
  using From = typename TypeParam::from;
  using To = typename TypeParam::to;
  // Past streaming_store_min_bytes of output, so that the streaming-store kernels run too.
  std::vector<From> input(xax::detail::streaming_store_min_bytes / sizeof(To) + 12'345);
  std::mt19937 rng(11);
  for (auto& value : input)
    value = xax::detail::convert_scalar<From>(std::normal_distribution<float>(0, 100)(rng));
  std::vector<To> expected(input.size());
  xax::detail::convert_portable(input.data(), expected.data(), input.size());
  const int previous = xax::num_threads();
  for (const int threads : {1, 2, 3}) {
    try {
      xax::set_num_threads(threads);
    } catch (const xax::ConfigError&) {
      continue;  // a build without OpenMP runs on one thread only
    }
    std::vector<To> actual(input.size());
    xax::detail::convert_n(input.data(), actual.data(), input.size());
    EXPECT_EQ(raw_bits(std::span<const To>(actual)), raw_bits(std::span<const To>(expected)))
        << threads << " threads";
  }
  xax::set_num_threads(previous);
}

// ---------------------------------------------------------------------------------------------------------------
// Pairs that go through float, and the public entry points

template <class From, class To>
void expect_matches_scalar_reference(const std::vector<From>& input) {
  std::vector<To> actual(input.size());
  xax::detail::convert_n(input.data(), actual.data(), input.size());
  for (std::size_t i = 0; i < input.size(); ++i) {
    const To expected = xax::detail::convert_scalar<To>(input[i]);
    if constexpr (std::is_same_v<To, double>) {
      ASSERT_EQ(std::bit_cast<std::uint64_t>(actual[i]), std::bit_cast<std::uint64_t>(expected)) << i;
    } else {
      ASSERT_EQ(bits_of(actual[i]), bits_of(expected)) << i;
    }
  }
}

TEST(ConvertThroughFloat, BetweenHalfTypesAndFromDoubleRoundOnceThroughFloatLikeEigen) {
  const std::vector<bfloat16> every_bf16 = every_half<bfloat16>();
  const std::vector<float16> every_f16 = every_half<float16>();
  expect_matches_scalar_reference<bfloat16, float16>(every_bf16);
  expect_matches_scalar_reference<float16, bfloat16>(every_f16);
  expect_matches_scalar_reference<bfloat16, double>(every_bf16);
  expect_matches_scalar_reference<float16, double>(every_f16);
  std::vector<double> doubles;
  std::mt19937_64 rng(3);
  for (int i = 0; i < 5000; ++i) doubles.push_back(std::bit_cast<double>(rng()));
  for (const double special : {0.0, -0.0, 65520.0, 1e300, -1e-300, 1.0 + 0x1p-30}) doubles.push_back(special);
  expect_matches_scalar_reference<double, bfloat16>(doubles);
  expect_matches_scalar_reference<double, float16>(doubles);
  // Eigen also goes through float for these: the same bits.
  for (const double value : doubles) {
    ASSERT_EQ(bits_of(xax::detail::convert_scalar<bfloat16>(value)), bits_of(bfloat16(value)));
  }
}

TEST(Convert, PublicConvertOnVectorsAndSpans) {
  const std::vector<float> master = {1.0f, -2.5f, 65520.0f, 0x1p-24f, 3.0f};
  std::vector<float16> half(master.size());
  xax::convert(master, half);
  EXPECT_EQ(raw_bits(std::span<const float16>(half)),
            (std::vector<std::uint64_t>{0x3c00, 0xc100, 0x7c00, 0x0001, 0x4200}));
  std::array<float, 5> back{};
  xax::convert(std::span<const float16>(half), std::span<float>(back));
  EXPECT_EQ(back[1], -2.5f);
  EXPECT_EQ(back[2], std::numeric_limits<float>::infinity());
  std::vector<bfloat16> empty_out;
  xax::convert(std::vector<float>{}, empty_out);
}

// The pass runs in vector lanes and on several threads: a shifted overlap read elements already written
// (std::memcpy on overlapping ranges for the same type, a race between the threads' blocks). Only the same
// array of the same type is accepted, and left as it is.
TEST(Convert, OverlappingSourceAndDestinationAreRefused) {
  std::vector<float> values(1 << 20);
  for (std::size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(i);
  const std::vector<float> before = values;
  const std::size_t n = values.size() - 1;
  EXPECT_THAT(
      [&] { xax::convert(std::span<const float>(values.data(), n), std::span<float>(values.data() + 1, n)); },
      ::testing::ThrowsMessage<xax::ShapeError>(::testing::StartsWith(
          "xax::convert: the source and the destination overlap; give separate storage")));
  EXPECT_THROW(xax::convert(std::span<const float>(values.data() + 1, n), std::span<float>(values.data(), n)),
               xax::ShapeError);
  EXPECT_EQ(values, before);
  // Another type over the same bytes: float read, bfloat16 written over its first half.
  EXPECT_THROW(xax::convert(std::span<const float>(values.data(), 8),
                            std::span<xax::bfloat16>(reinterpret_cast<xax::bfloat16*>(values.data()), 8)),
               xax::ShapeError);
  EXPECT_EQ(values, before);
  xax::convert(values, values);  // the same array: nothing to do
  EXPECT_EQ(values, before);
  // Adjacent ranges do not overlap.
  xax::convert(std::span<const float>(values.data(), 4), std::span<float>(values.data() + 4, 4));
  EXPECT_EQ(values[7], 3.0f);
}

TEST(Convert, SizeMismatchThrowsShapeErrorNamingBothSizes) {
  const std::vector<float> master(5);
  std::vector<bfloat16> half(4);
  try {
    xax::convert(master, half);
    FAIL() << "expected ShapeError";
  } catch (const xax::ShapeError& error) {
    EXPECT_THAT(error.what(), HasSubstr("5 elements"));
    EXPECT_THAT(error.what(), HasSubstr("has 4"));
  }
}

TEST(Convert, TreeCastUsesTheSameRounding) {
  std::vector<Eigen::VectorXf> master{Eigen::VectorXf::Constant(37, 1.0f + 3 * 0x1p-8f),
                                      Eigen::VectorXf::Constant(3, 65520.0f)};
  const auto half = xax::tree_cast<bfloat16>(master);
  EXPECT_EQ(bits_of(half[0][36]), 0x3f82);
  const auto f16 = xax::tree_cast<float16>(master);
  EXPECT_EQ(bits_of(f16[1][2]), 0x7c00);
  float scalar = std::bit_cast<float>(0xffa0'0000u);
  EXPECT_EQ(bits_of(xax::tree_cast<bfloat16>(scalar)), 0xffc0);
}

}  // namespace
