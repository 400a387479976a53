#pragma once
/// \file
/// `xax::tree_crc32(tree)`: the CRC-32 (zlib's) of a tree's floating leaves' bytes, in tree order. Two runs
/// that end with bit-identical params print the same value, which makes "1 rank and 2 ranks trained the same
/// model" checkable from a log line (examples/mpi/data_parallel.cpp, mixed_precision_benchmark's report).
///
/// Needs zlib (XAX_HAS_ZLIB, set by xax's CMake when zlib is found); without it the header declares nothing
/// but `xax::has_tree_crc32 == false`, so callers can say that the checksum is unavailable.

#include <cstdint>
#include <xax/utils/tree.hpp>

#if XAX_HAS_ZLIB
#include <zlib.h>

#include <algorithm>
#include <cstddef>
#include <limits>
#endif

namespace xax {

#if XAX_HAS_ZLIB
inline constexpr bool has_tree_crc32 = true;

/// The CRC-32 of the bytes of every floating leaf of `tree` (float, double, bfloat16, float16), leaf after
/// leaf in tree order, each leaf's elements in storage order. Integer leaves (step counters, labels) are not
/// part of it: the checksum is of the model's values.
template <tree Tree>
[[nodiscard]] std::uint32_t tree_crc32(const Tree& tree) {
  uLong crc = ::crc32(0L, Z_NULL, 0);
  for_each_leaf(
      [&]<class L>(const L& leaf) {
        if constexpr (floating_leaf<L>) {
          const auto values = leaf_span(leaf);
          const auto* bytes = reinterpret_cast<const Bytef*>(values.data());
          std::size_t remaining = values.size() * sizeof(values[0]);
          // zlib's length is a uInt: feed leaves beyond 4 GiB in pieces.
          while (remaining > 0) {
            const auto chunk =
                static_cast<uInt>(std::min<std::size_t>(remaining, std::numeric_limits<uInt>::max()));
            crc = ::crc32(crc, bytes, chunk);
            bytes += chunk;
            remaining -= chunk;
          }
        }
      },
      tree);
  return static_cast<std::uint32_t>(crc);
}
#else
inline constexpr bool has_tree_crc32 = false;
#endif

}  // namespace xax
