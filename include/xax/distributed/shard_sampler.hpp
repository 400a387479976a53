#pragma once
/// \file
/// `xax::distributed::ShardSampler`: which examples each process trains on, step by step (DESIGN §12).
///
/// The rule: every epoch is one seeded permutation of the examples, the same on every process. Step s of the
/// epoch takes the global batch at positions [s·B, (s+1)·B) of it and cuts it into S micro-shards of B/S
/// examples each, in order. Rank r of W takes micro-shards [r·S/W, (r+1)·S/W). Neither the permutation nor
/// the micro-shards depend on W, so 1, 2 or 4 processes train on exactly the same micro-batches (which the
/// deterministic reduction turns into the same bits). The last partial global batch of an epoch (the
/// examples after floor(examples / B)·B) is dropped, as PyTorch's drop_last=True does: a step is always a
/// full global batch, so every rank has the same number of micro-shards and no rank waits for one that has
/// none. Those examples are not lost for good: the next epoch's permutation moves them.
///
///     xax::distributed::ShardSampler sampler({.examples = n, .global_batch = 256, .micro_shards = 4,
///                                              .seed = 0}, comm.rank(), comm.size());
///     for (std::int64_t step = 0; step < sampler.steps_per_epoch(); ++step)
///       for (auto indices : sampler.rank_shards(epoch, step)) batches.push_back(make_batch(indices));

#include <algorithm>
#include <cstdint>
#include <new>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <vector>
#include <xax/utils/error.hpp>

namespace xax::distributed {

struct ShardSamplerOptions {
  std::int64_t examples = 0;      ///< examples in the data set
  std::int64_t global_batch = 0;  ///< examples per step over all processes (B)
  std::int64_t micro_shards = 4;  ///< micro-shards per step (S): a multiple of every world size to be run on
  std::uint64_t seed = 0;         ///< the permutation's seed; the same on every process
};

/// Seeded, world-size-independent sharding of every global batch (see the file comment for the rule).
class ShardSampler {
 public:
  ShardSampler(ShardSamplerOptions options, int rank, int world_size) : options_(options) {
    const auto reject = [](const std::string& what) {
      return ConfigError("xax::distributed::ShardSampler: " + what);
    };
    if (world_size < 1 || rank < 0 || rank >= world_size) {
      throw reject("rank " + std::to_string(rank) + " of world size " + std::to_string(world_size) +
                   " is not accepted; expected 0 <= rank < world size");
    }
    if (options.micro_shards < 1) {
      throw reject("micro_shards " + std::to_string(options.micro_shards) +
                   " is not accepted; expected >= 1");
    }
    if (options.global_batch < 1 || options.global_batch % options.micro_shards != 0) {
      throw reject("global_batch " + std::to_string(options.global_batch) +
                   " is not accepted; expected a positive multiple of micro_shards (" +
                   std::to_string(options.micro_shards) + ")");
    }
    if (options.examples < options.global_batch) {
      throw reject("global_batch " + std::to_string(options.global_batch) + " exceeds the " +
                   std::to_string(options.examples) + " examples; expected global_batch <= examples");
    }
    // Each epoch's permutation is held whole, 8 bytes per example.
    if (static_cast<std::uint64_t>(options.examples) > order_.max_size()) {
      throw reject("examples " + std::to_string(options.examples) +
                   " is not accepted: an epoch's permutation holds 8 bytes per example; expected at most " +
                   std::to_string(order_.max_size()));
    }
    if (options.micro_shards % world_size != 0) {
      throw reject("micro_shards " + std::to_string(options.micro_shards) +
                   " is not a multiple of the world size " + std::to_string(world_size) +
                   "; every process takes the same number of micro-shards, so choose micro_shards as a "
                   "multiple of every world size you run on (4 serves 1, 2 and 4 processes)");
    }
    per_rank_ = options.micro_shards / world_size;
    first_ = static_cast<std::int64_t>(rank) * per_rank_;
  }

  /// Full global batches per epoch; the remainder is dropped.
  [[nodiscard]] std::int64_t steps_per_epoch() const { return options_.examples / options_.global_batch; }
  /// Examples per micro-shard (B / S).
  [[nodiscard]] std::int64_t micro_shard_size() const {
    return options_.global_batch / options_.micro_shards;
  }
  /// This rank's micro-shards are [first_micro_shard(), first_micro_shard() + micro_shards_per_rank()).
  [[nodiscard]] std::int64_t first_micro_shard() const { return first_; }
  [[nodiscard]] std::int64_t micro_shards_per_rank() const { return per_rank_; }
  [[nodiscard]] const ShardSamplerOptions& options() const { return options_; }

  /// The example indices of micro-shard `shard` (0 <= shard < S, numbered over all ranks) of `step` in
  /// `epoch`. The span stays valid until the sampler is asked about another epoch.
  std::span<const std::int64_t> micro_shard(std::int64_t epoch, std::int64_t step, std::int64_t shard) {
    if (epoch < 0 || step < 0 || step >= steps_per_epoch() || shard < 0 || shard >= options_.micro_shards) {
      throw ConfigError("xax::distributed::ShardSampler: epoch " + std::to_string(epoch) + ", step " +
                        std::to_string(step) + ", micro-shard " + std::to_string(shard) +
                        " is out of range; expected epoch >= 0, 0 <= step < " +
                        std::to_string(steps_per_epoch()) + ", 0 <= micro-shard < " +
                        std::to_string(options_.micro_shards));
    }
    permute(epoch);
    const std::int64_t size = micro_shard_size();
    return std::span<const std::int64_t>(order_).subspan(
        static_cast<std::size_t>(step * options_.global_batch + shard * size),
        static_cast<std::size_t>(size));
  }

  /// This rank's micro-shards of `step`, in order.
  std::vector<std::span<const std::int64_t>> rank_shards(std::int64_t epoch, std::int64_t step) {
    std::vector<std::span<const std::int64_t>> shards;
    shards.reserve(static_cast<std::size_t>(per_rank_));
    for (std::int64_t m = 0; m < per_rank_; ++m) shards.push_back(micro_shard(epoch, step, first_ + m));
    return shards;
  }

 private:
  void permute(std::int64_t epoch) {
    if (epoch == epoch_) return;
    try {
      order_.resize(static_cast<std::size_t>(options_.examples));
    } catch (const std::bad_alloc&) {  // the strong guarantee: order_ and epoch_ are as they were
      throw ConfigError("xax::distributed::ShardSampler: the permutation of " +
                        std::to_string(options_.examples) + " examples needs " +
                        std::to_string(options_.examples / (std::int64_t{1} << 27)) +
                        " GiB (8 bytes per example), which could not be allocated; expected a data set whose "
                        "example count fits in memory");
    }
    std::iota(order_.begin(), order_.end(), std::int64_t{0});
    // Each epoch's generator is keyed by (seed, epoch), so any epoch can be rebuilt on its own (a resumed run
    // needs no history). std::shuffle's algorithm belongs to the standard library, which all processes of a
    // job share.
    std::seed_seq key{static_cast<std::uint32_t>(options_.seed),
                      static_cast<std::uint32_t>(options_.seed >> 32), static_cast<std::uint32_t>(epoch),
                      static_cast<std::uint32_t>(epoch >> 32)};
    std::mt19937_64 rng(key);
    std::shuffle(order_.begin(), order_.end(), rng);
    epoch_ = epoch;
  }

  ShardSamplerOptions options_;
  std::int64_t per_rank_ = 1;
  std::int64_t first_ = 0;
  std::int64_t epoch_ = -1;
  std::vector<std::int64_t> order_;
};

}  // namespace xax::distributed
