#pragma once
/// \file
/// `xax::distributed::verify_replicas_equal(comm, tree, what)`: a collective check that every rank holds rank
/// 0's bits in the floating leaves of `tree`, and `ReplicaMismatchError`, which names the ranks that do not.
///
/// Data-parallel training keeps one copy of the masters per rank, and nothing later would notice if they
/// started out different: each rank would apply the same summed gradients to its own masters and the copies
/// would drift apart for ever. Every rank starts from rank 0's initial params (broadcast_tree), but after a
/// checkpoint load each rank has read a file on its own, and a file that changed between the reads, a rank
/// given another path, or a node-local disk holding an older file would all leave the ranks with different
/// masters. DataParallelMixin therefore runs this check after TrainMixin::load_checkpoint.
///
/// How: each rank computes xax::tree_crc32 of its tree (zlib's CRC-32, one pass over the bytes) and an
/// all-gather hands every rank every CRC; ranks whose CRC differs from rank 0's differ. The traffic is 4
/// bytes per rank. A CRC-32 misses a difference with probability 2^-32 per rank; ReplicaComparison::exact
/// instead broadcasts rank 0's values (the tree's bytes once over the network) and compares bit for bit, and
/// is used when xax was built without zlib.

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <string_view>
#include <utility>
#include <vector>
#include <xax/distributed/communicator.hpp>
#include <xax/distributed/gradient_reducer.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/tree.hpp>
#include <xax/utils/tree_crc32.hpp>

namespace xax::distributed {

/// The ranks of a data-parallel job hold different values where they must hold the same (the masters after a
/// checkpoint load). what() names the ranks that differ from rank 0.
class ReplicaMismatchError : public Error {
 public:
  ReplicaMismatchError(const std::string& message, std::vector<int> differing_ranks)
      : Error(message), differing_ranks_(std::move(differing_ranks)) {}
  /// The ranks whose values differ from rank 0's, in increasing order.
  [[nodiscard]] const std::vector<int>& differing_ranks() const { return differing_ranks_; }

 private:
  std::vector<int> differing_ranks_;
};

/// How verify_replicas_equal compares the ranks' trees.
enum class ReplicaComparison {
  crc32,  ///< all-gather each rank's CRC-32 of its bytes (4 bytes per rank; needs zlib)
  exact,  ///< broadcast rank 0's values and compare bit for bit (the tree's bytes once)
};

/// The comparison verify_replicas_equal uses by default: crc32 when xax has zlib, exact otherwise.
inline constexpr ReplicaComparison default_replica_comparison =
    has_tree_crc32 ? ReplicaComparison::crc32 : ReplicaComparison::exact;

namespace detail {

// 1 when the floating leaves of `tree` hold rank 0's bits (rank 0's values broadcast leaf by leaf).
template <class Tree>
int equals_root_exactly(const Communicator& comm, const Tree& tree) {
  int same = 1;
  std::vector<unsigned char> root;
  for_each_leaf(
      [&]<class L>(const L& leaf) {
        if constexpr (floating_leaf<L>) {
          const auto values = leaf_span(leaf);
          const std::size_t bytes = values.size() * sizeof(values[0]);
          root.resize(bytes);
          if (bytes > 0) std::memcpy(root.data(), values.data(), bytes);
          comm.broadcast(root.data(), bytes, 0);
          if (bytes > 0 && std::memcmp(root.data(), values.data(), bytes) != 0) same = 0;
        }
      },
      tree);
  return same;
}

// Throws ReplicaMismatchError naming `differing` (the ranks whose values differ from rank 0's), if any.
inline void throw_if_differing(const std::string& context, std::vector<int> differing, const std::string& how,
                               std::size_t world) {
  if (differing.empty()) return;
  std::string ranks;
  for (const int r : differing) ranks += (ranks.empty() ? "" : ", ") + std::to_string(r);
  // The message is built before `differing` is moved into the error.
  const std::string message = context + ": the values of rank" + (differing.size() > 1 ? "s " : " ") + ranks +
                              " differ from rank 0's" + how + ", out of " + std::to_string(world) +
                              " ranks; every rank must hold the same values (after a checkpoint load: every "
                              "rank must read the same, unchanged checkpoint file)";
  throw ReplicaMismatchError(message, std::move(differing));
}

}  // namespace detail

/// Collective: returns when every rank's floating leaves of `tree` hold rank 0's bits; otherwise throws
/// ReplicaMismatchError on every rank alike (no rank is left in a collective), naming the ranks that differ
/// and `what` was checked. Throws ShapeError on every rank when the ranks' trees differ in structure, and
/// ConfigError for ReplicaComparison::crc32 without zlib.
template <tree Tree>
void verify_replicas_equal(const Communicator& comm, const Tree& tree, std::string_view what,
                           ReplicaComparison comparison = default_replica_comparison) {
  const std::string context = "xax::distributed::verify_replicas_equal (" + std::string(what) + ")";
  check_same_structure(comm, tree, context.c_str());
  const auto world = static_cast<std::size_t>(comm.size());
  std::vector<int> differing;
  std::string how;
  if (comparison == ReplicaComparison::crc32) {
#if XAX_HAS_ZLIB
    const std::uint32_t mine = tree_crc32(tree);
    std::vector<std::uint32_t> all(world);
    comm.all_gather(&mine, 1, all.data());
    char root_crc[16];
    std::snprintf(root_crc, sizeof root_crc, "%08x", static_cast<unsigned>(all[0]));
    how = " (CRC-32 of their bytes; rank 0's is " + std::string(root_crc) + ")";
    for (std::size_t r = 1; r < world; ++r) {
      if (all[r] != all[0]) differing.push_back(static_cast<int>(r));
    }
#else
    throw ConfigError(context +
                      ": ReplicaComparison::crc32 needs zlib, which this build of xax lacks; use "
                      "ReplicaComparison::exact (the default without zlib)");
#endif
  } else {
    const int same = detail::equals_root_exactly(comm, tree);
    std::vector<int> all(world);
    comm.all_gather(&same, 1, all.data());
    how = " (compared bit for bit)";
    for (std::size_t r = 1; r < world; ++r) {
      if (all[r] == 0) differing.push_back(static_cast<int>(r));
    }
  }
  detail::throw_if_differing(context, std::move(differing), how, world);
}

/// Collective: as verify_replicas_equal for a digest each rank computed of values it no longer holds whole
/// (ZeRO-1 with sharded masters: the masters each rank read from a checkpoint before keeping its shard).
/// Throws ReplicaMismatchError on every rank alike, naming the ranks whose digest differs from rank 0's.
inline void verify_replica_digests_equal(const Communicator& comm, std::uint64_t digest,
                                         std::string_view what) {
  const std::string context = "xax::distributed::verify_replica_digests_equal (" + std::string(what) + ")";
  const auto world = static_cast<std::size_t>(comm.size());
  std::vector<std::uint64_t> all(world);
  comm.all_gather(&digest, 1, all.data());
  std::vector<int> differing;
  for (std::size_t r = 1; r < world; ++r) {
    if (all[r] != all[0]) differing.push_back(static_cast<int>(r));
  }
  detail::throw_if_differing(context, std::move(differing), " (a digest of their bytes)", world);
}

}  // namespace xax::distributed
