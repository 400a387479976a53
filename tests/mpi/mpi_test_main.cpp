// main() of the MPI test executables: starts MPI, runs GoogleTest on every rank (each rank checks its own
// results), and lets only rank 0 print, so that a run reads like a single-process one. A failure on any rank
// fails the process and therefore the mpiexec run.
#include <gtest/gtest.h>

#include <xax/distributed/communicator.hpp>

int main(int argc, char** argv) {
  xax::distributed::Environment mpi(argc, argv);
  ::testing::InitGoogleTest(&argc, argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank != 0) {
    // Other ranks report only their failures.
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  const int failed = RUN_ALL_TESTS();
  // A rank that failed a test may have left the others in a collective; ending the job here turns what would
  // be a hang into a failure.
  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return any_failed;
}
