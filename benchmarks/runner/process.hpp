#pragma once
// Running helper programs (gnuplot, the PyTorch peer) without a shell: arguments are passed as they are, so
// paths with spaces or quotes cannot break a command line, and output goes to a log file the report can point
// at.

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <system_error>
#include <vector>

extern char** environ;  // NOLINT: POSIX declares it nowhere in a header

namespace xax_bench {

/// The first executable called `name` on $PATH (or `name` itself if it contains a '/'), or nullopt.
inline std::optional<std::filesystem::path> find_program(const std::string& name) {
  const auto executable = [](const std::filesystem::path& path) {
    std::error_code error;
    return std::filesystem::is_regular_file(path, error) && ::access(path.c_str(), X_OK) == 0;
  };
  if (name.find('/') != std::string::npos) {
    return executable(name) ? std::optional<std::filesystem::path>(name) : std::nullopt;
  }
  const char* path = std::getenv("PATH");  // NOLINT(concurrency-mt-unsafe): no thread changes the environment
  std::string_view rest = path != nullptr ? path : "/usr/local/bin:/usr/bin:/bin";
  while (!rest.empty()) {
    const std::size_t colon = rest.find(':');
    const std::string_view dir = rest.substr(0, colon);
    if (!dir.empty() && executable(std::filesystem::path(dir) / name))
      return std::filesystem::path(dir) / name;
    if (colon == std::string_view::npos) break;
    rest.remove_prefix(colon + 1);
  }
  return std::nullopt;
}

/// How a child process ended.
struct ProcessResult {
  bool started = false;
  int exit_code = -1;  ///< the exit status, or -1 when it did not start or was killed by a signal
  std::string error;   ///< why it did not start, or which signal ended it
  [[nodiscard]] bool succeeded() const { return started && exit_code == 0; }
};

/// Runs `argv` (argv[0] a path), its stdout and stderr appended to `log` (or discarded when empty), with
/// `environment` added to this process's environment, and waits for it.
inline ProcessResult run_process(const std::vector<std::string>& argv, const std::filesystem::path& log,
                                 const std::map<std::string, std::string>& environment = {}) {
  ProcessResult result;
  std::vector<std::string> env_strings;
  for (char** entry = environ; *entry != nullptr; ++entry) {
    const std::string_view text(*entry);
    const std::string key(text.substr(0, text.find('=')));
    if (!environment.contains(key)) env_strings.emplace_back(text);
  }
  for (const auto& [key, value] : environment) env_strings.push_back(key + "=" + value);

  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  std::vector<char*> env;
  for (std::string& e : env_strings) env.push_back(e.data());
  env.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  const std::string log_path = log.empty() ? std::string("/dev/null") : log.string();
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND,
                                   0644);
  posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);

  pid_t pid = 0;
  const int spawn_error = ::posix_spawn(&pid, args[0], &actions, nullptr, args.data(), env.data());
  posix_spawn_file_actions_destroy(&actions);
  if (spawn_error != 0) {
    result.error = "cannot start " + argv[0] + ": " + std::strerror(spawn_error);
    return result;
  }
  result.started = true;
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) {
      result.error = std::string("waitpid failed: ") + std::strerror(errno);
      return result;
    }
  }
  if (WIFEXITED(status)) {
    result.exit_code = WEXITSTATUS(status);
    if (result.exit_code != 0)
      result.error = argv[0] + " exited with status " + std::to_string(result.exit_code);
  } else if (WIFSIGNALED(status)) {
    result.error = argv[0] + " was killed by signal " + std::to_string(WTERMSIG(status));
  }
  return result;
}

}  // namespace xax_bench
