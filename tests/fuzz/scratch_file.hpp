#pragma once
// A file for harnesses whose parser reads from a path: one per fuzzing process, rewritten for every input,
// and removed when the process ends. It lives in /dev/shm where there is one, because on a disk file system
// truncating and rewriting a file per input waits for the disk (ext4 flushes a truncated file on close),
// which made a million inputs take hours.
#include <unistd.h>

#include <filesystem>
#include <string>
#include <string_view>
#include <system_error>

namespace xax_fuzz {

/// Where a harness keeps its scratch file or directory `name`: in /dev/shm (else the temporary directory),
/// prefixed by the process id, which keeps parallel jobs apart.
inline std::filesystem::path scratch_path(std::string_view name) {
  std::error_code error;
  const std::filesystem::path directory = std::filesystem::is_directory("/dev/shm", error)
                                              ? std::filesystem::path("/dev/shm")
                                              : std::filesystem::temp_directory_path();
  return directory / (std::to_string(::getpid()) + "_" + std::string(name));
}

class ScratchFile {
 public:
  /// `name` tells the fuzzers' files apart, e.g. "xax_idx_fuzzer.idx".
  explicit ScratchFile(std::string_view name) : path_(scratch_path(name)) {}
  ~ScratchFile() {
    std::error_code ignored;
    std::filesystem::remove(path_, ignored);
  }
  ScratchFile(const ScratchFile&) = delete;
  ScratchFile& operator=(const ScratchFile&) = delete;

  [[nodiscard]] const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

}  // namespace xax_fuzz
