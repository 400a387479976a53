#pragma once
// Process memory as the kernel counts it (/proc/self/status): the resident set now (VmRSS) and its peak
// (VmHWM). Writing 5 to /proc/self/clear_refs resets the peak to the current RSS (Linux >= 4.0), which lets
// every training run be measured on its own inside one process.

#include <cstddef>
#include <fstream>
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
