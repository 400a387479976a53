// xax/distributed/replica_check.hpp: verify_replicas_equal passes when every rank holds rank 0's bits and
// otherwise throws ReplicaMismatchError on every rank, naming the ranks that differ; DataParallelMixin runs
// it after TrainMixin::load_checkpoint, so a rank that loaded different masters stops the job with that
// message.
#include <gtest/gtest.h>

#include <unistd.h>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <span>
#include <string>
#include <tuple>
#include <vector>
#include <xax/distributed/data_parallel.hpp>
#include <xax/distributed/replica_check.hpp>

#include "train_test_task.hpp"

namespace {

using xax::distributed::Communicator;
using xax::distributed::ReplicaComparison;
using xax::distributed::ReplicaMismatchError;
using xax_test::Batch;
using xax_test::Net;

// A float leaf, a bfloat16 leaf and an integer leaf (not compared).
using Tree = std::tuple<Eigen::VectorXf, Eigen::Matrix<xax::bfloat16, Eigen::Dynamic, 1>, int>;

Tree make_tree(int rank) {
  Tree tree{Eigen::VectorXf(300), Eigen::Matrix<xax::bfloat16, Eigen::Dynamic, 1>(50), rank};
  for (Eigen::Index i = 0; i < 300; ++i) std::get<0>(tree)(i) = 0.01f * static_cast<float>(i) - 1.0f;
  for (Eigen::Index i = 0; i < 50; ++i) std::get<1>(tree)(i) = xax::bfloat16(0.5f * static_cast<float>(i));
  return tree;
}

std::vector<ReplicaComparison> comparisons() {
  if constexpr (xax::has_tree_crc32) {
    return {ReplicaComparison::crc32, ReplicaComparison::exact};
  } else {
    return {ReplicaComparison::exact};
  }
}

// Ranks 1 and 3 (those that exist) differ: one in its float leaf's last bit, one in its bfloat16 leaf.
std::vector<int> perturb(Tree& tree, int rank) {
  if (rank == 1) {
    float& x = std::get<0>(tree)(299);
    x = std::nextafter(x, 10.0f);
  }
  if (rank == 3) std::get<1>(tree)(7) = xax::bfloat16(-1.0f);
  return rank == 1 || rank == 3 ? std::vector<int>{rank} : std::vector<int>{};
}

TEST(VerifyReplicasEqual, EqualTreesPassAndIntegerLeavesAreNotCompared) {
  const Communicator comm;
  const Tree tree = make_tree(comm.rank());  // the int leaf differs on every rank
  for (const ReplicaComparison comparison : comparisons())
    EXPECT_NO_THROW(xax::distributed::verify_replicas_equal(comm, tree, "equal trees", comparison));
}

TEST(VerifyReplicasEqual, PerturbedRanksAreNamedOnEveryRank) {
  const Communicator comm;
  std::vector<int> expected;
  for (int r = 1; r < comm.size(); ++r) {
    Tree scratch = make_tree(r);
    for (const int differing : perturb(scratch, r)) expected.push_back(differing);
  }
  Tree tree = make_tree(comm.rank());
  static_cast<void>(perturb(tree, comm.rank()));
  for (const ReplicaComparison comparison : comparisons()) {
    if (expected.empty()) {  // one rank: nothing can differ
      EXPECT_NO_THROW(xax::distributed::verify_replicas_equal(comm, tree, "perturbed", comparison));
      continue;
    }
    try {
      xax::distributed::verify_replicas_equal(comm, tree, "perturbed masters", comparison);
      ADD_FAILURE() << "no ReplicaMismatchError on rank " << comm.rank();
    } catch (const ReplicaMismatchError& error) {
      EXPECT_EQ(error.differing_ranks(), expected);
      const std::string message = error.what();
      const std::string named = expected.size() == 1 ? "rank 1 differ" : "ranks 1, 3 differ";
      EXPECT_NE(message.find(named), std::string::npos) << message;
      EXPECT_NE(message.find("perturbed masters"), std::string::npos) << message;
    }
  }
  // A tree of another shape on one rank is a ShapeError on every rank, not a hang.
  if (comm.size() > 1) {
    Tree other = make_tree(0);
    if (comm.rank() == 1) std::get<0>(other).resize(301);
    EXPECT_THROW(xax::distributed::verify_replicas_equal(comm, other, "shapes"), xax::ShapeError);
  }
}

// A TrainStep trainer calls verify_loaded_state after its own load: it checks TrainStep::params().
using MixedPolicy = xax::Policy<float, xax::bfloat16, float>;
struct Model {
  template <class T>
  using params_type = Net<T>;
  using batch_type = Batch;
  xax_test::ClassifierTask task{xax_test::default_config(), xax_test::make_data(64)};
  template <class T>
  double loss_and_grads(const Net<T>& p, const Batch& b, float scale, Net<T>& g) {
    return task.loss_and_grads(p, b, scale, g);
  }
};

class ParallelTrainer : public Model,
                        public xax::TrainStep<ParallelTrainer, MixedPolicy>,
                        public xax::distributed::DataParallelMixin<ParallelTrainer> {
 public:
  explicit ParallelTrainer(bool perturb_last_rank) {
    auto initial = task.init_params();
    // Deliberately not synchronized: the last rank keeps its own params.
    if (perturb_last_rank && rank() == world_size() - 1 && world_size() > 1) initial.b2(0) += 1.0f;
    reset_train_state(initial, xax::optim::AdamWOptions{.learning_rate = 1e-2}, xax::DynamicLossScale{});
  }
};

TEST(DataParallelTrainStep, VerifyLoadedStateChecksTheMasters) {
  ParallelTrainer same(false);
  EXPECT_NO_THROW(same.verify_loaded_state());
  ParallelTrainer different(true);
  if (different.world_size() == 1) {
    EXPECT_NO_THROW(different.verify_loaded_state());
  } else {
    try {
      different.verify_loaded_state();
      ADD_FAILURE() << "no ReplicaMismatchError";
    } catch (const ReplicaMismatchError& error) {
      EXPECT_EQ(error.differing_ranks(), std::vector<int>{different.world_size() - 1});
      EXPECT_NE(std::string(error.what()).find("masters after a checkpoint load"), std::string::npos);
    }
  }
}

// The mixin face: TrainMixin::load_checkpoint runs the check on every rank.
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
        inner_(config, xax_test::make_data(256)) {}
  Net<float> init_params() const { return inner_.init_params(); }
  std::int64_t num_examples() const { return inner_.num_examples(); }
  Batch make_batch(std::span<const std::int64_t> indices) const { return inner_.make_batch(indices); }
  template <class T>
  double loss_and_grads(const Net<T>& p, const Batch& b, float scale, Net<T>& g) {
    return inner_.loss_and_grads(p, b, scale, g);
  }

 private:
  xax_test::ClassifierTask inner_;
};

ParallelConfig parallel_config(std::int64_t max_steps) {
  ParallelConfig config;
  static_cast<xax_test::TaskConfig&>(config) = xax_test::default_config();
  config.enable_mixed_precision = true;
  config.precision_policy = "mixed";
  config.batch_size = 16;
  config.accumulation_steps = 4;
  config.epochs = 1;
  config.seed = 11;
  config.max_steps = max_steps;
  return config;
}

TEST(DataParallelMixin, ALoadThatLeavesOneRankWithOtherMastersThrowsOnEveryRank) {
  const Communicator comm;
  std::int64_t pid = ::getpid();
  comm.broadcast(&pid, 1, 0);
  const auto dir = std::filesystem::temp_directory_path();
  const auto after2 = dir / ("xax_replica_2_" + std::to_string(pid) + ".ckpt");
  const auto after3 = dir / ("xax_replica_3_" + std::to_string(pid) + ".ckpt");
  {
    ParallelTask two(parallel_config(2));
    two.fit();
    if (two.writes_checkpoints()) two.save_checkpoint(after2);
    ParallelTask three(parallel_config(3));
    three.fit();
    if (three.writes_checkpoints()) three.save_checkpoint(after3);
  }
  comm.barrier();

  // Every rank loads the same file: no error, and the masters are the file's.
  ParallelTask same(parallel_config(0));
  EXPECT_NO_THROW(same.load_checkpoint(after2));
  EXPECT_EQ(same.fit_steps(), 2);

  // The last rank loads another file (as a rank given an older checkpoint would).
  ParallelTask mixed(parallel_config(0));
  const bool odd_one = comm.size() > 1 && comm.rank() == comm.size() - 1;
  if (comm.size() == 1) {
    EXPECT_NO_THROW(mixed.load_checkpoint(after3));
  } else {
    try {
      mixed.load_checkpoint(odd_one ? after3 : after2);
      ADD_FAILURE() << "no ReplicaMismatchError on rank " << comm.rank();
    } catch (const ReplicaMismatchError& error) {
      EXPECT_EQ(error.differing_ranks(), std::vector<int>{comm.size() - 1});
      const std::string message = error.what();
      EXPECT_NE(message.find("rank " + std::to_string(comm.size() - 1) + " differ"), std::string::npos)
          << message;
      EXPECT_NE(message.find("checkpoint"), std::string::npos) << message;
    }
  }
  comm.barrier();
  if (comm.rank() == 0) {
    std::filesystem::remove(after2);
    std::filesystem::remove(after3);
  }
}

bool same_floats(const Net<float>& a, const Net<float>& b) {
  const auto same = [](const auto& x, const auto& y) {
    return x.size() == y.size() &&
           std::memcmp(x.data(), y.data(), static_cast<std::size_t>(x.size()) * sizeof(float)) == 0;
  };
  return same(a.w1, b.w1) && same(a.b1, b.b1) && same(a.w2, b.w2) && same(a.b2, b.b2);
}

// Regression: a rank whose copy of the checkpoint could not be read threw before the collective replica
// check, and the other ranks waited in it for ever. Now every rank throws (the last its own error, the
// others an error naming it), none changes its state, and the next load works on all of them.
TEST(DataParallelMixin, ALoadThatFailsOnOneRankThrowsOnEveryRankAndChangesNothing) {
  const Communicator comm;
  std::int64_t pid = ::getpid();
  comm.broadcast(&pid, 1, 0);
  const auto dir = std::filesystem::temp_directory_path();
  const auto good = dir / ("xax_load_good_" + std::to_string(pid) + ".ckpt");
  // Each rank's own "bad copy", so that no rank reads a file another is writing.
  const auto bad =
      dir / ("xax_load_bad_" + std::to_string(pid) + "_" + std::to_string(comm.rank()) + ".ckpt");
  {
    ParallelTask two(parallel_config(2));
    two.fit();
    if (two.writes_checkpoints()) two.save_checkpoint(good);
  }
  comm.barrier();
  std::ofstream(bad, std::ios::binary) << "XAXCKPT";  // a truncated copy

  ParallelTask task(parallel_config(1));
  task.fit();
  const Net<float> before = task.params_float32();
  const int last = comm.size() - 1;
  const bool odd_one = comm.rank() == last;
  try {
    task.load_checkpoint(odd_one ? bad : good);
    ADD_FAILURE() << "no CheckpointError on rank " << comm.rank();
  } catch (const xax::CheckpointError& error) {
    const std::string message = error.what();
    if (odd_one) {
      EXPECT_EQ(message.find("could not load"), std::string::npos) << "its own error, not the agreement's";
    } else {
      EXPECT_NE(message.find("process " + std::to_string(last) + " of " + std::to_string(comm.size()) +
                             " could not load the checkpoint"),
                std::string::npos)
          << message;
    }
  }
  EXPECT_TRUE(same_floats(before, task.params_float32()));
  EXPECT_EQ(task.fit_steps(), 1);

  // The ranks are still in step: the same file now loads everywhere, and the replica check passes.
  EXPECT_NO_THROW(task.load_checkpoint(good));
  EXPECT_EQ(task.fit_steps(), 2);

  // Regression: a task resumed before its first step builds its state on the first use, and that build
  // broadcasts process 0's initial params. The process whose copy failed to read joined the agreement while
  // the others waited in that broadcast. Every process now builds first, so all of them throw here too.
  ParallelTask fresh(parallel_config(1));
  try {
    fresh.load_checkpoint(odd_one ? bad : good);
    ADD_FAILURE() << "no CheckpointError on rank " << comm.rank() << " of a task that had not stepped";
  } catch (const xax::CheckpointError&) {
  }
  EXPECT_EQ(fresh.fit_steps(), 0);
  EXPECT_NO_THROW(fresh.load_checkpoint(good));
  EXPECT_EQ(fresh.fit_steps(), 2);
  std::filesystem::remove(bad);
  comm.barrier();
  if (comm.rank() == 0) std::filesystem::remove(good);
}

}  // namespace
