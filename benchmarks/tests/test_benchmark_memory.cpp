// runner/memory.hpp: the memory this process may use, from the machine and its cgroups' limits, on cgroup
// trees laid out as the kernel mounts them.
#include "runner/memory.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <xax/utils/error.hpp>
#include <xax_datasets/synthetic.hpp>

#include "runner/dataset.hpp"
#include "scratch_directory.hpp"

namespace {

constexpr std::uint64_t gib = std::uint64_t{1} << 30;

class CgroupTree : public ::testing::Test {
 protected:
  /// Writes `content` to `relative` under the fake mount root, creating its directories.
  void write(const std::filesystem::path& relative, const std::string& content) const {
    const std::filesystem::path file = root() / relative;
    std::filesystem::create_directories(file.parent_path());
    std::ofstream(file) << content;
  }
  [[nodiscard]] const std::filesystem::path& root() const { return scratch_.path(); }
  [[nodiscard]] std::optional<xax_bench::CgroupMemoryLimit> limit(const std::string& proc_self_cgroup) const {
    return xax_bench::cgroup_memory_limit(proc_self_cgroup, root());
  }

 private:
  xax_test::ScratchDirectory scratch_{"xax_cgroup_tree"};
};

// cgroup v2: every cgroup from the process's own up to the root caps it, so the smallest limit on the way
// up counts, and "max" is no limit.
TEST_F(CgroupTree, V2TakesTheSmallestLimitFromTheProcessesCgroupUpToTheRoot) {
  write("memory.max", "max\n");
  write("user.slice/memory.max", "8589934592\n");
  write("user.slice/job/memory.max", "max\n");
  const auto found = limit("0::/user.slice/job\n");
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(found->bytes, 8 * gib);
  EXPECT_EQ(found->file, root() / "user.slice/memory.max");

  write("user.slice/job/memory.max", "1073741824\n");
  const auto tighter = limit("0::/user.slice/job\n");
  ASSERT_TRUE(tighter.has_value());
  EXPECT_EQ(tighter->bytes, gib);
  EXPECT_EQ(tighter->file, root() / "user.slice/job/memory.max");
}

// cgroup v1 (as on this project's CI machines): the memory controller's own hierarchy, in a line that may
// name several controllers, and its "no limit" is a page-rounded LONG_MAX.
TEST_F(CgroupTree, V1ReadsTheMemoryControllersHierarchy) {
  write("memory/memory.limit_in_bytes", "9223372036854771712\n");
  write("memory/batch/memory.limit_in_bytes", "4294967296\n");
  write("cpu/batch/memory.limit_in_bytes", "1024\n");  // not the memory controller's: ignored
  const auto found = limit("9:name=systemd:/\n4:cpu:/batch\n3:blkio,memory:/batch\n0::/\n");
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(found->bytes, 4 * gib);
  EXPECT_EQ(found->file, root() / "memory/batch/memory.limit_in_bytes");
}

// A container often sees the host's path in /proc/self/cgroup but only its own cgroup, mounted as the root.
TEST_F(CgroupTree, AContainersOwnCgroupMountedAsTheRootIsFound) {
  write("memory.max", "2147483648");
  const auto found = limit("0::/system.slice/docker-0123abcd.scope");
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(found->bytes, 2 * gib);
  EXPECT_EQ(found->file, root() / "memory.max");
}

TEST_F(CgroupTree, NoLimitOrNothingReadableGivesNone) {
  EXPECT_FALSE(limit("0::/\n").has_value());  // no files at all
  write("memory.max", "max\n");
  EXPECT_FALSE(limit("0::/\n").has_value());
  write("memory.max", "12 GiB\n");  // not a number: ignored rather than misread
  EXPECT_FALSE(limit("0::/\n").has_value());
  write("memory.max", "-1\n");
  EXPECT_FALSE(limit("0::/\n").has_value());
  write("memory.max", "");
  EXPECT_FALSE(limit("0::/\n").has_value());
}

// /proc/self/cgroup is the kernel's, but a reader of outside text must not trip over a line it does not
// expect: each is skipped.
TEST_F(CgroupTree, MalformedLinesAreSkipped) {
  write("memory.max", "1073741824\n");
  EXPECT_FALSE(limit("").has_value());
  EXPECT_FALSE(limit("\n\n").has_value());
  EXPECT_FALSE(limit("0:\n").has_value());
  EXPECT_FALSE(limit("0::\n").has_value());
  EXPECT_FALSE(limit("0::relative/path\n").has_value());
  EXPECT_FALSE(limit("1:memoryx:/\n2:xmemory:/\n3:,:/\n").has_value());
  EXPECT_FALSE(limit("0::/../../../../etc\n").has_value());
  const auto found = limit("garbage\n:::\n0::/\n");
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(found->bytes, gib);
}

TEST(MemoryBudget, SaysWhereTheLimitComesFrom) {
  EXPECT_EQ((xax_bench::MemoryBudget::machine(16 * gib).describe()), "this machine's 16.0 GiB of memory");
  EXPECT_EQ(
      (xax_bench::MemoryBudget{.bytes = 4 * gib, .cgroup_file = "/sys/fs/cgroup/memory.max"}.describe()),
      "the 4.0 GiB of memory its cgroup allows (/sys/fs/cgroup/memory.max)");
}

TEST(MemoryBudget, IsNoMoreThanTheMachinesMemory) {
  const xax_bench::MemoryBudget budget = xax_bench::memory_budget();
  EXPECT_GT(budget.bytes, 0U);
  EXPECT_LE(budget.bytes, xax_bench::physical_memory_bytes());
}

// The checks that use the budget name a cgroup's limit when it is the one exceeded.
TEST(MemoryBudget, ARefusalNamesTheCgroupsLimit) {
  xax::SyntheticClassificationOptions synthetic;  // 70,000 samples of 784 floats: 0.2 GiB
  try {
    xax_bench::require_synthetic_fits(synthetic,
                                      {.bytes = gib / 8, .cgroup_file = "/sys/fs/cgroup/job/memory.max"});
    ADD_FAILURE() << "no error";
  } catch (const xax::ConfigError& error) {
    EXPECT_STREQ(
        error.what(),
        "--train-samples 60000 and --test-samples 10000 make a synthetic set of 0.2 GiB, more than the "
        "0.1 GiB of memory its cgroup allows (/sys/fs/cgroup/job/memory.max); give fewer samples");
  }
}

}  // namespace
