// xax/distributed/data_parallel.hpp: data-parallel TrainStep and mixins. In deterministic mode the masters
// are bit-identical to one process running the same global batches (so identical for 1, 2 and 4 ranks); every
// rank takes the same skip decision and scale, also when only one rank's gradients overflow.
#include <gtest/gtest.h>

#include <unistd.h>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <span>
#include <string>
#include <vector>
#include <xax/distributed/data_parallel.hpp>
#include <xax/distributed/shard_sampler.hpp>

#include "train_test_task.hpp"

namespace {

using xax::distributed::Communicator;
using xax::distributed::ReducerOptions;
using xax_test::Batch;
using xax_test::flat;
using xax_test::Net;
using xax_test::same_bits;
using MixedPolicy = xax::Policy<float, xax::bfloat16, float>;

// Whether every rank holds rank 0's bits.
bool same_on_every_rank(const Communicator& comm, const std::vector<float>& mine) {
  std::vector<float> root = mine;
  comm.broadcast(root.data(), root.size(), 0);
  const int same = same_bits(root, mine) ? 1 : 0;
  int all = 0;
  comm.all_reduce(&same, &all, 1, MPI_MIN);
  return all == 1;
}

xax_test::TaskConfig task_config() {
  xax_test::TaskConfig config = xax_test::default_config();
  config.enable_mixed_precision = true;
  config.precision_policy = "mixed";
  config.loss_scaling = "dynamic";
  config.batch_size = 16;
  config.accumulation_steps = 4;  // a step's global batch: 4 micro-batches of 16, whatever the world size
  config.epochs = 2;
  config.seed = 5;
  return config;
}

// The model code both trainers share: the test task's loss and gradients.
struct Model {
  template <class T>
  using params_type = Net<T>;
  using batch_type = Batch;
  xax_test::ClassifierTask task{task_config(), xax_test::make_data(512)};
  template <class T>
  double loss_and_grads(const Net<T>& p, const Batch& b, float scale, Net<T>& g) {
    return task.loss_and_grads(p, b, scale, g);
  }
};

// One process, plain TrainStep: the reference.
class SingleTrainer : public Model, public xax::TrainStep<SingleTrainer, MixedPolicy> {
 public:
  SingleTrainer() {
    reset_train_state(task.init_params(), xax::optim::AdamWOptions{.learning_rate = 1e-2},
                      xax::DynamicLossScale{});
  }
};

// The same on every rank of the job, each on its share of every global batch.
class ParallelTrainer : public Model,
                        public xax::TrainStep<ParallelTrainer, MixedPolicy>,
                        public xax::distributed::DataParallelMixin<ParallelTrainer> {
 public:
  explicit ParallelTrainer(ReducerOptions options = {}) : DataParallelMixin(options) {
    auto initial = task.init_params();
    if (rank() != 0) initial.w1.array() += 1.0f;  // every rank must start from rank 0's params
    synchronize_initial_params(initial);
    reset_train_state(initial, xax::optim::AdamWOptions{.learning_rate = 1e-2}, xax::DynamicLossScale{});
  }
};

constexpr xax::distributed::ShardSamplerOptions sampling{
    .examples = 512, .global_batch = 64, .micro_shards = 4, .seed = 3};

template <class Trainer>
std::vector<xax::StepResult> train(Trainer& trainer, int rank, int world, std::int64_t epochs = 2) {
  xax::distributed::ShardSampler sampler(sampling, rank, world);
  std::vector<xax::StepResult> results;
  for (std::int64_t epoch = 0; epoch < epochs; ++epoch) {
    for (std::int64_t step = 0; step < sampler.steps_per_epoch(); ++step) {
      std::vector<Batch> batches;
      for (const auto indices : sampler.rank_shards(epoch, step))
        batches.push_back(trainer.task.make_batch(indices));
      results.push_back(trainer.train_step(std::span<const Batch>(batches)));
    }
  }
  return results;
}

TEST(DataParallelTrainStep, DeterministicMastersAreBitIdenticalToOneProcess) {
  ParallelTrainer parallel;
  const auto parallel_results = train(parallel, parallel.rank(), parallel.world_size());
  SingleTrainer single;
  const auto single_results = train(single, 0, 1);

  EXPECT_TRUE(same_bits(flat(parallel.params()), flat(single.params())))
      << "world size " << parallel.world_size() << ": the masters differ from the single process's";
  ASSERT_EQ(parallel_results.size(), single_results.size());
  for (std::size_t i = 0; i < single_results.size(); ++i) {
    EXPECT_EQ(parallel_results[i].loss, single_results[i].loss) << "step " << i;
    EXPECT_EQ(parallel_results[i].grad_norm, single_results[i].grad_norm) << "step " << i;
    EXPECT_EQ(parallel_results[i].loss_scale, single_results[i].loss_scale) << "step " << i;
  }
  EXPECT_LT(single_results.back().loss, single_results.front().loss);
  EXPECT_EQ(parallel.reduction_stats().reductions, static_cast<std::int64_t>(single_results.size()));
}

TEST(DataParallelTrainStep, BucketedMastersAreBitIdenticalToOneProcessAndToOneBucket) {
  SingleTrainer single;
  train(single, 0, 1);
  ParallelTrainer bf16_whole(ReducerOptions{.wire = xax::DType::bfloat16, .deterministic = true});
  train(bf16_whole, bf16_whole.rank(), bf16_whole.world_size());
  for (const std::size_t bucket : {std::size_t{7}, std::size_t{100}}) {  // of 212 elements
    ParallelTrainer parallel(
        ReducerOptions{.wire = xax::DType::float32, .deterministic = true, .bucket_size = bucket});
    train(parallel, parallel.rank(), parallel.world_size());
    EXPECT_TRUE(same_bits(flat(parallel.params()), flat(single.params())))
        << "bucket " << bucket << ", world size " << parallel.world_size();
    EXPECT_EQ(parallel.reduction_stats().buckets_last, (212 + bucket - 1) / bucket);
    // bf16 wire: each element still rounded once, so buckets change no bit there either.
    ParallelTrainer bf16(
        ReducerOptions{.wire = xax::DType::bfloat16, .deterministic = true, .bucket_size = bucket});
    train(bf16, bf16.rank(), bf16.world_size());
    EXPECT_TRUE(same_bits(flat(bf16.params()), flat(bf16_whole.params()))) << "bf16 wire, bucket " << bucket;
  }
}

TEST(DataParallelTrainStep, OneRanksOverflowSkipsTheStepOnEveryRank) {
  for (const bool deterministic : {true, false}) {
    ParallelTrainer parallel(ReducerOptions{.wire = xax::DType::float32, .deterministic = deterministic});
    const Communicator& comm = parallel.communicator();
    // Only the last rank's third micro-batch gradient overflows.
    if (parallel.rank() == parallel.world_size() - 1) parallel.task.inject_at_call = 2;
    const int per_rank = 4 / parallel.world_size();
    const std::int64_t bad_step = 2 / per_rank;
    std::vector<float> before_bad_step;
    xax::distributed::ShardSampler sampler(sampling, parallel.rank(), parallel.world_size());
    std::vector<float> scales, finite;
    for (std::int64_t step = 0; step < 6; ++step) {
      if (step == bad_step) before_bad_step = flat(parallel.params());
      std::vector<Batch> batches;
      for (const auto indices : sampler.rank_shards(0, step))
        batches.push_back(parallel.task.make_batch(indices));
      const xax::StepResult result = parallel.train_step(std::span<const Batch>(batches));
      EXPECT_EQ(result.finite, step != bad_step) << "step " << step;
      if (step == bad_step) {
        EXPECT_TRUE(same_bits(flat(parallel.params()), before_bad_step))
            << "a skipped step changed the masters";
      }
      scales.push_back(result.loss_scale);
      finite.push_back(result.finite ? 1.0f : 0.0f);
      scales.push_back(static_cast<float>(result.skipped_steps));
    }
    EXPECT_EQ(parallel.skipped_steps(), 1);
    EXPECT_EQ(parallel.current_loss_scale(), 32768.0f * 0.5f);
    EXPECT_TRUE(same_on_every_rank(comm, scales));
    EXPECT_TRUE(same_on_every_rank(comm, finite));
    EXPECT_TRUE(same_on_every_rank(comm, flat(parallel.params())));
  }
}

TEST(DataParallelTrainStep, Bfloat16WireTrainsAndKeepsRanksIdentical) {
  ParallelTrainer parallel(ReducerOptions{.wire = xax::DType::bfloat16, .deterministic = true});
  const auto results = train(parallel, parallel.rank(), parallel.world_size());
  EXPECT_LT(results.back().loss, results.front().loss);
  EXPECT_TRUE(same_on_every_rank(parallel.communicator(), flat(parallel.params())));
  EXPECT_EQ(parallel.skipped_steps(), 0);
}

// The mixin face: a task with TrainMixin, MixedPrecisionMixin and DataParallelMixin, run by fit().
struct ParallelConfig : xax_test::TaskConfig, xax::distributed::DataParallelConfig {};

class ParallelTask : public xax::TrainMixin<ParallelTask, ParallelConfig>,
                     public xax::MixedPrecisionMixin<ParallelTask, ParallelConfig>,
                     public xax::distributed::DataParallelMixin<ParallelTask> {
 public:
  using compiled_policies = xax_test::MixedOnAnyCpu;  // its config runs "mixed" alone
  template <class T>
  using params_type = Net<T>;
  using batch_type = Batch;
  explicit ParallelTask(const ParallelConfig& config, Communicator comm = Communicator{})
      : TrainMixin(config),
        DataParallelMixin(static_cast<const xax::distributed::DataParallelConfig&>(config), std::move(comm)),
        inner_(config, xax_test::make_data(512)) {}
  Net<float> init_params() const {
    Net<float> initial = inner_.init_params();
    if (rank() != 0) initial.w2.array() -= 0.5f;  // replaced by rank 0's
    return initial;
  }
  std::int64_t num_examples() const { return inner_.num_examples(); }
  Batch make_batch(std::span<const std::int64_t> indices) const { return inner_.make_batch(indices); }
  template <class T>
  double loss_and_grads(const Net<T>& p, const Batch& b, float scale, Net<T>& g) {
    return inner_.loss_and_grads(p, b, scale, g);
  }
  void on_step(std::int64_t, const xax::StepResult& result) { results.push_back(result); }
  std::vector<xax::StepResult> results;

 private:
  xax_test::ClassifierTask inner_;
};

ParallelConfig parallel_config() {
  ParallelConfig config;
  static_cast<xax_test::TaskConfig&>(config) = task_config();
  return config;
}

TEST(DataParallelMixin, FitIsBitIdenticalToOneProcessAndResumesFromAOneProcessCheckpoint) {
  xax_test::ClassifierTask single(task_config(), xax_test::make_data(512));
  single.fit();

  ParallelTask parallel(parallel_config());
  parallel.fit();
  EXPECT_TRUE(same_bits(flat(parallel.params_float32()), flat(single.params_float32())));
  ASSERT_EQ(parallel.results.size(), single.results.size());
  for (std::size_t i = 0; i < single.results.size(); ++i)
    EXPECT_EQ(parallel.results[i].loss, single.results[i].loss);

  // Interrupted after 5 steps of a run on rank 0 alone (a world of one), which writes the checkpoint; every
  // rank of this world resumes from it: the checkpoint does not depend on the number of processes.
  std::int64_t pid = ::getpid();
  parallel.communicator().broadcast(&pid, 1, 0);
  const auto path =
      std::filesystem::temp_directory_path() / ("xax_data_parallel_" + std::to_string(pid) + ".ckpt");
  MPI_Comm solo = MPI_COMM_NULL;
  MPI_Comm_split(MPI_COMM_WORLD, parallel.rank() == 0 ? 0 : MPI_UNDEFINED, 0, &solo);
  if (parallel.rank() == 0) {
    ParallelConfig interrupted_config = parallel_config();
    interrupted_config.max_steps = 5;
    {
      ParallelTask interrupted(interrupted_config, Communicator::duplicate(solo));
      EXPECT_EQ(interrupted.world_size(), 1);
      interrupted.fit();
      EXPECT_TRUE(interrupted.writes_checkpoints());
      interrupted.save_checkpoint(path);
    }
    MPI_Comm_free(&solo);
  }
  parallel.communicator().barrier();
  ParallelTask resumed(parallel_config());
  EXPECT_EQ(resumed.writes_checkpoints(), resumed.rank() == 0);
  resumed.load_checkpoint(path);
  EXPECT_EQ(resumed.fit_steps(), 5);
  resumed.fit();
  resumed.communicator().barrier();
  if (resumed.rank() == 0) std::filesystem::remove(path);
  EXPECT_TRUE(same_bits(flat(resumed.params_float32()), flat(single.params_float32())));
}

TEST(DataParallelMixin, FitWithBucketsFromTheConfigIsBitIdenticalToOneProcess) {
  xax_test::ClassifierTask single(task_config(), xax_test::make_data(512));
  single.fit();
  ParallelConfig config = parallel_config();
  xax::set_config_field(config, "bucket_size", "50");  // of 212 elements
  ParallelTask parallel(config);
  parallel.fit();
  EXPECT_EQ(parallel.reducer_options().bucket_size, 50u);
  EXPECT_EQ(parallel.reduction_stats().buckets_last, 5u);  // 212 elements in buckets of 50
  EXPECT_TRUE(same_bits(flat(parallel.params_float32()), flat(single.params_float32())));
}

TEST(DataParallelMixin, ConfigSectionAndSharesAreChecked) {
  ParallelConfig config = parallel_config();
  EXPECT_EQ(config.reducer_options().wire, xax::DType::float32);
  EXPECT_TRUE(config.reducer_options().deterministic);
  xax::set_config_field(config, "gradient_wire_dtype", "bf16");
  EXPECT_EQ(config.reducer_options().wire, xax::DType::bfloat16);
  EXPECT_THROW(xax::set_config_field(config, "gradient_wire_dtype", "float16"), xax::ConfigError);
  const auto names = xax::config_field_names(config);
  EXPECT_NE(std::find(names.begin(), names.end(), "deterministic_reduction"), names.end());
  EXPECT_EQ(config.reducer_options().bucket_size, 0u);
  xax::set_config_field(config, "bucket_size", "4096");
  EXPECT_EQ(config.reducer_options().bucket_size, 4096u);
  ParallelConfig bad_bucket = parallel_config();
  bad_bucket.bucket_size = -1;
  try {
    bad_bucket.validate_data_parallel();
    ADD_FAILURE() << "bucket_size -1 was accepted";
  } catch (const xax::ConfigError& error) {
    EXPECT_NE(std::string(error.what()).find("'bucket_size'"), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("positive number of gradient elements"), std::string::npos);
  }
  EXPECT_THROW(ParallelTask{bad_bucket}, xax::ConfigError);
  EXPECT_THROW(xax::set_config_field(config, "bucket_size", "many"), xax::ConfigError);

  ParallelConfig uneven = parallel_config();
  uneven.accumulation_steps = 3;  // not a multiple of 2 or 4 ranks
  ParallelTask task(uneven);
  if (task.world_size() == 1) {
    EXPECT_NO_THROW(task.fit());
  } else {
    EXPECT_THROW(task.fit(), xax::ConfigError);  // on every rank alike, before any collective
  }
}

}  // namespace
