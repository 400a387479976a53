// xax/distributed/shard_sampler.hpp: every rank's share of every global batch, independent of the world size.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <set>
#include <vector>
#include <xax/distributed/communicator.hpp>
#include <xax/distributed/shard_sampler.hpp>

namespace {

using xax::distributed::ShardSampler;
using xax::distributed::ShardSamplerOptions;

constexpr ShardSamplerOptions options{.examples = 103, .global_batch = 24, .micro_shards = 4, .seed = 9};

TEST(ShardSampler, RanksShareEachGlobalBatchWithoutOverlapWhateverTheWorldSize) {
  for (const int world : {1, 2, 4}) {
    ShardSampler reference(options, 0, 1);
    for (std::int64_t epoch = 0; epoch < 2; ++epoch) {
      for (std::int64_t step = 0; step < reference.steps_per_epoch(); ++step) {
        std::vector<std::int64_t> union_of_ranks;
        for (int rank = 0; rank < world; ++rank) {
          ShardSampler sampler(options, rank, world);
          EXPECT_EQ(sampler.micro_shards_per_rank(), 4 / world);
          EXPECT_EQ(sampler.first_micro_shard(), rank * (4 / world));
          for (const auto shard : sampler.rank_shards(epoch, step)) {
            EXPECT_EQ(shard.size(), 6u);
            union_of_ranks.insert(union_of_ranks.end(), shard.begin(), shard.end());
          }
        }
        // Together the ranks train on exactly the single process's global batch, in the same order.
        std::vector<std::int64_t> single;
        for (const auto shard : reference.rank_shards(epoch, step))
          single.insert(single.end(), shard.begin(), shard.end());
        EXPECT_EQ(union_of_ranks, single) << "world " << world << " epoch " << epoch << " step " << step;
        EXPECT_EQ(std::set<std::int64_t>(single.begin(), single.end()).size(), single.size());
      }
    }
  }
}

TEST(ShardSampler, DropsTheLastPartialGlobalBatchAndReshufflesEachEpoch) {
  ShardSampler sampler(options, 0, 1);
  EXPECT_EQ(sampler.steps_per_epoch(), 4);  // 103 / 24: the last 7 examples of each epoch's order are dropped
  std::vector<std::int64_t> epoch0, epoch1;
  for (std::int64_t step = 0; step < 4; ++step) {
    for (const auto s : sampler.rank_shards(0, step)) epoch0.insert(epoch0.end(), s.begin(), s.end());
  }
  for (std::int64_t step = 0; step < 4; ++step) {
    for (const auto s : sampler.rank_shards(1, step)) epoch1.insert(epoch1.end(), s.begin(), s.end());
  }
  EXPECT_EQ(epoch0.size(), 96u);
  EXPECT_NE(epoch0, epoch1);
  EXPECT_LT(*std::max_element(epoch0.begin(), epoch0.end()), 103);
  // Any epoch can be rebuilt on its own (a resumed run needs no history).
  ShardSampler fresh(options, 0, 1);
  std::vector<std::int64_t> again;
  for (const auto s : fresh.rank_shards(1, 0)) again.insert(again.end(), s.begin(), s.end());
  EXPECT_TRUE(std::equal(again.begin(), again.end(), epoch1.begin()));
  // The seed matters.
  ShardSamplerOptions other = options;
  other.seed = 10;
  ShardSampler reseeded(other, 0, 1);
  EXPECT_FALSE(
      std::ranges::equal(reseeded.micro_shard(0, 0, 0), ShardSampler(options, 0, 1).micro_shard(0, 0, 0)));
}

TEST(ShardSampler, BadSettingsAreConfigErrors) {
  EXPECT_THROW(ShardSampler(options, 0, 3), xax::ConfigError);  // 4 micro-shards over 3 ranks
  EXPECT_THROW(ShardSampler(options, 2, 2), xax::ConfigError);
  EXPECT_THROW(ShardSampler({.examples = 103, .global_batch = 26, .micro_shards = 4}, 0, 1),
               xax::ConfigError);
  EXPECT_THROW(ShardSampler({.examples = 20, .global_batch = 24, .micro_shards = 4}, 0, 1), xax::ConfigError);
  EXPECT_THROW(ShardSampler({.examples = 20, .global_batch = 4, .micro_shards = 0}, 0, 1), xax::ConfigError);
  ShardSampler sampler(options, 0, 1);
  EXPECT_THROW(static_cast<void>(sampler.micro_shard(0, 4, 0)), xax::ConfigError);
  EXPECT_THROW(static_cast<void>(sampler.micro_shard(0, 0, 4)), xax::ConfigError);
}

// An example count whose permutation cannot be held is a ConfigError, not std::length_error or
// std::bad_alloc: beyond what a vector can index when the sampler is made, and beyond what can be
// allocated (2^59 examples: 4 EiB) when the epoch's permutation is built.
TEST(ShardSampler, ExampleCountsTooLargeToPermuteAreConfigErrors) {
  EXPECT_THROW(ShardSampler({.examples = std::numeric_limits<std::int64_t>::max(), .global_batch = 4}, 0, 1),
               xax::ConfigError);
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "AddressSanitizer aborts on an allocation this large instead of throwing std::bad_alloc";
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
  GTEST_SKIP() << "AddressSanitizer aborts on an allocation this large instead of throwing std::bad_alloc";
#endif
#endif
  ShardSampler sampler({.examples = std::int64_t{1} << 59, .global_batch = 4}, 0, 1);
  EXPECT_THROW(static_cast<void>(sampler.micro_shard(0, 0, 0)), xax::ConfigError);
  EXPECT_THROW(static_cast<void>(sampler.micro_shard(0, 0, 0)), xax::ConfigError) << "and again";
}

}  // namespace
