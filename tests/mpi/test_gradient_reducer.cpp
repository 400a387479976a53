// xax/distributed/gradient_reducer.hpp: sums in fp32 that every rank holds bit for bit, deterministic sums
// independent of the number of ranks, the bf16 wire rounding each element once, and broadcast_tree.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <vector>
#include <xax/distributed/gradient_reducer.hpp>
#include <xax/utils/finite.hpp>

namespace {

using xax::distributed::Communicator;
using xax::distributed::GradientReducer;
using xax::distributed::ReducerOptions;
// Two float leaves of very different magnitudes, and an integer leaf that has no gradient to reduce.
using Grads = std::tuple<Eigen::MatrixXf, Eigen::VectorXf, int>;

Grads make_grads(std::int64_t seed, Eigen::Index rows = 37, Eigen::Index cols = 11, Eigen::Index extra = 13) {
  std::mt19937_64 rng(static_cast<std::uint64_t>(seed));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Grads g{Eigen::MatrixXf(rows, cols), Eigen::VectorXf(extra), static_cast<int>(seed)};
  for (Eigen::Index i = 0; i < std::get<0>(g).size(); ++i) std::get<0>(g).data()[i] = normal(rng) * 1e-3f;
  for (Eigen::Index i = 0; i < std::get<1>(g).size(); ++i) std::get<1>(g).data()[i] = normal(rng) * 1e3f;
  return g;
}

std::vector<float> flat(const Grads& g) {
  std::vector<float> out(std::get<0>(g).data(), std::get<0>(g).data() + std::get<0>(g).size());
  out.insert(out.end(), std::get<1>(g).data(), std::get<1>(g).data() + std::get<1>(g).size());
  return out;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Every rank checks that its vector equals rank 0's, bit for bit.
bool same_on_every_rank(const Communicator& comm, const std::vector<float>& mine) {
  std::vector<float> root = mine;
  comm.broadcast(root.data(), root.size(), 0);
  const int same = same_bits(root, mine) ? 1 : 0;
  int all = 0;
  comm.all_reduce(&same, &all, 1, MPI_MIN);
  return all == 1;
}

TEST(GradientReducer, DeterministicSumIsTheSingleProcessSumForAnyWorldSize) {
  constexpr int shards = 4;  // micro-batches per step, over all ranks
  GradientReducer reducer(Communicator{}, ReducerOptions{.wire = xax::DType::float32, .deterministic = true});
  const Communicator& comm = reducer.communicator();
  ASSERT_EQ(shards % comm.size(), 0) << "run on 1, 2 or 4 ranks";
  const int per_rank = shards / comm.size();
  for (std::int64_t step = 0; step < 3; ++step) {  // buffers are reused across steps
    Grads grads = make_grads(0);
    for (int m = 0; m < per_rank; ++m) {
      const int shard = comm.rank() * per_rank + m;
      reducer.collect(static_cast<std::size_t>(m), 0.25 * shard + static_cast<double>(step),
                      make_grads(100 * step + shard));
    }
    const xax::ReducedGradients reduced = reducer.reduce(grads);

    // What one process accumulating the same micro-batches computes (TrainStep's order: left to right).
    std::vector<float> expected = flat(make_grads(100 * step));
    double expected_loss = static_cast<double>(step);
    for (int shard = 1; shard < shards; ++shard) {
      const std::vector<float> addend = flat(make_grads(100 * step + shard));
      for (std::size_t i = 0; i < expected.size(); ++i) expected[i] += addend[i];
      expected_loss += 0.25 * shard + static_cast<double>(step);
    }
    EXPECT_TRUE(same_bits(flat(grads), expected)) << "step " << step;
    EXPECT_EQ(reduced.micro_batches, shards);
    EXPECT_EQ(reduced.loss_sum, expected_loss);
    EXPECT_EQ(std::get<2>(grads), 0) << "integer leaves are not reduced";
  }
  EXPECT_EQ(reducer.stats().reductions, 3);
  EXPECT_EQ(reducer.stats().elements, 37u * 11u + 13u);
}

TEST(GradientReducer, FastModeSumsEachRanksMicroBatchesFirstAndEveryRankHoldsTheSameBits) {
  GradientReducer reducer(Communicator{},
                          ReducerOptions{.wire = xax::DType::float32, .deterministic = false});
  const Communicator& comm = reducer.communicator();
  Grads grads = make_grads(0);
  // Rank r has r + 1 micro-batches: fast mode allows unequal shares.
  for (int m = 0; m <= comm.rank(); ++m)
    reducer.collect(static_cast<std::size_t>(m), 1.0, make_grads(10 * comm.rank() + m));
  const xax::ReducedGradients reduced = reducer.reduce(grads);
  EXPECT_EQ(reduced.micro_batches, comm.size() * (comm.size() + 1) / 2);
  EXPECT_EQ(reduced.loss_sum, static_cast<double>(reduced.micro_batches));

  std::vector<float> expected;
  for (int r = 0; r < comm.size(); ++r) {
    std::vector<float> local = flat(make_grads(10 * r));
    for (int m = 1; m <= r; ++m) {
      const std::vector<float> addend = flat(make_grads(10 * r + m));
      for (std::size_t i = 0; i < local.size(); ++i) local[i] += addend[i];
    }
    if (r == 0) {
      expected = local;
    } else {
      for (std::size_t i = 0; i < local.size(); ++i) expected[i] += local[i];
    }
  }
  EXPECT_TRUE(same_bits(flat(grads), expected));
  EXPECT_TRUE(same_on_every_rank(comm, flat(grads)));
}

// The correctly rounded bf16 (8 significant bits, ties to even) of a double in bf16's normal range. The sums
// below are exact in double (a few bf16 values), so this is the correctly rounded sum.
float round_to_bf16(double exact) {
  if (exact == 0) return 0.0f;
  int exponent = 0;
  const double significand = std::frexp(exact, &exponent);            // in [0.5, 1)
  const double rounded = std::nearbyint(std::ldexp(significand, 8));  // ties to even (default rounding mode)
  return static_cast<float>(std::ldexp(rounded, exponent - 8));
}

TEST(GradientReducer, Bfloat16WireRoundsEachElementOnceAndHalvesTheBytes) {
  constexpr Eigen::Index rows = 512, cols = 128;  // 65536 elements
  GradientReducer bf16(Communicator{}, ReducerOptions{.wire = xax::DType::bfloat16, .deterministic = false});
  GradientReducer fp32(Communicator{}, ReducerOptions{.wire = xax::DType::float32, .deterministic = false});
  const Communicator& comm = bf16.communicator();
  const int world = comm.size();
  const auto gradients_of = [&](int rank) {
    Grads g{Eigen::MatrixXf(rows, cols), Eigen::VectorXf(0), 0};
    std::mt19937_64 rng(4242 + static_cast<std::uint64_t>(rank));
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (Eigen::Index i = 0; i < std::get<0>(g).size(); ++i) std::get<0>(g).data()[i] = normal(rng);
    return g;
  };
  Grads reduced = gradients_of(0), reduced32 = gradients_of(0);
  bf16.collect(0, 0.0, gradients_of(comm.rank()));
  static_cast<void>(bf16.reduce(reduced));
  fp32.collect(0, 0.0, gradients_of(comm.rank()));
  static_cast<void>(fp32.reduce(reduced32));
  EXPECT_TRUE(same_on_every_rank(comm, flat(reduced)));

  std::vector<std::vector<float>> inputs;  // every rank's gradients as they travel: rounded to bf16
  for (int r = 0; r < world; ++r) {
    std::vector<float> x = flat(gradients_of(r));
    for (float& v : x) v = static_cast<float>(xax::bfloat16(v));
    inputs.push_back(std::move(x));
  }
  const std::vector<float> ours = flat(reduced);
  std::int64_t once_wrong = 0, per_hop_wrong = 0, inexact_in_float = 0;
  for (std::size_t i = 0; i < ours.size(); ++i) {
    double exact = 0;
    for (int r = 0; r < world; ++r) exact += static_cast<double>(inputs[static_cast<std::size_t>(r)][i]);
    const float correct = round_to_bf16(exact);
    if (static_cast<double>(static_cast<float>(exact)) != exact) ++inexact_in_float;
    if (ours[i] != correct) ++once_wrong;
    // What a ring all-reduce with a bf16 MPI_Op (or NCCL) computes: the partial sum rounded at every hop.
    float hop = inputs[0][i];
    for (int r = 1; r < world; ++r)
      hop = static_cast<float>(xax::bfloat16(hop + inputs[static_cast<std::size_t>(r)][i]));
    if (hop != correct) ++per_hop_wrong;
  }
  const auto n = static_cast<double>(ours.size());
  if (comm.rank() == 0) {
    std::printf(
        "bf16 wire at %d ranks, %zu elements ~N(0,1): rounded once %lld mis-rounded (%.4f %%); rounded at "
        "every hop %lld (%.4f %%); sums not exact in fp32 %lld; bytes sent per rank bf16 %zu, fp32 %zu\n",
        world, ours.size(), static_cast<long long>(once_wrong), 100.0 * static_cast<double>(once_wrong) / n,
        static_cast<long long>(per_hop_wrong), 100.0 * static_cast<double>(per_hop_wrong) / n,
        static_cast<long long>(inexact_in_float), bf16.stats().wire_bytes_last, fp32.stats().wire_bytes_last);
  }
  EXPECT_LE(static_cast<double>(once_wrong), 0.001 * n);  // >= 99.9 % correctly rounded
  EXPECT_EQ(bf16.stats().wire_bytes_last * 2, fp32.stats().wire_bytes_last);
  if (world == 1) {
    EXPECT_EQ(fp32.stats().wire_bytes_last, 0u);
  }
}

TEST(GradientReducer, InfinityOnOneRankReachesEveryRank) {
  for (const bool deterministic : {true, false}) {
    GradientReducer reducer(Communicator{},
                            ReducerOptions{.wire = xax::DType::float32, .deterministic = deterministic});
    const Communicator& comm = reducer.communicator();
    Grads local = make_grads(comm.rank());
    if (comm.rank() == comm.size() - 1) std::get<1>(local)(5) = std::numeric_limits<float>::infinity();
    Grads grads = make_grads(0);
    reducer.collect(0, 1.0, local);
    static_cast<void>(reducer.reduce(grads));
    EXPECT_FALSE(xax::all_finite(grads));
    EXPECT_TRUE(std::isinf(std::get<1>(grads)(5)));
    EXPECT_TRUE(same_on_every_rank(comm, flat(grads)));
  }
}

TEST(GradientReducer, MisuseIsAnError) {
  EXPECT_THROW(GradientReducer(Communicator{}, ReducerOptions{.wire = xax::DType::float16}),
               xax::ConfigError);
  GradientReducer reducer(Communicator{});
  Grads grads = make_grads(0);
  EXPECT_THROW(static_cast<void>(reducer.reduce(grads)), xax::Error);  // nothing collected
  EXPECT_THROW(reducer.collect(1, 0.0, grads), xax::Error);            // out of order
  const Communicator& comm = reducer.communicator();
  if (comm.size() > 1) {
    // Deterministic mode needs equal shares: every rank sees the counts and refuses alike (no hang).
    for (int m = 0; m <= (comm.rank() == 0 ? 1 : 0); ++m)
      reducer.collect(static_cast<std::size_t>(m), 0.0, grads);
    EXPECT_THROW(static_cast<void>(reducer.reduce(grads)), xax::ConfigError);
  }
}

// Buckets change no bit: every mode, wire type and bucket size (including buckets smaller than the world,
// of one element, and larger than the gradient) gives the unbucketed sums, for reduce and reduce_scatter;
// deterministic fp32 also equals one process's left-to-right sum, so the bits do not depend on the world size
// either. The buffers shrink with the bucket.
TEST(GradientReducer, BucketSizeChangesNoBitAndBoundsTheBuffers) {
  constexpr int shards = 4;
  const Communicator world_comm;
  const auto world = static_cast<std::size_t>(world_comm.size());
  ASSERT_EQ(shards % world_comm.size(), 0) << "run on 1, 2 or 4 ranks";
  const int per_rank = shards / world_comm.size();
  const std::size_t n = 37u * 11u + 13u;  // 420 elements
  // Uneven ZeRO-like shard bounds: rank q owns [bounds[q], bounds[q + 1]).
  std::vector<std::size_t> bounds(world + 1, 0);
  for (std::size_t q = 1; q < world; ++q) bounds[q] = n * q * q / (world * world);
  bounds[world] = n;

  std::vector<float> expected = flat(make_grads(0));  // one process, left to right
  for (int shard = 1; shard < shards; ++shard) {
    const std::vector<float> addend = flat(make_grads(shard));
    for (std::size_t i = 0; i < n; ++i) expected[i] += addend[i];
  }

  for (const xax::DType wire : {xax::DType::float32, xax::DType::bfloat16}) {
    for (const bool deterministic : {true, false}) {
      for (const bool scatter : {false, true}) {
        std::vector<float> unbucketed;
        std::size_t unbucketed_buffers = 0;
        for (const std::size_t bucket : {std::size_t{0}, std::size_t{1}, std::size_t{3}, std::size_t{16},
                                         std::size_t{100}, n - 1, n, n + 5}) {
          GradientReducer reducer(
              Communicator{},
              ReducerOptions{.wire = wire, .deterministic = deterministic, .bucket_size = bucket});
          std::vector<float> result;
          for (int step = 0; step < 2; ++step) {  // buffers reused: the second step must give the same bits
            Grads grads = make_grads(99);
            for (int m = 0; m < per_rank; ++m) {
              reducer.collect(static_cast<std::size_t>(m), 1.0, make_grads(world_comm.rank() * per_rank + m));
            }
            const xax::ReducedGradients reduced =
                scatter ? reducer.reduce_scatter(grads, bounds) : reducer.reduce(grads);
            EXPECT_EQ(reduced.micro_batches, shards);
            if (step == 1) {
              EXPECT_TRUE(same_bits(flat(grads), result)) << "the second step differs";
            }
            result = flat(grads);
          }
          const std::string where = std::string(xax::dtype_name(wire)) +
                                    (deterministic ? " deterministic" : " fast") +
                                    (scatter ? " reduce_scatter" : " reduce") + ", bucket " +
                                    std::to_string(bucket) + ", " + std::to_string(world) + " ranks";
          const std::size_t expected_buckets = bucket == 0 ? 1 : (n + bucket - 1) / bucket;
          EXPECT_EQ(reducer.stats().buckets_last, expected_buckets) << where;
          if (bucket == 0) {
            unbucketed = result;
            unbucketed_buffers = reducer.stats().buffer_bytes;
            if (scatter) {
              // Zeros outside this rank's shard.
              const auto me = static_cast<std::size_t>(world_comm.rank());
              for (std::size_t i = 0; i < n; ++i) {
                if (i < bounds[me] || i >= bounds[me + 1]) {
                  EXPECT_EQ(result[i], 0.0f) << where << " at " << i;
                }
              }
            }
            if (wire == xax::DType::float32 && deterministic && !scatter) {
              EXPECT_TRUE(same_bits(result, expected)) << where;
            }
          } else {
            EXPECT_TRUE(same_bits(result, unbucketed)) << where << ": differs from one bucket";
          }
          if (bucket == 16) {
            // Bounded by the bucket: the staged micro-batches (deterministic) or the local sum (fast) are the
            // whole gradient; every other buffer is at most a few buckets (a vector's
            // capacity may reach twice its largest size).
            const std::size_t chunk = (bucket + world - 1) / world;
            const std::size_t whole =
                deterministic ? static_cast<std::size_t>(per_rank) * n * (wire == xax::DType::float32 ? 4 : 2)
                              : n * 4;
            const std::size_t bucketed =
                2 * (static_cast<std::size_t>(per_rank) * world * chunk * 4 + 3 * chunk * 4 + 2 * bucket * 4);
            EXPECT_LE(reducer.stats().buffer_bytes, whole + bucketed) << where;
            EXPECT_LT(reducer.stats().buffer_bytes, unbucketed_buffers) << where;
          }
        }
      }
    }
  }
}

TEST(BroadcastTree, EveryRankTakesRootsValues) {
  const Communicator comm;
  Grads tree = make_grads(comm.rank());
  xax::distributed::broadcast_tree(comm, tree);
  EXPECT_TRUE(same_bits(flat(tree), flat(make_grads(0))));
  EXPECT_EQ(std::get<2>(tree), comm.rank()) << "integer leaves are left alone";
  EXPECT_THROW(xax::distributed::broadcast_tree(comm, tree, comm.size()), xax::ConfigError);
  if (comm.size() > 1) {
    Grads uneven = make_grads(0, 37, 11, comm.rank() == 0 ? 14 : 13);
    EXPECT_THROW(xax::distributed::broadcast_tree(comm, uneven), xax::ShapeError);
    // The same leaf and element counts, other leaves: only the rank with the shorter leaf failed its
    // broadcast (MPI_ERR_TRUNCATE), and a transposed leaf passed. Every rank must refuse both.
    const bool root = comm.rank() == 0;
    Grads swapped = make_grads(0, root ? 4 : 2, 1, root ? 2 : 4);
    try {
      xax::distributed::broadcast_tree(comm, swapped);
      ADD_FAILURE() << "leaves of other shapes were broadcast";
    } catch (const xax::ShapeError& error) {
      EXPECT_NE(std::string(error.what()).find("differ in shape or scalar type"), std::string::npos)
          << error.what();
    }
    Grads transposed = make_grads(0, root ? 2 : 3, root ? 3 : 2);
    EXPECT_THROW(xax::distributed::broadcast_tree(comm, transposed), xax::ShapeError);
  }
}

}  // namespace
