#pragma once
// A directory of its own for one test, removed when the test ends.
//
// ctest runs every test case in its own process, several at once, and the same test binary runs in several
// build configurations. A name made of the test's name and a seed or a time stamp is not unique: two typed
// instances of one test started in the same millisecond shared a directory, and one removed it while the
// other was writing into it. mkdtemp() creates the directory atomically under a name no other process holds.
#include <stdlib.h>  // mkdtemp (POSIX)

#include <filesystem>
#include <stdexcept>
#include <string>
#include <system_error>

namespace xax_test {

class ScratchDirectory {
 public:
  /// `stem` says whose directory it is when one is left behind, e.g. "xax_checkpoint_test"; it is made in
  /// `parent`, the temporary directory by default.
  explicit ScratchDirectory(const std::string& stem,
                            const std::filesystem::path& parent = std::filesystem::temp_directory_path()) {
    std::string pattern = (parent / (stem + "_XXXXXX")).string();
    if (::mkdtemp(pattern.data()) == nullptr) {
      throw std::system_error(errno, std::generic_category(), "mkdtemp " + pattern);
    }
    path_ = pattern;
  }
  ~ScratchDirectory() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  ScratchDirectory(const ScratchDirectory&) = delete;
  ScratchDirectory& operator=(const ScratchDirectory&) = delete;

  [[nodiscard]] const std::filesystem::path& path() const { return path_; }
  [[nodiscard]] std::filesystem::path operator/(const std::filesystem::path& name) const {
    return path_ / name;
  }

 private:
  std::filesystem::path path_;
};

}  // namespace xax_test
