#pragma once
// Process memory as the kernel counts it (/proc/self/status): the resident set now (VmRSS) and its peak
// (VmHWM). Writing 5 to /proc/self/clear_refs resets the peak to the current RSS (Linux >= 4.0), which lets
// every training run be measured on its own inside one process.

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <fstream>
#include <limits>
#include <optional>
#include <string>
#include <string_view>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

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
