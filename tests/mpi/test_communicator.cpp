// xax/distributed/communicator.hpp: ownership, errors turned into MpiError, the wrapped collectives.
#include <gtest/gtest.h>

#include <cstdint>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>
#include <xax/distributed/communicator.hpp>

namespace {

using xax::distributed::Communicator;
using xax::distributed::MpiError;

static_assert(!std::is_copy_constructible_v<Communicator>);
static_assert(std::is_nothrow_move_constructible_v<Communicator>);
static_assert(std::is_base_of_v<xax::Error, MpiError>);

// MPI gives the highest level it can, which may be less than asked: xax went on at any level. Here MPI runs
// already (this program's main started it at MPI_THREAD_FUNNELED), so the level is the one it runs at.
TEST(Environment, RefusesLessThanTheThreadLevelAskedFor) {
  int provided = MPI_THREAD_SINGLE;
  MPI_Query_thread(&provided);
  if (provided < MPI_THREAD_MULTIPLE) {
    try {
      const xax::distributed::Environment again(MPI_THREAD_MULTIPLE);
      ADD_FAILURE() << "MPI_THREAD_MULTIPLE was not provided, yet accepted";
    } catch (const xax::ConfigError& error) {
      EXPECT_NE(
          std::string(error.what()).find("less than the MPI_THREAD_MULTIPLE asked for (MPI was started"),
          std::string::npos)
          << error.what();
    }
  }
  EXPECT_THROW(xax::distributed::Environment(42), xax::ConfigError);
  {
    const xax::distributed::Environment again(provided);
    EXPECT_EQ(again.thread_level(), provided);
  }
  int finalized = 1;
  MPI_Finalized(&finalized);
  EXPECT_EQ(finalized, 0) << "an Environment that found MPI running must not finalise it";
}

TEST(Communicator, DuplicatesTheWorldByDefault) {
  const Communicator comm;
  int world_rank = -1, world_size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world_size);
  EXPECT_EQ(comm.rank(), world_rank);
  EXPECT_EQ(comm.size(), world_size);
  EXPECT_TRUE(comm.owns());
  int compare = MPI_UNEQUAL;
  MPI_Comm_compare(comm.native(), MPI_COMM_WORLD, &compare);
  EXPECT_EQ(compare, MPI_CONGRUENT);  // same group, its own context: xax's traffic never meets the user's
  EXPECT_EQ(xax::distributed::world_rank(), world_rank);
}

TEST(Communicator, BorrowsWithoutFreeing) {
  MPI_Comm mine = MPI_COMM_NULL;
  MPI_Comm_dup(MPI_COMM_WORLD, &mine);
  {
    const Communicator borrowed = Communicator::borrow(mine);
    EXPECT_FALSE(borrowed.owns());
    EXPECT_EQ(borrowed.native(), mine);
  }
  // Still usable after the borrower is gone.
  int size = 0;
  EXPECT_EQ(MPI_Comm_size(mine, &size), MPI_SUCCESS);
  MPI_Comm_free(&mine);
  EXPECT_THROW(static_cast<void>(Communicator::borrow(MPI_COMM_NULL)), xax::Error);
}

TEST(Communicator, MovedFromIsAnError) {
  Communicator first;
  const Communicator second = std::move(first);
  EXPECT_TRUE(second.owns());
  EXPECT_FALSE(first.owns());  // NOLINT(bugprone-use-after-move): the state after a move is specified
  EXPECT_THROW(static_cast<void>(first.native()), xax::Error);
  second.barrier();
}

TEST(Communicator, FailedCallIsMpiErrorNamingCallAndRank) {
  const Communicator comm;
  float value = 1;
  try {
    comm.broadcast(&value, 1, comm.size());  // no such root
    FAIL() << "MPI_Bcast with root == size should fail";
  } catch (const MpiError& error) {
    EXPECT_EQ(error.call(), "MPI_Bcast");
    EXPECT_EQ(error.rank(), comm.rank());
    EXPECT_NE(error.code(), MPI_SUCCESS);
    const std::string message = error.what();
    EXPECT_NE(message.find("MPI_Bcast failed on rank " + std::to_string(comm.rank())), std::string::npos)
        << message;
  }
}

TEST(Communicator, CountsBeyondIntAreRefused) {
  EXPECT_THROW(static_cast<void>(Communicator::as_count(std::size_t{1} << 31, "MPI_Bcast")), xax::Error);
  EXPECT_EQ(Communicator::as_count(7, "MPI_Bcast"), 7);
}

TEST(Communicator, CollectivesMoveWhatTheySay) {
  const Communicator comm;
  const int size = comm.size(), rank = comm.rank();

  double root_value = rank == 0 ? 2.5 : -1.0;
  comm.broadcast(&root_value, 1, 0);
  EXPECT_EQ(root_value, 2.5);

  const std::int64_t mine = 10 + rank;
  std::vector<std::int64_t> all(static_cast<std::size_t>(size));
  comm.all_gather(&mine, 1, all.data());
  for (int r = 0; r < size; ++r) EXPECT_EQ(all[static_cast<std::size_t>(r)], 10 + r);

  std::int64_t sum = 0;
  comm.all_reduce(&mine, &sum, 1, MPI_SUM);
  EXPECT_EQ(sum, 10 * size + size * (size - 1) / 2);

  // Rank r contributes r + 1 floats equal to r.
  std::vector<int> counts(static_cast<std::size_t>(size)), offsets(static_cast<std::size_t>(size));
  for (int r = 0; r < size; ++r) counts[static_cast<std::size_t>(r)] = r + 1;
  std::exclusive_scan(counts.begin(), counts.end(), offsets.begin(), 0);
  const std::vector<float> send(static_cast<std::size_t>(rank + 1), static_cast<float>(rank));
  std::vector<float> gathered(static_cast<std::size_t>(offsets.back() + counts.back()));
  comm.all_gather_v(send.data(), rank + 1, gathered.data(), counts.data(), offsets.data());
  for (int r = 0; r < size; ++r)
    for (int i = 0; i < r + 1; ++i)
      EXPECT_EQ(gathered[static_cast<std::size_t>(offsets[static_cast<std::size_t>(r)] + i)], r);

  // All-to-all: rank r sends the value 10 r + q to rank q.
  std::vector<int> ones(static_cast<std::size_t>(size), 1), steps(static_cast<std::size_t>(size));
  std::iota(steps.begin(), steps.end(), 0);
  std::vector<xax::bfloat16> out(static_cast<std::size_t>(size)), in(static_cast<std::size_t>(size));
  for (int q = 0; q < size; ++q)
    out[static_cast<std::size_t>(q)] = xax::bfloat16(static_cast<float>(10 * rank + q));
  comm.all_to_all_v(out.data(), ones.data(), steps.data(), in.data(), ones.data(), steps.data());
  for (int r = 0; r < size; ++r)
    EXPECT_EQ(static_cast<float>(in[static_cast<std::size_t>(r)]), static_cast<float>(10 * r + rank));
}

}  // namespace
