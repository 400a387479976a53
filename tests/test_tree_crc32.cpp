// xax::tree_crc32: zlib's CRC-32 of a tree's floating leaves' bytes in tree order. The expected values are
// the standard CRC-32 of the ASCII text the leaves' bytes spell (little-endian), independent of xax.
#include <gtest/gtest.h>

#include <bit>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#include <xax/utils/dtype.hpp>
#include <xax/utils/tree.hpp>
#include <xax/utils/tree_crc32.hpp>

namespace {

using xax::bfloat16;
using xax::float16;

template <class T>
struct TwoLeaves {
  Eigen::Matrix<T, Eigen::Dynamic, 1> first;
  Eigen::Matrix<T, Eigen::Dynamic, 1> second;
  std::int64_t step = 0;  // an integer leaf: not part of the checksum
  XAX_FIELDS(first, second, step);
};

// A vector of T whose bytes are `text` (little-endian hosts).
template <class T>
Eigen::Matrix<T, Eigen::Dynamic, 1> spelling(const char* text, std::size_t bytes) {
  Eigen::Matrix<T, Eigen::Dynamic, 1> values(static_cast<Eigen::Index>(bytes / sizeof(T)));
  std::memcpy(values.data(), text, bytes);
  return values;
}

template <class T>
class TreeCrc32 : public ::testing::Test {};
using Types = ::testing::Types<float, bfloat16, float16>;
TYPED_TEST_SUITE(TreeCrc32, Types);

#if XAX_HAS_ZLIB
static_assert(std::endian::native == std::endian::little,
              "the expected values below assume little-endian bytes");

TYPED_TEST(TreeCrc32, IsTheCrcOfTheLeavesBytesInTreeOrder) {
  using T = TypeParam;
  TwoLeaves<T> tree;
  tree.first = spelling<T>("1234", 4);
  tree.second = spelling<T>("5678", 4);
  tree.step = 12345;
  EXPECT_EQ(xax::tree_crc32(tree), 0x9ae0daafU);  // CRC-32("12345678")
  // The integer leaf is not part of it.
  tree.step = 7;
  EXPECT_EQ(xax::tree_crc32(tree), 0x9ae0daafU);
  // Tree order matters: the same bytes in the other leaf order are another checksum.
  std::swap(tree.first, tree.second);
  EXPECT_EQ(xax::tree_crc32(tree), 0x5135e9f5U);  // CRC-32("56781234")
}

TYPED_TEST(TreeCrc32, OneFlippedBitChangesIt) {
  using T = TypeParam;
  TwoLeaves<T> tree;
  tree.first = Eigen::Matrix<T, Eigen::Dynamic, 1>::Constant(16, T(0.5f));
  tree.second = Eigen::Matrix<T, Eigen::Dynamic, 1>::Constant(3, T(-2.0f));
  const std::uint32_t before = xax::tree_crc32(tree);
  auto* bytes = reinterpret_cast<unsigned char*>(tree.second.data());
  bytes[1] ^= 0x01;
  EXPECT_NE(xax::tree_crc32(tree), before);
  bytes[1] ^= 0x01;
  EXPECT_EQ(xax::tree_crc32(tree), before);
}

TEST(TreeCrc32Empty, AnEmptyTreeIsTheCrcOfNoBytes) {
  TwoLeaves<float> tree;
  EXPECT_EQ(xax::tree_crc32(tree), 0U);
}
#else
TEST(TreeCrc32, NeedsZlib) {
  static_assert(!xax::has_tree_crc32);
  GTEST_SKIP() << "xax::tree_crc32 needs zlib (XAX_HAS_ZLIB); this build has none";
}
#endif

}  // namespace
