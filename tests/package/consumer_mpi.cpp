// A consumer of xax's MPI part (find_package(xax COMPONENTS mpi), xax::mpi): one process sums a gradient tree
// with itself through the reducer, without mpiexec (MPI's singleton start).
#include <xax/distributed/data_parallel.hpp>

#include <cstdio>
#include <vector>

int main(int argc, char** argv) {
  xax::distributed::Environment mpi(argc, argv);
  xax::distributed::GradientReducer reducer(xax::distributed::Communicator{});
  std::vector<Eigen::VectorXf> grads{Eigen::VectorXf::Constant(5, 0.5f)};
  reducer.collect(0, 1.0, grads);
  reducer.collect(1, 2.0, grads);
  const xax::ReducedGradients reduced = reducer.reduce(grads);
  const bool ok = reducer.communicator().size() == 1 && reduced.micro_batches == 2 &&
                  reduced.loss_sum == 3.0 && grads[0](4) == 1.0f;
  std::puts(ok ? "xax mpi consumer: ok" : "xax mpi consumer: FAILED");
  return ok ? 0 : 1;
}
