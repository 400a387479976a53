// xax/distributed/zero.hpp: ZeRO stage 1. The optimizer state (and, under the mixed policy, the fp32 masters)
// is sharded over the ranks, and the masters stay bit-identical to the unsharded (stage 0) run at the same
// world size and to one process, skipped steps included; checkpoints resume bit-identically on the same world
// size and re-shard onto another.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <unistd.h>
#include <array>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <span>
#include <string>
#include <vector>
#include <xax/distributed/data_parallel.hpp>
#include <xax/distributed/shard_sampler.hpp>
#include <xax/distributed/zero.hpp>

#include "train_test_task.hpp"

namespace {

using xax::distributed::Communicator;
using xax::distributed::ReducerOptions;
using xax_test::Batch;
using xax_test::flat;
using xax_test::Net;
using xax_test::same_bits;
using MixedPolicy = xax::Policy<float, xax::bfloat16, float>;

xax_test::TaskConfig task_config() {
  xax_test::TaskConfig config = xax_test::default_config();
  config.enable_mixed_precision = true;
  config.precision_policy = "mixed";
  config.loss_scaling = "dynamic";
  config.batch_size = 16;
  config.accumulation_steps = 4;
  config.epochs = 2;
  config.seed = 5;
  // 3904 parameters: w1 (2400) spans three blocks of 1024, so at 2 and 4 ranks leaves straddle shards.
  config.hidden = 300;
  return config;
}

constexpr std::int64_t examples = 512;
constexpr xax::distributed::ShardSamplerOptions sampling{
    .examples = examples, .global_batch = 64, .micro_shards = 4, .seed = 3};
const xax::optim::AdamWOptions adamw{.learning_rate = 1e-2, .weight_decay = 0.05};

struct Model {
  template <class T>
  using params_type = Net<T>;
  using batch_type = Batch;
  xax_test::ClassifierTask task{task_config(), xax_test::make_data(examples)};
  template <class T>
  double loss_and_grads(const Net<T>& p, const Batch& b, float scale, Net<T>& g) {
    return task.loss_and_grads(p, b, scale, g);
  }
};

// One process, plain AdamW: the reference.
class SingleTrainer : public Model, public xax::TrainStep<SingleTrainer, MixedPolicy> {
 public:
  explicit SingleTrainer(const xax::OptimizerOptions& optimizer = adamw) {
    reset_train_state(task.init_params(), optimizer, xax::DynamicLossScale{});
  }
  using TrainStep::load_train_state;
};

// A data-parallel trainer at ZeRO stage 0 or 1, on `comm`.
class ParallelTrainer : public Model,
                        public xax::TrainStep<ParallelTrainer, MixedPolicy>,
                        public xax::distributed::DataParallelMixin<ParallelTrainer> {
 public:
  explicit ParallelTrainer(int zero_stage, Communicator comm = Communicator{},
                           const xax::OptimizerOptions& optimizer = adamw, ReducerOptions reducer = {},
                           double max_grad_norm = 0)
      : DataParallelMixin(reducer, zero_stage, std::move(comm)) {
    auto initial = task.init_params();
    synchronize_initial_params(initial);
    reset_train_state(initial, [&](const Net<float>& like) { return sharded_optimizer(like, optimizer); },
                      xax::DynamicLossScale{}, {.max_grad_norm = max_grad_norm});
  }
};

// Trains global steps [from, to) (8 per epoch), on `rank` of `world`.
template <class Trainer>
std::vector<xax::StepResult> train(Trainer& trainer, int rank, int world, std::int64_t from,
                                   std::int64_t to) {
  xax::distributed::ShardSampler sampler(sampling, rank, world);
  std::vector<xax::StepResult> results;
  for (std::int64_t step = from; step < to; ++step) {
    const std::int64_t epoch = step / sampler.steps_per_epoch();
    std::vector<Batch> batches;
    for (const auto indices : sampler.rank_shards(epoch, step % sampler.steps_per_epoch()))
      batches.push_back(trainer.task.make_batch(indices));
    results.push_back(trainer.train_step(std::span<const Batch>(batches)));
  }
  return results;
}

// A scratch file name every rank of `comm` agrees on.
std::filesystem::path shared_path(const Communicator& comm, const std::string& what) {
  std::int64_t pid = ::getpid();
  comm.broadcast(&pid, 1, 0);
  return std::filesystem::temp_directory_path() / ("xax_zero_" + what + "_" + std::to_string(pid) + ".ckpt");
}

// Every rank gathers, rank 0 writes.
template <class Trainer>
void save(Trainer& trainer, const std::filesystem::path& path) {
  trainer.prepare_checkpoint();
  if (trainer.rank() == 0) {
    xax::CheckpointWriter writer;
    trainer.save_train_state(writer);
    writer.write(path);
  }
  trainer.communicator().barrier();
}

TEST(ZeroShardLayout, ShardsAreNearEqualRunsOfWholeBlocks) {
  const xax::distributed::ZeroShardLayout layout({2400, 300, 1200, 4}, 4);
  EXPECT_EQ(layout.elements(), 3904u);
  // Block starts: 0 1024 2048 | 2400 | 2700 3724 | 3900; targets 976, 1952, 2928.
  EXPECT_EQ(layout.shard_begin(1), 1024u);
  EXPECT_EQ(layout.shard_begin(2), 2048u);
  EXPECT_EQ(layout.shard_begin(3), 2700u);
  EXPECT_EQ(layout.shard_end(3), 3904u);
  const auto pieces = layout.segments(2);  // the end of w1 and all of b1
  ASSERT_EQ(pieces.size(), 2u);
  EXPECT_EQ(pieces[0].leaf, 0u);
  EXPECT_EQ(pieces[0].begin, 2048u);
  EXPECT_EQ(pieces[0].count, 352u);
  EXPECT_EQ(pieces[1].leaf, 1u);
  EXPECT_EQ(pieces[1].shard_offset, 352u);
  // A shard the layout does not have is a ConfigError naming the ones it has (it was std::out_of_range).
  EXPECT_THAT([&] { static_cast<void>(layout.shard_size(4)); },
              ::testing::ThrowsMessage<xax::ConfigError>(
                  ::testing::HasSubstr("shard 4 is not accepted; this layout has shards 0 to 3")));
  EXPECT_THROW(static_cast<void>(layout.shard_begin(-1)), xax::ConfigError);
  EXPECT_THROW(static_cast<void>(layout.segments(7)), xax::ConfigError);
  // More ranks than blocks: some shards are empty, none overlap.
  const xax::distributed::ZeroShardLayout tiny({10, 3}, 4);
  std::size_t covered = 0;
  for (int q = 0; q < 4; ++q) covered += tiny.shard_size(q);
  EXPECT_EQ(covered, 13u);
  EXPECT_THROW(xax::distributed::ZeroShardLayout({10}, 0), xax::ConfigError);
}

TEST(ZeroOne, MastersAreBitIdenticalToStageZeroAndToOneProcessWithASkippedStep) {
  ParallelTrainer stage0(0);
  ParallelTrainer stage1(1);
  const int world = stage1.world_size();
  // Only the last rank's third micro-batch gradient overflows: step 2 / (4 / world) is skipped everywhere.
  if (stage1.rank() == world - 1) {
    stage0.task.inject_at_call = 2;
    stage1.task.inject_at_call = 2;
  }
  const auto results0 = train(stage0, stage0.rank(), world, 0, 16);
  const auto results1 = train(stage1, stage1.rank(), world, 0, 16);
  EXPECT_EQ(stage1.skipped_steps(), 1);
  EXPECT_TRUE(same_bits(flat(stage1.gather_params()), flat(stage0.gather_params())))
      << "world size " << world << ": ZeRO-1 masters differ from stage 0's";
  ASSERT_EQ(results1.size(), results0.size());
  for (std::size_t i = 0; i < results0.size(); ++i) {
    EXPECT_EQ(results1[i].finite, results0[i].finite) << "step " << i;
    EXPECT_EQ(results1[i].loss, results0[i].loss) << "step " << i;
    EXPECT_EQ(results1[i].grad_norm, results0[i].grad_norm) << "step " << i;
    EXPECT_EQ(results1[i].loss_scale, results0[i].loss_scale) << "step " << i;
  }

  // Stage 1 reduce-scatters the gradients: it sends no all-gather of them.
  if (world > 1) {
    EXPECT_LT(stage1.reduction_stats().wire_bytes_last, stage0.reduction_stats().wire_bytes_last);
  }

  // Without the overflow, ZeRO-1 at any world size equals one process running plain AdamW.
  ParallelTrainer clean(1);
  train(clean, clean.rank(), world, 0, 16);
  SingleTrainer single;
  const auto single_results = train(single, 0, 1, 0, 16);
  EXPECT_TRUE(same_bits(flat(clean.gather_params()), flat(single.gather_params())))
      << "world size " << world << ": ZeRO-1 masters differ from one process's";
  EXPECT_LT(single_results.back().loss, single_results.front().loss);
}

// Leaves whose sizes are not a multiple of the vector width put the next leaf's piece of a shard at an
// unaligned offset of the shard's flat arrays. Eigen runs the elements before the first aligned one as
// scalars, whose square root differed in the last bit from the vector one: sharded masters then drifted from
// stage 0 (and from one process) in a few elements of every such leaf.
template <class T>
struct OddNet {
  Eigen::Matrix<T, Eigen::Dynamic, 1> bias;    // 3 elements: the next leaf starts at offset 3
  Eigen::Matrix<T, Eigen::Dynamic, 1> weight;  // 67: and the one after at 70
  Eigen::Matrix<T, Eigen::Dynamic, 1> more;    // 2000
  XAX_FIELDS(bias, weight, more);
};

struct OddBatch {
  int id = 0;
};

class OddLeavesTrainer : public xax::TrainStep<OddLeavesTrainer, MixedPolicy>,
                         public xax::distributed::DataParallelMixin<OddLeavesTrainer> {
 public:
  template <class T>
  using params_type = OddNet<T>;
  using batch_type = OddBatch;
  explicit OddLeavesTrainer(int zero_stage) : DataParallelMixin(ReducerOptions{}, zero_stage) {
    OddNet<float> initial{Eigen::VectorXf::LinSpaced(3, -0.01f, 0.01f),
                          Eigen::VectorXf::LinSpaced(67, -0.01f, 0.01f),
                          Eigen::VectorXf::LinSpaced(2000, -0.01f, 0.01f)};
    synchronize_initial_params(initial);
    reset_train_state(
        initial, [&](const OddNet<float>& like) { return sharded_optimizer(like, adamw); },
        xax::DynamicLossScale{});
  }
  template <class T>
  double loss_and_grads(const OddNet<T>& p, const OddBatch& batch, float scale, OddNet<T>& g) {
    double loss = 0;
    const auto leaf = [&](const auto& values, auto& grads) {
      grads.resize(values.size());
      for (Eigen::Index i = 0; i < values.size(); ++i) {
        const float d = static_cast<float>(values[i]) - 0.001f * static_cast<float>((batch.id * 7 + i) % 5);
        loss += 0.5 * d * d;
        grads[i] = T(d * scale);
      }
    };
    leaf(p.bias, g.bias);
    leaf(p.weight, g.weight);
    leaf(p.more, g.more);
    return loss;
  }
};

TEST(ZeroOneShardedMasters, LeavesAtUnalignedShardOffsetsAreUpdatedBitIdenticallyToStageZero) {
  OddLeavesTrainer stage0(0), stage1(1);
  const int world = stage0.world_size(), rank = stage0.rank();
  for (int step = 0; step < 20; ++step) {
    std::vector<OddBatch> mine;
    for (int m = rank * 4 / world; m < (rank + 1) * 4 / world; ++m) mine.push_back({step * 4 + m});
    stage0.train_step(std::span<const OddBatch>(mine));
    stage1.train_step(std::span<const OddBatch>(mine));
  }
  const OddNet<float> whole = stage0.gather_params(), sharded = stage1.gather_params();
  const auto bits = [](const Eigen::VectorXf& v) {
    return std::vector<float>(v.data(), v.data() + v.size());
  };
  EXPECT_TRUE(same_bits(bits(whole.bias), bits(sharded.bias)));
  EXPECT_TRUE(same_bits(bits(whole.weight), bits(sharded.weight)));
  EXPECT_TRUE(same_bits(bits(whole.more), bits(sharded.more)));
}

TEST(ZeroOne, ClippedBfloat16WireRunIsBitIdenticalToStageZero) {
  // Clipping makes every update depend on the global norm, which the shards combine.
  const ReducerOptions bf16_wire{.wire = xax::DType::bfloat16, .deterministic = true};
  ParallelTrainer stage0(0, Communicator{}, adamw, bf16_wire, 1e-5);
  ParallelTrainer stage1(1, Communicator{}, adamw, bf16_wire, 1e-5);
  const auto results0 = train(stage0, stage0.rank(), stage0.world_size(), 0, 10);
  const auto results1 = train(stage1, stage1.rank(), stage1.world_size(), 0, 10);
  EXPECT_TRUE(same_bits(flat(stage1.gather_params()), flat(stage0.gather_params())));
  for (std::size_t i = 0; i < results0.size(); ++i) {
    EXPECT_GT(results0[i].grad_norm, 1e-5) << "step " << i << " was not clipped";
    EXPECT_EQ(results1[i].grad_norm, results0[i].grad_norm) << "step " << i;
  }
}

TEST(ZeroOne, BucketedReduceScatterIsBitIdenticalToOneProcess) {
  // Buckets of 100 elements cut the 3904 gradient elements across the shards' bounds and the leaves'.
  for (const std::size_t bucket : {std::size_t{1}, std::size_t{100}, std::size_t{1000}}) {
    ParallelTrainer sharded(
        1, Communicator{}, adamw,
        ReducerOptions{.wire = xax::DType::float32, .deterministic = true, .bucket_size = bucket});
    train(sharded, sharded.rank(), sharded.world_size(), 0, 6);
    SingleTrainer single;
    train(single, 0, 1, 0, 6);
    EXPECT_TRUE(same_bits(flat(sharded.gather_params()), flat(single.gather_params())))
        << "bucket " << bucket << ", world size " << sharded.world_size();
    EXPECT_EQ(sharded.reduction_stats().buckets_last, (3904 + bucket - 1) / bucket);
  }
}

TEST(ZeroOne, SgdWithMomentumIsBitIdenticalToOneProcess) {
  const xax::optim::SgdOptions sgd{
      .learning_rate = 0.05, .momentum = 0.9, .weight_decay = 1e-3, .nesterov = true};
  ParallelTrainer sharded(1, Communicator{}, sgd);
  train(sharded, sharded.rank(), sharded.world_size(), 0, 10);
  SingleTrainer single(sgd);
  train(single, 0, 1, 0, 10);
  EXPECT_TRUE(same_bits(flat(sharded.gather_params()), flat(single.gather_params())));
}

TEST(ZeroOne, OptimizerStateBytesPerRankAreTheRanksShare) {
  ParallelTrainer stage0(0);
  ParallelTrainer stage1(1);
  const auto world = static_cast<std::size_t>(stage1.world_size());
  constexpr std::size_t parameters = 3904;
  // Stage 0: m and v of every parameter and the step count, on every rank.
  EXPECT_EQ(stage0.state_bytes().optimizer, 8 * parameters + 8);
  const std::size_t mine = stage1.state_bytes().optimizer;
  EXPECT_LE(mine, 8 * (parameters / world + xax::detail::norm_block) + 8);
  const auto mine64 = static_cast<std::int64_t>(mine);
  std::int64_t total = 0;
  stage1.communicator().all_reduce(&mine64, &total, 1, MPI_SUM);
  EXPECT_EQ(static_cast<std::size_t>(total), 8 * parameters + 8 * world);  // the shards partition m and v
}

TEST(ZeroOne, CheckpointResumesBitIdenticallyOnTheSameWorldSize) {
  ParallelTrainer uninterrupted(1);
  train(uninterrupted, uninterrupted.rank(), uninterrupted.world_size(), 0, 5);
  const auto path = shared_path(uninterrupted.communicator(), "same");
  save(uninterrupted, path);
  train(uninterrupted, uninterrupted.rank(), uninterrupted.world_size(), 5, 12);

  ParallelTrainer resumed(1);
  resumed.load_train_state(xax::CheckpointReader(path));
  EXPECT_EQ(resumed.train_step_calls(), 5);
  train(resumed, resumed.rank(), resumed.world_size(), 5, 12);
  EXPECT_TRUE(same_bits(flat(resumed.gather_params()), flat(uninterrupted.gather_params())));
  EXPECT_EQ(resumed.current_loss_scale(), uninterrupted.current_loss_scale());

  // The file is a stage-0 checkpoint: one process with plain AdamW resumes from it identically too.
  SingleTrainer single;
  single.load_train_state(xax::CheckpointReader(path));
  train(single, 0, 1, 5, 12);
  EXPECT_TRUE(same_bits(flat(single.gather_params()), flat(uninterrupted.gather_params())));
  resumed.communicator().barrier();
  if (resumed.rank() == 0) std::filesystem::remove(path);
}

TEST(ZeroOne, CheckpointReshardsOntoAnotherWorldSize) {
  // The reference: one process, uninterrupted, plain AdamW.
  SingleTrainer reference;
  train(reference, 0, 1, 0, 12);

  const Communicator world_comm;
  const int world = world_comm.size();
  const int half = world > 1 ? world / 2 : 1;
  const auto grown_path = shared_path(world_comm, "grown");
  const auto shrunk_path = shared_path(world_comm, "shrunk");
  // Ranks [0, half) form a smaller world.
  MPI_Comm small = MPI_COMM_NULL;
  MPI_Comm_split(world_comm.native(), world_comm.rank() < half ? 0 : MPI_UNDEFINED, 0, &small);

  // Written by `half` ranks after 5 steps, resumed by all `world` ranks.
  if (small != MPI_COMM_NULL) {
    ParallelTrainer writer(1, Communicator::duplicate(small));
    EXPECT_EQ(writer.world_size(), half);
    train(writer, writer.rank(), writer.world_size(), 0, 5);
    save(writer, grown_path);
  }
  world_comm.barrier();
  {
    ParallelTrainer grown(1);
    grown.load_train_state(xax::CheckpointReader(grown_path));
    train(grown, grown.rank(), grown.world_size(), 5, 12);
    EXPECT_TRUE(same_bits(flat(grown.gather_params()), flat(reference.gather_params())))
        << half << " ranks -> " << world << " ranks";

    // And back: written by all ranks after 7 steps, resumed by `half` of them.
    ParallelTrainer full(1);
    train(full, full.rank(), full.world_size(), 0, 7);
    save(full, shrunk_path);
  }
  if (small != MPI_COMM_NULL) {
    ParallelTrainer shrunk(1, Communicator::duplicate(small));
    shrunk.load_train_state(xax::CheckpointReader(shrunk_path));
    train(shrunk, shrunk.rank(), shrunk.world_size(), 7, 12);
    EXPECT_TRUE(same_bits(flat(shrunk.gather_params()), flat(reference.gather_params())))
        << world << " ranks -> " << half << " ranks";
    MPI_Comm_free(&small);
  }
  world_comm.barrier();
  if (world_comm.rank() == 0) {
    std::filesystem::remove(grown_path);
    std::filesystem::remove(shrunk_path);
  }
}

TEST(ZeroOne, AFailedLoadLeavesTheStateAndItsShardsAsTheyWere) {
  ParallelTrainer trainer(1);
  ParallelTrainer untouched(1);
  train(trainer, trainer.rank(), trainer.world_size(), 0, 3);
  train(untouched, untouched.rank(), untouched.world_size(), 0, 3);
  // A checkpoint whose optimizer state fits but whose loss scale is of an unknown kind: TrainStep reads the
  // optimizer's (a copy's) state first, then refuses the file.
  xax::CheckpointWriter writer;
  writer.add_string("train.policy", MixedPolicy::spec().str());
  writer.add_string("train.optimizer", "adamw");
  writer.add_tree("train.params", trainer.gather_params());
  const Net<float> like = trainer.gather_params();
  writer.add_tree("train.optimizer_state",
                  xax::optim::AdamWState<Net<float>>{7, xax::zeros_like(like), xax::zeros_like(like)});
  writer.add_string("train.loss_scale_kind", "no such kind");
  writer.add_tree("train.loss_scale", std::array<float, 1>{1.0f});
  writer.add_tree("train.counters", std::array<std::int64_t, 3>{7, 0, 0});
  const auto path = shared_path(trainer.communicator(), "bad");
  if (trainer.rank() == 0) writer.write(path);
  trainer.communicator().barrier();
  EXPECT_THROW(trainer.load_train_state(xax::CheckpointReader(path)), xax::CheckpointError);
  train(trainer, trainer.rank(), trainer.world_size(), 3, 6);
  train(untouched, untouched.rank(), untouched.world_size(), 3, 6);
  EXPECT_TRUE(same_bits(flat(trainer.gather_params()), flat(untouched.gather_params())));
  trainer.communicator().barrier();
  if (trainer.rank() == 0) std::filesystem::remove(path);
}

// ZeRO-1 with sharded masters: under the mixed policy (fp32 masters, bf16 compute) the optimizer owns this
// rank's shard of the masters and the train step holds none of its own.
TEST(ZeroOneShardedMasters, ParamsIsAClearErrorAndGatherParamsIsTheWholeMasters) {
  ParallelTrainer stage1(1);
  ParallelTrainer stage0(0);
  EXPECT_TRUE(stage1.optimizer_owns_masters());
  EXPECT_TRUE(stage1.masters_sharded());
  EXPECT_FALSE(stage0.optimizer_owns_masters());
  EXPECT_FALSE(stage0.masters_sharded());
  train(stage1, stage1.rank(), stage1.world_size(), 0, 4);
  train(stage0, stage0.rank(), stage0.world_size(), 0, 4);
  try {
    static_cast<void>(stage1.params());
    ADD_FAILURE() << "params() under sharded masters did not throw";
  } catch (const xax::Error& error) {
    EXPECT_NE(std::string(error.what()).find("gather_params()"), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("sharded"), std::string::npos) << error.what();
  }
  EXPECT_NO_THROW(static_cast<void>(stage0.params()));
  const Net<float> whole = stage1.gather_params();
  EXPECT_TRUE(same_bits(flat(whole), flat(stage0.params())));
  // Every rank's compute copy is the whole masters rounded to bf16, element by element.
  const Net<xax::bfloat16> rounded = xax::tree_cast<xax::bfloat16>(whole);
  stage1.with_compute_params([&](const Net<xax::bfloat16>& compute) {
    // bf16 -> fp32 is exact, so comparing the widened trees compares the bf16 bits.
    EXPECT_TRUE(same_bits(flat(xax::tree_cast<float>(compute)), flat(xax::tree_cast<float>(rounded))));
  });
}

TEST(ZeroOneShardedMasters, BytesPerRankFollowTheFormula) {
  // Mixed bf16 + AdamW: 4N masters + 2N compute + 8N optimizer state per rank at stage 0; 4N/W + 2N + 8N/W
  // (each to the rank's shard, whole blocks) under ZeRO-1 with sharded masters.
  ParallelTrainer stage0(0);
  ParallelTrainer stage1(1);
  const int world = stage1.world_size();
  constexpr std::size_t parameters = 3904;
  const xax::distributed::ZeroShardLayout layout({2400, 300, 1200, 4}, world);
  const std::size_t shard = layout.shard_size(stage1.rank());
  const xax::TrainStateBytes bytes0 = stage0.state_bytes();
  const xax::TrainStateBytes bytes1 = stage1.state_bytes();
  EXPECT_EQ(bytes0.params, 4 * parameters);
  EXPECT_EQ(bytes1.params, 4 * shard);
  EXPECT_EQ(bytes0.compute_params, 2 * parameters);
  EXPECT_EQ(bytes1.compute_params, 2 * parameters);
  EXPECT_EQ(bytes1.optimizer, 8 * shard + 8);
  EXPECT_EQ(bytes1.params + bytes1.compute_params + bytes1.optimizer,
            4 * shard + 2 * parameters + 8 * shard + 8);
  const auto mine = static_cast<std::int64_t>(bytes1.params);
  std::int64_t total = 0;
  stage1.communicator().all_reduce(&mine, &total, 1, MPI_SUM);
  EXPECT_EQ(static_cast<std::size_t>(total), 4 * parameters);  // the shards partition the masters

  // The all-gather after a step carries the compute copy: bf16, 2 bytes per element of the rank's shard to
  // each other rank, half of what the fp32 masters' all-gather sent.
  EXPECT_EQ(stage1.master_gather_bytes_per_step(), 0u);  // no step yet
  train(stage1, stage1.rank(), world, 0, 1);
  EXPECT_EQ(stage1.master_gather_bytes_per_step(), 2 * shard * static_cast<std::size_t>(world - 1));
  EXPECT_EQ(stage0.master_gather_bytes_per_step(), 0u);
}

// fp32 policy: the masters are the compute params, so sharding them would be ZeRO-3; ZeRO-1 keeps them whole
// (optimizer state sharded, the fp32 masters all-gathered), as before.
class Float32Trainer : public Model,
                       public xax::TrainStep<Float32Trainer, xax::Policy<float, float, float>>,
                       public xax::distributed::DataParallelMixin<Float32Trainer> {
 public:
  explicit Float32Trainer(int zero_stage) : DataParallelMixin(ReducerOptions{}, zero_stage) {
    auto initial = task.init_params();
    synchronize_initial_params(initial);
    reset_train_state(
        initial, [&](const Net<float>& like) { return sharded_optimizer(like, adamw); },
        xax::DynamicLossScale{});
  }
};

TEST(ZeroOneShardedMasters, Float32PolicyKeepsTheMastersWholeAndBitIdentical) {
  Float32Trainer stage0(0);
  Float32Trainer stage1(1);
  EXPECT_FALSE(stage1.optimizer_owns_masters());
  EXPECT_FALSE(stage1.masters_sharded());
  train(stage0, stage0.rank(), stage0.world_size(), 0, 6);
  train(stage1, stage1.rank(), stage1.world_size(), 0, 6);
  EXPECT_TRUE(same_bits(flat(stage1.params()), flat(stage0.params())));
  EXPECT_EQ(stage1.state_bytes().params, 4 * 3904u);
  const auto world = static_cast<std::size_t>(stage1.world_size());
  const xax::distributed::ZeroShardLayout layout({2400, 300, 1200, 4}, stage1.world_size());
  EXPECT_EQ(stage1.master_gather_bytes_per_step(), 4 * layout.shard_size(stage1.rank()) * (world - 1));
}

// The float16 preset: half-precision masters, updated in place by the optimizer (step_half_masters), with
// no fp32 copy of them. Under ZeRO-1 each rank updates its shard and the masters are all-gathered in float16
// (and the Kahan compensation with them).
using Float16Policy = xax::Policy<xax::float16, xax::float16, xax::float16>;

class Float16Single : public Model, public xax::TrainStep<Float16Single, Float16Policy> {
 public:
  explicit Float16Single(xax::optim::MasterRounding rounding) {
    reset_train_state(task.init_params(), adamw, xax::DynamicLossScale{},
                      {.master_rounding = rounding, .rounding_seed = 11});
  }
  using TrainStep::load_train_state;
};

class Float16Parallel : public Model,
                        public xax::TrainStep<Float16Parallel, Float16Policy>,
                        public xax::distributed::DataParallelMixin<Float16Parallel> {
 public:
  Float16Parallel(int zero_stage, xax::optim::MasterRounding rounding)
      : DataParallelMixin(ReducerOptions{}, zero_stage) {
    auto initial = task.init_params();
    synchronize_initial_params(initial);
    reset_train_state(initial, [&](const Net<float>& like) { return sharded_optimizer(like, adamw); },
                      xax::DynamicLossScale{}, {.master_rounding = rounding, .rounding_seed = 11});
  }
};

TEST(ZeroOneHalfMasters, Float16MastersAreUpdatedInPlaceBitIdenticallyAndGatheredInFloat16) {
  using xax::optim::MasterRounding;
  // float16 -> float is exact, so equal floats are equal float16 masters.
  const auto masters = [](const auto& trainer) { return flat(xax::tree_cast<float>(trainer.params())); };
  for (const MasterRounding rounding :
       {MasterRounding::round_to_nearest, MasterRounding::stochastic_rounding, MasterRounding::kahan}) {
    SCOPED_TRACE("master_rounding " + std::to_string(static_cast<int>(rounding)));
    Float16Parallel stage0(0, rounding);
    Float16Parallel stage1(1, rounding);
    Float16Single single(rounding);
    const int world = stage1.world_size();
    train(stage0, stage0.rank(), world, 0, 8);
    train(stage1, stage1.rank(), world, 0, 5);
    train(single, 0, 1, 0, 8);
    // Every rank holds the whole masters, so a checkpoint from rank 0 resumes on one process.
    const auto path = shared_path(stage1.communicator(), "float16");
    save(stage1, path);
    train(stage1, stage1.rank(), world, 5, 8);
    EXPECT_TRUE(same_bits(masters(stage1), masters(stage0))) << "world size " << world;
    EXPECT_TRUE(same_bits(masters(stage1), masters(single))) << "world size " << world;
    Float16Single resumed(rounding);
    resumed.load_train_state(xax::CheckpointReader(path));
    train(resumed, 0, 1, 5, 8);
    EXPECT_TRUE(same_bits(masters(resumed), masters(single)))
        << "the checkpoint holds every rank's masters (and compensation) at world size " << world;
    // No fp32 copy of the masters (TrainStep's `work`, counted with the gradients), as at stage 0.
    EXPECT_EQ(stage1.state_bytes().grads, stage0.state_bytes().grads);
    const xax::distributed::ZeroShardLayout layout({2400, 300, 1200, 4}, world);
    const std::size_t per_tree = 2 * layout.shard_size(stage1.rank()) * static_cast<std::size_t>(world - 1);
    EXPECT_EQ(stage1.master_gather_bytes_per_step(),
              rounding == MasterRounding::kahan ? 2 * per_tree : per_tree);
    stage1.communicator().barrier();
    if (stage1.rank() == 0) std::filesystem::remove(path);
  }
}

TEST(ZeroOneShardedMasters, StageZeroCheckpointResumesUnderShardedMastersAndBack) {
  SingleTrainer reference;
  train(reference, 0, 1, 0, 10);
  const Communicator comm;
  const auto to_sharded = shared_path(comm, "to_sharded");
  const auto to_whole = shared_path(comm, "to_whole");
  {
    ParallelTrainer stage0(0);
    train(stage0, stage0.rank(), stage0.world_size(), 0, 4);
    save(stage0, to_sharded);
  }
  ParallelTrainer sharded(1);
  sharded.load_train_state(xax::CheckpointReader(to_sharded));
  sharded.verify_loaded_state();
  EXPECT_TRUE(sharded.optimizer_owns_masters());
  EXPECT_EQ(sharded.state_bytes().params,
            4 * xax::distributed::ZeroShardLayout({2400, 300, 1200, 4}, sharded.world_size())
                    .shard_size(sharded.rank()));
  train(sharded, sharded.rank(), sharded.world_size(), 4, 7);
  save(sharded, to_whole);
  ParallelTrainer whole(0);
  whole.load_train_state(xax::CheckpointReader(to_whole));
  whole.verify_loaded_state();
  train(whole, whole.rank(), whole.world_size(), 7, 10);
  EXPECT_TRUE(same_bits(flat(whole.params()), flat(reference.params())));
  // The file the sharded run wrote holds the whole masters, readable by a single process.
  const xax::CheckpointReader file(to_whole);
  Net<float> saved = reference.params();
  file.read_tree("train.params", saved);
  SingleTrainer single;
  single.load_train_state(file);
  EXPECT_TRUE(same_bits(flat(saved), flat(single.params())));
  comm.barrier();
  if (comm.rank() == 0) {
    std::filesystem::remove(to_sharded);
    std::filesystem::remove(to_whole);
  }
}

// With more than one rank: the last rank loads `second`, the others `first`, and the replica check after the
// load must throw on every rank, naming the last rank and `what` differs.
void expect_the_replica_check_names_the_last_rank(int zero_stage, const std::filesystem::path& first,
                                                  const std::filesystem::path& second, const char* what) {
  ParallelTrainer resumed(zero_stage);
  if (resumed.world_size() == 1) return;
  const bool odd_one = resumed.rank() == resumed.world_size() - 1;
  resumed.load_train_state(xax::CheckpointReader(odd_one ? second : first));
  try {
    resumed.verify_loaded_state();
    ADD_FAILURE() << "ranks that read different checkpoints passed the replica check";
  } catch (const xax::distributed::ReplicaMismatchError& error) {
    EXPECT_EQ(error.differing_ranks(), std::vector<int>{resumed.world_size() - 1}) << error.what();
    EXPECT_THAT(error.what(), ::testing::HasSubstr(what));
  }
}

// Two checkpoints with the same masters but another loss scale (as on either side of a skipped step): ranks
// that read different ones passed the check, then summed gradients scaled differently and drifted apart.
TEST(DataParallelLoad, ReplicaCheckAfterLoadComparesTheLossScaleAndStepCountsToo) {
  for (const int zero_stage : {0, 1}) {
    SCOPED_TRACE("zero_stage " + std::to_string(zero_stage));
    ParallelTrainer trainer(zero_stage);
    const Communicator& comm = trainer.communicator();
    const auto first = shared_path(comm, "scale_first");
    const auto second = shared_path(comm, "scale_second");
    train(trainer, trainer.rank(), trainer.world_size(), 0, 1);
    save(trainer, first);
    trainer.set_loss_scale(1024);
    save(trainer, second);
    expect_the_replica_check_names_the_last_rank(zero_stage, first, second,
                                                 "loss scale, step counts and loop position");
    ParallelTrainer same(zero_stage);
    same.load_train_state(xax::CheckpointReader(second));
    EXPECT_NO_THROW(same.verify_loaded_state());
    comm.barrier();
    if (comm.rank() == 0) {
      std::filesystem::remove(first);
      std::filesystem::remove(second);
    }
  }
}

TEST(ZeroOneShardedMasters, ReplicaCheckAfterLoadComparesTheWholeMastersEachRankRead) {
  ParallelTrainer trainer(1);
  const Communicator& comm = trainer.communicator();
  const auto first = shared_path(comm, "first");
  const auto second = shared_path(comm, "second");
  train(trainer, trainer.rank(), trainer.world_size(), 0, 2);
  save(trainer, first);
  // As many steps on other batches: the same loss scale and counts (which the check compares first), other
  // masters.
  ParallelTrainer other(1);
  train(other, other.rank(), other.world_size(), 2, 4);
  save(other, second);

  ParallelTrainer same(1);
  same.load_train_state(xax::CheckpointReader(first));
  EXPECT_NO_THROW(same.verify_loaded_state());
  // The last rank reads another file: its shard alone would not show it, the digest of what it read does.
  expect_the_replica_check_names_the_last_rank(1, first, second, "masters after a checkpoint load");
  comm.barrier();
  if (comm.rank() == 0) {
    std::filesystem::remove(first);
    std::filesystem::remove(second);
  }
}

// The mixin face: TrainMixin + MixedPrecisionMixin + DataParallelMixin, with the one-line make_optimizer.
struct ParallelConfig : xax_test::TaskConfig, xax::distributed::DataParallelConfig {};

class ParallelTask : public xax::TrainMixin<ParallelTask, ParallelConfig>,
                     public xax::MixedPrecisionMixin<ParallelTask, ParallelConfig>,
                     public xax::distributed::DataParallelMixin<ParallelTask> {
 public:
  using compiled_policies = xax_test::MixedOnAnyCpu;  // its config runs "mixed" alone
  template <class T>
  using params_type = Net<T>;
  using batch_type = Batch;
  explicit ParallelTask(const ParallelConfig& config, std::int64_t task_examples = examples)
      : TrainMixin(config),
        DataParallelMixin(static_cast<const xax::distributed::DataParallelConfig&>(config)),
        inner_(config, xax_test::make_data(task_examples)) {}
  Net<float> init_params() const { return inner_.init_params(); }
  auto make_optimizer(const Net<float>& like) const {
    return sharded_optimizer(like, config().optimizer_options());
  }
  std::int64_t num_examples() const { return inner_.num_examples(); }
  Batch make_batch(std::span<const std::int64_t> indices) const { return inner_.make_batch(indices); }
  template <class T>
  double loss_and_grads(const Net<T>& p, const Batch& b, float scale, Net<T>& g) {
    return inner_.loss_and_grads(p, b, scale, g);
  }

 private:
  xax_test::ClassifierTask inner_;
};

ParallelConfig parallel_config(int zero_stage) {
  ParallelConfig config;
  static_cast<xax_test::TaskConfig&>(config) = task_config();
  config.weight_decay = 0.01;
  config.zero_stage = zero_stage;
  return config;
}

// Ranks that see data sets of different sizes (each loading its own file) would take different numbers of
// steps: the one with fewer returned from fit while the others waited in a collective for ever. fit refuses
// on every rank before the first step, naming what differs.
TEST(ZeroOneMixin, FitRefusesRanksThatDisagreeOnTheirData) {
  int world = 1, rank = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (world < 2) GTEST_SKIP() << "needs two ranks";
  ParallelTask task(parallel_config(0), rank == world - 1 ? examples - 64 : examples);
  EXPECT_THAT([&] { task.fit(); },
              ::testing::ThrowsMessage<xax::ConfigError>(::testing::HasSubstr(
                  "processes disagree on num_examples() (from " + std::to_string(examples - 64) + " to " +
                  std::to_string(examples) + ")")));
  EXPECT_EQ(task.fit_steps(), 0);
}

TEST(ZeroOneMixin, FitWithCheckpointsIsBitIdenticalToOneProcessAndResumes) {
  xax_test::TaskConfig single_config = task_config();
  single_config.weight_decay = 0.01;
  xax_test::ClassifierTask single(single_config, xax_test::make_data(examples));
  single.fit();

  const Communicator comm;
  ParallelConfig config = parallel_config(1);
  config.checkpoint_interval = 5;  // fit gathers the shards on every rank; rank 0 writes
  config.checkpoint_path = shared_path(comm, "fit").string();
  ParallelTask sharded(config);
  sharded.fit();
  EXPECT_TRUE(same_bits(flat(sharded.params_float32()), flat(single.params_float32())));
  const std::size_t parameters = 3904;
  EXPECT_LE(sharded.train_state_bytes().optimizer,
            8 * (parameters / static_cast<std::size_t>(sharded.world_size()) + xax::detail::norm_block) + 8);
  // The mixed policy's fp32 masters are sharded too: this rank holds its shard of them.
  EXPECT_EQ(sharded.train_state_bytes().params,
            4 * xax::distributed::ZeroShardLayout({2400, 300, 1200, 4}, sharded.world_size())
                    .shard_size(sharded.rank()));

  // The last checkpoint (step 15 of 16) resumes to the same end.
  ParallelTask resumed(parallel_config(1));
  resumed.load_checkpoint(config.checkpoint_path);
  EXPECT_EQ(resumed.fit_steps(), 15);
  resumed.fit();
  EXPECT_TRUE(same_bits(flat(resumed.params_float32()), flat(single.params_float32())));
  comm.barrier();
  if (comm.rank() == 0) std::filesystem::remove(config.checkpoint_path);
}

// A ZeRO-1 trainer whose on_unscaled_gradients hook is a template (a member template cannot be declared in a
// local class).
class TemplateHook : public Model,
                     public xax::TrainStep<TemplateHook, MixedPolicy>,
                     public xax::distributed::DataParallelMixin<TemplateHook> {
 public:
  TemplateHook() : DataParallelMixin(ReducerOptions{}, 1) {
    auto initial = task.init_params();
    synchronize_initial_params(initial);
    reset_train_state(
        initial, [&](const Net<float>& like) { return sharded_optimizer(like, adamw); },
        xax::DynamicLossScale{});
  }
  template <class Grads>
  void on_unscaled_gradients(Grads& /*grads*/, const xax::UnscaledGradients& /*info*/) {
    ++hook_calls;
  }
  int hook_calls = 0;
};

TEST(ZeroOne, MisuseIsAConfigErrorOrCheckpointError) {
  xax::distributed::DataParallelConfig config;
  EXPECT_EQ(config.checked_zero_stage(), 0);
  config.zero_stage = 2;
  EXPECT_THROW(config.validate_data_parallel(), xax::ConfigError);
  config.zero_stage = -1;
  EXPECT_THROW(static_cast<void>(config.checked_zero_stage()), xax::ConfigError);
  EXPECT_THROW(ParallelTrainer(3), xax::ConfigError);

  // Sharded without a communicator.
  const Net<float> like = Model().task.init_params();
  EXPECT_THROW(xax::distributed::ZeroOptimizer<Net<float>>(like, adamw, MPI_COMM_NULL, true),
               xax::ConfigError);
  // A bad option is refused as by AdamW itself.
  EXPECT_THROW(xax::distributed::ZeroOptimizer<Net<float>>(like, xax::optim::AdamWOptions{.beta1 = 1.5},
                                                           MPI_COMM_NULL, false),
               xax::ConfigError);

  // Stage 1 with an optimizer that is not sharded: refused at the first step, on every rank.
  class Unsharded : public Model,
                    public xax::TrainStep<Unsharded, MixedPolicy>,
                    public xax::distributed::DataParallelMixin<Unsharded> {
   public:
    Unsharded() : DataParallelMixin(ReducerOptions{}, 1) {
      reset_train_state(task.init_params(), adamw, xax::DynamicLossScale{});
    }
  };
  Unsharded unsharded;
  EXPECT_THROW(train(unsharded, unsharded.rank(), unsharded.world_size(), 0, 1), xax::ConfigError);

  // Stage 1 with an on_unscaled_gradients hook written as a template: it has no address to take, and used
  // to be called with this rank's shard of the gradients alone instead of being refused.
  TemplateHook hooked;
  EXPECT_THAT([&] { train(hooked, hooked.rank(), hooked.world_size(), 0, 1); },
              ::testing::ThrowsMessage<xax::ConfigError>(::testing::HasSubstr("on_unscaled_gradients")));
  EXPECT_EQ(hooked.hook_calls, 0);

  // Saving a sharded state without gathering it first.
  ParallelTrainer trainer(1);
  train(trainer, trainer.rank(), trainer.world_size(), 0, 1);
  xax::CheckpointWriter writer;
  EXPECT_THROW(trainer.save_train_state(writer), xax::CheckpointError);
}

}  // namespace
