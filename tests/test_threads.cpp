#include <gtest/gtest.h>

#include <xax/utils/threads.hpp>

namespace {

TEST(Threads, RejectsCountsBelowOne) {
  EXPECT_THROW(xax::set_num_threads(0), xax::ConfigError);
  EXPECT_THROW(xax::set_num_threads(-3), xax::ConfigError);
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

}  // namespace
