// A data-parallel job in which the last rank fails while the others wait for it in a collective:
//   fault_program throw   the last rank throws xax::LossScaleError (as a step at the minimum scale would)
//   fault_program kill    the last rank is killed by SIGKILL (as the OOM killer would)
// Either way the job must end, with the message, and no rank may wait for ever (tests/mpi/check_fault.cmake).
#include <csignal>
#include <cstring>
#include <xax/distributed/communicator.hpp>
#include <xax/utils/error.hpp>

int main(int argc, char** argv) {
  xax::distributed::Environment mpi(argc, argv);
  const bool kill = argc > 1 && std::strcmp(argv[1], "kill") == 0;
  return xax::distributed::run_or_abort([&] {
    const xax::distributed::Communicator comm;
    comm.barrier();
    if (comm.rank() == comm.size() - 1) {
      if (kill) std::raise(SIGKILL);
      throw xax::LossScaleError("injected fault: 100 consecutive steps overflowed on the last rank");
    }
    // The survivors wait for a contribution the failed rank never sends.
    const std::int64_t mine = 1;
    std::int64_t total = 0;
    comm.all_reduce(&mine, &total, 1, MPI_SUM);
    return 0;
  });
}
