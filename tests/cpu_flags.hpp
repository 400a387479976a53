#pragma once
// The CPU feature flags the operating system reports, read independently of xax's cpuid code: on Linux the
// "flags" (x86) or "Features" (Arm) line of /proc/cpuinfo. The kernel lists a feature only when the CPU has
// it and the kernel has enabled its register state, which is what xax::cpu_features() claims to detect.

#include <fstream>
#include <optional>
#include <set>
#include <sstream>
#include <string>

namespace xax_test {

/// The first processor's flags, or nothing where /proc/cpuinfo is missing or has no flags line.
inline std::optional<std::set<std::string>> os_cpu_flags() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    const std::size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    const std::string key = line.substr(0, line.find_last_not_of(" \t", colon - 1) + 1);
    if (key != "flags" && key != "Features") continue;
    std::set<std::string> flags;
    std::istringstream words(line.substr(colon + 1));
    for (std::string word; words >> word;) flags.insert(word);
    return flags;
  }
  return std::nullopt;
}

}  // namespace xax_test
