// libFuzzer target for the benchmark's cgroup memory-limit reader (benchmarks/runner/memory.hpp,
// cgroup_memory_limit), which parses /proc/self/cgroup and follows the paths it names to the limit files
// under the cgroup mount. Both are outside input: a container or a kernel other than the one the reader was
// written against decides what they hold.
//
// The input is split into four parts: the first three bytes give the lengths (each modulo 32) of the texts
// of three limit files in a scratch mount, <root>/memory.max (cgroup v2's root), <root>/a/memory.max (a
// child cgroup) and <root>/memory/memory.limit_in_bytes (v1's memory controller); those texts follow, and
// the rest is the /proc/self/cgroup text.
//
// Any input either yields no limit, or a limit read from one of those three files (never a path outside the
// mount, whatever the /proc text names) whose value is that file's first line as a decimal number. Anything
// else (an exception, a crash, a sanitizer report) is a bug.
#include <algorithm>
#include <array>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>

#include "../scratch_directory.hpp"
#include "runner/memory.hpp"
#include "scratch_file.hpp"

namespace {

struct LimitFile {
  std::filesystem::path relative;
  std::string text;
};

const std::filesystem::path& mount_root() {
  // Made once per process (mkdtemp keeps parallel jobs apart); the limit files are rewritten for every input.
  static const xax_test::ScratchDirectory directory("xax_cgroup_fuzzer", xax_fuzz::scratch_root());
  return directory.path();
}

void write_file(const std::filesystem::path& path, std::string_view bytes) {
  std::filesystem::create_directories(path.parent_path());
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) std::abort();
}

/// What a limit file's text says, worked out independently of the reader: its first line, if that is a
/// decimal number that fits in 64 bits.
std::optional<std::uint64_t> expected_limit(std::string_view text) {
  const std::string_view line = text.substr(0, text.find('\n'));
  if (line.empty()) return std::nullopt;
  std::uint64_t value = 0;
  for (const char c : line) {
    if (c < '0' || c > '9') return std::nullopt;
    const auto digit = static_cast<std::uint64_t>(c - '0');
    if (value > (UINT64_MAX - digit) / 10) return std::nullopt;
    value = value * 10 + digit;
  }
  return value;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::array<LimitFile, 3> files{LimitFile{"memory.max", {}}, LimitFile{"a/memory.max", {}},
                                 LimitFile{"memory/memory.limit_in_bytes", {}}};
  if (size < files.size()) return 0;
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  std::size_t offset = files.size();
  for (std::size_t i = 0; i < files.size(); ++i) {
    const std::size_t length = std::min<std::size_t>(data[i] % 32, size - offset);
    files[i].text = std::string(input.substr(offset, length));
    offset += length;
  }
  const std::string_view proc_self_cgroup = input.substr(offset);
  for (const LimitFile& file : files) write_file(mount_root() / file.relative, file.text);

  const std::optional<xax_bench::CgroupMemoryLimit> limit =
      xax_bench::cgroup_memory_limit(proc_self_cgroup, mount_root());
  if (!limit) return 0;
  for (const LimitFile& file : files) {
    std::error_code error;
    if (std::filesystem::equivalent(limit->file, mount_root() / file.relative, error)) {
      const std::optional<std::uint64_t> expected = expected_limit(file.text);
      if (!expected || *expected != limit->bytes) std::abort();
      return 0;
    }
  }
  std::abort();  // a limit from a file the scratch mount does not hold
}
