#pragma once
// Process memory as the kernel counts it (/proc/self/status): the resident set now (VmRSS) and its peak
// (VmHWM). Writing 5 to /proc/self/clear_refs resets the peak to the current RSS (Linux >= 4.0), which lets
// every training run be measured on its own inside one process. And the memory the process may use at all
// (memory_budget): the machine's, or its cgroup's limit where that is lower.

#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "report/format.hpp"

namespace xax_bench {

/// A field of /proc/self/status in bytes ("VmRSS", "VmHWM"), or nullopt where there is no such file.
inline std::optional<std::size_t> proc_status_bytes(std::string_view field) {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.size() > field.size() && line.compare(0, field.size(), field) == 0 &&
        line[field.size()] == ':') {
      return static_cast<std::size_t>(std::stoull(line.substr(field.size() + 1))) *
             1024;  // the kernel says kB
    }
  }
  return std::nullopt;
}

inline std::size_t current_rss_bytes() {
  return proc_status_bytes("VmRSS").value_or(0);
}
inline std::size_t peak_rss_bytes() {
  return proc_status_bytes("VmHWM").value_or(0);
}

/// The machine's physical memory in bytes, or the largest value where it cannot be read (nothing is then
/// refused for its size).
inline std::uint64_t physical_memory_bytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES);
  const long page_size = ::sysconf(_SC_PAGESIZE);
  if (pages <= 0 || page_size <= 0) return std::numeric_limits<std::uint64_t>::max();
  return static_cast<std::uint64_t>(pages) * static_cast<std::uint64_t>(page_size);
}

/// A memory limit set on a cgroup, and the file it was read from.
struct CgroupMemoryLimit {
  std::uint64_t bytes = 0;
  std::filesystem::path file;
};

namespace detail {

/// The number in a cgroup limit file ("max", v2's "no limit", and anything unreadable give nullopt).
inline std::optional<std::uint64_t> read_limit_file(const std::filesystem::path& file) {
  std::ifstream in(file);
  std::string text;
  if (!std::getline(in, text)) return std::nullopt;  // one line, the number and its newline
  std::uint64_t value = 0;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (error != std::errc{} || end != text.data() + text.size()) return std::nullopt;
  return value;
}

}  // namespace detail

/// The smallest memory limit on this process's cgroups, given /proc/self/cgroup's text (lines of
/// "id:controllers:path") and where the cgroup filesystems are mounted: memory.max under `mount_root`
/// (cgroup v2) and memory.limit_in_bytes under `mount_root`/memory (v1's memory controller). The limit of
/// every cgroup from the process's own up to the root applies, so each is read. A container sees its own
/// cgroup mounted as the root while /proc may still name the host's path; walking up to the root then finds
/// it. v1's "no limit" is a number larger than any machine's memory, so taking the smallest needs no special
/// case. nullopt where no limit is set or nothing can be read.
inline std::optional<CgroupMemoryLimit> cgroup_memory_limit(std::string_view proc_self_cgroup,
                                                            const std::filesystem::path& mount_root) {
  std::optional<CgroupMemoryLimit> smallest;
  const auto consider = [&](const std::filesystem::path& hierarchy, const std::filesystem::path& cgroup,
                            const char* file_name) {
    std::filesystem::path cgroup_path = cgroup.relative_path();
    while (true) {
      const std::filesystem::path file = hierarchy / cgroup_path / file_name;
      if (const std::optional<std::uint64_t> bytes = detail::read_limit_file(file)) {
        if (!smallest || *bytes < smallest->bytes) smallest = CgroupMemoryLimit{*bytes, file};
      }
      if (cgroup_path.empty()) break;
      cgroup_path = cgroup_path.parent_path();
    }
  };
  std::size_t line_start = 0;
  while (line_start < proc_self_cgroup.size()) {
    std::size_t line_end = proc_self_cgroup.find('\n', line_start);
    if (line_end == std::string_view::npos) line_end = proc_self_cgroup.size();
    const std::string_view line = proc_self_cgroup.substr(line_start, line_end - line_start);
    line_start = line_end + 1;
    const std::size_t first_colon = line.find(':');
    const std::size_t second_colon =
        first_colon == std::string_view::npos ? std::string_view::npos : line.find(':', first_colon + 1);
    if (second_colon == std::string_view::npos) continue;
    const std::string_view id = line.substr(0, first_colon);
    const std::string_view controllers = line.substr(first_colon + 1, second_colon - first_colon - 1);
    // The kernel writes absolute paths without "..": anything else is not its text, and is not followed.
    const std::filesystem::path cgroup(line.substr(second_colon + 1));
    if (!cgroup.is_absolute() ||
        std::any_of(cgroup.begin(), cgroup.end(),
                    [](const std::filesystem::path& part) { return part == ".."; })) {
      continue;
    }
    if (id == "0" && controllers.empty()) {
      consider(mount_root, cgroup, "memory.max");
      continue;
    }
    for (std::size_t begin = 0; begin <= controllers.size();) {
      std::size_t end = controllers.find(',', begin);
      if (end == std::string_view::npos) end = controllers.size();
      if (controllers.substr(begin, end - begin) == "memory") {
        consider(mount_root / "memory", cgroup, "memory.limit_in_bytes");
      }
      begin = end + 1;
    }
  }
  return smallest;
}

/// The memory this process may use: the machine's, or less where a cgroup (a container, a systemd slice, a
/// batch scheduler's job) caps it.
struct MemoryBudget {
  std::uint64_t bytes = std::numeric_limits<std::uint64_t>::max();
  /// The cgroup limit file that sets the budget; empty when it is the machine's physical memory.
  std::filesystem::path cgroup_file;

  /// The budget of a process that only the machine's `bytes` of memory limit.
  [[nodiscard]] static MemoryBudget machine(std::uint64_t bytes) { return {bytes, {}}; }

  /// How a message names the budget: "this machine's 23.5 GiB of memory", or "the 4.0 GiB of memory its
  /// cgroup allows (/sys/fs/cgroup/memory.max)".
  [[nodiscard]] std::string describe() const {
    if (cgroup_file.empty()) return "this machine's " + gib(static_cast<double>(bytes)) + " of memory";
    return "the " + gib(static_cast<double>(bytes)) + " of memory its cgroup allows (" +
           cgroup_file.string() + ")";
  }
};

/// The smaller of the machine's physical memory and this process's cgroup limits (Linux; elsewhere, the
/// physical memory alone).
inline MemoryBudget memory_budget() {
  MemoryBudget budget = MemoryBudget::machine(physical_memory_bytes());
  std::ifstream proc_self_cgroup("/proc/self/cgroup");
  const std::string text{std::istreambuf_iterator<char>(proc_self_cgroup), std::istreambuf_iterator<char>()};
  if (const std::optional<CgroupMemoryLimit> limit = cgroup_memory_limit(text, "/sys/fs/cgroup")) {
    if (limit->bytes < budget.bytes) budget = {limit->bytes, limit->file};
  }
  return budget;
}

/// The 1-minute load average (/proc/loadavg), or 0 where there is none.
inline double load_average() {
  std::ifstream loadavg("/proc/loadavg");
  double value = 0;
  loadavg >> value;
  return value;
}

/// Returns freed heap memory to the kernel, then resets the peak RSS to the current RSS. Returns false where
/// the peak cannot be reset (not Linux, or /proc mounted read-only), in which case VmHWM stays the lifetime
/// peak.
inline bool reset_peak_rss() {
#if defined(__GLIBC__)
  // glibc maps each block of at least M_MMAP_THRESHOLD on its own, but by default it raises the threshold to
  // the size of every mapped block freed (up to 32 MiB). After a run frees its 25 MiB batch, tensors up to
  // that size come from the heap, whose freed pages stay resident according to how they happen to be laid
  // out: one run's peak then depended on the runs before it (by up to 13 MiB in the memory probe, against a
  // 110-190 MiB growth). A fixed threshold keeps every tensor of 1 MiB or more mapped for exactly its
  // lifetime, so the peak counts the tensors a run holds at once. Step times do not change (measured with
  // the TrainStep and CharGptStep micro-benchmarks): the steps' large buffers are allocated once.
  ::mallopt(M_MMAP_THRESHOLD, 1 << 20);
  // Without this, memory a previous run freed can stay resident in glibc's heap and count against the next
  // run.
  ::malloc_trim(0);
#endif
  std::ofstream clear_refs("/proc/self/clear_refs");
  if (!clear_refs) return false;
  clear_refs << "5";
  clear_refs.close();
  return static_cast<bool>(clear_refs);
}

}  // namespace xax_bench
