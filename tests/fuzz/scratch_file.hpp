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

/// Where harnesses keep their scratch files: /dev/shm, else the temporary directory.
inline std::filesystem::path scratch_root() {
  std::error_code error;
  return std::filesystem::is_directory("/dev/shm", error) ? std::filesystem::path("/dev/shm")
                                                          : std::filesystem::temp_directory_path();
}

class ScratchFile {
 public:
  /// `name` tells the fuzzers' files apart, e.g. "xax_idx_fuzzer.idx"; the process id keeps parallel jobs
  /// apart.
  explicit ScratchFile(std::string_view name)
      : path_(scratch_root() / (std::to_string(::getpid()) + "_" + std::string(name))) {}
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
