#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <thread>
#include <xax/detail/parallel.hpp>
#include <xax/ops/matmul.hpp>
#include <xax/utils/threads.hpp>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

TEST(Threads, RejectsCountsBelowOne) {
  EXPECT_THROW(xax::set_num_threads(0), xax::ConfigError);
  EXPECT_THROW(xax::set_num_threads(-3), xax::ConfigError);
}

TEST(Threads, RejectsCountsAboveTheMaximum) {
  const int before = xax::num_threads();
  EXPECT_THROW(xax::set_num_threads(xax::max_num_threads + 1), xax::ConfigError);
  EXPECT_THROW(xax::set_num_threads(100000), xax::ConfigError);
  EXPECT_EQ(xax::num_threads(), before) << "a refused count changes nothing";
}

TEST(Threads, SetThenRead) {
  const int before = xax::num_threads();
  xax::set_num_threads(1);
  EXPECT_EQ(xax::num_threads(), 1);
#if defined(_OPENMP)
  xax::set_num_threads(2);
  EXPECT_EQ(xax::num_threads(), 2);
  EXPECT_EQ(Eigen::nbThreads(), 2);
#else
  EXPECT_THROW(xax::set_num_threads(2), xax::ConfigError);
#endif
  xax::set_num_threads(before);
}

#if defined(_OPENMP)
// The count is one for the whole process: a thread started after set_num_threads() (whose own OpenMP default
// is still OMP_NUM_THREADS or the CPU count) sees it, and xax's parallel passes on that thread use it. Two
// counts, so that one of them differs from any OpenMP default.
TEST(Threads, OneCountForEveryThread) {
  const int before = xax::num_threads();
  for (const int count : {1, 3}) {
    xax::set_num_threads(count);
    int seen = 0, eigen = 0, widest_pass = 0;
    std::thread worker([&] {
      seen = xax::num_threads();
      eigen = Eigen::nbThreads();
      std::atomic<int> widest{0};
      xax::detail::parallel_blocks(std::size_t{1} << 20, 4, 64, [&widest](std::size_t, std::size_t) noexcept {
        int current = widest.load();
        while (current < omp_get_num_threads() &&
               !widest.compare_exchange_weak(current, omp_get_num_threads())) {
        }
      });
      widest_pass = widest.load();
    });
    worker.join();
    EXPECT_EQ(seen, count);
    EXPECT_EQ(eigen, count);
    EXPECT_EQ(widest_pass, count);
  }
  xax::set_num_threads(before);
}

// A matmul on a thread with its own OpenMP default runs with xax's count and leaves that default as it was.
TEST(Threads, MatmulKeepsTheCallingThreadsOpenMPDefault) {
  const int before = xax::num_threads();
  xax::set_num_threads(3);
  int after = 0;
  std::thread worker([&after] {
    omp_set_num_threads(1);
    const Eigen::MatrixXf a = Eigen::MatrixXf::Ones(256, 256);
    Eigen::MatrixXf c;
    xax::matmul(a, a, c);
    EXPECT_EQ(c(0, 0), 256.0f);
    after = omp_get_max_threads();
  });
  worker.join();
  EXPECT_EQ(after, 1);
  xax::set_num_threads(before);
}

// An OpenMP default beyond max_num_threads (ctest runs this with OMP_NUM_THREADS=100000) is capped, as
// OMP_THREAD_LIMIT caps a team: a product big enough to use every thread then runs, where a team of 100000
// overflowed the stack of the forking thread inside libgomp (SIGSEGV).
TEST(Threads, TheOpenMpDefaultIsCappedAtTheMaximum) {
  if (xax::detail::configured_num_threads().load() != 0) GTEST_SKIP() << "set_num_threads ran before";
  EXPECT_EQ(xax::num_threads(), std::min(omp_get_max_threads(), xax::max_num_threads));
  const Eigen::MatrixXf a = Eigen::MatrixXf::Ones(256, 256);
  Eigen::MatrixXf c;
  xax::matmul(a, a, c);
  EXPECT_EQ(c(255, 255), 256.0f);
}
#endif

}  // namespace
